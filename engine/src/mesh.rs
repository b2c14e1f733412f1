//! The core-to-core mesh: one bounded SPSC channel (glommio `shared_channel`) for every ordered
//! pair of cores, built once at start-up. Producers on a core push into a bounded local outbox
//! per destination; one flusher task per destination drains it in batches of up to
//! `mesh_batch_items_max`, so every item bound for the same core in one reactor turn travels
//! in one batch.
//!
//! ```text
//!  conn task / committer ──push──► Outbox[dest] ──flusher (batch)──► shared_channel ──► receiver task on dest
//! ```
//!
//! No cycles: receiver tasks never wait on the mesh (`Core::handle` is synchronous and only
//! stages work), so a full channel always drains and waiting producers always make progress.

use crate::msg::CoreMsg;
use crate::notify::Notify;
use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use std::cell::RefCell;
use std::collections::VecDeque;

pub type Batch = Vec<CoreMsg>;

/// The channel ends one core owns: a sender towards and a receiver from every other core.
pub struct MeshEnds {
    pub senders: Vec<Option<SharedSender<Batch>>>,
    pub receivers: Vec<Option<SharedReceiver<Batch>>>,
}

/// Builds the full mesh for `cores` cores; element `i` goes to core `i`'s thread.
pub fn build(cores: usize, channel_batches_max: usize) -> Vec<MeshEnds> {
    let mut ends: Vec<MeshEnds> = (0..cores)
        .map(|_| MeshEnds {
            senders: (0..cores).map(|_| None).collect(),
            receivers: (0..cores).map(|_| None).collect(),
        })
        .collect();
    for from in 0..cores {
        for to in 0..cores {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(channel_batches_max);
                ends[from].senders[to] = Some(tx);
                ends[to].receivers[from] = Some(rx);
            }
        }
    }
    ends
}

struct Outbox {
    queue: RefCell<VecDeque<CoreMsg>>,
    /// Wakes the flusher: the queue went from empty to non-empty.
    ready: Notify,
    /// Wakes producers waiting for room.
    space: Notify,
}

pub struct Mesh {
    core: usize,
    outboxes: Vec<Outbox>,
    outbox_items_max: usize,
    batch_items_max: usize,
}

impl Mesh {
    pub fn new(core: usize, cores: usize, outbox_items_max: usize, batch_items_max: usize) -> Mesh {
        Mesh {
            core,
            outboxes: (0..cores)
                .map(|_| Outbox {
                    queue: RefCell::new(VecDeque::new()),
                    ready: Notify::new(),
                    space: Notify::new(),
                })
                .collect(),
            outbox_items_max,
            batch_items_max,
        }
    }

    /// Queues `msg` for core `dest` (never this core: callers handle local work directly),
    /// waiting while the outbox towards `dest` is full.
    pub async fn send(&self, dest: usize, msg: CoreMsg) {
        assert_ne!(dest, self.core, "local messages never go through the mesh");
        let outbox = &self.outboxes[dest];
        loop {
            let len = outbox.queue.borrow().len();
            if len < self.outbox_items_max {
                outbox.queue.borrow_mut().push_back(msg);
                if len == 0 {
                    outbox.ready.notify();
                }
                return;
            }
            outbox.space.notified().await;
        }
    }

    /// Items waiting in the outbox towards `dest` (a metric).
    pub fn outbox_depth(&self, dest: usize) -> usize {
        self.outboxes[dest].queue.borrow().len()
    }

    /// Drains the outbox towards `dest` into its channel until the peer goes away.
    pub async fn run_flusher(&self, dest: usize, tx: SharedSender<Batch>) {
        let tx: ConnectedSender<Batch> = tx.connect().await;
        let outbox = &self.outboxes[dest];
        loop {
            while outbox.queue.borrow().is_empty() {
                outbox.ready.notified().await;
            }
            // Let the rest of this reactor turn add to the batch.
            futures_lite::future::yield_now().await;
            let batch: Batch = {
                let mut q = outbox.queue.borrow_mut();
                let n = q.len().min(self.batch_items_max);
                q.drain(..n).collect()
            };
            outbox.space.notify();
            if tx.send(batch).await.is_err() {
                return; // the other core shut down
            }
        }
    }
}

/// Receives batches from one other core and hands each item to `handle`, which must not wait.
pub async fn run_receiver(rx: SharedReceiver<Batch>, mut handle: impl FnMut(CoreMsg)) {
    let rx: ConnectedReceiver<Batch> = rx.connect().await;
    while let Some(batch) = rx.recv().await {
        for msg in batch {
            handle(msg);
        }
    }
}
