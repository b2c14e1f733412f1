//! Integration tests of `EmbeddedStore` on real files (a tempdir), inside a glommio executor.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use switchboard_storage::record::{MESSAGE_FRAME_OVERHEAD_BYTES, RECORD_HEADER_BYTES};
use switchboard_storage::{
    ChatKind, Corruption, CursorKind, EmbeddedStore, MessageStore, Record, ShardState,
    StorageError, StoreConfig, StoredMessage, TailDamage,
};
use switchboard_wire::ids::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};

mod util;
use util::{created, run};

const A: ChatId = ChatId(100);
const B: ChatId = ChatId(200);

fn message(chat: ChatId, seq: u64, payload_len: usize) -> StoredMessage {
    util::message_with(
        chat,
        seq,
        (0..payload_len).map(|i| (i as u64 + seq) as u8).collect(),
    )
}

fn msg(chat: ChatId, seq: u64, payload_len: usize) -> Record {
    Record::Message(message(chat, seq, payload_len))
}

/// Small segments so tests roll: two full-size records per segment at most.
fn small_cfg() -> StoreConfig {
    StoreConfig {
        segment_bytes_max: 160 * 1024,
        unsynced_bytes_max: 80 * 1024,
        ..StoreConfig::default()
    }
}

fn shard_dir(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("shard-0")
}

/// Appends `created(A)` then messages 1..=n of A with `payload_len` bytes, one batch of `batch`.
async fn fill(store: &EmbeddedStore, n: u64, payload_len: usize, batch: usize) {
    store.append(&[created(A)]).await.unwrap();
    let all: Vec<Record> = (1..=n).map(|s| msg(A, s, payload_len)).collect();
    for chunk in all.chunks(batch) {
        store.append(chunk).await.unwrap();
    }
}

fn seqs(v: &[StoredMessage]) -> Vec<u64> {
    v.iter().map(|m| m.seq.0).collect()
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn cut_file(p: &Path, new_len: u64) {
    OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(new_len)
        .unwrap();
}

/// The global offset a segment file's name carries.
fn base_of(p: &Path) -> u64 {
    let name = p.file_name().unwrap().to_str().unwrap();
    name["seg-".len()..name.len() - ".log".len()]
        .parse()
        .unwrap()
}

fn xor_byte(p: &Path, at: u64) {
    let mut f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    b[0] ^= 0x40;
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&b).unwrap();
}

#[test]
fn append_then_read_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    run(async {
        let (store, recovered) = EmbeddedStore::open(&shard_dir(&tmp), StoreConfig::default())
            .await
            .unwrap();
        assert!(recovered.is_empty());
        assert_eq!(store.durable_seq(A), Seq(0));
        assert_eq!(
            (store.index_memory().chats, store.index_memory().messages),
            (0, 0)
        );
        let batch = vec![
            created(A),
            msg(A, 1, 10),
            msg(A, 2, 0),
            Record::Cursor {
                chat: A,
                user: UserId(2),
                device: DeviceId(1),
                kind: CursorKind::Delivered,
                seq: Seq(2),
            },
            created(B),
            msg(B, 1, 300),
            msg(A, 3, 20),
        ];
        let stats = store.append(&batch).await.unwrap();
        assert_eq!(stats.records, 7);
        // Cursors and chats are not messages: 3 of A and 1 of B are.
        let mem = store.index_memory();
        assert_eq!((mem.chats, mem.messages), (2, 4));
        assert_eq!(
            stats.bytes,
            batch.iter().map(Record::encoded_len).sum::<usize>()
        );
        assert!(!stats.segment_rolled);
        assert_eq!(store.durable_seq(A), Seq(3));
        assert_eq!(store.durable_seq(B), Seq(1));
        let got = store.read_messages(A, Seq(1), Seq(3), 10).await.unwrap();
        assert_eq!(
            got,
            vec![message(A, 1, 10), message(A, 2, 0), message(A, 3, 20)]
        );
        let got = store.read_messages(B, Seq(1), Seq(1), 10).await.unwrap();
        assert_eq!(got, vec![message(B, 1, 300)]);
        // Empty batches are a no-op.
        assert_eq!(store.append(&[]).await.unwrap().records, 0);
        store.close().await.unwrap();
    });
}

