//! Each sink against a local server started here, driven through the real push thread:
//! retries with backoff, dead letters, invalid-token removal, mutes, collapsing, replay.

mod util;

use ring::signature::{ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use switchboard_push::config::{ApnsConfig, FcmConfig, WebhookConfig};
use switchboard_push::registry::Registry;
use switchboard_push::service::{push_dir, replay, PushStats, ReplayReport};
use switchboard_push::{dlq, jwt, MessageEvent, Platform, PushConfig, PushHandle, PushService};
use util::{block_on, wait_until, Proto, Server};

const SECRET: &str = "a webhook secret, 32 bytes long!";
const RSA_PEM: &str = include_str!("fixtures/test-rsa-key.pem");

fn fast(cfg: PushConfig) -> PushConfig {
    PushConfig {
        backoff_base_ms: 40,
        backoff_max_ms: 400,
        collapse_delay_ms: 30,
        request_timeout_ms: 2_000,
        ..cfg
    }
}

fn ev(user: u64, chat: u64, sender: u64, seq: u64) -> MessageEvent {
    MessageEvent {
        user,
        chat,
        sender,
        sender_name: None,
        seq,
        unread_in_chat: seq as u32,
    }
}

fn stop(h: PushHandle, t: std::thread::JoinHandle<()>) -> Arc<PushStats> {
    let stats = h.stats.clone();
    drop(h);
    t.join().unwrap();
    stats
}

fn tokens(data: &Path, user: u64) -> Vec<String> {
    let r = Registry::open(&push_dir(data), 0).unwrap();
    let mut t: Vec<String> = r.targets(user).into_iter().map(|t| t.token).collect();
    t.sort();
    t
}

#[test]
fn webhook_signed_collapsed_retried_with_backoff() {
    // Two 503s (the second with Retry-After: 0), then 200.
    let server = Server::start(
        Proto::H1,
        Arc::new(|_req, n| match n {
            1 => (503, vec![], "busy".into()),
            2 => (503, vec![("retry-after".into(), "0".into())], "".into()),
            _ => (200, vec![], "".into()),
        }),
    );
    let data = tempfile::tempdir().unwrap();
    let cfg = fast(PushConfig {
        webhook: Some(WebhookConfig {
            url: server.url("http", "/hook"),
            secret: SECRET.into(),
        }),
        ..PushConfig::default()
    });
    let (h, t) = PushService::start(cfg, data.path()).unwrap();
    block_on(h.set_token(1, 1, Platform::Webhook, "dev-1".into())).unwrap();
    for seq in 1..=3 {
        assert!(h.notify(MessageEvent {
            sender_name: Some("Alice".into()),
            ..ev(1, 10, 7, seq)
        }));
    }
    // No token: nothing sent.
    h.notify(ev(2, 10, 7, 1));
    let reqs = server.wait_for(3);
    wait_until("delivered", || h.stats.delivered.load(Relaxed) == 1);
    for r in &reqs {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/hook");
        assert_eq!(r.header("content-type"), "application/json");
        let ts: u64 = r.header("x-switchboard-timestamp").parse().unwrap();
        assert!(switchboard_api::sign::verify_webhook_signature(
            SECRET.as_bytes(),
            ts,
            &r.body,
            r.header("x-switchboard-signature"),
            ts
        ));
        let j = r.json();
        assert_eq!(j["user_id"], 1);
        assert_eq!(j["device_id"], 1);
        assert_eq!(j["token"], "dev-1");
        let n = &j["notification"];
        assert_eq!(n["count"], 3, "{j}");
        assert_eq!(n["badge"], 3);
        assert_eq!(n["body"], "3 new messages from Alice");
        assert_eq!(n["collapse_id"], "chat-10");
    }
    // The backoff grows: first wait in [20, 40] ms, second at least [40, 80] / 2.
    let gap1 = reqs[1].at - reqs[0].at;
    assert!(gap1.as_millis() >= 20, "{gap1:?}");
    let stats = stop(h, t);
    assert_eq!(stats.retried.load(Relaxed), 2);
    assert_eq!(stats.attempts.load(Relaxed), 3);
    assert_eq!(stats.no_token.load(Relaxed), 1);
    assert_eq!(server.requests().len(), 3);
    assert!(dlq::list(&push_dir(data.path())).unwrap().is_empty());
}

#[test]
fn webhook_dead_letters_invalid_tokens_mutes_and_replay() {
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hy = healthy.clone();
    let server = Server::start(
        Proto::H1,
        Arc::new(move |req, _| {
            let token = req.json()["token"].as_str().unwrap().to_owned();
            match token.as_str() {
                "gone" => (410, vec![], "".into()),
                _ if hy.load(Relaxed) => (200, vec![], "".into()),
                _ => (500, vec![], "down".into()),
            }
        }),
    );
    let data = tempfile::tempdir().unwrap();
    let cfg = fast(PushConfig {
        webhook: Some(WebhookConfig {
            url: server.url("http", "/hook"),
            secret: SECRET.into(),
        }),
        attempts_max: 3,
        ..PushConfig::default()
    });
    let (h, t) = PushService::start(cfg.clone(), data.path()).unwrap();
    block_on(h.set_token(1, 1, Platform::Webhook, "flaky".into())).unwrap();
    block_on(h.set_token(1, 2, Platform::Webhook, "gone".into())).unwrap();
    block_on(h.mute(1, 11, u64::MAX)).unwrap();
    h.notify(ev(1, 11, 7, 1)); // muted: nothing
    h.notify(ev(1, 10, 7, 1));
    wait_until("dead letter", || h.stats.dead_lettered.load(Relaxed) == 1);
    wait_until("token removed", || {
        h.stats.tokens_removed.load(Relaxed) == 1
    });
    let stats = stop(h, t);
    assert_eq!(stats.muted.load(Relaxed), 1);
    // 3 attempts for "flaky", 1 for "gone", none for the muted chat.
    let reqs = server.requests();
    assert_eq!(reqs.len(), 4);
    assert!(reqs.iter().all(|r| r.json()["notification"]["chat"] == 10));
    assert_eq!(tokens(data.path(), 1), vec!["flaky".to_owned()]);
    let dead = dlq::list(&push_dir(data.path())).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].target.token, "flaky");
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].error.contains("500"), "{}", dead[0].error);

    // Replay while the receiver is still down: the letter stays, one attempt more.
    assert_eq!(
        replay(&cfg, data.path()).unwrap(),
        ReplayReport {
            failed: 1,
            ..ReplayReport::default()
        }
    );
    assert_eq!(dlq::list(&push_dir(data.path())).unwrap()[0].attempts, 4);
    // A running server holds the lock: replay refuses.
    let (h, t) = PushService::start(cfg.clone(), data.path()).unwrap();
    assert!(replay(&cfg, data.path()).unwrap_err().contains("locked"));
    stop(h, t);
    healthy.store(true, Relaxed);
    assert_eq!(
        replay(&cfg, data.path()).unwrap(),
        ReplayReport {
            delivered: 1,
            ..ReplayReport::default()
        }
    );
    assert!(dlq::list(&push_dir(data.path())).unwrap().is_empty());
    assert_eq!(server.requests().len(), 6);
}

