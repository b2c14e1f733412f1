//! Switchboard's durable store: one append-only log per storage shard, group-committed.
//!
//! ```text
//!  engine (one committer task per shard)             engine (any task on the shard's core)
//!        │ stage: ShardState::apply(&record)                  │ read_messages / read_messages_before
//!        │ batch of Records                                    ▼
//!        ▼                                            index: chat → [Location] (seq-1)
//!  EmbeddedStore::append ──encode+crc──► one write ──► one fdatasync ──► index updated ──► Ok
//!        │                                   │                                    │
//!        ▼                                   ▼                                    ▼
//!  ShardState::mark_durable          <data_dir>/shard-<k>/seg-<first offset>.log   acks, delivery
//!                                    (records, then zeros if preallocated; the next segment is
//!                                     zero-filled in the background as seg-next.spare)
//!
//!  start-up: EmbeddedStore::open ──scan, verify CRCs, finish torn purges, cut/zero torn tail──►
//!            Vec<Record> ──► ShardState::recover
//!
//!  delete for everyone: append([.., Deleted event, ..]) ──Ok──► EmbeddedStore::purge(chat, seqs)
//!        ──1: mark each record (content_kind byte only)──► one fdatasync per segment touched
//!        ──2: rewrite each record in place as a tombstone──► one fdatasync per segment touched
//! ```
//!
//! - [`record`]: the on-disk format (pure).
//! - [`state`]: [`ShardState`], the in-memory decision state rebuilt from records (pure).
//! - [`log`]: [`EmbeddedStore`], the glommio (io_uring) file store for one shard directory.
//!
//! A shard is owned by exactly one core and only ever touched from that core's executor, so
//! nothing here is `Send` and nothing takes a lock.
//!
//! **Invariant:** the store never sees protocol frames or sockets; it stores [`Record`]s.
//! **Invariant:** `append` returns `Ok` only after `fdatasync` of every byte it wrote (and of the
//! directory when it created a segment).
//! **Invariant:** after a segment's records come only zeros, except an append that has not
//! returned `Ok` (at most `sync_round_bytes_max` bytes right after them, in the last segment).
//! **Invariant:** records are only ever appended, except that `purge` (and recovery completing a
//! torn purge) rewrites a message's `content_kind`, payload and CRC in place; its length, seq and
//! every other field never change, so index entries stay valid.

pub mod log;
pub mod record;
pub mod state;

use std::fmt;
use std::io;
use std::path::PathBuf;

use switchboard_wire::ids::{ChatId, Seq};

pub use log::{
    AppendStats, CompletedPurge, EmbeddedStore, IndexMemory, Location, PurgeEvidence, PurgeStats,
    RecoveryReport, TailDamage, Truncation, INDEX_ENTRY_BYTES, PURGE_SEQS_MAX, SEGMENTS_MAX,
};
pub use record::{
    decode_one, AccountRecord, ChatKind, CursorKind, Record, RecordError, StoredMessage,
    ACCOUNT_KEYS_BYTES_MAX, ACCOUNT_TEXT_BYTES_MAX, CHAT_MEMBERS_MAX, CONTENT_KIND_DELETED,
    CONTENT_KIND_EVENT, MESSAGE_FLAG_FORWARDED, MESSAGE_FORMAT_VERSION, PAYLOAD_BYTES_MAX,
    RECORD_BYTES_MAX,
};
pub use state::{
    ChatMeta, DedupEntry, DedupWindow, GroupMeta, Membership, ReceiptAuthors, ShardState,
    DEDUP_GENERATIONS, RECEIPT_AUTHORS_MAX,
};

/// Default for [`StoreConfig::segment_bytes_max`]: 64 MiB.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// Default for [`StoreConfig::dedup_entries_max`]: one million per shard.
pub const DEDUP_ENTRIES_MAX_DEFAULT: usize = 1_000_000;
/// Largest accepted [`StoreConfig::dedup_entries_max`]: the dedup window reserves a table for
/// each generation as it starts (~120 B per entry; see [`DedupWindow`]), so the bound must stay
/// sane.
pub const DEDUP_ENTRIES_MAX_LIMIT: usize = 50_000_000;
/// Default for [`StoreConfig::unsynced_bytes_max`]: 16 MiB.
pub const UNSYNCED_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;