#[test]
fn read_ranges_clamp_and_limit() {
    let tmp = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = EmbeddedStore::open(&shard_dir(&tmp), StoreConfig::default())
            .await
            .unwrap();
        fill(&store, 50, 30, 7).await;
        let r = |from, to, limit| store.read_messages(A, Seq(from), Seq(to), limit);
        assert_eq!(
            seqs(&r(1, 50, 100).await.unwrap()),
            (1..=50).collect::<Vec<_>>()
        );
        assert_eq!(seqs(&r(0, 3, 100).await.unwrap()), vec![1, 2, 3]);
        assert_eq!(seqs(&r(10, 20, 4).await.unwrap()), vec![10, 11, 12, 13]);
        assert_eq!(seqs(&r(48, 1000, 100).await.unwrap()), vec![48, 49, 50]);
        assert!(r(51, 60, 10).await.unwrap().is_empty());
        assert!(r(5, 4, 10).await.unwrap().is_empty());
        assert!(r(1, 50, 0).await.unwrap().is_empty());
        assert_eq!(r(7, 7, 1).await.unwrap(), vec![message(A, 7, 30)]);
        assert!(store
            .read_messages(B, Seq(1), Seq(9), 9)
            .await
            .unwrap()
            .is_empty());
        let (page, more) = store
            .read_messages_before(B, Seq(0), 10, 1000)
            .await
            .unwrap();
        assert!(page.is_empty() && !more);
    });
}

#[test]
fn history_pages_backwards_with_limit_and_bytes_max() {
    let tmp = tempfile::tempdir().unwrap();
    run(async {
        let (store, _) = EmbeddedStore::open(&shard_dir(&tmp), StoreConfig::default())
            .await
            .unwrap();
        fill(&store, 20, 100, 20).await;

        // Newest first, by count.
        let (page, more) = store
            .read_messages_before(A, Seq(0), 5, usize::MAX)
            .await
            .unwrap();
        assert_eq!(seqs(&page), vec![20, 19, 18, 17, 16]);
        assert!(more);
        let (page, more) = store
            .read_messages_before(A, Seq(16), 5, usize::MAX)
            .await
            .unwrap();
        assert_eq!(seqs(&page), vec![15, 14, 13, 12, 11]);
        assert!(more);

        // By bytes: 100 B payloads, 350 B budget → 3 messages.
        let (page, more) = store
            .read_messages_before(A, Seq(11), 50, 350)
            .await
            .unwrap();
        assert_eq!(seqs(&page), vec![10, 9, 8]);
        assert!(more);
        // Exactly at the budget is allowed.
        let (page, _) = store
            .read_messages_before(A, Seq(8), 50, 300)
            .await
            .unwrap();
        assert_eq!(seqs(&page), vec![7, 6, 5]);
        // A budget below one message still returns one.
        let (page, more) = store.read_messages_before(A, Seq(5), 50, 1).await.unwrap();
        assert_eq!(seqs(&page), vec![4]);
        assert!(more);
        // The last page says there is nothing older.
        let (page, more) = store
            .read_messages_before(A, Seq(4), 50, usize::MAX)
            .await
            .unwrap();
        assert_eq!(seqs(&page), vec![3, 2, 1]);
        assert!(!more);
        let (page, more) = store
            .read_messages_before(A, Seq(1), 50, usize::MAX)
            .await
            .unwrap();
        assert!(page.is_empty() && !more);
        // `before` beyond the newest means "from the newest".
        let (page, _) = store
            .read_messages_before(A, Seq(999), 2, usize::MAX)
            .await
            .unwrap();
        assert_eq!(seqs(&page), vec![20, 19]);

        // Walk the whole chat backwards with a byte budget and check nothing is lost or repeated.
        let mut all = Vec::new();
        let mut before = Seq(0);
        loop {
            let (page, more) = store
                .read_messages_before(A, before, 50, 250)
                .await
                .unwrap();
            assert!(page.len() <= 2);
            before = page.last().unwrap().seq;
            all.extend(seqs(&page));
            if !more {
                break;
            }
        }
        assert_eq!(all, (1..=20).rev().collect::<Vec<_>>());
    });
}

