//! Push notifications through a real server process: offline recipients get a webhook push
//! (collapsed, badge from the read cursor, no plaintext), online ones do not; and the
//! `switchboard push dlq list|replay` commands on a data directory.

mod util;

use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard_push::dlq::{self, DeadLetterLog};
use switchboard_push::registry::Registry;
use switchboard_push::service::push_dir;
use switchboard_push::{DeadLetter, Notification, Platform, Target};
use switchboard_wire::{ChatId, Target as To, UserId};
use util::{login, Http, Server, T};

const SECRET: &str = "push webhook secret for the tests";

/// A webhook receiver: one request per connection (`Connection: close`), answers by token
/// (`gone` → 410, `down` → 500, else 200), records the JSON bodies.
fn receiver() -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let got: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut len = 0usize;
            let mut ts = 0u64;
            let mut sig = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if let Some(v) = lower.strip_prefix("x-switchboard-timestamp:") {
                    ts = v.trim().parse().unwrap();
                }
                if let Some(v) = lower.strip_prefix("x-switchboard-signature:") {
                    sig = v.trim().to_owned();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                continue;
            }
            assert!(
                switchboard_api::sign::verify_webhook_signature(
                    SECRET.as_bytes(),
                    ts,
                    &body,
                    &sig,
                    ts
                ),
                "bad webhook signature"
            );
            let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let status = match j["token"].as_str().unwrap() {
                "gone" => "410 Gone",
                "down" => "500 Internal Server Error",
                _ => "200 OK",
            };
            g.lock().unwrap().push(j);
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, got)
}

