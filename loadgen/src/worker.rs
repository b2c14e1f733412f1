//! A worker process: one thread, one epoll event loop, up to ~15K client connections, all
//! non-blocking; the WebSocket framing is done by hand on per-connection byte buffers.
//!
//! ```text
//!  stdin: spec ─► connect phase (ramp: non-blocking connect ─► upgrade ─► 101) ─► "connected"
//!  stdin: go ─► run: Arrivals ─► due sends ─► Send frames into conn.tx ─► flush dirty conns
//!               epoll ─► read ─► frames ─► SendAck / Message / Receipt / Error ─► Checker, histograms
//!                                          Message ─► Delivered cursor back (receipt flow)
//!          each second: "tick" (counts + interval histograms) ─► stdout
//!  after warm-up + duration: drain until nothing is outstanding ─► "result" ─► Close all ─► exit
//! ```
//!
//! Latencies are taken from the *scheduled* time of each send (`sched::Arrivals`), not from the
//! moment this loop got round to writing it, so a slow server (or a slow client) shows up in
//! the numbers instead of silently lowering the offered load.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::time::Duration;

use hdrhistogram::Histogram;
use switchboard_wire::limits::SERVER_FRAME_BYTES_MAX;
use switchboard_wire::{
    decode_server, ChatId, ClientFrame, ClientMsgId, ContentKind, CreateGroupReq, Encoder,
    ReceiptKind, SendReq, Seq, ServerFrame, Target, UserId,
};

use crate::check::{Checker, Push};
use crate::mqtt;
use crate::poll::{Epoll, Ready};
use crate::proto::{key, Record, WorkerSpec, PROTOCOL_VERSION};
use crate::report::latency_histogram;
use crate::scenario::{parse_target, source_ip};
use crate::sched::{Arrivals, Rng, RunEnd};
use crate::simple::{read_payload, stamp_payload};
use crate::sys::{self, now_ns};
use crate::token::Minter;
use crate::ws_raw::{
    self, check_upgrade_response, parse_frame_limit, sec_websocket_key, upgrade_request,
    write_client_frame, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_PING, OPCODE_PONG,
};

/// Descriptors besides the sockets: stdio, epoll, /proc reads, slack.
pub const FDS_RESERVED: u64 = 64;

/// Connects (TCP + upgrade) in progress at once: a listen backlog is a few thousand per core,
/// and a burst beyond it turns into SYN retries (1 s, 3 s…) that measure the kernel, not the
/// server.
pub const HANDSHAKES_INFLIGHT_MAX: usize = 512;

/// Bytes queued to one connection that the socket has not taken. A full queue means the server
/// stopped reading this connection; further sends on it are counted as `client_tx_full`
/// errors instead of growing memory without bound.
pub const CONN_TX_BYTES_MAX: usize = 4 << 20;

/// Bytes of an incomplete upgrade response kept per connection.
const UPGRADE_HEAD_BYTES_MAX: usize = ws_raw::RESPONSE_HEAD_BYTES_MAX;

/// Messages a worker expects to send at `rate` over `send_for` (+5 % for Poisson arrivals),
/// capped at `CHECKER_RESERVE_MAX`: the checker's record vector is reserved for them up front, so
/// it never doubles mid-run (copying and faulting in tens of MB stalls the send loop and shows
/// as a latency spike in the report).
fn expected_sends(rate: f64, send_for: Duration) -> usize {
    let n = rate * send_for.as_secs_f64() * 1.05;
    (n.max(0.0) as usize).min(CHECKER_RESERVE_MAX)
}

/// Most message records a worker reserves up front (32 B each: 256 MB).
const CHECKER_RESERVE_MAX: usize = 8 << 20;

/// Socket read buffer shared by every connection of the worker.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Reads per readiness event before moving on to other connections (the rest of the input is
/// read on the next loop turn): one busy connection cannot starve the others.
const READS_PER_EVENT_MAX: usize = 16;

/// Sends scheduled per loop turn at most; a late worker catches up over several turns while
/// still reading acks (their latency is measured from the schedule either way).
const SENDS_PER_TURN_MAX: usize = 4096;

/// How long a worker waits for `go` after reporting `connected`.
const GO_WAIT_MAX: Duration = Duration::from_secs(600);

/// Time allowed for Close handshakes at the end.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

const SEC_NS: u64 = 1_000_000_000;

/// Marks a message's destination (in `Ctx::dests`) as a group index instead of a peer user.
const GROUP_FLAG: u32 = 1 << 31;

/// The bit that tells a group's `client_msg_id` (CreateGroup) from a message's.
const GROUP_ID_BIT: u64 = 1 << 62;

/// How long the group set-up may take (creates are answered after an fsync each batch).
const GROUP_SETUP_MAX: Duration = Duration::from_secs(60);

/// A group of this worker: consecutive users; `members[0]` created it.
struct Group {
    members: Vec<u32>,
    /// Zero until the server answered `CreateGroup`.
    chat: ChatId,
}

/// Phases, as numbers in `tick` records.
pub mod phase {
    pub const CONNECT: u64 = 0;
    pub const WAIT: u64 = 1;
    pub const WARMUP: u64 = 2;
    pub const MEASURE: u64 = 3;
    pub const DRAIN: u64 = 4;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    NotStarted,
    Connecting,
    Upgrading,
    Open,
    /// This side sent Close; waiting for the server's Close / EOF.
    Closing,
    Dead,
}

struct Conn {
    stream: Option<TcpStream>,
    state: State,
    /// Scheduled connect time (ns, worker clock).
    sched_ns: u64,
    rx: Vec<u8>,
    tx: Vec<u8>,
    tx_pos: usize,
    dirty: bool,
    /// (chat, highest seq) pushed in the current read pass: one `Delivered` each afterwards.
    to_confirm: Vec<(ChatId, u64)>,
}

impl Conn {
    fn new(sched_ns: u64) -> Conn {
        Conn {
            stream: None,
            state: State::NotStarted,
            sched_ns,
            rx: Vec::new(),
            tx: Vec::new(),
            tx_pos: 0,
            dirty: false,
            to_confirm: Vec::new(),
        }
    }
}

/// Counters and histograms of one second.
struct Sec {
    sends: u64,
    acks: u64,
    deliveries: u64,
    receipts: u64,
    errors: u64,
    e2e: Histogram<u64>,
    ack: Histogram<u64>,
}

impl Sec {
    fn new() -> Sec {
        Sec {
            sends: 0,
            acks: 0,
            deliveries: 0,
            receipts: 0,
            errors: 0,
            e2e: latency_histogram(),
            ack: latency_histogram(),
        }
    }
}

