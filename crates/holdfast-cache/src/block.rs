//! A block being fetched, as its readers see it: its state (waiting for the
//! upstream's head, being written, done, failed) in a `watch`, and the
//! buffer its bytes are written to (a `.part` file, or memory for a block
//! that is not stored). A [`Fill`] is one upstream request's claim on a run
//! of such blocks, handed to the reader that started it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use holdfast_model::lock;
use tokio::sync::watch;

use crate::{FillError, Meta};

/// Where a block's bytes are while it is being fetched.
#[derive(Clone)]
pub(crate) enum Buf {
    /// A `.part` file (stored once complete), and its path.
    File(Arc<File>, Arc<PathBuf>),
    /// Memory, for a block that is not stored (version changed, no room).
    Mem(Arc<RwLock<Vec<u8>>>),
}

impl Buf {
    /// A memory buffer for a block of `len` bytes.
    pub(crate) fn memory(len: u64) -> Buf {
        Buf::Mem(Arc::new(RwLock::new(Vec::with_capacity(len as usize))))
    }

    pub(crate) fn read(&self, from: u64, to: u64) -> std::io::Result<Bytes> {
        match self {
            Buf::File(f, _) => {
                let mut v = vec![0u8; (to - from) as usize];
                f.read_exact_at(&mut v, from)?;
                Ok(Bytes::from(v))
            }
            Buf::Mem(m) => {
                let m = m.read().unwrap_or_else(|p| p.into_inner());
                Ok(Bytes::copy_from_slice(&m[from as usize..to as usize]))
            }
        }
    }

    pub(crate) fn write(&self, at: u64, data: &[u8]) -> std::io::Result<()> {
        match self {
            Buf::File(f, _) => f.write_all_at(data, at),
            Buf::Mem(m) => {
                m.write().unwrap_or_else(|p| p.into_inner()).extend_from_slice(data);
                Ok(())
            }
        }
    }
}

/// The data of a block once its fill has the upstream's answer.
#[derive(Clone)]
pub(crate) struct BlockData {
    pub(crate) meta: Arc<Meta>,
    pub(crate) len: u64,
    pub(crate) buf: Buf,
}

#[derive(Clone)]
pub(crate) enum BlockState {
    /// The fill is waiting for the upstream's response head.
    Waiting,
    /// Bytes `0..written` are in `data`.
    Writing { data: BlockData, written: u64 },
    /// All bytes are in `data`.
    Done(BlockData),
    /// The fill failed before finishing this block.
    Failed(Arc<FillError>),
}

/// A block being fetched.
pub(crate) struct Block {
    pub(crate) state: watch::Sender<BlockState>,
}

impl Block {
    pub(crate) fn new() -> Arc<Block> {
        Arc::new(Block {
            state: watch::Sender::new(BlockState::Waiting),
        })
    }

    pub(crate) fn fail(&self, e: &Arc<FillError>) {
        self.state.send_if_modified(|s| {
            if matches!(s, BlockState::Done(_) | BlockState::Failed(_)) {
                false
            } else {
                *s = BlockState::Failed(e.clone());
                true
            }
        });
    }

    /// True once the fill failed before finishing it.
    pub(crate) fn failed(&self) -> bool {
        matches!(&*self.state.borrow(), BlockState::Failed(_))
    }

    /// Waits for the response head: the version, or the failure.
    pub(crate) async fn meta(&self) -> Result<Arc<Meta>, Arc<FillError>> {
        let mut rx = self.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                BlockState::Waiting => {}
                BlockState::Writing { data, .. } | BlockState::Done(data) => return Ok(data.meta.clone()),
                BlockState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Arc::new(FillError::Upstream("fill ended".into())));
            }
        }
    }
}

/// One upstream request filling a run of blocks.
pub(crate) struct Fill {
    /// Blocks this fill claimed (public and private) that its reader has
    /// not taken yet.
    pub(crate) blocks: Mutex<BTreeMap<u32, Arc<Block>>>,
    /// Next block it will claim, and whether it stopped.
    pub(crate) cursor: watch::Sender<(u32, bool)>,
    /// The block it is writing: failed if the fill fails.
    pub(crate) writing: Mutex<Option<Arc<Block>>>,
    /// Fields of its response that are not stored (`private="…"`,
    /// `no-cache="…"`): passed on only to the request that started it.
    pub(crate) withheld: Mutex<Vec<(String, String)>>,
}

impl Fill {
    /// A fill whose first block is `k`.
    pub(crate) fn new(k: u32, block: Arc<Block>) -> Arc<Fill> {
        Arc::new(Fill {
            blocks: Mutex::new(BTreeMap::from([(k, block)])),
            cursor: watch::Sender::new((k + 1, false)),
            writing: Mutex::new(None),
            withheld: Mutex::new(Vec::new()),
        })
    }

    /// Puts back a block the reader looked at before it needs it.
    pub(crate) fn keep(&self, k: u32, block: Arc<Block>) {
        lock(&self.blocks).insert(k, block);
    }

    /// The block `k` if this fill claims it (waiting until it gets there);
    /// `None` once it stopped before `k`.
    pub(crate) async fn take(&self, k: u32) -> Option<Arc<Block>> {
        let mut rx = self.cursor.subscribe();
        loop {
            let (next, stopped) = *rx.borrow_and_update();
            if next > k || stopped || rx.changed().await.is_err() {
                let mut blocks = lock(&self.blocks);
                let b = blocks.remove(&k);
                // The reader moves forward: earlier blocks are not wanted.
                blocks.retain(|&i, _| i > k);
                return b;
            }
        }
    }

    /// Marks the fill stopped: its reader claims no more blocks from it.
    pub(crate) fn stop(&self) {
        self.cursor.send_modify(|c| c.1 = true);
    }
}

/// What a reader gets for one block.
pub(crate) enum Source {
    /// Stored for object id `id`, of version `meta`.
    Stored { id: u64, meta: Arc<Meta> },
    /// Being fetched.
    Block(Arc<Block>),
}