#[test]
fn segments_roll_and_reads_span_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, small_cfg()).await.unwrap();
        store.append(&[created(A)]).await.unwrap();
        let mut rolled = 0;
        for seq in 1..=40u64 {
            // 10 KiB payloads, two per batch.
            if seq % 2 == 1 {
                let stats = store
                    .append(&[msg(A, seq, 10_000), msg(A, seq + 1, 10_000)])
                    .await
                    .unwrap();
                rolled += stats.segment_rolled as usize;
            }
        }
        let paths = store.segment_paths();
        assert!(rolled >= 2, "rolled {rolled} times");
        assert_eq!(paths.len(), rolled + 1);
        // Names are contiguous global offsets (each segment's records end where the next one
        // starts; a preallocated file is longer), and no file exceeds the limit.
        let bases: Vec<u64> = paths.iter().map(|p| base_of(p)).collect();
        assert_eq!(bases[0], 0);
        let mut records_bytes = vec![0u64; paths.len()];
        for (i, p) in paths.iter().enumerate() {
            assert_eq!(p.file_name().unwrap().len(), "seg-.log".len() + 16);
            assert!(file_len(p) <= small_cfg().segment_bytes_max);
            let end = bases.get(i + 1).copied().unwrap_or(store.end_offset());
            records_bytes[i] = end - bases[i];
            assert!(records_bytes[i] > 0 && records_bytes[i] <= file_len(p));
        }
        // Every record went into exactly one segment: the bytes add up.
        assert_eq!(
            records_bytes.iter().sum::<u64>(),
            (created(A).encoded_len() + 40 * msg(A, 1, 10_000).encoded_len()) as u64
        );
        let got = store.read_messages(A, Seq(1), Seq(40), 100).await.unwrap();
        assert_eq!(
            got,
            (1..=40).map(|s| message(A, s, 10_000)).collect::<Vec<_>>()
        );
        let (page, more) = store
            .read_messages_before(A, Seq(0), 40, usize::MAX)
            .await
            .unwrap();
        assert_eq!(seqs(&page), (1..=40).rev().collect::<Vec<_>>());
        assert!(!more);
        // A batch of one maximum-size record still fits a fresh segment.
        store.append(&[msg(A, 41, 64 * 1024)]).await.unwrap();
        store.close().await.unwrap();
    });
}

