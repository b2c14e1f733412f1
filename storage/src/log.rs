//! `EmbeddedStore`: one shard's append-only log on local disk, through glommio (io_uring).
//!
//! # Layout
//!
//! A shard directory `<data_dir>/shard-<k>/` holds segment files `seg-<base>.log`, where `<base>`
//! is the 16-digit zero-padded *global byte offset* of the segment's first byte in the shard's
//! log. Segments are therefore contiguous: each one starts where the previous one ends, which
//! `open` checks (a missing or cut segment is detected). A segment is a plain concatenation of
//! framed records (see [`crate::record`]); only the last one is ever written.
//!
//! # Durability
//!
//! `append` encodes a whole batch into one buffer, writes it with one positional write at the end
//! of the active segment, and issues one `fdatasync` (a batch larger than
//! `StoreConfig::sync_round_bytes_max()` takes several such rounds, so the bytes written but not
//! yet synced stay bounded). A new segment is created (with `O_EXCL`)
//! and its directory `fdatasync`ed before any record goes into it. Only then does the in-memory
//! index change, so readers never see a record that is not durable.
//!
//! # Recovery
//!
//! `open` scans every segment and verifies every CRC. The only damage it repairs is at the end of
//! the last segment, within the last `StoreConfig::sync_round_bytes_max()` bytes: that can only be
//! a write that was never `fdatasync`ed, of an append that never returned `Ok` (a torn write), so it is cut off and the truncation `fdatasync`ed. Damage
//! anywhere else would be acknowledged data and is a hard [`StorageError::Corrupt`].
//!
//! # Concurrency
//!
//! All methods take `&self`. State lives in a `RefCell` that is borrowed only between awaits;
//! files are `Rc`s cloned out of it before an await. One `append` at a time (the committer
//! task); any number of concurrent reads, which only see index entries `append` published after
//! its `fdatasync`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

use glommio::io::{BufferedFile, Directory, OpenOptions, ReadResult};
use switchboard_wire::ids::{ChatId, Seq};

use crate::record::{
    decode_one, Record, RecordError, StoredMessage, CHAT_MEMBERS_MAX, MESSAGE_FRAME_OVERHEAD_BYTES,
    PAYLOAD_BYTES_MAX,
};
use crate::{Corruption, MessageStore, StorageError, StoreConfig};

/// Most messages one `read_messages*` call returns, whatever `limit` says: bounds the memory and
/// I/O of one request (at most 1024 × 64 KiB = 64 MiB of payload). Callers page.
pub const READ_MESSAGES_MAX: usize = 1024;

/// Adjacent records are read with one positional read while the combined read stays within this
/// size; beyond it the read is split. Large enough that a page of small messages is one read,
/// small enough not to pin much memory per reader.
pub const READ_COALESCE_BYTES_MAX: usize = 256 * 1024;

/// Bytes read per request while scanning segments at start-up.
const SCAN_CHUNK_BYTES: usize = 1024 * 1024;

const _: () = assert!(READ_COALESCE_BYTES_MAX >= crate::record::RECORD_BYTES_MAX + 8);
const _: () = assert!(SCAN_CHUNK_BYTES >= crate::record::RECORD_BYTES_MAX + 8);

/// Where one durable record lives. 12 bytes per message in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    /// Index into the store's segment list (0 = oldest segment open).
    pub segment: u32,
    /// Byte offset of the frame inside the segment.
    pub offset: u32,
    /// Frame length, header included.
    pub len: u32,
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
    /// A record failed to decode (CRC mismatch, zeros, bad length...).
    Invalid(RecordError),
}

/// A torn tail `open` removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truncation {
    pub segment: PathBuf,
    /// The file's new length: the end of the last good record.
    pub offset: u64,
    /// Bytes removed.
    pub bytes: u64,
    pub reason: TailDamage,
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
    /// Bytes of durable records in the file.
    len: u64,
    file: Rc<BufferedFile>,
}

struct Inner {
    segments: Vec<Segment>,
    /// chat → location of seq `i + 1` at index `i`. An entry exists from the chat's durable
    /// `ChatCreated` on, so its presence also says the chat exists.
    index: HashMap<ChatId, Vec<Location>>,
}

/// The embedded store of one shard. See the module docs.
///
/// Memory: 12 bytes per durable message (its [`Location`]) plus a map entry per chat; payloads
/// are never kept. At 100 M messages per shard the index is ~1.2 GB; a checkpoint of the index
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

/// How the scan of one segment ended.
struct ScanEnd {
    /// End of the last good record.
    good_len: u64,
    /// What stopped the scan before the end of the file, if anything.
    damage: Option<TailDamage>,
}