fn config(dir: &Path, url: &str) -> std::path::PathBuf {
    let p = dir.join("push.toml");
    std::fs::write(
        &p,
        format!(
            "[push]\ncollapse_delay_ms = 100\nbackoff_base_ms = 50\n\n[push.webhook]\nurl = \"{url}\"\nsecret = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    p
}

fn wait_for(got: &Mutex<Vec<serde_json::Value>>, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + T;
    loop {
        let g = got.lock().unwrap().clone();
        if g.len() >= n {
            return g;
        }
        assert!(
            Instant::now() < deadline,
            "waited for {n} pushes, got {g:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn offline_recipient_gets_a_collapsed_push_online_one_does_not() {
    let (url, got) = receiver();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &url);
    let server = Server::start_with(2, &["--config", cfg.to_str().unwrap()]);
    let r = Http::connect(&server.addr).request(
        "POST",
        "/v1/push/tokens",
        Some(&server.token(2, 1)),
        Some(&json!({"platform": "webhook", "token": "dev-b"})),
    );
    assert_eq!(r.status, 204);
    let chat = ChatId::direct(UserId(1), UserId(2));
    let mut a = server.connect(1, 1);
    a.send_and_wait_ack(To::Peer(UserId(2)), b"secret one", T)
        .unwrap();
    a.send_and_wait_ack(To::Peer(UserId(2)), b"secret two", T)
        .unwrap();
    // Both within the collapse window, or a second push with the count so far.
    wait_for(&got, 1);
    std::thread::sleep(Duration::from_millis(300));
    let pushes = got.lock().unwrap().clone();
    let last = pushes.last().unwrap();
    assert_eq!(last["user_id"], 2);
    assert_eq!(last["device_id"], 1);
    assert_eq!(last["token"], "dev-b");
    let n = &last["notification"];
    assert_eq!(n["chat"], chat.0);
    assert_eq!(n["count"], 2, "{last}");
    assert_eq!(n["badge"], 2);
    assert_eq!(n["sender"], 1);
    assert_eq!(n["last_seq"], 2);
    for p in &pushes {
        assert!(!p.to_string().contains("secret"), "plaintext leaked: {p}");
    }
    let before = pushes.len();

    // B online: no push. B reads seq 3, goes away; the next push counts only seq 4.
    let mut b = server.connect(2, 1);
    a.send_and_wait_ack(To::Peer(UserId(2)), b"three", T)
        .unwrap();
    b.mark_read(chat, switchboard_wire::Seq(3)).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        got.lock().unwrap().len(),
        before,
        "pushed to an online user"
    );
    drop(b);
    std::thread::sleep(Duration::from_millis(400));
    a.send_and_wait_ack(To::Peer(UserId(2)), b"four", T)
        .unwrap();
    let pushes = wait_for(&got, before + 1);
    let n = &pushes[before]["notification"];
    assert_eq!(n["count"], 1, "{n}");
    assert_eq!(n["badge"], 1);
    assert_eq!(n["last_seq"], 4);
}

fn letter(token: &str) -> DeadLetter {
    DeadLetter {
        at_unix_ms: 1,
        target: Target {
            user: 5,
            device: 1,
            platform: Platform::Webhook,
            token: token.into(),
        },
        notification: Notification {
            chat: 9,
            count: 1,
            sender: Some(4),
            sender_name: None,
            last_seq: 1,
            badge: 1,
            title: "New messages".into(),
            body: "1 new message from user 4 in chat 9".into(),
            collapse_id: "chat-9".into(),
        },
        attempts: 6,
        error: "HTTP 503".into(),
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn dlq_list_and_replay() {
    let (url, got) = receiver();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let dir = push_dir(&data);
    {
        let mut reg = Registry::open(&dir, 0).unwrap();
        reg.set_token(5, 1, Platform::Webhook, "gone").unwrap();
        let (mut log, _) = DeadLetterLog::open(&dir).unwrap();
        for t in ["ok", "gone", "down"] {
            log.append(&letter(t)).unwrap();
        }
    }
    let d = data.to_str().unwrap();
    let (ok, out, err) = cli(&["push", "dlq", "list", "--data-dir", d]);
    assert!(ok, "{err}");
    let listed: Vec<DeadLetter> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(listed, vec![letter("ok"), letter("gone"), letter("down")]);
    assert!(err.contains("3 dead letter(s)"), "{err}");

    let cfg = config(tmp.path(), &url);
    let c = cfg.to_str().unwrap();
    let (ok, out, err) = cli(&["push", "dlq", "replay", "--data-dir", d, "--config", c]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "delivered 1, tokens removed 1, still failing 1");
    assert_eq!(got.lock().unwrap().len(), 3);
    let left = dlq::list(&dir).unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].target.token, "down");
    assert_eq!(left[0].attempts, 7);
    assert!(left[0].error.contains("500"));
    // The dead token left the registry.
    assert!(Registry::open(&dir, 0).unwrap().targets(5).is_empty());
    // Without a webhook sink the letter stays and says why.
    let (ok, out, _) = cli(&["push", "dlq", "replay", "--data-dir", d]);
    assert!(ok);
    assert_eq!(out.trim(), "delivered 0, tokens removed 0, still failing 1");
    assert_eq!(
        dlq::list(&dir).unwrap()[0].error,
        "no webhook sink configured"
    );
}

#[test]
fn token_and_mute_endpoints() {
    let (url, got) = receiver();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &url);
    let mut server = Server::start_with(1, &["--config", cfg.to_str().unwrap()]);
    let (tb, ta) = (server.token(2, 3), server.token(1, 1));
    let mut h = Http::connect(&server.addr);
    let body = json!({"platform": "webhook", "token": "dev-b"});
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<&'a str>,
        serde_json::Value,
        u16,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        (
            "POST",
            "/v1/push/tokens",
            None,
            body.clone(),
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/v1/push/tokens",
            Some("nope"),
            body.clone(),
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/v1/push/tokens",
            Some(&tb),
            json!({"platform": "sms", "token": "x"}),
            400,
            "invalid_push_token",
        ),
        (
            "POST",
            "/v1/push/tokens",
            Some(&tb),
            json!({"platform": "apns", "token": "not hex"}),
            400,
            "invalid_push_token",
        ),
        (
            "POST",
            "/v1/push/tokens",
            Some(&tb),
            json!({"platform": "fcm", "token": ""}),
            400,
            "invalid_push_token",
        ),
        (
            "POST",
            "/v1/push/tokens",
            Some(&tb),
            json!({"platform": "fcm"}),
            400,
            "malformed_json",
        ),
        (
            "PUT",
            "/v1/chats/x1/mute",
            Some(&tb),
            json!({"until_unix_s": 1}),
            404,
            "not_found",
        ),
        (
            "PUT",
            "/v1/chats/5/mute",
            Some(&tb),
            json!({"until": 1}),
            400,
            "malformed_json",
        ),
        (
            "PUT",
            "/v1/chats/5/mute",
            None,
            json!({"until_unix_s": 1}),
            401,
            "unauthorized",
        ),
        (
            "GET",
            "/v1/push/tokens",
            Some(&tb),
            json!(null),
            405,
            "method_not_allowed",
        ),
    ];
    for (method, path, token, body, status, code) in cases {
        let body = (!body.is_null()).then_some(body);
        let r = h.request(method, path, token, body.as_ref());
        assert_eq!(
            (r.status, r.code()),
            (status, code.to_owned()),
            "{method} {path} {body:?}"
        );
    }
    let r = h.request("POST", "/v1/push/tokens", Some(&tb), Some(&body));
    assert_eq!(r.status, 204);
    // Muted until far in the future: a message to offline B pushes nothing.
    let chat = ChatId::direct(UserId(1), UserId(2));
    let mute = format!("/v1/chats/{}/mute", chat.0);
    let r = h.request(
        "PUT",
        &mute,
        Some(&tb),
        Some(&json!({"until_unix_s": 4_000_000_000u64})),
    );
    assert_eq!(r.status, 204);
    let mut a = switchboard_client::Client::connect(&server.addr, &ta).unwrap();
    a.send_and_wait_ack(To::Peer(UserId(2)), b"1", T).unwrap();
    std::thread::sleep(Duration::from_millis(400));
    assert!(got.lock().unwrap().is_empty(), "pushed a muted chat");
    // Unmuted: the next message pushes (count 2: both are unread).
    let r = h.request("PUT", &mute, Some(&tb), Some(&json!({"until_unix_s": 0})));
    assert_eq!(r.status, 204);
    a.send_and_wait_ack(To::Peer(UserId(2)), b"2", T).unwrap();
    let p = wait_for(&got, 1);
    assert_eq!(p[0]["device_id"], 3);
    assert_eq!(p[0]["notification"]["count"], 2);
    let m = h.request("GET", "/metrics", None, None);
    let text = String::from_utf8(m.body).unwrap();
    assert!(text.contains("switchboard_push_muted_total 1"), "{text}");
    assert!(text.contains("switchboard_push_events_total 2"), "{text}");
    // Registrations are durable: the registry on disk has the token; DELETE removes it.
    server.kill9();
    let targets = Registry::open(&push_dir(&server.data_dir), 0)
        .unwrap()
        .targets(2);
    assert_eq!(targets.len(), 1);
    assert_eq!((targets[0].device, targets[0].token.as_str()), (3, "dev-b"));
    server.restart();
    let mut h = Http::connect(&server.addr);
    let r = h.request("DELETE", "/v1/push/tokens", Some(&tb), None);
    assert_eq!(r.status, 204);
    server.kill9();
    assert!(Registry::open(&push_dir(&server.data_dir), 0)
        .unwrap()
        .targets(2)
        .is_empty());
}

