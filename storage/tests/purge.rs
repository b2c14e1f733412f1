//! `EmbeddedStore::purge` ("delete for everyone") and recovery of purges a crash tore, on real
//! files (a tempdir) inside a glommio executor.

use std::cell::Cell;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use switchboard_storage::record::{MESSAGE_FRAME_OVERHEAD_BYTES, RECORD_HEADER_BYTES};
use switchboard_storage::{
    decode_one, CompletedPurge, Corruption, EmbeddedStore, Location, MessageStore, PurgeEvidence,
    Record, RecordError, StorageError, StoreConfig, StoredMessage, TailDamage,
    CONTENT_KIND_DELETED, CONTENT_KIND_EVENT, PURGE_SEQS_MAX,
};
use switchboard_wire::ids::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};
use switchboard_wire::{encode_event, ChatEvent, EventKind};

mod util;
use util::{created, run};

const A: ChatId = ChatId(100);
const B: ChatId = ChatId(200);

fn message(chat: ChatId, seq: u64, payload_len: usize) -> StoredMessage {
    // Never all zeros, so a tombstone is always a change.
    util::message_with(
        chat,
        seq,
        (0..payload_len)
            .map(|i| 1 | (i as u64 + seq) as u8)
            .collect(),
    )
}

fn msg(chat: ChatId, seq: u64, payload_len: usize) -> Record {
    Record::Message(message(chat, seq, payload_len))
}

/// What `purge` makes of `m`.
fn tombstone(m: &StoredMessage) -> StoredMessage {
    StoredMessage {
        content_kind: CONTENT_KIND_DELETED,
        payload: vec![0; m.payload.len()],
        ..m.clone()
    }
}

fn event(chat: ChatId, seq: u64, kind: EventKind, target: u64) -> Record {
    let mut ev = ChatEvent::new(kind);
    ev.target = Seq(target);
    if kind == EventKind::Edited {
        ev.payload = b"edited content".to_vec();
    }
    Record::Message(StoredMessage {
        chat,
        seq: Seq(seq),
        msg_id: MsgId(chat.0 * 1_000_000 + seq),
        sender_user: UserId(1),
        sender_device: DeviceId(1),
        timestamp_ms: 1_700_000_000_000 + seq,
        client_msg_id: ClientMsgId::from_halves(chat.0, seq),
        reply_to: Seq(0),
        content_kind: CONTENT_KIND_EVENT,
        flags: 0,
        payload: encode_event(&ev),
    })
}

/// An `Edited` event of `target` carrying `content_len` bytes of new content.
fn edited(chat: ChatId, seq: u64, target: u64, content_len: usize) -> Record {
    let mut ev = ChatEvent::new(EventKind::Edited);
    ev.target = Seq(target);
    ev.payload = (0..content_len).map(|i| 1 | i as u8).collect();
    let Record::Message(m) = event(chat, seq, EventKind::Edited, target) else {
        unreachable!()
    };
    Record::Message(StoredMessage {
        payload: encode_event(&ev),
        ..m
    })
}

fn deleted(chat: ChatId, seq: u64, target: u64) -> Record {
    event(chat, seq, EventKind::Deleted, target)
}

fn as_message(r: &Record) -> &StoredMessage {
    match r {
        Record::Message(m) => m,
        other => panic!("not a message: {other:?}"),
    }
}

/// Small segments so tests roll (two full-size records per segment at most), and an 80 KiB tail
/// window.
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

fn seqs(v: &[StoredMessage]) -> Vec<u64> {
    v.iter().map(|m| m.seq.0).collect()
}

fn read_at(p: &Path, at: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    let mut out = vec![0; len];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut out).unwrap();
    out
}

fn write_at(p: &Path, at: u64, bytes: &[u8]) {
    let mut f = OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(bytes).unwrap();
}

fn xor_byte(p: &Path, at: u64) {
    let b = read_at(p, at, 1)[0] ^ 0x40;
    write_at(p, at, &[b]);
}

fn encode(r: &Record) -> Vec<u8> {
    let mut out = Vec::new();
    r.encode_into(&mut out);
    out
}

