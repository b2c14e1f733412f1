//! Message actions over real sockets: edit, delete for everyone (content purged from disk),
//! reactions, replies and forwards; seen live and through sync, and after a restart.

mod util;

use std::time::Duration;
use switchboard_client::{Client, ClientError};
use switchboard_wire::{
    decode_event, ClientFrame, ContentKind, ErrorCode, EventKind, Message, SendReq, Seq,
    ServerFrame, Target, UserId,
};
use util::{Server, T};

fn next_message(c: &mut Client) -> Message {
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

fn server_error(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Whether any log segment of the server contains `needle`.
fn on_disk(server: &Server, needle: &[u8]) -> bool {
    server.segments().iter().any(|p| {
        let bytes = std::fs::read(p).unwrap();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

#[test]
fn edit_delete_react_live_through_sync_and_after_restart() {
    let mut server = Server::start(2);
    let mut a = server.connect(1, 1);
    let mut b = server.connect(2, 1);
    std::thread::sleep(Duration::from_millis(100));
    let secret = b"original-secret-content-7f3a";
    let ack = a
        .send_and_wait_ack(Target::Peer(UserId(2)), secret, T)
        .unwrap();
    let chat = ack.chat;
    assert_eq!(next_message(&mut b).payload, secret);
    // Edit: an event in the chat's order; only the author may edit.
    let edited = b"edited-secret-content-9c1d";
    let e = a.edit(chat, ack.seq, edited, T).unwrap();
    assert_eq!(e.seq, Seq(2));
    let m = next_message(&mut b);
    assert_eq!(m.content_kind, ContentKind::Event);
    let ev = decode_event(&m.payload).unwrap();
    assert_eq!(
        (ev.kind, ev.target, &ev.payload[..]),
        (EventKind::Edited, ack.seq, &edited[..])
    );
    assert_eq!(
        server_error(b.edit(chat, ack.seq, b"not mine", T)),
        ErrorCode::NotAllowed
    );
    // Reactions: any member; empty removes.
    let r = b.react(chat, ack.seq, "👍", T).unwrap();
    let ev = decode_event(&next_message(&mut a).payload).unwrap();
    assert_eq!(
        (ev.kind, ev.target, ev.reaction.as_str()),
        (EventKind::Reacted, ack.seq, "👍")
    );
    b.react(chat, ack.seq, "", T).unwrap();
    assert_eq!(
        decode_event(&next_message(&mut a).payload)
            .unwrap()
            .reaction,
        ""
    );
    assert!(r.seq > e.seq);
    // Replies and forwards are flags on a normal send.
    b.send(&ClientFrame::Send(SendReq {
        client_msg_id: switchboard_client::new_client_msg_id(),
        target: Target::Chat(chat),
        payload: b"re".to_vec(),
        reply_to: ack.seq,
        content_kind: ContentKind::Text,
        forwarded: true,
        media_ids: Vec::new(),
    }))
    .unwrap();
    let reply = next_message(&mut a);
    assert_eq!((reply.reply_to, reply.forwarded), (ack.seq, true));
    // Delete for everyone: only the author; the content (and its edit) is purged from disk.
    assert_eq!(
        server_error(b.delete(chat, ack.seq, T)),
        ErrorCode::NotAllowed
    );
    assert!(on_disk(&server, secret) && on_disk(&server, edited));
    let d = a.delete(chat, ack.seq, T).unwrap();
    let ev = decode_event(&next_message(&mut b).payload).unwrap();
    assert_eq!((ev.kind, ev.target), (EventKind::Deleted, ack.seq));
    a.ping_pong(1, T).unwrap(); // the purge runs right after the event is durable
    assert!(!on_disk(&server, secret), "deleted content still on disk");
    assert!(
        !on_disk(&server, edited),
        "edited content of a deleted message still on disk"
    );
    assert_eq!(
        server_error(a.edit(chat, ack.seq, b"too late", T)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        server_error(b.react(chat, ack.seq, "😮", T)),
        ErrorCode::InvalidArgument
    );
    // A fresh device sees the tombstone and every event in order.
    let check = |msgs: &[Message]| {
        // The message and the edit that carried its newer content are tombstones now.
        for seq in [ack.seq, e.seq] {
            let m = msgs.iter().find(|m| m.seq == seq).unwrap();
            assert_eq!(m.content_kind, ContentKind::Deleted, "{m:?}");
            assert!(m.payload.is_empty());
        }
        let kinds: Vec<_> = msgs
            .iter()
            .filter(|m| m.content_kind == ContentKind::Event)
            .map(|m| decode_event(&m.payload).unwrap().kind)
            .collect();
        assert_eq!(
            kinds,
            vec![EventKind::Reacted, EventKind::Reacted, EventKind::Deleted]
        );
        assert_eq!(msgs.last().unwrap().seq, d.seq);
        assert_eq!(msgs.len() as u64, d.seq.0);
    };
    let mut b2 = server.connect(2, 2);
    check(&b2.sync(T).unwrap());
    // Retrying an action with its client_msg_id is answered, not applied twice.
    server.restart();
    let mut b3 = server.connect(2, 3);
    check(&b3.sync(T).unwrap());
    assert!(!on_disk(&server, secret));
}

#[test]
fn edit_window_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "edit_window_secs = 1\n").unwrap();
    let server = Server::start_with(1, &["--config", cfg.to_str().unwrap()]);
    let mut a = server.connect(10, 1);
    let ack = a
        .send_and_wait_ack(Target::Peer(UserId(11)), b"x", T)
        .unwrap();
    a.edit(ack.chat, ack.seq, b"y", T).unwrap();
    std::thread::sleep(Duration::from_millis(1300));
    assert_eq!(
        server_error(a.edit(ack.chat, ack.seq, b"z", T)),
        ErrorCode::NotAllowed
    );
    // Acting on an event or a message that does not exist is refused.
    assert_eq!(
        server_error(a.react(ack.chat, Seq(2), "x", T)),
        ErrorCode::InvalidArgument
    );
    assert_eq!(
        server_error(a.react(ack.chat, Seq(99), "x", T)),
        ErrorCode::InvalidArgument
    );
}

/// A crash after the `Deleted` event became durable but before the purge ran: the next start
/// finishes the purge. Simulated by appending the event to the log directly while the server is
/// down.
#[test]
fn an_interrupted_purge_is_completed_at_start() {
    use switchboard_storage::{
        EmbeddedStore, Record, StoreConfig, StoredMessage, CONTENT_KIND_EVENT,
    };
    use switchboard_wire::{ChatEvent, ClientMsgId, DeviceId, MsgId};
    let mut server = Server::start(1);
    let mut a = server.connect(30, 1);
    let secret = b"purge-me-at-start-4b2e";
    let ack = a
        .send_and_wait_ack(Target::Peer(UserId(31)), secret, T)
        .unwrap();
    drop(a);
    server.kill9();
    server.wait_stale_listeners_gone();
    let shard_dir = server.data_dir.join("shard-0");
    glommio::LocalExecutorBuilder::default()
        .make()
        .unwrap()
        .run(async {
            let (store, _) = EmbeddedStore::open(&shard_dir, StoreConfig::default())
                .await
                .unwrap();
            let mut ev = ChatEvent::new(EventKind::Deleted);
            ev.target = ack.seq;
            let deleted = Record::Message(StoredMessage {
                chat: ack.chat,
                seq: Seq(ack.seq.0 + 1),
                msg_id: MsgId(ack.msg_id.0 + 1),
                sender_user: UserId(30),
                sender_device: DeviceId(1),
                timestamp_ms: ack.timestamp_ms,
                client_msg_id: ClientMsgId::from_halves(9, 9),
                reply_to: Seq(0),
                content_kind: CONTENT_KIND_EVENT,
                flags: 0,
                payload: switchboard_wire::encode_event(&ev),
            });
            store.append(&[deleted]).await.unwrap();
            store.close().await.unwrap();
        });
    assert!(on_disk(&server, secret));
    server.restart();
    assert!(
        !on_disk(&server, secret),
        "the purge was not completed at start"
    );
    let mut b = server.connect(31, 1);
    let msgs = b.sync(T).unwrap();
    assert_eq!(msgs[0].content_kind, ContentKind::Deleted);
    assert!(msgs[0].payload.is_empty());
}
