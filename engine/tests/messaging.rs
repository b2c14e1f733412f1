//! 1:1 messaging over real sockets against a real server process.

mod util;

use std::time::Duration;
use switchboard_client::ClientError;
use switchboard_wire::{
    ChatId, ClientMsgId, ErrorCode, ReceiptKind, Seq, ServerFrame, Target, UserId,
};
use util::{Server, T};

fn next_message(c: &mut switchboard_client::Client) -> switchboard_wire::Message {
    loop {
        match c
            .recv(T)
            .expect("recv")
            .expect("timed out waiting for a message")
        {
            ServerFrame::Message(m) => return m,
            _ => continue,
        }
    }
}

#[test]
fn online_one_to_one_with_receipts() {
    let server = Server::start(3);
    let mut a = server.connect(1, 1);
    let mut b = server.connect(2, 1);
    let ack = a
        .send_and_wait_ack(Target::Peer(UserId(2)), b"hello", T)
        .unwrap();
    assert_eq!(ack.seq, Seq(1));
    assert_eq!(ack.chat, ChatId::direct(UserId(1), UserId(2)));
    assert!(!ack.duplicate);
    let m = next_message(&mut b);
    assert_eq!(
        (m.chat, m.seq, m.sender_user, &m.payload[..]),
        (ack.chat, Seq(1), UserId(1), &b"hello"[..])
    );
    assert_eq!(m.msg_id, ack.msg_id);
    b.mark_delivered(m.chat, m.seq).unwrap();
    b.mark_read(m.chat, m.seq).unwrap();
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        if let Some(ServerFrame::Receipt(r)) = a.recv(T).unwrap() {
            assert_eq!(
                (r.chat, r.from, r.to, r.user),
                (ack.chat, Seq(1), Seq(1), UserId(2))
            );
            kinds.push(r.kind);
        }
    }
    assert_eq!(kinds, vec![ReceiptKind::Delivered, ReceiptKind::Read]);
    // B answers in the same chat by chat id.
    let ack2 = b
        .send_and_wait_ack(Target::Chat(ack.chat), b"hi back", T)
        .unwrap();
    assert_eq!(ack2.seq, Seq(2));
    assert_eq!(next_message(&mut a).payload, b"hi back");
}

#[test]
fn offline_recipient_gets_everything_through_sync() {
    let server = Server::start(2);
    let mut a = server.connect(10, 1);
    for i in 0..20u32 {
        a.send_and_wait_ack(Target::Peer(UserId(11)), &i.to_be_bytes(), T)
            .unwrap();
    }
    // And a second chat, so sync spans chats (and shards).
    for i in 0..5u32 {
        a.send_and_wait_ack(Target::Peer(UserId(12)), &i.to_be_bytes(), T)
            .unwrap();
    }
    let mut c = server.connect(12, 1);
    let mut b = server.connect(11, 1);
    let got = b.sync(T).unwrap();
    let seqs: Vec<u64> = got.iter().map(|m| m.seq.0).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.payload, (i as u32).to_be_bytes());
    }
    assert_eq!(c.sync(T).unwrap().len(), 5);
    // Delivered cursor is durable: a new sync without client cursors from a fresh connection of
    // the same device starts after it.
    let chat = ChatId::direct(UserId(10), UserId(11));
    b.mark_delivered(chat, Seq(15)).unwrap();
    b.ping_pong(1, T).unwrap();
    drop(b);
    std::thread::sleep(Duration::from_millis(200));
    let mut b2 = server.connect(11, 1);
    let again = b2.sync(T).unwrap();
    assert_eq!(
        again.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
        (16..=20).collect::<Vec<_>>()
    );
}

#[test]
fn dedup_on_retry_also_across_restart() {
    let mut server = Server::start(2);
    let mut a = server.connect(20, 1);
    let id = ClientMsgId::from_halves(42, 42);
    a.send_message_with_id(id, Target::Peer(UserId(21)), b"once")
        .unwrap();
    let first = a.wait_ack(id, T).unwrap();
    a.send_message_with_id(id, Target::Peer(UserId(21)), b"once")
        .unwrap();
    let second = a.wait_ack(id, T).unwrap();
    assert!(second.duplicate);
    assert_eq!(
        (second.seq, second.msg_id, second.timestamp_ms),
        (first.seq, first.msg_id, first.timestamp_ms)
    );
    server.restart();
    let mut a = server.connect(20, 1);
    a.send_message_with_id(id, Target::Peer(UserId(21)), b"once")
        .unwrap();
    let third = a.wait_ack(id, T).unwrap();
    assert!(third.duplicate);
    assert_eq!((third.seq, third.msg_id), (first.seq, first.msg_id));
    let page = a.history(first.chat, Seq(0), 50, T).unwrap();
    assert_eq!(page.messages.len(), 1, "the retry stored nothing new");
}

