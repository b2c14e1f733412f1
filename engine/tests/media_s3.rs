//! The media endpoints with the S3 backend: the server hands out presigned SigV4 URLs and the
//! bytes go straight between the client and a real S3-compatible server (`s3s-fs`, started
//! here; CI installs it, see `.ci/run` and `media/tests/s3.rs`).

mod util;

use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use switchboard_client::new_client_msg_id;
use switchboard_media::{S3Config, S3Store};
use switchboard_wire::{ChatId, Target, UserId};
use util::{Http, Server};

const ACCESS_KEY: &str = "AKIAENGINETEST";
const SECRET_KEY: &str = "engine/test/secret/key/0123456789abcdef";

#[path = "../../media/tests/support/s3s_fs.rs"]
mod s3s_fs;

/// One request to an absolute `http://` URL with `Connection: close`; (status, body).
fn s3_request(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, target) = rest.split_at(rest.find('/').expect("path"));
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "content-length") && method == "PUT" {
        req.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let mut body = raw[end..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut b = &body[..];
        loop {
            let eol = b.windows(2).position(|w| w == b"\r\n").unwrap();
            let n =
                usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
            b = &b[eol + 2..];
            if n == 0 {
                break;
            }
            out.extend_from_slice(&b[..n]);
            b = &b[n + 2..];
        }
        body = out;
    }
    (status, body)
}

#[test]
fn presigned_s3_upload_and_download_through_the_api() {
    let s3 = s3s_fs::start(ACCESS_KEY, SECRET_KEY);
    let endpoint = format!("http://{}", s3.addr);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let store = S3Store::new(&S3Config {
        endpoint: endpoint.clone(),
        bucket: "sb-media".into(),
        region: "us-east-1".into(),
        access_key: ACCESS_KEY.into(),
        secret_key: SECRET_KEY.into(),
        path_style: true,
    })
    .unwrap();
    let (st, _) = s3_request("PUT", &store.presign_create_bucket(now, 60).url, &[], b"");
    assert_eq!(st, 200);

    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("switchboard.toml");
    std::fs::write(
        &cfg,
        format!(
            "media_backend = \"s3\"\nmedia_s3_endpoint = \"{endpoint}\"\nmedia_s3_bucket = \"sb-media\"\n\
             media_s3_access_key = \"{ACCESS_KEY}\"\nmedia_s3_secret_key = \"{SECRET_KEY}\"\n"
        ),
    )
    .unwrap();
    let server = Server::start_with(2, &["--config", cfg.to_str().unwrap()]);
    let (alice, bob) = (server.token(1, 1), server.token(2, 1));
    let mut c = Http::connect(&server.addr);

    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 239) as u8).collect();
    let sha: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let r = c.request(
        "POST",
        "/v1/media",
        Some(&alice),
        Some(&json!({"size": data.len(), "sha256": sha, "content_type": "video/mp4"})),
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    let j = r.json();
    let id = j["media_id"].as_str().unwrap().to_owned();
    let upload_url = j["upload_url"].as_str().unwrap().to_owned();
    assert!(
        upload_url.starts_with(&format!("{endpoint}/sb-media/media/{id}?X-Amz-")),
        "{upload_url}"
    );
    let headers: Vec<(String, String)> = j["upload_headers"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect();
    assert_eq!(headers.len(), 3, "{headers:?}");

    // This server does not take the bytes in S3 mode.
    let r = c.request(
        "GET",
        &format!("/v1/media/{id}/blob?exp=1&sig=x"),
        None,
        None,
    );
    assert_eq!(r.status, 404);

    // Wrong bytes are refused by S3 (checksum); the right ones are stored.
    let mut wrong = data.clone();
    wrong[0] ^= 1;
    assert_eq!(s3_request("PUT", &upload_url, &headers, &wrong).0, 400);
    assert_eq!(s3_request("PUT", &upload_url, &headers, &data).0, 200);

    // Bob gets a URL once Alice sent him the id.
    let chat = ChatId::direct(UserId(1), UserId(2));
    let url_req = json!({"chat_id": chat.0});
    let r = c.request(
        "POST",
        &format!("/v1/media/{id}/url"),
        Some(&bob),
        Some(&url_req),
    );
    assert_eq!(r.status, 403);
    let mut ws = server.connect(1, 1);
    let mid = new_client_msg_id();
    ws.send_with_media(mid, Target::Peer(UserId(2)), b"x", vec![id.clone()])
        .unwrap();
    ws.wait_ack(mid, Duration::from_secs(10)).unwrap();
    let r = c.request(
        "POST",
        &format!("/v1/media/{id}/url"),
        Some(&bob),
        Some(&url_req),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let url = r.json()["url"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&endpoint));
    let (st, got) = s3_request("GET", &url, &[], b"");
    assert_eq!(st, 200);
    assert!(got == data, "S3 returned other bytes");
    // The presigned URL is bound to its object and signature.
    let (st, _) = s3_request("GET", &url.replace(&id, "other"), &[], b"");
    assert_eq!(st, 403);
}