/// Decodes every record of a segment in order, calling `on_record(record, offset, len)`.
async fn scan_segment(
    file: &BufferedFile,
    path: &Path,
    file_len: u64,
    mut on_record: impl FnMut(Record, u64, usize) -> Result<(), StorageError>,
) -> Result<ScanEnd, StorageError> {
    let mut buf: Vec<u8> = Vec::with_capacity(SCAN_CHUNK_BYTES * 2);
    // File offset of buf[0].
    let mut buf_pos = 0u64;
    let mut read_pos = 0u64;
    loop {
        let mut at = 0usize;
        loop {
            match decode_one(&buf[at..]) {
                Ok(Some((record, n))) => {
                    on_record(record, buf_pos + at as u64, n)?;
                    at += n;
                }
                Ok(None) => break,
                Err(e) => {
                    return Ok(ScanEnd {
                        good_len: buf_pos + at as u64,
                        damage: Some(TailDamage::Invalid(e)),
                    });
                }
            }
        }
        buf.drain(..at);
        buf_pos += at as u64;
        if read_pos == file_len {
            let damage = (!buf.is_empty()).then_some(TailDamage::Incomplete);
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

        let mut report = RecoveryReport::default();
        let mut records = Vec::new();
        let mut index: HashMap<ChatId, Vec<Location>> = HashMap::new();
        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len() + 1);
        let segment_count = bases.len();
        for (i, base) in bases.into_iter().enumerate() {
            let path = dir.join(segment_name(base));
            let is_last = i + 1 == segment_count;
            if let Some(prev) = segments.last() {
                let expected_base = prev.base + prev.len;
                if base != expected_base {
                    return Err(StorageError::Corrupt {
                        segment: path,
                        offset: 0,
                        reason: Corruption::SegmentGap { expected_base },
                    });
                }
            }
            let file = OpenOptions::new()
                .read(true)
                .write(is_last)
                .buffered_open(&path)
                .await
                .map_err(io_err("open segment", &path))?;
            if is_last {
                // Before reading (and maybe truncating) the tail another process may still write.
                lock_segment(&file, &path).await?;
            }
            let file_len = file
                .file_size()
                .await
                .map_err(io_err("stat segment", &path))?;
            if file_len > u32::MAX as u64 {
                return Err(StorageError::Corrupt {
                    segment: path,
                    offset: 0,
                    reason: Corruption::SegmentTooLarge { len: file_len },
                });
            }
            let segment = i as u32;
            let end = scan_segment(&file, &path, file_len, |record, offset, len| {
                let loc = Location {
                    segment,
                    offset: offset as u32,
                    len: len as u32,
                };
                index_record(&mut index, &record, loc).map_err(|reason| StorageError::Corrupt {
                    segment: path.clone(),
                    offset,
                    reason,
                })?;
                report.bytes += len as u64;
                records.push(record);
                Ok(())
            })
            .await?;
            let mut len = file_len;
            if let Some(damage) = end.damage {
                let bytes_after = file_len - end.good_len;
                if !is_last {
                    let reason = match damage {
                        TailDamage::Incomplete => Corruption::Incomplete,
                        TailDamage::Invalid(e) => Corruption::Record(e),
                    };
                    return Err(StorageError::Corrupt {
                        segment: path,
                        offset: end.good_len,
                        reason,
                    });
                }
                if bytes_after > cfg.sync_round_bytes_max() as u64 {
                    return Err(StorageError::Corrupt {
                        segment: path,
                        offset: end.good_len,
                        reason: Corruption::DamageBeforeTail { bytes_after },
                    });
                }
                file.truncate(end.good_len)
                    .await
                    .map_err(io_err("truncate segment", &path))?;
                file.fdatasync()
                    .await
                    .map_err(io_err("fdatasync segment", &path))?;
                len = end.good_len;
                report.truncation = Some(Truncation {
                    segment: path.clone(),
                    offset: end.good_len,
                    bytes: bytes_after,
                    reason: damage,
                });
            }
            segments.push(Segment {
                path,
                base,
                len,
                file: Rc::new(file),
            });
        }
        if segments.is_empty() {
            let path = dir.join(segment_name(0));
            let file = create_segment(&dir_handle, &path).await?;
            segments.push(Segment {
                path,
                base: 0,
                len: 0,
                file: Rc::new(file),
            });
        }
        report.segments = segments.len();
        report.records = records.len();

        let store = EmbeddedStore {
            dir: dir.to_path_buf(),
            dir_handle,
            cfg,
            inner: RefCell::new(Inner { segments, index }),
            appending: Cell::new(false),
            poisoned: Cell::new(false),
            report,
        };
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

    /// Whether a `ChatCreated` for `chat` is durable.
    pub fn has_chat(&self, chat: ChatId) -> bool {
        self.inner.borrow().index.contains_key(&chat)
    }

    /// Where message `seq` of `chat` lives, if durable.
    pub fn location(&self, chat: ChatId, seq: Seq) -> Option<Location> {
        let inner = self.inner.borrow();
        let i = usize::try_from(seq.0.checked_sub(1)?).ok()?;
        inner.index.get(&chat)?.get(i).copied()
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
                Record::Cursor { .. } => {}
            }
        }
        assert_eq!(buf.len(), bytes);

        let (mut file, mut path, mut pos, mut segment) = {
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
            )
        };
        let mut rolled = false;
        if pos > 0 && pos + bytes as u64 > self.cfg.segment_bytes_max {
            let base = {
                let inner = self.inner.borrow();
                let active = &inner.segments[segment];
                active.base + active.len
            };
            let new_path = self.dir.join(segment_name(base));
            let new_file = Rc::new(create_segment(&self.dir_handle, &new_path).await?);
            self.inner.borrow_mut().segments.push(Segment {
                path: new_path.clone(),
                base,
                len: 0,
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

        let mut inner = self.inner.borrow_mut();
        let Inner { segments, index } = &mut *inner;
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
            index
                .get_mut(&chat)
                .expect("checked by check_batch, created in this or an earlier round")
                .push(loc);
        }
        Ok((sync_us, rolled))
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
                Record::Cursor { .. } => {}
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
                let loc = locs[(lowest - 2) as usize];
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

    /// Reads durable seqs `first..=last` (all must be durable), coalescing adjacent records.
    async fn read_range(
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
                let loc = locs[(seq - 1) as usize];
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

    /// Closes every file. Dropping the store also releases them, a little later.
    pub async fn close(self) -> Result<(), StorageError> {
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

/// Adds one recovered record to the index, checking what `append` guarantees.
fn index_record(
    index: &mut HashMap<ChatId, Vec<Location>>,
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
            locs.push(loc);
        }
        Record::Cursor { .. } => {}
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
}