#[test]
fn concurrent_senders_get_a_total_gap_free_order() {
    let server = Server::start(3);
    let chat = ChatId::direct(UserId(30), UserId(31));
    const N: usize = 150;
    let handles: Vec<_> = [(30u64, 31u64), (31, 30)]
        .into_iter()
        .map(|(me, peer)| {
            let cfg = server.connect_cfg(me, 1);
            std::thread::spawn(move || {
                let mut c = switchboard_client::Client::connect_with(&cfg).unwrap();
                let mut seqs = Vec::new();
                // Pipelined: send all, then collect acks.
                let ids: Vec<_> = (0..N)
                    .map(|i| {
                        c.send_message(Target::Peer(UserId(peer)), format!("{me}:{i}").as_bytes())
                            .unwrap()
                    })
                    .collect();
                for id in ids {
                    seqs.push(c.wait_ack(id, T).unwrap().seq.0);
                }
                seqs
            })
        })
        .collect();
    let mut all: Vec<u64> = Vec::new();
    for h in handles {
        let seqs = h.join().unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one sender's messages keep their order"
        );
        all.extend(seqs);
    }
    all.sort();
    assert_eq!(all, (1..=(2 * N) as u64).collect::<Vec<_>>());
    // Everyone reads the same order.
    let mut c = server.connect(30, 2);
    let msgs = c.sync(T).unwrap();
    assert_eq!(msgs.len(), 2 * N);
    assert!(msgs
        .iter()
        .enumerate()
        .all(|(i, m)| m.seq.0 == i as u64 + 1 && m.chat == chat));
}

#[test]
fn history_pages_backwards() {
    let server = Server::start(2);
    let mut a = server.connect(40, 1);
    let mut chat = ChatId(0);
    for i in 0..25u32 {
        chat = a
            .send_and_wait_ack(Target::Peer(UserId(41)), &i.to_be_bytes(), T)
            .unwrap()
            .chat;
    }
    let mut b = server.connect(41, 1);
    let p1 = b.history(chat, Seq(0), 10, T).unwrap();
    assert_eq!(
        p1.messages.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
        (16..=25).rev().collect::<Vec<_>>()
    );
    assert!(p1.has_more);
    let p2 = b.history(chat, Seq(16), 10, T).unwrap();
    assert_eq!(p2.messages.first().unwrap().seq, Seq(15));
    let p3 = b.history(chat, Seq(6), 10, T).unwrap();
    assert_eq!(
        p3.messages.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
        vec![5, 4, 3, 2, 1]
    );
    assert!(!p3.has_more);
    // Not a member.
    let mut c = server.connect(42, 1);
    match c.history(chat, Seq(0), 10, T) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::NotMember),
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_tokens_get_401_before_upgrade() {
    let server = Server::start(1);
    for token in ["", "garbage", &server.token(1, 1)[..40]] {
        match switchboard_client::Client::connect(&server.addr, token) {
            Err(ClientError::Rejected { status, .. }) => assert_eq!(status, 401, "token {token:?}"),
            other => panic!("token {token:?}: {:?}", other.map(|_| ())),
        }
    }
    // A token signed with another secret.
    let other = switchboard::token::TokenKey::new(&[9u8; 32]).mint(switchboard::token::Claims {
        user: UserId(1),
        device: switchboard_wire::DeviceId(1),
        expires_unix_s: 4_000_000_000,
    });
    assert!(matches!(
        switchboard_client::Client::connect(&server.addr, &other),
        Err(ClientError::Rejected { status: 401, .. })
    ));
    // The query-parameter form works.
    let mut cfg = server.connect_cfg(1, 1);
    cfg.token_in_query = true;
    let mut c = switchboard_client::Client::connect_with(&cfg).unwrap();
    c.ping_pong(7, T).unwrap();
}