#[test]
fn fcm_oauth_exchange_cached_send_and_unregistered() {
    let key = jwt::Rs256::from_pem(RSA_PEM).unwrap();
    let public = key.public_key_der();
    let exchanges = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ex = exchanges.clone();
    let server = Server::start(
        Proto::H1,
        Arc::new(move |req, n| {
            if req.path == "/token" {
                let form = String::from_utf8(req.body.clone()).unwrap();
                let assertion = form
                    .strip_prefix(
                        "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&assertion=",
                    )
                    .expect("jwt-bearer grant");
                let (h, c) = jwt::verify(assertion, &RSA_PKCS1_2048_8192_SHA256, &public)
                    .expect("assertion signed with the service account key");
                assert_eq!(h["alg"], "RS256");
                assert_eq!(c["iss"], "push@test.iam");
                assert_eq!(c["scope"], switchboard_push::sinks::FCM_SCOPE);
                assert!(c["aud"].as_str().unwrap().ends_with("/token"));
                let k = ex.fetch_add(1, Relaxed) + 1;
                return (
                    200,
                    vec![],
                    format!(
                        r#"{{"access_token":"at-{k}","expires_in":3600,"token_type":"Bearer"}}"#
                    ),
                );
            }
            assert_eq!(req.path, "/v1/projects/proj-1/messages:send");
            let msg = &req.json()["message"];
            let auth = req.header("authorization").to_owned();
            match msg["token"].as_str().unwrap() {
                "gone" => (
                    404,
                    vec![],
                    r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"errorCode":"UNREGISTERED"}]}}"#.into(),
                ),
                // The first send with token "at-1" is refused once: the sink exchanges again.
                _ if auth == "Bearer at-1" && n <= 3 => (401, vec![], "{}".into()),
                _ => {
                    assert_eq!(auth, "Bearer at-2");
                    assert_eq!(msg["android"]["collapse_key"], "chat-10");
                    assert_eq!(msg["data"]["chat_id"], "10");
                    (200, vec![], r#"{"name":"projects/proj-1/messages/1"}"#.into())
                }
            }
        }),
    );
    let data = tempfile::tempdir().unwrap();
    let sa = data.path().join("sa.json");
    std::fs::write(
        &sa,
        serde_json::json!({
            "type": "service_account",
            "project_id": "proj-1",
            "client_email": "push@test.iam",
            "private_key": RSA_PEM,
            "token_uri": server.url("http", "/token"),
        })
        .to_string(),
    )
    .unwrap();
    let cfg = fast(PushConfig {
        fcm: Some(FcmConfig {
            service_account_file: sa,
            endpoint: server.url("http", ""),
            token_uri: None,
        }),
        ..PushConfig::default()
    });
    let (h, t) = PushService::start(cfg, data.path()).unwrap();
    block_on(h.set_token(1, 1, Platform::Fcm, "good".into())).unwrap();
    block_on(h.set_token(1, 2, Platform::Fcm, "gone".into())).unwrap();
    h.notify(ev(1, 10, 7, 1));
    wait_until("delivered", || h.stats.delivered.load(Relaxed) == 1);
    wait_until("removed", || h.stats.tokens_removed.load(Relaxed) == 1);
    // Later sends reuse the cached access token.
    h.notify(ev(1, 10, 7, 2));
    wait_until("delivered", || h.stats.delivered.load(Relaxed) == 2);
    let stats = stop(h, t);
    assert_eq!(
        exchanges.load(Relaxed),
        2,
        "one exchange, one after the 401"
    );
    assert_eq!(stats.retried.load(Relaxed), 1);
    assert_eq!(tokens(data.path(), 1), vec!["good".to_owned()]);
}

