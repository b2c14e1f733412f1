//! Media over real sockets (local backend): create, streamed upload with size and SHA-256
//! checks, download URLs only for the uploader and members of a chat where the id was sent
//! (the grant is recorded by the chat's owner core with the message and survives a restart),
//! `Range`/`HEAD` downloads, signed-URL refusals.

mod util;

use serde_json::json;
use sha2::{Digest, Sha256};
use std::time::Duration;
use switchboard_client::new_client_msg_id;
use switchboard_wire::{ChatId, Target, UserId};
use util::{Http, HttpResponse, Server};

const T: Duration = Duration::from_secs(10);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// `PUT` of raw bytes with a Content-Length.
fn put(c: &mut Http, url: &str, bytes: &[u8]) -> HttpResponse {
    let head = format!(
        "PUT {url} HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        bytes.len()
    );
    c.send_raw(head.as_bytes());
    c.send_raw(bytes);
    c.read_response(false)
}

fn get(c: &mut Http, method: &str, url: &str, range: Option<&str>) -> HttpResponse {
    let mut head = format!("{method} {url} HTTP/1.1\r\nHost: t\r\n");
    if let Some(r) = range {
        head.push_str(&format!("Range: {r}\r\n"));
    }
    head.push_str("\r\n");
    c.send_raw(head.as_bytes());
    c.read_response(method == "HEAD")
}

