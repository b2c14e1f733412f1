//! `ShardState`: the in-memory view of one shard that the engine decides with. Pure: no I/O.
//!
//! It is rebuilt at start-up by applying every record [`crate::EmbeddedStore::open`] returns, and
//! kept current by applying each record when the engine *stages* it (before it is durable). The
//! engine then calls [`ShardState::mark_durable`] once the store's `append` returned.
//!
//! ```text
//!   Record ──apply──► chats (kind, members, next_seq, durable_seq)
//!                     cursors (chat, user, device) → (delivered, read)   monotonic
//!                     user → chats                                       for sync
//!                     dedup (sender, client_msg_id) → DedupEntry         bounded, by generation
//!                     group → (seq, sender) of its newest messages       bounded, for receipts
//! ```

use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};

use switchboard_wire::ids::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};

use crate::record::{ChatKind, CursorKind, Record, CONTENT_KIND_EVENT};
use switchboard_wire::{ChatEvent, EventKind, MemberRole};

/// A group's settings and roles, rebuilt from its `ChatEvent`s.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct GroupMeta {
    pub name: String,
    pub description: String,
    pub avatar_media_id: String,
    /// Only admins (and the owner) may send.
    pub admins_only: bool,
    /// Role of every current member.
    pub roles: HashMap<UserId, MemberRole>,
}

/// The latest membership period of a user in a group: they see seqs `joined..=left` (`left` is
/// the event that removed them, which they still receive).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Membership {
    pub joined: Seq,
    pub left: Option<Seq>,
}

/// What the shard knows about one chat.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMeta {
    pub kind: ChatKind,
    /// Current members, in join order.
    pub members: Vec<UserId>,
    pub created_ms: u64,
    /// The seq the next staged message must carry (1 for an empty chat).
    pub next_seq: Seq,
    /// Highest seq known to be durable (0 = none). Always `< next_seq`.
    pub durable_seq: Seq,
    /// Groups only.
    pub group: Option<Box<GroupMeta>>,
    /// Groups only: every user who ever was a member, with their latest period.
    pub memberships: HashMap<UserId, Membership>,
    /// Per member: the highest (delivered, read) over their devices, raised also by their own
    /// sends (a sender has its own message). Drives the aggregated receipts.
    pub member_cursors: HashMap<UserId, (Seq, Seq)>,
    /// 1:1 only: members who blocked the other member.
    pub blocked_by: Vec<UserId>,
    /// Media objects messages of this chat referred to (`Record::MediaGrant`): id → the first
    /// and the latest seq that named it. One entry per distinct id (memory ~100 bytes each,
    /// like the per-message seq index); looked up by id, never scanned.
    pub media: HashMap<Box<str>, (Seq, Seq)>,
    /// Cache of [`ChatMeta::all_members_cursors`], kept up to date by every cursor raise so the
    /// aggregated receipts of a group cost O(1) per cursor instead of a walk over all members.
    pub min_cursors: MinCursorCache,
    /// Groups only: the authors of the newest messages, for the aggregated delivered receipt.
    pub receipt_authors: ReceiptAuthors,
}

/// Most messages of one group whose authors [`ReceiptAuthors`] keeps. The aggregated "delivered
/// to every member" receipt of a range it covers goes to the authors of those messages only (one
/// frame per author device instead of one per member device: in a 100-member group about 51
/// fewer frames per group message, a third of what the server wrote); a range it does not cover
/// (a member was more than this many messages behind) goes to every member instead. 256 covers
/// any delivery lag short of a member being offline, and an offline member's catch-up is one
/// fallback receipt. Memory: 16 B per entry, at most 4 KiB per group, and only while some member
/// lags (received entries are dropped, and an emptied queue gives its buffer back).
pub const RECEIPT_AUTHORS_MAX: usize = 256;

/// Capacity an empty [`ReceiptAuthors`] queue may keep: a group whose deliveries keep up holds a
/// few entries at a time and should not reallocate for each; a burst's buffer is freed.
const RECEIPT_AUTHORS_IDLE_CAPACITY: usize = 16;

/// The `(seq, sender)` of a group's newest messages, oldest first: always consecutive seqs
/// ending at the chat's last staged message, at most [`RECEIPT_AUTHORS_MAX`] of them (the oldest
/// is dropped to make room). Every group message (events included: their author is the user who
/// made the change) is pushed by [`ShardState::apply`], so recovery rebuilds it with the rest of
/// the state; the engine drops the messages every member has received
/// ([`ShardState::trim_receipt_authors`]) after it has sent their aggregated receipt, and
/// [`ShardState::recover`] does once at the end of the replay.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiptAuthors {
    queue: VecDeque<(Seq, UserId)>,
}

impl ReceiptAuthors {
    fn push(&mut self, seq: Seq, sender: UserId) {
        debug_assert!(
            self.queue.back().is_none_or(|(s, _)| s.0 + 1 == seq.0),
            "receipt authors must be consecutive seqs"
        );
        if self.queue.len() == RECEIPT_AUTHORS_MAX {
            self.queue.pop_front();
        }
        self.queue.push_back((seq, sender));
    }

    /// Forgets the messages up to `through`.
    fn trim(&mut self, through: Seq) {
        while self.queue.front().is_some_and(|(s, _)| *s <= through) {
            self.queue.pop_front();
        }
        if self.queue.is_empty() && self.queue.capacity() > RECEIPT_AUTHORS_IDLE_CAPACITY {
            self.queue = VecDeque::new();
        }
    }