#[test]
fn reopen_rebuilds_identical_state_and_index() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let cfg = small_cfg();
    let mut log = vec![created(A), created(B)];
    for seq in 1..=30 {
        log.push(msg(A, seq, 8000));
        if seq % 3 == 0 {
            log.push(msg(B, seq / 3, 50));
            log.push(Record::Cursor {
                chat: A,
                user: UserId(2),
                device: DeviceId(7),
                kind: if seq % 2 == 0 {
                    CursorKind::Read
                } else {
                    CursorKind::Delivered
                },
                seq: Seq(seq),
            });
        }
    }
    let (live_state, locations, paths) = run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        let mut state = ShardState::new(cfg.dedup_entries_max);
        for chunk in log.chunks(5) {
            for r in chunk {
                state.apply(r);
            }
            store.append(chunk).await.unwrap();
            for chat in [A, B] {
                let durable = store.durable_seq(chat);
                if durable.0 > 0 {
                    state.mark_durable(chat, durable);
                }
            }
        }
        let locations: Vec<_> = (1..=30)
            .map(|s| store.location(A, Seq(s)).unwrap())
            .collect();
        let paths = store.segment_paths();
        let mem = store.index_memory();
        assert_eq!((mem.chats, mem.messages), (2, 40));
        let entry = switchboard_storage::INDEX_ENTRY_BYTES;
        assert!(mem.bytes >= 40 * entry, "{mem:?}");
        store.close().await.unwrap();
        (state, locations, paths)
    });
    assert!(paths.len() > 1);
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        assert_eq!(records, log);
        let report = store.recovery_report();
        assert_eq!(report.records, log.len());
        assert_eq!(report.truncation, None);
        assert_eq!(report.segments, paths.len());
        assert_eq!(store.segment_paths(), paths);
        let rebuilt = ShardState::recover(cfg.dedup_entries_max, &records);
        assert_eq!(rebuilt, live_state);
        let again: Vec<_> = (1..=30)
            .map(|s| store.location(A, Seq(s)).unwrap())
            .collect();
        assert_eq!(again, locations);
        let mem = store.index_memory();
        assert_eq!((mem.chats, mem.messages), (2, 40));
        assert!(
            mem.bytes >= 40 * switchboard_storage::INDEX_ENTRY_BYTES,
            "{mem:?}"
        );
        assert_eq!(store.durable_seq(A), Seq(30));
        assert_eq!(store.durable_seq(B), Seq(10));
        assert_eq!(
            rebuilt.cursors(A, UserId(2), DeviceId(7)),
            (Seq(30), Seq(30))
        );
        let got = store.read_messages(A, Seq(1), Seq(30), 100).await.unwrap();
        assert_eq!(
            got,
            (1..=30).map(|s| message(A, s, 8000)).collect::<Vec<_>>()
        );
    });
}

/// Writes chat A with messages 1..=5 (one append each), returns the last segment's path and the
/// offset where message 5's frame starts.
fn five_messages(dir: &Path) -> (PathBuf, u64) {
    run(async {
        let (store, _) = EmbeddedStore::open(dir, StoreConfig::default())
            .await
            .unwrap();
        fill(&store, 5, 200, 1).await;
        let loc = store.location(A, Seq(5)).unwrap();
        let path = store.segment_paths().pop().unwrap();
        store.close().await.unwrap();
        (path, loc.offset as u64)
    })
}

