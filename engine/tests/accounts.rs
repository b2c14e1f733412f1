//! Phone + code login, tokens, revocation, profiles, contacts and the key directory, over real
//! sockets on a 2-core server (so most calls cross cores), including a restart.

mod util;

use serde_json::json;
use std::time::Duration;
use switchboard_client::Client;
use util::{login, Http, Server, SmsGateway, T};

fn server(sms: &SmsGateway) -> Server {
    let flags = sms.flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Server::start_with(2, &flags)
}

#[test]
fn register_and_verify_validate_input_and_count_checks() {
    let sms = SmsGateway::start();
    let server = server(&sms);
    let mut c = Http::connect(&server.addr);
    for phone in [
        "14155550123",
        "+0415",
        "+1 415 555 0123",
        "+1234567890123456",
    ] {
        let r = c.request(
            "POST",
            "/v1/auth/register",
            None,
            Some(&json!({ "phone": phone })),
        );
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_phone".into()),
            "{phone}"
        );
    }
    let r = c.request(
        "POST",
        "/v1/auth/register",
        None,
        Some(&json!({"phon": "+1"})),
    );
    assert_eq!((r.status, r.code()), (400, "malformed_json".into()));
    c.send_raw(b"POST /v1/auth/register HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}");
    let r = c.read_response(false);
    assert_eq!((r.status, r.code()), (415, "unsupported_media_type".into()));

    let phone = "+14155550101";
    let r = c.request(
        "POST",
        "/v1/auth/register",
        None,
        Some(&json!({ "phone": phone })),
    );
    assert_eq!(r.status, 202);
    assert_eq!(r.json()["expires_in_s"], 300);
    let code = sms.code_for(phone);
    assert_eq!(code.len(), 6);
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let verify = |c: &mut Http, code: &str, name: &str| {
        c.request(
            "POST",
            "/v1/auth/verify",
            None,
            Some(&json!({"phone": phone, "code": code, "device_name": name})),
        )
    };
    let r = verify(&mut c, "12345", "phone");
    assert_eq!((r.status, r.code()), (400, "invalid_code".into()));
    let r = verify(&mut c, &code, "bad\nname");
    assert_eq!((r.status, r.code()), (400, "invalid_device_name".into()));
    for left in [3, 2, 1] {
        let r = verify(&mut c, wrong, "phone");
        assert_eq!((r.status, r.code()), (401, "code_incorrect".into()));
        assert_eq!(r.json()["checks_left"], left);
    }
    let r = verify(&mut c, wrong, "phone");
    assert_eq!((r.status, r.code()), (429, "too_many_attempts".into()));
    // The code is gone even though it was right.
    let r = verify(&mut c, &code, "phone");
    assert_eq!((r.status, r.code()), (401, "code_expired".into()));

    // Registration per phone: burst 3 (one used above), then 429 with Retry-After.
    for _ in 0..2 {
        let r = c.request(
            "POST",
            "/v1/auth/register",
            None,
            Some(&json!({ "phone": phone })),
        );
        assert_eq!(r.status, 202);
    }
    let r = c.request(
        "POST",
        "/v1/auth/register",
        None,
        Some(&json!({ "phone": phone })),
    );
    assert_eq!((r.status, r.code()), (429, "rate_limited".into()));
    assert!(r
        .header("retry-after")
        .is_some_and(|v| v.parse::<u64>().unwrap() > 0));
}

