//! Groups over real sockets: creation, membership changes as ordered events, permissions,
//! fan-out, aggregated and per-member receipts, typing, multi-device read sync, a 1024-member
//! group.

mod util;

use std::time::Duration;
use switchboard_client::{new_client_msg_id, Client, ClientError};
use switchboard_wire::{
    decode_event, ChatId, ContentKind, ErrorCode, EventKind, GroupOp, GroupUpdateReq, MemberRole,
    Message, Receipt, ReceiptKind, Seq, ServerFrame, Target, UserId,
};
use util::{Server, T};

/// The next `Message` frame; other frames are skipped.
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

/// Asserts no `Message` arrives within `d`.
fn no_message(c: &mut Client, d: Duration) {
    let until = std::time::Instant::now() + d;
    while std::time::Instant::now() < until {
        if let Some(ServerFrame::Message(m)) = c.recv(Duration::from_millis(50)).unwrap() {
            panic!("unexpected message {m:?}");
        }
    }
}

fn event_of(m: &Message) -> EventKind {
    assert_eq!(m.content_kind, ContentKind::Event, "{m:?}");
    decode_event(&m.payload).expect("event").kind
}

fn update(chat: ChatId, op: GroupOp, users: &[u64]) -> GroupUpdateReq {
    let mut r = GroupUpdateReq::new(new_client_msg_id(), chat, op);
    r.users = users.iter().copied().map(UserId).collect();
    r
}