#[test]
fn torn_tail_is_cut_and_appends_continue() {
    let frame = (MESSAGE_FRAME_OVERHEAD_BYTES + 200) as u64;
    // How to damage the last record, given the file length.
    #[derive(Debug, Clone, Copy)]
    enum Damage {
        Cut(u64),
        Flip(u64),
        Zeros(u64),
    }
    let damages = [
        Damage::Cut(1),                                  // last byte of the body
        Damage::Cut(frame / 2),                          // mid-body
        Damage::Cut(frame - 3),                          // mid-header
        Damage::Cut(frame - RECORD_HEADER_BYTES as u64), // just the header left
        Damage::Cut(frame - 1),                          // one byte left
        Damage::Flip(1),                                 // payload bit flip
        Damage::Flip(frame - 2),                         // body_len flip
        Damage::Flip(frame - 6),                         // crc flip
        Damage::Flip(frame - 8),                         // tag flip
        Damage::Zeros(4096), // a zero-filled extension: free space now, not damage
        Damage::Zeros(3),
    ];
    for damage in damages {
        let tmp = tempfile::tempdir().unwrap();
        let dir = shard_dir(&tmp);
        let (path, last_offset) = five_messages(&dir);
        let len = file_len(&path);
        assert_eq!(last_offset + frame, len);
        let cut_at = match damage {
            Damage::Cut(n) => {
                cut_file(&path, len - n);
                last_offset
            }
            Damage::Flip(n) => {
                xor_byte(&path, len - n);
                last_offset
            }
            Damage::Zeros(n) => {
                let mut f = OpenOptions::new().append(true).open(&path).unwrap();
                f.write_all(&vec![0u8; n as usize]).unwrap();
                len
            }
        };
        let damaged_len = file_len(&path);
        run(async {
            let (store, records) = EmbeddedStore::open(&dir, StoreConfig::default())
                .await
                .unwrap();
            let survivors = if matches!(damage, Damage::Zeros(_)) {
                5
            } else {
                4
            };
            let expected: Vec<Record> = std::iter::once(created(A))
                .chain((1..=survivors).map(|s| msg(A, s, 200)))
                .collect();
            assert_eq!(records, expected, "{damage:?}");
            if matches!(damage, Damage::Zeros(_)) {
                // Zeros after the last record are free space (as in a preallocated segment):
                // nothing to cut, and the next append goes at the end of the records.
                assert_eq!(store.recovery_report().truncation, None, "{damage:?}");
                assert_eq!(file_len(&path), damaged_len);
                assert_eq!(store.end_offset(), cut_at);
                let next = survivors + 1;
                store
                    .append(&[msg(A, next, 200), msg(A, next + 1, 7)])
                    .await
                    .unwrap();
                store.close().await.unwrap();
                return;
            }
            let t = store
                .recovery_report()
                .truncation
                .clone()
                .expect("a truncation");
            assert_eq!(t.offset, cut_at, "{damage:?}");
            assert_eq!(t.bytes, damaged_len - cut_at, "{damage:?}");
            assert_eq!(store.recovery_report().bytes_truncated(), t.bytes);
            if matches!(damage, Damage::Cut(_)) {
                assert_eq!(t.reason, TailDamage::Incomplete, "{damage:?}");
            }
            assert_eq!(file_len(&path), cut_at);
            assert_eq!(store.durable_seq(A), Seq(survivors));
            // The damaged seq can be written again, and more after it.
            let next = survivors + 1;
            store
                .append(&[msg(A, next, 200), msg(A, next + 1, 7)])
                .await
                .unwrap();
            store.close().await.unwrap();
        });
        run(async {
            let (store, records) = EmbeddedStore::open(&dir, StoreConfig::default())
                .await
                .unwrap();
            assert_eq!(store.recovery_report().truncation, None, "{damage:?}");
            let n = store.durable_seq(A).0;
            assert_eq!(records.len() as u64, 1 + n);
            let got = store.read_messages(A, Seq(1), Seq(n), 100).await.unwrap();
            assert_eq!(seqs(&got), (1..=n).collect::<Vec<_>>());
            assert_eq!(got[n as usize - 1], message(A, n, 7));
        });
    }
}

#[test]
fn damage_far_from_the_tail_is_a_hard_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let cfg = small_cfg();
    // 100 messages of 1 KiB in the first segment: > unsynced_bytes_max (80 KiB) after message 1.
    let loc1 = run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        fill(&store, 100, 1024, 10).await;
        assert_eq!(store.segment_paths().len(), 1);
        store.location(A, Seq(1)).unwrap()
    });
    let path = dir.join("seg-0000000000000000.log");
    xor_byte(&path, loc1.offset as u64 + 20);
    run(async {
        match EmbeddedStore::open(&dir, cfg.clone()).await {
            Err(StorageError::Corrupt {
                reason: Corruption::DamageBeforeTail { .. },
                ..
            }) => {}
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a log with damaged acknowledged data"),
        }
    });
    // Nothing was cut.
    assert!(file_len(&path) > 100 * 1024);
}

#[test]
fn corruption_in_an_older_segment_is_a_hard_error() {
    for flip in [true, false] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = shard_dir(&tmp);
        let paths = run(async {
            let (store, _) = EmbeddedStore::open(&dir, small_cfg()).await.unwrap();
            fill(&store, 40, 10_000, 2).await;
            store.segment_paths()
        });
        assert!(paths.len() >= 3);
        let victim = &paths[1];
        // The end of its records (a preallocated file is longer: zeros follow).
        let len = base_of(&paths[2]) - base_of(victim);
        assert!(len <= file_len(victim));
        if flip {
            xor_byte(victim, len / 2);
        } else {
            // A cut older segment: its own tail is incomplete, or the next one no longer lines up.
            cut_file(victim, len - 10);
        }
        run(async {
            match EmbeddedStore::open(&dir, small_cfg()).await {
                Err(StorageError::Corrupt {
                    segment,
                    offset,
                    reason,
                }) => {
                    assert_eq!(&segment, victim, "{reason}");
                    assert!(offset < len);
                    if !flip {
                        assert!(matches!(reason, Corruption::Incomplete), "{reason}");
                    }
                }
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => panic!("opened a corrupt log"),
            }
        });
    }
}