#[test]
fn login_profile_contacts_refresh_revocation_and_restart() {
    let sms = SmsGateway::start();
    let mut server = server(&sms);
    let alice = login(&server, &sms, "+14155550001", "Alice's phone");
    let bob = login(&server, &sms, "+4930123456", "Bob's phone");
    assert_eq!(alice["new_user"], true);
    assert_eq!(alice["device_id"], 1);
    let (a_id, b_id) = (
        alice["user_id"].as_u64().unwrap(),
        bob["user_id"].as_u64().unwrap(),
    );
    assert_ne!(a_id, b_id);
    let a_tok = alice["token"].as_str().unwrap().to_string();
    let b_tok = bob["token"].as_str().unwrap().to_string();

    // The token is the WebSocket's token: Alice and Bob chat.
    let mut a_ws = Client::connect(&server.addr, &a_tok).expect("alice ws");
    let mut b_ws = Client::connect(&server.addr, &b_tok).expect("bob ws");
    a_ws.send_and_wait_ack(
        switchboard_wire::Target::Peer(switchboard_wire::UserId(b_id)),
        b"hi",
        T,
    )
    .unwrap();
    let got = (0..100).find_map(|_| match b_ws.recv(Duration::from_millis(100)).unwrap() {
        Some(switchboard_wire::ServerFrame::Message(m)) => Some(m.payload),
        _ => None,
    });
    assert_eq!(got.as_deref(), Some(&b"hi"[..]));

    let mut c = Http::connect(&server.addr);
    let r = c.request("GET", "/v1/users/me", None, None);
    assert_eq!((r.status, r.code()), (401, "unauthorized".into()));
    let r = c.request("GET", "/v1/users/me", Some("garbage"), None);
    assert_eq!(r.status, 401);
    let r = c.request("GET", "/v1/users/me", Some(&a_tok), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["phone"], "+14155550001");
    assert_eq!(r.json()["user_id"], a_id);
    let r = c.request(
        "PUT",
        "/v1/users/me",
        Some(&a_tok),
        Some(&json!({"display_name": "Alice", "about": "hi there", "avatar_media_id": "abc_123"})),
    );
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["display_name"], "Alice");
    for bad in [
        json!({"display_name": "x".repeat(65)}),
        json!({"about": "a\u{7}b"}),
        json!({"avatar_media_id": "../etc"}),
    ] {
        let r = c.request("PUT", "/v1/users/me", Some(&a_tok), Some(&bad));
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_profile".into()),
            "{bad}"
        );
    }
    let r = c.request(
        "PUT",
        "/v1/users/me",
        Some(&a_tok),
        Some(&json!({"nick": 1})),
    );
    assert_eq!((r.status, r.code()), (400, "malformed_json".into()));
    // Bob sees Alice's profile, without her phone.
    let r = c.request("GET", &format!("/v1/users/{a_id}"), Some(&b_tok), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["display_name"], "Alice");
    assert_eq!(r.json()["avatar_media_id"], "abc_123");
    assert!(r.json().get("phone").is_none());
    for missing in ["/v1/users/999999999", "/v1/users/abc", "/v1/users/0"] {
        let r = c.request("GET", missing, Some(&b_tok), None);
        assert_eq!((r.status, r.code()), (404, "not_found".into()), "{missing}");
    }

    // Contacts: only numbers with accounts come back.
    let r = c.request(
        "POST",
        "/v1/contacts/lookup",
        Some(&b_tok),
        Some(&json!({"phones": ["+14155550001", "+14155559999", "+4930123456"]})),
    );
    assert_eq!(r.status, 200);
    let users = r.json()["users"].as_array().unwrap().clone();
    assert_eq!(users.len(), 2, "{users:?}");
    assert!(users.contains(&json!({"phone": "+14155550001", "user_id": a_id})));
    let r = c.request(
        "POST",
        "/v1/contacts/lookup",
        Some(&b_tok),
        Some(&json!({"phones": ["415"]})),
    );
    assert_eq!((r.status, r.code()), (400, "invalid_phone".into()));

    // A second device for Alice; the device list shows both.
    let laptop = login(&server, &sms, "+14155550001", "laptop");
    assert_eq!(
        (laptop["user_id"].as_u64(), laptop["device_id"].as_u64()),
        (Some(a_id), Some(2))
    );
    assert_eq!(laptop["new_user"], false);
    let l_tok = laptop["token"].as_str().unwrap().to_string();
    let r = c.request("GET", "/v1/devices", Some(&a_tok), None);
    assert_eq!(
        r.json(),
        json!([{"device_id": 1, "name": "Alice's phone"}, {"device_id": 2, "name": "laptop"}])
    );

    // Refresh: a new token; the old one is revoked on every core, for the API and the WS.
    let r = c.request("POST", "/v1/auth/refresh", Some(&a_tok), None);
    assert_eq!(r.status, 200);
    let a_tok2 = r.json()["token"].as_str().unwrap().to_string();
    assert_ne!(a_tok2, a_tok);
    for _ in 0..4 {
        // Fresh connections land on either core.
        let mut fresh = Http::connect(&server.addr);
        assert_eq!(
            fresh
                .request("GET", "/v1/users/me", Some(&a_tok), None)
                .status,
            401
        );
        assert_eq!(
            fresh
                .request("GET", "/v1/users/me", Some(&a_tok2), None)
                .status,
            200
        );
        assert!(
            Client::connect(&server.addr, &a_tok).is_err(),
            "revoked token upgraded"
        );
    }

    // Removing the laptop revokes its tokens and closes its live connection.
    let mut l_ws = Client::connect(&server.addr, &l_tok).expect("laptop ws");
    l_ws.ping_pong(1, T).unwrap();
    let r = c.request("DELETE", "/v1/devices/2", Some(&a_tok2), None);
    assert_eq!(r.status, 204);
    let r = c.request("DELETE", "/v1/devices/2", Some(&a_tok2), None);
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    assert_eq!(
        c.request("GET", "/v1/users/me", Some(&l_tok), None).status,
        401
    );
    let closed = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        l_ws.ping_pong(2, Duration::from_millis(200)).is_err()
    });
    assert!(closed, "the removed device's WebSocket stays open");
    assert!(Client::connect(&server.addr, &l_tok).is_err());

    // Bob logs out.
    assert_eq!(
        c.request("POST", "/v1/auth/logout", Some(&b_tok), None)
            .status,
        204
    );
    assert_eq!(
        c.request("GET", "/v1/users/me", Some(&b_tok), None).status,
        401
    );

    // Everything is durable: restart, same users, revocations still in force.
    drop((a_ws, b_ws, l_ws));
    server.restart();
    let mut c = Http::connect(&server.addr);
    let r = c.request("GET", "/v1/users/me", Some(&a_tok2), None);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["display_name"], "Alice");
    for revoked in [&a_tok, &l_tok, &b_tok] {
        assert_eq!(
            c.request("GET", "/v1/users/me", Some(revoked), None).status,
            401
        );
        assert!(Client::connect(&server.addr, revoked).is_err());
    }
    let r = c.request("GET", "/v1/devices", Some(&a_tok2), None);
    assert_eq!(r.json(), json!([{"device_id": 1, "name": "Alice's phone"}]));
    // Logging in again: same user, a device id never used before.
    let again = login(&server, &sms, "+14155550001", "new laptop");
    assert_eq!(
        (again["user_id"].as_u64(), again["device_id"].as_u64()),
        (Some(a_id), Some(3))
    );
    let carol = login(&server, &sms, "+14155550002", "phone");
    let carol_id = carol["user_id"].as_u64().unwrap();
    assert!(
        carol_id != a_id && carol_id != b_id,
        "user ids are never reused"
    );
}