#[test]
fn purge_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let log: Vec<Record> = std::iter::once(created(A))
        .chain((1..=5).map(|s| msg(A, s, 300)))
        .chain([created(B), msg(B, 1, 300)])
        .collect();
    let (locations, path) = run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        store.append(&log).await.unwrap();
        let end = store.end_offset();
        let locations: Vec<Location> = (1..=5)
            .map(|s| store.location(A, Seq(s)).unwrap())
            .collect();
        let stats = MessageStore::purge(&store, A, &[Seq(4), Seq(2)])
            .await
            .unwrap();
        assert_eq!((stats.purged, stats.already_purged), (2, 0));
        // One file, two phases: two fdatasyncs.
        assert_eq!(stats.syncs, 2);
        assert_eq!(stats.bytes, 2 * (MESSAGE_FRAME_OVERHEAD_BYTES + 300));
        // Nothing moved: same end, same index entries.
        assert_eq!(store.end_offset(), end);
        for s in 1..=5 {
            assert_eq!(
                store.location(A, Seq(s)).unwrap(),
                locations[s as usize - 1]
            );
        }
        let got = store.read_messages(A, Seq(1), Seq(5), 10).await.unwrap();
        let expected: Vec<StoredMessage> = (1..=5)
            .map(|s| match s {
                2 | 4 => tombstone(&message(A, s, 300)),
                _ => message(A, s, 300),
            })
            .collect();
        assert_eq!(got, expected);
        let (page, _) = store
            .read_messages_before(A, Seq(0), 2, usize::MAX)
            .await
            .unwrap();
        assert_eq!(page, vec![expected[4].clone(), expected[3].clone()]);
        // The other chat is untouched.
        assert_eq!(
            store.read_messages(B, Seq(1), Seq(1), 1).await.unwrap(),
            vec![message(B, 1, 300)]
        );
        // Appends go on after a purge.
        store.append(&[msg(A, 6, 10)]).await.unwrap();
        let path = store.segment_paths().pop().unwrap();
        store.close().await.unwrap();
        (locations, path)
    });
    // On disk: exactly the tombstone's encoding, at the same place.
    let loc = locations[1];
    assert_eq!(
        read_at(&path, loc.offset as u64, loc.len as usize),
        encode(&Record::Message(tombstone(&message(A, 2, 300))))
    );
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        // Every CRC verified on the way in; nothing needed repair.
        let report = store.recovery_report();
        assert_eq!(report.truncation, None);
        assert!(report.purges_completed.is_empty());
        assert_eq!(records.len(), log.len() + 1);
        assert_eq!(*as_message(&records[2]), tombstone(&message(A, 2, 300)));
        assert_eq!(*as_message(&records[3]), message(A, 3, 300));
        assert_eq!(*as_message(&records[4]), tombstone(&message(A, 4, 300)));
        let got = store.read_messages(A, Seq(1), Seq(6), 10).await.unwrap();
        assert_eq!(seqs(&got), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(got[3], tombstone(&message(A, 4, 300)));
    });
}

#[test]
fn purge_in_an_older_rolled_segment() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, small_cfg()).await.unwrap();
        store.append(&[created(A)]).await.unwrap();
        for s in (1..=40).step_by(2) {
            store
                .append(&[msg(A, s, 10_000), msg(A, s + 1, 10_000)])
                .await
                .unwrap();
        }
        let paths = store.segment_paths();
        assert!(paths.len() >= 3);
        let first = store.location(A, Seq(1)).unwrap();
        let last = store.location(A, Seq(40)).unwrap();
        assert_eq!(first.segment, 0);
        assert_eq!(last.segment as usize, paths.len() - 1);
        // Two files touched, two phases: four fdatasyncs.
        let stats = store.purge(A, &[Seq(1), Seq(40), Seq(2)]).await.unwrap();
        assert_eq!((stats.purged, stats.syncs), (3, 4));
        let got = store.read_messages(A, Seq(1), Seq(40), 100).await.unwrap();
        for m in &got {
            let original = message(A, m.seq.0, 10_000);
            if [1, 2, 40].contains(&m.seq.0) {
                assert_eq!(*m, tombstone(&original));
            } else {
                assert_eq!(*m, original);
            }
        }
        // The oldest segment did not grow or shrink: it still ends where the next one begins.
        let next_base: u64 = paths[1].file_name().unwrap().to_str().unwrap()[4..20]
            .parse()
            .unwrap();
        assert_eq!(std::fs::metadata(&paths[0]).unwrap().len(), next_base);
        store.append(&[msg(A, 41, 100)]).await.unwrap();
    });
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, small_cfg()).await.unwrap();
        assert!(store.recovery_report().purges_completed.is_empty());
        assert_eq!(store.recovery_report().truncation, None);
        assert_eq!(*as_message(&records[1]), tombstone(&message(A, 1, 10_000)));
        assert_eq!(*as_message(&records[3]), message(A, 3, 10_000));
        assert_eq!(
            *as_message(&records[40]),
            tombstone(&message(A, 40, 10_000))
        );
        assert_eq!(store.durable_seq(A), Seq(41));
    });
}

#[test]
fn purge_is_idempotent() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        store
            .append(&[created(A), msg(A, 1, 50), msg(A, 2, 50), msg(A, 3, 0)])
            .await
            .unwrap();
        let stats = store.purge(A, &[Seq(2), Seq(2)]).await.unwrap();
        assert_eq!((stats.purged, stats.already_purged, stats.syncs), (1, 0, 2));
        let again = store.purge(A, &[Seq(2)]).await.unwrap();
        assert_eq!(again.purged, 0);
        assert_eq!(again.already_purged, 1);
        assert_eq!((again.bytes, again.syncs), (0, 0));
        // Mixed: one new, one done. An empty payload still gets its kind changed.
        let mixed = store.purge(A, &[Seq(3), Seq(2)]).await.unwrap();
        assert_eq!((mixed.purged, mixed.already_purged), (1, 1));
        assert_eq!(store.purge(A, &[]).await.unwrap(), Default::default());
        let got = store.read_messages(A, Seq(1), Seq(3), 10).await.unwrap();
        assert_eq!(
            got,
            vec![
                message(A, 1, 50),
                tombstone(&message(A, 2, 50)),
                tombstone(&message(A, 3, 0))
            ]
        );
    });
}

