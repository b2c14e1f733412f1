//! Limits and timeouts over real sockets: slow consumers, idle and handshake timeouts, the
//! per-core connection limit, and device replacement.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};
use switchboard_client::ClientError;
use switchboard_wire::{ServerFrame, Target, UserId};
use util::{Server, T};

fn server_with_config(cores: usize, toml: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchboard.toml");
    std::fs::write(&path, format!("{}{toml}", util::UNLIMITED_RATES)).unwrap();
    let server = Server::start_with(cores, &["--config", path.to_str().unwrap()]);
    (server, dir)
}

/// Opens a WebSocket by hand and never reads again: it never answers pings.
fn raw_ws(server: &Server, user: u64) -> TcpStream {
    let mut s = TcpStream::connect(&server.addr).unwrap();
    write!(
        s,
        "GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {}\r\n\r\n",
        server.token(user, 1)
    )
    .unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1);
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Reads until EOF and returns the close code of the server's Close frame, if one came.
fn read_until_close(s: &mut TcpStream, within: Duration) -> Option<u16> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    // Find an unmasked close frame: 0x88, len, code(2).
    all.windows(4)
        .rev()
        .find(|w| w[0] == 0x88 && w[1] >= 2 && w[1] < 126)
        .map(|w| u16::from_be_bytes([w[2], w[3]]))
}

#[test]
fn slow_consumer_is_closed_and_loses_nothing() {
    let server = Server::start(2);
    let mut a = server.connect(70, 1);
    let mut b = server.connect(71, 1); // connected, but does not read for now
    let payload = vec![7u8; 60_000];
    // Far more than the loopback socket buffers can absorb (the receiver's autotuned up to
    // `tcp_rmem` max, the sender's up to `tcp_wmem` max: 32 + 4 MiB on some machines) plus the
    // 1 MiB send queue, so the queue must overflow whatever this machine's buffer limits are.
    let n = {
        let max_of = |path: &str| -> usize {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.split_whitespace().last()?.parse().ok())
                .unwrap_or(6 << 20)
        };
        let buffers = max_of("/proc/sys/net/ipv4/tcp_rmem") + max_of("/proc/sys/net/ipv4/tcp_wmem");
        ((buffers + (1 << 20)) * 3 / 2 / payload.len()).clamp(700, 3_000)
    };
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(a.send_message(Target::Peer(UserId(71)), &payload).unwrap());
        if ids.len() % 32 == 0 {
            for id in ids.drain(..) {
                a.wait_ack(id, T).unwrap();
            }
        }
    }
    for id in ids.drain(..) {
        a.wait_ack(id, T).unwrap();
    }
    let deadline = Instant::now() + T;
    let code = loop {
        match b.recv(Duration::from_millis(200)) {
            Ok(_) => {}
            Err(ClientError::Closed { code, .. }) => break code,
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "slow consumer was never closed");
    };
    assert_eq!(code, 4002);
    let (_, metrics) = server.http_get("/metrics");
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("switchboard_slow_consumer_closes_total") && !l.ends_with(" 0")));
    // Reconnect and sync: every acknowledged message is there.
    let mut b = server.connect(71, 1);
    let msgs = b.sync(Duration::from_secs(30)).unwrap();
    assert_eq!(msgs.len(), n);
    assert!(msgs
        .iter()
        .enumerate()
        .all(|(i, m)| m.seq.0 == i as u64 + 1 && m.payload.len() == 60_000));
}

#[test]
fn idle_connections_are_closed_and_live_ones_kept() {
    let (server, _dir) = server_with_config(1, "ping_interval = 0.3\nidle_timeout = 1.0\n");
    let mut silent = raw_ws(&server, 80);
    let live_cfg = server.connect_cfg(81, 1);
    // The library client answers pings while it reads, so it stays connected past the timeout.
    let live = std::thread::spawn(move || {
        let mut live = switchboard_client::Client::connect_with(&live_cfg).unwrap();
        let until = Instant::now() + Duration::from_millis(2500);
        while Instant::now() < until {
            let r = live.recv(Duration::from_millis(100));
            assert!(matches!(r, Ok(None)), "{r:?}");
        }
        live.ping_pong(1, T).unwrap();
    });
    let start = Instant::now();
    let code = read_until_close(&mut silent, Duration::from_secs(5));
    let waited = start.elapsed();
    assert_eq!(code, Some(4003));
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
    live.join().unwrap();
}

#[test]
fn handshake_timeout_closes_silent_sockets() {
    let (server, _dir) = server_with_config(1, "handshake_timeout = 0.5\n");
    let mut s = TcpStream::connect(&server.addr).unwrap();
    s.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n").unwrap(); // never finishes the head
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    let n = s.read_to_end(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    assert!(start.elapsed() < Duration::from_secs(3));
}

#[test]
fn connection_limit_answers_503() {
    let (server, _dir) = server_with_config(1, "conns_per_core_max = 2\n");
    let _a = server.connect(90, 1);
    let _b = server.connect(91, 1);
    match switchboard_client::Client::connect(&server.addr, &server.token(92, 1)) {
        Err(ClientError::Rejected { status, .. }) => assert_eq!(status, 503),
        other => panic!("{:?}", other.map(|_| ())),
    }
}

#[test]
fn a_device_reconnecting_replaces_its_old_connection_and_other_devices_get_own_sends() {
    let server = Server::start(2);
    let mut old = server.connect(100, 1);
    let mut new = server.connect(100, 1);
    match old.recv(T) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 4001),
        other => panic!("{other:?}"),
    }
    // A second device of the sender sees what the first sent; the sending connection does not
    // get its own message back.
    let mut second = server.connect(100, 2);
    let mut peer = server.connect(101, 1);
    std::thread::sleep(Duration::from_millis(100)); // let Online reach every core
    let ack = new
        .send_and_wait_ack(Target::Peer(UserId(101)), b"to all my devices", T)
        .unwrap();
    for c in [&mut second, &mut peer] {
        loop {
            match c.recv(T).unwrap() {
                Some(ServerFrame::Message(m)) => {
                    assert_eq!(
                        (m.seq, &m.payload[..]),
                        (ack.seq, &b"to all my devices"[..])
                    );
                    break;
                }
                Some(_) => continue,
                None => panic!("no message"),
            }
        }
    }
    assert!(matches!(new.recv(Duration::from_millis(300)), Ok(None)));
}

