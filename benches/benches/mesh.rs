//! Cross-core routing: items from core 0 to core 1 through the engine's mesh (`Mesh::send` into
//! the bounded outbox, the flusher's batches over glommio's `shared_channel`, `run_receiver` on
//! the other executor), as the owner core sends `ToConn` answers and `Deliver` fan-out items.
//!
//! ```text
//!  executor 0: producer ──Mesh::send──► outbox[1] ──run_flusher (batches ≤ 256)──► shared_channel
//!  executor 1: run_receiver ──► count ──► done after N items
//! ```
//!
//! Each sample starts two fresh executors (unpinned: the development box has 2 CPUs shared with
//! everything else) and measures from the first send to the last item received, so criterion
//! reports items per second including the cross-thread wake-ups.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::{LocalExecutorBuilder, Placement};
use switchboard::mesh::{self, Mesh};
use switchboard::msg::{CoreMsg, Frame, FrameKind};
use switchboard_wire::{ChatId, Seq};

/// The engine's defaults (`mesh_channel_batches_max`, `mesh_batch_items_max`) and an outbox of
/// a few batches.
const CHANNEL_BATCHES_MAX: usize = 128;
const BATCH_ITEMS_MAX: usize = 256;
const OUTBOX_ITEMS_MAX: usize = 4 * BATCH_ITEMS_MAX;

/// What one item is.
#[derive(Clone, Copy)]
enum Kind {
    /// A `ToConn` answer (SendAck, Receipt): one frame for one connection.
    ToConn,
    /// A `Deliver` fan-out item naming 100 local connections.
    Deliver100,
}

fn item(kind: Kind, frame: &Frame, i: u64) -> CoreMsg {
    match kind {
        Kind::ToConn => CoreMsg::ToConn {
            conn: i,
            frame: frame.clone(),
            kind: FrameKind::Reply {
                completes_send: true,
            },
        },
        Kind::Deliver100 => CoreMsg::Deliver {
            frame: frame.clone(),
            chat: ChatId(7),
            seq: Seq(i + 1),
            conns: (0..100).collect(),
        },
    }
}

/// Sends `n` items from one executor to another; returns the time from the first send to the
/// last item received.
fn route(n: u64, kind: Kind) -> Duration {
    let mut ends = mesh::build(2, CHANNEL_BATCHES_MAX);
    // Set by the receiver after the last item, so the producer ends only then (dropping its
    // channel end, which ends the receiver).
    let done = Arc::new(AtomicBool::new(false));
    let done_rx = done.clone();
    let tx = ends[0].senders[1].take().expect("sender 0 -> 1");
    let rx = ends[1].receivers[0].take().expect("receiver 1 <- 0");
    let receiver = LocalExecutorBuilder::new(Placement::Unbound)
        .name("mesh-rx")
        .spawn(move || async move {
            let mut got = 0u64;
            let mut done_at = None;
            // The receiver loop ends when the producer's side goes away.
            mesh::run_receiver(rx, |_msg| {
                got += 1;
                if got == n {
                    done_at = Some(Instant::now());
                    done_rx.store(true, Ordering::Release);
                }
            })
            .await;
            (got, done_at)
        })
        .expect("spawn receiver executor");
    let producer = LocalExecutorBuilder::new(Placement::Unbound)
        .name("mesh-tx")
        .spawn(move || async move {
            let mesh = std::rc::Rc::new(Mesh::new(0, 2, OUTBOX_ITEMS_MAX, BATCH_ITEMS_MAX));
            let m = mesh.clone();
            let flusher = glommio::spawn_local(async move { m.run_flusher(1, tx).await });
            let frame: Frame = Arc::from(vec![0u8; 160].into_boxed_slice());
            let start = Instant::now();
            for i in 0..n {
                mesh.send(1, item(kind, &frame, i)).await;
            }
            // Bounded wait for the receiver to count the last item; then stop the flusher, which
            // drops the channel and ends the receiver.
            let until = Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::Acquire) && Instant::now() < until {
                glommio::timer::sleep(Duration::from_micros(100)).await;
            }
            flusher.cancel().await;
            start
        })
        .expect("spawn producer executor");
    let start = producer.join().expect("producer");
    let (got, done_at) = receiver.join().expect("receiver");
    assert_eq!(got, n, "every routed item arrives");
    done_at.expect("last item time") - start
}

fn mesh_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mesh");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(5));
    for (name, kind) in [("to_conn", Kind::ToConn), ("deliver_100", Kind::Deliver100)] {
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("core0_to_core1", name), |b| {
            b.iter_custom(|iters| route(iters.max(1), kind));
        });
    }
    g.finish();
}

criterion_group!(benches, mesh_bench);
criterion_main!(benches);
