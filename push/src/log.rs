//! A small append-only file of CRC-framed records, for the push registry and the dead-letter
//! log. The framing mirrors `storage/src/record.rs`: `[len u32 LE][crc32c(body) u32 LE][body]`.
//!
//! ```text
//!  open(path) ─► scan every record ─► torn tail of the last record? truncate it
//!                                   └► a bad record followed by more bytes? Corrupt (refuse)
//!  append(body) ─► one write + fdatasync (returns only when durable)
//!  rewrite(bodies) ─► tmp file + fsync ─► rename over ─► fsync the directory (atomic snapshot)
//! ```
//!
//! A crash while appending leaves at most one partial record at the end (a short header, a
//! short body, or a body whose CRC does not match); `open` cuts it off. Anything else that does
//! not parse is corruption and is reported, never silently dropped.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Largest record body. A push registry record or a dead letter is well under 16 KiB (tokens
/// are capped at `TOKEN_BYTES_MAX`); the cap bounds what a corrupt length can make us read.
pub const LOG_RECORD_BYTES_MAX: usize = 64 * 1024;
/// Largest log file `open` reads into memory (a snapshot of a full registry plus its tail).
pub const LOG_FILE_BYTES_MAX: u64 = 1 << 30;
const HEADER_BYTES: usize = 8;

#[derive(Debug)]
pub enum LogError {
    Io(io::Error),
    /// A record that is not the last one fails its CRC or its length is impossible.
    Corrupt {
        path: PathBuf,
        offset: u64,
    },
    /// The file is held by another process (a running server).
    Locked(PathBuf),
    TooLarge(usize),
}

impl std::fmt::Display for LogError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogError::Io(e) => write!(f, "I/O error: {e}"),
            LogError::Corrupt { path, offset } => {
                write!(f, "{}: corrupt record at offset {offset}", path.display())
            }
            LogError::Locked(p) => write!(
                f,
                "{} is locked by another process (is the server running?)",
                p.display()
            ),
            LogError::TooLarge(n) => write!(f, "record of {n} bytes is over the limit"),
        }
    }
}

impl std::error::Error for LogError {}

impl From<io::Error> for LogError {
    fn from(e: io::Error) -> Self {
        LogError::Io(e)
    }
}

pub fn frame(body: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    out.extend_from_slice(body);
}

/// Splits `bytes` into record bodies. Returns the bodies and the length of the valid prefix;
/// `Err(offset)` if a bad record is followed by more bytes (corruption, not a torn tail).
pub fn parse(bytes: &[u8]) -> Result<(Vec<&[u8]>, usize), u64> {
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest.len() < HEADER_BYTES {
            break; // torn header
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if len > LOG_RECORD_BYTES_MAX {
            // We never write such a length; only a lone trailing header may be garbage.
            return if rest.len() == HEADER_BYTES {
                Ok((out, pos))
            } else {
                Err(pos as u64)
            };
        }
        if rest.len() < HEADER_BYTES + len {
            break; // torn body
        }
        let body = &rest[HEADER_BYTES..HEADER_BYTES + len];
        if crc32c::crc32c(body) != crc {
            if pos + HEADER_BYTES + len == bytes.len() {
                break; // the last record, partly written
            }
            return Err(pos as u64);
        }
        out.push(body);
        pos += HEADER_BYTES + len;
    }
    Ok((out, pos))
}

/// An open append-only log, exclusively locked (`flock`) so two processes never write it.
pub struct AppendLog {
    path: PathBuf,
    file: File,
    len: u64,
}

