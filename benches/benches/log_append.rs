//! Group-commit cost of the embedded store: `EmbeddedStore::append` of batches of 1, 16 and 128
//! message records (200 B payloads), each append one write plus one real `fdatasync`, into a
//! growing segment (`grow`: every append extends the file, so its `fdatasync` also commits the
//! new size and extents) and into a preallocated one (`prealloc`: zero-filled and synced before
//! the first append, so the `fdatasync` flushes data only).
//!
//! ```text
//!  [Record; batch] ──encode+crc──► one write_at ──► one fdatasync ──► index ──► Ok
//! ```
//!
//! Throughput is `batch` records per iteration, so criterion reports records per second; after
//! each batch size the bench also prints the p50/p99/p999 of the `fdatasync` alone (from
//! `AppendStats::sync_us`). The store lives in a tempdir under `$SWITCHBOARD_BENCH_DIR` (default:
//! the system temp dir), so point that at the device you want to measure: a tmpfs makes
//! `fdatasync` free and the numbers meaningless.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use glommio::LocalExecutorBuilder;
use switchboard_storage::{ChatKind, EmbeddedStore, Record, StoreConfig, StoredMessage};
use switchboard_wire::ids::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};

const BATCHES: [usize; 3] = [1, 16, 128];
const PAYLOAD_BYTES: usize = 200;
const CHAT: ChatId = ChatId(0x1234_5678);

fn template(batch: usize) -> Vec<Record> {
    (0..batch)
        .map(|i| {
            Record::Message(StoredMessage {
                chat: CHAT,
                seq: Seq(0),
                msg_id: MsgId(0),
                sender_user: UserId(1),
                sender_device: DeviceId(1),
                timestamp_ms: 1_700_000_000_000,
                client_msg_id: ClientMsgId::from_halves(7, i as u64),
                reply_to: Seq(0),
                content_kind: 1,
                flags: 0,
                payload: (0..PAYLOAD_BYTES).map(|b| (b * 31 + i) as u8).collect(),
            })
        })
        .collect()
}

fn tempdir() -> tempfile::TempDir {
    match std::env::var_os("SWITCHBOARD_BENCH_DIR") {
        Some(dir) => tempfile::tempdir_in(dir).expect("tempdir in SWITCHBOARD_BENCH_DIR"),
        None => tempfile::tempdir().expect("tempdir"),
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn log_append(c: &mut Criterion) {
    let ex = LocalExecutorBuilder::default()
        .make()
        .expect("glommio executor");
    let mut group = c.benchmark_group("log_append");
    group.sample_size(20);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for (mode, preallocate_segments) in [("grow", false), ("prealloc", true)] {
        for batch in BATCHES {
            group.throughput(Throughput::Elements(batch as u64));
            let sync_us = RefCell::new(Vec::new());
            group.bench_with_input(
                BenchmarkId::new(format!("records_200B_{mode}"), batch),
                &batch,
                |b, &batch| {
                    b.iter_custom(|iters| {
                        ex.run(async {
                            let tmp = tempdir();
                            let cfg = StoreConfig {
                                preallocate_segments,
                                ..StoreConfig::default()
                            };
                            let (store, _) = EmbeddedStore::open(&tmp.path().join("shard-0"), cfg)
                                .await
                                .expect("open store");
                            // Preallocated: a zero-filled spare, adopted by the first append in
                            // place of the fresh shard's empty segment (not timed).
                            store.prepare_spare().await.expect("spare segment");
                            store
                                .append(&[Record::ChatCreated {
                                    chat: CHAT,
                                    kind: ChatKind::Direct,
                                    members: vec![UserId(1), UserId(2)],
                                    created_ms: 0,
                                }])
                                .await
                                .expect("create chat");
                            assert_eq!(store.active_preallocated(), preallocate_segments);
                            let mut records = template(batch);
                            let mut seq = 0u64;
                            let mut syncs = Vec::with_capacity(iters as usize);
                            let mut elapsed = Duration::ZERO;
                            for _ in 0..iters {
                                for r in &mut records {
                                    if let Record::Message(m) = r {
                                        seq += 1;
                                        m.seq = Seq(seq);
                                        m.msg_id = MsgId(seq);
                                    }
                                }
                                let start = Instant::now();
                                let stats = store.append(&records).await.expect("append");
                                elapsed += start.elapsed();
                                syncs.push(stats.sync_us);
                            }
                            sync_us.borrow_mut().extend(syncs);
                            store.close().await.expect("close store");
                            elapsed
                        })
                    })
                },
            );
            let mut s = sync_us.into_inner();
            s.sort_unstable();
            println!(
            "log_append/records_200B_{mode}/{batch}: fdatasync us p50 {} p99 {} p999 {} over {} \
             appends",
            percentile(&s, 0.50),
            percentile(&s, 0.99),
            percentile(&s, 0.999),
            s.len()
        );
        }
    }
    group.finish();
}

criterion_group!(benches, log_append);
criterion_main!(benches);