/// Configuration of one shard's store. Passed explicitly; check it with [`StoreConfig::validate`]
/// (`EmbeddedStore::open` does).
///
/// | field                | default    | trade-off                                                   |
/// |----------------------|------------|-------------------------------------------------------------|
/// | `segment_bytes_max`  | 64 MiB     | larger: fewer files and fds; smaller: finer future retention |
/// | `dedup_entries_max`  | 1,000,000  | larger: longer retry window; ~120 B per entry, by 1/8 steps  |
/// | `unsynced_bytes_max` | 16 MiB     | larger: fewer fsyncs for huge batches; wider torn-tail window |
/// | `preallocate_segments` | true     | cheaper `fdatasync`; costs a zero-filled spare segment on disk |
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// A segment file is closed and a new one started when the next write would take it past
    /// this size. Default [`SEGMENT_BYTES_MAX_DEFAULT`] (64 MiB). Each segment keeps one file
    /// descriptor open. At least one largest record (`RECORD_BYTES_MAX` + 8 bytes) and at most
    /// `u32::MAX` (index offsets are 32-bit).
    pub segment_bytes_max: u64,
    /// Most `(sender, client_msg_id)` entries the shard's dedup table keeps; the oldest is
    /// evicted first. Default [`DEDUP_ENTRIES_MAX_DEFAULT`] (1,000,000, ~100 MB per shard when
    /// full). A client retry of a message older than the window is stored as a new message (a
    /// visible duplicate), so the window must cover the longest time a client keeps retrying at
    /// the shard's send rate.
    pub dedup_entries_max: usize,
    /// Most bytes the store ever has written but not yet `fdatasync`ed. Default
    /// [`UNSYNCED_BYTES_MAX_DEFAULT`] (16 MiB, e.g. 256 full 64 KiB messages). An `append` whose
    /// batch is larger (or larger than `segment_bytes_max`) is split into several rounds of one
    /// write and one `fdatasync`, still returning `Ok` only when all are durable; typical batches
    /// of small messages take one round. It also bounds torn-tail recovery: damage within the last
    /// `min(unsynced_bytes_max, segment_bytes_max)` bytes of the last segment can only be an
    /// interrupted write and is cut off; damage further back would be acknowledged data and is a
    /// hard error. Lowering it between runs is therefore conservative (may refuse to open),
    /// raising it is safe. At least one largest record.
    pub unsynced_bytes_max: usize,
    /// Whether new segments are preallocated: created at their full `segment_bytes_max`,
    /// zero-filled with real writes and `fdatasync`ed *before* any record goes into them, so
    /// that an append's `fdatasync` only has data to flush (no file size or extent change, hence
    /// no journal commit on ext4/xfs). Default true. The zero-filling runs in a background task
    /// of the shard's core once the active segment is half full (a spare, `seg-next.spare`,
    /// renamed into place at the next roll), so the commit path never waits for it; a roll that
    /// comes before the spare is ready starts a growing segment as without preallocation.
    /// Costs: every segment's bytes are written twice (zeros, then records), one spare segment
    /// per shard sits on disk (64 MiB by default) and in the page cache while it is written.
    /// A fresh shard's first segment grows as before (so a fresh server writes nothing extra at
    /// start). Logs written with either setting open with the other.
    pub preallocate_segments: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            dedup_entries_max: DEDUP_ENTRIES_MAX_DEFAULT,
            unsynced_bytes_max: UNSYNCED_BYTES_MAX_DEFAULT,
            preallocate_segments: true,
        }
    }
}

const _: () = assert!(SEGMENT_BYTES_MAX_DEFAULT <= u32::MAX as u64);

impl StoreConfig {
    /// Checks the bounds documented on each field.
    pub fn validate(&self) -> Result<(), StorageError> {
        let one_record = (record::RECORD_HEADER_BYTES + RECORD_BYTES_MAX) as u64;
        if (self.unsynced_bytes_max as u64) < one_record {
            return Err(StorageError::Config(format!(
                "unsynced_bytes_max {} is below one largest record ({one_record} bytes)",
                self.unsynced_bytes_max
            )));
        }
        if self.segment_bytes_max < one_record {
            return Err(StorageError::Config(format!(
                "segment_bytes_max {} is below one largest record ({one_record} bytes)",
                self.segment_bytes_max
            )));
        }
        if self.segment_bytes_max > u32::MAX as u64 {
            return Err(StorageError::Config(format!(
                "segment_bytes_max {} exceeds {} (32-bit index offsets)",
                self.segment_bytes_max,
                u32::MAX
            )));
        }
        if self.dedup_entries_max == 0 {
            return Err(StorageError::Config(
                "dedup_entries_max must be positive".into(),
            ));
        }
        if self.dedup_entries_max > DEDUP_ENTRIES_MAX_LIMIT {
            return Err(StorageError::Config(format!(
                "dedup_entries_max {} exceeds {DEDUP_ENTRIES_MAX_LIMIT} (the table is reserved at its bound)",
                self.dedup_entries_max
            )));
        }
        Ok(())
    }

