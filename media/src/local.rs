//! The local-directory backend (the embedded default) and the metadata files of every backend.
//!
//! ```text
//!  <root>/meta/<ab>/<id>.json   metadata, written once at POST /v1/media (all backends)
//!  <root>/objects/<ab>/<id>     the bytes, complete and verified (local backend)
//!  <root>/tmp/<id>.<n>.part     uploads in progress; removed on failure and at start-up
//! ```
//!
//! `<ab>` is the id's first two characters (ids are random base64url, so 4096 evenly filled
//! fan-out directories); every lookup is one path, never a scan. Nothing half-written is ever
//! visible under `meta/` or `objects/`: a file is written under `tmp/`, `fdatasync`ed, renamed
//! into place, and the directory is synced. An object exists exactly when its upload completed
//! with the declared size and SHA-256.
//!
//! All IO goes through glommio's io_uring `BufferedFile` on the calling executor, in pieces of
//! at most [`IO_CHUNK_BYTES_MAX`]. The only blocking calls are `mkdir` of a fan-out directory
//! (once per directory) and the `unlink` of an abandoned temp file in `Drop`; both are single
//! metadata syscalls.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use glommio::io::{BufferedFile, Directory, OpenOptions, ReadResult};
use switchboard_api::sign::{is_valid_media_id, UrlSigner};

use crate::upload::Verifier;
use crate::{
    MediaError, MediaMeta, MediaStore, Target, IO_CHUNK_BYTES_MAX, MEDIA_BYTES_MAX_DEFAULT,
};

/// Largest metadata file read back; ours are a few hundred bytes.
pub const META_FILE_BYTES_MAX: usize = 4096;

/// Tells temp file names apart within this process (with the pid, across processes).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn fanout(media_id: &str) -> &str {
    // Ids are ASCII; one-character ids share the "_" directory.
    if media_id.len() >= 2 {
        &media_id[..2]
    } else {
        "_"
    }
}

/// The local media directory: metadata for every backend, and the bytes for the local one.
/// Cheap to clone: one per core, all pointing at the same directory (files are the only shared
/// state, and every change is an atomic rename).
#[derive(Clone, Debug)]
pub struct LocalStore {
    root: PathBuf,
    signer: UrlSigner,
    media_bytes_max: u64,
}

