//! Where the engine tells the push thread (`switchboard-push`) about offline recipients. The
//! only coupling between the engine and push; every call here is a non-blocking `try_send`
//! (a full push channel drops the notification and counts it in `PushStats::dropped_busy`:
//! the message itself is durable).
//!
//! ```text
//!  Core::run_effects Fanout (after the commit) ─► on_fanout: members with no online device
//!                                                 ─► PushHandle::notify(user, chat, unread)
//!  Core::run_effects Broadcast(Receipt Read)   ─► on_read: PushHandle::read(user, chat, unread)
//!  Core::handle Online (on the device's core)  ─► on_online: PushHandle::online(user)
//! ```
//!
//! Unread counts come from the owner's state (`next_seq - 1 - member read cursor`), so they
//! also count chat events; the badge is a hint, not an exact count.

use crate::core::Core;
use crate::msg::ConnRef;
use switchboard_push::{MessageEvent, PushHandle};
use switchboard_wire::{ChatId, ContentKind, Message, Receipt, ReceiptKind, UserId};

/// Unread messages of `user` in `chat` after seq `upto`, per the owner shard on this core.
fn unread(core: &Core, chat: ChatId, user: UserId, upto: u64) -> u32 {
    let Some(shard) = core.shards.get(&core.shard_of(chat)) else {
        return 0;
    };
    let owner = shard.owner.borrow();
    let read = owner.state.member_cursors(chat, user).1 .0;
    upto.saturating_sub(read).min(u32::MAX as u64) as u32
}

/// A message is durable and about to be fanned out: queue a push for every member (except
/// the sender) with no connected device. Runs on the chat's owner core.
pub fn on_fanout(core: &Core, push: &PushHandle, msg: &Message, members: &[UserId]) {
    if msg.content_kind == ContentKind::Event || msg.content_kind == ContentKind::Deleted {
        return; // group changes and message actions are not worth waking a phone for
    }
    let dir = core.directory.borrow();
    for user in members {
        if *user == msg.sender_user || !dir.devices(*user).is_empty() {
            continue;
        }
        // A full channel is counted in the push stats (`dropped_busy`).
        push.notify(MessageEvent {
            user: user.0,
            chat: msg.chat.0,
            sender: msg.sender_user.0,
            sender_name: None,
            seq: msg.seq.0,
            unread_in_chat: unread(core, msg.chat, *user, msg.seq.0),
        });
    }
}

/// A read cursor moved (durable): the badge goes down and waiting pushes for that chat go.
pub fn on_receipt(core: &Core, push: &PushHandle, r: &Receipt) {
    if r.kind != ReceiptKind::Read || r.user.0 == 0 {
        return;
    }
    let Some(shard) = core.shards.get(&core.shard_of(r.chat)) else {
        return;
    };
    let last = shard
        .owner
        .borrow()
        .state
        .chat(&r.chat)
        .map_or(0, |m| m.next_seq.0.saturating_sub(1));
    push.read(r.user.0, r.chat.0, last.saturating_sub(r.to.0) as u32);
}

/// A device connected; called once, on the core that owns the connection.
pub fn on_online(core: &Core, push: &PushHandle, user: UserId, conn: ConnRef) {
    if conn.core == core.id {
        push.online(user.0);
    }
}
