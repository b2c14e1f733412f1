//! One reactor's shared-nothing state: its connections, its replica of the device directory,
//! the shards it owns, and its end of the mesh. Every task on the core holds an `Rc<Core>`;
//! nothing here is touched by another thread.
//!
//! Ownership rules (see ARCHITECTURE.md):
//! - a chat belongs to shard `splitmix64(chat) % shards`, a shard to core `shard % cores`;
//! - a connection belongs to the core that accepted it;
//! - every core keeps a full replica of "which devices of which user are connected where",
//!   updated by `Online`/`Offline` broadcasts, so the owner of a chat routes deliveries without
//!   asking anyone.

use crate::config::Config;
use crate::conn::ConnShared;
use crate::mesh::Mesh;
use crate::metrics::CoreMetrics;
use crate::msg::{ConnRef, CoreMsg, Frame, FrameKind};
use crate::owner::Effect;
use crate::presence::{self, PresenceHub, Subscription};
use crate::shard::Shard;
use crate::token::TokenKey;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use switchboard_wire::{splitmix64, ChatId, DeviceId, Encoder, ServerFrame, UserId};

/// Connected devices of every user, replicated on every core.
///
/// Replicas receive `Online`s from different cores in different orders, so "the newest
/// connection of a device" is decided by its epoch (connect time in µs, then `ConnRef`), never by
/// arrival order: every replica converges on the same winner.
#[derive(Default)]
pub struct Directory {
    /// Each device's current connection and its connect epoch (kept in the entry, not in a
    /// second map: every core holds one entry per connection of the whole server).
    users: HashMap<UserId, Devices>,
}

/// One connected device in a directory replica: 24 bytes (a `(DeviceId, ConnRef, u64)` tuple
/// took 32), and every core keeps one per connection of the whole server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub device: DeviceId,
    core: u32,
    conn: u64,
    /// Connect time, µs since the Unix epoch.
    pub epoch: u64,
}

impl DirEntry {
    fn new(device: DeviceId, conn: ConnRef, epoch: u64) -> DirEntry {
        DirEntry {
            device,
            // Core indexes are below the machine's CPU count.
            core: u32::try_from(conn.core).expect("core index fits in u32"),
            conn: conn.conn,
            epoch,
        }
    }

    pub fn conn(&self) -> ConnRef {
        ConnRef {
            core: self.core as usize,
            conn: self.conn,
        }
    }
}

/// A user's connected devices. Most users have one connected, kept inline: no allocation.
enum Devices {
    One(DirEntry),
    Many(Vec<DirEntry>),
}

impl Devices {
    fn as_slice(&self) -> &[DirEntry] {
        match self {
            Devices::One(e) => std::slice::from_ref(e),
            Devices::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [DirEntry] {
        match self {
            Devices::One(e) => std::slice::from_mut(e),
            Devices::Many(v) => v,
        }
    }

    fn push(&mut self, entry: DirEntry) {
        match self {
            Devices::One(first) => *self = Devices::Many(vec![*first, entry]),
            Devices::Many(v) => v.push(entry),
        }
    }

    /// Removes the entries `remove` selects; false when none is left.
    fn remove(&mut self, remove: impl Fn(&DirEntry) -> bool) -> bool {
        match self {
            Devices::One(e) => !remove(e),
            Devices::Many(v) => {
                v.retain(|e| !remove(e));
                match v.as_slice() {
                    [] => false,
                    [one] => {
                        *self = Devices::One(*one);
                        true
                    }
                    _ => true,
                }
            }
        }
    }
}

impl Directory {
    /// Records a connection. Returns the connection that lost to it (the older connection of
    /// the same user and device, which may be this very one if it is older than the current).
    pub fn online(
        &mut self,
        user: UserId,
        device: DeviceId,
        conn: ConnRef,
        epoch: u64,
    ) -> Option<ConnRef> {
        let new = DirEntry::new(device, conn, epoch);
        let devices = match self.users.entry(user) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Devices::One(new));
                return None;
            }
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        };
        if let Some(entry) = devices
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.device == device)
        {
            let current = entry.conn();
            if (entry.epoch, current) > (epoch, conn) {
                return Some(conn);
            }
            *entry = new;
            return Some(current);
        }
        devices.push(new);
        None
    }

    /// Forgets a connection, unless a newer connection of the same device replaced it.
    pub fn offline(&mut self, user: UserId, device: DeviceId, conn: ConnRef) {
        if let Some(devices) = self.users.get_mut(&user) {
            if !devices.remove(|e| e.device == device && e.conn() == conn) {
                self.users.remove(&user);
            }
        }
    }

    /// The user's connected devices.
    pub fn devices(&self, user: UserId) -> &[DirEntry] {
        self.users.get(&user).map(Devices::as_slice).unwrap_or(&[])
    }
}

