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

    pub fn start_with(cores: usize, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let mut s = Server {
            child: None,
            addr: String::new(),
            data_dir,
            cores,
            extra: extra.iter().map(|s| s.to_string()).collect(),
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
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
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