    /// The distinct authors of messages `from..=to`, in seq order of first appearance, or `None`
    /// when the queue does not hold every one of them (dropped for room, or already trimmed).
    pub fn authors(&self, from: Seq, to: Seq) -> Option<Vec<UserId>> {
        let (first, _) = *self.queue.front()?;
        let (last, _) = *self.queue.back()?;
        if from > to || from < first || to > last {
            return None;
        }
        // Consecutive seqs: the index of seq `s` is `s - first`.
        let range = (from.0 - first.0) as usize..=(to.0 - first.0) as usize;
        let mut out: Vec<UserId> = Vec::new();
        for (_, user) in self.queue.range(range) {
            if !out.contains(user) {
                out.push(*user);
            }
        }
        Some(out)
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no message is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// For (delivered, read): the lowest member cursor and how many current members sit at it.
/// `None`: not known (a membership change, or the last member at the minimum moved): the next
/// [`ChatMeta::all_members_cursors`] recomputes it with one walk over the members. So a group
/// message whose delivered receipts arrive from all `n` members costs `n` O(1) updates and one
/// O(n) walk, not `n` walks. Not state: equal whatever it holds, rebuilt on demand.
#[derive(Clone, Debug, Default)]
pub struct MinCursorCache(Cell<Option<[(Seq, u32); 2]>>);

impl PartialEq for MinCursorCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for MinCursorCache {}

impl MinCursorCache {
    fn invalidate(&self) {
        self.0.set(None);
    }
}

impl ChatMeta {
    /// Raises `user`'s member-level cursors to at least `to` (they never move back) and keeps
    /// the minimum cache right.
    fn raise_member_cursors(&mut self, user: UserId, to: (Seq, Seq)) {
        let member = self.is_member(user);
        let m = self.member_cursors.entry(user).or_default();
        let old = *m;
        let new = (old.0.max(to.0), old.1.max(to.1));
        *m = new;
        if !member {
            return;
        }
        let Some(mut cache) = self.min_cursors.0.get() else {
            return;
        };
        for (i, (o, n)) in [(old.0, new.0), (old.1, new.1)].into_iter().enumerate() {
            debug_assert!(o >= cache[i].0, "a member below the cached minimum");
            if n > o && o == cache[i].0 {
                cache[i].1 -= 1;
                if cache[i].1 == 0 {
                    return self.min_cursors.invalidate();
                }
            }
        }
        self.min_cursors.0.set(Some(cache));
    }

    /// See [`ShardState::trim_receipt_authors`].
    fn trim_receipt_authors(&mut self) {
        if self.receipt_authors.is_empty() {
            return;
        }
        let through = if self.members.is_empty() {
            Seq(u64::MAX)
        } else {
            self.all_members_cursors().0
        };
        self.receipt_authors.trim(through);
    }

    /// Whether `user` is a member of this chat.
    pub fn is_member(&self, user: UserId) -> bool {
        match self.kind {
            ChatKind::Direct => self.members.contains(&user),
            ChatKind::Group => self
                .group
                .as_ref()
                .is_some_and(|g| g.roles.contains_key(&user)),
        }
    }

    /// The member's role (direct chats have only members).
    pub fn role(&self, user: UserId) -> Option<MemberRole> {
        match &self.group {
            Some(g) => g.roles.get(&user).copied(),
            None => self.members.contains(&user).then_some(MemberRole::Member),
        }
    }

    /// Whether `user` may fetch media object `media_id`: a durable message of this chat that
    /// `user` may read (its first or latest mention) refers to it.
    pub fn media_visible_to(&self, user: UserId, media_id: &str) -> bool {
        let Some(&(first, last)) = self.media.get(media_id) else {
            return false;
        };
        let Some((from, to)) = self.visible_range(user) else {
            return false;
        };
        [first, last]
            .into_iter()
            .any(|s| s <= self.durable_seq && from <= s && s <= to)
    }

    /// The seqs `user` may read: `first..=last` (`last` = `Seq(u64::MAX)` while a member).
    /// `None`: never a member.
    pub fn visible_range(&self, user: UserId) -> Option<(Seq, Seq)> {
        match self.kind {
            ChatKind::Direct => self
                .members
                .contains(&user)
                .then_some((Seq(1), Seq(u64::MAX))),
            ChatKind::Group => self
                .memberships
                .get(&user)
                .map(|m| (m.joined, m.left.unwrap_or(Seq(u64::MAX)))),
        }
    }

    /// The lowest (delivered, read) over current members: every member has every message up to
    /// these seqs.
    pub fn all_members_cursors(&self) -> (Seq, Seq) {
        if self.members.is_empty() {
            return (Seq(0), Seq(0));
        }
        if let Some(c) = self.min_cursors.0.get() {
            return (c[0].0, c[1].0);
        }
        let mut min = [(Seq(u64::MAX), 0u32); 2];
        for (i, m) in self.members.iter().enumerate() {
            // A direct chat with oneself lists the user twice: count each member once, as
            // `raise_member_cursors` does.
            if self.kind == ChatKind::Direct && self.members[..i].contains(m) {
                continue;
            }
            let (d, r) = self.member_cursors.get(m).copied().unwrap_or_default();
            for (slot, v) in min.iter_mut().zip([d, r]) {
                if v < slot.0 {
                    *slot = (v, 1);
                } else if v == slot.0 {
                    slot.1 += 1;
                }
            }
        }
        self.min_cursors.0.set(Some(min));
        (min[0].0, min[1].0)
    }
}

/// Where an earlier send with the same `(sender, client_msg_id)` landed; a retry is answered with
/// this instead of storing the message again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupEntry {
    pub chat: ChatId,
    pub seq: Seq,
    pub msg_id: MsgId,
    pub timestamp_ms: u64,
}

/// Generations a [`DedupWindow`] splits its bound into (fewer when the bound is smaller).
pub const DEDUP_GENERATIONS: usize = 8;

/// The idempotency window: the most recent sends' `(sender, client_msg_id)` keys, at most
/// `dedup_entries_max` of them, evicted oldest first by generation.
///
/// The bound is split into up to [`DEDUP_GENERATIONS`] hash tables of `bound / generations`
/// entries, each reserved at its size when it starts, so no insert ever rehashes (growing one
/// table of a million entries rehashed them all at once: 100–370 ms stalls of the shard's
/// reactor, measured as p99 spikes in `benches/run.sh`). Reserving one table for the whole bound
/// instead made it resident within the first ~10 % of its entries (hashing spreads them over
/// every page): ~115 MB per shard after 90K sends. Here memory grows a generation (~15 MB at the
/// default bound) at a time. When the newest generation is full and all exist, the oldest is
/// dropped (its table reused), so the window keeps at least the newest
/// `(generations − 1) × (bound / generations)` keys and never more than the bound. With a bound
/// under [`DEDUP_GENERATIONS`] every generation holds one key: an exact FIFO.
#[derive(Debug, PartialEq)]
pub struct DedupWindow {
    /// Oldest first; the last one takes inserts.
    generations: VecDeque<HashMap<(UserId, ClientMsgId), DedupEntry>>,
    per_generation: usize,
    generations_max: usize,
}

impl DedupWindow {
    /// # Panics
    /// If `bound` is 0.
    pub fn new(bound: usize) -> DedupWindow {
        assert!(bound > 0, "dedup_entries_max must be positive");
        let generations_max = bound.min(DEDUP_GENERATIONS);
        DedupWindow {
            generations: VecDeque::with_capacity(generations_max),
            per_generation: bound / generations_max,
            generations_max,
        }
    }

    pub fn get(&self, key: &(UserId, ClientMsgId)) -> Option<&DedupEntry> {
        self.generations.iter().rev().find_map(|g| g.get(key))
    }