#[test]
fn purge_of_unknown_or_protected_records_is_refused_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        store
            .append(&[
                created(A),
                msg(A, 1, 50),
                msg(A, 2, 50),
                event(A, 3, EventKind::Edited, 2),
                deleted(A, 4, 2),
                event(A, 5, EventKind::Reacted, 1),
                event(A, 6, EventKind::MembersAdded, 0),
            ])
            .await
            .unwrap();
        let unknown_seq = |e: &StorageError, s: u64| matches!(e, StorageError::UnknownSeq { chat, seq } if *chat == A && seq.0 == s);
        // Beyond the durable seq, seq 0, and a mix with a good seq.
        let e = store.purge(A, &[Seq(7)]).await.unwrap_err();
        assert!(unknown_seq(&e, 7), "{e}");
        let e = store.purge(A, &[Seq(0)]).await.unwrap_err();
        assert!(unknown_seq(&e, 0), "{e}");
        let e = store.purge(A, &[Seq(1), Seq(99)]).await.unwrap_err();
        assert!(unknown_seq(&e, 99), "{e}");
        let e = store.purge(B, &[Seq(1)]).await.unwrap_err();
        assert!(matches!(e, StorageError::UnknownChat(B)), "{e}");
        // The Deleted event and group events keep their content.
        for s in [4, 6] {
            let e = store.purge(A, &[Seq(1), Seq(s)]).await.unwrap_err();
            assert!(
                matches!(e, StorageError::NotPurgeable { seq, .. } if seq.0 == s),
                "{e}"
            );
        }
        let many = vec![Seq(1); PURGE_SEQS_MAX + 1];
        let e = store.purge(A, &many).await.unwrap_err();
        assert!(matches!(e, StorageError::TooLarge { .. }), "{e}");
        // None of that wrote anything.
        let got = store.read_messages(A, Seq(1), Seq(1), 1).await.unwrap();
        assert_eq!(got, vec![message(A, 1, 50)]);
        // Edits and reactions are content.
        let stats = store.purge(A, &[Seq(2), Seq(3), Seq(5)]).await.unwrap();
        assert_eq!(stats.purged, 3);
        let got = store.read_messages(A, Seq(3), Seq(5), 10).await.unwrap();
        assert_eq!(got[0].content_kind, CONTENT_KIND_DELETED);
        assert_eq!(got[1], *as_message(&deleted(A, 4, 2)));
        assert_eq!(got[2].content_kind, CONTENT_KIND_DELETED);
        assert!(got[2].payload.iter().all(|b| *b == 0));
    });
}

/// Readers run while purges rewrite records: no `RefCell` borrow is held across an await, and a
/// reader sees each record either whole and old or as the tombstone, never an error.
#[test]
fn concurrent_reads_and_appends_during_purges() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    run(async move {
        let (store, _) = EmbeddedStore::open(&dir, small_cfg()).await.unwrap();
        let store = Rc::new(store);
        store.append(&[created(A)]).await.unwrap();
        let batch: Vec<Record> = (1..=60).map(|s| msg(A, s, 5000)).collect();
        store.append(&batch).await.unwrap();
        let done = Rc::new(Cell::new(false));
        let mut readers = Vec::new();
        for _ in 0..3 {
            let (store, done) = (store.clone(), done.clone());
            readers.push(glommio::spawn_local(async move {
                let mut reads = 0u32;
                while !done.get() {
                    let got = store.read_messages(A, Seq(1), Seq(60), 100).await.unwrap();
                    assert_eq!(got.len(), 60);
                    for m in &got {
                        let original = message(A, m.seq.0, 5000);
                        assert!(*m == original || *m == tombstone(&original), "{:?}", m.seq);
                    }
                    reads += 1;
                    glommio::yield_if_needed().await;
                }
                reads
            }));
        }
        let appender = {
            let store = store.clone();
            glommio::spawn_local(async move {
                for s in 61..=90 {
                    store.append(&[msg(A, s, 3000)]).await.unwrap();
                }
            })
        };
        for s in (1..=60).step_by(3) {
            store.purge(A, &[Seq(s), Seq(s + 1)]).await.unwrap();
            glommio::yield_if_needed().await;
        }
        appender.await;
        done.set(true);
        for r in readers {
            assert!(r.await > 0);
        }
        let got = store.read_messages(A, Seq(1), Seq(90), 100).await.unwrap();
        assert_eq!(got.len(), 90);
        for m in &got {
            let purged = m.seq.0 <= 60 && m.seq.0 % 3 != 0;
            assert_eq!(
                m.content_kind == CONTENT_KIND_DELETED,
                purged,
                "{:?}",
                m.seq
            );
        }
    });
}

// ── Torn purges ─────────────────────────────────────────────────────────────────────────────

/// Where the torn record lies.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    /// Within the tail window of the last segment (default config: 16 MiB).
    Tail,
    /// In the last segment, more than the tail window (80 KiB) before its end.
    Deep,
    /// In an older segment.
    Older,
}

/// How a crash tore the in-place rewrite.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Tear {
    /// The first part of the frame (header, CRC, content_kind, start of the payload) is new.
    NewHead,
    /// The end of the payload is new (zeros); header, CRC and content_kind are old. Only a
    /// one-phase purge (an earlier build) can leave this.
    NewTail,
    /// Only the sector holding the CRC was rewritten: a CRC change alone. Only a one-phase purge
    /// can leave this.
    CrcOnly,
    /// Phase 1 only: the content_kind byte is `CONTENT_KIND_DELETED`; payload and CRC are old.
    Phase1,
    /// Phase 1, then phase 2 reached only the end of the payload.
    Phase2Tail,
    /// Phase 1, then phase 2 reached only the CRC.
    Phase2Crc,
}