impl LocalStore {
    /// Creates the directory layout and removes uploads a previous process left half-written.
    /// Blocking; call once at start-up, before any executor serves media.
    pub fn prepare(root: &Path) -> std::io::Result<()> {
        for sub in ["meta", "objects", "tmp"] {
            std::fs::create_dir_all(root.join(sub))?;
        }
        for entry in std::fs::read_dir(root.join("tmp"))? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().ends_with(".part") {
                std::fs::remove_file(entry.path())?;
            }
        }
        Ok(())
    }

    /// A store over `root` (already [`prepare`](Self::prepare)d), signing URLs with `signer`.
    pub fn new(root: PathBuf, signer: UrlSigner) -> Self {
        LocalStore {
            root,
            signer,
            media_bytes_max: MEDIA_BYTES_MAX_DEFAULT,
        }
    }

    /// Sets the largest object accepted (default [`MEDIA_BYTES_MAX_DEFAULT`]).
    pub fn with_media_bytes_max(mut self, max: u64) -> Self {
        assert!(max > 0);
        self.media_bytes_max = max;
        self
    }

    pub fn media_bytes_max(&self) -> u64 {
        self.media_bytes_max
    }

    pub fn signer(&self) -> &UrlSigner {
        &self.signer
    }

    fn meta_path(&self, media_id: &str) -> PathBuf {
        self.root
            .join("meta")
            .join(fanout(media_id))
            .join(format!("{media_id}.json"))
    }

    fn object_path(&self, media_id: &str) -> PathBuf {
        self.root
            .join("objects")
            .join(fanout(media_id))
            .join(media_id)
    }

    fn temp_path(&self, media_id: &str) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root
            .join("tmp")
            .join(format!("{media_id}.{}-{n}.part", std::process::id()))
    }

    /// Writes `bytes` as `dest` atomically: temp file, fdatasync, rename, directory sync.
    async fn write_atomic(&self, dest: &Path, bytes: Vec<u8>) -> Result<(), MediaError> {
        let tmp = self.temp_path("meta");
        let mut guard = TempGuard::new(tmp.clone());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .buffered_open(&tmp)
            .await?;
        let written = write_all_at(&file, &bytes, 0).await;
        let synced = match written {
            Ok(()) => file.fdatasync().await.map_err(MediaError::from),
            Err(e) => Err(e),
        };
        file.close().await?;
        synced?;
        publish(&tmp, dest).await?;
        guard.disarm();
        Ok(())
    }

    /// Records a new object's metadata (at `POST /v1/media`). Fails with `AlreadyExists` if the
    /// id is taken.
    pub async fn create_meta(&self, meta: &MediaMeta) -> Result<(), MediaError> {
        if !is_valid_media_id(&meta.media_id) {
            return Err(MediaError::Invalid("invalid_media_id"));
        }
        let dest = self.meta_path(&meta.media_id);
        if dest.exists() {
            return Err(MediaError::AlreadyExists);
        }
        let bytes =
            serde_json::to_vec(meta).unwrap_or_else(|e| unreachable!("metadata serialises: {e}"));
        self.write_atomic(&dest, bytes).await
    }

    /// The metadata of `media_id`, or `NotFound`.
    pub async fn load_meta(&self, media_id: &str) -> Result<MediaMeta, MediaError> {
        if !is_valid_media_id(media_id) {
            return Err(MediaError::NotFound);
        }
        let path = self.meta_path(media_id);
        let file = match OpenOptions::new().read(true).buffered_open(&path).await {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Err(MediaError::NotFound),
            Err(e) => return Err(MediaError::Io(e.into())),
        };
        let read = file.read_at(0, META_FILE_BYTES_MAX).await;
        file.close().await?;
        let read = read?;
        let meta: MediaMeta = serde_json::from_slice(&read).map_err(|e| {
            MediaError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            ))
        })?;
        if meta.media_id != media_id {
            return Err(MediaError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: names another id", path.display()),
            )));
        }
        Ok(meta)
    }

    /// Starts receiving the bytes of `media_id` (local backend `PUT`). `size` and `sha256` are
    /// what the signed URL carries; they must be the metadata's.
    pub async fn begin_upload(
        &self,
        media_id: &str,
        size: u64,
        sha256: [u8; 32],
    ) -> Result<Upload, MediaError> {
        let meta = self.load_meta(media_id).await?;
        if meta.size != size || meta.sha256_bytes() != Some(sha256) {
            return Err(MediaError::Invalid("upload_url_mismatch"));
        }
        if size > self.media_bytes_max {
            return Err(MediaError::TooLarge {
                limit: self.media_bytes_max,
            });
        }
        let final_path = self.object_path(media_id);
        if final_path.exists() {
            return Err(MediaError::AlreadyExists);
        }
        let tmp = self.temp_path(media_id);
        let guard = TempGuard::new(tmp.clone());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .buffered_open(&tmp)
            .await?;
        Ok(Upload {
            file: Some(file),
            final_path,
            verifier: Some(Verifier::new(size, sha256)),
            pos: 0,
            buf: Vec::new(),
            guard,
        })
    }

    /// Opens the bytes of an uploaded object for reading (local backend `GET`/`HEAD`).
    pub async fn open(&self, media_id: &str) -> Result<(MediaMeta, Blob), MediaError> {
        let meta = self.load_meta(media_id).await?;
        let path = self.object_path(media_id);
        let file = match OpenOptions::new().read(true).buffered_open(&path).await {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Err(MediaError::NotFound),
            Err(e) => return Err(MediaError::Io(e.into())),
        };
        let len = file.file_size().await?;
        if len != meta.size {
            return Err(MediaError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{}: {len} bytes, metadata says {}",
                    path.display(),
                    meta.size
                ),
            )));
        }
        Ok((meta, Blob { file, len }))
    }
}

impl MediaStore for LocalStore {
    fn upload_target(&self, meta: &MediaMeta, now_unix_s: u64, ttl_s: u64) -> Target {
        let sha = meta
            .sha256_bytes()
            .unwrap_or_else(|| unreachable!("metadata holds a validated digest"));
        Target {
            url: self
                .signer
                .upload_url(&meta.media_id, meta.size, sha, now_unix_s, ttl_s),
            headers: Vec::new(),
            expires_unix_s: now_unix_s + ttl_s,
        }
    }

    fn download_target(&self, meta: &MediaMeta, now_unix_s: u64, ttl_s: u64) -> Target {
        Target {
            url: self.signer.download_url(&meta.media_id, now_unix_s, ttl_s),
            headers: Vec::new(),
            expires_unix_s: now_unix_s + ttl_s,
        }
    }
}