pub struct Core {
    pub id: usize,
    pub cores: usize,
    pub shards_total: u32,
    pub cfg: Rc<Config>,
    pub key: TokenKey,
    pub all_metrics: Arc<Vec<CoreMetrics>>,
    pub mesh: Mesh,
    pub conns: RefCell<HashMap<u64, Rc<ConnShared>>>,
    next_conn: Cell<u64>,
    /// Origin of the connections' clock (`conn_clock_ms`).
    clock_origin: std::time::Instant,
    pub directory: RefCell<Directory>,
    pub shards: HashMap<u32, Rc<Shard>>,
    encoder: RefCell<Encoder>,
    /// Scratch buffer every connection on this core reads its socket into (see `conn.rs`).
    pub read_scratch: RefCell<Vec<u8>>,
    /// Presence subscriptions of the users homed on this core.
    pub presence: RefCell<PresenceHub>,
    /// Every block in force, (blocker, blocked), replicated on every core like the directory:
    /// group typing notices skip members who blocked the typer.
    pub blocks: RefCell<HashSet<(UserId, UserId)>>,
    /// The push thread (`push_hook.rs`), set once at start-up; unset in tests without push.
    pub push: std::cell::OnceCell<switchboard_push::PushHandle>,
    /// The HTTP API's per-core state (router, origin policy).
    pub api: crate::api_http::ApiState,
    /// Media stores and URL signers (`media_svc.rs`).
    pub media: crate::media_svc::MediaService,
    /// Replica of every shard's token revocations: (user, device) → tokens expiring at or before
    /// this are refused. Fed by `CoreMsg::Revoked` broadcasts; bounded by the shards'
    /// `REVOCATIONS_PER_SHARD_MAX` (entries are pruned once their tokens have expired).
    pub revocations: RefCell<HashMap<(UserId, DeviceId), u64>>,
    /// How many cores have sent all their recovered revocations (`RevocationsLoaded`); the core
    /// accepts connections only when all have.
    pub revocations_loaded: Cell<usize>,
    pub revocations_ready: crate::notify::Notify,
    /// Messages per user (config `messages_per_user_*`), on this core.
    pub msg_limiter: RefCell<switchboard_api::ratelimit::KeyedLimiter<UserId>>,
    /// The TLS server config when `tls_cert`/`tls_key` are set (shared, read-only; loaded once
    /// at start-up). Connections whose first byte is 0x16 speak TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Connection attempts per source address (config `connects_per_addr_*`), on this core.
    pub connect_limiter: RefCell<switchboard_api::ratelimit::KeyedLimiter<std::net::IpAddr>>,
    /// Every shard's pressure (`shard.rs`, shared by all cores).
    pub shard_pressure: Arc<crate::shard::ShardPressure>,
    /// This core's connections not being read because they sent to a shard under pressure,
    /// per shard (index = shard id); each connection is in at most one list
    /// (`ConnShared::throttle`), so together they hold at most this core's connections.
    throttled: RefCell<Vec<Vec<Rc<ConnShared>>>>,
}