impl Tear {
    /// Tears a two-phase purge can leave, and `NewHead` (also one): the content_kind byte on
    /// disk is `CONTENT_KIND_DELETED`.
    const MARKED: [Tear; 4] = [
        Tear::NewHead,
        Tear::Phase1,
        Tear::Phase2Tail,
        Tear::Phase2Crc,
    ];
    /// Tears only a one-phase purge could leave: the content_kind byte is the old one.
    const UNMARKED: [Tear; 2] = [Tear::NewTail, Tear::CrcOnly];
    const ALL: [Tear; 6] = [
        Tear::NewHead,
        Tear::NewTail,
        Tear::CrcOnly,
        Tear::Phase1,
        Tear::Phase2Tail,
        Tear::Phase2Crc,
    ];

    fn marked(self) -> bool {
        Tear::MARKED.contains(&self)
    }
}

/// Offset of `content_kind` in a version-2 `Message` frame: before `flags` and the payload length.
const KIND_AT: usize = MESSAGE_FRAME_OVERHEAD_BYTES - 6;

const TARGET: u64 = 3;
const PAYLOAD: usize = 2000;

struct Built {
    cfg: StoreConfig,
    /// Every record, in log order, as written.
    log: Vec<Record>,
    path: PathBuf,
    loc: Location,
}

/// Writes `created(A)`, messages of A, and (if `deleted_target`) a `Deleted` event for that seq
/// followed by two more messages, so that message `TARGET` lies at `place`.
fn build(dir: &Path, place: Place, deleted_target: Option<u64>) -> Built {
    let (cfg, n, len) = match place {
        Place::Tail => (StoreConfig::default(), 6, PAYLOAD),
        // ~108 KiB in one 160 KiB segment: message 3 is > 80 KiB from the end.
        Place::Deep => (small_cfg(), 50, PAYLOAD),
        Place::Older => (small_cfg(), 100, PAYLOAD),
    };
    let mut log = vec![created(A), created(B)];
    log.extend((1..=n).map(|s| msg(A, s, len)));
    log.push(msg(B, 1, 10));
    if let Some(t) = deleted_target {
        log.push(deleted(A, n + 1, t));
        log.push(msg(A, n + 2, len));
        log.push(msg(A, n + 3, 10));
    }
    let (path, loc) = run(async {
        let (store, _) = EmbeddedStore::open(dir, cfg.clone()).await.unwrap();
        for chunk in log.chunks(4) {
            store.append(chunk).await.unwrap();
        }
        let loc = store.location(A, Seq(TARGET)).unwrap();
        let paths = store.segment_paths();
        let last = paths.len() - 1;
        match place {
            Place::Tail | Place::Deep => assert_eq!(loc.segment as usize, last, "{place:?}"),
            Place::Older => assert!((loc.segment as usize) < last, "{place:?}"),
        }
        let path = paths[loc.segment as usize].clone();
        let bytes_after = std::fs::metadata(&path).unwrap().len() - loc.offset as u64;
        if place == Place::Deep {
            assert!(bytes_after > 80 * 1024, "{bytes_after}");
        }
        store.close().await.unwrap();
        (path, loc)
    });
    Built {
        cfg,
        log,
        path,
        loc,
    }
}

/// The tombstone frame of the (valid) frame `old`.
fn tombstone_frame(old: &[u8]) -> Vec<u8> {
    let (record, n) = decode_one(old).unwrap().unwrap();
    assert_eq!(n, old.len());
    encode(&Record::Message(tombstone(as_message(&record))))
}

/// Damages the (whole, valid) frame at `loc` the way a torn in-place rewrite does; returns the
/// tombstone the purge was writing.
fn tear_at(path: &Path, loc: Location, tear: Tear) -> Vec<u8> {
    let at = loc.offset as u64;
    let len = loc.len as usize;
    let old = read_at(path, at, len);
    let new = tombstone_frame(&old);
    assert_eq!(new.len(), old.len());
    assert!(len > 1024 + 8, "a frame large enough to tear at 1024");
    assert_ne!(old[KIND_AT], CONTENT_KIND_DELETED);
    assert_eq!(new[KIND_AT], CONTENT_KIND_DELETED);
    if matches!(tear, Tear::Phase1 | Tear::Phase2Tail | Tear::Phase2Crc) {
        write_at(path, at + KIND_AT as u64, &[CONTENT_KIND_DELETED]);
    }
    match tear {
        Tear::NewHead => write_at(path, at, &new[..1024]),
        Tear::NewTail | Tear::Phase2Tail => write_at(path, at + 1024, &new[1024..]),
        Tear::CrcOnly | Tear::Phase2Crc => write_at(path, at + 4, &new[4..RECORD_HEADER_BYTES]),
        Tear::Phase1 => {}
    }
    let torn = read_at(path, at, len);
    assert_ne!(torn, old);
    assert_ne!(torn, new);
    assert_eq!(torn[KIND_AT] == CONTENT_KIND_DELETED, tear.marked());
    if tear == Tear::Phase1 {
        // Exactly one byte differs from the old record: its payload and CRC are the old ones.
        let differ: Vec<usize> = (0..len).filter(|&i| torn[i] != old[i]).collect();
        assert_eq!(differ, vec![KIND_AT]);
    }
    new
}

/// Damages the target's frame the way a torn in-place rewrite does.
fn tear(b: &Built, tear: Tear) {
    let new = tear_at(&b.path, b.loc, tear);
    assert_eq!(
        new,
        encode(&Record::Message(tombstone(&message(A, TARGET, PAYLOAD))))
    );
}