#[test]
fn missing_segment_is_a_hard_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let paths = run(async {
        let (store, _) = EmbeddedStore::open(&dir, small_cfg()).await.unwrap();
        fill(&store, 40, 10_000, 2).await;
        store.segment_paths()
    });
    std::fs::remove_file(&paths[1]).unwrap();
    run(async {
        let err = EmbeddedStore::open(&dir, small_cfg())
            .await
            .err()
            .expect("an error");
        assert!(
            matches!(
                err,
                StorageError::Corrupt {
                    reason: Corruption::SegmentGap { .. },
                    ..
                }
            ),
            "{err}"
        );
    });
}

#[test]
fn dedup_and_cursors_survive_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let cfg = StoreConfig {
        dedup_entries_max: 3,
        ..StoreConfig::default()
    };
    let cursor = |kind, seq| Record::Cursor {
        chat: A,
        user: UserId(2),
        device: DeviceId(1),
        kind,
        seq: Seq(seq),
    };
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        fill(&store, 5, 10, 2).await;
        store
            .append(&[
                cursor(CursorKind::Delivered, 4),
                cursor(CursorKind::Delivered, 2), // lower: ignored
                cursor(CursorKind::Read, 3),
                cursor(CursorKind::Read, 1), // lower: ignored
            ])
            .await
            .unwrap();
    });
    run(async {
        let (_store, records) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        let state = ShardState::recover(cfg.dedup_entries_max, &records);
        // FIFO window of 3: messages 3, 4, 5 are remembered; 1 and 2 are not.
        for seq in 1..=5u64 {
            let sender = UserId(1 + seq % 2);
            let key = ClientMsgId::from_halves(A.0, seq);
            let entry = state.dedup(&sender, &key);
            if seq >= 3 {
                let e = entry.expect("in the window");
                assert_eq!(
                    (e.chat, e.seq, e.msg_id),
                    (A, Seq(seq), MsgId(A.0 * 1_000_000 + seq))
                );
            } else {
                assert!(entry.is_none());
            }
        }
        assert_eq!(state.cursors(A, UserId(2), DeviceId(1)), (Seq(4), Seq(3)));
        assert_eq!(state.chats_of_user(UserId(1)).collect::<Vec<_>>(), vec![A]);
        assert_eq!(state.chat(&A).unwrap().durable_seq, Seq(5));
    });
}

#[test]
fn invalid_batches_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let cfg = small_cfg();
        let (store, _) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        store.append(&[created(A), msg(A, 1, 1)]).await.unwrap();
        let end = store.end_offset();

        let err = store.append(&[msg(A, 3, 1)]).await.unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::SeqGap {
                    expected: Seq(2),
                    got: Seq(3),
                    ..
                }
            ),
            "{err}"
        );
        // A gap inside one batch is caught too, before anything is written.
        let err = store
            .append(&[msg(A, 2, 1), msg(A, 2, 1)])
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::SeqGap {
                    expected: Seq(3),
                    got: Seq(2),
                    ..
                }
            ),
            "{err}"
        );
        let err = store.append(&[msg(B, 1, 1)]).await.unwrap_err();
        assert!(matches!(err, StorageError::UnknownChat(B)), "{err}");
        let err = store.append(&[msg(A, 2, 64 * 1024 + 1)]).await.unwrap_err();
        assert!(
            matches!(err, StorageError::TooLarge { max: 65536, .. }),
            "{err}"
        );
        let err = store
            .append(&[Record::ChatCreated {
                chat: B,
                kind: ChatKind::Direct,
                members: vec![UserId(1); 1025],
                created_ms: 0,
            }])
            .await
            .unwrap_err();
        assert!(
            matches!(err, StorageError::TooLarge { max: 1024, .. }),
            "{err}"
        );

        assert_eq!(store.end_offset(), end);
        assert!(!store.is_poisoned());
        // Creating a chat and writing into it in one batch works.
        store
            .append(&[created(B), msg(B, 1, 1), msg(A, 2, 1)])
            .await
            .unwrap();
        assert_eq!(
            (store.durable_seq(A), store.durable_seq(B)),
            (Seq(2), Seq(1))
        );
    });
}

