//! Preallocated segments (`StoreConfig::preallocate_segments`): appends at the logical end of a
//! zero-filled file, recovery of its free space and torn tails, the spare segment's life, and
//! logs written with preallocation off.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use switchboard_storage::log::{SPARE_NAME, SPARE_TMP_NAME};
use switchboard_storage::{
    Corruption, EmbeddedStore, Record, StorageError, StoreConfig, StoredMessage, TailDamage,
};
use switchboard_wire::ids::{ChatId, Seq};

mod util;
use util::{created, run};

const A: ChatId = ChatId(100);

fn message(chat: ChatId, seq: u64, payload_len: usize) -> StoredMessage {
    // Never a zero byte, so the end of the records is where the zeros start.
    util::message_with(
        chat,
        seq,
        (0..payload_len)
            .map(|i| 1 + ((i as u64 + seq) % 255) as u8)
            .collect(),
    )
}

fn msg(chat: ChatId, seq: u64, payload_len: usize) -> Record {
    Record::Message(message(chat, seq, payload_len))
}

/// 160 KiB segments (two full-size records at most), an 80 KiB torn-tail window.
fn cfg() -> StoreConfig {
    StoreConfig {
        segment_bytes_max: 160 * 1024,
        unsynced_bytes_max: 80 * 1024,
        ..StoreConfig::default()
    }
}

fn no_prealloc() -> StoreConfig {
    StoreConfig {
        preallocate_segments: false,
        ..cfg()
    }
}

fn shard_dir(tmp: &tempfile::TempDir) -> PathBuf {
    tmp.path().join("shard-0")
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

fn read_at(p: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    let mut out = vec![0; len];
    f.read_exact(&mut out).unwrap();
    out
}

fn write_at(p: &Path, at: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn all_zero(p: &Path, from: u64) -> bool {
    let len = file_len(p);
    read_at(p, from, (len - from) as usize)
        .iter()
        .all(|b| *b == 0)
}

/// Opens a fresh shard, has its first segment preallocated (`prepare_spare`, adopted by the first
/// append), and appends `created(A)` and messages `1..=n` of `payload_len` bytes, one append each.
/// Returns the segment's path and the end of its records.
fn preallocated_log(dir: &Path, n: u64, payload_len: usize) -> (PathBuf, u64) {
    run(async {
        let (store, _) = EmbeddedStore::open(dir, cfg()).await.unwrap();
        assert!(
            !store.active_preallocated(),
            "a fresh shard's first segment grows"
        );
        store.prepare_spare().await.unwrap();
        assert!(store.spare_ready());
        assert!(dir.join(SPARE_NAME).exists());
        let stats = store.append(&[created(A)]).await.unwrap();
        // Adopted in place of the empty first segment: no roll, no spare left.
        assert!(!stats.segment_rolled);
        assert!(store.active_preallocated());
        assert!(!dir.join(SPARE_NAME).exists());
        for s in 1..=n {
            store.append(&[msg(A, s, payload_len)]).await.unwrap();
        }
        let paths = store.segment_paths();
        assert_eq!(paths.len(), 1);
        let end = store.end_offset();
        store.close().await.unwrap();
        (paths[0].clone(), end)
    })
}

fn expected_log(n: u64, payload_len: usize) -> Vec<Record> {
    std::iter::once(created(A))
        .chain((1..=n).map(|s| msg(A, s, payload_len)))
        .collect()
}

#[test]
fn preallocated_tail_is_free_space_after_reopen() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let (path, end) = preallocated_log(&dir, 5, 300);
    // The file has its full size; after the records, only zeros.
    assert_eq!(file_len(&path), cfg().segment_bytes_max);
    assert!(end < 4096);
    assert!(all_zero(&path, end));
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        assert_eq!(records, expected_log(5, 300));
        let report = store.recovery_report();
        assert_eq!(report.truncation, None);
        assert_eq!(report.bytes, end);
        assert_eq!(store.end_offset(), end);
        assert!(store.active_preallocated());
        // Appends continue at the end of the records, not of the file.
        store.append(&[msg(A, 6, 300)]).await.unwrap();
        assert_eq!(file_len(&path), cfg().segment_bytes_max);
        let loc = store.location(A, Seq(6)).unwrap();
        assert_eq!(loc.offset as u64, end);
        store.close().await.unwrap();
    });
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        assert_eq!(records, expected_log(6, 300));
        assert_eq!(store.recovery_report().truncation, None);
        let got = store.read_messages(A, Seq(1), Seq(6), 10).await.unwrap();
        assert_eq!(got.last().unwrap(), &message(A, 6, 300));
    });
}

