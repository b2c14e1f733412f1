//! The pieces together, still without sockets: a rustls client talks through `TlsSession` to
//! `http1::Conn`, requests are routed by `Router` to the login and key-directory state
//! machines, and the responses travel back the same way. This is the shape the engine's
//! connection task will have (with glommio sockets at both ends of the byte buffers).

use std::io::{Read as _, Write as _};
use std::net::IpAddr;
use std::sync::Arc;

use rand::SeedableRng as _;
use rustls::pki_types::ServerName;
use switchboard_api::accounts::InMemoryAccounts;
use switchboard_api::http1::{self, BodyMode, Conn, Event, Method, RequestHead, Response};
use switchboard_api::keys::{KeyDirectory, KeyUpload};
use switchboard_api::otp::{self, LogSender, Otp, OtpConfig, SmsDelivery, SmsSender as _};
use switchboard_api::ratelimit::{Decision, KeyedLimiter, Rate};
use switchboard_api::router::Router;
use switchboard_api::tls::{server_config_from_pem, TlsSession};
use switchboard_wire::{DeviceId, UserId};

#[derive(Clone, Copy, Debug)]
enum Endpoint {
    Register,
    Verify,
    PutKeys,
    GetKeys,
    Upload,
}

/// The server side of one connection plus the per-core state it uses.
struct App {
    router: Router<Endpoint>,
    otp: Otp,
    accounts: InMemoryAccounts,
    keys: KeyDirectory,
    limiter: KeyedLimiter<IpAddr>,
    rng: rand::rngs::StdRng,
    now_ms: u64,
    /// The log lines the `LogSender` produced (the codes, in development).
    sms_log: Vec<String>,
    /// Bytes of the current streamed upload.
    uploaded: usize,
}

impl App {
    fn new() -> Self {
        let mut router = Router::new();
        router
            .add(Method::Post, "/v1/auth/register", Endpoint::Register)
            .add(Method::Post, "/v1/auth/verify", Endpoint::Verify)
            .add(Method::Put, "/v1/keys", Endpoint::PutKeys)
            .add(Method::Get, "/v1/keys/{user}/{device}", Endpoint::GetKeys)
            .add(Method::Put, "/v1/media/{id}/blob", Endpoint::Upload);
        App {
            router,
            otp: Otp::new(OtpConfig::default()),
            accounts: InMemoryAccounts::new(),
            keys: KeyDirectory::new(),
            limiter: KeyedLimiter::new(Rate::per_second(100, 10), 1000),
            rng: rand::rngs::StdRng::seed_from_u64(1),
            now_ms: 1_000,
            sms_log: Vec::new(),
            uploaded: 0,
        }
    }