#[test]
fn inflight_limit_applies_back_pressure_without_losing_sends() {
    // With at most 2 sends in flight the server stops reading this socket between acks; a client
    // pipelining 200 sends still gets every ack, in order.
    let (server, _dir) = server_with_config(2, "conn_inflight_sends_max = 2\n");
    let (seqs, errors) = pipeline_sends(&server, 110, 200);
    assert_eq!(errors, vec![]);
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

/// Sum over the cores of a counter in `/metrics`.
fn metric_total(server: &Server, name: &str) -> u64 {
    let (_, body) = server.http_get("/metrics");
    body.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Pipelines `n` sends from `user` to `user + 1` as fast as the socket takes them, then collects
/// every answer in order: the acked seqs and the error codes.
fn pipeline_sends(
    server: &Server,
    user: u64,
    n: u32,
) -> (Vec<u64>, Vec<switchboard_wire::ErrorCode>) {
    let mut a = server.connect(user, 1);
    let ids: Vec<_> = (0..n)
        .map(|i| {
            a.send_message(Target::Peer(UserId(user + 1)), &i.to_be_bytes())
                .unwrap()
        })
        .collect();
    let (mut seqs, mut errors) = (Vec::new(), Vec::new());
    for id in ids {
        match a.wait_ack(id, Duration::from_secs(30)) {
            Ok(ack) => seqs.push(ack.seq.0),
            Err(ClientError::Server(e)) => errors.push(e.code),
            Err(e) => panic!("send {id:?}: {e}"),
        }
    }
    (seqs, errors)
}

#[test]
fn shard_pressure_throttles_readers_instead_of_refusing_sends() {
    // A slow disk, made so by tiny group commits (8 records, 50 ms apart under load), and a shard
    // limit of 64 waiting records: pressure is on at 16 and off at 8. One core, so the shard's
    // flag is set while the connection's own read is being handled.
    let slow = "shard_pending_records_max = 64\ncommit_batch_records_max = 8\ncommit_delay_us = 50000\nconn_inflight_sends_max = 1000\n";
    let (server, _dir) = server_with_config(1, slow);
    let (seqs, errors) = pipeline_sends(&server, 130, 300);
    // Nothing refused: the server stopped reading the socket while the shard was under
    // pressure, and every send was acknowledged in order.
    assert_eq!(errors, vec![]);
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    assert!(metric_total(&server, "switchboard_conn_throttles_total") > 0);
    assert!(metric_total(&server, "switchboard_shard_pressure_episodes_total") > 0);
    drop(server);

    // The same load without the throttle reads everything at once and refuses what is past the
    // limit with Overloaded (retryable; nothing refused was stored).
    let (server, _dir) = server_with_config(1, &format!("{slow}shard_pressure_throttle = false\n"));
    let (seqs, errors) = pipeline_sends(&server, 130, 300);
    assert!(
        !errors.is_empty(),
        "no send was refused: {} acked",
        seqs.len()
    );
    assert!(errors
        .iter()
        .all(|c| *c == switchboard_wire::ErrorCode::Overloaded));
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(metric_total(&server, "switchboard_conn_throttles_total"), 0);
}

#[test]
fn sigterm_closes_connections_with_going_away_and_exits_cleanly() {
    let mut server = Server::start(2);
    let mut a = server.connect(120, 1);
    a.send_and_wait_ack(Target::Peer(UserId(121)), b"durable", T)
        .unwrap();
    let mut child = server.child.take().unwrap();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    match a.recv(T) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1001),
        other => panic!("{other:?}"),
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    server.restart();
    let mut b = server.connect(121, 1);
    assert_eq!(b.sync(T).unwrap().len(), 1);
}

#[test]
fn default_relative_data_dir_works_and_a_second_server_on_it_is_refused() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let cwd = tempfile::tempdir().unwrap();
    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--cores", "1"])
            .current_dir(cwd.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // No --data-dir: ./data relative to the working directory, as in the README.
    let mut first = spawn();
    let mut line = String::new();
    std::io::BufReader::new(first.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("switchboard listening on"), "{line:?}");
    assert!(cwd.path().join("data/shard-0").is_dir());
    let second = spawn().wait_with_output().unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("locked by another process"), "{err}");
    let _ = first.kill();
    let _ = first.wait();
}

#[test]
fn the_server_answers_a_client_close() {
    let server = Server::start(1);
    let c = server.connect(130, 1);
    // The client library waits for the server's Close reply and reports an error without it.
    c.close().unwrap();
}

#[test]
fn devices_per_user_are_limited() {
    let (server, _dir) = server_with_config(2, "devices_per_user_max = 2\n");
    let _one = server.connect(140, 1);
    let _two = server.connect(140, 2);
    std::thread::sleep(Duration::from_millis(100)); // Online reaches every core
    match switchboard_client::Client::connect(&server.addr, &server.token(140, 3)) {
        Err(ClientError::Rejected { status, .. }) => assert_eq!(status, 409),
        other => panic!("{:?}", other.map(|_| ())),
    }
    // The same device reconnecting is not an extra device.
    let mut again = server.connect(140, 2);
    again.ping_pong(1, T).unwrap();
}
