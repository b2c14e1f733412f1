//! `EmbeddedStore`: one shard's append-only log on local disk, through glommio (io_uring).
//!
//! # Layout
//!
//! A shard directory `<data_dir>/shard-<k>/` holds segment files `seg-<base>.log`, where `<base>`
//! is the 16-digit zero-padded *global byte offset* of the segment's first byte in the shard's
//! log. Segments are therefore contiguous: each one starts where the previous one ends, which
//! `open` checks (a missing or cut segment is detected). A segment is a plain concatenation of
//! framed records (see [`crate::record`]), possibly followed by zeros (free space, see below);
//! only the last one is ever appended to. A segment's *logical end* (the end of its records,
//! kept in memory) is where appends go and where the next segment's base starts; the file may be
//! longer.
//!
//! # Preallocation
//!
//! With `StoreConfig::preallocate_segments` (the default), segments after a fresh shard's first
//! one are created at their full `segment_bytes_max`, zero-filled with real writes and
//! `fdatasync`ed before any record goes into them. An append then overwrites zeros inside the
//! file: its `fdatasync` has no file size or extent change to commit, only data (on ext4 no
//! journal commit, see `benches/results/dev-2vcpu/log-append-prealloc.md`); `fallocate` alone
//! would not do, since its unwritten extents need a metadata update at their first write.
//!
//! ```text
//!  active segment half full ──spawn──► fill_spare task (background, same core):
//!      seg-next.spare.tmp ◄── zeros, 1 MiB writes, fdatasync every 8 MiB ──► rename seg-next.spare
//!  roll (next write would pass segment_bytes_max):
//!      spare ready?  yes ─► rename seg-next.spare → seg-<base>.log, flock, fsync dir
//!                    no  ─► create seg-<base>.log empty (O_EXCL), fsync dir  (grows; never waits)
//! ```
//!
//! A fresh shard's first segment grows (a fresh server writes nothing extra at start) unless
//! [`EmbeddedStore::prepare_spare`] readied a spare before its first append, which then takes
//! the empty segment's place. At `open`, an unfinished `seg-next.spare.tmp` is removed and a
//! complete `seg-next.spare` of the configured size is kept for the next roll (otherwise
//! removed). Costs: every segment byte is written twice (zeros, then records), one spare per
//! shard sits on disk, and appends into a page the fill evicted from the page cache read it
//! back first (a partial-page write into an existing block).
//!
//! # Durability
//!
//! `append` encodes a whole batch into one buffer, writes it with one positional write at the
//! logical end of the active segment, and issues one `fdatasync` (a batch larger than
//! `StoreConfig::sync_round_bytes_max()` takes several such rounds, so the bytes written but not
//! yet synced stay bounded). A new segment is created (with `O_EXCL`)
//! (or renamed from the spare) and its directory `fdatasync`ed before any record goes into it.
//! Only then does the in-memory index change, so readers never see a record that is not durable.
//!
//! # Purge ("delete for everyone")
//!
//! `purge` rewrites complete durable message records *in place*, in any segment: same length and
//! same bytes except `content_kind` (set to `CONTENT_KIND_DELETED`), the payload (zeroed) and the
//! CRC. The index stays valid. The tombstone's bytes are a function of the original record's
//! non-content fields only, so rewriting a record that is already (partly) rewritten always lands
//! the same bytes. It runs in two phases, so that every record it may leave half-rewritten
//! identifies itself on disk:
//!
//! 1. **Mark.** For every record to purge, write *only* its `content_kind` byte
//!    (`CONTENT_KIND_DELETED`) in place, then `fdatasync` every file touched. A one-byte
//!    positional write cannot tear: the byte is old or new, and the rest of the record is old.
//! 2. **Rewrite.** Write every whole tombstone (zeroed payload, new CRC, and the `content_kind`
//!    byte again, with the same value), then `fdatasync` every file touched.
//!
//! Once phase 1 is durable, every byte mix phase 2 can leave (sector-granular, old and new) has
//! `CONTENT_KIND_DELETED` in its `content_kind` byte, since old and new agree on it. The engine
//! makes the chat's `Deleted` event durable *before* it purges, so the content is known to be
//! deleted however far the purge got.
//!
//! # Recovery
//!
//! `open` scans every segment and verifies every CRC. A record header of zeros is *free space*
//! (no record has an empty body): the segment's records end there if only zeros follow; its
//! *data end* (just after its last non-zero byte, found by reading backwards from the file's
//! end) then lies at or before it. Non-zero bytes after free space are damage: in a sealed
//! segment always a hard [`Corruption::NonZeroAfterEnd`] (nothing is appended to a sealed
//! segment), in the last one a torn append when within the tail window (below), else the same
//! hard error. It repairs two kinds of damage:
//!
//! - **A torn purge.** A crash in the middle of a purge can leave a record anywhere in the log as
//!   a mix of old and new bytes: its CRC fails but every byte other than `content_kind`, the
//!   payload and the CRC is unchanged. Such a record is a *suspect* if (a) its header is
//!   plausible (`body_len` within limits, the whole frame present) and (b) with `content_kind` and
//!   payload replaced by a tombstone's it decodes strictly as a message of exactly its length,
//!   carrying a chat the log created and that chat's next seq. A suspect is a torn purge if
//!   either
//!   - (*marked*) its `content_kind` byte on disk already is `CONTENT_KIND_DELETED`: phase 1 of
//!     its purge was durable (a record that only phase 1 reached, with its old payload and old
//!     CRC, is one too). This covers every purgeable record, in particular the `Edited` events
//!     that carried a deleted message's newer content, which no event names; or
//!   - (*named*) a later record of the log is a `Deleted` chat event of the same chat whose target
//!     is its seq. This covers records a one-phase purge (an earlier build) tore, whose
//!     `content_kind` byte may still be the old one.
//!
//!   Recovery then completes the purge (writes the tombstone, `fdatasync`), returns the tombstone
//!   and reports it in [`RecoveryReport::purges_completed`].
//! - **A torn append.** Damage at the end of the last segment, within the last
//!   `StoreConfig::sync_round_bytes_max()` bytes before its data end, can only be a write that
//!   was never `fdatasync`ed, of an append that never returned `Ok` (an append writes only at the
//!   logical end, at most that many bytes, and nothing else writes non-zero bytes past it), so it
//!   is cut off: a growing segment is truncated, a preallocated one gets zeros up to its data
//!   end (keeping its size), and the cut is `fdatasync`ed. This includes an append whose first
//!   sectors never reached the disk but later ones did (zeros, then non-zero bytes).
//!
//! Damage anywhere else would be acknowledged data and is a hard [`StorageError::Corrupt`]: a CRC
//! failure that is neither marked nor named, and any damage to the bytes a purge leaves alone
//! (length, tag, version, chat, seq, ids, payload length...), whatever its `content_kind` byte.
//!
//! A torn purge is judged before a torn tail: a purge of one of the last records must not be
//! mistaken for a torn append, which would cut it and the acknowledged records after it (such as
//! the `Deleted` event). So a marked suspect is never cut as a torn append, nor is a named one
//! whose `Deleted` event is kept. The converse holds too: a damaged record near the end that is
//! neither marked nor named is cut as before, and so is everything after it, including a
//! `Deleted` event or a marked record that only an unfinished append wrote (a purge touches only
//! durable records, so nothing after a torn append was ever purged).
//!
//! # Concurrency
//!
//! All methods take `&self`. State lives in a `RefCell` that is borrowed only between awaits;
//! files are `Rc`s cloned out of it before an await. One `append` at a time (the committer
//! task) and one `purge` at a time, which may overlap each other: an append writes only past the
//! durable end, a purge rewrites only complete durable records. Any number of concurrent reads,
//! which only see index entries `append` published after its `fdatasync`; a read that overlaps a
//! purge's writes may see a marked or half-rewritten record, so a read that fails its CRC while a
//! purge is or was writing (from its first phase-1 write to its last phase-2 write) is retried.
//!
//! Every segment is opened read+write and `flock`ed at `open`: purges and their completion at
//! recovery write into sealed segments too, so the one-writer guarantee must cover them (and a
//! killed process's in-flight purge writes are waited out like its appends).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use glommio::io::{BufferedFile, Directory, OpenOptions, ReadResult};
use switchboard_wire::ids::{ChatId, Seq};
use switchboard_wire::EventKind;

use crate::record::{
    decode_one, Record, RecordError, StoredMessage, CHAT_MEMBERS_MAX, CONTENT_KIND_DELETED,
    CONTENT_KIND_EVENT, FORMAT_VERSION, MESSAGE_FORMAT_VERSION, MESSAGE_FRAME_OVERHEAD_BYTES,
    PAYLOAD_BYTES_MAX, RECORD_HEADER_BYTES,
};
use crate::{Corruption, MessageStore, StorageError, StoreConfig};

/// Most messages one `read_messages*` call returns, whatever `limit` says: bounds the memory and
/// I/O of one request (at most 1024 × 64 KiB = 64 MiB of payload). Callers page.
pub const READ_MESSAGES_MAX: usize = 1024;

/// Adjacent records are read with one positional read while the combined read stays within this
/// size; beyond it the read is split. Large enough that a page of small messages is one read,
/// small enough not to pin much memory per reader.
pub const READ_COALESCE_BYTES_MAX: usize = 256 * 1024;

/// Most seqs one `purge` call takes. The purge reads every record before it writes any (a refused
/// purge writes nothing), so this bounds its memory like [`READ_MESSAGES_MAX`] bounds a read's
/// (1024 × 68 KiB frames = 68 MiB at worst); a deleted message and its edits are a handful.
pub const PURGE_SEQS_MAX: usize = 1024;

/// How often a read that failed a CRC check while a purge was rewriting records is retried. One
/// retry after the purge's writes finished suffices; more only cover back-to-back purges.
const READ_PURGE_RETRIES_MAX: usize = 4;

/// Bytes read per request while scanning segments at start-up.
const SCAN_CHUNK_BYTES: usize = 1024 * 1024;

/// The preallocated spare segment, renamed to `seg-<base>.log` at the next roll. It exists under
/// this name only once it is completely zero-filled and `fdatasync`ed.
pub const SPARE_NAME: &str = "seg-next.spare";
/// The spare while it is being zero-filled; removed at `open` (a crash interrupted it).
pub const SPARE_TMP_NAME: &str = "seg-next.spare.tmp";
/// Zeros written per request while filling a spare or zeroing a torn tail: big enough that the
/// fill is a few dozen writes, small enough to keep one request's buffer modest.
const ZERO_CHUNK_BYTES: usize = 1024 * 1024;
/// The spare's fill is `fdatasync`ed every this many bytes, so its writeback comes in small
/// bursts instead of one 64 MiB flush that the commit path's `fdatasync`s would queue behind.
const SPARE_SYNC_BYTES: u64 = 8 * 1024 * 1024;
/// After this many failed spare fills (e.g. a full disk) the store stops trying until reopened
/// and keeps creating growing segments.
const SPARE_FAILURES_MAX: u32 = 3;