#[test]
fn torn_tail_of_a_preallocated_segment_is_zeroed() {
    let frame = msg(A, 6, 300).encoded_len();
    // (what an unfinished append left after the records, where, expected reason)
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        (
            "half a record",
            {
                let mut v = Vec::new();
                msg(A, 6, 300).encode_into(&mut v);
                v.truncate(frame / 2);
                v
            },
            0,
        ),
        (
            "a whole record with a bad crc",
            {
                let mut v = Vec::new();
                msg(A, 6, 300).encode_into(&mut v);
                v[frame - 1] ^= 0x40;
                v
            },
            0,
        ),
        // Its first sector never reached the disk, a later one did.
        ("garbage after zeros", vec![0xab; 100], 8192),
    ];
    for (case, garbage, gap) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = shard_dir(&tmp);
        let (path, end) = preallocated_log(&dir, 5, 300);
        write_at(&path, end + gap, &garbage);
        run(async {
            let (store, records) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
            assert_eq!(records, expected_log(5, 300), "{case}");
            let t = store
                .recovery_report()
                .truncation
                .clone()
                .expect("a truncation");
            assert_eq!(t.offset, end, "{case}");
            assert_eq!(t.bytes, gap + garbage.len() as u64, "{case}");
            match (gap, &t.reason) {
                (0, TailDamage::Incomplete | TailDamage::Invalid(_)) => {}
                (_, TailDamage::NonZeroAfterEnd { data_end }) => {
                    assert_eq!(*data_end, end + gap + garbage.len() as u64)
                }
                (_, reason) => panic!("{case}: {reason:?}"),
            }
            // Zeroed, not truncated: the segment stays preallocated.
            assert_eq!(file_len(&path), cfg().segment_bytes_max, "{case}");
            assert!(all_zero(&path, end), "{case}");
            store.append(&[msg(A, 6, 300)]).await.unwrap();
            store.close().await.unwrap();
        });
        run(async {
            let (store, records) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
            assert_eq!(records, expected_log(6, 300), "{case}");
            assert_eq!(store.recovery_report().truncation, None, "{case}");
        });
    }
}

#[test]
fn non_zero_bytes_after_the_end_are_corruption() {
    // In the last segment, beyond the torn-tail window (80 KiB) from the last non-zero byte.
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let (path, end) = preallocated_log(&dir, 5, 300);
    let at = end + 100 * 1024;
    write_at(&path, at, &[0x01]);
    run(async {
        match EmbeddedStore::open(&dir, cfg()).await {
            Err(StorageError::Corrupt {
                offset,
                reason: Corruption::NonZeroAfterEnd { data_end },
                ..
            }) => {
                assert_eq!(offset, end);
                assert_eq!(data_end, at + 1);
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a segment with garbage after its records"),
        }
    });
    // Nothing was zeroed.
    assert_eq!(read_at(&path, at, 1), [0x01]);

    // Zeros in the middle of acknowledged records, far from the end: still damage before the
    // tail (the records after them are non-zero).
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let (path, end) = run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        store.prepare_spare().await.unwrap();
        store.append(&[created(A)]).await.unwrap();
        for s in 1..=100 {
            store.append(&[msg(A, s, 1000)]).await.unwrap();
        }
        assert_eq!(store.segment_paths().len(), 1);
        (store.segment_paths()[0].clone(), store.end_offset())
    });
    assert!(end > 100 * 1024);
    let loc_at = created(A).encoded_len() as u64;
    write_at(&path, loc_at, &[0; 8]);
    run(async {
        match EmbeddedStore::open(&dir, cfg()).await {
            Err(StorageError::Corrupt {
                offset,
                reason: Corruption::NonZeroAfterEnd { data_end },
                ..
            }) => {
                assert_eq!(offset, loc_at);
                assert_eq!(data_end, end);
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a log with zeroed acknowledged records"),
        }
    });
}

#[test]
fn non_zero_bytes_after_the_end_of_a_sealed_segment_are_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let (middle, third) = run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        store.prepare_spare().await.unwrap();
        store.append(&[created(A)]).await.unwrap();
        let mut s = 1;
        while store.segment_paths().len() < 3 {
            store.prepare_spare().await.unwrap();
            store.append(&[msg(A, s, 20_000)]).await.unwrap();
            s += 1;
        }
        let paths = store.segment_paths();
        for p in &paths[1..] {
            assert_eq!(file_len(p), cfg().segment_bytes_max, "{p:?}");
        }
        (paths[1].clone(), paths[2].clone())
    });
    // One byte in the free space of the middle segment, right after its records (well inside
    // what would be the torn-tail window of a last segment).
    let base: u64 = middle.file_name().unwrap().to_str().unwrap()[4..20]
        .parse()
        .unwrap();
    let next_base: u64 = third.file_name().unwrap().to_str().unwrap()[4..20]
        .parse()
        .unwrap();
    let records_end = next_base - base;
    assert!(records_end < cfg().segment_bytes_max);
    write_at(&middle, records_end + 10, &[0x7f]);
    run(async {
        match EmbeddedStore::open(&dir, cfg()).await {
            Err(StorageError::Corrupt {
                segment,
                offset,
                reason: Corruption::NonZeroAfterEnd { data_end },
            }) => {
                assert_eq!(segment, middle);
                assert_eq!(offset, records_end);
                assert_eq!(data_end, records_end + 11);
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a sealed segment with garbage after its records"),
        }
    });
}

