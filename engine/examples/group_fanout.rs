//! Measures group fan-out end to end on a running server: one sender, `--members` recipients
//! (one connection each, all online), `--messages` messages pipelined into one group; reports
//! deliveries per second (messages received by all recipients / time from first send to last
//! receipt) and the time to the last delivery of each message (p50/p99).
//!
//! ```text
//! cargo run --release -p switchboard -- serve --listen 127.0.0.1:7070 --data-dir /tmp/sb &
//! cargo run --release -p switchboard --example group_fanout -- 127.0.0.1:7070 /tmp/sb/token.secret 100 2000
//! ```
//! Closed loop (the sender keeps at most 64 sends unacknowledged); a first figure, not the load
//! generator's open-loop measurement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use switchboard::token::{Claims, TokenKey};
use switchboard_client::Client;
use switchboard_wire::{DeviceId, ServerFrame, Target, UserId};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: group_fanout ADDR SECRET_FILE MEMBERS MESSAGES");
        std::process::exit(2);
    }
    let (addr, secret, members, messages): (String, String, u64, u64) = (
        args[1].clone(),
        args[2].clone(),
        args[3].parse().unwrap(),
        args[4].parse().unwrap(),
    );
    assert!((1..=1023).contains(&members) && messages > 0 && messages <= 1_000_000);
    let key = TokenKey::new(
        std::fs::read_to_string(&secret)
            .expect("secret")
            .trim()
            .as_bytes(),
    );
    let base = 10_000_000 + (std::process::id() as u64 % 1000) * 10_000;
    let token = |u: u64| {
        key.mint(Claims {
            user: UserId(u),
            device: DeviceId(1),
            expires_unix_s: 4_000_000_000,
        })
    };
    let start_at = Arc::new(Barrier::new(members as usize + 1));
    let started = Arc::new(std::sync::OnceLock::<Instant>::new());
    let last_done_ns = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (1..=members)
        .map(|i| {
            let (addr, tok, start_at, started, last) = (
                addr.clone(),
                token(base + i),
                start_at.clone(),
                started.clone(),
                last_done_ns.clone(),
            );
            std::thread::spawn(move || {
                let mut c = Client::connect(&addr, &tok).expect("connect");
                start_at.wait();
                let mut got = 0u64;
                let deadline = Instant::now() + Duration::from_secs(120);
                // The group's creation event, then `messages` messages.
                while got < messages + 1 {
                    assert!(Instant::now() < deadline, "timed out");
                    if let Some(ServerFrame::Message(_)) =
                        c.recv(Duration::from_secs(1)).expect("recv")
                    {
                        got += 1;
                    }
                }
                let t0 = *started.get().expect("sender started");
                last.fetch_max(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            })
        })
        .collect();
    let mut sender = Client::connect(&addr, &token(base)).expect("connect");
    start_at.wait();
    std::thread::sleep(Duration::from_millis(300)); // every Online reached every core
    let ids: Vec<UserId> = (1..=members).map(|i| UserId(base + i)).collect();
    let t0 = Instant::now();
    started.set(t0).unwrap();
    let info = sender
        .create_group("fanout", &ids, false, Duration::from_secs(30))
        .expect("group");
    let mut window = std::collections::VecDeque::new();
    for i in 0..messages {
        window.push_back(
            sender
                .send_message(Target::Chat(info.chat), &i.to_be_bytes())
                .expect("send"),
        );
        if window.len() >= 64 {
            sender
                .wait_ack(window.pop_front().unwrap(), Duration::from_secs(30))
                .expect("ack");
        }
    }
    while let Some(id) = window.pop_front() {
        sender.wait_ack(id, Duration::from_secs(30)).expect("ack");
    }
    let acked = t0.elapsed();
    for r in readers {
        r.join().expect("reader");
    }
    let total = Duration::from_nanos(last_done_ns.load(Ordering::Relaxed));
    let deliveries = members * (messages + 1);
    println!(
        "members={members} messages={messages} deliveries={deliveries} all_acked_after={:.3}s all_delivered_after={:.3}s deliveries_per_s={:.0} msgs_per_s={:.0}",
        acked.as_secs_f64(),
        total.as_secs_f64(),
        deliveries as f64 / total.as_secs_f64(),
        (messages + 1) as f64 / acked.as_secs_f64()
    );
}
