//! One storage shard on its owning core: the owner's decisions (`owner.rs`), the embedded store,
//! and the committer task that turns staged work into group commits.
//!
//! ```text
//!  Core::handle ──stage──► Owner.pending ──committer: take_batch──► store.append (write + fdatasync)
//!                                                      └──► effects: acks, fan-out, receipts (only now)
//! ```

use crate::core::Core;
use crate::msg::Action;
use crate::msg::{CoreMsg, FrameKind, Origin};
use crate::notify::Notify;
use crate::owner::{message_frame, Batch, Effect, Owner, OwnerLimits, TargetInfo};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;
use switchboard_storage::CONTENT_KIND_DELETED;
use switchboard_storage::{EmbeddedStore, Record, ShardState, StorageError, StoreConfig};
use switchboard_wire::limits::HISTORY_PAGE_BYTES_MAX;
use switchboard_wire::{ChatId, ErrorCode, ErrorFrame, HistoryPage, MsgId, Seq, ServerFrame};

/// Messages read from the store per read while serving a sync.
const SYNC_READ_CHUNK_MESSAGES: usize = 64;

pub struct Shard {
    pub id: u32,
    pub owner: RefCell<Owner>,
    /// The accounts homed on this shard (`accounts.rs`), staged through `owner` like chats.
    pub accounts: RefCell<crate::accounts::Accounts>,
    pub store: EmbeddedStore,
    wake: Notify,
    /// Whether the shard is under pressure (`Owner::pressure`: too many records waiting for the
    /// committer), the flags every core reads it from, and the wake-up of the task that tells
    /// every core when it ends (`run_pressure_announcer`).
    pressure: Cell<bool>,
    pressure_flags: Arc<ShardPressure>,
    pressure_changed: Notify,
}

/// Every shard's pressure, one flag each (index = shard id), shared by all cores: written only by
/// the shard's own core (`Shard::update_pressure`), read by every core when a connection sends
/// to the shard (`Core::throttle_if_pressed`). A flag, not a message, so that the connections
/// see "on" at once: a message would reach even the owner's own connections only after they had
/// handled every frame of their current reads. "Off" also travels as `CoreMsg::PressureOff`,
/// which wakes the throttled connections.
pub struct ShardPressure(Vec<std::sync::atomic::AtomicBool>);

impl ShardPressure {
    pub fn new(shards_total: u32) -> ShardPressure {
        ShardPressure(
            (0..shards_total)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
        )
    }

    pub fn is_on(&self, shard: u32) -> bool {
        self.0[shard as usize].load(std::sync::atomic::Ordering::Acquire)
    }

    fn set(&self, shard: u32, on: bool) {
        self.0[shard as usize].store(on, std::sync::atomic::Ordering::Release);
    }
}

