//! The encoder is on the hot path (every message is encoded once per fan-out): once its buffer
//! has grown to the largest frame, encoding must not allocate. Its own test binary because it
//! installs a counting global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use switchboard_wire::limits::{GROUP_USERS_MAX, PRESENCE_SUBSCRIPTIONS_MAX};
use switchboard_wire::{
    ChatEvent, ChatId, ClientFrame, ClientMsgId, ContentKind, CreateGroupReq, DeviceId, Encoder,
    ErrorCode, ErrorFrame, EventKind, GroupInfo, GroupOp, GroupUpdateReq, HistoryPage, MemberRole,
    Message, MsgId, Presence, Receipt, ReceiptKind, ReceiptList, SendAck, SendReq, Seq,
    ServerFrame, Target, UserId, Visibility,
};

/// Counts allocations made by the current thread while counting is on, so other test-harness
/// threads cannot disturb the count.
struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            ALLOCS.with(|n| n.set(n.get() + 1));
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    ALLOCS.with(|n| n.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    ALLOCS.with(Cell::get)
}

fn message(seq: u64, len: usize) -> Message {
    Message {
        chat: ChatId(1),
        seq: Seq(seq),
        msg_id: MsgId(seq),
        sender_user: UserId(2),
        sender_device: DeviceId(3),
        timestamp_ms: 4,
        payload: vec![5; len],
        reply_to: Seq(0),
        content_kind: ContentKind::Text,
        client_msg_id: ClientMsgId::from_halves(6, seq),
        forwarded: seq.is_multiple_of(2),
    }
}