fn keys_body(identity: bool, first_id: u32, n: u32) -> serde_json::Value {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut v = json!({
        "one_time_prekeys": (first_id..first_id + n)
            .map(|i| json!({"key_id": i, "public_key": b64(&[i as u8; 32])}))
            .collect::<Vec<_>>(),
    });
    if identity {
        v["identity_key"] = json!(b64(&[9u8; 33]));
        v["signed_prekey"] =
            json!({"key_id": 1, "public_key": b64(&[1u8; 32]), "signature": b64(&[2u8; 64])});
    }
    v
}

#[test]
fn key_directory_consumes_prekeys_durably() {
    let sms = SmsGateway::start();
    let mut server = server(&sms);
    let alice = login(&server, &sms, "+14155550011", "phone");
    let bob = login(&server, &sms, "+14155550012", "phone");
    let a_id = alice["user_id"].as_u64().unwrap();
    let a_tok = alice["token"].as_str().unwrap().to_string();
    let b_tok = bob["token"].as_str().unwrap().to_string();
    let mut a_ws = Client::connect(&server.addr, &a_tok).expect("alice ws");
    let mut c = Http::connect(&server.addr);
    let path = format!("/v1/keys/{a_id}/1");
    let r = c.request("GET", &path, Some(&b_tok), None);
    assert_eq!((r.status, r.code()), (404, "not_found".into()));
    let r = c.request(
        "PUT",
        "/v1/keys",
        Some(&a_tok),
        Some(&keys_body(false, 100, 3)),
    );
    assert_eq!((r.status, r.code()), (400, "missing_keys".into()));
    let r = c.request(
        "PUT",
        "/v1/keys",
        Some(&a_tok),
        Some(&json!({"identity_key": "!!"})),
    );
    assert_eq!(r.status, 400);
    let r = c.request(
        "PUT",
        "/v1/keys",
        Some(&a_tok),
        Some(&keys_body(true, 100, 12)),
    );
    assert_eq!(r.status, 200, "{:?}", r.json());
    assert_eq!(r.json()["one_time_prekeys"], 12);
    let r = c.request(
        "PUT",
        "/v1/keys",
        Some(&a_tok),
        Some(&keys_body(false, 105, 1)),
    );
    assert_eq!((r.status, r.code()), (400, "duplicate_key_id".into()));
    // Bob fetches: oldest one-time prekey first, each once.
    for expect in [100, 101, 102] {
        let r = c.request("GET", &path, Some(&b_tok), None);
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["one_time_prekey"]["key_id"], expect);
        assert_eq!(r.json()["user_id"], a_id);
    }
    let r = c.request("GET", "/v1/keys", Some(&a_tok), None);
    assert_eq!(r.json(), json!({"one_time_prekeys": 9, "low": true}));
    // Alice's device was told over its WebSocket, once, when the count dropped below 10.
    let mut notices = Vec::new();
    while let Some(f) = a_ws.recv(Duration::from_millis(300)).unwrap() {
        if let switchboard_wire::ServerFrame::PrekeysLow { device, remaining } = f {
            notices.push((device.0, remaining));
        }
    }
    assert_eq!(notices, vec![(1, 9)]);
    drop(a_ws);
    server.restart();
    let mut c = Http::connect(&server.addr);
    let r = c.request("GET", &path, Some(&b_tok), None);
    assert_eq!(
        r.json()["one_time_prekey"]["key_id"],
        103,
        "consumed keys stay consumed"
    );
    let r = c.request(
        "PUT",
        "/v1/keys",
        Some(&a_tok),
        Some(&keys_body(false, 200, 5)),
    );
    assert_eq!(r.json()["one_time_prekeys"], 13);
    let r = c.request("GET", "/v1/keys", Some(&a_tok), None);
    assert_eq!(r.json(), json!({"one_time_prekeys": 13, "low": false}));
}