#[test]
fn bad_input_gets_clear_errors_and_loses_nothing() {
    let server = Server::start(2);
    let mut a = server.connect(50, 1);
    let ack = a
        .send_and_wait_ack(Target::Peer(UserId(51)), b"keep me", T)
        .unwrap();
    // Malformed bytes: an Error frame, and the connection stays usable.
    a.send_raw_binary(b"\x01\x02\x03garbage").unwrap();
    match a.recv(T).unwrap() {
        Some(ServerFrame::Error(e)) => assert_eq!(e.code, ErrorCode::MalformedFrame),
        other => panic!("{other:?}"),
    }
    // Oversize payload inside a frame that fits.
    let big = vec![0u8; switchboard_wire::limits::PAYLOAD_BYTES_MAX + 1];
    a.send_message(Target::Peer(UserId(51)), &big).unwrap();
    match a.recv(T).unwrap() {
        Some(ServerFrame::Error(e)) => assert_eq!(e.code, ErrorCode::PayloadTooLarge),
        other => panic!("{other:?}"),
    }
    // Unknown chat, not a member, self chat, cursor beyond the end.
    for (target, code) in [
        (Target::Chat(ChatId(12345)), ErrorCode::UnknownChat),
        (
            Target::Chat(ChatId::direct(UserId(98), UserId(99))),
            ErrorCode::UnknownChat,
        ),
        (Target::Peer(UserId(50)), ErrorCode::SelfChat),
    ] {
        match a.send_and_wait_ack(target, b"x", T) {
            Err(ClientError::Server(e)) => assert_eq!(e.code, code, "{target:?}"),
            other => panic!("{target:?}: {other:?}"),
        }
    }
    let mut intruder = server.connect(52, 1);
    match intruder.send_and_wait_ack(Target::Chat(ack.chat), b"let me in", T) {
        Err(ClientError::Server(e)) => assert_eq!(e.code, ErrorCode::NotMember),
        other => panic!("{other:?}"),
    }
    a.mark_read(ack.chat, Seq(99)).unwrap();
    match a.recv(T).unwrap() {
        Some(ServerFrame::Error(e)) => assert_eq!(e.code, ErrorCode::InvalidArgument),
        other => panic!("{other:?}"),
    }
    // A frame over the limit closes the connection with 1009.
    a.send_raw_binary(&vec![0u8; switchboard_wire::limits::FRAME_BYTES_MAX + 1])
        .unwrap();
    match a.recv(T) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1009),
        other => panic!("{other:?}"),
    }
    // Text frames close with 1003.
    let mut t = server.connect(50, 2);
    t.send_raw_text("hello").unwrap();
    match t.recv(T) {
        Err(ClientError::Closed { code, .. }) => assert_eq!(code, 1003),
        other => panic!("{other:?}"),
    }
    // Nothing stored was lost or corrupted.
    let mut b = server.connect(51, 1);
    let msgs = b.sync(T).unwrap();
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].payload, b"keep me");
}

#[test]
fn metrics_and_health_endpoints() {
    let server = Server::start(2);
    let mut a = server.connect(60, 1);
    a.send_and_wait_ack(Target::Peer(UserId(61)), b"m", T)
        .unwrap();
    let (status, body) = server.http_get("/metrics");
    assert_eq!(status, 200);
    for name in [
        "switchboard_connections{core=\"0\"}",
        "switchboard_messages_persisted_total",
        "switchboard_fsync_latency_us_bucket",
        "switchboard_commit_batch_records_count",
        "switchboard_mesh_outbox_depth",
        "switchboard_errors_total",
        "switchboard_process_rss_bytes",
    ] {
        assert!(body.contains(name), "missing {name}");
    }
    let persisted: u64 = body
        .lines()
        .filter(|l| l.starts_with("switchboard_messages_persisted_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(persisted, 1);
    // The latency split: the send's commit waited at least its own write + fdatasync, and each
    // core's lag probe has run. Both are observed just after the ack went out, so poll briefly.
    let sum = |body: &str, series: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(series))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let body = loop {
        let (_, body) = server.http_get("/metrics");
        let lag_cores = ["0", "1"]
            .iter()
            .filter(|c| {
                sum(
                    &body,
                    &format!("switchboard_reactor_lag_us_count{{core=\"{c}\"}}"),
                ) > 0
            })
            .count();
        if (sum(&body, "switchboard_commit_wait_us_count{") >= 1 && lag_cores == 2)
            || std::time::Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        sum(&body, "switchboard_commit_wait_us_count{") >= 1,
        "{body}"
    );
    assert!(
        sum(&body, "switchboard_commit_wait_us_sum{")
            >= sum(&body, "switchboard_fsync_latency_us_sum{"),
        "a commit's wait includes its write + fdatasync: {body}"
    );
    for c in ["0", "1"] {
        let n = sum(
            &body,
            &format!("switchboard_reactor_lag_us_count{{core=\"{c}\"}}"),
        );
        assert!(n > 0, "core {c} lag probe never ran: {body}");
    }
    // The log index locates the one stored message (set before the commit's ack went out).
    assert_eq!(sum(&body, "switchboard_store_index_messages{"), 1, "{body}");
    assert!(sum(&body, "switchboard_store_index_bytes{") >= 12, "{body}");
    assert_eq!(server.http_get("/healthz"), (200, "ok\n".to_string()));
    assert_eq!(server.http_get("/nope").0, 404);
    assert_eq!(server.http_get("/v1/echo").0, 426);
}

#[test]
fn echo_endpoint_runs_the_same_framing_only_when_enabled() {
    use std::net::TcpStream;
    use tungstenite::Message;
    let off = Server::start(1);
    assert_eq!(
        off.http_get("/v1/echo").0,
        426,
        "a plain GET is not an upgrade"
    );
    let url = format!("ws://{}/v1/echo", off.addr);
    let s = TcpStream::connect(&off.addr).unwrap();
    match tungstenite::client(url.as_str(), s) {
        Err(tungstenite::handshake::HandshakeError::Failure(tungstenite::Error::Http(r))) => {
            assert_eq!(r.status(), 404)
        }
        other => panic!("echo must be off by default: {:?}", other.map(|_| ())),
    }
    let on = Server::start_with(1, &["--echo"]);
    let url = format!("ws://{}/v1/echo", on.addr);
    let (mut ws, _) =
        tungstenite::client(url.as_str(), TcpStream::connect(&on.addr).unwrap()).unwrap();
    for m in [
        Message::text("héllo"),
        Message::binary(vec![1u8; 70_000].split_at(60_000).0.to_vec()),
    ] {
        ws.send(m.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), m);
    }
    ws.close(None).unwrap();
}