fn is_not_found(e: &glommio::GlommioError<()>) -> bool {
    matches!(e, glommio::GlommioError::IoError(io) if io.kind() == std::io::ErrorKind::NotFound)
        || matches!(e, glommio::GlommioError::EnhancedIoError { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Writes all of `bytes` at `pos`. glommio takes an owned buffer per write, so each attempt
/// copies its part (one memcpy per at most [`IO_CHUNK_BYTES_MAX`], cheap next to SHA-256).
async fn write_all_at(
    file: &BufferedFile,
    mut bytes: &[u8],
    mut pos: u64,
) -> Result<(), MediaError> {
    while !bytes.is_empty() {
        let n = file.write_at(bytes.to_vec(), pos).await?;
        if n == 0 {
            return Err(MediaError::Io(std::io::ErrorKind::WriteZero.into()));
        }
        pos += n as u64;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// Renames `tmp` to `dest` (creating `dest`'s fan-out directory if needed) and syncs `dest`'s
/// directory, so the new name survives a crash.
async fn publish(tmp: &Path, dest: &Path) -> Result<(), MediaError> {
    let dir = dest
        .parent()
        .unwrap_or_else(|| unreachable!("object paths have a parent"));
    if !dir.is_dir() {
        // One mkdir (blocking, brief), then make its entry durable in the parent.
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(parent) = dir.parent() {
            let p = Directory::open(parent).await?;
            p.sync().await?;
            p.close().await?;
        }
    }
    glommio::io::rename(tmp, dest).await?;
    let d = Directory::open(dir).await?;
    d.sync().await?;
    d.close().await?;
    Ok(())
}

/// Removes a temp file unless disarmed (the file was renamed into place).
#[derive(Debug)]
struct TempGuard {
    path: PathBuf,
    armed: Cell<bool>,
}

impl TempGuard {
    fn new(path: PathBuf) -> Self {
        TempGuard {
            path,
            armed: Cell::new(true),
        }
    }

    fn disarm(&mut self) {
        self.armed.set(false);
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed.get() {
            // A failed or abandoned upload: its bytes must not linger. Ignore "not found".
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// An upload in progress: bytes go to a temp file as they arrive, counted and hashed. Dropping
/// it before [`finish`](Self::finish) removes the temp file.
#[derive(Debug)]
pub struct Upload {
    file: Option<BufferedFile>,
    final_path: PathBuf,
    verifier: Option<Verifier>,
    pos: u64,
    buf: Vec<u8>,
    guard: TempGuard,
}

impl Upload {
    /// Bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.verifier.as_ref().map_or(0, |v| v.received())
    }

    async fn flush(&mut self) -> Result<(), MediaError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let file = self
            .file
            .as_ref()
            .unwrap_or_else(|| unreachable!("file open until finish"));
        write_all_at(file, &self.buf, self.pos).await?;
        self.pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// The next piece of the body. A body longer than declared fails here (`size_mismatch`);
    /// after any error the upload is dead and its temp file is removed when it is dropped.
    pub async fn write(&mut self, mut chunk: &[u8]) -> Result<(), MediaError> {
        let verifier = self
            .verifier
            .as_mut()
            .unwrap_or_else(|| unreachable!("verifier present until finish"));
        verifier.feed(chunk)?;
        while !chunk.is_empty() {
            let room = IO_CHUNK_BYTES_MAX - self.buf.len();
            let n = room.min(chunk.len());
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(IO_CHUNK_BYTES_MAX);
            }
            self.buf.extend_from_slice(&chunk[..n]);
            chunk = &chunk[n..];
            if self.buf.len() == IO_CHUNK_BYTES_MAX {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// The body ended: checks size and SHA-256, makes the bytes durable and publishes the
    /// object. On a mismatch nothing is published and the temp file is removed.
    pub async fn finish(mut self) -> Result<(), MediaError> {
        self.flush().await?;
        let verifier = self
            .verifier
            .take()
            .unwrap_or_else(|| unreachable!("finish runs once"));
        let file = self
            .file
            .take()
            .unwrap_or_else(|| unreachable!("finish runs once"));
        let checked = verifier.finish();
        let synced = if checked.is_ok() {
            file.fdatasync().await
        } else {
            Ok(())
        };
        file.close().await?;
        checked?;
        synced?;
        // Two uploads of the same id may race (each checked the object was absent); both carry
        // the same verified bytes, so the later rename replacing the earlier is harmless.
        publish(&self.guard.path, &self.final_path).await?;
        self.guard.disarm();
        Ok(())
    }
}

/// An uploaded object opened for reading.
#[derive(Debug)]
pub struct Blob {
    file: BufferedFile,
    len: u64,
}

impl Blob {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Reads at most [`IO_CHUNK_BYTES_MAX`] bytes at `pos` (fewer at the end of the object).
    pub async fn read_at(&self, pos: u64, len: usize) -> Result<ReadResult, MediaError> {
        let len = len.min(IO_CHUNK_BYTES_MAX);
        Ok(self.file.read_at(pos, len).await?)
    }

    pub async fn close(self) -> Result<(), MediaError> {
        Ok(self.file.close().await?)
    }
}