impl Shard {
    pub async fn open(
        data_dir: &Path,
        id: u32,
        shards_total: u32,
        cfg: &crate::config::Config,
        pressure_flags: Arc<ShardPressure>,
    ) -> Result<Shard, StorageError> {
        let dir = data_dir.join(format!("shard-{id}"));
        let store_cfg = StoreConfig {
            segment_bytes_max: cfg.segment_bytes_max,
            dedup_entries_max: cfg.dedup_entries_max,
            preallocate_segments: cfg.preallocate_segments,
            ..StoreConfig::default()
        };
        let (store, records) = EmbeddedStore::open(&dir, store_cfg).await?;
        let highest = records
            .iter()
            .filter_map(|r| match r {
                Record::Message(m) => Some(m.msg_id),
                _ => None,
            })
            .max()
            .unwrap_or(MsgId(0));
        let state = ShardState::recover(cfg.dedup_entries_max, records.iter());
        let mut accounts =
            crate::accounts::Accounts::new(id, shards_total, cfg.devices_per_user_max);
        for r in &records {
            accounts.apply(r);
        }
        accounts.prune_revocations(crate::core::unix_ms() / 1000);
        // Finish purges a crash interrupted: deleted messages (and their edits) whose content is
        // still on disk. The Deleted event was durable before the purge started.
        let mut purge_targets: HashSet<(ChatId, Seq)> = HashSet::new();
        for (chat, seq) in state.deleted() {
            purge_targets.insert((chat, seq));
            purge_targets.extend(state.edits_of(chat, seq).iter().map(|s| (chat, *s)));
        }
        let mut unpurged: HashMap<ChatId, Vec<Seq>> = HashMap::new();
        for r in &records {
            if let Record::Message(m) = r {
                if m.content_kind != CONTENT_KIND_DELETED
                    && purge_targets.contains(&(m.chat, m.seq))
                {
                    unpurged.entry(m.chat).or_default().push(m.seq);
                }
            }
        }
        drop(records);
        for (chat, seqs) in unpurged {
            store.purge(chat, &seqs).await?;
        }
        let limits = OwnerLimits {
            pending_records_max: cfg.shard_pending_records_max,
            group_members_max: cfg.group_members_max,
            typing_group_members_max: cfg.typing_group_members_max,
            typing_throttle_ms: cfg.typing_throttle_ms,
            edit_window_ms: cfg.edit_window_secs.saturating_mul(1000),
            delete_window_ms: cfg.delete_window_secs.saturating_mul(1000),
        };
        let owner = Owner::new(id, state, highest, limits);
        Ok(Shard {
            id,
            owner: RefCell::new(owner),
            accounts: RefCell::new(accounts),
            store,
            wake: Notify::new(),
            pressure: Cell::new(false),
            pressure_flags,
            pressure_changed: Notify::new(),
        })
    }

    /// Wakes the committer after staging.
    pub fn staged(&self) {
        self.wake.notify();
        self.update_pressure();
    }

    /// Re-evaluates the shard's pressure after staging or taking a batch; a change wakes the
    /// announcer.
    fn update_pressure(&self) {
        let was = self.pressure.get();
        let now = self.owner.borrow().pressure(was);
        if now != was {
            self.pressure.set(now);
            self.pressure_flags.set(self.id, now);
            self.pressure_changed.notify();
        }
    }

    /// Tells every core (`CoreMsg::PressureOff`) when the shard's pressure has ended, so they
    /// wake the connections they throttled for it. The flag went off before the broadcast, so a
    /// core that handles the broadcast and then reads the flag sees it off (or on again, for a
    /// new episode whose own "off" comes later). Changes that come while a broadcast waits for
    /// the mesh are folded into the next round. Runs for the life of the core.
    pub async fn run_pressure_announcer(self: Rc<Self>, core: Rc<Core>) {
        let mut announced = false;
        loop {
            while self.pressure.get() == announced {
                self.pressure_changed.notified().await;
            }
            announced = self.pressure.get();
            if announced {
                core.metrics().shard_pressure_episodes.fetch_add(1, Relaxed);
            } else {
                let shard = self.id;
                core.broadcast(|| CoreMsg::PressureOff { shard }).await;
            }
        }
    }

    /// Puts the store's index size into this core's metrics (`/metrics` reads them from any core).
    fn publish_index_memory(&self, core: &Core) {
        let mem = self.store.index_memory();
        let m = core.metrics();
        m.store_index_messages.store(mem.messages, Relaxed);
        m.store_index_bytes.store(mem.bytes, Relaxed);
    }