/// Byte offset of `content_kind` inside a `Message` body: after tag, version, chat, seq, msg_id,
/// sender_user, sender_device, timestamp_ms, client_msg_id and reply_to (see [`crate::record`]).
const MESSAGE_CONTENT_KIND_AT: usize = 2 + 8 + 8 + 8 + 8 + 4 + 8 + 16 + 8;
/// Where the payload starts in a version-2 `Message` body: after `content_kind`, `flags` and the
/// `u32` payload length. Version 1 had no `flags` byte.
const MESSAGE_PAYLOAD_AT: usize = MESSAGE_CONTENT_KIND_AT + 1 + 1 + 4;
const _: () = assert!(MESSAGE_PAYLOAD_AT == MESSAGE_FRAME_OVERHEAD_BYTES - RECORD_HEADER_BYTES);

const _: () = assert!(READ_COALESCE_BYTES_MAX >= crate::record::RECORD_BYTES_MAX + 8);
const _: () = assert!(SCAN_CHUNK_BYTES >= crate::record::RECORD_BYTES_MAX + 8);

/// Where one durable record lives (the index keeps it packed in 8 bytes: [`PackedLocation`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index into the store's segment list (0 = oldest segment open).
    pub segment: u32,
    /// Byte offset of the frame inside the segment.
    pub offset: u32,
    /// Frame length, header included.
    pub len: u32,
}

/// Most segments one shard's store holds: the in-memory index packs a message's segment number
/// into 15 bits ([`PackedLocation`]). 2 TiB per shard at the default 64 MiB segments. A roll past
/// it fails like a full disk (`StorageFull`), and `open` refuses a directory with more.
pub const SEGMENTS_MAX: usize = 1 << 15;

/// Bits of a frame's length in a [`PackedLocation`].
const PACKED_LEN_BITS: u32 = 17;
const _: () = assert!(RECORD_HEADER_BYTES + crate::record::RECORD_BYTES_MAX < 1 << PACKED_LEN_BITS);
const _: () = assert!(SEGMENTS_MAX <= 1 << (64 - 32 - PACKED_LEN_BITS));

/// Bytes of the in-memory index per stored message, before the vectors' growth slack.
pub const INDEX_ENTRY_BYTES: u64 = std::mem::size_of::<PackedLocation>() as u64;
const _: () = assert!(INDEX_ENTRY_BYTES == 8);

/// A [`Location`] as the in-memory index keeps it: 8 bytes instead of 12, since the index is
/// the store's memory per stored message. Bits, high to low: segment (15; below
/// [`SEGMENTS_MAX`]), offset (32; segments are at most `u32::MAX` bytes), frame length (17; a
/// frame is at most `RECORD_HEADER_BYTES + RECORD_BYTES_MAX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PackedLocation(u64);

impl PackedLocation {
    fn new(loc: Location) -> PackedLocation {
        assert!(
            (loc.segment as usize) < SEGMENTS_MAX,
            "segment {} past SEGMENTS_MAX",
            loc.segment
        );
        assert!(loc.len < 1 << PACKED_LEN_BITS, "frame of {} bytes", loc.len);
        PackedLocation(
            (u64::from(loc.segment) << (32 + PACKED_LEN_BITS))
                | (u64::from(loc.offset) << PACKED_LEN_BITS)
                | u64::from(loc.len),
        )
    }

    fn get(self) -> Location {
        Location {
            segment: (self.0 >> (32 + PACKED_LEN_BITS)) as u32,
            offset: (self.0 >> PACKED_LEN_BITS) as u32,
            len: (self.0 & ((1 << PACKED_LEN_BITS) - 1)) as u32,
        }
    }
}

/// What one `append` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendStats {
    /// Records written.
    pub records: usize,
    /// Encoded bytes written.
    pub bytes: usize,
    /// Time spent in the `fdatasync`s of the data (not counting a segment roll), in microseconds.
    pub sync_us: u64,
    /// Write+`fdatasync` rounds: 1 unless the batch exceeded `sync_round_bytes_max`.
    pub syncs: usize,
    /// Whether this append started a new segment.
    pub segment_rolled: bool,
}

/// Why the tail of the last segment was cut at recovery.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TailDamage {
    /// The last record was incomplete (the append was interrupted).
    Incomplete,
    /// A record failed to decode (CRC mismatch, bad length...).
    Invalid(RecordError),
    /// Zeros where the next record would start (free space of a preallocated segment),
    /// followed by non-zero bytes up to `data_end`: an append whose first bytes did not reach
    /// the disk but later ones did.
    NonZeroAfterEnd { data_end: u64 },
}

/// A torn tail `open` removed: truncated (a growing segment) or overwritten with zeros (a
/// preallocated one, which keeps its size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub segment: PathBuf,
    /// The end of the last good record: the file's new length, or where the zeros start.
    pub offset: u64,
    /// Bytes removed or zeroed (up to the file's end, or to its last non-zero byte when
    /// zeroed).
    pub bytes: u64,
    pub reason: TailDamage,
}

/// Why recovery took a record that failed its CRC for a torn purge (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PurgeEvidence {
    /// Its `content_kind` byte on disk already was `CONTENT_KIND_DELETED`: phase 1 of its purge
    /// was durable. Wins when both apply.
    Marked,
    /// A later `Deleted` event of its chat names it (a purge that tore before it marked the
    /// record, as a one-phase purge could).
    DeletedEvent,
}

/// A purge a crash interrupted, which `open` completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompletedPurge {
    pub segment: PathBuf,
    /// Byte offset of the record inside `segment`.
    pub offset: u64,
    pub chat: ChatId,
    pub seq: Seq,
    /// How the torn record failed to decode (always a CRC mismatch).
    pub damage: RecordError,
    /// Why it was taken for a torn purge.
    pub evidence: PurgeEvidence,
}

/// What `open` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files scanned (including one created for an empty shard).
    pub segments: usize,
    /// Records recovered.
    pub records: usize,
    /// Bytes of records recovered.
    pub bytes: u64,
    /// The torn tail that was cut, if any.
    pub truncation: Option<Truncation>,
    /// Torn purges that were completed (rewritten as tombstones and `fdatasync`ed), in log order.
    /// The records `open` returned hold the tombstones.
    pub purges_completed: Vec<CompletedPurge>,
}

/// What one `purge` did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PurgeStats {
    /// Records rewritten as tombstones.
    pub purged: usize,
    /// Records that already were tombstones and were left alone (a repeated purge).
    pub already_purged: usize,
    /// Bytes rewritten in phase 2 (whole frames; phase 1 adds one byte per record purged).
    pub bytes: usize,
    /// `fdatasync`s: two per segment file touched (one per phase), 0 if nothing was rewritten.
    pub syncs: usize,
    /// Time spent in those `fdatasync`s, in microseconds.
    pub sync_us: u64,
}

impl RecoveryReport {
    /// Bytes cut from the tail (0 if none).
    pub fn bytes_truncated(&self) -> u64 {
        self.truncation.as_ref().map_or(0, |t| t.bytes)
    }
}

struct Segment {
    path: PathBuf,
    /// Global offset of the segment's first byte.
    base: u64,
    /// Bytes of durable records in the file: its logical end. Appends go here, not at the file's
    /// end; everything after it is zeros (free space) or an unfinished append.
    len: u64,
    /// The file was created at its full size, zero-filled (or found that way at `open`).
    preallocated: bool,
    file: Rc<BufferedFile>,
}

/// Where the spare segment is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpareState {
    /// No spare and no fill running.
    Absent,
    /// A background task is zero-filling `SPARE_TMP_NAME`.
    Filling,
    /// `SPARE_NAME` is complete and durable.
    Ready,
}

/// Shared between the store and its spare-filling task (which must be `'static`).
struct Spare {
    state: Cell<SpareState>,
    failures: Cell<u32>,
}

struct Inner {
    segments: Vec<Segment>,
    /// chat → location of seq `i + 1` at index `i`. An entry exists from the chat's durable
    /// `ChatCreated` on, so its presence also says the chat exists.
    index: HashMap<ChatId, Vec<PackedLocation>>,
    /// Sum of the index vectors' lengths (durable messages) and capacities, kept as entries are
    /// pushed, so [`EmbeddedStore::index_memory`] costs nothing per call.
    index_entries: u64,
    index_capacity: u64,
}

/// What the in-memory index of an [`EmbeddedStore`] holds and about what it costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexMemory {
    /// Chats with a durable `ChatCreated`.
    pub chats: u64,
    /// Durable messages (one [`Location`] each).
    pub messages: u64,
    /// Heap bytes of the index: the vectors' capacity in [`Location`]s (growth slack included)
    /// plus the map's slots. An estimate of the allocation, not of the allocator's overhead.
    pub bytes: u64,
}

/// The embedded store of one shard. See the module docs.
///
/// Memory: 8 bytes per durable message (its [`PackedLocation`], plus at most a quarter of growth
/// slack: `push_location`) and a map entry per chat; payloads are never kept (10.1 B per message
/// measured). At 100 M messages per shard the index is ~1 GB; a checkpoint of the index
/// (and of [`crate::ShardState`]) with older segments read lazily would bound both this and the
/// start-up scan.
pub struct EmbeddedStore {
    dir: PathBuf,
    dir_handle: Directory,
    cfg: StoreConfig,
    inner: RefCell<Inner>,
    /// Set while an `append` is in flight.
    appending: Cell<bool>,
    /// Set when an `append` failed or was cancelled after it started writing.
    poisoned: Cell<bool>,
    /// Set while a `purge` is in flight.
    purging: Cell<bool>,
    /// Set while a `purge` is rewriting records (between its first write and its last one's
    /// completion): a read that fails a CRC check meanwhile may have seen a half-rewritten record.
    purge_writing: Cell<bool>,
    /// Bumped when a purge starts and when it stops rewriting records, so a reader can tell
    /// whether a purge wrote while it read.
    purge_generation: Cell<u64>,
    /// The preallocated spare segment (with `StoreConfig::preallocate_segments`).
    spare: Rc<Spare>,
    /// The task filling the spare; dropping it cancels the fill (the store's drop and `close`).
    spare_task: RefCell<Option<glommio::Task<Result<(), StorageError>>>>,
    report: RecoveryReport,
}

fn segment_name(base: u64) -> String {
    format!("seg-{base:016}.log")
}

/// Parses `seg-<16 digits>.log`.
fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn io_err<'a, E: Into<std::io::Error>>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(E) -> StorageError + 'a {
    move |e| StorageError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// The result of reading a range: glommio's buffer when one read returned it all, otherwise the
/// pieces of a short read stitched together.
enum ReadBytes {
    One(ReadResult),
    Joined(Vec<u8>),
}

impl Deref for ReadBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            ReadBytes::One(r) => r,
            ReadBytes::Joined(v) => v,
        }
    }
}

