//! Crash consistency against a real server process: SIGKILL it under pipelined load and restart it
//! on the same data directory, or tear the tail of a log segment by hand, then read every chat
//! back and check that nothing acknowledged was lost, nothing was stored twice and every chat is
//! still gap-free.
//!
//! ```text
//!  sender threads ──Send (window 16)──► server ──group commit + fdatasync──► SendAck ──► ack book
//!     │  on any error: reconnect, resend every unacked message with the SAME client_msg_id
//!  main thread: { load 50–300 ms; kill -9; restart } × CRASH_CYCLES; stop; drain; read back
//! ```
//!
//! Env: `CRASH_SEED` fixes the schedule (printed on every run), `CRASH_CYCLES` the number of
//! kill/restart cycles (default 20). Timing still varies between runs, so a seed reproduces the
//! schedule, not the exact interleaving.

mod util;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};
use switchboard_client::{Client, ClientConfig, ClientError};
use switchboard_wire::limits::HISTORY_PAGE_MESSAGES_MAX;
use switchboard_wire::{
    ChatId, ClientMsgId, ErrorCode, Message, MsgId, SendAck, Seq, ServerFrame, Target, UserId,
};
use util::{Server, T};

// ---------------------------------------------------------------------------------------- helpers

/// xorshift64: enough randomness for a schedule, and reproducible from a printed seed.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // splitmix64 of the seed, so small or zero seeds still give a non-zero, mixed state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        XorShift((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform enough in `lo..=hi` for test schedules.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

/// `CRASH_SEED`, else the clock. Printed so a failure names the schedule that produced it.
fn seed(test: &str) -> u64 {
    let seed = env_u64("CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_nanos() as u64
    });
    println!("{test}: seed {seed} (rerun with CRASH_SEED={seed})");
    seed
}

/// Every message of `chat` in seq order, paging `History` backwards from the newest.
fn read_chat(c: &mut Client, chat: ChatId) -> Vec<Message> {
    let mut out: Vec<Message> = Vec::new();
    let mut before = Seq(0);
    loop {
        let page = c
            .history(chat, before, HISTORY_PAGE_MESSAGES_MAX, T)
            .unwrap_or_else(|e| panic!("history of {chat:?} before {before:?}: {e}"));
        for m in &page.messages {
            assert_eq!(m.chat, chat, "history of {chat:?} returned another chat");
            assert!(
                before == Seq(0) || m.seq < before,
                "history page not strictly newest first: {:?} after {before:?}",
                m.seq
            );
            before = m.seq;
        }
        let empty = page.messages.is_empty();
        out.extend(page.messages);
        if !page.has_more {
            break;
        }
        assert!(!empty, "an empty history page says has_more");
    }
    out.reverse();
    out
}

/// Asserts that `msgs` (one chat, in read order) carry exactly the seqs `1..=len`.
fn assert_gap_free(chat: ChatId, msgs: &[Message]) {
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            m.seq.0,
            i as u64 + 1,
            "{chat:?}: position {i} holds seq {} (gap or duplicate); neighbours: {:?}",
            m.seq.0,
            msgs[i.saturating_sub(2)..(i + 2).min(msgs.len())]
                .iter()
                .map(|m| m.seq.0)
                .collect::<Vec<_>>()
        );
    }
}

