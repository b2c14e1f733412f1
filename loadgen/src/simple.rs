//! `simple`: closed-loop message throughput and latency between P sender/recipient pairs.
//!
//! ```text
//!  sender thread (Client, user 2i)                       recipient thread (Client, user 2i+1)
//!   Send ×≤W unacked ─► server: persist (fdatasync) ─► SendAck ─► ack latency
//!                                └──────────────► Message ─► e2e latency = now − stamp in payload
//!                                                             └─ Delivered cursor every K messages
//!  payload = "SBLG" | pair u32 | counter u64 | send_ns u64 | filler   (little-endian)
//! ```
//!
//! Closed loop: a sender only sends when fewer than W of its messages are unacked, so a slow
//! server slows the offered load down and the latencies exclude the queueing an open-loop
//! (fixed-rate) client would see. That is coordinated omission by construction; the open-loop
//! mode is a later issue.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use switchboard_client::{new_client_msg_id, Client, ClientConfig};
use switchboard_wire::limits::PAYLOAD_BYTES_MAX;
use switchboard_wire::{ClientMsgId, ServerFrame, Target, UserId};

use crate::metrics;
use crate::report::{self, Json, LatencySummary};
use crate::sys::{self, now_ns};
use crate::token::Minter;

/// Bytes of the header every payload starts with.
pub const PAYLOAD_HEADER_BYTES: usize = 24;

/// "SBLG" little-endian: marks a payload written by this load generator.
const PAYLOAD_MAGIC: u32 = u32::from_le_bytes(*b"SBLG");

/// How long a recipient blocks in one `recv` before re-checking whether to stop.
const RECV_SLICE: Duration = Duration::from_millis(100);

/// Most messages per pair: each costs 10 bytes of bookkeeping per pair (send time, state,
/// delivered flag), so this bounds that at ~100 MB per pair.
pub const MESSAGES_PER_PAIR_MAX: usize = 10_000_000;

/// Most pairs: two threads and two connections each.
pub const PAIRS_MAX: usize = 1000;

const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

const _: () = assert!(PAYLOAD_HEADER_BYTES <= PAYLOAD_BYTES_MAX);

#[derive(Clone, Debug)]
pub struct SimpleArgs {
    pub target: SocketAddr,
    pub secret_file: PathBuf,
    pub pairs: usize,
    pub messages: usize,
    pub window: usize,
    pub payload_bytes: usize,
    pub delivered_every: usize,
    /// Senders stop sending after this long.
    pub duration: Duration,
    /// After its sender stops, how long a recipient waits for the rest.
    pub drain: Duration,
    /// A sender gives up when no SendAck arrives for this long.
    pub ack_timeout: Duration,
    pub first_user: u64,
    pub json: Option<PathBuf>,
}

/// Writes the header into the first `PAYLOAD_HEADER_BYTES` of `buf`.
pub fn stamp_payload(buf: &mut [u8], pair: u32, counter: u64, send_ns: u64) {
    buf[..4].copy_from_slice(&PAYLOAD_MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&pair.to_le_bytes());
    buf[8..16].copy_from_slice(&counter.to_le_bytes());
    buf[16..24].copy_from_slice(&send_ns.to_le_bytes());
}

/// `(pair, counter, send_ns)` of a payload written by [`stamp_payload`].
pub fn read_payload(p: &[u8]) -> Option<(u32, u64, u64)> {
    let header = p.get(..PAYLOAD_HEADER_BYTES)?;
    let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    (u32_at(0) == PAYLOAD_MAGIC).then(|| (u32_at(4), u64_at(8), u64_at(16)))
}

/// What one pair's threads publish to each other.
#[derive(Default)]
struct PairShared {
    /// Messages the sender has written to its socket so far.
    sent: AtomicU64,
    /// Set (Release) after the sender's last send; `sent` is final then.
    sender_done: AtomicBool,
}

const STATE_PENDING: u8 = 0;
const STATE_ACKED: u8 = 1;
const STATE_ERROR: u8 = 2;

struct SenderResult {
    sent: u64,
    acked: u64,
    /// Per counter: `STATE_*`.
    state: Vec<u8>,
    ack_us: Histogram<u64>,
    last_ack_ns: u64,
    server_errors: BTreeMap<String, u64>,
    duplicate_acks: u64,
    unknown_acks: u64,
    receipts: u64,
    fatal: Option<String>,
}

struct RecipientResult {
    delivered: Vec<bool>,
    unique: u64,
    duplicates: u64,
    order_violations: u64,
    foreign: u64,
    e2e_us: Histogram<u64>,
    last_delivery_ns: u64,
    cursors_sent: u64,
    client_duplicates: u64,
    client_gaps: u64,
    fatal: Option<String>,
}