fn create(c: &mut Http, token: &str, data: &[u8]) -> (String, String) {
    let r = c.request(
        "POST",
        "/v1/media",
        Some(token),
        Some(&json!({"size": data.len(), "sha256": hex(&Sha256::digest(data)), "content_type": "image/jpeg"})),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    assert_eq!(j["upload_headers"], json!({}));
    assert!(j["expires_unix_s"].as_u64().unwrap() > 1_700_000_000);
    (
        j["media_id"].as_str().unwrap().to_owned(),
        j["upload_url"].as_str().unwrap().to_owned(),
    )
}

fn url_for(c: &mut Http, token: &str, id: &str, chat: Option<ChatId>) -> HttpResponse {
    let body = chat.map(|c| json!({"chat_id": c.0}));
    c.request(
        "POST",
        &format!("/v1/media/{id}/url"),
        Some(token),
        body.as_ref(),
    )
}

#[test]
fn upload_grant_download_range_and_restart() {
    let mut server = Server::start(2);
    let (alice, bob, carol) = (server.token(1, 1), server.token(2, 1), server.token(3, 1));
    let mut c = Http::connect(&server.addr);
    // More than one 256 KiB IO chunk, not a multiple of it.
    let data = body(600_000);
    let (id, upload_url) = create(&mut c, &alice, &data);
    assert!(upload_url.starts_with(&format!("/v1/media/{id}/blob?")));

    // Not downloadable before the upload: the URL is minted, the bytes are missing.
    let r = url_for(&mut c, &alice, &id, None);
    assert_eq!(r.status, 200);
    let early = r.json()["url"].as_str().unwrap().to_owned();
    assert_eq!(get(&mut c, "GET", &early, None).status, 404);

    let r = put(&mut c, &upload_url, &data);
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    // Once only. Refused before the body is read, so the connection cannot carry another
    // request: the server closes it.
    let r = put(&mut c, &upload_url, &data);
    assert_eq!((r.status, r.code()), (409, "already_uploaded".into()));
    assert_eq!(r.header("connection"), Some("close"));
    let mut c = Http::connect(&server.addr);

    // The uploader may download: whole, ranges, HEAD.
    let url = url_for(&mut c, &alice, &id, None).json()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = get(&mut c, "GET", &url, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(r.header("content-security-policy"), Some("sandbox"));
    assert!(r.body == data, "downloaded bytes differ");
    let r = get(&mut c, "GET", &url, Some("bytes=262140-262149"));
    assert_eq!(r.status, 206);
    assert_eq!(
        r.header("content-range"),
        Some("bytes 262140-262149/600000")
    );
    assert_eq!(r.body, &data[262_140..262_150]);
    let r = get(&mut c, "GET", &url, Some("bytes=-3"));
    assert_eq!((r.status, r.body.as_slice()), (206, &data[599_997..]));
    let r = get(&mut c, "GET", &url, Some("bytes=600000-"));
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */600000"));
    let r = get(&mut c, "HEAD", &url, None);
    assert_eq!(
        (r.status, r.header("content-length")),
        (200, Some("600000"))
    );
    assert!(r.body.is_empty());
    // Keep-alive survived all of it.
    assert_eq!(c.request("GET", "/health", None, None).status, 200);

    // Signed URLs: tampered, for another object, for another method, malformed.
    let (head, sig) = url.rsplit_once("sig=").unwrap();
    let flipped = format!(
        "{head}sig={}{}",
        if sig.starts_with('A') { "B" } else { "A" },
        &sig[1..]
    );
    let r = get(&mut c, "GET", &flipped, None);
    assert_eq!((r.status, r.code()), (403, "bad_signature".into()));
    let r = get(&mut c, "GET", &url.replace(&id, "someoneelse"), None);
    assert_eq!((r.status, r.code()), (403, "bad_signature".into()));
    let r = get(&mut c, "GET", &url.replace("exp=", "exp=1"), None);
    assert_eq!(r.status, 403);
    let r = get(&mut c, "GET", &format!("/v1/media/{id}/blob"), None);
    assert_eq!((r.status, r.code()), (400, "malformed_signed_url".into()));
    let r = put(&mut c, &url, b"x");
    assert_eq!((r.status, r.code()), (400, "malformed_signed_url".into()));
    let mut c = Http::connect(&server.addr);

    // Bob: no grant yet, neither without a chat nor through his chat with Alice.
    let chat = ChatId::direct(UserId(1), UserId(2));
    let r = url_for(&mut c, &bob, &id, None);
    assert_eq!((r.status, r.code()), (403, "forbidden".into()));
    let r = url_for(&mut c, &bob, &id, Some(chat));
    assert_eq!((r.status, r.code()), (403, "forbidden".into()));

    // Alice sends it to Bob: the owner records the grant with the message.
    let mut ws = server.connect(1, 1);
    let mid = new_client_msg_id();
    ws.send_with_media(
        mid,
        Target::Peer(UserId(2)),
        b"e2e payload",
        vec![id.clone()],
    )
    .unwrap();
    let ack = ws.wait_ack(mid, T).unwrap();
    assert_eq!(ack.chat, chat);
    let r = url_for(&mut c, &bob, &id, Some(chat));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let bob_url = r.json()["url"].as_str().unwrap().to_owned();
    assert!(get(&mut c, "GET", &bob_url, None).body == data);
    // Carol is not in that chat.
    let r = url_for(&mut c, &carol, &id, Some(chat));
    assert_eq!((r.status, r.code()), (403, "forbidden".into()));
    // Unknown media, no token.
    let r = url_for(&mut c, &alice, "nosuchmedia", None);
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    let r = c.request("POST", &format!("/v1/media/{id}/url"), None, None);
    assert_eq!(r.status, 401);
    drop(ws);

    // The grant and the bytes are durable.
    server.restart();
    let mut c = Http::connect(&server.addr);
    let r = url_for(&mut c, &bob, &id, Some(chat));
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let url = r.json()["url"].as_str().unwrap().to_owned();
    let r = get(&mut c, "GET", &url, Some("bytes=0-9"));
    assert_eq!((r.status, r.body.as_slice()), (206, &data[..10]));
}

#[test]
fn bad_uploads_are_refused_and_leave_nothing() {
    let server = Server::start(1);
    let alice = server.token(1, 1);
    let mut c = Http::connect(&server.addr);
    let data = body(10_000);

    // Declared size over the limit (100 MiB default).
    let r = c.request(
        "POST",
        "/v1/media",
        Some(&alice),
        Some(&json!({"size": 100 * 1024 * 1024 + 1, "sha256": hex(&Sha256::digest(&data)), "content_type": "image/png"})),
    );
    assert_eq!((r.status, r.code()), (413, "body_too_large".into()));
    for (req, code) in [
        (
            json!({"size": 0, "sha256": "00".repeat(32), "content_type": "a/b"}),
            "invalid_size",
        ),
        (
            json!({"size": 1, "sha256": "xyz", "content_type": "a/b"}),
            "invalid_sha256",
        ),
        (
            json!({"size": 1, "sha256": "00".repeat(32), "content_type": "nope"}),
            "invalid_content_type",
        ),
        (json!({"size": 1}), "malformed_json"),
    ] {
        let r = c.request("POST", "/v1/media", Some(&alice), Some(&req));
        assert_eq!((r.status, r.code()), (400, code.to_owned()), "{req}");
    }
    let r = c.request("POST", "/v1/media", None, Some(&json!({})));
    assert_eq!(r.status, 401);

    // Wrong bytes of the right size: refused after the body, nothing published.
    let (id, url) = create(&mut c, &alice, &data);
    let mut wrong = data.clone();
    wrong[5000] ^= 0xff;
    let r = put(&mut c, &url, &wrong);
    assert_eq!((r.status, r.code()), (400, "sha256_mismatch".into()));
    let dl = url_for(&mut c, &alice, &id, None).json()["url"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(get(&mut c, "GET", &dl, None).status, 404);

    // Another length than declared: refused before the body is read; the connection closes.
    let head = format!(
        "PUT {url} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        data.len() + 1
    );
    c.send_raw(head.as_bytes());
    let r = c.read_response(false);
    assert_eq!((r.status, r.code()), (400, "size_mismatch".into()));
    assert!(c.is_closed_by_server());

    // With Expect: 100-continue a refused upload costs no body bytes: the answer comes first.
    let mut c = Http::connect(&server.addr);
    let head = format!(
        "PUT {} HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        url.replace("sig=", "sig=x")
    );
    c.send_raw(head.as_bytes());
    let r = c.read_response(false);
    assert_eq!((r.status, r.code()), (403, "bad_signature".into()));

    // The right bytes, chunked, in pieces: accepted.
    let mut c = Http::connect(&server.addr);
    let mut req =
        format!("PUT {url} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
    for piece in data.chunks(3000) {
        req.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        req.extend_from_slice(piece);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.send_raw(&req);
    let r = c.read_response(false);
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert!(get(&mut c, "GET", &dl, None).body == data);
    // No temp files left behind.
    let tmp = server.data_dir.join("media").join("tmp");
    assert_eq!(std::fs::read_dir(tmp).unwrap().count(), 0);
}