/// The first index where `a` and `b` differ (the shorter length if one is a prefix of the other).
fn first_difference<X: PartialEq>(a: &[X], b: &[X]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

// ------------------------------------------------------------------------- kill -9 under load

/// The senders: two with a chat of their own, and a pair writing to each other so one chat
/// has two concurrent writers (on two connections, possibly on two cores).
const SENDERS: [(u64, u64); 4] = [(101, 102), (103, 104), (105, 106), (106, 105)];

/// Sends a sender keeps in flight.
const WINDOW: usize = 16;

/// How long a sender keeps trying to reach a restarted server.
const RECONNECT_MAX: Duration = Duration::from_secs(20);

/// The kill/restart phase stops early (with a note) after this long, so the test stays bounded
/// on a slow box; the checks still run on whatever was done.
const CYCLES_PHASE_MAX: Duration = Duration::from_secs(40);

/// The id of a sender's `counter`-th message: the sender in the high half, so ids never collide
/// and a stored message names who sent it and when.
fn msg_id_of(user: u64, counter: u64) -> ClientMsgId {
    ClientMsgId::from_halves(user, counter)
}

/// The senders of the rolling-segments test: like [`SENDERS`], with [`ROLLING_USER_MIN`] ids.
const ROLLING_SENDERS: [(u64, u64); 4] = [(301, 302), (303, 304), (305, 306), (306, 305)];

/// Users from here on send 2–3 KB messages, so the 1 MiB segments of the rolling test fill every
/// few hundred messages.
const ROLLING_USER_MIN: u64 = 300;

/// The payload of a sender's `counter`-th message: names both, plus 0–96 bytes of filler so
/// records have varied lengths (and torn writes land at varied offsets); 2048 more for
/// [`ROLLING_USER_MIN`] users.
fn payload_of(user: u64, counter: u64) -> Vec<u8> {
    let mut p = format!("{user}:{counter}:").into_bytes();
    let mut filler = (counter.wrapping_mul(2_654_435_761) % 97) as usize;
    if user >= ROLLING_USER_MIN {
        filler += 2048;
    }
    p.extend((0..filler).map(|i| (i as u8) ^ (counter as u8)));
    p
}

#[derive(Default)]
struct Shared {
    /// Set by the main thread after the last restart: send nothing new, drain, return.
    stop: AtomicBool,
    /// Odd while the main thread kills and restarts the server, even while it runs. Bumped before
    /// the kill and after the restart, so a disconnect with the same even epoch as at connect time
    /// was not caused by a kill.
    epoch: AtomicU64,
    /// Acks received by all senders (progress reporting only).
    acked: AtomicU64,
}

/// One sender's book: what it sent, what was acked, how often it had to retry.
struct Sender {
    user: u64,
    peer: u64,
    chat: ChatId,
    /// The next counter to send for the first time; 1..next have all been sent at least once.
    next: u64,
    /// Sent (on this or an earlier connection) and not acked yet.
    inflight: BTreeSet<u64>,
    /// How many times each counter went to a socket.
    times_sent: HashMap<u64, u32>,
    /// The first ack of each counter.
    acks: BTreeMap<u64, SendAck>,
    resent: u64,
    duplicate_acks: u64,
    reconnects: u64,
    overloaded: u64,
}

impl Sender {
    fn new(user: u64, peer: u64) -> Sender {
        Sender {
            user,
            peer,
            chat: ChatId::direct(UserId(user), UserId(peer)),
            next: 1,
            inflight: BTreeSet::new(),
            times_sent: HashMap::new(),
            acks: BTreeMap::new(),
            resent: 0,
            duplicate_acks: 0,
            reconnects: 0,
            overloaded: 0,
        }
    }

    /// Connects, retrying while the server is down. Returns the client and the (even) epoch read
    /// before the attempt that succeeded.
    fn connect(&self, cfg: &ClientConfig, shared: &Shared) -> (Client, u64) {
        let deadline = Instant::now() + RECONNECT_MAX;
        let mut last_error = String::from("the server was never up");
        loop {
            let epoch = shared.epoch.load(SeqCst);
            // While a kill is under way a connect may still reach the dying server; wait for it.
            if epoch & 1 == 0 {
                match Client::connect_with(cfg) {
                    Ok(c) => return (c, epoch),
                    Err(e) => last_error = e.to_string(),
                }
            }
            assert!(
                Instant::now() < deadline,
                "sender {}: server unreachable for {RECONNECT_MAX:?}: {last_error}",
                self.user
            );
            // Polling is the only way to learn that a port is listening again.
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn run(mut self, cfg: ClientConfig, shared: &Shared) -> Sender {
        loop {
            if shared.stop.load(SeqCst) && self.inflight.is_empty() {
                return self;
            }
            let (mut client, epoch) = self.connect(&cfg, shared);
            match self.session(&mut client, shared) {
                Ok(()) => {
                    let _ = client.close();
                    return self;
                }
                Err(e) => {
                    let now = shared.epoch.load(SeqCst);
                    // A disconnect without a kill (a close by the server, a 10 s stall) is a
                    // finding in itself, not something to retry quietly.
                    assert_ne!(
                        now,
                        epoch,
                        "sender {}: connection failed while the server was up (no kill since \
                         connecting): {e}; {} in flight",
                        self.user,
                        self.inflight.len()
                    );
                    self.reconnects += 1;
                }
            }
        }
    }

    fn send(&mut self, c: &mut Client, k: u64) -> Result<(), ClientError> {
        *self.times_sent.entry(k).or_default() += 1;
        c.send_message_with_id(
            msg_id_of(self.user, k),
            Target::Peer(UserId(self.peer)),
            &payload_of(self.user, k),
        )
    }

    /// One connection's life: resend what a killed server may or may not have stored, then keep
    /// `WINDOW` sends in flight until stopped and drained. Any client error ends the session.
    fn session(&mut self, c: &mut Client, shared: &Shared) -> Result<(), ClientError> {
        let resend: Vec<u64> = self.inflight.iter().copied().collect();
        for k in resend {
            self.resent += 1;
            self.send(c, k)?;
        }
        loop {
            let stopping = shared.stop.load(SeqCst);
            if stopping && self.inflight.is_empty() {
                return Ok(());
            }
            while !stopping && self.inflight.len() < WINDOW {
                let k = self.next;
                self.next += 1;
                // In flight before it is written: a failed write is resent like a lost ack.
                self.inflight.insert(k);
                self.send(c, k)?;
            }
            match c.recv(T)? {
                Some(ServerFrame::SendAck(ack)) => self.on_ack(ack, shared),
                Some(ServerFrame::Error(e))
                    if e.code == ErrorCode::Overloaded && e.client_msg_id.is_some() =>
                {
                    // Documented back-pressure: retry with the same id.
                    let (user, k) = e.client_msg_id.expect("checked").halves();
                    assert!(user == self.user && self.inflight.contains(&k), "{e:?}");
                    self.overloaded += 1;
                    self.send(c, k)?;
                }
                Some(ServerFrame::Error(e)) => {
                    panic!("sender {}: unexpected error frame {e:?}", self.user)
                }
                // Live pushes from the peer in the shared chat, receipts: not under test here.
                Some(_) => {}
                None => panic!(
                    "sender {}: no frame for {T:?} with {} sends in flight (first {:?}) on a live \
                     connection: server hang?",
                    self.user,
                    self.inflight.len(),
                    self.inflight.first()
                ),
            }
        }
    }

    fn on_ack(&mut self, ack: SendAck, shared: &Shared) {
        let (user, k) = ack.client_msg_id.halves();
        assert_eq!(user, self.user, "ack for another sender's id: {ack:?}");
        assert!(
            self.inflight.remove(&k),
            "sender {}: ack for {k}, which is not in flight (earlier ack: {:?}; new: {ack:?})",
            self.user,
            self.acks.get(&k)
        );
        assert_eq!(ack.chat, self.chat, "{ack:?}");
        if ack.duplicate {
            // Only a retry may be answered as a duplicate.
            assert!(
                self.times_sent[&k] >= 2,
                "sender {}: message {k} was sent once but acked as a duplicate: {ack:?}",
                self.user
            );
            self.duplicate_acks += 1;
        }
        self.acks.insert(k, ack);
        shared.acked.fetch_add(1, Relaxed);
    }
}

#[test]
fn kill9_under_load_loses_no_acknowledged_message() {
    kill9_under_load("kill9_under_load", &SENDERS, Server::start(2));
}

/// Like `kill9_under_load_loses_no_acknowledged_message`, with the smallest segments the server
/// allows (1 MiB) and larger messages, so segments roll all the time: kills land while a spare
/// segment is being zero-filled, renamed into place or just adopted, and recovery scans
/// preallocated segments with free space, sealed and active.
#[test]
fn kill9_while_segments_roll_loses_no_acknowledged_message() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("rolling.toml");
    // Senders 305 and 306 write to each other, so each also receives the other's ~2 KiB
    // messages, unbounded by its own send window; a client thread descheduled for ~100 ms on a
    // busy CI box let the default 1 MiB send queue fill and the server closed it as a slow
    // consumer (4002), which this test counts as a failure. Slow consumers are not under test
    // here (see `limits.rs`): give the queue room.
    let toml = format!(
        "{}segment_bytes_max = 1048576\nconn_send_queue_bytes_max = 67108864\n",
        util::UNLIMITED_RATES
    );
    std::fs::write(&path, toml).expect("config");
    let server = Server::start_with(2, &["--config", path.to_str().expect("utf-8 path")]);
    let segments_before = server.segments().len();
    let server = kill9_under_load("kill9_while_rolling", &ROLLING_SENDERS, server);
    // Rolled: more segments than shards, and the later ones preallocated (full size).
    let segments = server.segments();
    let full = segments
        .iter()
        .filter(|p| std::fs::metadata(p).expect("stat segment").len() == 1024 * 1024)
        .count();
    println!(
        "kill9_while_rolling: {} segments ({segments_before} at start), {full} of them full-size \
         files (preallocated, or filled exactly)",
        segments.len()
    );
    assert!(
        segments.len() > segments_before,
        "no segment rolled: the test did not test rolling"
    );
    // A spare is zero-filled in the background once a segment is half full, and a roll adopts
    // it if ready: over dozens of rolls some must have (a growing segment almost never ends
    // exactly at its limit).
    assert!(
        full > 0,
        "no roll adopted a preallocated spare ({} segments)",
        segments.len()
    );
}

/// Senders write pipelined load while the server is killed and restarted; then every chat is read
/// back and checked against the acks. Returns the (running) server for further checks.
fn kill9_under_load(name: &str, senders: &[(u64, u64)], mut server: Server) -> Server {
    let seed = seed(name);
    let cycles = env_u64("CRASH_CYCLES").unwrap_or(20);
    let mut rng = XorShift::new(seed);
    let shared = Arc::new(Shared::default());
    let started = Instant::now();

    let handles: Vec<_> = senders
        .iter()
        .map(|&(user, peer)| {
            let cfg = server.connect_cfg(user, 1);
            let shared = shared.clone();
            thread::Builder::new()
                .name(format!("sender-{user}"))
                .spawn(move || Sender::new(user, peer).run(cfg, &shared))
                .expect("spawn sender")
        })
        .collect();

    let mut cycles_done = 0u64;
    let mut cycles_with_acks = 0u64;
    for _ in 0..cycles {
        if handles.iter().any(|h| h.is_finished()) {
            break; // A sender failed; its panic is reported by the join below.
        }
        if started.elapsed() > CYCLES_PHASE_MAX {
            println!("{name}: stopping after {cycles_done} cycles: time budget spent");
            break;
        }
        let acked_before = shared.acked.load(Relaxed);
        // The load itself: how long the server runs before the next kill.
        thread::sleep(Duration::from_millis(rng.range(50, 300)));
        if shared.acked.load(Relaxed) > acked_before {
            cycles_with_acks += 1;
        }
        shared.epoch.fetch_add(1, SeqCst);
        // Restart at once, while the kernel may still be tearing down the dead server's io_uring
        // (and with it its listeners and any I/O it had in flight): that window is part of what a
        // supervisor restarting a crashed server exposes. Senders whose connect lands on a dead
        // listener are reset and simply retry.
        server.kill9();
        server.restart();
        shared.epoch.fetch_add(1, SeqCst);
        cycles_done += 1;
    }
    // The checks below connect once; make sure no dead listener can take that connection.
    server.wait_stale_listeners_gone();
    // The server is up: the senders drain their windows (resending what the last kill cut off)
    // so that at the end every message ever sent has been acked.
    shared.stop.store(true, SeqCst);
    let senders: Vec<Sender> = handles
        .into_iter()
        .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        .collect();
    let load_elapsed = started.elapsed();

    let mut by_chat: BTreeMap<ChatId, Vec<&Sender>> = BTreeMap::new();
    for s in &senders {
        assert!(s.inflight.is_empty(), "sender {} did not drain", s.user);
        by_chat.entry(s.chat).or_default().push(s);
    }
    let mut stored_total = 0usize;
    // Server message ids are unique across chats, shards and restarts.
    let mut msg_ids: HashMap<MsgId, (ChatId, Seq)> = HashMap::new();
    for (chat, writers) in &by_chat {
        // Read back as the recipient of the first writer, on devices that never connected.
        let reader = writers[0].peer;
        let msgs = read_chat(&mut server.connect(reader, 9), *chat);
        assert_gap_free(*chat, &msgs);
        let mut by_id: HashMap<ClientMsgId, &Message> = HashMap::new();
        for m in &msgs {
            if let Some(other) = msg_ids.insert(m.msg_id, (*chat, m.seq)) {
                panic!(
                    "msg_id {:?} issued twice: {other:?} and {:?}",
                    m.msg_id,
                    (chat, m.seq)
                );
            }
            if let Some(first) = by_id.insert(m.client_msg_id, m) {
                let (user, k) = m.client_msg_id.halves();
                panic!(
                    "{chat:?}: message {user}:{k} stored twice, at seqs {} and {}",
                    first.seq.0, m.seq.0
                );
            }
        }
        let mut expected = 0usize;
        for s in writers {
            let mut last_seq = 0u64;
            for k in 1..s.next {
                let ack = s.acks.get(&k).expect("drained, so every message was acked");
                let m = by_id.get(&msg_id_of(s.user, k)).unwrap_or_else(|| {
                    panic!(
                        "{chat:?}: message {}:{k} was acked ({ack:?}, sent {} times) but is not \
                         stored; the chat holds {} messages",
                        s.user,
                        s.times_sent[&k],
                        msgs.len()
                    )
                });
                assert_eq!(
                    (m.seq, m.msg_id),
                    (ack.seq, ack.msg_id),
                    "{chat:?}: message {}:{k} is not where its ack said",
                    s.user
                );
                assert_eq!(m.sender_user, UserId(s.user));
                assert_eq!(
                    m.payload,
                    payload_of(s.user, k),
                    "payload of {}:{k}",
                    s.user
                );
                // Per-sender order holds across crashes too, unless Overloaded forced an
                // out-of-order retry: a connection's sends reach the chat's owner in order and
                // are logged in that order, and recovery keeps a prefix of the log (it only cuts
                // the tail), so what a killed server kept of one connection is a prefix of what
                // it sent; the retry resends the rest in order on the next connection. (Without
                // a kill there is no reconnect: any other disconnect fails the test.) So a
                // message k+1 can never be stored while k is not, and k's seq stays below k+1's.
                if s.overloaded == 0 {
                    assert!(
                        m.seq.0 > last_seq,
                        "{chat:?}: sender {} message {k} has seq {} but an earlier one has {last_seq}",
                        s.user,
                        m.seq.0
                    );
                }
                last_seq = m.seq.0;
                expected += 1;
            }
        }
        assert_eq!(msgs.len(), expected, "{chat:?} holds messages nobody sent");
        // A second read path: Sync from a fresh device of the reader sees the same log.
        let mut fresh = server.connect(reader, 10);
        let synced: Vec<(Seq, MsgId, ClientMsgId)> = fresh
            .sync(T)
            .expect("sync")
            .into_iter()
            .filter(|m| m.chat == *chat)
            .map(|m| (m.seq, m.msg_id, m.client_msg_id))
            .collect();
        let history: Vec<(Seq, MsgId, ClientMsgId)> = msgs
            .iter()
            .map(|m| (m.seq, m.msg_id, m.client_msg_id))
            .collect();
        assert!(
            synced == history,
            "{chat:?}: sync ({} messages) and history ({}) disagree first at position {}",
            synced.len(),
            history.len(),
            first_difference(&synced, &history)
        );
        assert_eq!(
            (fresh.cursors().duplicates(), fresh.cursors().gaps()),
            (0, 0)
        );
        stored_total += msgs.len();
    }

    let acked: usize = senders.iter().map(|s| s.acks.len()).sum();
    let resent: u64 = senders.iter().map(|s| s.resent).sum();
    let duplicate_acks: u64 = senders.iter().map(|s| s.duplicate_acks).sum();
    let reconnects: u64 = senders.iter().map(|s| s.reconnects).sum();
    let overloaded: u64 = senders.iter().map(|s| s.overloaded).sum();
    println!(
        "{name}: seed {seed}: {cycles_done} kill/restart cycles ({cycles_with_acks} \
         with acks), {acked} acked, {stored_total} stored in {} chats, {resent} resent, \
         {duplicate_acks} duplicate acks, {reconnects} reconnects, {overloaded} overloaded, \
         load {:.1} s, total {:.1} s",
        by_chat.len(),
        load_elapsed.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert!(cycles_done > 0, "no kill/restart cycle ran");
    assert_eq!(acked, stored_total);
    server
}

// ------------------------------------------------------------------------------- torn tails

/// What a chat must hold, in seq order.
struct Expected {
    reader: u64,
    messages: Vec<SendAck>,
}

/// Writers of the torn-tail test: enough chats that both shards almost surely hold some.
const TORN_PAIRS: [(u64, u64); 6] = [
    (201, 202),
    (203, 204),
    (205, 206),
    (207, 208),
    (209, 210),
    (211, 212),
];

fn torn_payload(id: ClientMsgId) -> Vec<u8> {
    let (user, lo) = id.halves();
    format!(
        "round {} message {} from {user}",
        lo >> 32,
        lo & 0xffff_ffff
    )
    .into_bytes()
}

/// Sends `per_chat` acked messages in every chat of `TORN_PAIRS`, each answered with the next seq
/// of its chat.
fn send_round(server: &Server, round: u64, per_chat: u64, book: &mut BTreeMap<ChatId, Expected>) {
    for (a, b) in TORN_PAIRS {
        let chat = ChatId::direct(UserId(a), UserId(b));
        let e = book.entry(chat).or_insert(Expected {
            reader: b,
            messages: Vec::new(),
        });
        let mut c = server.connect(a, 1);
        for i in 0..per_chat {
            let id = ClientMsgId::from_halves(a, round << 32 | i);
            c.send_message_with_id(id, Target::Peer(UserId(b)), &torn_payload(id))
                .unwrap_or_else(|e| panic!("round {round}: send: {e}"));
            let ack = c
                .wait_ack(id, T)
                .unwrap_or_else(|e| panic!("round {round}: ack: {e}"));
            assert!(!ack.duplicate, "round {round}: {ack:?}");
            assert_eq!(
                ack.seq.0,
                e.messages.len() as u64 + 1,
                "round {round}: {chat:?} did not continue with the next seq"
            );
            e.messages.push(ack);
        }
    }
}

/// Reads every chat back and compares it with the book; retries the newest message of each chat
/// and expects the original ack (the dedup table was rebuilt from the recovered log).
fn verify(server: &Server, book: &BTreeMap<ChatId, Expected>, when: &str) {
    assert_eq!(
        server.http_get("/healthz"),
        (200, "ok\n".to_string()),
        "{when}"
    );
    for (chat, e) in book {
        let msgs = read_chat(&mut server.connect(e.reader, 7), *chat);
        assert_gap_free(*chat, &msgs);
        let got: Vec<(Seq, MsgId, ClientMsgId)> = msgs
            .iter()
            .map(|m| (m.seq, m.msg_id, m.client_msg_id))
            .collect();
        let want: Vec<(Seq, MsgId, ClientMsgId)> = e
            .messages
            .iter()
            .map(|a| (a.seq, a.msg_id, a.client_msg_id))
            .collect();
        let at = first_difference(&got, &want);
        assert!(
            got == want,
            "{when}: {chat:?} holds {} messages, {} were acked; first difference at position \
             {at}: stored {:?}, acked {:?}",
            got.len(),
            want.len(),
            got.get(at),
            want.get(at)
        );
        for m in &msgs {
            assert_eq!(m.payload, torn_payload(m.client_msg_id), "{when}");
        }
        let last = e.messages.last().expect("every chat has messages");
        let (sender, _) = last.client_msg_id.halves();
        let mut c = server.connect(sender, 1);
        c.send_message_with_id(
            last.client_msg_id,
            Target::Chat(*chat),
            &torn_payload(last.client_msg_id),
        )
        .expect("retry");
        let again = c.wait_ack(last.client_msg_id, T).expect("retry ack");
        assert!(
            again.duplicate,
            "{when}: a retry was stored again: {again:?}"
        );
        assert_eq!((again.seq, again.msg_id), (last.seq, last.msg_id), "{when}");
    }
}

/// The newest segment of every shard, with its length, for shards whose newest segment holds
/// records (the only ones with a tail to tear).
fn newest_segments_with_data(server: &Server) -> Vec<(PathBuf, u64)> {
    let mut newest: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    // Sorted, and names are zero-padded base offsets: the last one per shard is the newest.
    for seg in server.segments() {
        let shard = seg.parent().expect("segment in a shard dir").to_path_buf();
        newest.insert(shard, seg);
    }
    newest
        .into_values()
        .map(|p| {
            let len = std::fs::metadata(&p).expect("stat segment").len();
            (p, len)
        })
        .filter(|(_, len)| *len > 0)
        .collect()
}

/// Appends `tail` to every segment in `segs`, as a write cut short by the kill would leave it.
fn tear(segs: &[(PathBuf, u64)], tail: &mut dyn FnMut() -> Vec<u8>) {
    for (path, _) in segs {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .expect("open segment");
        f.write_all(&tail()).expect("append garbage");
        f.sync_all().expect("sync");
    }
}

/// After recovery each torn segment is back at its last good record.
fn assert_truncated(segs: &[(PathBuf, u64)], when: &str) {
    for (path, len) in segs {
        let now = std::fs::metadata(path).expect("stat segment").len();
        assert_eq!(
            now,
            *len,
            "{when}: {} was not cut back to its last good record",
            path.display()
        );
    }
}

/// SIGKILL, then wait until the dead server's listeners are closed (see
/// `Server::wait_stale_listeners_gone`): the sign that its io_uring, with any write it had in
/// flight, is gone before the test edits its files, and that no later connection lands on a dead
/// listener.
fn crash(server: &mut Server) {
    server.kill9();
    server.wait_stale_listeners_gone();
}

#[test]
fn torn_tail_is_truncated_and_acked_messages_survive() {
    let seed = seed("torn_tail");
    let mut rng = XorShift::new(seed);
    let mut server = Server::start(2);
    let mut book = BTreeMap::new();
    send_round(&server, 1, 8, &mut book);
    verify(&server, &book, "before any crash");

    // (a) A partial record of random bytes after the last good one.
    crash(&mut server);
    let segs = newest_segments_with_data(&server);
    assert!(!segs.is_empty(), "no shard holds data");
    tear(&segs, &mut || {
        let n = rng.range(1, 120) as usize;
        rng.bytes(n)
    });
    server.restart();
    assert_truncated(&segs, "after random garbage");
    verify(&server, &book, "after random garbage");
    send_round(&server, 2, 5, &mut book);
    verify(&server, &book, "after random garbage and new sends");

    // (b) A header that promises a long body, and only part of the body.
    crash(&mut server);
    let segs = newest_segments_with_data(&server);
    tear(&segs, &mut || {
        let body_len = rng.range(1_000, 60_000) as u32;
        let mut t = body_len.to_le_bytes().to_vec();
        t.extend((rng.next() as u32).to_le_bytes()); // crc
        t.extend([2, 1]); // tag Message, version 1: looks like the real thing
        let n = rng.range(0, 200) as usize;
        t.extend(rng.bytes(n));
        t
    });
    server.restart();
    assert_truncated(&segs, "after a cut-short body");
    verify(&server, &book, "after a cut-short body");
    send_round(&server, 3, 5, &mut book);

    // A clean crash: what was appended after the repaired tails is durable too.
    crash(&mut server);
    server.restart();
    verify(&server, &book, "after a clean restart");
    println!(
        "torn_tail: seed {seed}: {} chats, {} messages, {} torn segments per round",
        book.len(),
        book.values().map(|e| e.messages.len()).sum::<usize>(),
        segs.len()
    );
}