#[test]
fn invalid_config_is_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = [
        StoreConfig {
            dedup_entries_max: 0,
            ..StoreConfig::default()
        },
        StoreConfig {
            dedup_entries_max: switchboard_storage::DEDUP_ENTRIES_MAX_LIMIT + 1,
            ..StoreConfig::default()
        },
        StoreConfig {
            unsynced_bytes_max: 1000,
            ..StoreConfig::default()
        },
        StoreConfig {
            segment_bytes_max: 64 * 1024,
            ..StoreConfig::default()
        },
        StoreConfig {
            segment_bytes_max: 1 << 33,
            ..StoreConfig::default()
        },
    ];
    assert_eq!(StoreConfig::default().validate().ok(), Some(()));
    for cfg in bad {
        assert!(cfg.validate().is_err(), "{cfg:?}");
        let dir = shard_dir(&tmp);
        run(async move {
            assert!(matches!(
                EmbeddedStore::open(&dir, cfg).await,
                Err(StorageError::Config(_))
            ));
        });
    }
}

/// Readers run while the committer appends: no `RefCell` borrow is held across an await, and a
/// reader never sees a seq that is not durable.
#[test]
fn concurrent_reads_during_appends() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async move {
        let (store, _) = EmbeddedStore::open(&dir, small_cfg()).await.unwrap();
        let store = Rc::new(store);
        store.append(&[created(A)]).await.unwrap();
        let done = Rc::new(Cell::new(false));
        let mut readers = Vec::new();
        for _ in 0..3 {
            let (store, done) = (store.clone(), done.clone());
            readers.push(glommio::spawn_local(async move {
                let mut reads = 0u32;
                while !done.get() {
                    let durable = store.durable_seq(A);
                    let got = store
                        .read_messages(A, Seq(1), Seq(u64::MAX), 1024)
                        .await
                        .unwrap();
                    assert!(got.len() as u64 >= durable.0);
                    assert_eq!(seqs(&got), (1..=got.len() as u64).collect::<Vec<_>>());
                    let (page, _) = store
                        .read_messages_before(A, Seq(0), 3, 4096)
                        .await
                        .unwrap();
                    assert!(page.windows(2).all(|w| w[0].seq.0 == w[1].seq.0 + 1));
                    reads += 1;
                    glommio::yield_if_needed().await;
                }
                reads
            }));
        }
        let writer = {
            let store = store.clone();
            glommio::spawn_local(async move {
                for seq in (1..=60).step_by(3) {
                    let batch: Vec<Record> = (seq..seq + 3).map(|s| msg(A, s, 2000)).collect();
                    MessageStore::append(&*store, &batch).await.unwrap();
                }
            })
        };
        writer.await;
        done.set(true);
        for r in readers {
            assert!(r.await > 0);
        }
        assert_eq!(store.durable_seq(A), Seq(60));
        let got = MessageStore::read_messages(&*store, A, Seq(1), Seq(60), 100)
            .await
            .unwrap();
        assert_eq!(got.len(), 60);
        let (page, more) = MessageStore::read_messages_before(&*store, A, Seq(0), 10, usize::MAX)
            .await
            .unwrap();
        assert_eq!((page.len(), more), (10, true));
    });
}