fn expect_hard_error(b: &Built, check: impl FnOnce(&PathBuf, u64, &Corruption)) {
    let before = std::fs::read(&b.path).unwrap();
    run(async {
        match EmbeddedStore::open(b.path.parent().unwrap(), b.cfg.clone()).await {
            Err(StorageError::Corrupt {
                segment,
                offset,
                reason,
            }) => check(&segment, offset, &reason),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a log with damaged acknowledged data"),
        }
    });
    // Nothing was repaired or cut.
    assert!(std::fs::read(&b.path).unwrap() == before);
}

/// Every tear, with the `Deleted` event naming the record: completed (marked tears on their own
/// evidence, unmarked ones on the event's).
#[test]
fn torn_purge_is_completed_at_recovery() {
    for place in [Place::Tail, Place::Deep, Place::Older] {
        for how in Tear::ALL {
            let tmp = tempfile::tempdir().unwrap();
            let dir = shard_dir(&tmp);
            let b = build(&dir, place, Some(TARGET));
            tear(&b, how);
            let case = format!("{place:?} {how:?}");
            let mut expected = b.log.clone();
            let at = expected
                .iter()
                .position(|r| matches!(r, Record::Message(m) if m.chat == A && m.seq.0 == TARGET))
                .unwrap();
            expected[at] = Record::Message(tombstone(&message(A, TARGET, PAYLOAD)));
            run(async {
                let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                assert!(records == expected, "{case}");
                let report = store.recovery_report();
                assert_eq!(report.truncation, None, "{case}");
                assert_eq!(report.records, expected.len());
                let done: &[CompletedPurge] = &report.purges_completed;
                assert_eq!(done.len(), 1, "{case}");
                assert_eq!(
                    (&done[0].segment, done[0].offset, done[0].chat, done[0].seq),
                    (&b.path, b.loc.offset as u64, A, Seq(TARGET)),
                    "{case}"
                );
                assert!(matches!(done[0].damage, RecordError::Crc { .. }), "{case}");
                let evidence = if how.marked() {
                    PurgeEvidence::Marked
                } else {
                    PurgeEvidence::DeletedEvent
                };
                assert_eq!(done[0].evidence, evidence, "{case}");
                let got = store
                    .read_messages(A, Seq(TARGET - 1), Seq(TARGET + 1), 3)
                    .await
                    .unwrap();
                assert_eq!(
                    got,
                    vec![
                        message(A, TARGET - 1, PAYLOAD),
                        tombstone(&message(A, TARGET, PAYLOAD)),
                        message(A, TARGET + 1, PAYLOAD)
                    ],
                    "{case}"
                );
                // Appends continue where they did.
                let next = store.durable_seq(A).0 + 1;
                store.append(&[msg(A, next, 1)]).await.unwrap();
                store.close().await.unwrap();
            });
            run(async {
                let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                let report = store.recovery_report();
                assert!(report.purges_completed.is_empty(), "{case}");
                assert_eq!(report.truncation, None, "{case}");
                assert!(records[..expected.len()] == expected[..], "{case}");
                assert_eq!(records.len(), expected.len() + 1);
            });
        }
    }
}

/// Unmarked damage (content_kind byte still the old one) with no `Deleted` event naming the
/// record is what it always was: a hard error in acknowledged data, a torn append at the tail.
/// (Marked damage needs no event: `marked_torn_purge_needs_no_deleted_event`.)
#[test]
fn torn_record_without_its_deleted_event_is_not_a_purge() {
    // No Deleted event at all, and one for another seq.
    for deleted_target in [None, Some(TARGET + 1)] {
        for how in Tear::UNMARKED {
            let case = format!("{deleted_target:?} {how:?}");
            let tmp = tempfile::tempdir().unwrap();
            let b = build(&shard_dir(&tmp), Place::Deep, deleted_target);
            tear(&b, how);
            expect_hard_error(&b, |segment, offset, reason| {
                assert_eq!(segment, &b.path, "{case}");
                assert_eq!(offset, b.loc.offset as u64, "{case}");
                assert!(
                    matches!(reason, Corruption::DamageBeforeTail { .. }),
                    "{case}: {reason}"
                );
            });

            let tmp = tempfile::tempdir().unwrap();
            let b = build(&shard_dir(&tmp), Place::Older, deleted_target);
            tear(&b, how);
            expect_hard_error(&b, |segment, offset, reason| {
                assert_eq!(segment, &b.path, "{case}");
                assert_eq!(offset, b.loc.offset as u64, "{case}");
                assert!(
                    matches!(reason, Corruption::Record(RecordError::Crc { .. })),
                    "{case}: {reason}"
                );
            });

            // In the tail window it is a torn append, cut with everything after it.
            let tmp = tempfile::tempdir().unwrap();
            let dir = shard_dir(&tmp);
            let b = build(&dir, Place::Tail, deleted_target);
            tear(&b, how);
            run(async {
                let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                let report = store.recovery_report();
                let t = report.truncation.clone().expect("a truncation");
                assert_eq!(t.offset, b.loc.offset as u64, "{case}");
                assert!(matches!(
                    t.reason,
                    TailDamage::Invalid(RecordError::Crc { .. })
                ));
                assert!(report.purges_completed.is_empty());
                // created(A), created(B), messages 1 and 2.
                assert!(records[..] == b.log[..2 + TARGET as usize - 1], "{case}");
                assert_eq!(store.durable_seq(A), Seq(TARGET - 1));
                assert_eq!(store.durable_seq(B), Seq(0));
                assert!(store.has_chat(B));
            });
        }
    }
}