    /// Adds a key. A key already present means the engine stored a retry inside the window,
    /// which it should not do; its entry is replaced where it is (same eviction position).
    pub fn insert(&mut self, key: (UserId, ClientMsgId), entry: DedupEntry) {
        for g in self.generations.iter_mut().rev() {
            if let Some(e) = g.get_mut(&key) {
                *e = entry;
                return;
            }
        }
        let full = self
            .generations
            .back()
            .is_none_or(|g| g.len() >= self.per_generation);
        if full {
            let table = if self.generations.len() == self.generations_max {
                let mut oldest = self.generations.pop_front().expect("generations_max > 0");
                oldest.clear();
                oldest
            } else {
                HashMap::with_capacity(self.per_generation)
            };
            self.generations.push_back(table);
        }
        self.generations
            .back_mut()
            .expect("a generation was just ensured")
            .insert(key, entry);
        debug_assert!(self.len() <= self.per_generation * self.generations_max);
    }

    /// Keys in the window.
    pub fn len(&self) -> usize {
        self.generations.iter().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.generations.iter().all(HashMap::is_empty)
    }
}

/// The shard's decision-making state. See the module docs.
///
/// Memory: per chat ~100 B plus 8 B per member; per cursor key ~60 B; per dedup entry ~120 B
/// of table (key 24 B and value 32 B in a hash table reserved at under half load), so the
/// default `dedup_entries_max` of 1,000,000 costs ~120 MB per shard when full, in steps of one
/// [`DedupWindow`] generation (~15 MB) as sends arrive. A group whose members lag holds up to
/// 4 KiB of receipt authors ([`RECEIPT_AUTHORS_MAX`]).
#[derive(Debug, PartialEq)]
pub struct ShardState {
    chats: HashMap<ChatId, ChatMeta>,
    cursors: HashMap<(ChatId, UserId, DeviceId), (Seq, Seq)>,
    user_chats: HashMap<UserId, Vec<ChatId>>,
    dedup: DedupWindow,
    /// Presence state of the users whose home is this shard: (last_seen_ms, last-seen visibility,
    /// online visibility).
    users: HashMap<UserId, (u64, u8, u8)>,
    /// Devices of each member that ever reported a cursor in a chat (to move the read cursor of
    /// every device when one reads).
    cursor_devices: HashMap<(ChatId, UserId), Vec<DeviceId>>,
    /// Messages deleted for everyone (from `Deleted` events). Grows with deletions only.
    deleted: HashSet<(ChatId, Seq)>,
    /// For each edited message, the seqs of the `Edited` events carrying its newer contents, so a
    /// deletion can purge those too. Grows with edits only.
    edits: HashMap<(ChatId, Seq), Vec<Seq>>,
}

impl ShardState {
    /// An empty shard whose dedup table holds at most `dedup_entries_max` entries.
    ///
    /// # Panics
    /// If `dedup_entries_max` is 0 (rejected earlier by `StoreConfig::validate`).
    pub fn new(dedup_entries_max: usize) -> Self {
        assert!(dedup_entries_max > 0, "dedup_entries_max must be positive");
        ShardState {
            chats: HashMap::new(),
            cursors: HashMap::new(),
            user_chats: HashMap::new(),
            dedup: DedupWindow::new(dedup_entries_max),
            deleted: HashSet::new(),
            edits: HashMap::new(),
            users: HashMap::new(),
            cursor_devices: HashMap::new(),
        }
    }

    /// Rebuilds the state from a recovered log: applies every record in order, then marks every
    /// message durable (they were read back from disk).
    pub fn recover<'a>(
        dedup_entries_max: usize,
        records: impl IntoIterator<Item = &'a Record>,
    ) -> Self {
        let mut s = ShardState::new(dedup_entries_max);
        for r in records {
            s.apply(r);
        }
        for meta in s.chats.values_mut() {
            meta.durable_seq = Seq(meta.next_seq.0 - 1);
            // Replay pushed every group message: keep those some member still lacks, as the
            // engine does while it runs (one walk over each group's members).
            meta.trim_receipt_authors();
        }
        s
    }