    /// Handles one complete request; writes the response into `out`.
    fn handle(&mut self, head: &RequestHead, body: &[u8], keep_alive: bool, out: &mut Vec<u8>) {
        let addr: IpAddr = "192.0.2.1".parse().expect("ip");
        if let Decision::Limited { retry_after_ms } = self.limiter.check(&addr, self.now_ms) {
            let retry = Decision::Limited { retry_after_ms }
                .retry_after_s()
                .unwrap_or(1)
                .to_string();
            http1::write_json_error(
                out,
                429,
                "rate_limited",
                "slow down",
                keep_alive,
                &[("retry-after", &retry)],
            );
            return;
        }
        let m = match self.router.route(head.method, &head.path) {
            Ok(m) => m,
            Err(e) => return e.write_response(out, keep_alive),
        };
        let json_ok = |out: &mut Vec<u8>, status: u16, v: serde_json::Value| {
            Response::new(status)
                .header("content-type", "application/json")
                .keep_alive(keep_alive)
                .write(out, &serde_json::to_vec(&v).expect("json"));
        };
        match m.handler {
            Endpoint::Register => {
                let req: otp::json::RegisterRequest = match http1::parse_json_body(head, body) {
                    Ok(r) => r,
                    Err(e) => return e.write_response(out, keep_alive),
                };
                match self
                    .otp
                    .register(&req.phone, addr, self.now_ms, &mut self.rng)
                {
                    Ok(sms) => {
                        if let SmsDelivery::Log { line } = LogSender.deliver(&sms, 0) {
                            self.sms_log.push(line);
                        }
                        json_ok(out, 202, serde_json::json!({"expires_in_s": 300}));
                    }
                    Err(e) => http1::write_json_error(
                        out,
                        e.status(),
                        e.code(),
                        "registration refused",
                        keep_alive,
                        &[],
                    ),
                }
            }
            Endpoint::Verify => {
                let req: otp::json::VerifyRequest = match http1::parse_json_body(head, body) {
                    Ok(r) => r,
                    Err(e) => return e.write_response(out, keep_alive),
                };
                match self.otp.verify(
                    &req.phone,
                    &req.code,
                    &req.device_name,
                    addr,
                    self.now_ms,
                    &mut self.accounts,
                ) {
                    Ok(login) => json_ok(
                        out,
                        200,
                        serde_json::json!({"user_id": login.user_id.0, "device_id": login.device_id.0, "token": "t", "new_user": login.new_user}),
                    ),
                    Err(e) => http1::write_json_error(
                        out,
                        e.status(),
                        e.code(),
                        "verification failed",
                        keep_alive,
                        &[],
                    ),
                }
            }
            Endpoint::PutKeys => {
                // The engine takes (user, device) from the token; this test uses fixed ones.
                let result = KeyUpload::from_json(body)
                    .and_then(|u| self.keys.put(UserId(1), DeviceId(1), u));
                match result {
                    Ok(n) => json_ok(out, 200, serde_json::json!({"one_time_prekeys": n})),
                    Err(e) => http1::write_json_error(
                        out,
                        e.status(),
                        e.code(),
                        "keys refused",
                        keep_alive,
                        &[],
                    ),
                }
            }
            Endpoint::GetKeys => {
                let (Some(user), Some(device)) =
                    (m.params.get_u64("user"), m.params.get_u64("device"))
                else {
                    return http1::write_json_error(
                        out,
                        404,
                        "not_found",
                        "no such device",
                        keep_alive,
                        &[],
                    );
                };
                let (user, device) = (UserId(user), DeviceId(u32::try_from(device).unwrap_or(0)));
                match self.keys.fetch(user, device) {
                    Ok((bundle, _low)) => json_ok(
                        out,
                        200,
                        serde_json::to_value(bundle.to_json(user, device)).expect("json"),
                    ),
                    Err(e) => http1::write_json_error(
                        out,
                        e.status(),
                        e.code(),
                        "no keys",
                        keep_alive,
                        &[],
                    ),
                }
            }
            Endpoint::Upload => {
                json_ok(out, 201, serde_json::json!({"received": self.uploaded}));
                self.uploaded = 0;
            }
        }
    }
}

/// Server plumbing for one connection: TLS in, HTTP events, responses, TLS out.
struct ServerConn {
    tls: TlsSession,
    http: Conn,
    plaintext: Vec<u8>,
    current: Option<RequestHead>,
}

impl ServerConn {
    /// Processes ciphertext from the client; returns ciphertext for it.
    fn on_bytes(&mut self, app: &mut App, ciphertext: &[u8]) -> Vec<u8> {
        let mut to_client = Vec::new();
        if self.tls.feed_ciphertext(ciphertext).is_err() {
            self.tls.take_ciphertext(&mut to_client);
            return to_client;
        }
        self.plaintext.clear();
        self.tls.take_plaintext(&mut self.plaintext);
        self.http.feed(&self.plaintext);
        let mut responses = Vec::new();
        loop {
            match self.http.poll() {
                Ok(None) => break,
                Ok(Some(Event::Head(head))) => {
                    if head.path.ends_with("/blob") {
                        self.http
                            .set_body_mode(BodyMode::Stream { bytes_max: 1 << 20 });
                    }
                    self.current = Some(head);
                }
                Ok(Some(Event::Continue)) => responses.extend_from_slice(http1::CONTINUE_RESPONSE),
                Ok(Some(Event::BodyChunk(chunk))) => app.uploaded += chunk.len(),
                Ok(Some(Event::BodyEnd { body })) => {
                    let head = self.current.take().expect("head before body end");
                    let keep_alive = self.http.keep_alive();
                    app.handle(&head, &body, keep_alive, &mut responses);
                }
                Err(e) => {
                    http1::write_error(&mut responses, e);
                    break;
                }
            }
        }
        let mut offset = 0;
        while offset < responses.len() {
            let n = self.tls.write_plaintext(&responses[offset..]);
            offset += n;
            self.tls.take_ciphertext(&mut to_client);
        }
        self.tls.take_ciphertext(&mut to_client);
        to_client
    }
}