    /// Most bytes one write+`fdatasync` round covers: `min(unsynced_bytes_max,
    /// segment_bytes_max)`, so a round always fits in one segment.
    pub fn sync_round_bytes_max(&self) -> usize {
        self.unsynced_bytes_max
            .min(self.segment_bytes_max.min(u32::MAX as u64) as usize)
    }
}

/// Why on-disk data was judged corrupt.
#[derive(Debug)]
#[non_exhaustive]
pub enum Corruption {
    /// A record failed to decode (CRC, tag, length...).
    Record(RecordError),
    /// A record is cut short, and this is not the end of the log.
    Incomplete,
    /// Damage in the last segment too far from its end to be an interrupted append.
    DamageBeforeTail { bytes_after: u64 },
    /// A segment does not start where the previous one ended (a segment is missing or was cut).
    SegmentGap { expected_base: u64 },
    /// Free space (zeros after the last record of a segment) followed by non-zero bytes, up to
    /// `data_end`: bytes no append wrote, in a sealed segment or too far from the end of the last
    /// one to be an interrupted append.
    NonZeroAfterEnd { data_end: u64 },
    /// A segment file is larger than 32-bit offsets can index.
    SegmentTooLarge { len: u64 },
    /// A CRC-valid message whose seq is not its chat's next one.
    SeqGap {
        chat: ChatId,
        expected: Seq,
        got: Seq,
    },
    /// A CRC-valid message for a chat with no earlier `ChatCreated`.
    UnknownChat(ChatId),
    /// The index points at a record that is not the expected message.
    IndexMismatch { chat: ChatId, seq: Seq },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Record(e) => write!(f, "bad record: {e}"),
            Corruption::Incomplete => write!(f, "incomplete record before the end of the log"),
            Corruption::DamageBeforeTail { bytes_after } => write!(
                f,
                "damaged record followed by {bytes_after} bytes: too far from the end to be a torn \
                 append"
            ),
            Corruption::SegmentGap { expected_base } => {
                write!(
                    f,
                    "segment does not start at the expected offset {expected_base}"
                )
            }
            Corruption::NonZeroAfterEnd { data_end } => write!(
                f,
                "non-zero bytes up to offset {data_end} after the end of the records"
            ),
            Corruption::SegmentTooLarge { len } => write!(f, "segment of {len} bytes is too large"),
            Corruption::SeqGap {
                chat,
                expected,
                got,
            } => {
                write!(
                    f,
                    "chat {} expected seq {} got {}",
                    chat.0, expected.0, got.0
                )
            }
            Corruption::UnknownChat(chat) => write!(f, "message for uncreated chat {}", chat.0),
            Corruption::IndexMismatch { chat, seq } => {
                write!(
                    f,
                    "index entry for chat {} seq {} points at another record",
                    chat.0, seq.0
                )
            }
        }
    }
}