fn server_error(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.code,
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// Lets `Online` broadcasts reach every core before a test relies on live delivery.
fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn create_send_add_remove_leave_in_order() {
    let server = Server::start(3);
    let mut a = server.connect(1, 1);
    let mut b = server.connect(2, 1);
    let mut c = server.connect(3, 1);
    settle();
    let info = a
        .create_group("friends", &[UserId(2), UserId(3)], false, T)
        .unwrap();
    assert!(!info.chat.is_direct());
    assert_eq!(info.name, "friends");
    assert_eq!(info.members[0], (UserId(1), MemberRole::Owner));
    assert_eq!(info.members.len(), 3);
    let chat = info.chat;
    for x in [&mut b, &mut c] {
        let m = next_message(x);
        assert_eq!((m.chat, m.seq), (chat, Seq(1)));
        assert_eq!(event_of(&m), EventKind::GroupCreated);
    }
    // Fan-out of a normal message to every other member.
    let ack = a
        .send_and_wait_ack(Target::Chat(chat), b"hello group", T)
        .unwrap();
    assert_eq!(ack.seq, Seq(2));
    for x in [&mut b, &mut c] {
        assert_eq!(next_message(x).payload, b"hello group");
    }
    // Members cannot change the group; the owner can.
    assert_eq!(
        server_error(b.group_update(update(chat, GroupOp::AddMembers, &[4]), T)),
        ErrorCode::NotAllowed
    );
    let mut d = server.connect(4, 1);
    settle();
    let add = a
        .group_update(update(chat, GroupOp::AddMembers, &[4]), T)
        .unwrap();
    assert_eq!(add.seq, Seq(3));
    for x in [&mut b, &mut c, &mut d] {
        let m = next_message(x);
        assert_eq!((m.seq, event_of(&m)), (Seq(3), EventKind::MembersAdded));
    }
    // The new member sees the chat from the event that added them, not before.
    let page = d.history(chat, Seq(0), 50, T).unwrap();
    assert_eq!(
        page.messages.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
        vec![3]
    );
    // Removal mid-stream: C gets the removal event and nothing after; C's sends are refused.
    let rm = a
        .group_update(update(chat, GroupOp::RemoveMembers, &[3]), T)
        .unwrap();
    let m = next_message(&mut c);
    assert_eq!((m.seq, event_of(&m)), (rm.seq, EventKind::MembersRemoved));
    a.send_and_wait_ack(Target::Chat(chat), b"after removal", T)
        .unwrap();
    assert_eq!(next_message(&mut b).seq, rm.seq); // b sees the removal event first
    assert_eq!(next_message(&mut b).payload, b"after removal");
    no_message(&mut c, Duration::from_millis(300));
    assert_eq!(
        server_error(c.send_and_wait_ack(Target::Chat(chat), b"let me in", T)),
        ErrorCode::NotMember
    );
    // A removed member's fresh device syncs up to (and including) its removal, nothing after.
    let mut c2 = server.connect(3, 2);
    let synced = c2.sync(T).unwrap();
    assert_eq!(synced.last().unwrap().seq, rm.seq);
    // Leave.
    let left = b
        .group_update(update(chat, GroupOp::Leave, &[]), T)
        .unwrap();
    let info = a.group_info(chat, T).unwrap();
    assert_eq!(
        info.members.iter().map(|m| m.0).collect::<Vec<_>>(),
        vec![UserId(1), UserId(4)]
    );
    assert_eq!(info.last_seq, left.seq);
    // Everyone who stayed reads one total order.
    let mut a2 = server.connect(1, 2);
    let all = a2.sync(T).unwrap();
    assert_eq!(
        all.iter().map(|m| m.seq.0).collect::<Vec<_>>(),
        (1..=left.seq.0).collect::<Vec<_>>()
    );
}

#[test]
fn roles_admins_only_and_retried_creation() {
    let server = Server::start(2);
    let mut a = server.connect(10, 1);
    let mut b = server.connect(11, 1);
    let id = new_client_msg_id();
    let req = switchboard_wire::CreateGroupReq {
        request_id: 7,
        client_msg_id: id,
        name: "announcements".into(),
        description: "read only".into(),
        avatar_media_id: String::new(),
        members: vec![UserId(11), UserId(12)],
        admins_only: true,
    };
    let info = a.create_group_with(req.clone(), T).unwrap();
    // A retry of the same creation returns the same group, stores nothing new.
    let again = a.create_group_with(req, T).unwrap();
    assert_eq!((again.chat, again.last_seq), (info.chat, Seq(1)));
    let chat = info.chat;
    assert_eq!(
        server_error(b.send_and_wait_ack(Target::Chat(chat), b"hi", T)),
        ErrorCode::NotAllowed
    );
    a.group_update(update(chat, GroupOp::Promote, &[11]), T)
        .unwrap();
    b.send_and_wait_ack(Target::Chat(chat), b"hi as admin", T)
        .unwrap();
    // Admins may add but only the owner may demote; nobody removes the owner.
    assert_eq!(
        server_error(b.group_update(update(chat, GroupOp::Demote, &[11]), T)),
        ErrorCode::NotAllowed
    );
    assert_eq!(
        server_error(b.group_update(update(chat, GroupOp::RemoveMembers, &[10]), T)),
        ErrorCode::NotAllowed
    );
    let mut info_change = GroupUpdateReq::new(new_client_msg_id(), chat, GroupOp::SetInfo);
    info_change.name = Some("news".into());
    b.group_update(info_change, T).unwrap();
    let mut open = GroupUpdateReq::new(new_client_msg_id(), chat, GroupOp::SetAdminsOnly);
    open.admins_only = false;
    a.group_update(open, T).unwrap();
    let info = b.group_info(chat, T).unwrap();
    assert_eq!((info.name.as_str(), info.admins_only), ("news", false));
    assert!(info.members.contains(&(UserId(11), MemberRole::Admin)));
    // When the owner leaves, the longest-standing admin becomes owner.
    a.group_update(update(chat, GroupOp::Leave, &[]), T)
        .unwrap();
    let info = b.group_info(chat, T).unwrap();
    assert!(
        info.members.contains(&(UserId(11), MemberRole::Owner)),
        "{info:?}"
    );
    // Group state survives a restart (it is rebuilt from the events in the log).
    drop((a, b));
    let mut server = server;
    server.restart();
    let mut b = server.connect(11, 1);
    let after = b.group_info(chat, T).unwrap();
    assert_eq!((after.name, after.members), (info.name, info.members));
}

/// The next aggregated receipt (`user` 0); other frames are skipped.
fn next_aggregate(c: &mut Client) -> Receipt {
    loop {
        match c
            .recv(T)
            .expect("recv")
            .expect("timed out waiting for a receipt")
        {
            ServerFrame::Receipt(r) if r.user == UserId(0) => return r,
            _ => continue,
        }
    }
}

/// Every receipt that arrives within `d` (other frames are skipped).
fn receipts_within(c: &mut Client, d: Duration) -> Vec<Receipt> {
    let until = std::time::Instant::now() + d;
    let mut out = Vec::new();
    while std::time::Instant::now() < until {
        if let Some(ServerFrame::Receipt(r)) = c.recv(Duration::from_millis(50)).unwrap() {
            out.push(r);
        }
    }
    out
}

/// Whether `receipts` hold an aggregated "delivered to every member".
fn has_delivered_aggregate(receipts: &[Receipt]) -> bool {
    receipts
        .iter()
        .any(|r| r.user == UserId(0) && r.kind == ReceiptKind::Delivered)
}

#[test]
fn aggregated_and_per_member_receipts_and_multi_device_reads() {
    let server = Server::start(2);
    let mut a = server.connect(20, 1);
    let mut a_tablet = server.connect(20, 2);
    let mut b = server.connect(21, 1);
    let mut c = server.connect(22, 1);
    let mut c_laptop = server.connect(22, 2);
    settle();
    let chat = a
        .create_group("g", &[UserId(21), UserId(22)], false, T)
        .unwrap()
        .chat;
    for x in [&mut a_tablet, &mut b, &mut c, &mut c_laptop] {
        next_message(x);
    }
    let ack = a.send_and_wait_ack(Target::Chat(chat), b"m", T).unwrap();
    for x in [&mut a_tablet, &mut b, &mut c, &mut c_laptop] {
        assert_eq!(next_message(x).seq, ack.seq);
    }
    b.mark_delivered(chat, ack.seq).unwrap();
    c.mark_read(chat, ack.seq).unwrap();
    // The author hears "delivered to everyone" (of its creation event and its message) on
    // every device. Not "read": b only delivered.
    for x in [&mut a, &mut a_tablet] {
        let r = next_aggregate(x);
        assert_eq!(r.kind, ReceiptKind::Delivered, "{r:?}");
        assert_eq!((r.from, r.to), (Seq(1), ack.seq));
    }
    // The other members wrote nothing in that range: they are not told.
    let seen = receipts_within(&mut b, Duration::from_millis(300));
    assert!(!has_delivered_aggregate(&seen), "{seen:?}");
    let seen = receipts_within(&mut c_laptop, Duration::from_millis(300));
    assert!(!has_delivered_aggregate(&seen), "{seen:?}");
    // C read on its phone: its laptop learns it.
    assert!(
        seen.iter()
            .any(|r| r.user == UserId(22) && r.kind == ReceiptKind::Read && r.to == ack.seq),
        "{seen:?}"
    );
    let list = a.receipts(chat, ack.seq, T).unwrap();
    assert_eq!(
        (
            list.delivered.clone(),
            list.read.clone(),
            list.pending.clone()
        ),
        (vec![UserId(21)], vec![UserId(22)], vec![])
    );
    // "Read by everyone" goes to every member.
    b.mark_read(chat, ack.seq).unwrap();
    for x in [&mut a, &mut a_tablet, &mut c, &mut c_laptop] {
        let r = next_aggregate(x);
        assert_eq!((r.kind, r.from, r.to), (ReceiptKind::Read, Seq(1), ack.seq));
    }
    // B's message: now B (and only B) hears that everyone has it.
    let ack_b = b.send_and_wait_ack(Target::Chat(chat), b"n", T).unwrap();
    for x in [&mut a, &mut a_tablet, &mut c, &mut c_laptop] {
        assert_eq!(next_message(x).seq, ack_b.seq);
    }
    a.mark_delivered(chat, ack_b.seq).unwrap();
    c.mark_delivered(chat, ack_b.seq).unwrap();
    let r = next_aggregate(&mut b);
    assert_eq!(
        (r.kind, r.from, r.to),
        (ReceiptKind::Delivered, ack_b.seq, ack_b.seq)
    );
    for x in [&mut a, &mut a_tablet, &mut c_laptop] {
        let seen = receipts_within(x, Duration::from_millis(300));
        assert!(!has_delivered_aggregate(&seen), "{seen:?}");
    }
}

#[test]
fn typing_is_forwarded_throttled_and_dropped_in_big_groups() {
    let server = Server::start(2);
    let mut a = server.connect(30, 1);
    let mut b = server.connect(31, 1);
    settle();
    let chat = a
        .create_group("small", &[UserId(31)], false, T)
        .unwrap()
        .chat;
    next_message(&mut b);
    a.typing(chat, true).unwrap();
    a.typing(chat, true).unwrap(); // within the throttle interval: dropped
    a.typing(chat, false).unwrap();
    let mut notices = Vec::new();
    let until = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < until {
        if let Some(ServerFrame::TypingNotice {
            chat: c,
            user,
            typing,
        }) = b.recv(Duration::from_millis(50)).unwrap()
        {
            assert_eq!((c, user), (chat, UserId(30)));
            notices.push(typing);
        }
    }
    assert_eq!(notices, vec![true, false]);
    // A group over typing_group_members_max (20) gets no typing notices.
    let members: Vec<UserId> = (31..=60).map(UserId).collect();
    let big = a.create_group("big", &members, false, T).unwrap().chat;
    next_message(&mut b);
    a.typing(big, true).unwrap();
    let until = std::time::Instant::now() + Duration::from_millis(300);
    while std::time::Instant::now() < until {
        if let Some(ServerFrame::TypingNotice { .. }) = b.recv(Duration::from_millis(50)).unwrap() {
            panic!("typing in a big group");
        }
    }
}

#[test]
fn a_1024_member_group_fans_out_and_syncs() {
    let server = Server::start(2);
    let mut owner = server.connect(1000, 1);
    let members: Vec<UserId> = (1001..2024).map(UserId).collect();
    assert_eq!(members.len(), 1023);
    let online: Vec<u64> = vec![1001, 1500, 2023];
    let mut clients: Vec<Client> = online.iter().map(|u| server.connect(*u, 1)).collect();
    settle();
    let info = owner.create_group("everyone", &members, false, T).unwrap();
    assert_eq!(info.members.len(), 1024);
    // One more member is refused: the limit is 1024.
    assert_eq!(
        server_error(owner.group_update(update(info.chat, GroupOp::AddMembers, &[5000]), T)),
        ErrorCode::GroupFull
    );
    for i in 0..20u32 {
        owner
            .send_and_wait_ack(Target::Chat(info.chat), &i.to_be_bytes(), T)
            .unwrap();
    }
    for c in clients.iter_mut() {
        assert_eq!(next_message(c).seq, Seq(1));
        for i in 0..20u32 {
            assert_eq!(next_message(c).payload, i.to_be_bytes());
        }
    }
    // An offline member gets all of it through sync.
    let mut late = server.connect(1777, 1);
    let msgs = late.sync(T).unwrap();
    assert_eq!(msgs.len(), 21);
}

#[test]
fn typing_skips_members_who_blocked_the_typer_and_reads_move_every_device() {
    let server = Server::start(2);
    let mut a = server.connect(40, 1);
    let mut b = server.connect(41, 1);
    let mut c = server.connect(42, 1);
    settle();
    let chat = a
        .create_group("g", &[UserId(41), UserId(42)], false, T)
        .unwrap()
        .chat;
    b.block(UserId(40), true, T).unwrap();
    settle(); // the block reaches every core's replica
    a.typing(chat, true).unwrap();
    let mut c_saw = false;
    let until = std::time::Instant::now() + Duration::from_millis(500);
    while std::time::Instant::now() < until {
        if let Some(ServerFrame::TypingNotice { user, .. }) =
            c.recv(Duration::from_millis(50)).unwrap()
        {
            assert_eq!(user, UserId(40));
            c_saw = true;
        }
        if let Some(ServerFrame::TypingNotice { .. }) = b.recv(Duration::from_millis(10)).unwrap() {
            panic!("typing shown to a member who blocked the typer");
        }
    }
    assert!(c_saw);
    // C reads on its phone; its laptop's stored cursor moves too, so the laptop's next sync
    // (with no cursors of its own) starts after what the phone read.
    let mut laptop = server.connect(42, 2);
    let mut last = Seq(0);
    for i in 0..5u32 {
        last = a
            .send_and_wait_ack(Target::Chat(chat), &i.to_be_bytes(), T)
            .unwrap()
            .seq;
    }
    laptop.mark_delivered(chat, Seq(1)).unwrap();
    laptop.ping_pong(1, T).unwrap();
    // The pong only says the laptop's core routed the cursor; it may still be on its way to the
    // chat's owner on another core, where C's read (from a third connection) could overtake it.
    std::thread::sleep(Duration::from_millis(100));
    c.mark_read(chat, Seq(last.0 - 1)).unwrap();
    c.ping_pong(2, T).unwrap();
    drop(laptop);
    std::thread::sleep(Duration::from_millis(100));
    let mut laptop = server.connect(42, 2);
    let msgs = laptop.sync(T).unwrap();
    assert_eq!(msgs.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![last]);
}
