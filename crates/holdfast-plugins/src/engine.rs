//! The one wasmtime `Engine`: configuration, epoch ticker, per-world linkers
//! and the on-disk cache of compiled components.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings;
use super::state::{EPOCH_TICK, PluginState};
use super::{PluginError, SlotName};

/// The engine and what is shared by every slot.
pub struct Runtime {
    pub(crate) engine: Engine,
    router_linker: Linker<PluginState>,
    auth_linker: Linker<PluginState>,
    content_linker: Linker<PluginState>,
    cache_dir: Option<PathBuf>,
    engine_key: String,
    /// Compiled-artifact cache hits and misses, for tests and metrics.
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("cache_dir", &self.cache_dir)
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

        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());

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
            cache_dir,
            engine_key,
            cache_hits: AtomicU64::new(0),
            cache_misses: AtomicU64::new(0),
        })
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
    /// # Errors
    /// The bytes are not a valid component.
    pub(crate) fn compile(&self, bytes: &[u8], hash: &str) -> Result<Component, PluginError> {
        if wasmparser_is_core_module(bytes) {
            return Err(PluginError::InvalidComponent(
                "this is a core wasm module, not a component: build for wasm32-wasip2".to_string(),
            ));
        }
        let cached = self
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{hash}-{}.cwasm", self.engine_key)));
        if let Some(path) = &cached
            && let Some(component) = self.load_cached(path)
        {
            self.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(component);
        }
        self.cache_misses.fetch_add(1, Ordering::Relaxed);
        let component =
            Component::new(&self.engine, bytes).map_err(|e| PluginError::InvalidComponent(format!("{e:#}")))?;
        if let Some(path) = &cached
            && let Err(e) = self.store_cached(path, &component)
        {
            tracing::warn!(path = %path.display(), "cannot cache compiled plugin: {e}");
        }
        Ok(component)
    }

    /// Reads a cached artifact: 32 bytes of SHA-256 of the rest, then the
    /// serialized component. A torn or altered file is ignored and replaced.
    fn load_cached(&self, path: &std::path::Path) -> Option<Component> {
        let data = std::fs::read(path).ok()?;
        if data.len() < 32 || Sha256::digest(&data[32..]).as_slice() != &data[..32] {
            tracing::warn!(path = %path.display(), "ignoring damaged compiled-plugin cache entry");
            return None;
        }
        deserialize_checked(&self.engine, &data[32..])
    }

    fn store_cached(&self, path: &std::path::Path, component: &Component) -> std::io::Result<()> {
        let bytes = component.serialize().map_err(std::io::Error::other)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let mut data = Sha256::digest(&bytes).to_vec();
        data.extend_from_slice(&bytes);
        std::fs::write(&tmp, &data)?;
        std::fs::rename(&tmp, path)
    }
}

/// Deserializes an artifact this engine wrote.
#[allow(unsafe_code)]
fn deserialize_checked(engine: &Engine, bytes: &[u8]) -> Option<Component> {
    // SAFETY: wasmtime requires that the bytes were produced by
    // `Component::serialize` of a compatible engine and not tampered with.
    // They come from our own cache directory, named by the wasm hash and the
    // engine's compatibility hash, and their SHA-256 checksum was verified
    // just before this call; wasmtime also checks the engine/version header.
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
