//! Helpers shared by the storage integration tests.

use std::future::Future;
use switchboard_storage::{ChatKind, Record, StoredMessage};
use switchboard_wire::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};

/// Runs `f` on a fresh executor, then gives the reactor a few cycles so files the future dropped
/// without `close()` are really closed (glommio closes them on its next I/O cycle). The next
/// `open` of the same shard needs that: its segments are `flock`ed while open.
pub fn run<T>(f: impl Future<Output = T>) -> T {
    glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor")
        .run(async {
            let out = f.await;
            for _ in 0..3 {
                glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
            }
            out
        })
}

/// The record that creates direct chat `chat` between users 1 and 2.
pub fn created(chat: ChatId) -> Record {
    Record::ChatCreated {
        chat,
        kind: ChatKind::Direct,
        members: vec![UserId(1), UserId(2)],
        created_ms: 42,
    }
}

/// Message `seq` of `chat` (senders alternate between users 1 and 2) carrying `payload`.
pub fn message_with(chat: ChatId, seq: u64, payload: Vec<u8>) -> StoredMessage {
    StoredMessage {
        chat,
        seq: Seq(seq),
        msg_id: MsgId(chat.0 * 1_000_000 + seq),
        sender_user: UserId(1 + seq % 2),
        sender_device: DeviceId(1),
        timestamp_ms: 1_700_000_000_000 + seq,
        client_msg_id: ClientMsgId::from_halves(chat.0, seq),
        reply_to: Seq(seq.saturating_sub(1)),
        content_kind: 1,
        flags: 0,
        payload,
    }
}