/// A record's index entry points at a record whose CRC no longer matches: reads report corruption
/// instead of returning bad bytes.
#[test]
fn reads_verify_crc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        fill(&store, 3, 100, 3).await;
        let loc = store.location(A, Seq(2)).unwrap();
        let path = store.segment_paths().pop().unwrap();
        // Damage the file behind the store's back (bit rot after the write).
        xor_byte(&path, loc.offset as u64 + loc.len as u64 - 1);
        let err = store
            .read_messages(A, Seq(1), Seq(3), 10)
            .await
            .unwrap_err();
        match err {
            StorageError::Corrupt {
                offset,
                reason: Corruption::Record(_),
                ..
            } => {
                assert_eq!(offset, loc.offset as u64)
            }
            e => panic!("unexpected {e}"),
        }
        // Undamaged records still read.
        assert_eq!(
            seqs(&store.read_messages(A, Seq(3), Seq(3), 10).await.unwrap()),
            vec![3]
        );
    });
}

/// Dropping an `append` after it started writing poisons the store: later appends fail until a
/// reopen, whose recovery keeps exactly the durable prefix (plus the cancelled batch if its write
/// happened to complete).
#[test]
fn cancelled_append_poisons_until_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        fill(&store, 3, 100, 3).await;
        let batch = [msg(A, 4, 100)];
        let first_poll = futures_lite::future::poll_once(store.append(&batch)).await;
        assert!(
            first_poll.is_none(),
            "append finished without waiting for the disk"
        );
        assert!(store.is_poisoned());
        assert!(matches!(
            store.append(&batch).await,
            Err(StorageError::Poisoned)
        ));
        // Durable data still reads.
        assert_eq!(store.durable_seq(A), Seq(3));
        assert_eq!(
            store
                .read_messages(A, Seq(1), Seq(3), 10)
                .await
                .unwrap()
                .len(),
            3
        );
    });
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        let durable = store.durable_seq(A).0;
        assert!(durable == 3 || durable == 4, "{durable}");
        store.append(&[msg(A, durable + 1, 1)]).await.unwrap();
    });
}

/// A batch larger than one write+fdatasync round (80 KiB here) is split into rounds, in order,
/// across segments, and everything is durable when `append` returns.
#[test]
fn large_batches_take_several_sync_rounds() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let cfg = small_cfg();
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        // A new chat and 40 messages of 10 KB: ~400 KB, several rounds and segments.
        let mut batch = vec![created(A)];
        batch.extend((1..=40).map(|s| msg(A, s, 10_000)));
        let stats = store.append(&batch).await.unwrap();
        assert!(stats.syncs >= 5, "{stats:?}");
        assert!(stats.segment_rolled);
        assert_eq!(
            stats.bytes,
            batch.iter().map(Record::encoded_len).sum::<usize>()
        );
        assert_eq!(store.durable_seq(A), Seq(40));
        for p in store.segment_paths() {
            assert!(file_len(&p) <= cfg.segment_bytes_max);
        }
        store.close().await.unwrap();
    });
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, cfg.clone()).await.unwrap();
        assert_eq!(records.len(), 41);
        let got = store.read_messages(A, Seq(1), Seq(40), 100).await.unwrap();
        assert_eq!(
            got,
            (1..=40).map(|s| message(A, s, 10_000)).collect::<Vec<_>>()
        );
    });
}

/// The index packs a segment number in 15 bits: a directory with more segments than
/// `SEGMENTS_MAX` is refused with a clear error before any of them is opened.
#[test]
fn a_shard_with_more_than_segments_max_segments_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..=switchboard_storage::SEGMENTS_MAX as u64 {
        std::fs::File::create(dir.join(format!("seg-{:016}.log", i * 1000))).unwrap();
    }
    run(async {
        let err = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .err()
            .expect("refused");
        let text = err.to_string();
        assert!(text.contains("more than SEGMENTS_MAX (32768)"), "{text}");
    });
}
