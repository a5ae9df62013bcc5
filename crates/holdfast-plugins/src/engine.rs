//! The one wasmtime `Engine`: configuration, epoch ticker, per-world linkers
//! and the on-disk cache of compiled components.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings;
use super::metrics::{CompiledCacheMetrics, PluginMetrics};
use super::state::{EPOCH_TICK, PluginState};
use super::{PluginError, SlotName};

mod compiled_cache;
#[cfg(test)]
mod tests;

use compiled_cache::{CompiledCache, Damage, Lookup};

/// The engine and what is shared by every slot.
pub struct Runtime {
    pub(crate) engine: Engine,
    router_linker: Linker<PluginState>,
    auth_linker: Linker<PluginState>,
    content_linker: Linker<PluginState>,
    /// The on-disk cache of compiled components, if the node has one.
    cache: Option<CompiledCache>,
    /// Compiled-artifact cache hits and misses, for tests and metrics.
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    /// `holdfast_plugin_compiled_cache_total` (unregistered until [`Runtime::with_metrics`]).
    cache_metrics: CompiledCacheMetrics,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine with a pooling allocator sized for `max_instances`
    /// instances whose memories may grow to `max_memory_bytes`.
    ///
    /// # Errors
    /// The engine or a linker cannot be built.
    pub fn new(max_instances: u32, max_memory_bytes: usize, cache_dir: Option<PathBuf>) -> Result<Self, PluginError> {
        let mut pool = PoolingAllocationConfig::default();
        // A wasm32-wasip2 component holds a few core instances (the program,
        // the WASI adapter, shims), each with up to one memory and two tables.
        pool.total_component_instances(max_instances)
            .total_core_instances(max_instances.saturating_mul(6))
            .total_memories(max_instances.saturating_mul(2))
            .total_tables(max_instances.saturating_mul(6))
            .max_tables_per_module(2)
            .max_memory_size(max_memory_bytes)
            .table_elements(100_000);
        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .parallel_compilation(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
        spawn_epoch_ticker(&engine)
            .map_err(|e| PluginError::Engine(format!("cannot start the epoch ticker thread: {e}")))?;

        let cache = cache_dir.map(|dir| CompiledCache::open(dir, engine_fingerprint(&engine)));

        let linker = |slot: SlotName| -> Result<Linker<PluginState>, PluginError> {
            let mut l = Linker::new(&engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut l).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
            // Plugins run on tokio's worker threads: no WASI call may block there.
            super::stdio::link_non_blocking_io(&mut l).map_err(|e| PluginError::Engine(format!("{e:#}")))?;
            let r = match slot {
                SlotName::Router => bindings::router::Router::add_to_linker::<_, HasSelf<PluginState>>(&mut l, |s| s),
                SlotName::Auth => bindings::auth::Auth::add_to_linker::<_, HasSelf<PluginState>>(&mut l, |s| s),
                SlotName::ContentSource => {
                    bindings::content::ContentSource::add_to_linker::<_, HasSelf<PluginState>>(&mut l, |s| s)
                }
            };
            r.map_err(|e| PluginError::Engine(format!("{e:#}")))?;
            Ok(l)
        };
        Ok(Runtime {
            router_linker: linker(SlotName::Router)?,
            auth_linker: linker(SlotName::Auth)?,
            content_linker: linker(SlotName::ContentSource)?,
            engine,
            cache,
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
            cache_metrics: CompiledCacheMetrics::default(),
        })
    }

    /// Counts the compiled-plugin cache's answers in `metrics`.
    #[must_use]
    pub fn with_metrics(mut self, metrics: &PluginMetrics) -> Self {
        self.cache_metrics = CompiledCacheMetrics::new(metrics);
        self
    }

    pub(crate) fn linker(&self, slot: SlotName) -> &Linker<PluginState> {
        match slot {
            SlotName::Router => &self.router_linker,
            SlotName::Auth => &self.auth_linker,
            SlotName::ContentSource => &self.content_linker,
        }
    }

    /// Compiles `bytes`, or loads the compiled artifact from the cache.
    ///
    /// An entry is deserialized only after its header (wasm hash, engine
    /// fingerprint, length) and checksum match; a damaged entry is removed,
    /// counted and rebuilt. A new artifact is written atomically and synced.
    ///
    /// # Errors
    /// The bytes are not a valid component.
    pub(crate) fn compile(&self, bytes: &[u8], _hash: &str) -> Result<Component, PluginError> {
        if wasmparser_is_core_module(bytes) {
            return Err(PluginError::InvalidComponent(
                "this is a core wasm module, not a component: build for wasm32-wasip2".to_string(),
            ));
        }
        let started = Instant::now();
        let source: [u8; 32] = Sha256::digest(bytes).into();
        let lookup = self.cache.as_ref().map(|cache| (cache, cache.lookup(&source)));
        if let Some((_, Lookup::Damaged)) = &lookup {
            self.cache_metrics.damaged.inc();
        }
        if let Some((cache, Lookup::Hit(serialized))) = &lookup {
            match deserialize_checked(&self.engine, serialized) {
                Some(component) => {
                    self.cache_hits.fetch_add(1, Ordering::Relaxed);
                    self.cache_metrics.hit.inc();
                    tracing::debug!(wasm = %hex::encode(&source[..6]), ms = started.elapsed().as_millis() as u64,
                        "plugin loaded from the compiled-plugin cache");
                    return Ok(component);
                }
                None => {
                    cache.reject(&source, Damage::Refused);
                    self.cache_metrics.damaged.inc();
                }
            }
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        self.cache_metrics.compiled.inc();
        let component =
            Component::new(&self.engine, bytes).map_err(|e| PluginError::InvalidComponent(format!("{e:#}")))?;
        tracing::debug!(wasm = %hex::encode(&source[..6]), ms = started.elapsed().as_millis() as u64, "plugin compiled");
        let Some(cache) = &self.cache else {
            return Ok(component);
        };
        let stored = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|serialized| cache.store(&source, &serialized));
        if let Err(e) = stored {
            tracing::warn!(path = %cache.entry_path(&source).display(), "cannot cache compiled plugin: {e}");
        }
        Ok(component)
    }

    /// Compiled-artifact cache hits, misses (compiled afresh) and damaged
    /// entries removed, since start.
    #[cfg(test)]
    pub(crate) fn cache_counts(&self) -> (u64, u64, u64) {
        (
            self.cache_hits.load(Ordering::Relaxed),
            self.cache_misses.load(Ordering::Relaxed),
            self.cache.as_ref().map_or(0, |c| c.damaged.load(Ordering::Relaxed)),
        )
    }
}

/// What an artifact must have been compiled by: SHA-256 of wasmtime's
/// precompile compatibility hash (its version and every setting that
/// changes compiled code), stable across processes and builds.
fn engine_fingerprint(engine: &Engine) -> [u8; 32] {
    struct Sha(Sha256);
    impl Hasher for Sha {
        fn finish(&self) -> u64 {
            0
        }
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
    }
    let mut sha = Sha(Sha256::new());
    sha.write(b"holdfast compiled-plugin cache");
    engine.precompile_compatibility_hash().hash(&mut sha);
    sha.0.finalize().into()
}

/// Deserializes an artifact this engine wrote.
#[allow(unsafe_code)]
fn deserialize_checked(engine: &Engine, bytes: &[u8]) -> Option<Component> {
    // SAFETY: wasmtime requires that the bytes were produced by
    // `Component::serialize` of a compatible engine and not tampered with.
    // Our caller passes only the body of an entry from our own cache
    // directory whose header matched the wasm's SHA-256 and this engine's
    // fingerprint and whose length and SHA-256 checksum were verified just
    // before this call (`compiled_cache::check_entry`); the entry was
    // written whole (temp file, fsync, rename). wasmtime also checks its own
    // engine/version header.
    unsafe { Component::deserialize(engine, bytes) }.ok()
}

/// True for a core module (`\0asm` version 1), which is not a component.
fn wasmparser_is_core_module(bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..4] == *b"\0asm" && bytes[4..8] == [1, 0, 0, 0]
}

/// Advances the engine's epoch every tick until the engine is dropped.
/// Without it deadlines would never fire, so failing to start it is fatal.
fn spawn_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("holdfast-epoch".to_string())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .map(drop)
}