/// Everything but the connections, so frame handlers can borrow a connection and this at once.
struct Ctx {
    spec: WorkerSpec,
    devices: u64,
    first_user: u64,
    checker: Checker,
    /// Destination of each message, by message id: the peer (local user index) of a 1:1
    /// message, or `GROUP_FLAG | group index`.
    dests: Vec<u32>,
    groups: Vec<Group>,
    groups_created: u64,
    /// The target is an MQTT broker (the comparison), not Switchboard.
    mqtt: bool,
    /// MQTT: next packet id per connection, and (connection, packet id) → message id of each
    /// PUBLISH not yet acknowledged.
    mqtt_next_pid: Vec<u16>,
    mqtt_inflight: HashMap<(u32, u16), u64>,
    encoder: Encoder,
    rng: Rng,
    /// Start of the measured window and end of sending (ns, worker clock); 0 before `go`.
    measure_from: u64,
    send_until: u64,
    e2e: Histogram<u64>,
    ack: Histogram<u64>,
    receipt: Histogram<u64>,
    connect: Histogram<u64>,
    send_lag: Histogram<u64>,
    /// Per read in the measured window: the newest bytes' kernel arrival → this read
    /// (`sys::recv_stamped`), how late the client itself read (a lower bound).
    read_lag: Histogram<u64>,
    sec: Sec,
    /// Acks / deliveries that arrived inside the measured window, and sends scheduled in it.
    acks_window: u64,
    deliveries_window: u64,
    sends_window: u64,
    errors: BTreeMap<String, u64>,
    connect_errors: BTreeMap<String, u64>,
    established: u64,
    dropped: u64,
}

fn us(ns: u64) -> u64 {
    ns / 1000
}

impl Ctx {
    fn error(&mut self, kind: &str) {
        *self.errors.entry(key(kind)).or_default() += 1;
        self.sec.errors += 1;
    }

    fn in_window(&self, now: u64) -> bool {
        self.measure_from != 0 && now >= self.measure_from && now < self.send_until
    }

    fn user_of_conn(&self, conn: u32) -> u64 {
        u64::from(conn) / self.devices
    }

    fn user_id(&self, local: u64) -> UserId {
        UserId(self.first_user + local)
    }

    /// One decoded server frame for connection `ci`.
    fn on_frame(&mut self, ci: u32, conn: &mut Conn, frame: ServerFrame, now: u64) {
        match frame {
            ServerFrame::SendAck(ack) => {
                let (hi, id) = ack.client_msg_id.halves();
                if hi != self.spec.run_id {
                    self.error("unknown_ack");
                    return;
                }
                let Some(rec) = self.checker.get(id) else {
                    self.error("unknown_ack");
                    return;
                };
                let sender = self.user_of_conn(rec.sender_conn);
                let dest = self.dests[id as usize];
                // The receipt a sender waits for: the peer's in a 1:1 chat, the aggregated one
                // (user 0: "every member") in a group.
                let (chat, reader) = if dest & GROUP_FLAG != 0 {
                    let g = &self.groups[(dest & !GROUP_FLAG) as usize];
                    (g.chat, UserId(0))
                } else {
                    let peer = self.user_id(u64::from(dest));
                    (ChatId::direct(self.user_id(sender), peer), peer)
                };
                if ack.chat != chat {
                    self.error("ack_wrong_chat");
                }
                let out = self.checker.on_ack(id, ack.chat, ack.seq.0, reader, now);
                if out.duplicate || out.unknown {
                    return;
                }
                self.sec.acks += 1;
                if self.in_window(now) {
                    self.acks_window += 1;
                }
                if let Some(ns) = out.ack_ns {
                    // Per-second histograms include the warm-up (the timeline shows it).
                    self.sec.ack.saturating_record(us(ns));
                    if out.measured {
                        self.ack.saturating_record(us(ns));
                    }
                }
                if let (Some(ns), true) = (out.receipt_ns, out.measured) {
                    self.receipt.saturating_record(us(ns));
                }
            }
            ServerFrame::Message(m) if m.content_kind == ContentKind::Event => {
                // Made by the server (GroupCreated, …): holds a seq, carries no payload id.
                self.checker.on_event(ci, m.chat, m.seq.0);
                if self.spec.scenario.receipts {
                    match conn.to_confirm.iter_mut().find(|(c, _)| *c == m.chat) {
                        Some(e) => e.1 = e.1.max(m.seq.0),
                        None => conn.to_confirm.push((m.chat, m.seq.0)),
                    }
                }
            }
            ServerFrame::Message(m) => {
                let id = read_payload(&m.payload)
                    .filter(|&(w, _, _)| w == self.spec.share.index)
                    .map(|(_, id, _)| id);
                match self.checker.on_push(ci, m.chat, m.seq.0, id, now) {
                    Push::New { e2e_ns, measured } => {
                        self.sec.deliveries += 1;
                        if self.in_window(now) {
                            self.deliveries_window += 1;
                        }
                        self.sec.e2e.saturating_record(us(e2e_ns));
                        if measured {
                            self.e2e.saturating_record(us(e2e_ns));
                        }
                    }
                    Push::Duplicate | Push::Foreign => {}
                }
                if self.spec.scenario.receipts {
                    match conn.to_confirm.iter_mut().find(|(c, _)| *c == m.chat) {
                        Some(e) => e.1 = e.1.max(m.seq.0),
                        None => conn.to_confirm.push((m.chat, m.seq.0)),
                    }
                }
            }
            ServerFrame::Receipt(r) if r.kind == ReceiptKind::Delivered => {
                self.sec.receipts += 1;
                let hist = &mut self.receipt;
                self.checker.on_receipt(r.chat, r.user, r.to.0, now, |ns| {
                    hist.saturating_record(us(ns))
                });
            }
            ServerFrame::Error(e) => {
                self.error(&format!("server_{:?}", e.code));
                if let Some(id) = e.client_msg_id {
                    let (hi, lo) = id.halves();
                    if hi == self.spec.run_id {
                        self.checker.on_error(lo);
                    }
                }
            }
            ServerFrame::GroupInfo(info) => {
                let k = info.request_id.wrapping_sub(1) as usize;
                let Some(g) = self.groups.get_mut(k) else {
                    self.error("unknown_group_info");
                    return;
                };
                if g.chat.0 == 0 {
                    g.chat = info.chat;
                    self.groups_created += 1;
                    // Every member device holds the creation events: no hole below them, whether
                    // or not the event is also pushed to it.
                    let members = g.members.clone();
                    for u in members {
                        for d in 0..self.devices {
                            let c = (u64::from(u) * self.devices + d) as u32;
                            for seq in 1..=info.last_seq.0 {
                                self.checker.on_event(c, info.chat, seq);
                            }
                        }
                    }
                }
            }
            // Pong, SyncDone, HistoryPage, TypingNotice, ReceiptList, presence, and frames added
            // to the protocol later: nothing this load asks for.
            _ => {}
        }
    }