impl Core {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        cores: usize,
        shards_total: u32,
        cfg: Rc<Config>,
        key: TokenKey,
        all_metrics: Arc<Vec<CoreMetrics>>,
        shards: HashMap<u32, Rc<Shard>>,
        shard_pressure: Arc<crate::shard::ShardPressure>,
    ) -> Core {
        let mesh = Mesh::new(
            id,
            cores,
            cfg.mesh_outbox_items_max,
            cfg.mesh_batch_items_max,
        );
        let api = crate::api_http::ApiState::new(&cfg);
        use switchboard_api::ratelimit::{KeyedLimiter, LIMITER_KEYS_MAX};
        let msg_limiter = KeyedLimiter::new(
            Config::rate(
                cfg.messages_per_user_burst,
                cfg.messages_per_user_refill_per_s,
            ),
            LIMITER_KEYS_MAX,
        );
        let connect_limiter = KeyedLimiter::new(
            Config::rate(
                cfg.connects_per_addr_burst,
                cfg.connects_per_addr_refill_per_s,
            ),
            LIMITER_KEYS_MAX,
        );
        let media = crate::media_svc::MediaService::new(&cfg, &key);
        Core {
            id,
            cores,
            shards_total,
            cfg,
            key,
            all_metrics,
            mesh,
            conns: RefCell::new(HashMap::new()),
            next_conn: Cell::new(1),
            clock_origin: std::time::Instant::now(),
            directory: RefCell::new(Directory::default()),
            shards,
            encoder: RefCell::new(Encoder::new()),
            read_scratch: RefCell::new(vec![0u8; 64 * 1024]),
            presence: RefCell::new(PresenceHub::default()),
            blocks: RefCell::new(HashSet::new()),
            push: std::cell::OnceCell::new(),
            api,
            media,
            revocations: RefCell::new(HashMap::new()),
            revocations_loaded: Cell::new(0),
            revocations_ready: crate::notify::Notify::new(),
            tls: None,
            msg_limiter: RefCell::new(msg_limiter),
            connect_limiter: RefCell::new(connect_limiter),
            shard_pressure,
            throttled: RefCell::new(vec![Vec::new(); shards_total as usize]),
        }
    }

    /// After `conn` sent work to `shard`: if the shard is under pressure (and
    /// `shard_pressure_throttle` is on), the connection is not read again until it is off.
    pub fn throttle_if_pressed(&self, conn: &Rc<ConnShared>, shard: u32) {
        if !self.cfg.shard_pressure_throttle || !self.shard_pressure.is_on(shard) {
            return;
        }
        if conn.throttle() {
            self.metrics().conn_throttles.fetch_add(1, Relaxed);
            self.throttled.borrow_mut()[shard as usize].push(conn.clone());
        }
    }

    pub fn metrics(&self) -> &CoreMetrics {
        &self.all_metrics[self.id]
    }

    /// `now` as milliseconds since this core started, wrapping at 2^32 (49.7 days): the clock of
    /// the connections' receive and ping times, 4 bytes each per connection. Compare readings
    /// with `wrapping_sub` only; gaps stay below `CONN_TIMEOUT_MAX` (7 days) because the sweep
    /// closes a connection that long silent.
    pub fn conn_clock_ms(&self, now: std::time::Instant) -> u32 {
        // Truncation on purpose: the clock wraps.
        now.saturating_duration_since(self.clock_origin).as_millis() as u32
    }

    pub fn next_conn_id(&self) -> u64 {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        id
    }

    pub fn shard_of(&self, chat: ChatId) -> u32 {
        (splitmix64(chat.0) % self.shards_total as u64) as u32
    }

    pub fn core_of_chat(&self, chat: ChatId) -> usize {
        self.shard_of(chat) as usize % self.cores
    }

    /// Encodes a server frame once into shareable bytes.
    pub fn encode(&self, frame: &ServerFrame) -> Frame {
        Arc::from(self.encoder.borrow_mut().encode_server(frame))
    }

    /// Delivers `msg` to core `dest`: handled inline when that is this core.
    pub async fn route(self: &Rc<Self>, dest: usize, msg: CoreMsg) {
        if dest == self.id {
            self.handle(msg);
        } else {
            self.metrics().mesh_items_sent.fetch_add(1, Relaxed);
            self.mesh.send(dest, msg).await;
            self.metrics().mesh_outbox_depth[dest]
                .store(self.mesh.outbox_depth(dest) as u64, Relaxed);
        }
    }

    /// Sends `msg` to every core, this one included (handled first, inline).
    pub async fn broadcast(self: &Rc<Self>, make: impl Fn() -> CoreMsg) {
        self.handle(make());
        for dest in (0..self.cores).filter(|d| *d != self.id) {
            self.route(dest, make()).await;
        }
    }

    pub async fn to_conn(self: &Rc<Self>, conn: ConnRef, frame: Frame, kind: FrameKind) {
        self.route(
            conn.core,
            CoreMsg::ToConn {
                conn: conn.conn,
                frame,
                kind,
            },
        )
        .await;
    }

    /// Handles one message from this or another core. Never waits: anything that needs I/O or
    /// the mesh is staged for the shard's committer or spawned as its own task. This is what keeps
    /// the mesh free of wait cycles.
    pub fn handle(self: &Rc<Self>, msg: CoreMsg) {
        match msg {
            CoreMsg::Api { from, req } => crate::accounts_svc::handle_api(self, from, req),
            CoreMsg::ApiReply { id, reply } => self.api.calls.complete(id, reply),
            CoreMsg::Revoked {
                user,
                device,
                through_s,
                removed,
            } => {
                let mut revs = self.revocations.borrow_mut();
                let now_s = unix_ms() / 1000;
                if revs.len()
                    >= crate::accounts::REVOCATIONS_PER_SHARD_MAX * self.shards_total as usize
                {
                    revs.retain(|_, t| *t > now_s);
                }
                let e = revs.entry((user, device)).or_insert(0);
                *e = (*e).max(through_s);
                drop(revs);
                if removed {
                    for c in self.conns.borrow().values() {
                        if c.user == user && c.device == device {
                            c.close(&(crate::ws::close::REVOKED, "device logged out or removed"));
                        }
                    }
                }
            }
            CoreMsg::PressureOff { shard } => {
                let waiting = std::mem::take(&mut self.throttled.borrow_mut()[shard as usize]);
                for c in waiting {
                    c.unthrottle();
                }
            }
            CoreMsg::RevocationsLoaded => {
                self.revocations_loaded
                    .set(self.revocations_loaded.get() + 1);
                self.revocations_ready.notify();
            }
            CoreMsg::Send {
                origin,
                chat,
                peer,
                req,
            } => {
                let shard = self.owned_shard(chat);
                shard
                    .owner
                    .borrow_mut()
                    .on_send(unix_ms(), origin, chat, peer, req);
                shard.staged();
            }
            CoreMsg::Cursor {
                origin,
                chat,
                kind,
                up_to,
            } => {
                let shard = self.owned_shard(chat);
                shard
                    .owner
                    .borrow_mut()
                    .on_cursor(origin, chat, kind, up_to);
                shard.staged();
            }
            CoreMsg::Sync {
                origin,
                request_id,
                cursors,
            } => {
                for shard in self.shards.values() {
                    let task =
                        shard
                            .clone()
                            .serve_sync(self.clone(), origin, request_id, cursors.clone());
                    glommio::spawn_local(task).detach();
                }
            }
            CoreMsg::History {
                origin,
                request_id,
                chat,
                before,
                limit,
            } => {
                let shard = self.owned_shard(chat);
                glommio::spawn_local(shard.serve_history(
                    self.clone(),
                    origin,
                    request_id,
                    chat,
                    before,
                    limit,
                ))
                .detach();
            }
            CoreMsg::CreateGroup { origin, chat, req } => {
                let shard = self.owned_shard(chat);
                shard
                    .owner
                    .borrow_mut()
                    .on_create_group(unix_ms(), origin, chat, req);
                shard.staged();
            }
            CoreMsg::GroupUpdate { origin, req } => {
                let shard = self.owned_shard(req.chat);
                shard
                    .owner
                    .borrow_mut()
                    .on_group_update(unix_ms(), origin, req);
                shard.staged();
            }
            CoreMsg::GroupInfo {
                origin,
                request_id,
                chat,
            } => {
                let shard = self.owned_shard(chat);
                shard
                    .owner
                    .borrow_mut()
                    .on_group_info(origin, request_id, chat);
                shard.staged();
            }
            CoreMsg::Typing {
                origin,
                chat,
                typing,
            } => {
                let shard = self.owned_shard(chat);
                let blocks = self.blocks.borrow();
                let blocked_by = |u: UserId| blocks.contains(&(u, origin.user));
                shard
                    .owner
                    .borrow_mut()
                    .on_typing(unix_ms(), origin, chat, typing, &blocked_by);
                shard.staged();
            }
            CoreMsg::GetReceipts {
                origin,
                request_id,
                chat,
                seq,
            } => {
                let shard = self.owned_shard(chat);
                shard
                    .owner
                    .borrow_mut()
                    .on_get_receipts(origin, request_id, chat, seq);
                shard.staged();
            }
            CoreMsg::Action {
                origin,
                chat,
                action,
            } => {
                // Needs the target message from the store first: its own task.
                let shard = self.owned_shard(chat);
                glommio::spawn_local(shard.serve_action(self.clone(), origin, chat, action))
                    .detach();
            }
            CoreMsg::Online {
                user,
                device,
                conn,
                epoch,
            } => {
                let replaced = self
                    .directory
                    .borrow_mut()
                    .online(user, device, conn, epoch);
                if let Some(push) = self.push.get() {
                    crate::push_hook::on_online(self, push, user, conn);
                }
                if self.home_core(user) == self.id
                    && self.directory.borrow().devices(user).len() == 1
                {
                    self.presence_changed(user);
                }
                // The loser (older connection of the device) closes, wherever it is local.
                if let Some(old) = replaced.filter(|c| c.core == self.id) {
                    if let Some(c) = self.conns.borrow().get(&old.conn) {
                        c.close(&(
                            crate::ws::close::REPLACED,
                            "replaced by a newer connection of this device",
                        ));
                    }
                }
            }
            CoreMsg::Offline { user, device, conn } => {
                self.directory.borrow_mut().offline(user, device, conn);
                self.presence.borrow_mut().drop_conn(conn);
                if self.home_core(user) == self.id
                    && self.directory.borrow().devices(user).is_empty()
                {
                    // The last device left: that is the user's last-seen time (durable).
                    let shard = self.home_shard(user);
                    let (_, seen_vis, online_vis) = shard.owner.borrow().state.user_presence(user);
                    shard.owner.borrow_mut().stage_user_meta(
                        user,
                        unix_ms(),
                        seen_vis,
                        online_vis,
                        Vec::new(),
                    );
                    shard.staged();
                    self.presence_changed(user);
                }
            }
            CoreMsg::Block {
                origin,
                request_id,
                chat,
                peer,
                blocked,
            } => {
                let shard = self.owned_shard(chat);
                shard.owner.borrow_mut().on_block(
                    unix_ms(),
                    origin,
                    request_id,
                    chat,
                    peer,
                    blocked,
                );
                shard.staged();
                let core = self.clone();
                let blocker = origin.user;
                glommio::spawn_local(async move {
                    core.broadcast(|| CoreMsg::BlockState {
                        blocker,
                        blocked: peer,
                        on: blocked,
                    })
                    .await
                })
                .detach();
            }
            CoreMsg::BlockState {
                blocker,
                blocked,
                on,
            } => {
                let mut blocks = self.blocks.borrow_mut();
                if on {
                    blocks.insert((blocker, blocked));
                } else {
                    blocks.remove(&(blocker, blocked));
                }
            }
            CoreMsg::PresenceCheck { origin, target } => {
                let chat = ChatId::direct(origin.user, target);
                let (contact, blocked) =
                    match self.owned_shard(chat).owner.borrow().state.chat(&chat) {
                        Some(m) => (true, !m.blocked_by.is_empty()),
                        None => (false, false),
                    };
                let core = self.clone();
                let home = self.home_core(target);
                let msg = CoreMsg::PresenceSub {
                    origin,
                    target,
                    contact,
                    blocked,
                };
                glommio::spawn_local(async move { core.route(home, msg).await }).detach();
            }
            CoreMsg::PresenceSub {
                origin,
                target,
                contact,
                blocked,
            } => {
                let sub = Subscription {
                    conn: origin.conn,
                    viewer: origin.user,
                    contact,
                    blocked,
                };
                self.presence.borrow_mut().subscribe(target, sub);
                self.send_presence(target, &[sub]);
            }
            CoreMsg::PresenceUnsub { conn, target } => {
                self.presence.borrow_mut().unsubscribe(target, conn)
            }
            CoreMsg::SetPrivacy {
                origin,
                request_id,
                last_seen,
                online,
            } => {
                let shard = self.home_shard(origin.user);
                let (seen_ms, _, _) = shard.owner.borrow().state.user_presence(origin.user);
                let done = Effect::Reply {
                    to: origin.conn,
                    frame: ServerFrame::Done { request_id },
                    completes_send: false,
                };
                shard.owner.borrow_mut().stage_user_meta(
                    origin.user,
                    seen_ms,
                    last_seen,
                    online,
                    vec![done],
                );
                shard.staged();
                self.presence_changed(origin.user);
            }
            CoreMsg::Deliver {
                frame,
                chat,
                seq,
                conns,
            } => {
                let local = self.conns.borrow();
                for id in conns {
                    if let Some(c) = local.get(&id) {
                        c.push(self, frame.clone(), FrameKind::Live { chat, seq });
                    }
                }
            }
            CoreMsg::Broadcast { frame, conns } => {
                let local = self.conns.borrow();
                for id in conns {
                    if let Some(c) = local.get(&id) {
                        c.push(
                            self,
                            frame.clone(),
                            FrameKind::Reply {
                                completes_send: false,
                            },
                        );
                    }
                }
            }
            CoreMsg::ToConn { conn, frame, kind } => {
                if let Some(c) = self.conns.borrow().get(&conn) {
                    c.push(self, frame, kind);
                }
            }
            CoreMsg::SyncPart {
                conn,
                request_id,
                more,
            } => {
                if let Some(c) = self.conns.borrow().get(&conn) {
                    c.sync_part(self, request_id, more);
                }
            }
        }
    }

    /// The shard holding `user`'s presence state (last seen, privacy).
    fn home_shard_id(&self, user: UserId) -> u32 {
        (splitmix64(user.0 ^ 0x7072_6573_656e_6365) % self.shards_total as u64) as u32
    }

    pub fn home_core(&self, user: UserId) -> usize {
        self.home_shard_id(user) as usize % self.cores
    }

    fn home_shard(&self, user: UserId) -> Rc<Shard> {
        let id = self.home_shard_id(user);
        self.shards
            .get(&id)
            .unwrap_or_else(|| panic!("core {} is not home of shard {id}", self.id))
            .clone()
    }

    /// `user`'s presence changed (connected, disconnected, privacy): tell subscribers now, or at
    /// the end of the coalescing interval.
    fn presence_changed(self: &Rc<Self>, user: UserId) {
        if self.presence.borrow_mut().changed(user, unix_ms()) {
            let subs = self.presence.borrow().subscribers(user).to_vec();
            self.send_presence(user, &subs);
        }
    }

    /// Sends each subscriber its view of `user`'s presence. Only on `user`'s home core.
    fn send_presence(self: &Rc<Self>, user: UserId, subs: &[Subscription]) {
        if subs.is_empty() {
            return;
        }
        let online = !self.directory.borrow().devices(user).is_empty();
        let (seen_ms, seen_vis, online_vis) = self
            .home_shard(user)
            .owner
            .borrow()
            .state
            .user_presence(user);
        let mut out = Vec::with_capacity(subs.len());
        for sub in subs {
            let view = presence::view(user, online, seen_ms, seen_vis, online_vis, sub);
            out.push((sub.conn, self.encode(&ServerFrame::Presence(view))));
        }
        let core = self.clone();
        glommio::spawn_local(async move {
            for (conn, frame) in out {
                core.to_conn(
                    conn,
                    frame,
                    FrameKind::Reply {
                        completes_send: false,
                    },
                )
                .await;
            }
        })
        .detach();
    }

    /// Sends the coalesced presence updates that are due. Run by a ticker on every core.
    pub fn flush_presence(self: &Rc<Self>) {
        let due = self.presence.borrow_mut().due(unix_ms());
        for user in due {
            let subs = self.presence.borrow().subscribers(user).to_vec();
            self.send_presence(user, &subs);
        }
    }

    /// Whether a token is revoked (this core's replica).
    pub fn is_revoked(&self, claims: &crate::token::Claims) -> bool {
        self.revocations
            .borrow()
            .get(&(claims.user, claims.device))
            .is_some_and(|through| claims.expires_unix_s <= *through)
    }

    /// Shard `id`, which this core must own (the caller routed by the same arithmetic).
    pub fn owned_shard_id(&self, id: u32) -> Rc<Shard> {
        self.shards
            .get(&id)
            .unwrap_or_else(|| panic!("core {} does not own shard {id}", self.id))
            .clone()
    }

    fn owned_shard(&self, chat: ChatId) -> Rc<Shard> {
        let shard = self.shard_of(chat);
        // A broken routing invariant, not bad input: the sender computed the owner the same way.
        self.shards
            .get(&shard)
            .unwrap_or_else(|| panic!("core {} got chat of shard {shard} it does not own", self.id))
            .clone()
    }

    /// Runs a committed batch's effects in order: encode each frame once, group the recipients of
    /// a fan-out by core, and send one `Deliver` per core.
    pub async fn run_effects(self: &Rc<Self>, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Reply {
                    to,
                    frame,
                    completes_send,
                } => {
                    if let ServerFrame::Error(e) = &frame {
                        self.metrics().error(e.code);
                    }
                    let bytes = self.encode(&frame);
                    self.to_conn(to, bytes, FrameKind::Reply { completes_send })
                        .await;
                }
                Effect::Fanout { msg, members, skip } => {
                    if let Some(push) = self.push.get() {
                        crate::push_hook::on_fanout(self, push, &msg, &members);
                    }
                    let (chat, seq) = (msg.chat, msg.seq);
                    let targets = self.targets(&members, Some(skip));
                    if targets.is_empty() {
                        continue;
                    }
                    let frame = self.encode(&ServerFrame::Message(msg));
                    for (core, conns) in targets {
                        self.metrics()
                            .deliveries
                            .fetch_add(conns.len() as u64, Relaxed);
                        self.route(
                            core,
                            CoreMsg::Deliver {
                                frame: frame.clone(),
                                chat,
                                seq,
                                conns,
                            },
                        )
                        .await;
                    }
                }
                // Run by the shard's committer before the other effects.
                Effect::Purge { .. } => unreachable!("purges are run by the shard"),
                Effect::ApiReply { to, reply } => {
                    if to.core == self.id {
                        self.api.calls.complete(to.id, reply);
                    } else {
                        self.route(to.core, CoreMsg::ApiReply { id: to.id, reply })
                            .await;
                    }
                }
                Effect::PrekeysLow {
                    user,
                    device,
                    remaining,
                } => {
                    let conns: Vec<ConnRef> = self
                        .directory
                        .borrow()
                        .devices(user)
                        .iter()
                        .filter(|e| e.device == device)
                        .map(DirEntry::conn)
                        .collect();
                    if conns.is_empty() {
                        continue;
                    }
                    let frame = self.encode(&ServerFrame::PrekeysLow { device, remaining });
                    for conn in conns {
                        let kind = FrameKind::Reply {
                            completes_send: false,
                        };
                        self.to_conn(conn, frame.clone(), kind).await;
                    }
                }
                Effect::Revoke {
                    user,
                    device,
                    through_s,
                    removed,
                } => {
                    self.broadcast(|| CoreMsg::Revoked {
                        user,
                        device,
                        through_s,
                        removed,
                    })
                    .await
                }
                Effect::Broadcast {
                    frame,
                    to_users,
                    skip,
                } => {
                    if let (Some(push), ServerFrame::Receipt(r)) = (self.push.get(), &frame) {
                        crate::push_hook::on_receipt(self, push, r);
                    }
                    let targets = self.targets(&to_users, skip);
                    if targets.is_empty() {
                        continue;
                    }
                    let frame = self.encode(&frame);
                    for (core, conns) in targets {
                        self.route(
                            core,
                            CoreMsg::Broadcast {
                                frame: frame.clone(),
                                conns,
                            },
                        )
                        .await;
                    }
                }
            }
        }
    }

    /// Online connections of `users`, grouped by core.
    fn targets(&self, users: &[UserId], skip: Option<ConnRef>) -> Vec<(usize, Vec<u64>)> {
        fanout_targets(&self.directory.borrow(), users, skip)
    }
}