fn apns_test(proto: Proto, scheme: &str, host: &str, ca: Option<String>) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let signer = jwt::Es256::from_pem(&kp.serialize_pem(), "KID1").unwrap();
    let public = signer.public_key();
    let failed_once = std::sync::atomic::AtomicBool::new(false);
    let server = Server::start(
        proto,
        Arc::new(move |req, _| {
            assert_eq!(req.version, hyper::Version::HTTP_2);
            assert_eq!(req.method, "POST");
            let auth = req.header("authorization");
            let (h, c) = jwt::verify(
                auth.strip_prefix("bearer ").unwrap(),
                &ECDSA_P256_SHA256_FIXED,
                &public,
            )
            .expect("provider token signed with the .p8 key");
            assert_eq!(h["alg"], "ES256");
            assert_eq!(h["kid"], "KID1");
            assert_eq!(c["iss"], "TEAM1");
            assert_eq!(req.header("apns-topic"), "app.switchboard");
            assert_eq!(req.header("apns-push-type"), "alert");
            assert_eq!(req.header("apns-collapse-id"), "chat-10");
            let aps = &req.json()["aps"];
            assert_eq!(aps["badge"], 1);
            assert_eq!(aps["alert"]["body"], "1 new message from user 7 in chat 10");
            match req.path.as_str() {
                "/3/device/aaaa" if !failed_once.swap(true, Relaxed) => {
                    (503, vec![], r#"{"reason":"ServiceUnavailable"}"#.into())
                }
                "/3/device/aaaa" => (200, vec![("apns-id".into(), "x".into())], "".into()),
                "/3/device/bbbb" => (400, vec![], r#"{"reason":"BadDeviceToken"}"#.into()),
                "/3/device/cccc" => (
                    410,
                    vec![],
                    r#"{"reason":"Unregistered","timestamp":1}"#.into(),
                ),
                p => panic!("unexpected path {p}"),
            }
        }),
    );
    let data = tempfile::tempdir().unwrap();
    let key_file = data.path().join("AuthKey_KID1.p8");
    std::fs::write(&key_file, kp.serialize_pem()).unwrap();
    let ca_file = ca.map(|pem| {
        let p = data.path().join("ca.pem");
        std::fs::write(&p, pem).unwrap();
        p
    });
    let cfg = fast(PushConfig {
        apns: Some(ApnsConfig {
            key_file,
            key_id: "KID1".into(),
            team_id: "TEAM1".into(),
            topic: "app.switchboard".into(),
            endpoint: format!("{scheme}://{host}:{}", server.addr.port()),
        }),
        ca_file,
        ..PushConfig::default()
    });
    let (h, t) = PushService::start(cfg, data.path()).unwrap();
    for (d, tok) in [(1, "aaaa"), (2, "bbbb"), (3, "cccc")] {
        block_on(h.set_token(1, d, Platform::Apns, tok.into())).unwrap();
    }
    h.notify(MessageEvent {
        unread_in_chat: 1,
        ..ev(1, 10, 7, 1)
    });
    wait_until("delivered", || h.stats.delivered.load(Relaxed) == 1);
    wait_until("removed", || h.stats.tokens_removed.load(Relaxed) == 2);
    let stats = stop(h, t);
    assert_eq!(stats.retried.load(Relaxed), 1);
    assert_eq!(server.requests().len(), 4);
    assert_eq!(tokens(data.path(), 1), vec!["aaaa".to_owned()]);
}

#[test]
fn apns_over_tls_h2() {
    let (tls, ca) = util::tls_h2();
    apns_test(Proto::H2Tls(tls), "https", "localhost", Some(ca));
}

#[test]
fn apns_h2c_prior_knowledge() {
    apns_test(Proto::H2c, "http", "127.0.0.1", None);
}

#[test]
fn unconfigured_platform_is_dead_lettered_and_registration_errors() {
    let data = tempfile::tempdir().unwrap();
    let (h, t) = PushService::start(fast(PushConfig::default()), data.path()).unwrap();
    assert_eq!(
        block_on(h.set_token(1, 1, Platform::Apns, "not-hex".into())),
        Err(switchboard_push::PushError::InvalidToken)
    );
    block_on(h.set_token(1, 1, Platform::Fcm, "t".into())).unwrap();
    h.notify(ev(1, 5, 2, 1));
    wait_until("dead letter", || h.stats.dead_lettered.load(Relaxed) == 1);
    block_on(h.remove_token(1, 1)).unwrap();
    stop(h, t);
    let dead = dlq::list(&push_dir(data.path())).unwrap();
    assert_eq!(dead[0].error, "no fcm sink configured");
    assert_eq!(dead[0].attempts, 1);
    assert!(tokens(data.path(), 1).is_empty());
}

#[test]
fn webhook_over_tls_and_an_unknown_ca_is_refused() {
    let (tls, ca) = util::tls_h1();
    let server = Server::start(Proto::H1Tls(tls), Arc::new(|_, _| (200, vec![], "".into())));
    let data = tempfile::tempdir().unwrap();
    let ca_file = data.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let cfg = fast(PushConfig {
        webhook: Some(WebhookConfig {
            url: format!("https://localhost:{}/hook", server.addr.port()),
            secret: SECRET.into(),
        }),
        ca_file: Some(ca_file),
        ..PushConfig::default()
    });
    let (h, t) = PushService::start(cfg.clone(), data.path()).unwrap();
    block_on(h.set_token(1, 1, Platform::Webhook, "a".into())).unwrap();
    for chat in 1..=3 {
        h.notify(ev(1, chat, 7, 1));
    }
    wait_until("delivered", || h.stats.delivered.load(Relaxed) == 3);
    let stats = stop(h, t);
    assert_eq!(stats.retried.load(Relaxed), 0);
    assert!(server
        .requests()
        .iter()
        .all(|r| r.version == hyper::Version::HTTP_11));
    // Without the test CA the certificate is refused (the Mozilla roots do not know it).
    let (h, t) = PushService::start(
        PushConfig {
            ca_file: None,
            attempts_max: 1,
            ..cfg
        },
        data.path(),
    )
    .unwrap();
    h.notify(ev(1, 9, 7, 1));
    wait_until("dead letter", || h.stats.dead_lettered.load(Relaxed) == 1);
    stop(h, t);
    let dead = dlq::list(&push_dir(data.path())).unwrap();
    assert!(dead[0].error.contains("TLS"), "{}", dead[0].error);
    assert_eq!(server.requests().len(), 3);
}

#[test]
fn apns_expired_provider_token_is_renewed_and_retried() {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let server = Server::start(
        Proto::H2c,
        Arc::new(|_, n| match n {
            1 => (403, vec![], r#"{"reason":"ExpiredProviderToken"}"#.into()),
            _ => (200, vec![], "".into()),
        }),
    );
    let data = tempfile::tempdir().unwrap();
    let key_file = data.path().join("key.p8");
    std::fs::write(&key_file, kp.serialize_pem()).unwrap();
    let cfg = fast(PushConfig {
        apns: Some(ApnsConfig {
            key_file,
            key_id: "K".into(),
            team_id: "T".into(),
            topic: "app".into(),
            endpoint: server.url("http", ""),
        }),
        ..PushConfig::default()
    });
    let (h, t) = PushService::start(cfg, data.path()).unwrap();
    block_on(h.set_token(1, 1, Platform::Apns, "abcd".into())).unwrap();
    h.notify(ev(1, 10, 7, 1));
    wait_until("delivered", || h.stats.delivered.load(Relaxed) == 1);
    h.notify(ev(1, 11, 7, 1));
    wait_until("delivered", || h.stats.delivered.load(Relaxed) == 2);
    let stats = stop(h, t);
    assert_eq!(stats.retried.load(Relaxed), 1);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    // The refused token is not used again: a new one is signed; later sends reuse it.
    let auth: Vec<&str> = reqs.iter().map(|r| r.header("authorization")).collect();
    assert_ne!(auth[0], auth[1]);
    assert_eq!(auth[1], auth[2]);
}