#[test]
fn token_command_mints_tokens_the_server_accepts() {
    let server = Server::start(1);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "token",
            "--user",
            "77",
            "--device",
            "3",
            "--ttl",
            "1h",
            "--data-dir",
        ])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut c = switchboard_client::Client::connect(&server.addr, &token).unwrap();
    let ack = c
        .send_and_wait_ack(Target::Peer(UserId(78)), b"from a minted token", T)
        .unwrap();
    assert_eq!(ack.chat, ChatId::direct(UserId(77), UserId(78)));
    // Bad arguments are refused with a clear message and a non-zero exit.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["token", "--user", "0", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("non-zero"));
}

/// `commit_delay_us` gathers records only under sustained load: a message to an idle shard is
/// committed (and acknowledged) at once, even with a long delay configured; a pipelined burst,
/// which does find records waiting, is acknowledged in full and in order.
#[test]
fn commit_delay_spares_a_lone_message() {
    const DELAY_MS: u64 = 500;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("delay.toml");
    let toml = format!(
        "{}commit_delay_us = {}\n",
        util::UNLIMITED_RATES,
        DELAY_MS * 1000
    );
    std::fs::write(&path, toml).expect("config");
    let server = Server::start_with(1, &["--config", path.to_str().expect("utf-8 path")]);
    let mut a = server.connect(70, 1);
    // Whatever the connect itself staged is committed first.
    a.send_and_wait_ack(Target::Peer(UserId(71)), b"warm-up", T)
        .expect("warm-up ack");
    for i in 0..3 {
        std::thread::sleep(Duration::from_millis(50));
        let start = std::time::Instant::now();
        a.send_and_wait_ack(Target::Peer(UserId(71)), format!("lone {i}").as_bytes(), T)
            .expect("lone ack");
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(DELAY_MS * 3 / 5),
            "a lone message on an idle shard waited {took:?} for its ack: the commit delay \
             ({DELAY_MS} ms) applied without sustained load"
        );
    }
    let ids: Vec<ClientMsgId> = (0..300)
        .map(|i| {
            a.send_message(Target::Peer(UserId(71)), format!("burst {i}").as_bytes())
                .expect("send")
        })
        .collect();
    let mut last = None;
    for id in ids {
        let ack = a.wait_ack(id, T).expect("burst ack");
        assert!(
            last < Some(ack.seq),
            "acks out of order: {last:?} then {:?}",
            ack.seq
        );
        last = Some(ack.seq);
    }
    let mut b = server.connect(71, 1);
    let got = b.sync(T).expect("sync");
    assert_eq!(got.len(), 304, "every acknowledged message is stored");
}