/// Reads exactly `len` bytes at `pos`; a short read is continued, end of file is an error.
async fn read_exact_at(
    file: &BufferedFile,
    path: &Path,
    pos: u64,
    len: usize,
) -> Result<ReadBytes, StorageError> {
    let first = file.read_at(pos, len).await.map_err(io_err("read", path))?;
    if first.len() == len {
        return Ok(ReadBytes::One(first));
    }
    let mut joined = Vec::with_capacity(len);
    joined.extend_from_slice(&first);
    while joined.len() < len {
        let at = pos + joined.len() as u64;
        let more = file
            .read_at(at, len - joined.len())
            .await
            .map_err(io_err("read", path))?;
        if more.is_empty() {
            return Err(StorageError::Io {
                op: "read",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        joined.extend_from_slice(&more);
    }
    Ok(ReadBytes::Joined(joined))
}

/// Writes all of `buf` at `pos`, continuing a short write.
async fn write_all_at(
    file: &BufferedFile,
    path: &Path,
    buf: &[u8],
    pos: u64,
) -> Result<(), StorageError> {
    let mut done = 0;
    while done < buf.len() {
        // glommio takes the buffer by value; purges and their completion are rare and small, so
        // the copy is cheaper than keeping a second encoding around for a short write.
        let n = file
            .write_at(buf[done..].to_vec(), pos + done as u64)
            .await
            .map_err(io_err("write segment", path))?;
        if n == 0 {
            return Err(StorageError::Io {
                op: "write segment",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::WriteZero.into(),
            });
        }
        done += n;
    }
    Ok(())
}

/// The tombstone of a complete `Message` frame: the same bytes with `content_kind` set to
/// `CONTENT_KIND_DELETED`, the payload zeroed and the CRC recomputed, together with the message
/// it decodes to. `None` unless that result is a valid message of exactly `frame.len()` bytes.
///
/// The CRC of `frame` itself is not checked, so this also reads a record whose purge was torn:
/// the bytes a purge changes are exactly the ones replaced here, and every other byte (length,
/// tag, version, chat, seq, ids, sender, payload length...) must still parse. It is also how
/// `purge` builds what it writes, so both agree byte for byte. Version-1 messages (no `flags`
/// byte) keep their version and length.
fn tombstone_of(frame: &[u8]) -> Option<(Vec<u8>, StoredMessage)> {
    let body = frame.get(RECORD_HEADER_BYTES..)?;
    let payload_at = match *body.get(1)? {
        MESSAGE_FORMAT_VERSION => MESSAGE_PAYLOAD_AT,
        FORMAT_VERSION => MESSAGE_PAYLOAD_AT - 1,
        _ => return None,
    };
    if body.len() < payload_at {
        return None;
    }
    let mut out = frame.to_vec();
    out[RECORD_HEADER_BYTES + MESSAGE_CONTENT_KIND_AT] = CONTENT_KIND_DELETED;
    out[RECORD_HEADER_BYTES + payload_at..].fill(0);
    let crc = crc32c::crc32c(&out[RECORD_HEADER_BYTES..]);
    out[4..RECORD_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    match decode_one(&out) {
        Ok(Some((Record::Message(m), n))) if n == out.len() => Some((out, m)),
        _ => None,
    }
}

/// Whether `m` is already what `purge` makes of a message.
fn is_tombstone(m: &StoredMessage) -> bool {
    m.content_kind == CONTENT_KIND_DELETED && m.payload.iter().all(|b| *b == 0)
}

/// The seq a `Deleted` chat event removes, if `m` is one.
fn deleted_target(m: &StoredMessage) -> Option<Seq> {
    if m.content_kind != CONTENT_KIND_EVENT {
        return None;
    }
    let ev = switchboard_wire::decode_event(&m.payload).ok()?;
    (ev.kind == EventKind::Deleted).then_some(ev.target)
}

/// Why `purge` refuses to purge `m`, if it does. Only content may go: chat events that
/// `ShardState` replays (members, roles, settings) would change the state rebuilt at the next
/// start, and a `Deleted` event records the deletion itself (and is what lets recovery finish a
/// purge of its target that a one-phase build tore).
fn purge_refusal(m: &StoredMessage) -> Option<&'static str> {
    if m.content_kind != CONTENT_KIND_EVENT {
        return None;
    }
    match switchboard_wire::decode_event(&m.payload) {
        Ok(ev) if matches!(ev.kind, EventKind::Edited | EventKind::Reacted) => None,
        Ok(ev) if ev.kind == EventKind::Deleted => {
            Some("a Deleted event is what makes its target's purge recoverable")
        }
        Ok(_) => Some("group events rebuild the chat's state at start-up"),
        Err(_) => Some("an undecodable event cannot be shown to be only content"),
    }
}

/// One thing a segment scan found.
enum Scanned {
    /// A CRC-valid record.
    Record(Record),
    /// A complete frame whose CRC fails but whose [`tombstone_of`] is a valid message: maybe a
    /// purge a crash tore. `tombstone` is the repaired frame, `message` what it decodes to;
    /// `marked` says whether its `content_kind` byte on disk already is `CONTENT_KIND_DELETED`
    /// (phase 1 of a purge).
    Torn {
        tombstone: Vec<u8>,
        message: StoredMessage,
        error: RecordError,
        marked: bool,
    },
}

/// What stopped a segment scan before the end of the file.
enum ScanDamage {
    /// Bytes that are not a (complete) record, or a torn message the caller refused: repairable
    /// at the tail of the last segment, a hard error elsewhere.
    Bytes(TailDamage),
    /// A CRC-valid record that contradicts the log before it (seq gap, unknown chat): always a
    /// hard error.
    Record(Corruption),
}

/// How the scan of one segment ended.
struct ScanEnd {
    /// End of the last good record.
    good_len: u64,
    /// What stopped the scan before the end of the file, if anything.
    damage: Option<ScanDamage>,
}

/// Decodes every record of a segment in order, calling `on_item(item, offset, len)`. A
/// [`Scanned::Torn`] frame is skipped over when `on_item` accepts it (`Ok`) and ends the scan as
/// damaged bytes (its CRC error) when it refuses it; an `Err` for a [`Scanned::Record`] ends the
/// scan as [`ScanDamage::Record`].
///
/// A record header of zeros (no record has an empty body) is free space: the end of the records
/// if no non-zero byte follows (`data_end`, see [`data_end`], is at or before it), else damage
/// ([`TailDamage::NonZeroAfterEnd`]).
async fn scan_segment(
    file: &BufferedFile,
    path: &Path,
    file_len: u64,
    data_end: u64,
    mut on_item: impl FnMut(Scanned, u64, usize) -> Result<(), Corruption>,
) -> Result<ScanEnd, StorageError> {
    let mut buf: Vec<u8> = Vec::with_capacity(SCAN_CHUNK_BYTES * 2);
    // File offset of buf[0].
    let mut buf_pos = 0u64;
    let mut read_pos = 0u64;
    loop {
        let mut at = 0usize;
        loop {
            let pos = buf_pos + at as u64;
            let damaged = |damage| ScanEnd {
                good_len: pos,
                damage: Some(damage),
            };
            let rest = &buf[at..];
            let free = match rest.get(..RECORD_HEADER_BYTES) {
                Some(header) => header.iter().all(|b| *b == 0),
                // A few bytes short of a header at the end of the file.
                None => read_pos == file_len && !rest.is_empty() && rest.iter().all(|b| *b == 0),
            };
            if free {
                if data_end <= pos {
                    return Ok(ScanEnd {
                        good_len: pos,
                        damage: None,
                    });
                }
                let damage = TailDamage::NonZeroAfterEnd { data_end };
                return Ok(damaged(ScanDamage::Bytes(damage)));
            }
            match decode_one(rest) {
                Ok(Some((record, n))) => {
                    if let Err(c) = on_item(Scanned::Record(record), pos, n) {
                        return Ok(damaged(ScanDamage::Record(c)));
                    }
                    at += n;
                }
                Ok(None) => break,
                Err(error @ RecordError::Crc { .. }) => {
                    // `decode_one` checks the CRC only once the whole frame is there.
                    let frame = buf[at..]
                        .get(..4)
                        .map(|h| u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize)
                        .and_then(|body_len| buf[at..].get(..RECORD_HEADER_BYTES + body_len));
                    let accepted = frame.is_some_and(|frame| {
                        let Some((tombstone, message)) = tombstone_of(frame) else {
                            return false;
                        };
                        // In range: `tombstone_of` checked that the body reaches the payload.
                        let marked = frame[RECORD_HEADER_BYTES + MESSAGE_CONTENT_KIND_AT]
                            == CONTENT_KIND_DELETED;
                        let torn = Scanned::Torn {
                            tombstone,
                            message,
                            error: error.clone(),
                            marked,
                        };
                        on_item(torn, pos, frame.len()).is_ok()
                    });
                    match frame {
                        Some(frame) if accepted => at += frame.len(),
                        _ => return Ok(damaged(ScanDamage::Bytes(TailDamage::Invalid(error)))),
                    }
                }
                Err(e) => return Ok(damaged(ScanDamage::Bytes(TailDamage::Invalid(e)))),
            }
        }
        buf.drain(..at);
        buf_pos += at as u64;
        if read_pos == file_len {
            let damage = (!buf.is_empty()).then_some(ScanDamage::Bytes(TailDamage::Incomplete));
            return Ok(ScanEnd {
                good_len: buf_pos,
                damage,
            });
        }
        let want = SCAN_CHUNK_BYTES.min((file_len - read_pos) as usize);
        let chunk = read_exact_at(file, path, read_pos, want).await?;
        buf.extend_from_slice(&chunk);
        read_pos += want as u64;
        // Recovery of a large shard is long CPU work; let other tasks of this core run.
        glommio::yield_if_needed().await;
    }
}

/// The offset just after the last non-zero byte of a file `file_len` bytes long (0 if it is all
/// zeros), read backwards in chunks: a preallocated segment's records end before its zeros. Reads
/// the whole free space, so up to a segment's size for a nearly empty one (once, at `open`).
async fn data_end(file: &BufferedFile, path: &Path, file_len: u64) -> Result<u64, StorageError> {
    let mut end = file_len;
    while end > 0 {
        let start = end.saturating_sub(SCAN_CHUNK_BYTES as u64);
        let chunk = read_exact_at(file, path, start, (end - start) as usize).await?;
        if let Some(i) = chunk.iter().rposition(|b| *b != 0) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
        glommio::yield_if_needed().await;
    }
    Ok(0)
}

/// A record whose CRC failed but which may be a torn purge: vouched for by its own mark, or
/// waiting for a later `Deleted` event to vouch for it.
struct Suspect {
    /// Index into the segment list.
    segment: usize,
    offset: u64,
    chat: ChatId,
    seq: Seq,
    error: RecordError,
    /// The frame to write to complete the purge.
    tombstone: Vec<u8>,
    /// Position of its (tombstone) record in the recovered records.
    record_at: usize,
    /// In the last segment: bytes from the record to the end of the file.
    bytes_after_if_last: Option<u64>,
    /// Within the last segment's tail window: it may be a torn append instead.
    tail: bool,
    /// Its `content_kind` byte on disk already is `CONTENT_KIND_DELETED`: it vouches for itself.
    marked: bool,
    /// Position in the recovered records of the `Deleted` event that names it.
    deleted_at: Option<usize>,
}

impl Suspect {
    /// Whether it is a torn purge if the log is kept up to record position `keep`: marked, or
    /// named by a `Deleted` event that is kept.
    fn vouched(&self, keep: usize) -> bool {
        self.marked || self.deleted_at.is_some_and(|at| at < keep)
    }

    fn evidence(&self) -> PurgeEvidence {
        if self.marked {
            PurgeEvidence::Marked
        } else {
            PurgeEvidence::DeletedEvent
        }
    }
}

/// Where the scan of one segment is.
struct SegmentScan {
    /// Index into the segment list.
    index: usize,
    /// Records at or after this offset are within the tail window of the last segment
    /// (`u64::MAX` for older segments).
    tail_start: u64,
    /// The file's length if it is the last segment.
    last_len: Option<u64>,
}

/// What recovery has accumulated over the segments scanned so far.
#[derive(Default)]
struct Recovered {
    records: Vec<Record>,
    index: HashMap<ChatId, Vec<PackedLocation>>,
    /// In log order.
    suspects: Vec<Suspect>,
    /// Unmarked suspects no `Deleted` event named yet: (chat, seq) → index into `suspects`.
    pending: HashMap<(ChatId, Seq), usize>,
    /// (position in `records`, chat) of chats the tail window of the last segment created: a
    /// cut there removes their index entries again.
    tail_created: Vec<(usize, ChatId)>,
}

impl Recovered {
    fn on_item(
        &mut self,
        seg: &SegmentScan,
        item: Scanned,
        offset: u64,
        len: usize,
    ) -> Result<(), Corruption> {
        let loc = Location {
            segment: seg.index as u32,
            offset: offset as u32,
            len: len as u32,
        };
        match item {
            Scanned::Record(record) => {
                let created = match &record {
                    Record::ChatCreated { chat, .. } if !self.index.contains_key(chat) => {
                        Some(*chat)
                    }
                    _ => None,
                };
                index_record(&mut self.index, &record, loc)?;
                if let Some(chat) = created.filter(|_| offset >= seg.tail_start) {
                    self.tail_created.push((self.records.len(), chat));
                }
                // Events are decoded only while a suspect waits for one.
                if !self.pending.is_empty() {
                    if let Record::Message(m) = &record {
                        let vouched = deleted_target(m)
                            .and_then(|target| self.pending.remove(&(m.chat, target)));
                        if let Some(k) = vouched {
                            self.suspects[k].deleted_at = Some(self.records.len());
                        }
                    }
                }
                self.records.push(record);
            }
            Scanned::Torn {
                tombstone,
                message,
                error,
                marked,
            } => {
                let (chat, seq) = (message.chat, message.seq);
                let record = Record::Message(message);
                // A purge never changes chat or seq: a torn record must fit where it lies.
                index_record(&mut self.index, &record, loc)?;
                // A marked suspect needs no event to vouch for it.
                if !marked {
                    self.pending.insert((chat, seq), self.suspects.len());
                }
                self.suspects.push(Suspect {
                    segment: seg.index,
                    offset,
                    chat,
                    seq,
                    error,
                    tombstone,
                    record_at: self.records.len(),
                    bytes_after_if_last: seg.last_len.map(|l| l - offset),
                    tail: offset >= seg.tail_start,
                    marked,
                    deleted_at: None,
                });
                self.records.push(record);
            }
        }
        Ok(())
    }

    /// The first suspect among the first `keep` records that is neither marked nor named by a
    /// `Deleted` event among them.
    fn first_unvouched(&self, keep: usize) -> Option<usize> {
        self.suspects
            .iter()
            .position(|s| s.record_at < keep && !s.vouched(keep))
    }

    /// Where the log ends: the number of records kept and the suspect the log is cut at, if any.
    /// An unvouched suspect in the tail window is a torn append: cut there (with every record
    /// after it, marked suspects included). Cutting can drop the `Deleted` event that vouched for
    /// an earlier unmarked suspect, so repeat until nothing changes. A marked suspect is never
    /// the cut: it vouches for itself, so it is judged a torn purge before it could be judged a
    /// torn append.
    fn settle(&self) -> (usize, Option<usize>) {
        let mut keep = self.records.len();
        let mut cut = None;
        while let Some(k) = self.first_unvouched(keep) {
            if !self.suspects[k].tail {
                break;
            }
            keep = self.suspects[k].record_at;
            cut = Some(k);
        }
        (keep, cut)
    }

    /// Forgets the records from position `keep` on (all in the last segment's tail window).
    fn cut(&mut self, keep: usize) {
        for r in self.records.drain(keep..).rev() {
            if let Record::Message(m) = r {
                self.index
                    .get_mut(&m.chat)
                    .and_then(Vec::pop)
                    .expect("a recovered message has its index entry");
            }
        }
        for &(_, chat) in self.tail_created.iter().filter(|(at, _)| *at >= keep) {
            let removed = self.index.remove(&chat);
            debug_assert!(removed.is_some_and(|v| v.is_empty()));
        }
        self.suspects.retain(|s| s.record_at < keep);
        self.pending.clear();
    }
}

/// What ended the scan of the segments early.
struct Stop {
    path: PathBuf,
    offset: u64,
    kind: StopKind,
}

enum StopKind {
    /// Damaged bytes; `bytes_after_if_last` as in [`Suspect`].
    Bytes {
        damage: TailDamage,
        bytes_after_if_last: Option<u64>,
    },
    /// Always a hard error.
    Hard(Corruption),
}

impl EmbeddedStore {
    /// Opens (or creates) the shard directory `dir`, recovers it, and returns the store together
    /// with every record in log order, from which the engine rebuilds [`crate::ShardState`]
    /// (`ShardState::recover`). See the module docs for what recovery repairs and what it
    /// refuses; [`EmbeddedStore::recovery_report`] says what it did.
    ///
    /// Returning every record, payloads included, costs memory and time proportional to the whole
    /// log. The store itself keeps only the index. A periodic checkpoint (the `ShardState` and
    /// index serialised at a known log offset) would let start-up read the checkpoint plus the
    /// log after it, and message payloads would then be read only on demand.
    pub async fn open(
        dir: &Path,
        cfg: StoreConfig,
    ) -> Result<(EmbeddedStore, Vec<Record>), StorageError> {
        cfg.validate()?;
        // Directory creation and listing use blocking std calls: they run once, at start-up,
        // before the shard serves anything.
        let existed = dir.is_dir();
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        if !existed {
            // Make the new directory's own entry durable.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                let p = Directory::open(parent)
                    .await
                    .map_err(io_err("open directory", parent))?;
                p.sync()
                    .await
                    .map_err(io_err("fdatasync directory", parent))?;
                p.close().await.map_err(io_err("close directory", parent))?;
            }
        }
        let dir_handle = Directory::open(dir)
            .await
            .map_err(io_err("open directory", dir))?;

        let mut bases = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err("list directory", dir))? {
            let entry = entry.map_err(io_err("list directory", dir))?;
            if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
                bases.push(base);
            }
        }
        bases.sort_unstable();
        let spare_state = clean_spare(dir, &cfg)?;

        let window = cfg.sync_round_bytes_max() as u64;
        let mut report = RecoveryReport::default();
        let mut rec = Recovered::default();
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len() + 1);
        let mut stop: Option<Stop> = None;
        // Length of the last segment's file as found (before any cut), and the end of its last
        // non-zero byte: the tail window is measured back from there.
        let mut last_file_len = 0;
        let mut last_data_end = 0;
        let segment_count = bases.len();
        if segment_count > SEGMENTS_MAX {
            return Err(StorageError::Config(format!(
                "{} holds {segment_count} segments, more than SEGMENTS_MAX ({SEGMENTS_MAX})",
                dir.display()
            )));
        }
        for (i, base) in bases.into_iter().enumerate() {
            let path = dir.join(segment_name(base));
            let is_last = i + 1 == segment_count;
            if let Some(prev) = segments.last() {
                let expected_base = prev.base + prev.len;
                if base != expected_base {
                    let reason = Corruption::SegmentGap { expected_base };
                    stop = Some(Stop {
                        path,
                        offset: 0,
                        kind: StopKind::Hard(reason),
                    });
                    break;
                }
            }
            // Read+write even when sealed: a purge (or its completion below) may rewrite a record
            // in any segment.
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .buffered_open(&path)
                .await
                .map_err(io_err("open segment", &path))?;
            // Before reading (and maybe repairing or truncating) what another process may still
            // write.
            lock_segment(&file, &path).await?;
            let file_len = file
                .file_size()
                .await
                .map_err(io_err("stat segment", &path))?;
            if file_len > u32::MAX as u64 {
                let reason = Corruption::SegmentTooLarge { len: file_len };
                stop = Some(Stop {
                    path,
                    offset: 0,
                    kind: StopKind::Hard(reason),
                });
                break;
            }
            // An unfinished append wrote nothing past this (a preallocated segment is zeros there).
            let data_end = data_end(&file, &path, file_len).await?;
            let seg = SegmentScan {
                index: i,
                tail_start: if is_last {
                    data_end.saturating_sub(window)
                } else {
                    u64::MAX
                },
                last_len: is_last.then_some(data_end),
            };
            let end = scan_segment(&file, &path, file_len, data_end, |item, offset, len| {
                rec.on_item(&seg, item, offset, len)
            })
            .await?;
            if is_last {
                last_file_len = file_len;
                last_data_end = data_end;
            }
            segments.push(Segment {
                path: path.clone(),
                base,
                len: end.good_len,
                preallocated: file_len >= cfg.segment_bytes_max,
                file: Rc::new(file),
            });
            if let Some(damage) = end.damage {
                let kind = match damage {
                    ScanDamage::Bytes(damage) => StopKind::Bytes {
                        damage,
                        bytes_after_if_last: is_last
                            .then_some(data_end.saturating_sub(end.good_len)),
                    },
                    ScanDamage::Record(reason) => StopKind::Hard(reason),
                };
                stop = Some(Stop {
                    path,
                    offset: end.good_len,
                    kind,
                });
                break;
            }
        }

        // Judge the suspects (records that failed their CRC but may be torn purges): its own
        // `content_kind` byte (phase 1 of a purge) or a later `Deleted` event vouches for one; an
        // unvouched one is a torn append if it lies in the tail window, else damage to
        // acknowledged data. Suspects all precede `stop`.
        let (keep, cut) = rec.settle();
        if let Some(k) = rec.first_unvouched(keep) {
            let s = &rec.suspects[k];
            let reason = match s.bytes_after_if_last {
                Some(bytes_after) => Corruption::DamageBeforeTail { bytes_after },
                None => Corruption::Record(s.error.clone()),
            };
            return Err(StorageError::Corrupt {
                segment: segments[s.segment].path.clone(),
                offset: s.offset,
                reason,
            });
        }
        if let Some(k) = cut {
            // Whatever stopped the scan lies after the cut and goes with it.
            let (offset, error) = (rec.suspects[k].offset, rec.suspects[k].error.clone());
            rec.cut(keep);
            let last = segments
                .last_mut()
                .expect("a tail suspect lies in the last segment");
            let bytes = cut_tail(last, offset, last_file_len, last_data_end).await?;
            report.truncation = Some(Truncation {
                segment: last.path.clone(),
                offset,
                bytes,
                reason: TailDamage::Invalid(error),
            });
        } else if let Some(stop) = stop {
            let (damage, bytes_after) = match stop.kind {
                StopKind::Hard(reason) => {
                    return Err(StorageError::Corrupt {
                        segment: stop.path,
                        offset: stop.offset,
                        reason,
                    })
                }
                StopKind::Bytes {
                    damage,
                    bytes_after_if_last,
                } => (damage, bytes_after_if_last),
            };
            let corrupt = |reason| StorageError::Corrupt {
                segment: stop.path.clone(),
                offset: stop.offset,
                reason,
            };
            match (bytes_after, damage) {
                (Some(bytes_after), damage) if bytes_after <= window => {
                    let last = segments.last_mut().expect("the last segment was scanned");
                    let bytes = cut_tail(last, stop.offset, last_file_len, last_data_end).await?;
                    report.truncation = Some(Truncation {
                        segment: last.path.clone(),
                        offset: stop.offset,
                        bytes,
                        reason: damage,
                    });
                }
                (_, TailDamage::NonZeroAfterEnd { data_end }) => {
                    return Err(corrupt(Corruption::NonZeroAfterEnd { data_end }))
                }
                (Some(bytes_after), _) => {
                    return Err(corrupt(Corruption::DamageBeforeTail { bytes_after }))
                }
                (None, TailDamage::Incomplete) => return Err(corrupt(Corruption::Incomplete)),
                (None, TailDamage::Invalid(e)) => return Err(corrupt(Corruption::Record(e))),
            }
        }

        // Complete the torn purges every remaining suspect is (each is marked or has its `Deleted`
        // event): write the tombstone the purge was writing, then one fdatasync per file touched.
        let mut touched: Vec<usize> = Vec::new();
        for s in &rec.suspects {
            let seg = &segments[s.segment];
            write_all_at(&seg.file, &seg.path, &s.tombstone, s.offset).await?;
            if !touched.contains(&s.segment) {
                touched.push(s.segment);
            }
            report.purges_completed.push(CompletedPurge {
                segment: seg.path.clone(),
                offset: s.offset,
                chat: s.chat,
                seq: s.seq,
                damage: s.error.clone(),
                evidence: s.evidence(),
            });
        }
        for i in touched {
            let seg = &segments[i];
            seg.file
                .fdatasync()
                .await
                .map_err(io_err("fdatasync segment", &seg.path))?;
        }

        if segments.is_empty() {
            let path = dir.join(segment_name(0));
            let file = create_segment(&dir_handle, &path).await?;
            // Grows like without preallocation: a fresh server writes nothing extra at start.
            segments.push(Segment {
                path,
                base: 0,
                len: 0,
                preallocated: false,
                file: Rc::new(file),
            });
        }
        let Recovered { records, index, .. } = rec;
        report.segments = segments.len();
        report.records = records.len();
        // Every byte of a segment up to its length is a recovered record.
        report.bytes = segments.iter().map(|s| s.len).sum();

        let store = EmbeddedStore {
            dir: dir.to_path_buf(),
            dir_handle,
            cfg,
            inner: RefCell::new(Inner {
                index_entries: index.values().map(|v| v.len() as u64).sum(),
                index_capacity: index.values().map(|v| v.capacity() as u64).sum(),
                segments,
                index,
            }),
            appending: Cell::new(false),
            poisoned: Cell::new(false),
            purging: Cell::new(false),
            purge_writing: Cell::new(false),
            purge_generation: Cell::new(0),
            spare: Rc::new(Spare {
                state: Cell::new(spare_state),
                failures: Cell::new(0),
            }),
            spare_task: RefCell::new(None),
            report,
        };
        store.maybe_prepare_spare();
        Ok((store, records))
    }

    /// What `open` recovered and repaired.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.report
    }

    /// The shard directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// Highest durable seq of `chat` (0 if none or unknown chat).
    pub fn durable_seq(&self, chat: ChatId) -> Seq {
        Seq(self
            .inner
            .borrow()
            .index
            .get(&chat)
            .map_or(0, |v| v.len() as u64))
    }

    /// The size of the in-memory index: it grows by one [`Location`] per durable message and
    /// nothing ever removes one (there is no retention yet), so it bounds how much history a
    /// shard can hold in a given memory.
    pub fn index_memory(&self) -> IndexMemory {
        let inner = self.inner.borrow();
        let slot = std::mem::size_of::<(ChatId, Vec<PackedLocation>)>() as u64 + 1;
        IndexMemory {
            chats: inner.index.len() as u64,
            messages: inner.index_entries,
            bytes: inner.index_capacity * std::mem::size_of::<PackedLocation>() as u64
                + inner.index.capacity() as u64 * slot,
        }
    }

    /// Whether a `ChatCreated` for `chat` is durable.
    pub fn has_chat(&self, chat: ChatId) -> bool {
        self.inner.borrow().index.contains_key(&chat)
    }

    /// Where message `seq` of `chat` lives, if durable.
    pub fn location(&self, chat: ChatId, seq: Seq) -> Option<Location> {
        let inner = self.inner.borrow();
        let i = usize::try_from(seq.0.checked_sub(1)?).ok()?;
        inner.index.get(&chat)?.get(i).map(|l| l.get())
    }

    /// Segment files, oldest first.
    pub fn segment_paths(&self) -> Vec<PathBuf> {
        self.inner
            .borrow()
            .segments
            .iter()
            .map(|s| s.path.clone())
            .collect()
    }

    /// Global log offset after the last durable byte.
    pub fn end_offset(&self) -> u64 {
        let inner = self.inner.borrow();
        inner.segments.last().map_or(0, |s| s.base + s.len)
    }

    /// Whether an earlier append failed, so appends are refused until a reopen.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.get()
    }

    /// Makes `records` durable as one group commit: validate all, encode into one buffer, one
    /// positional write at the end of the active segment (a new segment first if the write would
    /// take it past `segment_bytes_max`), one `fdatasync`, then publish message locations to
    /// readers. A batch larger than [`StoreConfig::sync_round_bytes_max`] is written in several
    /// such rounds, in order. Returns `Ok` only when every record is durable.
    ///
    /// Validation errors (`TooLarge`, `InvalidRecord`, `SeqGap`, `UnknownChat`) write nothing.
    /// Any I/O failure, or dropping the future after writing started, poisons the store (earlier
    /// rounds of the batch may be durable; the batch was not acknowledged, so that is allowed).
    ///
    /// # Panics
    /// If another `append` is in flight: the engine has one committer task per shard.
    pub async fn append(&self, records: &[Record]) -> Result<AppendStats, StorageError> {
        if self.poisoned.get() {
            return Err(StorageError::Poisoned);
        }
        assert!(!self.appending.get(), "concurrent EmbeddedStore::append");
        if records.is_empty() {
            return Ok(AppendStats::default());
        }
        let bytes = self.check_batch(records)?;

        let guard = AppendGuard {
            store: self,
            finished: false,
        };
        self.appending.set(true);
        let round_bytes_max = self.cfg.sync_round_bytes_max();
        let mut stats = AppendStats {
            records: records.len(),
            bytes,
            ..AppendStats::default()
        };
        let mut start = 0;
        while start < records.len() {
            // Whole records up to the round limit; one record always fits (config validation).
            let mut end = start;
            let mut round_bytes = 0;
            while let Some(r) = records.get(end) {
                if end > start && round_bytes + r.encoded_len() > round_bytes_max {
                    break;
                }
                round_bytes += r.encoded_len();
                end += 1;
            }
            let (sync_us, rolled) = self.write_round(&records[start..end], round_bytes).await?;
            stats.sync_us += sync_us;
            stats.syncs += 1;
            stats.segment_rolled |= rolled;
            start = end;
        }
        guard.finish();
        Ok(stats)
    }

    /// One round of `append`: encode, maybe roll, write, `fdatasync`, publish. Returns the
    /// `fdatasync` time and whether a segment was started.
    async fn write_round(
        &self,
        records: &[Record],
        bytes: usize,
    ) -> Result<(u64, bool), StorageError> {
        let mut buf = Vec::with_capacity(bytes);
        // (chat, offset in buf, frame len) of each message, in order.
        let mut messages = Vec::new();
        // Chats whose index entry this round creates.
        let mut created = Vec::new();
        for r in records {
            let at = buf.len();
            r.encode_into(&mut buf);
            let len = buf.len() - at;
            debug_assert!(
                matches!(decode_one(&buf[at..]), Ok(Some((_, n))) if n == len),
                "encoded record does not decode"
            );
            match r {
                Record::Message(m) => messages.push((m.chat, at, len)),
                Record::ChatCreated { chat, .. } => created.push(*chat),
                Record::Cursor { .. }
                | Record::Block { .. }
                | Record::UserMeta { .. }
                | Record::Account(_)
                | Record::MediaGrant { .. } => {}
            }
        }
        assert_eq!(buf.len(), bytes);

        let (mut file, mut path, mut pos, mut segment, preallocated) = {
            let inner = self.inner.borrow();
            let active = inner
                .segments
                .last()
                .expect("a store always has an active segment");
            (
                active.file.clone(),
                active.path.clone(),
                active.len,
                inner.segments.len() - 1,
                active.preallocated,
            )
        };
        let mut rolled = false;
        if pos == 0 && !preallocated && self.spare.state.get() == SpareState::Ready {
            // An empty growing segment (a fresh shard's first, after `prepare_spare`): put the
            // spare in its place. Nothing refers to it: it holds no record.
            let new_file = Rc::new(self.adopt_spare(&path).await?);
            let mut inner = self.inner.borrow_mut();
            let active = &mut inner.segments[segment];
            active.file = new_file.clone();
            active.preallocated = true;
            file = new_file;
        } else if pos > 0 && pos + bytes as u64 > self.cfg.segment_bytes_max {
            if segment + 1 >= SEGMENTS_MAX {
                return Err(StorageError::Io {
                    op: "roll segment",
                    path,
                    source: std::io::Error::new(
                        std::io::ErrorKind::StorageFull,
                        format!("the shard holds SEGMENTS_MAX ({SEGMENTS_MAX}) segments"),
                    ),
                });
            }
            let base = {
                let inner = self.inner.borrow();
                let active = &inner.segments[segment];
                active.base + active.len
            };
            let new_path = self.dir.join(segment_name(base));
            // The spare if it is ready; the commit path never waits for zero-filling.
            let preallocated = self.spare.state.get() == SpareState::Ready;
            let new_file = Rc::new(if preallocated {
                self.adopt_spare(&new_path).await?
            } else {
                create_segment(&self.dir_handle, &new_path).await?
            });
            self.inner.borrow_mut().segments.push(Segment {
                path: new_path.clone(),
                base,
                len: 0,
                preallocated,
                file: new_file.clone(),
            });
            (file, path, pos, segment) = (new_file, new_path, 0, segment + 1);
            rolled = true;
        }

        let mut written = file
            .write_at(buf, pos)
            .await
            .map_err(io_err("write segment", &path))?;
        while written < bytes {
            // A short write (rare: e.g. disk full). The buffer went to the kernel, so encode the
            // round again (it is deterministic) and write the rest.
            let mut again = Vec::with_capacity(bytes);
            for r in records {
                r.encode_into(&mut again);
            }
            let rest = again.split_off(written);
            let n = file
                .write_at(rest, pos + written as u64)
                .await
                .map_err(io_err("write segment", &path))?;
            if n == 0 {
                return Err(StorageError::Io {
                    op: "write segment",
                    path,
                    source: std::io::ErrorKind::WriteZero.into(),
                });
            }
            written += n;
        }
        let sync_start = Instant::now();
        file.fdatasync()
            .await
            .map_err(io_err("fdatasync segment", &path))?;
        let sync_us = sync_start.elapsed().as_micros() as u64;

        {
            let mut inner = self.inner.borrow_mut();
            let Inner {
                segments,
                index,
                index_entries,
                index_capacity,
            } = &mut *inner;
            segments[segment].len = pos + bytes as u64;
            for chat in created {
                index.entry(chat).or_default();
            }
            for (chat, at, len) in messages {
                let loc = Location {
                    segment: segment as u32,
                    offset: (pos + at as u64) as u32,
                    len: len as u32,
                };
                let locs = index
                    .get_mut(&chat)
                    .expect("checked by check_batch, created in this or an earlier round");
                let capacity = locs.capacity();
                push_location(locs, PackedLocation::new(loc));
                *index_entries += 1;
                *index_capacity += (locs.capacity() - capacity) as u64;
            }
        }
        self.maybe_prepare_spare();
        Ok((sync_us, rolled))
    }

    /// Renames the ready spare to `path` (replacing an empty segment there, if any), opens and
    /// locks it, and makes the directory durable before any record goes into it.
    async fn adopt_spare(&self, path: &Path) -> Result<BufferedFile, StorageError> {
        debug_assert_eq!(self.spare.state.get(), SpareState::Ready);
        self.spare.state.set(SpareState::Absent);
        glommio::io::rename(self.dir.join(SPARE_NAME), path)
            .await
            .map_err(io_err("rename spare to segment", path))?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .buffered_open(path)
            .await
            .map_err(io_err("open segment", path))?;
        lock_segment(&file, path).await?;
        self.dir_handle
            .sync()
            .await
            .map_err(io_err("fdatasync directory", path))?;
        Ok(file)
    }

    /// Starts filling a spare in the background once the active segment is half full, so it is
    /// ready by the roll (with `preallocate_segments`, unless fills keep failing).
    fn maybe_prepare_spare(&self) {
        if !self.cfg.preallocate_segments
            || self.spare.state.get() != SpareState::Absent
            || self.spare.failures.get() >= SPARE_FAILURES_MAX
        {
            return;
        }
        let half_full = self
            .inner
            .borrow()
            .segments
            .last()
            .is_some_and(|s| s.len.saturating_mul(2) >= self.cfg.segment_bytes_max);
        if half_full {
            self.start_spare();
        }
    }

    fn start_spare(&self) {
        self.spare.state.set(SpareState::Filling);
        let task = glommio::spawn_local(fill_spare(
            self.dir.clone(),
            self.cfg.segment_bytes_max,
            self.spare.clone(),
        ));
        // Replaces a finished task, if any; a running one cannot exist (the state was Absent).
        *self.spare_task.borrow_mut() = Some(task);
    }

    /// Makes sure a preallocated spare segment is ready, filling one now if needed, and waits
    /// for it. The next roll uses it, or the next append if the active segment is empty and
    /// growing (a fresh shard's first segment). Benchmarks and tests call this to get a
    /// preallocated segment at once; the engine relies on the background fill alone.
    ///
    /// A no-op without `preallocate_segments`. Fails with the fill's error.
    pub async fn prepare_spare(&self) -> Result<(), StorageError> {
        if !self.cfg.preallocate_segments {
            return Ok(());
        }
        loop {
            match self.spare.state.get() {
                SpareState::Ready => return Ok(()),
                SpareState::Absent => self.start_spare(),
                SpareState::Filling => {}
            }
            let task = self.spare_task.borrow_mut().take();
            match task {
                Some(task) => task.await?,
                // Another caller is waiting for the same fill.
                None => glommio::timer::sleep(std::time::Duration::from_millis(1)).await,
            }
        }
    }

    /// Whether a complete spare segment is waiting for the next roll.
    pub fn spare_ready(&self) -> bool {
        self.spare.state.get() == SpareState::Ready
    }

    /// Whether the active segment (the one appends go to) was preallocated.
    pub fn active_preallocated(&self) -> bool {
        self.inner
            .borrow()
            .segments
            .last()
            .is_some_and(|s| s.preallocated)
    }

    /// Validates a batch against the limits and the durable state; returns its encoded size.
    fn check_batch(&self, records: &[Record]) -> Result<usize, StorageError> {
        let inner = self.inner.borrow();
        // Next expected seq of chats touched by this batch.
        let mut next: HashMap<ChatId, u64> = HashMap::new();
        let mut bytes = 0usize;
        for r in records {
            r.validate().map_err(|e| match e {
                RecordError::PayloadTooLarge { len } => StorageError::TooLarge {
                    what: "message payload bytes",
                    len,
                    max: PAYLOAD_BYTES_MAX,
                },
                RecordError::TooManyMembers { len } => StorageError::TooLarge {
                    what: "chat members",
                    len,
                    max: CHAT_MEMBERS_MAX,
                },
                e => StorageError::InvalidRecord(e),
            })?;
            bytes += r.encoded_len();
            match r {
                Record::ChatCreated { chat, .. } => {
                    if !inner.index.contains_key(chat) {
                        next.entry(*chat).or_insert(1);
                    }
                }
                Record::Message(m) => {
                    let expected = match next.get(&m.chat) {
                        Some(n) => *n,
                        None => match inner.index.get(&m.chat) {
                            Some(locs) => locs.len() as u64 + 1,
                            None => return Err(StorageError::UnknownChat(m.chat)),
                        },
                    };
                    if m.seq.0 != expected {
                        return Err(StorageError::SeqGap {
                            chat: m.chat,
                            expected: Seq(expected),
                            got: m.seq,
                        });
                    }
                    next.insert(m.chat, expected + 1);
                }
                Record::Cursor { .. }
                | Record::Block { .. }
                | Record::UserMeta { .. }
                | Record::Account(_)
                | Record::MediaGrant { .. } => {}
            }
        }
        Ok(bytes)
    }

    /// Durable messages of `chat` with `from <= seq <= to_inclusive`, ascending, at most
    /// `min(limit, READ_MESSAGES_MAX)`. Unknown chats and empty ranges give an empty vector.
    pub async fn read_messages(
        &self,
        chat: ChatId,
        from: Seq,
        to_inclusive: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let first = from.0.max(1);
        let last = to_inclusive.0.min(self.durable_seq(chat).0);
        if first > last || limit == 0 {
            return Ok(Vec::new());
        }
        let n = (last - first + 1).min(limit.min(READ_MESSAGES_MAX) as u64);
        self.read_range(chat, first, first + n - 1).await
    }

    /// A history page: durable messages of `chat` with `seq < before` (`before == 0`, or beyond
    /// the newest: start from the newest), newest first. Stops at `min(limit,
    /// READ_MESSAGES_MAX)` messages or before the payload total would exceed `bytes_max`; the
    /// first message is always included. The flag is true when older messages remain.
    pub async fn read_messages_before(
        &self,
        chat: ChatId,
        before: Seq,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<StoredMessage>, bool), StorageError> {
        let (lowest, highest) = {
            let inner = self.inner.borrow();
            let Some(locs) = inner.index.get(&chat) else {
                return Ok((Vec::new(), false));
            };
            let durable = locs.len() as u64;
            let upper = if before.0 == 0 || before.0 > durable {
                durable + 1
            } else {
                before.0
            };
            if upper <= 1 {
                return Ok((Vec::new(), false));
            }
            let highest = upper - 1;
            let count_max = limit.min(READ_MESSAGES_MAX);
            let mut lowest = highest + 1;
            let mut payload_bytes = 0usize;
            let mut count = 0usize;
            while lowest > 1 && count < count_max {
                let loc = locs[(lowest - 2) as usize].get();
                let payload = (loc.len as usize).saturating_sub(MESSAGE_FRAME_OVERHEAD_BYTES);
                if count > 0 && payload_bytes + payload > bytes_max {
                    break;
                }
                payload_bytes += payload;
                count += 1;
                lowest -= 1;
            }
            (lowest, highest)
        };
        if lowest > highest {
            // limit == 0
            return Ok((Vec::new(), true));
        }
        let mut page = self.read_range(chat, lowest, highest).await?;
        page.reverse();
        Ok((page, lowest > 1))
    }

    /// Reads durable seqs `first..=last` (all must be durable), coalescing adjacent records. A
    /// CRC failure while a purge was rewriting records may be a half-rewritten record seen
    /// mid-write, not damage: it is retried once the purge's writes are done.
    async fn read_range(
        &self,
        chat: ChatId,
        first: u64,
        last: u64,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        let mut retries = 0;
        loop {
            let generation = self.purge_generation.get();
            let result = self.read_range_once(chat, first, last).await;
            let raced = self.purge_writing.get() || self.purge_generation.get() != generation;
            match result {
                Err(StorageError::Corrupt {
                    reason: Corruption::Record(_),
                    ..
                }) if raced && retries < READ_PURGE_RETRIES_MAX => {
                    retries += 1;
                    while self.purge_writing.get() {
                        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
                    }
                }
                result => return result,
            }
        }
    }

    /// One attempt of [`EmbeddedStore::read_range`].
    async fn read_range_once(
        &self,
        chat: ChatId,
        first: u64,
        last: u64,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        // Plan the reads without holding the borrow across an await: runs of adjacent records
        // in one segment, each read with one request.
        struct Run {
            file: Rc<BufferedFile>,
            path: PathBuf,
            offset: u64,
            len: usize,
            /// (seq, offset inside the run, frame len)
            records: Vec<(u64, usize, usize)>,
        }
        let runs = {
            let inner = self.inner.borrow();
            let locs = &inner.index[&chat];
            let mut runs: Vec<Run> = Vec::new();
            for seq in first..=last {
                let loc = locs[(seq - 1) as usize].get();
                let len = loc.len as usize;
                if let Some(run) = runs.last_mut() {
                    let same = Rc::ptr_eq(&run.file, &inner.segments[loc.segment as usize].file);
                    let adjacent = run.offset + run.len as u64 == loc.offset as u64;
                    if same && adjacent && run.len + len <= READ_COALESCE_BYTES_MAX {
                        run.records.push((seq, run.len, len));
                        run.len += len;
                        continue;
                    }
                }
                let seg = &inner.segments[loc.segment as usize];
                runs.push(Run {
                    file: seg.file.clone(),
                    path: seg.path.clone(),
                    offset: loc.offset as u64,
                    len,
                    records: vec![(seq, 0, len)],
                });
            }
            runs
        };

        let mut out = Vec::with_capacity((last - first + 1) as usize);
        for run in runs {
            let bytes = read_exact_at(&run.file, &run.path, run.offset, run.len).await?;
            for (seq, at, len) in run.records {
                let offset = run.offset + at as u64;
                let corrupt = |reason| StorageError::Corrupt {
                    segment: run.path.clone(),
                    offset,
                    reason,
                };
                match decode_one(&bytes[at..at + len]) {
                    Ok(Some((Record::Message(m), n)))
                        if n == len && m.chat == chat && m.seq.0 == seq =>
                    {
                        out.push(m)
                    }
                    Ok(Some(_)) => {
                        return Err(corrupt(Corruption::IndexMismatch {
                            chat,
                            seq: Seq(seq),
                        }))
                    }
                    Ok(None) => return Err(corrupt(Corruption::Incomplete)),
                    Err(e) => return Err(corrupt(Corruption::Record(e))),
                }
            }
        }
        Ok(out)
    }

    /// Purges ("delete for everyone") the content of messages `seqs` of `chat`: overwrites each
    /// stored record in place with its tombstone (same length and fields, `content_kind`
    /// [`CONTENT_KIND_DELETED`], all-zero payload of the old length, CRC recomputed). Two phases
    /// (see the module docs): first only each record's `content_kind` byte, then one `fdatasync`
    /// per segment file touched; then each whole tombstone, then again one `fdatasync` per file.
    /// Returns `Ok` once every tombstone is durable. Seqs may come in any order and repeat; a
    /// record that already is a tombstone is left alone, so a repeated purge is a no-op
    /// (`already_purged`, no write, no `fdatasync`). Index entries do not change: readers see the
    /// tombstone at the same seq.
    ///
    /// If the process dies part-way, a record may be left marked (phase 1) or half-rewritten
    /// (phase 2). Either way its `content_kind` byte on disk already is `CONTENT_KIND_DELETED`,
    /// and `open` completes its purge whether or not any event names it: a deleted message, the
    /// `Edited` events that carried its newer content, a reaction. A crash during phase 1, before
    /// its `fdatasync`, leaves each record old and whole or marked. The chat's `Deleted` event
    /// should still be durable before this is called, so that content never disappears without
    /// the event that explains it.
    ///
    /// Errors, with nothing written: more than [`PURGE_SEQS_MAX`] seqs (`TooLarge`), an unknown
    /// chat (`UnknownChat`), a seq that is 0 or not durable (`UnknownSeq`), a record that may not
    /// be purged (`NotPurgeable`: chat events other than `Edited` and `Reacted`), a record that
    /// fails to read back (`Corrupt`, `Io`). An I/O error while writing leaves the records old,
    /// marked or half-rewritten; the next `open` completes every marked one, so the caller should
    /// stop and reopen (the store is not poisoned: appends do not touch them).
    ///
    /// May run while an `append` is in flight (an append writes only past the durable end, a
    /// purge only rewrites complete durable records) and while reads are in flight (a read that
    /// sees a half-rewritten record retries).
    ///
    /// # Panics
    /// If another `purge` is in flight: the engine runs purges from its committer task.
    pub async fn purge(&self, chat: ChatId, seqs: &[Seq]) -> Result<PurgeStats, StorageError> {
        if seqs.len() > PURGE_SEQS_MAX {
            return Err(StorageError::TooLarge {
                what: "purge seqs",
                len: seqs.len(),
                max: PURGE_SEQS_MAX,
            });
        }
        assert!(!self.purging.get(), "concurrent EmbeddedStore::purge");
        let mut wanted = seqs.to_vec();
        wanted.sort_unstable();
        wanted.dedup();

        // Plan without holding the borrow across an await.
        let targets = {
            let inner = self.inner.borrow();
            let locs = inner
                .index
                .get(&chat)
                .ok_or(StorageError::UnknownChat(chat))?;
            let mut targets = Vec::with_capacity(wanted.len());
            for seq in wanted {
                let loc = seq
                    .0
                    .checked_sub(1)
                    .and_then(|i| usize::try_from(i).ok())
                    .and_then(|i| locs.get(i))
                    .ok_or(StorageError::UnknownSeq { chat, seq })?
                    .get();
                let seg = &inner.segments[loc.segment as usize];
                targets.push(PurgeTarget {
                    seq,
                    segment: loc.segment,
                    file: seg.file.clone(),
                    path: seg.path.clone(),
                    offset: loc.offset as u64,
                    len: loc.len as usize,
                });
            }
            targets
        };

        self.purging.set(true);
        let _purging = PurgeGuard(self);
        let mut stats = PurgeStats::default();
        // Read and check every record before writing any, so a refused purge writes nothing.
        let mut writes: Vec<(&PurgeTarget, Vec<u8>)> = Vec::new();
        for t in &targets {
            let bytes = read_exact_at(&t.file, &t.path, t.offset, t.len).await?;
            let corrupt = |reason| StorageError::Corrupt {
                segment: t.path.clone(),
                offset: t.offset,
                reason,
            };
            let m = match decode_one(&bytes) {
                Ok(Some((Record::Message(m), n)))
                    if n == t.len && m.chat == chat && m.seq == t.seq =>
                {
                    m
                }
                Ok(Some(_)) => return Err(corrupt(Corruption::IndexMismatch { chat, seq: t.seq })),
                Ok(None) => return Err(corrupt(Corruption::Incomplete)),
                Err(e) => return Err(corrupt(Corruption::Record(e))),
            };
            if is_tombstone(&m) {
                stats.already_purged += 1;
                continue;
            }
            if let Some(why) = purge_refusal(&m) {
                return Err(StorageError::NotPurgeable {
                    chat,
                    seq: t.seq,
                    why,
                });
            }
            // A valid message stays one with another content kind and other payload bytes.
            let (tombstone, _) =
                tombstone_of(&bytes).expect("the tombstone of a valid message is valid");
            writes.push((t, tombstone));
        }
        if writes.is_empty() {
            return Ok(stats);
        }

        // Readers racing these writes may see a record marked or half-rewritten; they retry.
        let writing = PurgeWrites::start(self);
        // Phase 1: mark every record, one byte each (a write that cannot tear), and make the
        // marks durable before any other byte changes. From here on, whatever phase 2 leaves of
        // a record identifies itself as a torn purge.
        for (t, _) in &writes {
            let at = t.offset + (RECORD_HEADER_BYTES + MESSAGE_CONTENT_KIND_AT) as u64;
            write_all_at(&t.file, &t.path, &[CONTENT_KIND_DELETED], at).await?;
        }
        Self::sync_purged(&writes, &mut stats).await?;
        // Phase 2: the whole tombstones (their `content_kind` byte is the one already written).
        for (t, tombstone) in &writes {
            debug_assert_eq!(
                tombstone[RECORD_HEADER_BYTES + MESSAGE_CONTENT_KIND_AT],
                CONTENT_KIND_DELETED
            );
            write_all_at(&t.file, &t.path, tombstone, t.offset).await?;
            stats.purged += 1;
            stats.bytes += tombstone.len();
        }
        // The writes returned: the new bytes are in the page cache, whole.
        drop(writing);
        Self::sync_purged(&writes, &mut stats).await?;
        Ok(stats)
    }

    /// One `fdatasync` per segment file among `writes`, counted in `stats`.
    async fn sync_purged(
        writes: &[(&PurgeTarget, Vec<u8>)],
        stats: &mut PurgeStats,
    ) -> Result<(), StorageError> {
        let sync_start = Instant::now();
        let mut synced: Vec<u32> = Vec::new();
        for (t, _) in writes {
            if !synced.contains(&t.segment) {
                t.file
                    .fdatasync()
                    .await
                    .map_err(io_err("fdatasync segment", &t.path))?;
                synced.push(t.segment);
            }
        }
        stats.syncs += synced.len();
        stats.sync_us += sync_start.elapsed().as_micros() as u64;
        Ok(())
    }

    /// Closes every file. Dropping the store also releases them, a little later.
    pub async fn close(self) -> Result<(), StorageError> {
        // Cancels an unfinished spare fill; the next `open` removes its file.
        drop(self.spare_task.into_inner());
        let inner = self.inner.into_inner();
        for seg in inner.segments {
            if let Ok(file) = Rc::try_unwrap(seg.file) {
                file.close()
                    .await
                    .map_err(io_err("close segment", &seg.path))?;
            }
        }
        self.dir_handle
            .close()
            .await
            .map_err(io_err("close directory", &self.dir))?;
        Ok(())
    }
}

