//! Helpers for tests that drive a real `switchboard` process over real sockets.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use switchboard::token::{Claims, TokenKey};
use switchboard_client::{Client, ClientConfig};
use switchboard_wire::{DeviceId, UserId};

pub const T: Duration = Duration::from_secs(10);

/// Config lines that lift the per-user message and per-connection frame rate limits (tests
/// send far faster than a person types); tests with their own config prepend them.
pub const UNLIMITED_RATES: &str = "messages_per_user_burst = 1000000\nmessages_per_user_refill_per_s = 1000\nframes_per_conn_burst = 1000000\nframes_per_conn_refill_per_s = 1000\n";

/// A server process on a fresh port with its own data directory. Killed on drop.
pub struct Server {
    pub child: Option<Child>,
    pub addr: String,
    pub data_dir: PathBuf,
    pub cores: usize,
    pub extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server with `cores` reactors (unpinned when more than the CPUs).
    pub fn start(cores: usize) -> Server {
        Self::start_with(cores, &[])
    }

    /// Tests that do not bring a `--config` get one that lifts the per-user message and
    /// per-connection frame rate limits: they send far faster than a person types. The limits
    /// themselves are tested in `ws_limits.rs` with their own configs.
    pub fn start_with(cores: usize, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|a| a == "--config") {
            let path = tmp.path().join("test.toml");
            std::fs::write(&path, UNLIMITED_RATES).expect("test config");
            extra.push("--config".into());
            extra.push(path.to_str().expect("utf-8 path").into());
        }
        let mut s = Server {
            child: None,
            addr: String::new(),
            data_dir,
            cores,
            extra,
            _tmp: Some(tmp),
        };
        s.spawn("127.0.0.1:0");
        s
    }

    fn spawn(&mut self, listen: &str) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("serve")
            .arg("--listen")
            .arg(listen)
            .arg("--cores")
            .arg(self.cores.to_string())
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn switchboard");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read server banner");
        let addr = line
            .split_whitespace()
            .nth(3)
            .unwrap_or_else(|| panic!("unexpected banner {line:?}"))
            .to_string();
        self.addr = addr;
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown code runs, like a power cut for user space.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same data directory and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.wait_stale_listeners_gone();
        let addr = self.addr.clone();
        let deadline = Instant::now() + T;
        // The port may linger briefly; SO_REUSEADDR makes this quick.
        loop {
            let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
                .arg("serve")
                .arg("--listen")
                .arg(&addr)
                .arg("--cores")
                .arg(self.cores.to_string())
                .arg("--data-dir")
                .arg(&self.data_dir)
                .args(&self.extra)
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn switchboard");
            let stdout = child.stdout.take().expect("stdout");
            let mut line = String::new();
            BufReader::new(stdout)
                .read_line(&mut line)
                .expect("read banner");
            if line.starts_with("switchboard listening on") {
                self.child = Some(child);
                return;
            }
            let _ = child.wait();
            assert!(Instant::now() < deadline, "server did not restart");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn token(&self, user: u64, device: u32) -> String {
        let secret = std::fs::read_to_string(self.data_dir.join("token.secret")).expect("secret");
        let key = TokenKey::new(secret.trim().as_bytes());
        key.mint(Claims {
            user: UserId(user),
            device: DeviceId(device),
            expires_unix_s: 4_000_000_000,
        })
    }

    pub fn connect(&self, user: u64, device: u32) -> Client {
        Client::connect(&self.addr, &self.token(user, device)).expect("connect")
    }

    pub fn connect_cfg(&self, user: u64, device: u32) -> ClientConfig {
        ClientConfig::new(self.addr.clone(), self.token(user, device))
    }

    /// A plain HTTP GET; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(&self.addr).expect("connect");
        s.set_read_timeout(Some(T)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = out
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    pub fn segments(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for shard in std::fs::read_dir(&self.data_dir).unwrap().flatten() {
            if shard.path().is_dir() {
                for f in std::fs::read_dir(shard.path()).unwrap().flatten() {
                    if f.path().extension().is_some_and(|e| e == "log") {
                        out.push(f.path());
                    }
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn data_path(s: &Server) -> &Path {
    &s.data_dir
}

impl Server {
    /// Waits (up to `T`) until every socket listening on this server's port belongs to the
    /// running server process (or none does, while it is not running).
    ///
    /// After SIGKILL the kernel may keep a dead server's listening sockets open for tens of
    /// milliseconds after `wait()` has returned: glommio's io_uring holds them in pending accepts
    /// and the ring is torn down asynchronously. A server restarted in that window shares the port
    /// with them (SO_REUSEPORT), and connections the kernel hands to a dead listener are reset.
    pub fn wait_stale_listeners_gone(&self) {
        let port: u16 = self
            .addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {:?}", self.addr));
        let deadline = Instant::now() + T;
        loop {
            let ours = self
                .child
                .as_ref()
                .map(|c| socket_inodes(c.id()))
                .unwrap_or_default();
            let stale: Vec<u64> = listening_inodes(port)
                .into_iter()
                .filter(|i| !ours.contains(i))
                .collect();
            if stale.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "port {port}: listeners of a dead server still open after {T:?}: {stale:?}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Inodes of the TCP sockets in LISTEN state on `port` (IPv4 and IPv6), from `/proc/net`.
fn listening_inodes(port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if f.get(3) == Some(&LISTEN) && local_port == Some(port) {
                if let Some(inode) = f.get(9).and_then(|i| i.parse().ok()) {
                    out.push(inode);
                }
            }
        }
    }
    out
}

/// Inodes of the sockets process `pid` has open.
fn socket_inodes(pid: u32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let t = target.to_str()?;
            t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect()
}

/// One HTTP response as the test client read it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `code` of a JSON error body.
    pub fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_string()
    }
}

/// A blocking HTTP/1.1 client on one keep-alive connection (plain `std::net::TcpStream`).
pub struct Http {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Http {
    pub fn connect(addr: &str) -> Http {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(T)).unwrap();
        Http {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends raw bytes (for malformed requests and pipelining).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// A request with an optional JSON body and bearer token.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        token: Option<&str>,
        json: Option<&serde_json::Value>,
    ) -> HttpResponse {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        if let Some(t) = token {
            head.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        let body = json.map(|j| serde_json::to_vec(j).unwrap());
        match &body {
            Some(b) => head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )),
            None if matches!(method, "POST" | "PUT" | "PATCH") => {
                head.push_str("Content-Length: 0\r\n")
            }
            None => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_deref().unwrap_or(&[]));
        self.send_raw(&bytes);
        self.read_response(method == "HEAD")
    }

    /// Reads one response (Content-Length framed, or no body for 1xx/204/304 and HEAD).
    pub fn read_response(&mut self, head_request: bool) -> HttpResponse {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill();
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("utf-8 head");
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let len: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .map(|(_, v)| v.parse().expect("content-length"))
            .unwrap_or(0);
        let len = if head_request || status == 204 || status < 200 {
            0
        } else {
            len
        };
        while self.buf.len() < head_end + len {
            self.fill();
        }
        let body = self.buf[head_end..head_end + len].to_vec();
        self.buf.drain(..head_end + len);
        HttpResponse {
            status,
            headers,
            body,
        }
    }

    fn fill(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).expect("read response");
        assert!(n > 0, "server closed the connection mid-response");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    /// Whether the server closed the connection (reads EOF within the timeout).
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut chunk = [0u8; 64];
        matches!(self.stream.read(&mut chunk), Ok(0) | Err(_))
    }
}

/// A local SMS gateway for tests: accepts the server's webhook POSTs and hands over the JSON
/// bodies (with the signature header) on a channel.
pub struct SmsGateway {
    pub url: String,
    pub rx: std::sync::mpsc::Receiver<(serde_json::Value, Option<String>, Option<String>)>,
}

pub const SMS_SECRET: &str = "test-sms-webhook-secret";

impl SmsGateway {
    pub fn start() -> SmsGateway {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/sms", listener.local_addr().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, len) = loop {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        break (0, 0);
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                if head_end == 0 {
                    continue;
                }
                while buf.len() < head_end + len {
                    let n = s.read(&mut chunk).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let header = |name: &str| {
                    head.lines().find_map(|l| {
                        let (n, v) = l.split_once(':')?;
                        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                    })
                };
                let body: serde_json::Value =
                    serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                let _ = tx.send((
                    body,
                    header("x-switchboard-signature"),
                    header("x-switchboard-timestamp"),
                ));
            }
        });
        SmsGateway { url, rx }
    }

    /// The code of the next SMS to `phone` (skipping others), within `T`.
    pub fn code_for(&self, phone: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let (body, sig, ts) = self.rx.recv_timeout(left).expect("an SMS");
            if body["to"] == phone {
                assert!(sig.is_some_and(|s| s.starts_with("v1=")), "signed webhook");
                assert!(ts.is_some(), "timestamped webhook");
                return body["code"].as_str().expect("code").to_string();
            }
        }
    }

    /// Server flags that send codes here.
    pub fn flags(&self) -> Vec<String> {
        vec![
            "--sms-webhook".into(),
            self.url.clone(),
            "--sms-webhook-secret".into(),
            SMS_SECRET.into(),
        ]
    }
}

/// Registers and verifies `phone` on `server`; returns the verify answer (user_id, device_id,
/// token, new_user).
pub fn login(
    server: &Server,
    sms: &SmsGateway,
    phone: &str,
    device_name: &str,
) -> serde_json::Value {
    let mut c = Http::connect(&server.addr);
    let r = c.request(
        "POST",
        "/v1/auth/register",
        None,
        Some(&serde_json::json!({ "phone": phone })),
    );
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let code = sms.code_for(phone);
    let r = c.request(
        "POST",
        "/v1/auth/verify",
        None,
        Some(&serde_json::json!({"phone": phone, "code": code, "device_name": device_name})),
    );
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    r.json()
}