    /// Applies one record: at recovery, and when the engine stages a record for the next group
    /// commit. A `Message` must carry its chat's `next_seq`, and its chat must exist; a
    /// `ChatCreated` for an existing chat is ignored (idempotent). Cursors only move forward, and a
    /// read cursor drags the delivered cursor with it (read implies delivered).
    ///
    /// # Panics
    /// On a message for an unknown chat or with a seq other than `next_seq`: the engine assigns
    /// seqs and the store refuses gaps, so this is a broken invariant.
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::ChatCreated {
                chat,
                kind,
                members,
                created_ms,
            } => {
                let Entry::Vacant(slot) = self.chats.entry(*chat) else {
                    return;
                };
                slot.insert(ChatMeta {
                    kind: *kind,
                    members: members.clone(),
                    created_ms: *created_ms,
                    next_seq: Seq(1),
                    durable_seq: Seq(0),
                    group: None,
                    memberships: HashMap::new(),
                    member_cursors: HashMap::new(),
                    blocked_by: Vec::new(),
                    media: HashMap::new(),
                    min_cursors: MinCursorCache::default(),
                    receipt_authors: ReceiptAuthors::default(),
                });
                for user in members {
                    let list = self.user_chats.entry(*user).or_default();
                    // Duplicate members in a list must not list the chat twice.
                    if !list.contains(chat) {
                        list.push(*chat);
                    }
                }
            }
            Record::Message(m) => {
                let meta = self
                    .chats
                    .get_mut(&m.chat)
                    .unwrap_or_else(|| panic!("message for unknown chat {:?}", m.chat));
                assert_eq!(
                    m.seq, meta.next_seq,
                    "message seq out of order in chat {:?}",
                    m.chat
                );
                meta.next_seq = Seq(m.seq.0 + 1);
                if meta.kind == ChatKind::Group {
                    meta.receipt_authors.push(m.seq, m.sender_user);
                }
                if m.content_kind == CONTENT_KIND_EVENT {
                    match switchboard_wire::decode_event(&m.payload) {
                        Ok(ev) => match ev.kind {
                            EventKind::Edited => self
                                .edits
                                .entry((m.chat, ev.target))
                                .or_default()
                                .push(m.seq),
                            EventKind::Deleted => {
                                self.deleted.insert((m.chat, ev.target));
                            }
                            EventKind::Reacted => {}
                            _ if meta.kind == ChatKind::Group => {
                                let added = apply_group_event(meta, m.sender_user, m.seq, &ev);
                                for user in added {
                                    let list = self.user_chats.entry(user).or_default();
                                    if !list.contains(&m.chat) {
                                        list.push(m.chat);
                                    }
                                }
                            }
                            _ => {}
                        },
                        // Only the server writes events, and the record's CRC was valid: this is
                        // a newer server's event. Keep the message; skip its state change.
                        Err(e) => {
                            eprintln!("chat {:?} seq {:?}: undecodable event: {e}", m.chat, m.seq)
                        }
                    }
                }
                meta.raise_member_cursors(m.sender_user, (m.seq, m.seq));
                if !m.client_msg_id.is_nil() {
                    self.insert_dedup(
                        (m.sender_user, m.client_msg_id),
                        DedupEntry {
                            chat: m.chat,
                            seq: m.seq,
                            msg_id: m.msg_id,
                            timestamp_ms: m.timestamp_ms,
                        },
                    );
                }
            }
            Record::Block {
                chat,
                blocker,
                blocked,
            } => {
                if let Some(meta) = self.chats.get_mut(chat) {
                    meta.blocked_by.retain(|u| u != blocker);
                    if *blocked {
                        meta.blocked_by.push(*blocker);
                    }
                }
            }
            Record::MediaGrant {
                chat,
                seq,
                media_id,
            } => {
                if let Some(meta) = self.chats.get_mut(chat) {
                    match meta.media.get_mut(media_id.as_str()) {
                        Some((_, last)) => *last = (*last).max(*seq),
                        None => {
                            meta.media.insert(media_id.as_str().into(), (*seq, *seq));
                        }
                    }
                }
            }
            Record::UserMeta {
                user,
                last_seen_ms,
                last_seen_visibility,
                online_visibility,
            } => {
                self.users.insert(
                    *user,
                    (*last_seen_ms, *last_seen_visibility, *online_visibility),
                );
            }
            // Accounts are the engine's (`engine/src/accounts.rs` replays them).
            Record::Account(_) => {}
            Record::Cursor {
                chat,
                user,
                device,
                kind,
                seq,
            } => {
                let devices = self.cursor_devices.entry((*chat, *user)).or_default();
                if !devices.contains(device) {
                    devices.push(*device);
                }
                let c = self.cursors.entry((*chat, *user, *device)).or_default();
                match kind {
                    CursorKind::Delivered => c.0 = c.0.max(*seq),
                    CursorKind::Read => {
                        c.1 = c.1.max(*seq);
                        c.0 = c.0.max(c.1);
                    }
                }
                let c = *c;
                if let Some(meta) = self.chats.get_mut(chat) {
                    meta.raise_member_cursors(*user, c);
                }
            }
        }
    }

    /// Devices of `user` that have cursors in `chat`.
    pub fn cursor_devices(&self, chat: ChatId, user: UserId) -> &[DeviceId] {
        self.cursor_devices
            .get(&(chat, user))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Every block in force in this shard's 1:1 chats: (blocker, blocked).
    pub fn blocks(&self) -> impl Iterator<Item = (UserId, UserId)> + '_ {
        self.chats.values().flat_map(|m| {
            m.blocked_by
                .iter()
                .filter_map(move |b| m.members.iter().find(|u| *u != b).map(|other| (*b, *other)))
        })
    }

    /// Whether `blocker` blocked the other member of the 1:1 chat `chat`.
    pub fn is_blocked_by(&self, chat: ChatId, blocker: UserId) -> bool {
        self.chats
            .get(&chat)
            .is_some_and(|m| m.blocked_by.contains(&blocker))
    }

    /// Presence state of a user homed here: (last_seen_ms, last-seen visibility, online
    /// visibility); visibility 0 = everyone, 1 = contacts, 2 = nobody.
    pub fn user_presence(&self, user: UserId) -> (u64, u8, u8) {
        self.users.get(&user).copied().unwrap_or((0, 0, 0))
    }

    /// Whether message `seq` of `chat` was deleted for everyone.
    pub fn is_deleted(&self, chat: ChatId, seq: Seq) -> bool {
        self.deleted.contains(&(chat, seq))
    }

    /// Every deleted message, for re-running purges that a crash interrupted.
    pub fn deleted(&self) -> impl Iterator<Item = (ChatId, Seq)> + '_ {
        self.deleted.iter().copied()
    }

    /// Seqs of the `Edited` events whose content replaced message `seq` of `chat`.
    pub fn edits_of(&self, chat: ChatId, seq: Seq) -> &[Seq] {
        self.edits
            .get(&(chat, seq))
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// `(delivered, read)` of a member over all their devices (and their own sends).
    pub fn member_cursors(&self, chat: ChatId, user: UserId) -> (Seq, Seq) {
        self.chats
            .get(&chat)
            .and_then(|m| m.member_cursors.get(&user).copied())
            .unwrap_or_default()
    }

    /// Drops the authors of the group messages every current member has received (all of them
    /// once the group has no members): their aggregated delivered receipt has been sent. The
    /// engine calls it after each aggregate it computes; without it the queue still stays within
    /// [`RECEIPT_AUTHORS_MAX`].
    pub fn trim_receipt_authors(&mut self, chat: ChatId) {
        if let Some(meta) = self.chats.get_mut(&chat) {
            meta.trim_receipt_authors();
        }
    }

    fn insert_dedup(&mut self, key: (UserId, ClientMsgId), entry: DedupEntry) {
        self.dedup.insert(key, entry);
    }

    /// Records that messages of `chat` up to `seq` are durable.
    ///
    /// # Panics
    /// If the chat is unknown or `seq` was never staged. A `seq` at or below the current
    /// `durable_seq` is a no-op (batches may complete in any order of calls).
    pub fn mark_durable(&mut self, chat: ChatId, seq: Seq) {
        let meta = self
            .chats
            .get_mut(&chat)
            .unwrap_or_else(|| panic!("mark_durable for unknown chat {chat:?}"));
        assert!(
            seq < meta.next_seq,
            "mark_durable({seq:?}) beyond staged {:?}",
            meta.next_seq
        );
        meta.durable_seq = meta.durable_seq.max(seq);
    }

    /// The chat's metadata, if the chat lives in this shard.
    pub fn chat(&self, chat: &ChatId) -> Option<&ChatMeta> {
        self.chats.get(chat)
    }

    /// The earlier send with this idempotency key, if it is still inside the dedup window.
    pub fn dedup(&self, sender: &UserId, client_msg_id: &ClientMsgId) -> Option<&DedupEntry> {
        self.dedup.get(&(*sender, *client_msg_id))
    }

    /// `(delivered, read)` cursors of one device in one chat; `(0, 0)` if never set.
    pub fn cursors(&self, chat: ChatId, user: UserId, device: DeviceId) -> (Seq, Seq) {
        self.cursors
            .get(&(chat, user, device))
            .copied()
            .unwrap_or_default()
    }

    /// The chats of this shard that `user` is a member of, in creation order.
    pub fn chats_of_user(&self, user: UserId) -> impl Iterator<Item = ChatId> + '_ {
        self.user_chats.get(&user).into_iter().flatten().copied()
    }

    /// Number of chats in the shard.
    pub fn chats_len(&self) -> usize {
        self.chats.len()
    }

    /// Number of live dedup entries (at most `dedup_entries_max`).
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }
}