/// Everything the store can fail with, grouped by who is at fault. The engine maps every variant
/// to an internal-error reply (the client is never at fault for a storage failure) and, for
/// `Io`, `Corrupt` and `Poisoned`, stops serving the shard.
#[derive(Debug)]
#[non_exhaustive]
pub enum StorageError {
    // ── The environment: disk or OS ─────────────────────────────────────────────────────────
    /// A file-system operation failed. After a failed `append` the store is poisoned.
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },

    // ── The data on disk ────────────────────────────────────────────────────────────────────
    /// Acknowledged data is damaged or inconsistent; the store refuses to guess. `offset` is the
    /// byte offset inside `segment`.
    Corrupt {
        segment: PathBuf,
        offset: u64,
        reason: Corruption,
    },

    // ── The caller (API misuse; nothing was written) ────────────────────────────────────────
    /// A record exceeds a limit (`what` names it: message payload bytes, chat members).
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// A record breaks another format rule (see [`Record::validate`]).
    InvalidRecord(RecordError),
    /// A message does not carry its chat's next seq (durable seq + 1, or the next after earlier
    /// messages of the same batch).
    SeqGap {
        chat: ChatId,
        expected: Seq,
        got: Seq,
    },
    /// A message for a chat that has no `ChatCreated` record (durable or earlier in the batch),
    /// or a purge in such a chat.
    UnknownChat(ChatId),
    /// A purge names a seq that is 0 or not durable (yet).
    UnknownSeq { chat: ChatId, seq: Seq },
    /// A purge names a record that must keep its content: a chat event other than `Edited` and
    /// `Reacted` (`why` says which rule).
    NotPurgeable {
        chat: ChatId,
        seq: Seq,
        why: &'static str,
    },
    /// An invalid [`StoreConfig`].
    Config(String),
    /// Another process (or a killed one whose I/O is still draining) holds the shard's active
    /// segment after waiting `SEGMENT_LOCK_WAIT`.
    Locked { path: PathBuf },

    // ── The store's own state ───────────────────────────────────────────────────────────────
    /// An earlier `append` failed or was cancelled part-way, so what is on disk after the durable
    /// prefix is unknown. Reads of durable data still work; appends need a reopen (whose
    /// recovery cuts the unfinished tail).
    Poisoned,
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Io { op, path, source } => {
                write!(f, "storage I/O failed: {op} {}: {source}", path.display())
            }
            StorageError::Corrupt {
                segment,
                offset,
                reason,
            } => {
                write!(
                    f,
                    "corrupt log {} at offset {offset}: {reason}",
                    segment.display()
                )
            }
            StorageError::TooLarge { what, len, max } => {
                write!(f, "{what}: {len} exceeds {max}")
            }
            StorageError::InvalidRecord(e) => write!(f, "invalid record: {e}"),
            StorageError::SeqGap {
                chat,
                expected,
                got,
            } => write!(
                f,
                "append to chat {}: expected seq {} got {}",
                chat.0, expected.0, got.0
            ),
            StorageError::UnknownChat(chat) => write!(f, "append to uncreated chat {}", chat.0),
            StorageError::UnknownSeq { chat, seq } => {
                write!(f, "chat {} has no durable seq {}", chat.0, seq.0)
            }
            StorageError::NotPurgeable { chat, seq, why } => {
                write!(f, "chat {} seq {} cannot be purged: {why}", chat.0, seq.0)
            }
            StorageError::Config(why) => write!(f, "invalid store config: {why}"),
            StorageError::Locked { path } => write!(
                f,
                "{} is locked by another process (is another server using this data directory?)",
                path.display()
            ),
            StorageError::Poisoned => {
                write!(f, "store poisoned by an earlier failed append; reopen it")
            }
        }
    }
}

impl std::error::Error for StorageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StorageError::Io { source, .. } => Some(source),
            StorageError::InvalidRecord(e) => Some(e),
            StorageError::Corrupt {
                reason: Corruption::Record(e),
                ..
            } => Some(e),
            _ => None,
        }
    }
}

/// What a store backend does for the engine. [`EmbeddedStore`] implements it; a ScyllaDB backend
/// can later. All methods take `&self`: one committer task calls `append` while other tasks
/// read concurrently, so implementations keep their mutable state behind interior mutability
/// that is never borrowed across an `.await`.
#[allow(async_fn_in_trait)]
pub trait MessageStore {
    /// Makes `records` durable, in order, as one group commit. `Ok` means every record is
    /// durable; at most one `append` may be in flight at a time.
    async fn append(&self, records: &[Record]) -> Result<AppendStats, StorageError>;

    /// Durable messages of `chat` with `from <= seq <= to_inclusive`, ascending, at most `limit`
    /// (and at most [`log::READ_MESSAGES_MAX`]).
    async fn read_messages(
        &self,
        chat: ChatId,
        from: Seq,
        to_inclusive: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StorageError>;

    /// A history page: durable messages with `seq < before` (`before == 0`: the newest), newest
    /// first, at most `limit` messages and `bytes_max` payload bytes (the first message always
    /// fits). The flag says whether older messages remain.
    async fn read_messages_before(
        &self,
        chat: ChatId,
        before: Seq,
        limit: usize,
        bytes_max: usize,
    ) -> Result<(Vec<StoredMessage>, bool), StorageError>;

    /// Overwrites the stored payloads of these messages in place with zeros, sets their
    /// content_kind to CONTENT_KIND_DELETED, re-computes their CRCs, and makes it durable. Two
    /// phases, each ending with one fdatasync per file touched: first only the content_kind
    /// bytes, then the whole tombstones. Unknown / not-yet-durable seqs are an error. Idempotent.
    ///
    /// A crash part-way leaves records old, or marked by their content_kind byte, which recovery
    /// completes as torn purges (whether or not an event names them). Call it once the chat's
    /// `Deleted` event is durable, so content never vanishes without the event that explains it.
    /// At most one `purge` may be in flight at a time; it may overlap an `append` and reads. See
    /// [`EmbeddedStore::purge`].
    async fn purge(&self, chat: ChatId, seqs: &[Seq]) -> Result<PurgeStats, StorageError>;
}