/// Cuts the torn tail of the last segment at `offset` and makes the cut durable: a growing
/// segment is truncated (of `file_len` bytes), a preallocated one keeps its size and gets zeros
/// up to `data_end` (its last non-zero byte), so it stays free of metadata updates. Returns the
/// bytes removed or zeroed.
async fn cut_tail(
    seg: &mut Segment,
    offset: u64,
    file_len: u64,
    data_end: u64,
) -> Result<u64, StorageError> {
    let bytes = if seg.preallocated {
        write_zeros(&seg.file, &seg.path, offset, data_end).await?;
        data_end.saturating_sub(offset)
    } else {
        seg.file
            .truncate(offset)
            .await
            .map_err(io_err("truncate segment", &seg.path))?;
        file_len - offset
    };
    seg.file
        .fdatasync()
        .await
        .map_err(io_err("fdatasync segment", &seg.path))?;
    seg.len = offset;
    Ok(bytes)
}

/// Writes zeros over `from..to` of `file`, in requests of at most `ZERO_CHUNK_BYTES`.
async fn write_zeros(
    file: &BufferedFile,
    path: &Path,
    from: u64,
    to: u64,
) -> Result<(), StorageError> {
    let mut pos = from;
    while pos < to {
        let n = ZERO_CHUNK_BYTES.min((to - pos) as usize);
        // A zeroed allocation (calloc) costs nothing until the kernel copies it.
        let written = file
            .write_at(vec![0u8; n], pos)
            .await
            .map_err(io_err("write zeros", path))?;
        if written == 0 {
            return Err(StorageError::Io {
                op: "write zeros",
                path: path.to_path_buf(),
                source: std::io::ErrorKind::WriteZero.into(),
            });
        }
        pos += written as u64;
        glommio::yield_if_needed().await;
    }
    Ok(())
}