struct Harness {
    app: App,
    server: ServerConn,
    client: rustls::ClientConnection,
    /// Plaintext the client received and has not parsed yet.
    inbox: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
        let config = server_config_from_pem(
            ck.cert.pem().as_bytes(),
            ck.key_pair.serialize_pem().as_bytes(),
        )
        .expect("config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).expect("root");
        let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut client = rustls::ClientConnection::new(
            Arc::new(client_config),
            ServerName::try_from("localhost").expect("name"),
        )
        .expect("client");
        client.set_buffer_limit(None);
        Harness {
            app: App::new(),
            server: ServerConn {
                tls: TlsSession::new(config).expect("session"),
                http: Conn::default(),
                plaintext: Vec::new(),
                current: None,
            },
            client,
            inbox: Vec::new(),
        }
    }

    /// Sends raw request bytes and moves data until both sides are quiet.
    fn send(&mut self, request: &[u8]) {
        self.client
            .writer()
            .write_all(request)
            .expect("client write");
        for _ in 0..100 {
            let mut to_server = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut to_server).expect("write_tls");
            }
            let to_client = self.server.on_bytes(&mut self.app, &to_server);
            let mut rd = &to_client[..];
            while !rd.is_empty() {
                if self.client.read_tls(&mut rd).expect("read_tls") == 0 {
                    break;
                }
                self.client.process_new_packets().expect("client TLS");
                let _ = self.client.reader().read_to_end(&mut self.inbox);
            }
            if to_server.is_empty() && to_client.is_empty() {
                return;
            }
        }
        panic!("no quiescence");
    }

    /// Takes the next complete response from the inbox: (status, headers, body as JSON).
    fn response(&mut self) -> (u16, Vec<(String, String)>, serde_json::Value) {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = resp.parse(&self.inbox) else {
            panic!(
                "no complete response in {:?}",
                String::from_utf8_lossy(&self.inbox)
            );
        };
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .map(|(_, v)| v.parse().expect("length"))
            .unwrap_or(0);
        let status = resp.code.expect("status");
        let body =
            serde_json::from_slice(&self.inbox[n..n + len]).unwrap_or(serde_json::Value::Null);
        self.inbox.drain(..n + len);
        (status, headers, body)
    }

    fn post_json(&mut self, path: &str, json: &serde_json::Value) -> (u16, serde_json::Value) {
        let body = serde_json::to_vec(json).expect("json");
        let mut req = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        self.send(&req);
        let (status, _, body) = self.response();
        (status, body)
    }
}