fn sender(
    mut client: Client,
    pair: u32,
    to: UserId,
    args: &SimpleArgs,
    shared: &PairShared,
    id_hi: u64,
) -> SenderResult {
    let m = args.messages;
    let mut r = SenderResult {
        sent: 0,
        acked: 0,
        state: vec![STATE_PENDING; m],
        ack_us: report::latency_histogram(),
        last_ack_ns: 0,
        server_errors: BTreeMap::new(),
        duplicate_acks: 0,
        unknown_acks: 0,
        receipts: 0,
        fatal: None,
    };
    let mut send_ns = vec![0u64; m];
    // Filler is a fixed pattern: the server treats payloads as opaque bytes.
    let mut payload = vec![0x5a_u8; args.payload_bytes];
    let send_until = Instant::now() + args.duration;
    let mut next = 0usize;
    let mut inflight = 0usize;
    'run: loop {
        while inflight < args.window && next < m && Instant::now() < send_until {
            let now = now_ns();
            stamp_payload(&mut payload, pair, next as u64, now);
            send_ns[next] = now;
            let id = ClientMsgId::from_halves(id_hi, next as u64);
            if let Err(e) = client.send_message_with_id(id, Target::Peer(to), &payload) {
                r.fatal = Some(format!("pair {pair} sender: send: {e}"));
                break 'run;
            }
            next += 1;
            inflight += 1;
            shared.sent.store(next as u64, Ordering::Relaxed);
        }
        if inflight == 0 {
            break;
        }
        // Closed loop: block until an answer frees a window slot.
        match client.recv(args.ack_timeout) {
            Ok(Some(ServerFrame::SendAck(ack))) => {
                let now = now_ns();
                let (hi, c) = ack.client_msg_id.halves();
                let c = c as usize;
                if hi != id_hi || c >= next {
                    r.unknown_acks += 1;
                    continue;
                }
                if r.state[c] != STATE_PENDING || ack.duplicate {
                    r.duplicate_acks += 1;
                }
                if r.state[c] == STATE_PENDING {
                    r.state[c] = STATE_ACKED;
                    inflight -= 1;
                    r.acked += 1;
                    r.ack_us
                        .saturating_record(now.saturating_sub(send_ns[c]) / 1000);
                    r.last_ack_ns = now;
                }
            }
            Ok(Some(ServerFrame::Error(e))) => {
                *r.server_errors.entry(format!("{:?}", e.code)).or_default() += 1;
                if let Some(id) = e.client_msg_id {
                    let (hi, c) = id.halves();
                    let c = c as usize;
                    if hi == id_hi && c < next && r.state[c] == STATE_PENDING {
                        r.state[c] = STATE_ERROR;
                        inflight -= 1;
                    }
                }
            }
            Ok(Some(ServerFrame::Receipt(_))) => r.receipts += 1,
            Ok(Some(_)) => {}
            Ok(None) => {
                r.fatal = Some(format!(
                    "pair {pair} sender: no SendAck for {:?} with {inflight} in flight",
                    args.ack_timeout
                ));
                break;
            }
            Err(e) => {
                r.fatal = Some(format!("pair {pair} sender: {e}"));
                break;
            }
        }
    }
    r.sent = next as u64;
    shared.sent.store(next as u64, Ordering::Relaxed);
    shared.sender_done.store(true, Ordering::Release);
    // Receipts may still be in flight; the close handshake discards them.
    let _ = client.close();
    r
}