impl AppendLog {
    /// Opens (creating) the log, truncates a torn tail, and returns it with the bodies of every
    /// valid record.
    pub fn open(path: &Path) -> Result<(AppendLog, Vec<Vec<u8>>), LogError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        lock(&file, path)?;
        let (records, valid) = read_records(&mut file, path)?;
        let len = file.metadata()?.len();
        if valid != len {
            file.set_len(valid)?;
            file.sync_all()?;
        }
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok((
            AppendLog {
                path: path.to_owned(),
                file,
                len: valid,
            },
            records,
        ))
    }

    /// Appends records; returns once they are durable.
    pub fn append(&mut self, bodies: &[&[u8]]) -> Result<(), LogError> {
        let mut buf = Vec::new();
        for b in bodies {
            if b.len() > LOG_RECORD_BYTES_MAX {
                return Err(LogError::TooLarge(b.len()));
            }
            frame(b, &mut buf);
        }
        self.file.seek(SeekFrom::Start(self.len))?;
        if let Err(e) = self
            .file
            .write_all(&buf)
            .and_then(|_| self.file.sync_data())
        {
            // Leave the file as it was, so the next append does not follow a half record.
            let _ = self.file.set_len(self.len);
            return Err(e.into());
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    /// Replaces the whole log with `bodies`, atomically (a crash leaves the old or the new file).
    pub fn rewrite(&mut self, bodies: &[Vec<u8>]) -> Result<(), LogError> {
        let mut buf = Vec::new();
        for b in bodies {
            if b.len() > LOG_RECORD_BYTES_MAX {
                return Err(LogError::TooLarge(b.len()));
            }
            frame(b, &mut buf);
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        lock(&file, &self.path)?;
        self.file = file;
        self.len = buf.len() as u64;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len_bytes(&self) -> u64 {
        self.len
    }
}

/// Reads the valid records of a log without locking or repairing it (for `dlq list` while a
/// server runs: a torn tail is simply not shown).
pub fn read_all(path: &Path) -> Result<Vec<Vec<u8>>, LogError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(read_records(&mut file, path)?.0)
}

fn read_records(file: &mut File, path: &Path) -> Result<(Vec<Vec<u8>>, u64), LogError> {
    let len = file.metadata()?.len();
    if len > LOG_FILE_BYTES_MAX {
        return Err(LogError::TooLarge(len as usize));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.seek(SeekFrom::Start(0))?;
    file.read_to_end(&mut bytes)?;
    match parse(&bytes) {
        Ok((bodies, valid)) => Ok((
            bodies.into_iter().map(<[u8]>::to_vec).collect(),
            valid as u64,
        )),
        Err(offset) => Err(LogError::Corrupt {
            path: path.to_owned(),
            offset,
        }),
    }
}

fn lock(file: &File, path: &Path) -> Result<(), LogError> {
    // SAFETY: flock on a file descriptor we own and keep open for the lock's lifetime.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            LogError::Locked(path.to_owned())
        } else {
            LogError::Io(e)
        });
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i as u8; 10 + i * 7]).collect()
    }

    #[test]
    fn append_reopen_and_every_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let want = bodies(4);
        {
            let (mut log, got) = AppendLog::open(&path).unwrap();
            assert!(got.is_empty());
            let refs: Vec<&[u8]> = want.iter().map(Vec::as_slice).collect();
            log.append(&refs[..2]).unwrap();
            log.append(&refs[2..]).unwrap();
        }
        let full = std::fs::read(&path).unwrap();
        let (_, got) = AppendLog::open(&path).unwrap();
        assert_eq!(got, want);
        // Cut the file at every length: what is left is a prefix of whole records, and the
        // file is truncated to exactly that prefix, so appends continue cleanly.
        let mut ends = vec![0usize];
        for b in &want {
            ends.push(ends.last().unwrap() + HEADER_BYTES + b.len());
        }
        for cut in 0..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let whole = ends.iter().filter(|e| **e <= cut).count() - 1;
            let (mut log, got) = AppendLog::open(&path).unwrap();
            assert_eq!(got, want[..whole], "cut at {cut}");
            assert_eq!(log.len_bytes(), ends[whole] as u64);
            log.append(&[b"next"]).unwrap();
            drop(log);
            let (_, got) = AppendLog::open(&path).unwrap();
            assert_eq!(got.len(), whole + 1);
            assert_eq!(got.last().unwrap(), b"next");
        }
    }

    #[test]
    fn torn_last_body_with_bad_crc_is_cut_but_middle_corruption_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let want = bodies(3);
        let mut buf = Vec::new();
        for b in &want {
            frame(b, &mut buf);
        }
        // Flip a byte in the last body: a torn write of the last record.
        let mut torn = buf.clone();
        *torn.last_mut().unwrap() ^= 0xff;
        std::fs::write(&path, &torn).unwrap();
        let (_, got) = AppendLog::open(&path).unwrap();
        assert_eq!(got, want[..2]);
        // Flip a byte in the first body: corruption.
        let mut bad = buf.clone();
        bad[HEADER_BYTES] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        match AppendLog::open(&path) {
            Err(LogError::Corrupt { offset: 0, .. }) => {}
            other => panic!("{:?}", other.map(|(_, r)| r)),
        }
        assert!(matches!(read_all(&path), Err(LogError::Corrupt { .. })));
        // A huge length in the middle is corruption too; at the end it is a torn header.
        let mut huge = buf.clone();
        huge[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&huge), Err(0));
        let mut tail = buf.clone();
        tail.extend_from_slice(&u32::MAX.to_le_bytes());
        tail.extend_from_slice(&[0; 4]);
        assert_eq!(parse(&tail).unwrap().0.len(), 3);
    }

    #[test]
    fn rewrite_is_atomic_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let (mut log, _) = AppendLog::open(&path).unwrap();
        log.append(&[b"one", b"two"]).unwrap();
        assert!(matches!(AppendLog::open(&path), Err(LogError::Locked(_))));
        log.rewrite(&[b"three".to_vec()]).unwrap();
        assert!(matches!(AppendLog::open(&path), Err(LogError::Locked(_))));
        log.append(&[b"four"]).unwrap();
        assert_eq!(
            read_all(&path).unwrap(),
            vec![b"three".to_vec(), b"four".to_vec()]
        );
        drop(log);
        let (_, got) = AppendLog::open(&path).unwrap();
        assert_eq!(got.len(), 2);
        assert!(read_all(&dir.path().join("missing")).unwrap().is_empty());
    }
}