#[test]
fn group_message_pushes_offline_members_only_and_never_the_sender() {
    let (url, got) = receiver();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), &url);
    let server = Server::start_with(2, &["--config", cfg.to_str().unwrap()]);
    let mut h = Http::connect(&server.addr);
    // The sender's second device and two members have tokens; member 4 is online.
    for (user, device) in [(1, 2), (2, 1), (3, 1), (4, 1)] {
        let r = h.request(
            "POST",
            "/v1/push/tokens",
            Some(&server.token(user, device)),
            Some(&json!({"platform": "webhook", "token": format!("u{user}")})),
        );
        assert_eq!(r.status, 204);
    }
    let mut a = server.connect(1, 1);
    let _d = server.connect(4, 1);
    std::thread::sleep(Duration::from_millis(200));
    let info = a
        .create_group("g", &[UserId(2), UserId(3), UserId(4)], false, T)
        .unwrap();
    // The creation event alone pushes nothing.
    std::thread::sleep(Duration::from_millis(400));
    assert!(got.lock().unwrap().is_empty(), "{:?}", got.lock().unwrap());
    a.send_and_wait_ack(To::Chat(info.chat), b"hi all", T)
        .unwrap();
    wait_for(&got, 2);
    std::thread::sleep(Duration::from_millis(400));
    let pushes = got.lock().unwrap().clone();
    let mut users: Vec<u64> = pushes
        .iter()
        .map(|p| p["user_id"].as_u64().unwrap())
        .collect();
    users.sort();
    assert_eq!(users, vec![2, 3], "{pushes:?}");
    for p in &pushes {
        let n = &p["notification"];
        assert_eq!(n["chat"], info.chat.0);
        assert_eq!(n["sender"], 1);
        assert_eq!(n["last_seq"], 2);
        // The unread count comes from the read cursor, so it includes the creation event.
        assert_eq!(n["count"], 2);
    }
}

#[test]
fn logout_and_device_removal_drop_push_tokens() {
    let sms = util::SmsGateway::start();
    let flags = sms.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let mut server = Server::start_with(2, &flags);
    let phone = login(&server, &sms, "+14155550077", "phone");
    let laptop = login(&server, &sms, "+14155550077", "laptop");
    let user = phone["user_id"].as_u64().unwrap();
    let mut h = Http::connect(&server.addr);
    for who in [&phone, &laptop] {
        let r = h.request(
            "POST",
            "/v1/push/tokens",
            who["token"].as_str(),
            Some(&json!({"platform": "fcm", "token": format!("t{}", who["device_id"])})),
        );
        assert_eq!(r.status, 204);
    }
    let r = h.request("POST", "/v1/auth/logout", laptop["token"].as_str(), None);
    assert_eq!(r.status, 204);
    // A revoked token cannot register again.
    let r = h.request(
        "POST",
        "/v1/push/tokens",
        laptop["token"].as_str(),
        Some(&json!({"platform": "fcm", "token": "again"})),
    );
    assert_eq!(r.status, 401);
    server.kill9();
    let left = Registry::open(&push_dir(&server.data_dir), 0)
        .unwrap()
        .targets(user);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].device as u64, phone["device_id"].as_u64().unwrap());
    server.restart();
    let mut h = Http::connect(&server.addr);
    let path = format!("/v1/devices/{}", phone["device_id"]);
    let r = h.request("DELETE", &path, phone["token"].as_str(), None);
    assert_eq!(r.status, 204);
    server.kill9();
    assert!(Registry::open(&push_dir(&server.data_dir), 0)
        .unwrap()
        .targets(user)
        .is_empty());
}
