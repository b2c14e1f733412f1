//! The local-directory backend on a real glommio executor and real files.

use std::path::Path;

use switchboard_api::http1::Method;
use switchboard_api::sign::UrlSigner;
use switchboard_media::range::{self, RangeOutcome};
use switchboard_media::upload::sha256;
use switchboard_media::{CreateRequest, LocalStore, MediaError, MediaStore, IO_CHUNK_BYTES_MAX};

const NOW: u64 = 1_700_000_000;

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(f)
}

fn store(root: &Path) -> LocalStore {
    LocalStore::prepare(root).expect("prepare");
    LocalStore::new(root.to_owned(), UrlSigner::new(&[9; 32])).with_media_bytes_max(4 << 20)
}

/// Deterministic bytes that are not all the same (so offsets matter).
fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("list") {
        let e = e.expect("entry");
        if e.file_type().expect("type").is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

async fn create(s: &LocalStore, id: &str, data: &[u8]) {
    let req = CreateRequest {
        size: data.len() as u64,
        sha256: switchboard_media::hex(&sha256(data)),
        content_type: "application/octet-stream".to_owned(),
    };
    let meta = req
        .validate(id, 7, NOW, s.media_bytes_max())
        .expect("valid request");
    s.create_meta(&meta).await.expect("meta written");
}

#[test]
fn upload_then_read_ranges() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    // More than two IO chunks, not a multiple of one, fed in odd-sized pieces.
    let data = body(2 * IO_CHUNK_BYTES_MAX + 12_345);
    run(async {
        create(&s, "media_1", &data).await;
        let meta = s.load_meta("media_1").await.expect("meta");
        assert_eq!((meta.uploader, meta.size), (7, data.len() as u64));
        // The upload URL verifies and carries the declared size and hash.
        let target = s.upload_target(&meta, NOW, 60);
        let (path, query) = target.url.split_once('?').expect("query");
        let signed = s
            .signer()
            .verify(Method::Put, path, Some(query), NOW)
            .expect("verifies");
        let claims = signed.upload.expect("upload claims");
        // Not downloadable before the upload completes.
        assert!(matches!(s.open("media_1").await, Err(MediaError::NotFound)));
        let mut up = s
            .begin_upload("media_1", claims.size, claims.sha256)
            .await
            .expect("begins");
        for piece in data.chunks(70_001) {
            up.write(piece).await.expect("write");
        }
        assert_eq!(up.received(), data.len() as u64);
        up.finish().await.expect("verified and published");

        let (meta, blob) = s.open("media_1").await.expect("opens");
        assert_eq!(blob.len(), data.len() as u64);
        assert_eq!(meta.content_type, "application/octet-stream");
        for (h, want) in [
            (Some("bytes=0-9"), &data[..10]),
            (Some("bytes=-5"), &data[data.len() - 5..]),
            (Some("bytes=262140-262150"), &data[262_140..=262_150]),
        ] {
            let RangeOutcome::Partial { start, len } = range::parse(h, blob.len()) else {
                panic!("{h:?} is a partial range");
            };
            let got = blob.read_at(start, len as usize).await.expect("read");
            assert_eq!(&got[..], want, "{h:?}");
        }
        // A whole read in bounded chunks.
        let mut all = Vec::new();
        while (all.len() as u64) < blob.len() {
            let got = blob
                .read_at(all.len() as u64, usize::MAX)
                .await
                .expect("read");
            assert!(!got.is_empty() && got.len() <= IO_CHUNK_BYTES_MAX);
            all.extend_from_slice(&got);
        }
        assert_eq!(all, data);
        blob.close().await.expect("close");

        // A second upload of the same id is refused.
        assert!(matches!(
            s.begin_upload("media_1", claims.size, claims.sha256).await,
            Err(MediaError::AlreadyExists)
        ));
        // And the id cannot be created again.
        assert!(matches!(
            s.create_meta(&meta).await,
            Err(MediaError::AlreadyExists)
        ));
    });
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

#[test]
fn bad_uploads_leave_nothing_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    let data = body(1000);
    let sha = sha256(&data);
    run(async {
        // Too long: refused at the first byte too many.
        create(&s, "long", &data).await;
        let mut up = s.begin_upload("long", 1000, sha).await.expect("begins");
        up.write(&data).await.expect("fits");
        let err = up.write(b"x").await.expect_err("too long");
        assert_eq!(err.code(), "size_mismatch");
        drop(up);

        // Too short.
        create(&s, "short", &data).await;
        let mut up = s.begin_upload("short", 1000, sha).await.expect("begins");
        up.write(&data[..999]).await.expect("fits");
        assert_eq!(
            up.finish().await.expect_err("short").code(),
            "size_mismatch"
        );

        // Right size, wrong bytes.
        create(&s, "corrupt", &data).await;
        let mut up = s.begin_upload("corrupt", 1000, sha).await.expect("begins");
        let mut bad = data.clone();
        bad[500] ^= 1;
        up.write(&bad).await.expect("fits");
        assert_eq!(
            up.finish().await.expect_err("hash").code(),
            "sha256_mismatch"
        );

        // Claims that are not the metadata's (a URL signed for another object's size/hash).
        assert_eq!(
            s.begin_upload("corrupt", 999, sha)
                .await
                .expect_err("mismatch")
                .code(),
            "upload_url_mismatch"
        );
        // Unknown ids.
        assert!(matches!(
            s.begin_upload("nope", 1000, sha).await,
            Err(MediaError::NotFound)
        ));
        assert!(matches!(
            s.load_meta("../x").await,
            Err(MediaError::NotFound)
        ));

        for id in ["long", "short", "corrupt"] {
            assert!(
                matches!(s.open(id).await, Err(MediaError::NotFound)),
                "{id}"
            );
        }
        // After a failure the same id can still be uploaded correctly.
        let mut up = s.begin_upload("corrupt", 1000, sha).await.expect("begins");
        up.write(&data).await.expect("fits");
        up.finish().await.expect("ok");
        assert!(s.open("corrupt").await.is_ok());
    });
    assert!(files_under(&dir.path().join("objects"))
        .iter()
        .all(|f| f.ends_with("/corrupt")));
    assert_eq!(files_under(&dir.path().join("objects")).len(), 1);
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

#[test]
fn prepare_removes_abandoned_temp_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    let data = body(10);
    run(async {
        create(&s, "m", &data).await;
        let mut up = s
            .begin_upload("m", 10, sha256(&data))
            .await
            .expect("begins");
        up.write(&data[..5]).await.expect("fits");
        // A crash mid-upload: the temp file stays (forget skips the cleanup in Drop).
        std::mem::forget(up);
    });
    assert_eq!(files_under(&dir.path().join("tmp")).len(), 1);
    LocalStore::prepare(dir.path()).expect("prepare");
    assert!(files_under(&dir.path().join("tmp")).is_empty());
    run(async {
        assert!(matches!(s.open("m").await, Err(MediaError::NotFound)));
        assert_eq!(s.load_meta("m").await.expect("meta kept").size, 10);
    });
}

#[test]
fn download_urls_verify_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(dir.path());
    run(async {
        create(&s, "dl", b"abc").await;
        let meta = s.load_meta("dl").await.expect("meta");
        let t = s.download_target(&meta, NOW, 30);
        assert_eq!(t.expires_unix_s, NOW + 30);
        let (path, query) = t.url.split_once('?').expect("query");
        assert!(s
            .signer()
            .verify(Method::Get, path, Some(query), NOW + 29)
            .is_ok());
        assert!(s
            .signer()
            .verify(Method::Head, path, Some(query), NOW)
            .is_ok());
        assert!(s
            .signer()
            .verify(Method::Get, path, Some(query), NOW + 30)
            .is_err());
        assert!(s
            .signer()
            .verify(Method::Put, path, Some(query), NOW)
            .is_err());
    });
}