fn recipient(
    mut client: Client,
    pair: u32,
    args: &SimpleArgs,
    shared: &PairShared,
) -> RecipientResult {
    let m = args.messages;
    let mut r = RecipientResult {
        delivered: vec![false; m],
        unique: 0,
        duplicates: 0,
        order_violations: 0,
        foreign: 0,
        e2e_us: report::latency_histogram(),
        last_delivery_ns: 0,
        cursors_sent: 0,
        client_duplicates: 0,
        client_gaps: 0,
        fatal: None,
    };
    // Bounds the loop even if the sender thread never reports done.
    let hard_deadline =
        Instant::now() + args.duration + args.ack_timeout + args.drain + Duration::from_secs(10);
    let mut drain_deadline: Option<Instant> = None;
    let mut highest: Option<u64> = None;
    let mut since_cursor = 0usize;
    let mut last_position = None;
    loop {
        let now = Instant::now();
        if shared.sender_done.load(Ordering::Acquire) {
            let deadline = *drain_deadline.get_or_insert(now + args.drain);
            if r.unique >= shared.sent.load(Ordering::Relaxed) || now >= deadline {
                break;
            }
        }
        if now >= hard_deadline {
            r.fatal = Some(format!("pair {pair} recipient: hard deadline passed"));
            break;
        }
        match client.recv(RECV_SLICE) {
            Ok(Some(ServerFrame::Message(msg))) => {
                let now = now_ns();
                match read_payload(&msg.payload) {
                    Some((p, c, stamp)) if p == pair && (c as usize) < m => {
                        r.e2e_us.saturating_record(now.saturating_sub(stamp) / 1000);
                        if r.delivered[c as usize] {
                            r.duplicates += 1;
                        } else {
                            r.delivered[c as usize] = true;
                            r.unique += 1;
                            if highest.is_some_and(|h| c < h) {
                                r.order_violations += 1;
                            }
                            highest = Some(highest.map_or(c, |h| h.max(c)));
                        }
                        r.last_delivery_ns = now;
                    }
                    _ => r.foreign += 1,
                }
                since_cursor += 1;
                last_position = Some((msg.chat, msg.seq));
                if since_cursor >= args.delivered_every {
                    if let Err(e) = client.mark_delivered(msg.chat, msg.seq) {
                        r.fatal = Some(format!("pair {pair} recipient: Delivered: {e}"));
                        break;
                    }
                    r.cursors_sent += 1;
                    since_cursor = 0;
                }
            }
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => {
                r.fatal = Some(format!("pair {pair} recipient: {e}"));
                break;
            }
        }
    }
    if since_cursor > 0 && r.fatal.is_none() {
        if let Some((chat, seq)) = last_position {
            if client.mark_delivered(chat, seq).is_ok() {
                r.cursors_sent += 1;
            }
        }
    }
    r.client_duplicates = client.cursors().duplicates();
    r.client_gaps = client.cursors().gaps();
    let _ = client.close();
    r
}

fn connect(args: &SimpleArgs, minter: &Minter, user: u64, expires: u64) -> Result<Client, String> {
    let token = minter.mint(user, 1, expires);
    Client::connect_with(&ClientConfig::new(args.target.to_string(), token))
        .map_err(|e| format!("connect user {user}: {e}"))
}