/// Only content bytes may differ in a torn purge: damage to the fields a purge rewrites with
/// identical values is a hard error even when a `Deleted` event names the record.
#[test]
fn torn_record_with_a_damaged_header_is_a_hard_error() {
    let body = RECORD_HEADER_BYTES as u64;
    let fields = [
        ("body_len", 1),
        ("tag", body),
        ("version", body + 1),
        ("chat", body + 2),
        ("seq", body + 10),
        ("payload_len", (MESSAGE_FRAME_OVERHEAD_BYTES - 3) as u64),
    ];
    for (field, at) in fields {
        for place in [Place::Deep, Place::Older] {
            let tmp = tempfile::tempdir().unwrap();
            let b = build(&shard_dir(&tmp), place, Some(TARGET));
            tear(&b, Tear::NewTail);
            xor_byte(&b.path, b.loc.offset as u64 + at);
            expect_hard_error(&b, |segment, offset, reason| {
                assert_eq!(segment, &b.path, "{field} {place:?}: {reason}");
                assert_eq!(offset, b.loc.offset as u64, "{field} {place:?}: {reason}");
            });
        }
    }
}

/// A cut at a torn append can remove the `Deleted` event that vouched for an earlier torn record;
/// that record is then a torn append too, and the log is cut there.
#[test]
fn cutting_a_torn_tail_can_unvouch_an_earlier_torn_record() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let mut log = vec![created(A)];
    log.extend((1..=5).map(|s| msg(A, s, 600)));
    log.push(deleted(A, 6, 2));
    let (path, loc2, loc4) = run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        store.append(&log).await.unwrap();
        let path = store.segment_paths().pop().unwrap();
        let l = |s| store.location(A, Seq(s)).unwrap();
        (path, l(2), l(4))
    });
    xor_byte(&path, loc2.offset as u64 + 4);
    xor_byte(&path, loc4.offset as u64 + loc4.len as u64 - 1);
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        assert_eq!(records, log[..2]);
        let report = store.recovery_report();
        assert_eq!(
            report.truncation.as_ref().unwrap().offset,
            loc2.offset as u64
        );
        assert!(report.purges_completed.is_empty());
        assert_eq!(store.durable_seq(A), Seq(1));
    });
}

/// A torn purge and a torn append in one crash: the purge is completed, the append cut. With a
/// `Deleted` event naming the record or none at all (the record is marked).
#[test]
fn torn_purge_and_torn_tail_together() {
    for deleted_target in [Some(TARGET), None] {
        torn_purge_and_torn_tail(deleted_target);
    }
}

fn torn_purge_and_torn_tail(deleted_target: Option<u64>) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let b = build(&dir, Place::Tail, deleted_target);
    tear(&b, Tear::NewHead);
    // The last record (a 10-byte message) is cut short.
    let len = std::fs::metadata(&b.path).unwrap().len();
    let last_frame = (MESSAGE_FRAME_OVERHEAD_BYTES + 10) as u64;
    OpenOptions::new()
        .write(true)
        .open(&b.path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
        let report = store.recovery_report();
        let t = report.truncation.clone().expect("a truncation");
        assert_eq!(
            (t.offset, t.reason),
            (len - last_frame, TailDamage::Incomplete)
        );
        assert_eq!(report.purges_completed.len(), 1);
        assert_eq!(records.len(), b.log.len() - 1);
        let got = store
            .read_messages(A, Seq(TARGET), Seq(TARGET), 1)
            .await
            .unwrap();
        assert_eq!(got, vec![tombstone(&message(A, TARGET, PAYLOAD))]);
    });
}

// ── Two-phase purges: the content_kind byte vouches for the record ──────────────────────────

/// A record whose content_kind byte is already `CONTENT_KIND_DELETED` (phase 1 durable) is a torn
/// purge wherever it lies, with no `Deleted` event at all or only one naming another seq.
#[test]
fn marked_torn_purge_needs_no_deleted_event() {
    for deleted_target in [None, Some(TARGET + 1)] {
        for place in [Place::Tail, Place::Deep, Place::Older] {
            for how in Tear::MARKED {
                let case = format!("{deleted_target:?} {place:?} {how:?}");
                let tmp = tempfile::tempdir().unwrap();
                let dir = shard_dir(&tmp);
                let b = build(&dir, place, deleted_target);
                tear(&b, how);
                let mut expected = b.log.clone();
                expected[2 + TARGET as usize - 1] =
                    Record::Message(tombstone(&message(A, TARGET, PAYLOAD)));
                run(async {
                    let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                    assert!(records == expected, "{case}");
                    let report = store.recovery_report();
                    // In the tail window too: judged a torn purge, not cut as a torn append.
                    assert_eq!(report.truncation, None, "{case}");
                    let done = &report.purges_completed;
                    assert_eq!(done.len(), 1, "{case}");
                    assert_eq!(
                        (&done[0].segment, done[0].offset, done[0].seq),
                        (&b.path, b.loc.offset as u64, Seq(TARGET)),
                        "{case}"
                    );
                    assert_eq!(done[0].evidence, PurgeEvidence::Marked, "{case}");
                    let got = store
                        .read_messages(A, Seq(TARGET), Seq(TARGET), 1)
                        .await
                        .unwrap();
                    assert_eq!(got, vec![tombstone(&message(A, TARGET, PAYLOAD))], "{case}");
                    store.close().await.unwrap();
                });
                // Completed for good: the next open finds nothing to repair.
                run(async {
                    let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                    assert!(
                        store.recovery_report().purges_completed.is_empty(),
                        "{case}"
                    );
                    assert!(records == expected, "{case}");
                });
            }
        }
    }
}