/// The fan-out plan of one message: the online connections of `users` (except `skip`), grouped
/// by core, so each core gets one `Deliver` carrying the encoded frame once. Cores are few, so a
/// linear scan of the groups beats hashing.
pub fn fanout_targets(
    dir: &Directory,
    users: &[UserId],
    skip: Option<ConnRef>,
) -> Vec<(usize, Vec<u64>)> {
    let mut by_core: Vec<(usize, Vec<u64>)> = Vec::new();
    for user in users {
        for entry in dir.devices(*user) {
            let conn = entry.conn();
            if Some(conn) == skip {
                continue;
            }
            match by_core.iter_mut().find(|(c, _)| *c == conn.core) {
                Some((_, v)) => v.push(conn.conn),
                None => by_core.push((conn.core, vec![conn.conn])),
            }
        }
    }
    by_core
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_replaces_and_forgets() {
        let mut d = Directory::default();
        let (u, dev) = (UserId(1), DeviceId(1));
        let c1 = ConnRef { core: 0, conn: 1 };
        let c2 = ConnRef { core: 1, conn: 7 };
        assert_eq!(d.online(u, dev, c1, 10), None);
        assert_eq!(d.online(u, DeviceId(2), c2, 11), None);
        assert_eq!(d.devices(u).len(), 2);
        assert_eq!(d.online(u, dev, c2, 12), Some(c1));
        // An older connection arriving late loses, whatever the arrival order.
        let c0 = ConnRef { core: 3, conn: 9 };
        assert_eq!(d.online(u, dev, c0, 5), Some(c0));
        let has = |d: &Directory, c: ConnRef| {
            d.devices(u)
                .iter()
                .any(|e| (e.device, e.conn()) == (dev, c))
        };
        assert!(has(&d, c2));
        // The replaced connection's late Offline must not remove the new one.
        d.offline(u, dev, c1);
        assert!(has(&d, c2));
        d.offline(u, dev, c2);
        // Back to one device: stored inline again.
        assert!(matches!(d.users[&u], Devices::One(e) if e.device == DeviceId(2)));
        d.offline(u, DeviceId(2), c2);
        assert!(d.devices(u).is_empty());
        assert!(d.users.is_empty());
        // The map's value: one entry inline or a Vec, no larger.
        assert_eq!(std::mem::size_of::<Devices>(), 32);
    }
}