/// At `open`: removes a spare whose fill a crash interrupted (`SPARE_TMP_NAME`), and a complete
/// one that does not fit the configuration (another segment size, or preallocation off). A
/// complete one that fits is kept for the next roll. Blocking calls: start-up only.
fn clean_spare(dir: &Path, cfg: &StoreConfig) -> Result<SpareState, StorageError> {
    let tmp = dir.join(SPARE_TMP_NAME);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove unfinished spare", &tmp)(e)),
    }
    let spare = dir.join(SPARE_NAME);
    match std::fs::metadata(&spare) {
        Ok(m) if cfg.preallocate_segments && m.is_file() && m.len() == cfg.segment_bytes_max => {
            Ok(SpareState::Ready)
        }
        Ok(_) => {
            std::fs::remove_file(&spare).map_err(io_err("remove spare", &spare))?;
            Ok(SpareState::Absent)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SpareState::Absent),
        Err(e) => Err(io_err("stat spare", &spare)(e)),
    }
}

/// Resets the spare to `Absent` if its fill ends before it is `Ready` (an error, or the task
/// cancelled by dropping it).
struct FillGuard(Rc<Spare>);

impl Drop for FillGuard {
    fn drop(&mut self) {
        if self.0.state.get() == SpareState::Filling {
            self.0.state.set(SpareState::Absent);
        }
    }
}