    /// The group-commit loop. Runs for the life of the core. A failed write or fsync is fatal:
    /// after a failed fdatasync the kernel may have dropped the dirty pages, so the only safe
    /// continuation is to crash and let recovery read what is really on disk. Nothing was
    /// acknowledged for the failed batch.
    pub async fn run_committer(self: Rc<Self>, core: Rc<Core>) {
        let cfg = core.cfg.clone();
        self.publish_index_memory(&core);
        loop {
            // Records already waiting as the previous commit finished: the shard is under
            // sustained load, so waiting `commit_delay_us` gathers more records per fsync (on a
            // VM every fsync costs device exits). A shard that was idle commits at once: a lone
            // message never pays the delay.
            let mut sustained = true;
            while !self.owner.borrow().has_pending() {
                sustained = false;
                self.wake.notified().await;
            }
            if sustained && cfg.commit_delay_us > 0 {
                glommio::timer::sleep(Duration::from_micros(cfg.commit_delay_us)).await;
            }
            let batch: Batch = self
                .owner
                .borrow_mut()
                .take_batch(cfg.commit_batch_records_max);
            self.update_pressure();
            // The batch's wait runs from the staging of its oldest item.
            let staged_at = batch.staged_at;
            if !batch.records.is_empty() {
                let stats = match self.store.append(&batch.records).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("FATAL: shard {}: group commit failed: {e}; exiting so recovery can run", self.id);
                        std::process::abort();
                    }
                };
                let m = core.metrics();
                m.fsync_us
                    .observe(&crate::metrics::FSYNC_BUCKETS_US, stats.sync_us);
                m.commit_batch_records
                    .observe(&crate::metrics::BATCH_BUCKETS, batch.records.len() as u64);
                m.records_persisted
                    .fetch_add(batch.records.len() as u64, Relaxed);
                let msgs = batch
                    .records
                    .iter()
                    .filter(|r| matches!(r, Record::Message(_)))
                    .count();
                m.messages_persisted.fetch_add(msgs as u64, Relaxed);
                self.publish_index_memory(&core);
                self.owner.borrow_mut().committed(&batch);
            }
            let (purges, effects): (Vec<_>, Vec<_>) = batch
                .effects
                .into_iter()
                .partition(|e| matches!(e, Effect::Purge { .. }));
            for p in purges {
                if let Effect::Purge { chat, seqs } = p {
                    if let Err(e) = self.store.purge(chat, &seqs).await {
                        // The Deleted event is durable; the next start completes the purge.
                        eprintln!(
                            "FATAL: shard {}: purge failed: {e}; exiting so recovery can run",
                            self.id
                        );
                        std::process::abort();
                    }
                }
            }
            core.run_effects(effects).await;
            if let Some(t) = staged_at {
                core.metrics().commit_wait_us.observe(
                    &crate::metrics::COMMIT_WAIT_BUCKETS_US,
                    t.elapsed().as_micros() as u64,
                );
            }
        }
    }

    /// Sends `origin` every durable message of this shard's chats of its user that the device
    /// lacks, in seq order per chat, then a `SyncPart`. Chats the client lists start after the
    /// client's cursor; others after the device's stored delivered cursor.
    pub async fn serve_sync(
        self: Rc<Self>,
        core: Rc<Core>,
        origin: Origin,
        request_id: u32,
        cursors: Arc<Vec<(ChatId, Seq)>>,
    ) {
        let limit = core.cfg.sync_chat_messages_max;
        let plan: Vec<(ChatId, Seq, Seq)> = {
            let owner = self.owner.borrow();
            owner
                .state
                .chats_of_user(origin.user)
                .filter_map(|chat| {
                    let from = cursors
                        .iter()
                        .find(|(c, _)| *c == chat)
                        .map(|(_, s)| *s)
                        .unwrap_or_else(|| owner.state.cursors(chat, origin.user, origin.device).0);
                    // A group member sees the chat from the event that added them up to the one
                    // that removed them.
                    let (first, last) = owner.state.chat(&chat)?.visible_range(origin.user)?;
                    let from = from.max(Seq(first.0 - 1));
                    Some((chat, from, self.store.durable_seq(chat).min(last)))
                })
                .filter(|(_, from, to)| from < to)
                .collect()
        };
        // Each shard gets an even share of the round's byte budget (at least one message).
        let budget = (core.cfg.sync_round_bytes_max / core.shards_total as usize).max(1);
        let mut sent_bytes = 0usize;
        let mut more = false;
        'chats: for (chat, from, to) in plan {
            let mut next = Seq(from.0 + 1);
            let mut sent_in_chat = 0usize;
            while next <= to {
                if sent_bytes >= budget || sent_in_chat >= limit {
                    more = true;
                    break 'chats;
                }
                let chunk = SYNC_READ_CHUNK_MESSAGES.min(limit - sent_in_chat);
                let msgs = match self.store.read_messages(chat, next, to, chunk).await {
                    Ok(m) if !m.is_empty() => m,
                    Ok(_) => break,
                    Err(e) => {
                        eprintln!(
                            "shard {}: sync read of chat {:?} failed: {e}",
                            self.id, chat
                        );
                        let err = ErrorFrame {
                            code: ErrorCode::Internal,
                            text: "storage read failed".into(),
                            client_msg_id: None,
                            request_id,
                        };
                        let frame = core.encode(&ServerFrame::Error(err));
                        core.to_conn(
                            origin.conn,
                            frame,
                            FrameKind::Reply {
                                completes_send: false,
                            },
                        )
                        .await;
                        more = true;
                        break;
                    }
                };
                for m in msgs {
                    if sent_bytes >= budget {
                        more = true;
                        break 'chats;
                    }
                    next = Seq(m.seq.0 + 1);
                    sent_bytes += m.payload.len();
                    sent_in_chat += 1;
                    let frame = core.encode(&ServerFrame::Message(message_frame(&m)));
                    core.to_conn(
                        origin.conn,
                        frame,
                        FrameKind::SyncMessage { chat, seq: m.seq },
                    )
                    .await;
                }
            }
        }
        let part = CoreMsg::SyncPart {
            conn: origin.conn.conn,
            request_id,
            more,
        };
        core.route(origin.conn.core, part).await;
    }

    /// Answers `History` with one page, newest first.
    pub async fn serve_history(
        self: Rc<Self>,
        core: Rc<Core>,
        origin: Origin,
        request_id: u32,
        chat: ChatId,
        before: Seq,
        limit: u32,
    ) {
        // Current members only, from the event that added them.
        let (member, first) = match self.owner.borrow().state.chat(&chat) {
            None => (None, Seq(1)),
            Some(m) if !m.is_member(origin.user) => (Some(false), Seq(1)),
            Some(m) => (
                Some(true),
                m.visible_range(origin.user).map_or(Seq(1), |r| r.0),
            ),
        };
        let frame = match member {
            None | Some(false) => {
                let (code, text) = if member.is_none() {
                    (ErrorCode::UnknownChat, "no such chat")
                } else {
                    (ErrorCode::NotMember, "not a member of this chat")
                };
                ServerFrame::Error(ErrorFrame {
                    code,
                    text: text.into(),
                    client_msg_id: None,
                    request_id,
                })
            }
            Some(true) => match self
                .store
                .read_messages_before(chat, before, limit as usize, HISTORY_PAGE_BYTES_MAX)
                .await
            {
                Ok((msgs, has_more)) => {
                    let total = msgs.len();
                    let messages: Vec<_> = msgs
                        .iter()
                        .filter(|m| m.seq >= first)
                        .map(message_frame)
                        .collect();
                    let has_more = has_more && messages.len() == total;
                    ServerFrame::HistoryPage(HistoryPage {
                        request_id,
                        chat,
                        messages,
                        has_more,
                    })
                }
                Err(e) => {
                    eprintln!(
                        "shard {}: history read of chat {:?} failed: {e}",
                        self.id, chat
                    );
                    ServerFrame::Error(ErrorFrame {
                        code: ErrorCode::Internal,
                        text: "storage read failed".into(),
                        client_msg_id: None,
                        request_id,
                    })
                }
            },
        };
        let frame = core.encode(&frame);
        core.to_conn(
            origin.conn,
            frame,
            FrameKind::Reply {
                completes_send: false,
            },
        )
        .await;
    }

    /// Reads the target of an edit, delete or reaction, then lets the owner decide.
    pub async fn serve_action(
        self: Rc<Self>,
        _core: Rc<Core>,
        origin: Origin,
        chat: ChatId,
        action: Action,
    ) {
        let target = action.target();
        let info = match self.store.read_messages(chat, target, target, 1).await {
            Ok(msgs) => msgs.first().map(|m| TargetInfo {
                seq: m.seq,
                sender: m.sender_user,
                timestamp_ms: m.timestamp_ms,
                content_kind: m.content_kind,
            }),
            Err(e) => {
                eprintln!(
                    "shard {}: reading action target {:?}/{:?} failed: {e}",
                    self.id, chat, target
                );
                None
            }
        };
        self.owner
            .borrow_mut()
            .on_action(crate::core::unix_ms(), origin, chat, action, info);
        self.staged();
    }
}
