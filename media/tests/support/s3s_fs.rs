//! Starting `s3s-fs` for a test (shared by `media/tests/s3.rs` and, through `#[path]`,
//! `engine/tests/media_s3.rs`): a fresh data directory, a port unique within the process, and
//! readiness checked by an HTTP answer from that very server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// The s3s-fs process and its data directory (removed when dropped, after the process).
pub struct S3Server {
    child: Child,
    pub addr: SocketAddr,
    _root: tempfile::TempDir,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody in this process was given before. The tests of a file run in parallel
/// and each asks the kernel for a free port by binding port 0 and closing it again, so two of
/// them could be told the same port: one `s3s-fs` would then fail to bind while the other
/// test's server answered its readiness check, and its requests would be refused once the
/// other test stopped that server (seen once in CI).
fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().expect("ports");
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Attempts at starting `s3s-fs`: a port that another process took between `free_port` and
/// the server's bind makes the server exit, and the next attempt uses another port.
const START_ATTEMPTS: usize = 5;

/// Starts `s3s-fs` (`$S3S_FS`, else from `PATH`) with these credentials.
pub fn start(access_key: &str, secret_key: &str) -> S3Server {
    let bin = std::env::var("S3S_FS").unwrap_or_else(|_| "s3s-fs".to_owned());
    for _ in 0..START_ATTEMPTS {
        let root = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", access_key, "--secret-key", secret_key])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the S3 test server {bin:?}: {e}. Install it with \
                     `cargo install s3s-fs@0.14.1 --features binary --locked` (CI does, in \
                     .ci/run) or set S3S_FS"
                )
            });
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut server = S3Server {
            child,
            addr,
            _root: root,
        };
        for _ in 0..200 {
            // Our server must still be running: if it could not bind, whatever answers on
            // this port is not it.
            if server.child.try_wait().expect("s3s-fs status").is_some() {
                break;
            }
            if answers_http(addr) {
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        eprintln!("s3s-fs on {addr} exited or did not listen within 5 s; trying another port");
    }
    panic!("s3s-fs did not start in {START_ATTEMPTS} attempts");
}

/// Readiness: an HTTP answer, not just an accepted connection. A bare `connect` to a port in
/// the ephemeral range can "succeed" with nobody listening (TCP self-connect: the kernel picks
/// that very port as the client's), which made a test send its first request to a server that
/// was not there yet (seen in CI as `ConnectionRefused` right after the check). A self-connected
/// socket reads back its own request, so it never starts with `HTTP/1.`.
fn answers_http(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 7];
    s.read_exact(&mut head).is_ok() && &head == b"HTTP/1."
}