/// The spare-filling task: writes `len` zeros to `SPARE_TMP_NAME` in `dir` (real writes, so the
/// file system allocates and marks written every extent now, not at the first append),
/// `fdatasync`s it and renames it to `SPARE_NAME`. The rename is not made durable here: the roll
/// that adopts the spare renames it again and syncs the directory, and a spare lost to a crash is
/// just filled again.
async fn fill_spare(dir: PathBuf, len: u64, spare: Rc<Spare>) -> Result<(), StorageError> {
    let _guard = FillGuard(spare.clone());
    let tmp = dir.join(SPARE_TMP_NAME);
    let result = async {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .buffered_open(&tmp)
            .await
            .map_err(io_err("create spare", &tmp))?;
        let mut synced = 0;
        while synced < len {
            let to = (synced + SPARE_SYNC_BYTES).min(len);
            write_zeros(&file, &tmp, synced, to).await?;
            file.fdatasync()
                .await
                .map_err(io_err("fdatasync spare", &tmp))?;
            synced = to;
        }
        file.close().await.map_err(io_err("close spare", &tmp))?;
        let ready = dir.join(SPARE_NAME);
        glommio::io::rename(&tmp, &ready)
            .await
            .map_err(io_err("rename spare", &ready))?;
        Ok(())
    }
    .await;
    match &result {
        Ok(()) => spare.state.set(SpareState::Ready),
        Err(_) => {
            spare.failures.set(spare.failures.get() + 1);
            // Best effort: `open` removes it too.
            let _ = glommio::io::remove(&tmp).await;
        }
    }
    result
}