/// Runs `simple`. `Ok(true)`: no message lost, duplicated or reordered, and no errors.
pub fn run(args: &SimpleArgs) -> Result<bool, String> {
    if args.pairs == 0 || args.pairs > PAIRS_MAX {
        return Err(format!("--pairs must be 1..={PAIRS_MAX}"));
    }
    if args.messages == 0 || args.messages > MESSAGES_PER_PAIR_MAX {
        return Err(format!("--messages must be 1..={MESSAGES_PER_PAIR_MAX}"));
    }
    if args.window == 0 || args.delivered_every == 0 {
        return Err("--window and --delivered-every must be at least 1".into());
    }
    if !(PAYLOAD_HEADER_BYTES..=PAYLOAD_BYTES_MAX).contains(&args.payload_bytes) {
        return Err(format!(
            "--payload-bytes must be {PAYLOAD_HEADER_BYTES}..={PAYLOAD_BYTES_MAX} (the first \
             {PAYLOAD_HEADER_BYTES} carry the send timestamp and counter)"
        ));
    }
    sys::raise_fd_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    let minter = Minter::from_secret_file(&args.secret_file)?;
    let expires =
        sys::unix_now_s() + (args.duration + args.ack_timeout + args.drain).as_secs() + 3600;
    println!(
        "simple: target {}, {} pairs x {} messages, window {}, payload {} B, Delivered cursor every {} messages, duration bound {:?}",
        args.target,
        args.pairs,
        args.messages,
        args.window,
        args.payload_bytes,
        args.delivered_every,
        args.duration
    );
    println!(
        "  CLOSED LOOP: each sender keeps at most {} sends unacked, so load adapts to the server and \
         latencies exclude queueing a fixed-rate client would see (no open-loop schedule yet)",
        args.window
    );

    let before = metrics::scrape(args.target, METRICS_TIMEOUT)?;
    // Recipients first, so they are online when the first message is routed.
    let mut recipients = Vec::with_capacity(args.pairs);
    for i in 0..args.pairs {
        recipients.push(connect(
            args,
            &minter,
            args.first_user + 2 * i as u64 + 1,
            expires,
        )?);
    }
    let mut senders = Vec::with_capacity(args.pairs);
    for i in 0..args.pairs {
        senders.push(connect(
            args,
            &minter,
            args.first_user + 2 * i as u64,
            expires,
        )?);
    }

    let barrier = Arc::new(Barrier::new(2 * args.pairs + 1));
    let args_shared = Arc::new(args.clone());
    let id_hi = new_client_msg_id().halves().0;
    let mut sender_threads = Vec::with_capacity(args.pairs);
    let mut recipient_threads = Vec::with_capacity(args.pairs);
    for (i, (s, rc)) in senders.into_iter().zip(recipients).enumerate() {
        let pair = i as u32;
        let shared = Arc::new(PairShared::default());
        let to = UserId(args.first_user + 2 * i as u64 + 1);
        let (a, b, sh) = (args_shared.clone(), barrier.clone(), shared.clone());
        // Distinct per pair, so an ack can never be mistaken for another pair's.
        let hi = switchboard_wire::splitmix64(id_hi ^ u64::from(pair));
        sender_threads.push(
            std::thread::Builder::new()
                .name(format!("sender-{i}"))
                .spawn(move || {
                    b.wait();
                    sender(s, pair, to, &a, &sh, hi)
                })
                .map_err(|e| format!("spawn: {e}"))?,
        );
        let (a, b, sh) = (args_shared.clone(), barrier.clone(), shared);
        recipient_threads.push(
            std::thread::Builder::new()
                .name(format!("recipient-{i}"))
                .spawn(move || {
                    b.wait();
                    recipient(rc, pair, &a, &sh)
                })
                .map_err(|e| format!("spawn: {e}"))?,
        );
    }
    barrier.wait();
    let start_ns = now_ns();
    let wall = Instant::now();

    let mut sent_results = Vec::with_capacity(args.pairs);
    for t in sender_threads {
        sent_results.push(
            t.join()
                .map_err(|_| "a sender thread panicked".to_string())?,
        );
    }
    let mut recv_results = Vec::with_capacity(args.pairs);
    for t in recipient_threads {
        recv_results.push(
            t.join()
                .map_err(|_| "a recipient thread panicked".to_string())?,
        );
    }
    let wall = wall.elapsed();
    let after = metrics::scrape(args.target, METRICS_TIMEOUT)?;

    // ---------------------------------------------------------------- merge
    let mut ack_us = report::latency_histogram();
    let mut e2e_us = report::latency_histogram();
    let (mut sent, mut acked, mut delivered) = (0u64, 0u64, 0u64);
    let (mut lost, mut unacked, mut delivered_unacked) = (0u64, 0u64, 0u64);
    let (mut duplicates, mut order_violations, mut foreign) = (0u64, 0u64, 0u64);
    let (mut dup_acks, mut unknown_acks, mut receipts, mut cursors_sent) = (0u64, 0u64, 0u64, 0u64);
    let (mut client_dups, mut client_gaps) = (0u64, 0u64);
    let (mut last_ack_ns, mut last_delivery_ns) = (start_ns, start_ns);
    let mut server_errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut fatal = Vec::new();
    for (s, r) in sent_results.iter().zip(&recv_results) {
        ack_us
            .add(&s.ack_us)
            .map_err(|e| format!("merge histograms: {e}"))?;
        e2e_us
            .add(&r.e2e_us)
            .map_err(|e| format!("merge histograms: {e}"))?;
        sent += s.sent;
        acked += s.acked;
        delivered += r.unique;
        for (c, state) in s.state.iter().enumerate().take(s.sent as usize) {
            match (*state, r.delivered[c]) {
                (STATE_ACKED, false) => lost += 1,
                (STATE_PENDING, _) => unacked += 1,
                _ => {}
            }
            if *state != STATE_ACKED && r.delivered[c] {
                delivered_unacked += 1;
            }
        }
        duplicates += r.duplicates;
        order_violations += r.order_violations;
        foreign += r.foreign;
        dup_acks += s.duplicate_acks;
        unknown_acks += s.unknown_acks;
        receipts += s.receipts;
        cursors_sent += r.cursors_sent;
        client_dups += r.client_duplicates;
        client_gaps += r.client_gaps;
        last_ack_ns = last_ack_ns.max(s.last_ack_ns);
        last_delivery_ns = last_delivery_ns.max(r.last_delivery_ns);
        for (k, v) in &s.server_errors {
            *server_errors.entry(k.clone()).or_default() += v;
        }
        fatal.extend(s.fatal.iter().chain(&r.fatal).cloned());
    }
    let ack_span_s = (last_ack_ns - start_ns) as f64 / 1e9;
    let delivery_span_s = (last_delivery_ns - start_ns) as f64 / 1e9;
    let acked_per_s = if ack_span_s > 0.0 {
        acked as f64 / ack_span_s
    } else {
        0.0
    };
    let delivered_per_s = if delivery_span_s > 0.0 {
        delivered as f64 / delivery_span_s
    } else {
        0.0
    };
    let ack = LatencySummary::of(&ack_us);
    let e2e = LatencySummary::of(&e2e_us);
    let errors_total: u64 = server_errors.values().sum();
    let persisted = after
        .messages_persisted_total
        .saturating_sub(before.messages_persisted_total);

    println!(
        "sent {sent}, acked {acked}, delivered {delivered} (unique), server errors {errors_total}, \
         run {:.2} s (last ack at {ack_span_s:.2} s, last delivery at {delivery_span_s:.2} s)",
        wall.as_secs_f64()
    );
    println!("throughput: {acked_per_s:.0} acked msgs/s, {delivered_per_s:.0} deliveries/s");
    println!("ack latency (send -> SendAck), us:   {}", ack.line());
    println!("e2e latency (send -> Message), us:   {}", e2e.line());
    println!(
        "integrity: lost {lost} (acked, not delivered within {:?} drain), duplicates {duplicates}, \
         order violations {order_violations}, unacked {unacked}, delivered-but-unacked {delivered_unacked}, \
         foreign payloads {foreign}, duplicate acks {dup_acks}, unknown acks {unknown_acks}, \
         client cursor duplicates {client_dups} / gaps {client_gaps}",
        args.drain
    );
    println!(
        "receipt flow: {cursors_sent} Delivered cursors sent, {receipts} Receipts at senders; \
         server messages_persisted +{persisted}"
    );
    for (k, v) in &server_errors {
        println!("  server error {k}: {v}");
    }
    for f in &fatal {
        println!("  FATAL {f}");
    }

    let ok = lost == 0
        && duplicates == 0
        && order_violations == 0
        && unacked == 0
        && foreign == 0
        && dup_acks == 0
        && unknown_acks == 0
        && client_dups == 0
        && client_gaps == 0
        && errors_total == 0
        && fatal.is_empty();
    if let Some(path) = &args.json {
        let json = Json::obj([
            ("mode", Json::s("simple")),
            ("loop", Json::s("closed")),
            ("target", Json::s(args.target.to_string())),
            ("pairs", Json::U(args.pairs as u64)),
            ("messages_per_pair", Json::U(args.messages as u64)),
            ("window", Json::U(args.window as u64)),
            ("payload_bytes", Json::U(args.payload_bytes as u64)),
            ("delivered_every", Json::U(args.delivered_every as u64)),
            ("first_user", Json::U(args.first_user)),
            ("run_s", Json::F(wall.as_secs_f64())),
            ("sent", Json::U(sent)),
            ("acked", Json::U(acked)),
            ("delivered", Json::U(delivered)),
            ("acked_per_s", Json::F(acked_per_s)),
            ("delivered_per_s", Json::F(delivered_per_s)),
            ("ack_latency", ack.json()),
            ("e2e_latency", e2e.json()),
            ("lost", Json::U(lost)),
            ("duplicates", Json::U(duplicates)),
            ("order_violations", Json::U(order_violations)),
            ("unacked", Json::U(unacked)),
            ("delivered_unacked", Json::U(delivered_unacked)),
            ("foreign_payloads", Json::U(foreign)),
            ("duplicate_acks", Json::U(dup_acks)),
            ("unknown_acks", Json::U(unknown_acks)),
            ("client_cursor_duplicates", Json::U(client_dups)),
            ("client_cursor_gaps", Json::U(client_gaps)),
            ("delivered_cursors_sent", Json::U(cursors_sent)),
            ("receipts", Json::U(receipts)),
            ("server_messages_persisted", Json::U(persisted)),
            (
                "server_errors",
                Json::Obj(
                    server_errors
                        .iter()
                        .map(|(k, v)| (k.clone(), Json::U(*v)))
                        .collect(),
                ),
            ),
            (
                "fatal",
                Json::Arr(fatal.iter().map(|f| Json::s(f.clone())).collect()),
            ),
            ("ok", Json::Bool(ok)),
        ]);
        report::write_json(path, &json)?;
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_roundtrip() {
        let mut p = vec![0u8; 100];
        stamp_payload(&mut p, 3, 12_345, 987_654_321);
        assert_eq!(read_payload(&p), Some((3, 12_345, 987_654_321)));
        assert_eq!(read_payload(&p[..PAYLOAD_HEADER_BYTES - 1]), None);
        p[0] ^= 1;
        assert_eq!(read_payload(&p), None);
    }
}