/// The `Edited` event (seq `TARGET + 1`) that carried newer content of message `TARGET`, which the
/// engine purges along with it; no event names the edit.
const EDIT: u64 = TARGET + 1;

/// Like [`build`] with a `Deleted` event for `TARGET`, but with an `Edited` event of `TARGET` at
/// seq `EDIT`, lying at `place`. `Built::loc` is the edit's; `TARGET`'s location is returned too.
fn build_with_edit(dir: &Path, place: Place) -> (Built, Location) {
    let (cfg, n) = match place {
        Place::Tail => (StoreConfig::default(), 6),
        Place::Deep => (small_cfg(), 50),
        Place::Older => (small_cfg(), 100),
    };
    let mut log = vec![created(A), created(B)];
    log.extend((1..=TARGET).map(|s| msg(A, s, PAYLOAD)));
    log.push(edited(A, EDIT, TARGET, PAYLOAD));
    log.extend((EDIT + 1..=n).map(|s| msg(A, s, PAYLOAD)));
    log.push(msg(B, 1, 10));
    log.push(deleted(A, n + 1, TARGET));
    log.push(msg(A, n + 2, PAYLOAD));
    log.push(msg(A, n + 3, 10));
    let (path, loc, target_loc) = run(async {
        let (store, _) = EmbeddedStore::open(dir, cfg.clone()).await.unwrap();
        for chunk in log.chunks(4) {
            store.append(chunk).await.unwrap();
        }
        let loc = store.location(A, Seq(EDIT)).unwrap();
        let target_loc = store.location(A, Seq(TARGET)).unwrap();
        let paths = store.segment_paths();
        let last = paths.len() - 1;
        match place {
            Place::Tail | Place::Deep => assert_eq!(loc.segment as usize, last, "{place:?}"),
            Place::Older => assert!((loc.segment as usize) < last, "{place:?}"),
        }
        assert_eq!(loc.segment, target_loc.segment);
        let path = paths[loc.segment as usize].clone();
        if place == Place::Deep {
            let bytes_after = std::fs::metadata(&path).unwrap().len() - loc.offset as u64;
            assert!(bytes_after > 80 * 1024, "{bytes_after}");
        }
        store.close().await.unwrap();
        (path, loc, target_loc)
    });
    let b = Built {
        cfg,
        log,
        path,
        loc,
    };
    (b, target_loc)
}

/// The case the two phases exist for: a crash tears the purge of an `Edited` event, which no
/// `Deleted` event names (the deleted message's own purge finished). Recovery completes it
/// wherever it lies instead of refusing the shard.
#[test]
fn torn_purge_of_an_edited_event_is_completed_at_recovery() {
    for place in [Place::Tail, Place::Deep, Place::Older] {
        for how in Tear::MARKED {
            let case = format!("{place:?} {how:?}");
            let tmp = tempfile::tempdir().unwrap();
            let dir = shard_dir(&tmp);
            let (b, target_loc) = build_with_edit(&dir, place);
            // The purge of [TARGET, EDIT]: phase 1 marked both, phase 2 finished TARGET and tore
            // EDIT.
            let target_tombstone = tear_at(&b.path, target_loc, Tear::Phase1);
            write_at(&b.path, target_loc.offset as u64, &target_tombstone);
            let edit_tombstone = tear_at(&b.path, b.loc, how);
            let mut expected = b.log.clone();
            let at = |seq: u64| 2 + seq as usize - 1;
            assert_eq!(
                *as_message(&expected[at(EDIT)]),
                *as_message(&b.log[at(EDIT)])
            );
            expected[at(TARGET)] = Record::Message(tombstone(as_message(&b.log[at(TARGET)])));
            expected[at(EDIT)] = Record::Message(tombstone(as_message(&b.log[at(EDIT)])));
            assert_eq!(encode(&expected[at(EDIT)]), edit_tombstone);
            run(async {
                let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                assert!(records == expected, "{case}");
                let report = store.recovery_report();
                assert_eq!(report.truncation, None, "{case}");
                assert_eq!(
                    report.purges_completed,
                    vec![CompletedPurge {
                        segment: b.path.clone(),
                        offset: b.loc.offset as u64,
                        chat: A,
                        seq: Seq(EDIT),
                        damage: report.purges_completed[0].damage.clone(),
                        evidence: PurgeEvidence::Marked,
                    }],
                    "{case}"
                );
                assert!(
                    matches!(report.purges_completed[0].damage, RecordError::Crc { .. }),
                    "{case}"
                );
                let got = store
                    .read_messages(A, Seq(TARGET), Seq(EDIT + 1), 3)
                    .await
                    .unwrap();
                assert_eq!(
                    got,
                    vec![
                        tombstone(&message(A, TARGET, PAYLOAD)),
                        tombstone(as_message(&b.log[at(EDIT)])),
                        message(A, EDIT + 1, PAYLOAD),
                    ],
                    "{case}"
                );
                let next = store.durable_seq(A).0 + 1;
                store.append(&[msg(A, next, 1)]).await.unwrap();
                store.close().await.unwrap();
            });
            assert_eq!(
                read_at(&b.path, b.loc.offset as u64, b.loc.len as usize),
                edit_tombstone,
                "{case}"
            );
            run(async {
                let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                let report = store.recovery_report();
                assert!(report.purges_completed.is_empty(), "{case}");
                assert_eq!(report.truncation, None, "{case}");
                assert!(records[..expected.len()] == expected[..], "{case}");
                assert_eq!(records.len(), expected.len() + 1, "{case}");
            });
        }
    }
}