/// Appends to a chat's index vector, growing it by a quarter (at least 4 entries) when full
/// instead of doubling: the index is memory per stored message for as long as the store lives,
/// and doubling leaves a third of it unused on average (12.6 B per message measured against 8),
/// a quarter about a ninth. Still geometric, so a push stays amortised O(1).
fn push_location(locs: &mut Vec<PackedLocation>, loc: PackedLocation) {
    if locs.len() == locs.capacity() {
        locs.reserve_exact((locs.len() / 4).max(4));
    }
    locs.push(loc);
}

/// Adds one recovered record to the index, checking what `append` guarantees.
fn index_record(
    index: &mut HashMap<ChatId, Vec<PackedLocation>>,
    record: &Record,
    loc: Location,
) -> Result<(), Corruption> {
    match record {
        Record::ChatCreated { chat, .. } => {
            index.entry(*chat).or_default();
        }
        Record::Message(m) => {
            let locs = index
                .get_mut(&m.chat)
                .ok_or(Corruption::UnknownChat(m.chat))?;
            let expected = Seq(locs.len() as u64 + 1);
            if m.seq != expected {
                return Err(Corruption::SeqGap {
                    chat: m.chat,
                    expected,
                    got: m.seq,
                });
            }
            push_location(locs, PackedLocation::new(loc));
        }
        Record::Cursor { .. }
        | Record::Block { .. }
        | Record::UserMeta { .. }
        | Record::Account(_)
        | Record::MediaGrant { .. } => {}
    }
    Ok(())
}