    /// MQTT: handles the complete packets at the start of `buf`; returns the bytes used.
    fn on_mqtt_bytes(
        &mut self,
        ci: u32,
        conn: &mut Conn,
        buf: &[u8],
        now: u64,
    ) -> Result<usize, String> {
        let mut used = 0;
        while let Some(p) = mqtt::parse_packet(&buf[used..]).map_err(|e| format!("mqtt: {e}"))? {
            let body = &buf[used + p.body.start..used + p.body.end];
            match p.kind {
                mqtt::PUBLISH => {
                    let publ =
                        mqtt::parse_publish(p.flags, body).map_err(|e| format!("mqtt: {e}"))?;
                    let id = read_payload(&body[publ.payload])
                        .filter(|&(w, _, _)| w == self.spec.share.index)
                        .map(|(_, id, _)| id);
                    if let Push::New { e2e_ns, measured } =
                        self.checker.on_push_unsequenced(ci, id, now)
                    {
                        self.sec.deliveries += 1;
                        if self.in_window(now) {
                            self.deliveries_window += 1;
                        }
                        self.sec.e2e.saturating_record(us(e2e_ns));
                        if measured {
                            self.e2e.saturating_record(us(e2e_ns));
                        }
                    }
                    if let Some(pid) = publ.packet_id {
                        mqtt::write_puback(&mut conn.tx, pid);
                    }
                }
                mqtt::PUBACK if body.len() >= 2 => {
                    let pid = u16::from_be_bytes([body[0], body[1]]);
                    match self.mqtt_inflight.remove(&(ci, pid)) {
                        Some(id) => {
                            let out = self.checker.on_ack(id, ChatId(0), 0, UserId(0), now);
                            if !out.duplicate && !out.unknown {
                                self.sec.acks += 1;
                                if self.in_window(now) {
                                    self.acks_window += 1;
                                }
                                if let Some(ns) = out.ack_ns {
                                    self.sec.ack.saturating_record(us(ns));
                                    if out.measured {
                                        self.ack.saturating_record(us(ns));
                                    }
                                }
                            }
                        }
                        None => self.error("unknown_ack"),
                    }
                }
                mqtt::PINGRESP | mqtt::SUBACK | mqtt::CONNACK => {}
                other => return Err(format!("mqtt: unexpected packet type {other}")),
            }
            used += p.len;
        }
        Ok(used)
    }

    /// Parses and handles the complete frames at the start of `buf`; returns the bytes used.
    fn on_bytes(
        &mut self,
        ci: u32,
        conn: &mut Conn,
        buf: &[u8],
        now: u64,
    ) -> Result<usize, String> {
        if self.mqtt {
            return self.on_mqtt_bytes(ci, conn, buf, now);
        }
        let mut used = 0;
        while let Some(f) = parse_frame_limit(&buf[used..], SERVER_FRAME_BYTES_MAX)
            .map_err(|e| format!("framing: {e}"))?
        {
            let payload = &buf[used + f.payload.start..used + f.payload.end];
            match f.opcode {
                OPCODE_BINARY => match decode_server(payload) {
                    Ok(frame) => self.on_frame(ci, conn, frame, now),
                    Err(e) => self.error(&format!("decode_{e:?}")),
                },
                OPCODE_PING => {
                    if payload.len() > 125 {
                        return Err("ping over 125 bytes".into());
                    }
                    let mask = self.mask();
                    write_client_frame(&mut conn.tx, OPCODE_PONG, payload, mask);
                }
                OPCODE_PONG => {}
                OPCODE_CLOSE => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    if conn.state != State::Closing {
                        self.error(&format!("server_close_{code}"));
                        let mask = self.mask();
                        write_client_frame(&mut conn.tx, OPCODE_CLOSE, &code.to_be_bytes(), mask);
                        conn.state = State::Closing;
                    }
                    return Ok(buf.len());
                }
                other => {
                    return Err(format!(
                        "unexpected opcode {other:#x} (fragmented or text frame)"
                    ))
                }
            }
            used += f.len;
        }
        Ok(used)
    }

    fn mask(&mut self) -> [u8; 4] {
        // Any 4 bytes make a mask; truncation intended.
        (self.rng.next_u64() as u32).to_le_bytes()
    }
}

struct Worker {
    ctx: Ctx,
    conns: Vec<Conn>,
    epoll: Epoll,
    ready: Vec<Ready>,
    scratch: Vec<u8>,
    dirty: Vec<u32>,
    /// Connections with input left after `READS_PER_EVENT_MAX` reads.
    again: Vec<u32>,
    target: SocketAddr,
    /// Mints Switchboard tokens; `None` for an MQTT target.
    minter: Option<Minter>,
    token_expiry: u64,
    send_req: ClientFrame,
    payload: Vec<u8>,
    handshakes: usize,
    next_connect: usize,
}