#[test]
fn registered_devices_per_user_are_limited() {
    let sms = SmsGateway::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!("{}devices_per_user_max = 2\n", util::UNLIMITED_RATES),
    )
    .unwrap();
    let mut flags = sms.flags();
    flags.extend(["--config".to_string(), cfg.to_str().unwrap().to_string()]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = Server::start_with(2, &flags);
    let phone = "+14155550021";
    let first = login(&server, &sms, phone, "one");
    login(&server, &sms, phone, "two");
    let mut c = Http::connect(&server.addr);
    let r = c.request(
        "POST",
        "/v1/auth/register",
        None,
        Some(&json!({ "phone": phone })),
    );
    assert_eq!(r.status, 202);
    let code = sms.code_for(phone);
    let r = c.request(
        "POST",
        "/v1/auth/verify",
        None,
        Some(&json!({"phone": phone, "code": code, "device_name": "three"})),
    );
    assert_eq!((r.status, r.code()), (409, "too_many_devices".into()));
    // Logging out removes the device (a new login would need another code, which the
    // per-phone registration limit now delays by minutes).
    let tok = first["token"].as_str().unwrap();
    assert_eq!(
        c.request("POST", "/v1/auth/logout", Some(tok), None).status,
        204
    );
    let r = c.request("GET", "/v1/devices", Some(tok), None);
    assert_eq!(r.status, 401);
}