/// How long `open` waits for another process to release the active segment.
pub const SEGMENT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Takes an exclusive `flock` on the segment we will append to, waiting up to
/// `SEGMENT_LOCK_WAIT`. Two servers on one data directory would interleave records; and after a
/// `kill -9` the dead process's io_uring writes may still be in flight for a few milliseconds.
/// A flock belongs to the open file description and is released only when its last reference
/// is gone, in-flight io_uring requests included, so holding it means no other writer remains.
async fn lock_segment(file: &BufferedFile, path: &Path) -> Result<(), StorageError> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + SEGMENT_LOCK_WAIT;
    loop {
        // SAFETY: flock on a file descriptor this process owns; it only takes an advisory lock.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(io_err("lock segment", path)(err));
        }
        if std::time::Instant::now() >= deadline {
            return Err(StorageError::Locked {
                path: path.to_path_buf(),
            });
        }
        glommio::timer::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Creates a new, empty segment file (failing if it exists) and makes its directory entry
/// durable.
async fn create_segment(dir: &Directory, path: &Path) -> Result<BufferedFile, StorageError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .buffered_open(path)
        .await
        .map_err(io_err("create segment", path))?;
    lock_segment(&file, path).await?;
    dir.sync()
        .await
        .map_err(io_err("fdatasync directory", path))?;
    Ok(file)
}

/// One record a `purge` rewrites, planned from the index.
struct PurgeTarget {
    seq: Seq,
    segment: u32,
    file: Rc<BufferedFile>,
    path: PathBuf,
    offset: u64,
    len: usize,
}

/// Clears `purging` when a purge ends, however it ends.
struct PurgeGuard<'a>(&'a EmbeddedStore);

impl Drop for PurgeGuard<'_> {
    fn drop(&mut self) {
        self.0.purging.set(false);
    }
}

/// The span in which a purge rewrites records, for readers (see `read_range`): starts on
/// creation, ends on drop, both bumping the purge generation.
struct PurgeWrites<'a>(&'a EmbeddedStore);

impl<'a> PurgeWrites<'a> {
    fn start(store: &'a EmbeddedStore) -> Self {
        store.purge_writing.set(true);
        store.purge_generation.set(store.purge_generation.get() + 1);
        PurgeWrites(store)
    }
}

impl Drop for PurgeWrites<'_> {
    fn drop(&mut self) {
        self.0.purge_writing.set(false);
        self.0
            .purge_generation
            .set(self.0.purge_generation.get() + 1);
    }
}

/// Clears `appending` when an append ends, and poisons the store unless it finished: an error or
/// a dropped future after writing started leaves unknown bytes after the durable prefix.
struct AppendGuard<'a> {
    store: &'a EmbeddedStore,
    finished: bool,
}

impl AppendGuard<'_> {
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for AppendGuard<'_> {
    fn drop(&mut self) {
        self.store.appending.set(false);
        if !self.finished {
            self.store.poisoned.set(true);
        }
    }
}

impl MessageStore for EmbeddedStore {
    async fn append(&self, records: &[Record]) -> Result<AppendStats, StorageError> {
        EmbeddedStore::append(self, records).await
    }

    async fn read_messages(
        &self,
        chat: ChatId,
        from: Seq,
        to_inclusive: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError> {
        EmbeddedStore::read_messages(self, chat, from, to_inclusive, limit).await
    }

    async fn read_messages_before(
        &self,
        chat: ChatId,
        before: Seq,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<StoredMessage>, bool), StorageError> {
        EmbeddedStore::read_messages_before(self, chat, before, limit, bytes_max).await
    }

    async fn purge(&self, chat: ChatId, seqs: &[Seq]) -> Result<PurgeStats, StorageError> {
        EmbeddedStore::purge(self, chat, seqs).await
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn packed_locations_round_trip_at_their_limits() {
        let frame_max = (RECORD_HEADER_BYTES + crate::record::RECORD_BYTES_MAX) as u32;
        for segment in [0, 1, 4097, SEGMENTS_MAX as u32 - 1] {
            for offset in [0, 1, 0x8000_0000, u32::MAX] {
                for len in [0, 1, 100, frame_max, (1 << PACKED_LEN_BITS) - 1] {
                    let loc = Location {
                        segment,
                        offset,
                        len,
                    };
                    assert_eq!(PackedLocation::new(loc).get(), loc);
                }
            }
        }
    }

    #[test]
    fn index_vectors_grow_by_a_quarter() {
        let mut locs = Vec::new();
        let loc = PackedLocation(1);
        let mut grows = 0;
        for n in 1..=100_000usize {
            let cap = locs.capacity();
            push_location(&mut locs, loc);
            if locs.capacity() != cap {
                grows += 1;
                assert!(
                    locs.capacity() <= n + (n - 1) / 4 + 4,
                    "{n}: {}",
                    locs.capacity()
                );
            }
            // Never more than a quarter (plus the first 4) unused.
            assert!(
                locs.capacity() * 4 <= n * 5 + 16,
                "{n}: {}",
                locs.capacity()
            );
        }
        // Geometric: ~log_1.25(100_000 / 4) grows, not one per push.
        assert!(grows < 60, "{grows} grows");
    }

    #[test]
    #[should_panic(expected = "past SEGMENTS_MAX")]
    fn a_segment_past_the_limit_is_never_packed() {
        PackedLocation::new(Location {
            segment: SEGMENTS_MAX as u32,
            offset: 0,
            len: 1,
        });
    }

    use super::*;
    use switchboard_wire::ids::{ClientMsgId, DeviceId, MsgId, UserId};

    fn message(payload: &[u8]) -> StoredMessage {
        StoredMessage {
            chat: ChatId(7),
            seq: Seq(3),
            msg_id: MsgId(99),
            sender_user: UserId(1),
            sender_device: DeviceId(2),
            timestamp_ms: 1_700_000_000_000,
            client_msg_id: ClientMsgId::from_halves(5, 6),
            reply_to: Seq(1),
            content_kind: 1,
            flags: 1,
            payload: payload.to_vec(),
        }
    }

    fn encode(r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        r.encode_into(&mut out);
        out
    }

    #[test]
    fn tombstone_keeps_every_field_but_content() {
        let m = message(b"secret content");
        let frame = encode(&Record::Message(m.clone()));
        let (tombstone, back) = tombstone_of(&frame).unwrap();
        let expected = StoredMessage {
            content_kind: CONTENT_KIND_DELETED,
            payload: vec![0; m.payload.len()],
            ..m
        };
        assert_eq!(back, expected);
        assert_eq!(tombstone, encode(&Record::Message(expected)));
        // A tombstone's tombstone is itself, and a torn frame (bad CRC, half-zeroed payload)
        // gives the same tombstone.
        assert_eq!(tombstone_of(&tombstone).unwrap().0, tombstone);
        let mut torn = frame.clone();
        let end = torn.len();
        torn[end - 5..].fill(0);
        assert!(decode_one(&torn).is_err());
        assert_eq!(tombstone_of(&torn).unwrap().0, tombstone);
    }

    /// Version-1 messages (no flags byte) keep their version and length.
    #[test]
    fn tombstone_of_a_version_1_message() {
        let m = StoredMessage {
            flags: 0,
            ..message(b"old format")
        };
        let mut frame = encode(&Record::Message(m.clone()));
        // Drop the flags byte, set version 1, re-frame.
        frame.remove(RECORD_HEADER_BYTES + MESSAGE_CONTENT_KIND_AT + 1);
        frame[RECORD_HEADER_BYTES + 1] = FORMAT_VERSION;
        let body_len = (frame.len() - RECORD_HEADER_BYTES) as u32;
        frame[..4].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c(&frame[RECORD_HEADER_BYTES..]);
        frame[4..8].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_one(&frame).unwrap().unwrap().0, Record::Message(m));
        let (tombstone, back) = tombstone_of(&frame).unwrap();
        assert_eq!(tombstone.len(), frame.len());
        assert_eq!(tombstone[RECORD_HEADER_BYTES + 1], FORMAT_VERSION);
        assert_eq!(back.content_kind, CONTENT_KIND_DELETED);
        assert_eq!(back.payload, vec![0; 10]);
    }

    #[test]
    fn only_messages_have_tombstones() {
        let created = encode(&Record::ChatCreated {
            chat: ChatId(7),
            kind: crate::ChatKind::Group,
            members: (1..=20).map(UserId).collect(),
            created_ms: 1,
        });
        assert_eq!(tombstone_of(&created), None);
        let cursor = encode(&Record::Cursor {
            chat: ChatId(7),
            user: UserId(1),
            device: DeviceId(1),
            kind: crate::CursorKind::Read,
            seq: Seq(1),
        });
        assert_eq!(tombstone_of(&cursor), None);
        // A message frame whose length fields disagree is not one either.
        let mut frame = encode(&Record::Message(message(b"abc")));
        let plen_at = RECORD_HEADER_BYTES + MESSAGE_PAYLOAD_AT - 4;
        frame[plen_at] = 4;
        assert_eq!(tombstone_of(&frame), None);
        assert_eq!(tombstone_of(&frame[..frame.len() - 1]), None);
        assert_eq!(tombstone_of(&[]), None);
    }
}
