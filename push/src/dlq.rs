//! The durable dead-letter log: jobs that failed `attempts_max` times or permanently, kept at
//! `<data>/push/dlq.log` (CRC-framed JSON records) for `switchboard push dlq list|replay`.
//!
//! ```text
//!  PushQueue ─► Action::DeadLetter ─► DeadLetterLog::append (fdatasync)
//!  dlq list   ─► read_all (no lock; a torn tail is not shown)
//!  dlq replay ─► open (lock: the server must not be running) ─► send each ─► rewrite with the
//!                entries that failed again
//! ```

use crate::log::{read_all, AppendLog, LogError};
use crate::queue::DeadLetter;
use std::path::{Path, PathBuf};

/// Dead letters kept; past it the oldest are dropped at the next compaction (a flood of
/// failures must not fill the disk). ~1 KiB each.
pub const DLQ_ENTRIES_MAX: usize = 100_000;

pub fn dlq_path(push_dir: &Path) -> PathBuf {
    push_dir.join("dlq.log")
}

pub struct DeadLetterLog {
    log: AppendLog,
    entries: usize,
}

impl DeadLetterLog {
    /// Opens (creating) the log; takes its lock until dropped.
    pub fn open(push_dir: &Path) -> Result<(DeadLetterLog, Vec<DeadLetter>), LogError> {
        std::fs::create_dir_all(push_dir)?;
        let (log, bodies) = AppendLog::open(&dlq_path(push_dir))?;
        let entries = decode(&bodies)?;
        Ok((
            DeadLetterLog {
                log,
                entries: entries.len(),
            },
            entries,
        ))
    }

    pub fn append(&mut self, dl: &DeadLetter) -> Result<(), LogError> {
        let body = serde_json::to_vec(dl).expect("dead letters serialize");
        self.log.append(&[&body])?;
        self.entries += 1;
        if self.entries > DLQ_ENTRIES_MAX * 2 {
            let bodies = read_all(&dlq_path_of(&self.log))?;
            let keep = &bodies[bodies.len().saturating_sub(DLQ_ENTRIES_MAX)..];
            self.log.rewrite(keep)?;
            self.entries = keep.len();
        }
        Ok(())
    }

    /// Replaces the whole log (after a replay: the entries that failed again).
    pub fn replace(&mut self, entries: &[DeadLetter]) -> Result<(), LogError> {
        let bodies: Vec<Vec<u8>> = entries
            .iter()
            .map(|d| serde_json::to_vec(d).expect("dead letters serialize"))
            .collect();
        self.log.rewrite(&bodies)?;
        self.entries = entries.len();
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

fn dlq_path_of(log: &AppendLog) -> PathBuf {
    log.path().to_owned()
}

/// Reads the dead letters without locking (safe while the server runs).
pub fn list(push_dir: &Path) -> Result<Vec<DeadLetter>, LogError> {
    decode(&read_all(&dlq_path(push_dir))?)
}

fn decode(bodies: &[Vec<u8>]) -> Result<Vec<DeadLetter>, LogError> {
    bodies
        .iter()
        .map(|b| {
            serde_json::from_slice(b)
                .map_err(|e| LogError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Notification, Platform, Target};

    pub fn letter(i: u64) -> DeadLetter {
        DeadLetter {
            at_unix_ms: 1_700_000_000_000 + i,
            target: Target {
                user: i,
                device: 1,
                platform: Platform::Fcm,
                token: format!("t{i}"),
            },
            notification: Notification {
                chat: 9,
                count: 2,
                sender: Some(3),
                sender_name: None,
                last_seq: 4,
                badge: 2,
                title: "New messages".into(),
                body: "2 new messages".into(),
                collapse_id: "chat-9".into(),
            },
            attempts: 6,
            error: "HTTP 503".into(),
        }
    }

    #[test]
    fn append_list_replace_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut log, got) = DeadLetterLog::open(dir.path()).unwrap();
            assert!(got.is_empty());
            for i in 0..3 {
                log.append(&letter(i)).unwrap();
            }
            // Listing works while the writer holds the lock.
            assert_eq!(
                list(dir.path()).unwrap(),
                vec![letter(0), letter(1), letter(2)]
            );
            assert!(matches!(
                DeadLetterLog::open(dir.path()),
                Err(LogError::Locked(_))
            ));
        }
        let path = dlq_path(dir.path());
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        assert_eq!(list(dir.path()).unwrap().len(), 2);
        let (mut log, got) = DeadLetterLog::open(dir.path()).unwrap();
        assert_eq!(got, vec![letter(0), letter(1)]);
        log.replace(&[letter(1)]).unwrap();
        assert_eq!(log.len(), 1);
        drop(log);
        assert_eq!(list(dir.path()).unwrap(), vec![letter(1)]);
    }
}