#[test]
fn register_verify_and_keys_over_tls() {
    let mut h = Harness::new();
    let (status, body) = h.post_json(
        "/v1/auth/register",
        &serde_json::json!({"phone": "+14155550123"}),
    );
    assert_eq!(
        (status, body),
        (202, serde_json::json!({"expires_in_s": 300}))
    );
    let line = h.app.sms_log.last().expect("sms logged").clone();
    let code: String = line
        .split("code is ")
        .nth(1)
        .expect("code in sms")
        .chars()
        .take(6)
        .collect();

    let (status, body) = h.post_json(
        "/v1/auth/verify",
        &serde_json::json!({"phone": "+14155550123", "code": "000000", "device_name": "laptop"}),
    );
    if code != "000000" {
        assert_eq!(status, 401);
        assert_eq!(body["code"], "code_incorrect");
    }
    let (status, body) = h.post_json(
        "/v1/auth/verify",
        &serde_json::json!({"phone": "+14155550123", "code": code, "device_name": "laptop"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (body["user_id"].as_u64(), body["device_id"].as_u64()),
        (Some(1), Some(1))
    );

    // Keys: upload (chunked body), then fetch (consumes the one-time prekey).
    let keys = serde_json::json!({
        "identity_key": "AQID", "signed_prekey": {"key_id": 1, "public_key": "BAUG", "signature": "BwgJ"},
        "one_time_prekeys": [{"key_id": 5, "public_key": "CgsM"}],
    })
    .to_string();
    let (a, b) = keys.split_at(10);
    let req = format!(
        "PUT /v1/keys HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    h.send(req.as_bytes());
    let (status, _, body) = h.response();
    assert_eq!(
        (status, body),
        (200, serde_json::json!({"one_time_prekeys": 1}))
    );
    // Two pipelined GETs in one write: answered in order; the second finds no one-time key.
    h.send(b"GET /v1/keys/1/1 HTTP/1.1\r\nHost: localhost\r\n\r\nGET /v1/keys/1/1 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (status, _, first) = h.response();
    assert_eq!(status, 200);
    assert_eq!(
        first["one_time_prekey"],
        serde_json::json!({"key_id": 5, "public_key": "CgsM"})
    );
    let (status, _, second) = h.response();
    assert_eq!(status, 200);
    assert_eq!(second["one_time_prekey"], serde_json::Value::Null);
    assert_eq!(second["identity_key"], "AQID");
}

#[test]
fn errors_have_statuses_and_json_bodies() {
    let mut h = Harness::new();
    h.send(b"GET /v1/nope HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (status, _, body) = h.response();
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

    h.send(b"DELETE /v1/keys HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (status, headers, body) = h.response();
    assert_eq!(
        (status, body["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    assert!(
        headers.contains(&("allow".to_owned(), "PUT".to_owned())),
        "{headers:?}"
    );

    let (status, body) = h.post_json("/v1/auth/register", &serde_json::json!({"phone": "415"}));
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_phone"))
    );

    h.send(b"POST /v1/auth/register HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}");
    let (status, _, body) = h.response();
    assert_eq!(
        (status, body["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    h.send(b"GET /v1/keys/1/2 HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (status, _, body) = h.response();
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

    // A framing error closes the connection.
    h.send(b"POST /v1/auth/register HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let (status, headers, body) = h.response();
    assert_eq!(
        (status, body["code"].as_str()),
        (411, Some("length_required"))
    );
    assert!(headers.contains(&("connection".to_owned(), "close".to_owned())));
    assert!(h.server.http.is_closed());
}

#[test]
fn streamed_upload_with_expect_continue() {
    let mut h = Harness::new();
    h.send(b"PUT /v1/media/abc/blob HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 300000\r\n\r\n");
    assert_eq!(h.inbox, b"HTTP/1.1 100 Continue\r\n\r\n");
    h.inbox.clear();
    let body = vec![b'x'; 300_000];
    for part in body.chunks(70_000) {
        h.send(part);
    }
    let (status, _, reply) = h.response();
    assert_eq!(
        (status, reply),
        (201, serde_json::json!({"received": 300_000}))
    );
    // The connection stays usable.
    h.send(b"GET /v1/nope HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(h.response().0, 404);
}

#[test]
fn rate_limit_answers_429_with_retry_after() {
    let mut h = Harness::new();
    let mut pipelined = Vec::new();
    for _ in 0..101 {
        pipelined.extend_from_slice(b"GET /v1/nope HTTP/1.1\r\nHost: localhost\r\n\r\n");
    }
    h.send(&pipelined);
    for _ in 0..100 {
        assert_eq!(h.response().0, 404);
    }
    let (status, headers, body) = h.response();
    assert_eq!((status, body["code"].as_str()), (429, Some("rate_limited")));
    assert!(
        headers.contains(&("retry-after".to_owned(), "1".to_owned())),
        "{headers:?}"
    );
}