fn write_line(line: &str) {
    let mut out = io::stdout().lock();
    // The coordinator going away ends this worker through stdin EOF; nothing to do here.
    let _ = out.write_all(line.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

impl Worker {
    /// Starts due connects, at most `HANDSHAKES_INFLIGHT_MAX` at once.
    fn start_connects(&mut self, now: u64) {
        while self.next_connect < self.conns.len()
            && self.handshakes < HANDSHAKES_INFLIGHT_MAX
            && self.conns[self.next_connect].sched_ns <= now
        {
            let i = self.next_connect;
            self.next_connect += 1;
            let share = &self.ctx.spec.share;
            let ip = source_ip(self.target, share.ip_first + (i as u32 % share.ips.max(1)));
            match ws_raw::connect_nonblocking(self.target, ip) {
                Ok(stream) => {
                    if let Err(e) = self.epoll.add(stream.as_raw_fd(), i as u64) {
                        self.connect_failed(i, &format!("epoll: {:?}", e.kind()));
                        continue;
                    }
                    let c = &mut self.conns[i];
                    c.stream = Some(stream);
                    c.state = State::Connecting;
                    self.handshakes += 1;
                }
                Err(e) => self.connect_failed(i, &format!("connect: {:?}", e.kind())),
            }
        }
    }

    fn connect_failed(&mut self, i: usize, kind: &str) {
        let c = &mut self.conns[i];
        if matches!(c.state, State::Connecting | State::Upgrading) {
            self.handshakes -= 1;
        }
        c.state = State::Dead;
        c.stream = None;
        c.rx = Vec::new();
        c.tx = Vec::new();
        *self.ctx.connect_errors.entry(key(kind)).or_default() += 1;
    }

    fn conn_died(&mut self, i: usize, kind: &str) {
        let c = &mut self.conns[i];
        let was = c.state;
        c.state = State::Dead;
        c.stream = None;
        c.rx = Vec::new();
        c.tx = Vec::new();
        c.tx_pos = 0;
        if was == State::Open {
            self.ctx.dropped += 1;
            self.ctx.error(&format!("drop_{kind}"));
        }
    }

    fn on_ready(&mut self, r: Ready, now: u64) {
        let i = r.token as usize;
        match self.conns[i].state {
            State::Connecting if r.writable || r.error => {
                let err = self.conns[i].stream.as_ref().map(TcpStream::take_error);
                match err {
                    Some(Ok(None)) if self.ctx.mqtt => {
                        let user = self.ctx.first_user + self.ctx.user_of_conn(i as u32);
                        let device = i as u64 % self.ctx.devices + 1;
                        let c = &mut self.conns[i];
                        mqtt::write_connect(&mut c.tx, &format!("sb-{user}-{device}"));
                        mqtt::write_subscribe_qos1(&mut c.tx, 1, &mqtt::topic(user));
                        c.state = State::Upgrading;
                        self.flush(i);
                    }
                    Some(Ok(None)) => {
                        let user = self.ctx.first_user + self.ctx.user_of_conn(i as u32);
                        let device = (i as u64 % self.ctx.devices) as u32 + 1;
                        let Some(minter) = &self.minter else {
                            return self.connect_failed(i, "no token secret");
                        };
                        let token = minter.mint(user, device, self.token_expiry);
                        let key = sec_websocket_key(user ^ (u64::from(device) << 56));
                        let req = upgrade_request(&self.target.to_string(), &key, &token);
                        let c = &mut self.conns[i];
                        c.tx.extend_from_slice(req.as_bytes());
                        c.state = State::Upgrading;
                        self.flush(i);
                    }
                    Some(Ok(Some(e))) | Some(Err(e)) => {
                        self.connect_failed(i, &format!("connect: {:?}", e.kind()))
                    }
                    None => {}
                }
            }
            State::Upgrading if r.readable || r.error => self.read_upgrade(i, now),
            State::Open | State::Closing => {
                if r.readable || r.error {
                    self.read_open(i, now, r.error || r.peer_closed);
                }
                if r.writable && self.conns[i].state != State::Dead {
                    self.flush(i);
                }
            }
            State::Upgrading if r.writable => self.flush(i),
            _ => {}
        }
    }

    /// MQTT: CONNACK (accepted) then SUBACK (QoS 1 granted) make the connection open.
    fn read_mqtt_handshake(&mut self, i: usize, now: u64) {
        let mut buf = [0u8; 256];
        loop {
            let Some(mut stream) = self.conns[i].stream.as_ref() else {
                return;
            };
            match stream.read(&mut buf) {
                Ok(0) => return self.connect_failed(i, "mqtt: eof"),
                Ok(n) => {
                    let c = &mut self.conns[i];
                    c.rx.extend_from_slice(&buf[..n]);
                    loop {
                        let p = match mqtt::parse_packet(&c.rx) {
                            Ok(Some(p)) => p,
                            Ok(None) => break,
                            Err(e) => return self.connect_failed(i, &format!("mqtt: {e}")),
                        };
                        let body = c.rx[p.body.clone()].to_vec();
                        c.rx.drain(..p.len);
                        match p.kind {
                            mqtt::CONNACK if body.len() == 2 && body[1] == 0 => {}
                            mqtt::CONNACK => {
                                let rc = body.get(1).copied().unwrap_or(255);
                                return self.connect_failed(i, &format!("mqtt: connack {rc}"));
                            }
                            mqtt::SUBACK if body.len() == 3 && body[2] <= 2 => {
                                c.state = State::Open;
                                self.handshakes -= 1;
                                self.ctx.established += 1;
                                self.ctx
                                    .connect
                                    .saturating_record(us(now.saturating_sub(c.sched_ns)));
                                if !c.rx.is_empty() {
                                    self.read_open(i, now, true);
                                }
                                return;
                            }
                            mqtt::SUBACK => {
                                return self.connect_failed(i, "mqtt: subscribe refused")
                            }
                            other => {
                                return self.connect_failed(
                                    i,
                                    &format!("mqtt: packet {other} before SUBACK"),
                                )
                            }
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.connect_failed(i, &format!("mqtt: {:?}", e.kind())),
            }
        }
    }

    fn read_upgrade(&mut self, i: usize, now: u64) {
        if self.ctx.mqtt {
            return self.read_mqtt_handshake(i, now);
        }
        let mut buf = [0u8; 1024];
        loop {
            let Some(mut stream) = self.conns[i].stream.as_ref() else {
                return;
            };
            match stream.read(&mut buf) {
                Ok(0) => return self.connect_failed(i, "upgrade: eof"),
                Ok(n) => {
                    let c = &mut self.conns[i];
                    c.rx.extend_from_slice(&buf[..n]);
                    if let Some(at) = c.rx.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head_end = at + 4;
                        let user = self.ctx.first_user + self.ctx.user_of_conn(i as u32);
                        let device = (i as u64 % self.ctx.devices) as u32 + 1;
                        let key = sec_websocket_key(user ^ (u64::from(device) << 56));
                        if let Err(e) = check_upgrade_response(&c.rx[..head_end], &key) {
                            return self.connect_failed(i, &format!("upgrade: {}", e.kind()));
                        }
                        c.rx.drain(..head_end);
                        c.state = State::Open;
                        self.handshakes -= 1;
                        self.ctx.established += 1;
                        self.ctx
                            .connect
                            .saturating_record(us(now.saturating_sub(c.sched_ns)));
                        if !c.rx.is_empty() {
                            self.read_open(i, now, true);
                        }
                        return;
                    }
                    if c.rx.len() > UPGRADE_HEAD_BYTES_MAX {
                        return self.connect_failed(i, "upgrade: head too long");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.connect_failed(i, &format!("upgrade: {:?}", e.kind())),
            }
        }
    }

    /// Reads and handles what the socket has. `to_end`: keep reading until `EAGAIN` or end of
    /// stream even after a short read (after a hang-up event, or when not woken by an edge).
    fn read_open(&mut self, i: usize, now: u64, to_end: bool) {
        let ci = i as u32;
        // Bytes already buffered (a split frame or what followed the upgrade head).
        if !self.conns[i].rx.is_empty() {
            let conn = &mut self.conns[i];
            let rx = std::mem::take(&mut conn.rx);
            match self.ctx.on_bytes(ci, conn, &rx, now) {
                Ok(used) => conn.rx = rx[used..].to_vec(),
                Err(e) => return self.protocol_error(i, &e),
            }
        }
        let mut reads = 0;
        loop {
            if reads == READS_PER_EVENT_MAX {
                self.again.push(ci);
                break;
            }
            reads += 1;
            let Some(stream) = self.conns[i].stream.as_ref() else {
                return;
            };
            match sys::recv_stamped(stream.as_raw_fd(), &mut self.scratch) {
                Ok((0, _)) => {
                    let kind = if self.conns[i].state == State::Closing {
                        "closed"
                    } else {
                        "eof"
                    };
                    self.send_confirms(i);
                    return self.conn_died(i, kind);
                }
                Ok((n, stamp)) => {
                    if let (Some(at), true) = (stamp, self.ctx.in_window(now)) {
                        let lag = sys::unix_now_ns().saturating_sub(at);
                        self.ctx.read_lag.saturating_record(us(lag));
                    }
                    let conn = &mut self.conns[i];
                    let result = if conn.rx.is_empty() {
                        self.ctx
                            .on_bytes(ci, conn, &self.scratch[..n], now)
                            .map(|used| conn.rx.extend_from_slice(&self.scratch[used..n]))
                    } else {
                        conn.rx.extend_from_slice(&self.scratch[..n]);
                        let rx = std::mem::take(&mut conn.rx);
                        self.ctx.on_bytes(ci, conn, &rx, now).map(|used| {
                            conn.rx = rx[used..].to_vec();
                        })
                    };
                    if let Err(e) = result {
                        return self.protocol_error(i, &e);
                    }
                    // A short read drained the socket: the next bytes to arrive raise a new
                    // edge, so the extra `recv` that would only return `EAGAIN` is skipped (it was
                    // ~3 wasted syscalls per message on the machine this shares with the server).
                    if !to_end && n < self.scratch.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let kind = format!("io_{:?}", e.kind());
                    return self.conn_died(i, &kind);
                }
            }
        }
        self.send_confirms(i);
        self.mark_dirty(i);
    }

    /// The receipt flow: one `Delivered` per chat that got messages in this read pass.
    fn send_confirms(&mut self, i: usize) {
        let conn = &mut self.conns[i];
        if conn.to_confirm.is_empty() || conn.state != State::Open {
            conn.to_confirm.clear();
            return;
        }
        for (chat, seq) in std::mem::take(&mut conn.to_confirm) {
            let frame = ClientFrame::Delivered {
                chat,
                up_to: Seq(seq),
            };
            let mask = self.ctx.mask();
            let bytes = self.ctx.encoder.encode_client(&frame);
            write_client_frame(&mut conn.tx, OPCODE_BINARY, bytes, mask);
        }
    }

    fn protocol_error(&mut self, i: usize, e: &str) {
        self.ctx.error(&format!("protocol: {e}"));
        self.conn_died(i, "protocol");
    }

    fn mark_dirty(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if !c.dirty && c.tx.len() > c.tx_pos {
            c.dirty = true;
            self.dirty.push(i as u32);
        }
    }

    /// Writes what the connection has queued until done or `WouldBlock`.
    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(mut stream) = c.stream.as_ref() else {
            return;
        };
        while c.tx_pos < c.tx.len() {
            match stream.write(&c.tx[c.tx_pos..]) {
                Ok(n) => c.tx_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let kind = format!("io_{:?}", e.kind());
                    if matches!(c.state, State::Connecting | State::Upgrading) {
                        return self.connect_failed(i, &format!("upgrade: {kind}"));
                    }
                    return self.conn_died(i, &kind);
                }
            }
        }
        c.tx.clear();
        c.tx_pos = 0;
        if c.tx.capacity() > SCRATCH_BYTES {
            c.tx = Vec::new();
        }
    }

    fn flush_dirty(&mut self) {
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.conns[i as usize].dirty = false;
            self.flush(i as usize);
        }
        self.dirty = dirty;
        self.dirty.clear();
    }

    /// Schedules one message at `sched` (ns): picks 1:1 or group, sender, device, peer or group
    /// and size, writes it.
    fn send_one(&mut self, sched: u64, now: u64) {
        let ctx = &mut self.ctx;
        let users = ctx.spec.share.users;
        let group_pct = ctx.spec.scenario.group_pct;
        let to_group =
            !ctx.groups.is_empty() && (ctx.rng.below(1_000_000) as f64) < group_pct * 10_000.0;
        let (u, dest, target, expected) = if to_group {
            let k = ctx.rng.below(ctx.groups.len() as u64) as usize;
            let g = &ctx.groups[k];
            let u = u64::from(g.members[ctx.rng.below(g.members.len() as u64) as usize]);
            // Every device of every member but the sending one.
            let expected = g.members.len() as u64 * ctx.devices - 1;
            (u, GROUP_FLAG | k as u32, Target::Chat(g.chat), expected)
        } else {
            let u = ctx.rng.below(users);
            let contacts = u64::from(ctx.spec.scenario.contacts_per_user);
            let off = 1 + ctx.rng.below(contacts);
            let peer = if ctx.rng.next_u64() & 1 == 0 {
                (u + off) % users
            } else {
                (u + users - off % users) % users
            };
            // Every device of the peer, and the sender's other devices (MQTT: only the peer's
            // devices subscribe to its topic).
            let expected = if ctx.mqtt {
                ctx.devices
            } else {
                2 * ctx.devices - 1
            };
            (
                u,
                peer as u32,
                Target::Peer(UserId(ctx.first_user + peer)),
                expected,
            )
        };
        let d = ctx.rng.below(ctx.devices);
        let ci = (u * ctx.devices + d) as usize;
        let size = ctx.spec.scenario.payload_bytes.pick(ctx.rng.next_u64()) as usize;
        let measured = sched >= ctx.measure_from;
        let expected = u16::try_from(expected).expect("group size × devices fits (1024 × 8)");
        let id = ctx.checker.on_send(sched, ci as u32, expected, measured);
        ctx.dests.push(dest);
        ctx.sec.sends += 1;
        if measured {
            ctx.sends_window += 1;
            ctx.send_lag
                .saturating_record(us(now.saturating_sub(sched)));
        }
        let conn = &mut self.conns[ci];
        if conn.state != State::Open {
            ctx.checker.on_unsent(id);
            ctx.error("send_conn_down");
            return;
        }
        if conn.tx.len() - conn.tx_pos > CONN_TX_BYTES_MAX {
            ctx.checker.on_unsent(id);
            ctx.error("client_tx_full");
            return;
        }
        self.payload.resize(size, 0x5a);
        stamp_payload(&mut self.payload, ctx.spec.share.index, id, sched);
        if ctx.mqtt {
            let Target::Peer(peer) = target else {
                unreachable!("check_target_support refuses groups for MQTT")
            };
            let pid = &mut ctx.mqtt_next_pid[ci];
            *pid = pid.wrapping_add(1).max(1);
            let pid = *pid;
            if ctx.mqtt_inflight.insert((ci as u32, pid), id).is_some() {
                ctx.error("mqtt_packet_ids_exhausted");
            }
            mqtt::write_publish_qos1(&mut conn.tx, &mqtt::topic(peer.0), pid, &self.payload);
            self.mark_dirty(ci);
            return;
        }
        if let ClientFrame::Send(req) = &mut self.send_req {
            req.client_msg_id = ClientMsgId::from_halves(ctx.spec.run_id, id);
            req.target = target;
            req.payload.clear();
            req.payload.extend_from_slice(&self.payload);
        }
        let mask = ctx.mask();
        let bytes = ctx.encoder.encode_client(&self.send_req);
        write_client_frame(&mut conn.tx, OPCODE_BINARY, bytes, mask);
        self.mark_dirty(ci);
    }

    /// One loop turn: wait for readiness until `deadline_ns` at most, handle it, flush.
    fn turn(&mut self, deadline_ns: u64) -> Result<(), String> {
        let now = now_ns();
        let wait = if self.again.is_empty() {
            Duration::from_nanos(deadline_ns.saturating_sub(now))
        } else {
            Duration::ZERO
        };
        let mut ready = std::mem::take(&mut self.ready);
        self.epoll
            .wait(wait, &mut ready)
            .map_err(|e| format!("epoll_wait: {e}"))?;
        // The clock is read per event, not once per turn: a delivery handled late in a turn of
        // many events is charged the time it waited behind the others.
        for r in &ready {
            self.on_ready(*r, now_ns());
        }
        self.ready = ready;
        let again = std::mem::take(&mut self.again);
        for ci in again {
            if matches!(self.conns[ci as usize].state, State::Open | State::Closing) {
                self.read_open(ci as usize, now_ns(), true);
            }
        }
        self.flush_dirty();
        Ok(())
    }

    /// Fails connects and upgrades that took longer than `connect_timeout`.
    fn expire_handshakes(&mut self, now: u64) {
        let timeout = self.ctx.spec.scenario.connect_timeout.as_nanos() as u64;
        for i in 0..self.next_connect {
            let c = &self.conns[i];
            if matches!(c.state, State::Connecting | State::Upgrading)
                && now.saturating_sub(c.sched_ns) > timeout
            {
                let what = if c.state == State::Connecting {
                    "connect: timeout"
                } else {
                    "upgrade: timeout"
                };
                self.connect_failed(i, what);
            }
        }
    }

    fn open_conns(&self) -> u64 {
        self.conns.iter().filter(|c| c.state == State::Open).count() as u64
    }

    fn tick(&mut self, phase: u64, sec: u64) {
        let s = std::mem::replace(&mut self.ctx.sec, Sec::new());
        let mut r = Record::new("tick");
        r.set("phase", phase);
        r.set("sec", sec);
        r.set("conns", self.open_conns());
        r.set("sends", s.sends);
        r.set("acks", s.acks);
        r.set("deliveries", s.deliveries);
        r.set("receipts", s.receipts);
        r.set("errors", s.errors);
        r.set(
            "connect_errors",
            self.ctx.connect_errors.values().sum::<u64>(),
        );
        r.hists.insert("e2e".into(), s.e2e);
        r.hists.insert("ack".into(), s.ack);
        write_line(&r.encode());
    }
}

/// Reads coordinator commands from stdin on a thread (lines into a channel; `eof` at the end).
fn stdin_lines(first: &mut String) -> Result<mpsc::Receiver<String>, String> {
    let stdin = io::stdin();
    let mut lock = stdin.lock();
    first.clear();
    lock.read_line(first)
        .map_err(|e| format!("read spec from stdin: {e}"))?;
    drop(lock);
    // The coordinator sends at most two commands (`go`, `stop`): unbounded is bounded here.
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            for line in io::stdin().lock().lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
            let _ = tx.send("eof".into());
        })
        .map_err(|e| format!("spawn stdin reader: {e}"))?;
    Ok(rx)
}

/// The hidden `worker` subcommand. Every outcome is reported on stdout; the exit status is 0
/// unless the worker could not run at all.
pub fn main() -> Result<(), String> {
    let mut first = String::new();
    let cmds = stdin_lines(&mut first)?;
    write_line(&format!("hello v{PROTOCOL_VERSION}"));
    let result = run(&first, &cmds);
    if let Err(e) = &result {
        write_line(&format!("fail {}", e.replace('\n', " ")));
    }
    result
}

fn run(spec_line: &str, cmds: &mpsc::Receiver<String>) -> Result<(), String> {
    let spec = WorkerSpec::from_line(spec_line.trim())?;
    let kind = parse_target(&spec.scenario.target)?;
    let target = kind.addr();
    let minter = if kind.is_mqtt() {
        None
    } else {
        let secret = spec
            .scenario
            .secret_file
            .clone()
            .ok_or("spec without secret_file")?;
        Some(Minter::from_secret_file(&secret)?)
    };
    let n = spec.share.connections as usize;
    let limit = sys::raise_fd_limit().map_err(|e| format!("RLIMIT_NOFILE: {e}"))?;
    if n as u64 + FDS_RESERVED > limit {
        return Err(format!(
            "worker {}: {n} connections need {} descriptors but RLIMIT_NOFILE is {limit}: use more \
             workers (lower conns_per_worker_max)",
            spec.share.index,
            n as u64 + FDS_RESERVED
        ));
    }
    let sc = &spec.scenario;
    let start = now_ns();
    let gap_ns = if spec.share.connect_rate > 0.0 {
        1e9 / spec.share.connect_rate
    } else {
        0.0
    };
    let conns: Vec<Conn> = (0..n)
        .map(|i| Conn::new(start + (i as f64 * gap_ns) as u64))
        .collect();
    let seed = sc.seed ^ switchboard_wire::splitmix64(u64::from(spec.share.index) + 1);
    let run_seconds = (sc.warmup + sc.duration + sc.drain).as_secs() + 3600;
    let mut send_req = ClientFrame::Send(SendReq {
        client_msg_id: ClientMsgId::from_halves(spec.run_id, 0),
        target: Target::Peer(UserId(1)),
        payload: Vec::new(),
        reply_to: Seq(0),
        content_kind: ContentKind::Text,
        forwarded: false,
        media_ids: Vec::new(),
    });
    if let ClientFrame::Send(r) = &mut send_req {
        r.payload.reserve(sc.payload_bytes.max() as usize);
    }
    let mut w = Worker {
        ctx: Ctx {
            devices: u64::from(sc.devices_per_user),
            first_user: spec.first_user + spec.share.user_offset,
            checker: Checker::with_capacity(
                sc.receipts,
                expected_sends(spec.share.rate, sc.warmup + sc.duration),
            ),
            dests: Vec::new(),
            groups: plan_groups(sc, spec.share.users, seed),
            groups_created: 0,
            mqtt: kind.is_mqtt(),
            mqtt_next_pid: if kind.is_mqtt() {
                vec![0; n]
            } else {
                Vec::new()
            },
            mqtt_inflight: HashMap::new(),
            encoder: Encoder::new(),
            rng: Rng::new(seed),
            measure_from: 0,
            send_until: 0,
            e2e: latency_histogram(),
            ack: latency_histogram(),
            receipt: latency_histogram(),
            connect: latency_histogram(),
            send_lag: latency_histogram(),
            read_lag: latency_histogram(),
            sec: Sec::new(),
            acks_window: 0,
            deliveries_window: 0,
            sends_window: 0,
            errors: BTreeMap::new(),
            connect_errors: BTreeMap::new(),
            established: 0,
            dropped: 0,
            spec: spec.clone(),
        },
        conns,
        epoll: Epoll::new().map_err(|e| format!("epoll_create: {e}"))?,
        ready: Vec::new(),
        scratch: vec![0u8; SCRATCH_BYTES],
        dirty: Vec::new(),
        again: Vec::new(),
        target,
        minter,
        token_expiry: sys::unix_now_s() + run_seconds,
        send_req,
        payload: Vec::new(),
        handshakes: 0,
        next_connect: 0,
    };

    // ------------------------------------------------------------ connect
    let ramp_ns = (n as f64 * gap_ns) as u64;
    let connect_deadline = start + ramp_ns + 2 * sc.connect_timeout.as_nanos() as u64 + SEC_NS;
    let mut next_tick = start + SEC_NS;
    let mut sec = 0;
    loop {
        let now = now_ns();
        w.start_connects(now);
        let done = w.next_connect == n && w.handshakes == 0;
        if done || now >= connect_deadline {
            break;
        }
        if now >= next_tick {
            w.expire_handshakes(now);
            w.tick(phase::CONNECT, sec);
            sec += 1;
            next_tick += SEC_NS;
        }
        if let Ok(cmd) = cmds.try_recv() {
            if cmd == "stop" || cmd == "eof" {
                return Err("stopped by the coordinator during connect".into());
            }
        }
        let next_conn = w.conns.get(w.next_connect).map_or(u64::MAX, |c| c.sched_ns);
        let next_conn = if w.handshakes < HANDSHAKES_INFLIGHT_MAX {
            next_conn
        } else {
            u64::MAX
        };
        w.turn(next_tick.min(next_conn).min(connect_deadline))?;
    }
    let now = now_ns();
    w.expire_handshakes(u64::MAX);
    for i in w.next_connect..n {
        w.connect_failed(i, "connect: not started before the deadline");
    }
    let connect_ns = now - start;
    create_groups(&mut w, cmds)?;
    let now = now_ns();
    let mut rec = Record::new("connected");
    rec.set("established", w.ctx.established);
    rec.set("groups", w.ctx.groups.len() as u64);
    rec.set("groups_created", w.ctx.groups_created);
    rec.set("connect_ms", connect_ns / 1_000_000);
    for (k, v) in &w.ctx.connect_errors {
        rec.set(&format!("cerr.{k}"), *v);
    }
    rec.hists.insert("connect".into(), w.ctx.connect.clone());
    write_line(&rec.encode());

    // ------------------------------------------------------------ wait for go
    let wait_until = now + GO_WAIT_MAX.as_nanos() as u64;
    loop {
        match cmds.try_recv() {
            Ok(cmd) if cmd == "go" => break,
            Ok(cmd) if cmd == "stop" || cmd == "eof" => {
                close_all(&mut w);
                return Err("stopped by the coordinator before go".into());
            }
            Ok(other) => return Err(format!("unexpected command {other:?}")),
            Err(_) => {}
        }
        if now_ns() > wait_until {
            return Err("no go from the coordinator".into());
        }
        w.turn(now_ns() + 5_000_000)?;
    }

    // ------------------------------------------------------------ run
    let go = now_ns();
    let warm = sc.warmup.as_nanos() as u64;
    let dur = sc.duration.as_nanos() as u64;
    w.ctx.measure_from = go + warm;
    w.ctx.send_until = go + warm + dur;
    let mut run_end = RunEnd::new(w.ctx.send_until, sc.drain.as_nanos() as u64);
    let mut arrivals = Arrivals::new(spec.share.rate, sc.arrival, go, seed ^ 0x5eed);
    let mut next_tick = go + SEC_NS;
    let mut sec = 0u64;
    let drained_at;
    loop {
        let now = now_ns();
        let mut sent = 0;
        while sent < SENDS_PER_TURN_MAX
            && arrivals.peek() <= now
            && run_end.may_send(arrivals.peek(), now)
        {
            let t = arrivals.pop();
            w.send_one(t, now);
            sent += 1;
        }
        let now = now_ns();
        if now >= next_tick {
            let ph = if next_tick <= w.ctx.measure_from {
                phase::WARMUP
            } else if next_tick <= w.ctx.send_until {
                phase::MEASURE
            } else {
                phase::DRAIN
            };
            w.tick(ph, sec);
            sec += 1;
            next_tick += SEC_NS;
        }
        if run_end.after_sends(now, arrivals.peek()) == Some(true) {
            // Far behind schedule: the window's remaining arrivals are never sent.
            while arrivals.peek() < w.ctx.send_until {
                arrivals.pop();
                w.ctx.error("loadgen_behind");
            }
        }
        let (a, d, r) = w.ctx.checker.outstanding();
        if run_end.finished(now, a == 0 && d == 0 && r == 0) {
            drained_at = now;
            break;
        }
        if let Ok(cmd) = cmds.try_recv() {
            if cmd == "stop" || cmd == "eof" {
                close_all(&mut w);
                return Err("stopped by the coordinator".into());
            }
        }
        let next_send = if run_end.may_send(arrivals.peek(), now) {
            arrivals.peek()
        } else {
            u64::MAX
        };
        let deadline = next_send.min(next_tick).min(run_end.deadline());
        w.turn(deadline)?;
    }
    // The last partial second.
    w.tick(phase::DRAIN, sec);
    let end = drained_at;

    // ------------------------------------------------------------ result
    let v = w.ctx.checker.finish();
    let c = &v.counts;
    let mut r = Record::new("result");
    let set = |r: &mut Record, k: &str, v: u64| r.set(k, v);
    set(&mut r, "conns_target", n as u64);
    set(&mut r, "conns_established", w.ctx.established);
    set(&mut r, "conns_open_at_end", w.open_conns());
    set(&mut r, "conns_dropped", w.ctx.dropped);
    set(&mut r, "connect_ms", connect_ns / 1_000_000);
    set(&mut r, "groups", w.ctx.groups.len() as u64);
    set(&mut r, "groups_created", w.ctx.groups_created);
    set(&mut r, "sent", c.sent);
    set(&mut r, "unsent", c.unsent);
    set(&mut r, "acked", c.acked);
    set(&mut r, "errored", c.errored);
    set(&mut r, "deliveries", c.deliveries);
    set(&mut r, "duplicates", c.duplicates);
    set(&mut r, "order_violations", c.order_violations);
    set(&mut r, "foreign", c.foreign);
    set(&mut r, "duplicate_acks", c.duplicate_acks);
    set(&mut r, "unknown_acks", c.unknown_acks);
    set(&mut r, "receipts", c.receipts);
    set(&mut r, "receipted", c.receipted);
    set(&mut r, "lost", v.lost);
    set(&mut r, "gaps", v.gaps);
    set(&mut r, "unacked", v.unacked);
    set(&mut r, "delivered_unacked", v.delivered_unacked);
    set(&mut r, "receipts_missing", v.receipts_missing);
    set(&mut r, "anomalies", v.anomalies());
    set(&mut r, "sends_window", w.ctx.sends_window);
    set(&mut r, "acks_window", w.ctx.acks_window);
    set(&mut r, "deliveries_window", w.ctx.deliveries_window);
    set(&mut r, "measure_ns", dur);
    set(
        &mut r,
        "drain_ns",
        end.saturating_sub(run_end.sending_ended_at().unwrap_or(w.ctx.send_until)),
    );
    set(&mut r, "client_rss_bytes", sys::self_rss_bytes());
    set(&mut r, "messages_tracked", w.ctx.checker.len() as u64);
    for (k, val) in &w.ctx.errors {
        r.set(&format!("err.{k}"), *val);
    }
    for (k, val) in &w.ctx.connect_errors {
        r.set(&format!("cerr.{k}"), *val);
    }
    r.hists.insert("e2e".into(), w.ctx.e2e.clone());
    r.hists.insert("ack".into(), w.ctx.ack.clone());
    r.hists.insert("receipt".into(), w.ctx.receipt.clone());
    r.hists.insert("connect".into(), w.ctx.connect.clone());
    r.hists.insert("send_lag".into(), w.ctx.send_lag.clone());
    r.hists.insert("read_lag".into(), w.ctx.read_lag.clone());
    write_line(&r.encode());
    close_all(&mut w);
    Ok(())
}

/// The groups of a worker with `users` users: sizes from the distribution, consecutive users
/// starting at evenly spread offsets (so memberships overlap only when groups × size > users).
fn plan_groups(sc: &crate::scenario::Scenario, users: u64, seed: u64) -> Vec<Group> {
    let n = sc.groups_for(users);
    let mut rng = Rng::new(seed ^ 0x6703_5eed);
    (0..n)
        .map(|k| {
            let size = u64::from(sc.group_sizes.pick(rng.next_u64())).min(users);
            let start = k * users / n.max(1);
            Group {
                members: (0..size).map(|j| ((start + j) % users) as u32).collect(),
                chat: ChatId(0),
            }
        })
        .collect()
}

/// Creates every group (`CreateGroup` from the first member's first device) and waits for the
/// answers. A group the server refused stays without a chat; sends to it fail the run.
fn create_groups(w: &mut Worker, cmds: &mpsc::Receiver<String>) -> Result<(), String> {
    if w.ctx.groups.is_empty() {
        return Ok(());
    }
    for k in 0..w.ctx.groups.len() {
        let g = &w.ctx.groups[k];
        let creator = u64::from(g.members[0]);
        let ci = (creator * w.ctx.devices) as usize;
        if w.conns[ci].state != State::Open {
            w.ctx.error("group_creator_down");
            continue;
        }
        let frame = ClientFrame::CreateGroup(CreateGroupReq {
            request_id: k as u32 + 1,
            client_msg_id: ClientMsgId::from_halves(w.ctx.spec.run_id | GROUP_ID_BIT, k as u64),
            name: format!("loadgen {k}"),
            description: String::new(),
            avatar_media_id: String::new(),
            members: g.members[1..]
                .iter()
                .map(|&u| UserId(w.ctx.first_user + u64::from(u)))
                .collect(),
            admins_only: false,
        });
        let mask = w.ctx.mask();
        let bytes = w.ctx.encoder.encode_client(&frame);
        write_client_frame(&mut w.conns[ci].tx, OPCODE_BINARY, bytes, mask);
        w.mark_dirty(ci);
    }
    w.flush_dirty();
    let until = now_ns() + GROUP_SETUP_MAX.as_nanos() as u64;
    while w.ctx.groups_created < w.ctx.groups.len() as u64 {
        if now_ns() > until {
            w.ctx.error("group_create_timeout");
            break;
        }
        if let Ok(cmd) = cmds.try_recv() {
            if cmd == "stop" || cmd == "eof" {
                return Err("stopped by the coordinator during group set-up".into());
            }
        }
        w.turn(now_ns() + 10_000_000)?;
    }
    // Groups that were not created: drop them, so no message goes to chat 0.
    let before = w.ctx.groups.len();
    w.ctx.groups.retain(|g| g.chat.0 != 0);
    if w.ctx.groups.len() < before {
        let errors: Vec<String> = w
            .ctx
            .errors
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return Err(format!(
            "{} of {before} groups were not created ({})",
            before - w.ctx.groups.len(),
            errors.join(", ")
        ));
    }
    Ok(())
}

/// Sends Close(1000) on every open connection and waits (bounded) for the server to finish.
fn close_all(w: &mut Worker) {
    for i in 0..w.conns.len() {
        if w.conns[i].state == State::Open {
            let mask = w.ctx.mask();
            let c = &mut w.conns[i];
            if w.ctx.mqtt {
                mqtt::write_disconnect(&mut c.tx);
            } else {
                write_client_frame(&mut c.tx, OPCODE_CLOSE, &1000u16.to_be_bytes(), mask);
            }
            c.state = State::Closing;
            w.mark_dirty(i);
        }
    }
    w.flush_dirty();
    let until = now_ns() + CLOSE_WAIT.as_nanos() as u64;
    while now_ns() < until && w.conns.iter().any(|c| c.state == State::Closing) {
        if w.turn(now_ns() + 50_000_000).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod reserve_tests {
    use super::*;

    #[test]
    fn checker_reserve_covers_the_run_and_is_capped() {
        assert_eq!(expected_sends(1000.0, Duration::from_secs(10)), 10_500);
        assert_eq!(expected_sends(0.0, Duration::from_secs(10)), 0);
        assert_eq!(
            expected_sends(1e9, Duration::from_secs(3600)),
            CHECKER_RESERVE_MAX
        );
        let c = Checker::with_capacity(true, 10_500);
        assert_eq!(c.len(), 0);
    }
}