/// Applies a group event to the chat's metadata; returns users who became members (for the
/// user → chats index). Deterministic: recovery replays it identically.
fn apply_group_event(meta: &mut ChatMeta, actor: UserId, seq: Seq, ev: &ChatEvent) -> Vec<UserId> {
    let mut added = Vec::new();
    let join = |meta: &mut ChatMeta, user: UserId, role: MemberRole, added: &mut Vec<UserId>| {
        let g = meta.group.get_or_insert_with(Default::default);
        if g.roles.insert(user, role).is_none() {
            meta.members.push(user);
            meta.min_cursors.invalidate();
            meta.memberships.insert(
                user,
                Membership {
                    joined: seq,
                    left: None,
                },
            );
            added.push(user);
        }
    };
    let leave = |meta: &mut ChatMeta, user: UserId| {
        if let Some(g) = meta.group.as_mut() {
            if g.roles.remove(&user).is_some() {
                meta.members.retain(|m| *m != user);
                meta.min_cursors.invalidate();
                if let Some(ms) = meta.memberships.get_mut(&user) {
                    ms.left = Some(seq);
                }
            }
        }
    };
    match ev.kind {
        EventKind::GroupCreated => {
            let g = meta.group.get_or_insert_with(Default::default);
            g.name = ev.name.clone().unwrap_or_default();
            g.description = ev.description.clone().unwrap_or_default();
            g.avatar_media_id = ev.avatar_media_id.clone().unwrap_or_default();
            g.admins_only = ev.admins_only;
            // The ChatCreated record listed the creator first; roles come from here.
            meta.members.clear();
            join(meta, actor, MemberRole::Owner, &mut added);
            for u in &ev.users {
                join(meta, *u, MemberRole::Member, &mut added);
            }
        }
        EventKind::MembersAdded => {
            for u in &ev.users {
                join(meta, *u, MemberRole::Member, &mut added);
            }
        }
        EventKind::MembersRemoved => {
            for u in &ev.users {
                leave(meta, *u);
            }
        }
        EventKind::MemberLeft => leave(meta, actor),
        EventKind::InfoChanged => {
            let g = meta.group.get_or_insert_with(Default::default);
            if let Some(n) = &ev.name {
                g.name = n.clone();
            }
            if let Some(d) = &ev.description {
                g.description = d.clone();
            }
            if let Some(a) = &ev.avatar_media_id {
                g.avatar_media_id = a.clone();
            }
        }
        EventKind::RolesChanged => {
            if let Some(g) = meta.group.as_mut() {
                for u in &ev.users {
                    if let Some(r) = g.roles.get_mut(u) {
                        // The owner's role only changes by ownership transfer (below).
                        if *r != MemberRole::Owner {
                            *r = ev.role;
                        }
                    }
                }
            }
        }
        EventKind::AdminsOnlyChanged => {
            if let Some(g) = meta.group.as_mut() {
                g.admins_only = ev.admins_only;
            }
        }
        _ => {}
    }
    // A group always has an owner while it has members: if the owner left, the longest-standing
    // admin (else member) takes over.
    if let Some(g) = meta.group.as_mut() {
        if !g.roles.is_empty() && !g.roles.values().any(|r| *r == MemberRole::Owner) {
            let heir = meta
                .members
                .iter()
                .find(|m| g.roles.get(m) == Some(&MemberRole::Admin))
                .or_else(|| meta.members.first())
                .copied();
            if let Some(h) = heir {
                g.roles.insert(h, MemberRole::Owner);
            }
        }
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StoredMessage;
    use switchboard_wire::MemberRole;

    const CHAT: ChatId = ChatId(10);

    fn created(chat: ChatId, members: &[u64]) -> Record {
        Record::ChatCreated {
            chat,
            kind: ChatKind::Direct,
            members: members.iter().copied().map(UserId).collect(),
            created_ms: 1,
        }
    }

    fn msg(chat: ChatId, seq: u64, sender: u64, cmid: u64) -> Record {
        Record::Message(StoredMessage {
            chat,
            seq: Seq(seq),
            msg_id: MsgId(seq * 100),
            sender_user: UserId(sender),
            sender_device: DeviceId(1),
            timestamp_ms: seq,
            client_msg_id: ClientMsgId::from_halves(0, cmid),
            reply_to: Seq(0),
            content_kind: 0,
            flags: 0,
            payload: vec![],
        })
    }

    fn cursor(kind: CursorKind, seq: u64) -> Record {
        Record::Cursor {
            chat: CHAT,
            user: UserId(2),
            device: DeviceId(1),
            kind,
            seq: Seq(seq),
        }
    }

    #[test]
    fn chat_creation_and_membership_index() {
        let mut s = ShardState::new(10);
        s.apply(&created(CHAT, &[1, 2]));
        s.apply(&created(ChatId(11), &[2, 3]));
        // Re-creating is a no-op.
        s.apply(&created(CHAT, &[5, 6]));
        let meta = s.chat(&CHAT).unwrap();
        assert_eq!(meta.members, vec![UserId(1), UserId(2)]);
        assert!(meta.is_member(UserId(1)) && !meta.is_member(UserId(5)));
        assert_eq!((meta.next_seq, meta.durable_seq), (Seq(1), Seq(0)));
        assert_eq!(
            s.chats_of_user(UserId(2)).collect::<Vec<_>>(),
            vec![CHAT, ChatId(11)]
        );
        assert_eq!(s.chats_of_user(UserId(1)).collect::<Vec<_>>(), vec![CHAT]);
        assert_eq!(s.chats_of_user(UserId(5)).count(), 0);
        assert_eq!(s.chats_len(), 2);
    }

    #[test]
    fn media_grants_follow_durability_and_visibility() {
        let mut s = ShardState::new(10);
        s.apply(&created(CHAT, &[1, 2]));
        s.apply(&msg(CHAT, 1, 1, 1));
        let grant = |seq: u64, id: &str| Record::MediaGrant {
            chat: CHAT,
            seq: Seq(seq),
            media_id: id.to_owned(),
        };
        s.apply(&grant(1, "photo"));
        let meta = s.chat(&CHAT).unwrap();
        // Not durable yet.
        assert!(!meta.media_visible_to(UserId(2), "photo"));
        s.mark_durable(CHAT, Seq(1));
        let meta = s.chat(&CHAT).unwrap();
        assert!(meta.media_visible_to(UserId(1), "photo"));
        assert!(meta.media_visible_to(UserId(2), "photo"));
        assert!(!meta.media_visible_to(UserId(3), "photo"), "not a member");
        assert!(
            !meta.media_visible_to(UserId(2), "other"),
            "never sent here"
        );
        // A later mention keeps the first.
        s.apply(&msg(CHAT, 2, 1, 2));
        s.apply(&grant(2, "photo"));
        assert_eq!(s.chat(&CHAT).unwrap().media["photo"], (Seq(1), Seq(2)));
        // Grants for unknown chats are ignored (never staged by the owner).
        s.apply(&Record::MediaGrant {
            chat: ChatId(999),
            seq: Seq(1),
            media_id: "x".to_owned(),
        });
        assert!(s.chat(&ChatId(999)).is_none());
    }

    #[test]
    fn messages_advance_seq_and_durability_is_separate() {
        let mut s = ShardState::new(10);
        s.apply(&created(CHAT, &[1, 2]));
        s.apply(&msg(CHAT, 1, 1, 1));
        s.apply(&msg(CHAT, 2, 1, 2));
        assert_eq!(s.chat(&CHAT).unwrap().next_seq, Seq(3));
        assert_eq!(s.chat(&CHAT).unwrap().durable_seq, Seq(0));
        s.mark_durable(CHAT, Seq(2));
        s.mark_durable(CHAT, Seq(1)); // never moves back
        assert_eq!(s.chat(&CHAT).unwrap().durable_seq, Seq(2));
    }

    #[test]
    #[should_panic(expected = "out of order")]
    fn seq_gap_panics() {
        let mut s = ShardState::new(10);
        s.apply(&created(CHAT, &[1, 2]));
        s.apply(&msg(CHAT, 2, 1, 1));
    }

    #[test]
    #[should_panic(expected = "unknown chat")]
    fn message_for_unknown_chat_panics() {
        ShardState::new(10).apply(&msg(CHAT, 1, 1, 1));
    }

    #[test]
    #[should_panic(expected = "beyond staged")]
    fn mark_durable_beyond_staged_panics() {
        let mut s = ShardState::new(10);
        s.apply(&created(CHAT, &[1, 2]));
        s.mark_durable(CHAT, Seq(1));
    }

    #[test]
    fn cursors_are_monotonic_and_read_implies_delivered() {
        let mut s = ShardState::new(10);
        let key = (CHAT, UserId(2), DeviceId(1));
        assert_eq!(s.cursors(key.0, key.1, key.2), (Seq(0), Seq(0)));
        s.apply(&cursor(CursorKind::Delivered, 5));
        s.apply(&cursor(CursorKind::Delivered, 3));
        assert_eq!(s.cursors(key.0, key.1, key.2), (Seq(5), Seq(0)));
        s.apply(&cursor(CursorKind::Read, 4));
        s.apply(&cursor(CursorKind::Read, 2));
        assert_eq!(s.cursors(key.0, key.1, key.2), (Seq(5), Seq(4)));
        s.apply(&cursor(CursorKind::Read, 9));
        assert_eq!(s.cursors(key.0, key.1, key.2), (Seq(9), Seq(9)));
        // Other devices are independent.
        assert_eq!(s.cursors(CHAT, UserId(2), DeviceId(2)), (Seq(0), Seq(0)));
    }

    #[test]
    fn dedup_is_bounded_fifo() {
        let mut s = ShardState::new(3);
        s.apply(&created(CHAT, &[1, 2]));
        for seq in 1..=5 {
            s.apply(&msg(CHAT, seq, 1, seq));
        }
        assert_eq!(s.dedup_len(), 3);
        let key = |n| ClientMsgId::from_halves(0, n);
        assert!(s.dedup(&UserId(1), &key(1)).is_none());
        assert!(s.dedup(&UserId(1), &key(2)).is_none());
        let e = s.dedup(&UserId(1), &key(4)).unwrap();
        assert_eq!(
            *e,
            DedupEntry {
                chat: CHAT,
                seq: Seq(4),
                msg_id: MsgId(400),
                timestamp_ms: 4
            }
        );
        // Keys are per sender.
        assert!(s.dedup(&UserId(2), &key(4)).is_none());
    }

    #[test]
    fn dedup_window_evicts_by_generation_and_reserves_one_at_a_time() {
        let entry = |n: u64| DedupEntry {
            chat: CHAT,
            seq: Seq(n),
            msg_id: MsgId(n),
            timestamp_ms: n,
        };
        let key = |n: u64| (UserId(1), ClientMsgId::from_halves(0, n));
        // 16 = 8 generations of 2.
        let mut w = DedupWindow::new(16);
        for n in 1..=16 {
            w.insert(key(n), entry(n));
        }
        assert_eq!((w.len(), w.generations.len()), (16, 8));
        assert!((1..=16).all(|n| w.get(&key(n)) == Some(&entry(n))));
        // The 17th starts a generation in place of the oldest: 1 and 2 go, together.
        w.insert(key(17), entry(17));
        assert_eq!((w.len(), w.generations.len()), (15, 8));
        assert!(w.get(&key(1)).is_none() && w.get(&key(2)).is_none());
        assert!((3..=17).all(|n| w.get(&key(n)) == Some(&entry(n))));
        // A key already present is replaced where it is, not added again.
        w.insert(key(3), entry(99));
        assert_eq!(w.len(), 15);
        assert_eq!(w.get(&key(3)), Some(&entry(99)));
        for n in 18..=19 {
            w.insert(key(n), entry(n));
        }
        assert!(w.get(&key(3)).is_none(), "3 left with its generation");
        // Never more than the bound, at least bound − one generation once full.
        for n in 20..=1000 {
            w.insert(key(n), entry(n));
            assert!((14..=16).contains(&w.len()), "{}", w.len());
        }

        // The default bound: one table of 125,000 reserved at first, none rehashed as it fills.
        let mut w = DedupWindow::new(1_000_000);
        w.insert(key(0), entry(0));
        assert_eq!(w.generations.len(), 1);
        let capacity = w.generations[0].capacity();
        assert!(capacity >= 125_000);
        for n in 1..125_000 {
            w.insert(key(n), entry(n));
        }
        assert_eq!(w.generations.len(), 1);
        assert_eq!(w.generations[0].capacity(), capacity);
        w.insert(key(125_000), entry(125_000));
        assert_eq!(w.generations.len(), 2);
    }

    #[test]
    fn nil_client_msg_id_is_not_deduplicated() {
        let mut s = ShardState::new(3);
        s.apply(&created(CHAT, &[1, 2]));
        let mut r = msg(CHAT, 1, 1, 0);
        if let Record::Message(m) = &mut r {
            m.client_msg_id = ClientMsgId::default();
        }
        s.apply(&r);
        assert_eq!(s.dedup_len(), 0);
    }

    #[test]
    fn recover_marks_everything_durable() {
        let log = vec![
            created(CHAT, &[1, 2]),
            msg(CHAT, 1, 1, 1),
            msg(CHAT, 2, 2, 1),
            cursor(CursorKind::Read, 1),
        ];
        let s = ShardState::recover(10, &log);
        let meta = s.chat(&CHAT).unwrap();
        assert_eq!((meta.next_seq, meta.durable_seq), (Seq(3), Seq(2)));
        assert_eq!(s.cursors(CHAT, UserId(2), DeviceId(1)), (Seq(1), Seq(1)));
        assert_eq!(
            s.dedup(&UserId(2), &ClientMsgId::from_halves(0, 1))
                .unwrap()
                .seq,
            Seq(2)
        );
    }

    fn event(chat: ChatId, seq: u64, actor: u64, ev: &ChatEvent) -> Record {
        Record::Message(StoredMessage {
            chat,
            seq: Seq(seq),
            msg_id: MsgId(seq),
            sender_user: UserId(actor),
            sender_device: DeviceId(1),
            timestamp_ms: seq,
            client_msg_id: ClientMsgId::from_halves(actor, seq),
            reply_to: Seq(0),
            content_kind: CONTENT_KIND_EVENT,
            flags: 0,
            payload: switchboard_wire::encode_event(ev),
        })
    }

    #[test]
    fn group_events_drive_members_roles_visibility_and_ownership() {
        let g = ChatId(1 << 63 | 5);
        let mut s = ShardState::new(10);
        s.apply(&Record::ChatCreated {
            chat: g,
            kind: ChatKind::Group,
            members: vec![UserId(1), UserId(2)],
            created_ms: 1,
        });
        let mut created = ChatEvent::new(EventKind::GroupCreated);
        created.users = vec![UserId(2)];
        created.name = Some("g".into());
        s.apply(&event(g, 1, 1, &created));
        let mut add = ChatEvent::new(EventKind::MembersAdded);
        add.users = vec![UserId(3)];
        s.apply(&event(g, 2, 1, &add));
        let mut promote = ChatEvent::new(EventKind::RolesChanged);
        promote.users = vec![UserId(3)];
        promote.role = MemberRole::Admin;
        s.apply(&event(g, 3, 1, &promote));
        let mut remove = ChatEvent::new(EventKind::MembersRemoved);
        remove.users = vec![UserId(2)];
        s.apply(&event(g, 4, 3, &remove));
        let meta = s.chat(&g).unwrap();
        assert_eq!(meta.members, vec![UserId(1), UserId(3)]);
        assert_eq!(meta.group.as_ref().unwrap().name, "g");
        assert_eq!(meta.role(UserId(3)), Some(MemberRole::Admin));
        assert!(!meta.is_member(UserId(2)));
        assert_eq!(meta.visible_range(UserId(2)), Some((Seq(1), Seq(4))));
        assert_eq!(meta.visible_range(UserId(3)), Some((Seq(2), Seq(u64::MAX))));
        assert_eq!(meta.visible_range(UserId(9)), None);
        assert_eq!(s.chats_of_user(UserId(3)).collect::<Vec<_>>(), vec![g]);
        // The owner leaves: the admin takes over.
        s.apply(&event(g, 5, 1, &ChatEvent::new(EventKind::MemberLeft)));
        let meta = s.chat(&g).unwrap();
        assert_eq!(meta.members, vec![UserId(3)]);
        assert_eq!(meta.role(UserId(3)), Some(MemberRole::Owner));
        // Aggregates: member cursors follow sends and cursor records.
        assert_eq!(s.member_cursors(g, UserId(1)), (Seq(5), Seq(5)));
    }

    /// The cached minimum behind the aggregated receipts equals a brute-force walk after every
    /// step of a random mix of member cursors, member sends, joins and removals.
    #[test]
    fn cached_member_minimum_matches_a_walk_over_members() {
        fn walk(meta: &ChatMeta) -> (Seq, Seq) {
            if meta.members.is_empty() {
                return (Seq(0), Seq(0));
            }
            meta.members
                .iter()
                .fold((Seq(u64::MAX), Seq(u64::MAX)), |acc, m| {
                    let (d, r) = meta.member_cursors.get(m).copied().unwrap_or_default();
                    (acc.0.min(d), acc.1.min(r))
                })
        }
        let g = ChatId(1 << 63 | 7);
        let mut s = ShardState::new(10);
        s.apply(&Record::ChatCreated {
            chat: g,
            kind: ChatKind::Group,
            members: vec![UserId(1)],
            created_ms: 1,
        });
        let mut created = ChatEvent::new(EventKind::GroupCreated);
        created.users = (2..=8).map(UserId).collect();
        s.apply(&event(g, 1, 1, &created));
        let mut seq = 1u64;
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut moved_min = 0;
        for _ in 0..5_000 {
            let members = s.chat(&g).unwrap().members.clone();
            let before = s.chat(&g).unwrap().all_members_cursors();
            match next(10) {
                0 => {
                    // A member sends a message (raises its own cursors).
                    let actor = members[next(members.len() as u64) as usize];
                    seq += 1;
                    let mut m =
                        match event(g, seq, actor.0, &ChatEvent::new(EventKind::InfoChanged)) {
                            Record::Message(m) => m,
                            _ => unreachable!(),
                        };
                    m.content_kind = 0;
                    m.payload = vec![1, 2, 3];
                    s.apply(&Record::Message(m));
                }
                1 if members.len() > 2 => {
                    let mut remove = ChatEvent::new(EventKind::MembersRemoved);
                    remove.users = vec![members[1 + next(members.len() as u64 - 1) as usize]];
                    seq += 1;
                    s.apply(&event(g, seq, members[0].0, &remove));
                }
                2 => {
                    let mut add = ChatEvent::new(EventKind::MembersAdded);
                    add.users = vec![UserId(1 + next(12))];
                    seq += 1;
                    s.apply(&event(g, seq, members[0].0, &add));
                }
                _ => {
                    let user = members[next(members.len() as u64) as usize];
                    let kind = if next(3) == 0 {
                        CursorKind::Read
                    } else {
                        CursorKind::Delivered
                    };
                    s.apply(&Record::Cursor {
                        chat: g,
                        user,
                        device: DeviceId(1 + next(2) as u32),
                        kind,
                        seq: Seq(1 + next(seq)),
                    });
                }
            }
            let meta = s.chat(&g).unwrap();
            let cached = meta.all_members_cursors();
            assert_eq!(cached, walk(meta), "after {seq} events");
            if cached != before {
                moved_min += 1;
            }
        }
        assert!(moved_min > 100, "the minimum moved only {moved_min} times");
    }

    #[test]
    fn group_media_follows_each_members_visible_range() {
        let g = ChatId(1 << 63 | 6);
        let mut s = ShardState::new(10);
        s.apply(&Record::ChatCreated {
            chat: g,
            kind: ChatKind::Group,
            members: vec![UserId(1), UserId(2)],
            created_ms: 1,
        });
        let mut created = ChatEvent::new(EventKind::GroupCreated);
        created.users = vec![UserId(2)];
        s.apply(&event(g, 1, 1, &created));
        // seq 2 names "early"; user 3 joins at seq 3; user 2 is removed at seq 4; seq 5 names
        // "late".
        s.apply(&msg(g, 2, 1, 2));
        let grant = |seq: u64, id: &str| Record::MediaGrant {
            chat: g,
            seq: Seq(seq),
            media_id: id.to_owned(),
        };
        s.apply(&grant(2, "early"));
        let mut add = ChatEvent::new(EventKind::MembersAdded);
        add.users = vec![UserId(3)];
        s.apply(&event(g, 3, 1, &add));
        let mut remove = ChatEvent::new(EventKind::MembersRemoved);
        remove.users = vec![UserId(2)];
        s.apply(&event(g, 4, 1, &remove));
        s.apply(&msg(g, 5, 1, 5));
        s.apply(&grant(5, "late"));
        s.mark_durable(g, Seq(5));
        let meta = s.chat(&g).unwrap();
        let can = |u: u64, id: &str| meta.media_visible_to(UserId(u), id);
        assert!(can(1, "early") && can(1, "late"));
        // Removed before "late": keeps what it could read.
        assert!(can(2, "early") && !can(2, "late"));
        // Joined after "early".
        assert!(!can(3, "early") && can(3, "late"));
        // Forwarded again after user 3 joined: now visible to it too.
        s.apply(&msg(g, 6, 1, 6));
        s.apply(&grant(6, "early"));
        s.mark_durable(g, Seq(6));
        assert!(s.chat(&g).unwrap().media_visible_to(UserId(3), "early"));
    }

    #[test]
    fn receipt_authors_are_consecutive_bounded_trimmed_and_recovered() {
        let g = ChatId(1 << 63 | 7);
        let mut log = vec![Record::ChatCreated {
            chat: g,
            kind: ChatKind::Group,
            members: vec![UserId(1), UserId(2), UserId(3)],
            created_ms: 1,
        }];
        let mut creation = ChatEvent::new(EventKind::GroupCreated);
        creation.users = vec![UserId(2), UserId(3)];
        log.push(event(g, 1, 1, &creation));
        log.push(msg(g, 2, 2, 2));
        log.push(msg(g, 3, 1, 3));
        log.push(msg(g, 4, 2, 4));
        let mut s = ShardState::new(10);
        for r in &log {
            s.apply(r);
        }
        let authors = |s: &ShardState, from: u64, to: u64| {
            let q = &s.chat(&g).unwrap().receipt_authors;
            q.authors(Seq(from), Seq(to))
        };
        // Events count as messages of the user who made the change; authors listed once each.
        assert_eq!(authors(&s, 1, 4), Some(vec![UserId(1), UserId(2)]));
        assert_eq!(authors(&s, 2, 2), Some(vec![UserId(2)]));
        assert_eq!(authors(&s, 4, 5), None, "seq 5 does not exist");
        // Trimming follows the slowest member's delivered cursor (user 3 at 0, then at 2).
        s.trim_receipt_authors(g);
        assert_eq!(s.chat(&g).unwrap().receipt_authors.len(), 4);
        for (user, seq) in [(3, 2), (2, 4), (1, 4)] {
            let r = Record::Cursor {
                chat: g,
                user: UserId(user),
                device: DeviceId(1),
                kind: CursorKind::Delivered,
                seq: Seq(seq),
            };
            s.apply(&r);
            log.push(r);
        }
        s.trim_receipt_authors(g);
        assert_eq!(authors(&s, 1, 2), None, "received by everyone: dropped");
        assert_eq!(authors(&s, 3, 4), Some(vec![UserId(1), UserId(2)]));
        // Never more than the bound: the oldest go first, the rest stay consecutive.
        let last = 4 + 2 * RECEIPT_AUTHORS_MAX as u64;
        for seq in 5..=last {
            let r = msg(g, seq, 1 + seq % 2, seq);
            s.apply(&r);
            log.push(r);
            assert!(s.chat(&g).unwrap().receipt_authors.len() <= RECEIPT_AUTHORS_MAX);
        }
        let first_kept = last + 1 - RECEIPT_AUTHORS_MAX as u64;
        assert_eq!(authors(&s, first_kept - 1, last), None);
        assert_eq!(
            authors(&s, first_kept, first_kept),
            Some(vec![UserId(1 + first_kept % 2)])
        );
        // Recovery rebuilds the same queue from the log.
        let rebuilt = ShardState::recover(10, &log);
        assert_eq!(
            rebuilt.chat(&g).unwrap().receipt_authors,
            s.chat(&g).unwrap().receipt_authors
        );
        // A group nobody is left in keeps nothing.
        let mut s = rebuilt;
        let mut leave = |user: u64, seq: u64| {
            s.apply(&event(g, seq, user, &ChatEvent::new(EventKind::MemberLeft)));
        };
        for (i, user) in [1, 2, 3].into_iter().enumerate() {
            leave(user, last + 1 + i as u64);
        }
        s.trim_receipt_authors(g);
        assert!(s.chat(&g).unwrap().receipt_authors.is_empty());
        // Direct chats keep no authors (their receipts name the reader).
        let mut d = ShardState::new(10);
        d.apply(&created(CHAT, &[1, 2]));
        d.apply(&msg(CHAT, 1, 1, 1));
        assert!(d.chat(&CHAT).unwrap().receipt_authors.is_empty());
    }
}