#[test]
fn encoding_does_not_allocate_after_warm_up() {
    let id = ClientMsgId::from_halves(1, 2);
    let client = [
        ClientFrame::Send(SendReq {
            client_msg_id: id,
            target: Target::Peer(UserId(9)),
            payload: vec![1; 4096],
            reply_to: Seq(0),
            content_kind: ContentKind::Text,
            forwarded: true,
            media_ids: vec!["m1".to_owned(), "media_2".to_owned()],
        }),
        ClientFrame::Delivered {
            chat: ChatId(1),
            up_to: Seq(2),
        },
        ClientFrame::Read {
            chat: ChatId(1),
            up_to: Seq(2),
        },
        ClientFrame::Sync {
            request_id: 1,
            cursors: (1..500).map(|c| (ChatId(c), Seq(c))).collect(),
        },
        ClientFrame::History {
            request_id: 2,
            chat: ChatId(1),
            before: Seq(0),
            limit: 50,
        },
        ClientFrame::Ping { nonce: 3 },
        ClientFrame::CreateGroup(CreateGroupReq {
            request_id: 3,
            client_msg_id: id,
            name: "group".into(),
            description: "about".into(),
            avatar_media_id: "media/1".into(),
            members: (1..=GROUP_USERS_MAX as u64).map(UserId).collect(),
            admins_only: true,
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            users: (1..=100).map(UserId).collect(),
            ..GroupUpdateReq::new(id, ChatId(1), GroupOp::AddMembers)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            name: Some("n".into()),
            description: Some(String::new()),
            ..GroupUpdateReq::new(id, ChatId(1), GroupOp::SetInfo)
        }),
        ClientFrame::GetGroupInfo {
            request_id: 4,
            chat: ChatId(1),
        },
        ClientFrame::Edit {
            client_msg_id: id,
            chat: ChatId(1),
            target: Seq(1),
            payload: vec![2; 4096],
        },
        ClientFrame::Delete {
            client_msg_id: id,
            chat: ChatId(1),
            target: Seq(1),
        },
        ClientFrame::React {
            client_msg_id: id,
            chat: ChatId(1),
            target: Seq(1),
            reaction: "👍".into(),
        },
        ClientFrame::Typing {
            chat: ChatId(1),
            typing: true,
        },
        ClientFrame::GetReceipts {
            request_id: 5,
            chat: ChatId(1),
            seq: Seq(1),
        },
        ClientFrame::Block {
            request_id: 6,
            user: UserId(2),
            blocked: false,
        },
        ClientFrame::Subscribe {
            request_id: 7,
            users: (1..=PRESENCE_SUBSCRIPTIONS_MAX as u64)
                .map(UserId)
                .collect(),
        },
        ClientFrame::SetPrivacy {
            request_id: 8,
            last_seen: Visibility::Contacts,
            online: Visibility::Nobody,
        },
    ];
    let server = [
        ServerFrame::SendAck(SendAck {
            client_msg_id: id,
            chat: ChatId(1),
            seq: Seq(1),
            msg_id: MsgId(1),
            timestamp_ms: 1,
            duplicate: false,
        }),
        ServerFrame::Message(message(1, 4096)),
        ServerFrame::Receipt(Receipt {
            chat: ChatId(1),
            from: Seq(1),
            to: Seq(2),
            user: UserId(3),
            kind: ReceiptKind::Read,
        }),
        ServerFrame::HistoryPage(HistoryPage {
            request_id: 1,
            chat: ChatId(1),
            messages: (1..=200).rev().map(|s| message(s, 100)).collect(),
            has_more: true,
        }),
        ServerFrame::SyncDone {
            request_id: 1,
            messages: 2,
            more: false,
        },
        ServerFrame::Error(ErrorFrame {
            code: ErrorCode::NotMember,
            text: "x".repeat(1000),
            client_msg_id: Some(id),
            request_id: 0,
        }),
        ServerFrame::Pong { nonce: 1 },
        ServerFrame::GroupInfo(GroupInfo {
            request_id: 3,
            chat: ChatId(1),
            name: "group".into(),
            description: "about".into(),
            avatar_media_id: "media/1".into(),
            members: (1..=GROUP_USERS_MAX as u64)
                .map(|u| (UserId(u), MemberRole::Member))
                .collect(),
            admins_only: false,
            created_ms: 1,
            last_seq: Seq(2),
        }),
        ServerFrame::TypingNotice {
            chat: ChatId(1),
            user: UserId(2),
            typing: true,
        },
        ServerFrame::ReceiptList(ReceiptList {
            request_id: 5,
            chat: ChatId(1),
            seq: Seq(1),
            delivered: (1..=10).map(UserId).collect(),
            read: (11..=20).map(UserId).collect(),
            pending: (21..=30).map(UserId).collect(),
        }),
        ServerFrame::Done { request_id: 6 },
        ServerFrame::Presence(Presence {
            user: UserId(2),
            online: false,
            last_seen_ms: 1_700_000_000_000,
            hidden: false,
        }),
    ];
    let events = [
        ChatEvent {
            users: (1..=GROUP_USERS_MAX as u64).map(UserId).collect(),
            name: Some("group".into()),
            description: Some("about".into()),
            avatar_media_id: Some("media/1".into()),
            ..ChatEvent::new(EventKind::GroupCreated)
        },
        ChatEvent {
            target: Seq(1),
            payload: vec![3; 4096],
            ..ChatEvent::new(EventKind::Edited)
        },
        ChatEvent {
            target: Seq(1),
            reaction: "👍".into(),
            ..ChatEvent::new(EventKind::Reacted)
        },
    ];

    // The counter itself works.
    assert_eq!(
        allocations_during(|| drop(std::hint::black_box(vec![0u8; 8]))),
        1
    );

    let mut enc = Encoder::new();
    let mut total = 0usize;
    // Warm-up: grow the buffer and the page scratch to their largest.
    for f in &client {
        total += enc.encode_client(f).len();
    }
    for f in &server {
        total += enc.encode_server(f).len();
    }
    for e in &events {
        total += enc.encode_event(e).len();
    }

    let n = allocations_during(|| {
        for _ in 0..10 {
            for f in &client {
                total += enc.encode_client(f).len();
            }
            for f in &server {
                total += enc.encode_server(f).len();
            }
            for e in &events {
                total += enc.encode_event(e).len();
            }
        }
    });
    assert!(total > 0);
    assert_eq!(n, 0, "encoding allocated {n} times after warm-up");
}