#[test]
fn rolls_use_the_spare_and_reopen_recovers_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let n = 40;
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        store.append(&[created(A)]).await.unwrap();
        let mut rolls = 0;
        for s in 1..=n {
            let spare_ready_before = store.spare_ready();
            let stats = store.append(&[msg(A, s, 10_000)]).await.unwrap();
            if stats.segment_rolled {
                rolls += 1;
                // Only a ready spare is adopted; either way the roll did not wait.
                assert_eq!(store.active_preallocated(), spare_ready_before, "seq {s}");
            }
            // Deterministic from here on: the spare of the next roll is ready before it.
            store.prepare_spare().await.unwrap();
        }
        assert!(rolls >= 2, "{rolls}");
        let paths = store.segment_paths();
        // The first segment grew; every later one was the spare.
        assert!(file_len(&paths[0]) < cfg().segment_bytes_max);
        for p in &paths[1..] {
            assert_eq!(file_len(p), cfg().segment_bytes_max, "{p:?}");
        }
        assert!(dir.join(SPARE_NAME).exists());
        store.close().await.unwrap();
    });
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        assert_eq!(records, expected_log(n, 10_000));
        assert_eq!(store.recovery_report().truncation, None);
        // The spare left by the last run is kept for the next roll.
        assert!(store.spare_ready());
        let got = store.read_messages(A, Seq(1), Seq(n), 100).await.unwrap();
        assert_eq!(got.len() as u64, n);
    });
}

#[test]
fn spare_files_are_reused_or_cleaned_at_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        store.append(&[created(A)]).await.unwrap();
        store.prepare_spare().await.unwrap();
        store.close().await.unwrap();
    });
    let spare = dir.join(SPARE_NAME);
    let tmp_spare = dir.join(SPARE_TMP_NAME);
    assert_eq!(file_len(&spare), cfg().segment_bytes_max);
    // A fill a crash interrupted.
    std::fs::write(&tmp_spare, [0u8; 1000]).unwrap();
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        assert!(store.spare_ready(), "a complete spare is reused");
        assert!(!tmp_spare.exists(), "an unfinished one is removed");
    });
    // Another segment size: the spare does not fit and is removed.
    let other = StoreConfig {
        segment_bytes_max: 200 * 1024,
        ..cfg()
    };
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, other).await.unwrap();
        assert!(!store.spare_ready());
        assert!(!spare.exists());
        store.prepare_spare().await.unwrap();
    });
    assert_eq!(file_len(&spare), 200 * 1024);
    // Preallocation off: removed as well.
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, no_prealloc()).await.unwrap();
        assert_eq!(records, vec![created(A)]);
        assert!(!store.spare_ready());
        assert!(!spare.exists());
    });
}

#[test]
fn without_preallocation_segments_grow_and_either_log_opens_with_either_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let n = 30;
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, no_prealloc()).await.unwrap();
        store.prepare_spare().await.unwrap();
        assert!(!store.spare_ready());
        store.append(&[created(A)]).await.unwrap();
        for s in 1..=n {
            store.append(&[msg(A, s, 10_000)]).await.unwrap();
        }
        let paths = store.segment_paths();
        assert!(paths.len() >= 2);
        // Every file is exactly its records.
        let total: u64 = paths.iter().map(|p| file_len(p)).sum();
        assert_eq!(total, store.end_offset());
        assert!(!store.active_preallocated());
        store.close().await.unwrap();
    });
    assert!(!dir.join(SPARE_NAME).exists());
    assert!(!dir.join(SPARE_TMP_NAME).exists());
    // The grown log, continued with preallocation: the next roll adopts a spare.
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, cfg()).await.unwrap();
        assert_eq!(records, expected_log(n, 10_000));
        let mut s = n + 1;
        store.prepare_spare().await.unwrap();
        loop {
            let stats = store.append(&[msg(A, s, 10_000)]).await.unwrap();
            if stats.segment_rolled {
                break;
            }
            s += 1;
        }
        assert!(store.active_preallocated());
        store.close().await.unwrap();
    });
    // And the mixed log, with preallocation off again: appends at the end of the records of the
    // preallocated segment, which keeps its size.
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, no_prealloc()).await.unwrap();
        let last = records.len() as u64 - 1;
        assert_eq!(records, expected_log(last, 10_000));
        assert!(store.active_preallocated());
        let end = store.end_offset();
        store.append(&[msg(A, last + 1, 10_000)]).await.unwrap();
        assert_eq!(
            store.end_offset(),
            end + msg(A, 1, 10_000).encoded_len() as u64
        );
        let active = store.segment_paths().pop().unwrap();
        assert_eq!(file_len(&active), cfg().segment_bytes_max);
        store.close().await.unwrap();
    });
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, no_prealloc()).await.unwrap();
        let last = records.len() as u64 - 1;
        assert_eq!(records, expected_log(last, 10_000));
        assert_eq!(store.recovery_report().truncation, None);
        assert!(!dir.join(SPARE_NAME).exists());
    });
}