/// A crash after phase 1's fdatasync, before phase 2 wrote anything: the record differs from the
/// original only in its content_kind byte (old payload, old CRC). Recovery writes the tombstone.
#[test]
fn phase_one_only_purge_is_completed_at_recovery() {
    for place in [Place::Tail, Place::Deep, Place::Older] {
        // A message no event names, and the Edited event.
        for edit in [false, true] {
            let case = format!("{place:?} edit={edit}");
            let tmp = tempfile::tempdir().unwrap();
            let dir = shard_dir(&tmp);
            let (b, seq) = if edit {
                (build_with_edit(&dir, place).0, EDIT)
            } else {
                (build(&dir, place, None), TARGET)
            };
            let new = tear_at(&b.path, b.loc, Tear::Phase1);
            let at = 2 + seq as usize - 1;
            let mut expected = b.log.clone();
            expected[at] = Record::Message(tombstone(as_message(&b.log[at])));
            run(async {
                let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
                assert!(records == expected, "{case}");
                let report = store.recovery_report();
                assert_eq!(report.truncation, None, "{case}");
                assert_eq!(report.purges_completed.len(), 1, "{case}");
                let done = &report.purges_completed[0];
                assert_eq!(
                    (done.offset, done.seq, done.evidence),
                    (b.loc.offset as u64, Seq(seq), PurgeEvidence::Marked),
                    "{case}"
                );
                store.close().await.unwrap();
            });
            // On disk: exactly the tombstone.
            assert_eq!(
                read_at(&b.path, b.loc.offset as u64, b.loc.len as usize),
                new,
                "{case}"
            );
        }
    }
}

/// The content_kind byte vouches only for the content bytes: a marked record whose other fields
/// are damaged is a hard error in acknowledged data (and a torn append at the tail), with or
/// without a `Deleted` event naming it.
#[test]
fn marked_record_with_a_damaged_header_is_a_hard_error() {
    let body = RECORD_HEADER_BYTES as u64;
    let fields = [
        ("body_len", 1),
        ("tag", body),
        ("version", body + 1),
        ("chat", body + 2),
        ("seq", body + 10),
        ("payload_len", (MESSAGE_FRAME_OVERHEAD_BYTES - 3) as u64),
    ];
    for (field, at) in fields {
        for place in [Place::Deep, Place::Older] {
            for (how, deleted_target) in [(Tear::Phase1, None), (Tear::NewHead, Some(TARGET))] {
                let case = format!("{field} {place:?} {how:?}");
                let tmp = tempfile::tempdir().unwrap();
                let b = build(&shard_dir(&tmp), place, deleted_target);
                tear(&b, how);
                xor_byte(&b.path, b.loc.offset as u64 + at);
                assert_eq!(
                    read_at(&b.path, b.loc.offset as u64 + KIND_AT as u64, 1),
                    [CONTENT_KIND_DELETED]
                );
                expect_hard_error(&b, |segment, offset, reason| {
                    assert_eq!(segment, &b.path, "{case}: {reason}");
                    assert_eq!(offset, b.loc.offset as u64, "{case}: {reason}");
                    match place {
                        Place::Deep => assert!(
                            matches!(reason, Corruption::DamageBeforeTail { .. }),
                            "{case}: {reason}"
                        ),
                        _ => assert!(matches!(reason, Corruption::Record(_)), "{case}: {reason}"),
                    }
                });
            }
        }
    }
    // In the tail window such a record is a torn append, as before: cut, nothing completed.
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let b = build(&dir, Place::Tail, None);
    tear(&b, Tear::Phase1);
    xor_byte(&b.path, b.loc.offset as u64 + body + 10);
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, b.cfg.clone()).await.unwrap();
        let report = store.recovery_report();
        assert_eq!(
            report.truncation.as_ref().map(|t| t.offset),
            Some(b.loc.offset as u64)
        );
        assert!(report.purges_completed.is_empty());
        assert!(records[..] == b.log[..2 + TARGET as usize - 1]);
    });
}

/// A torn append is still judged on what precedes it: a marked record after the first record
/// that is neither marked nor named in the tail window is cut with it (a purge touches only
/// durable records, so nothing after a torn append was ever purged).
#[test]
fn a_marked_record_after_a_torn_append_is_cut_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = shard_dir(&tmp);
    let mut log = vec![created(A)];
    log.extend((1..=5).map(|s| msg(A, s, 600)));
    let (path, loc2, loc4) = run(async {
        let (store, _) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        store.append(&log).await.unwrap();
        let path = store.segment_paths().pop().unwrap();
        let l = |s| store.location(A, Seq(s)).unwrap();
        (path, l(2), l(4))
    });
    xor_byte(&path, loc2.offset as u64 + loc2.len as u64 - 1);
    write_at(
        &path,
        loc4.offset as u64 + KIND_AT as u64,
        &[CONTENT_KIND_DELETED],
    );
    run(async {
        let (store, records) = EmbeddedStore::open(&dir, StoreConfig::default())
            .await
            .unwrap();
        assert_eq!(records, log[..2]);
        let report = store.recovery_report();
        assert_eq!(
            report.truncation.as_ref().unwrap().offset,
            loc2.offset as u64
        );
        assert!(report.purges_completed.is_empty());
        assert_eq!(store.durable_seq(A), Seq(1));
    });
}
