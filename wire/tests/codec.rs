//! Data-driven codec tests: every case is a row `(name, input bytes, expected result)` fed to
//! `check`. Rows that need a frame our encoder never produces (a rule broken, an unknown union
//! member) build the envelope by hand with the generated builders in `raw`.

use flatbuffers::FlatBufferBuilder;
use switchboard_wire::limits::{
    EDIT_PAYLOAD_BYTES_MAX, ERROR_TEXT_BYTES_MAX, FRAME_BYTES_MAX, GROUP_DESCRIPTION_BYTES_MAX,
    GROUP_NAME_BYTES_MAX, GROUP_USERS_MAX, HISTORY_PAGE_MESSAGES_DEFAULT,
    HISTORY_PAGE_MESSAGES_MAX, MEDIA_ID_BYTES_MAX, PAYLOAD_BYTES_MAX, PRESENCE_SUBSCRIPTIONS_MAX,
    REACTION_BYTES_MAX, SEND_MEDIA_IDS_MAX, SEND_MEDIA_ID_BYTES_MAX, SERVER_FRAME_BYTES_MAX,
    SYNC_CURSORS_MAX,
};
use switchboard_wire::{
    decode_client, decode_event, decode_server, encode_event, fb, ChatEvent, ChatId, ClientFrame,
    ClientMsgId, ContentKind, CreateGroupReq, DecodeError, DeviceId, Encoder, ErrorCode,
    ErrorFrame, EventKind, GroupInfo, GroupOp, GroupUpdateReq, HistoryPage, MemberRole, Message,
    MsgId, Presence, Receipt, ReceiptKind, ReceiptList, SendAck, SendReq, Seq, ServerFrame, Target,
    UserId, Visibility, EVENT_IDENTIFIER,
};

// ------------------------------------------------------------------------------ test harness

/// What decoding one input must give.
#[derive(Debug)]
enum Expect<F> {
    Ok(F),
    Err(DecodeError),
    /// Any `DecodeError::Verify`: the verifier's text is not part of the contract.
    Malformed,
}

fn check<F: PartialEq + std::fmt::Debug>(
    name: &str,
    decode: fn(&[u8]) -> Result<F, DecodeError>,
    input: &[u8],
    expect: Expect<F>,
) {
    let got = decode(input);
    match (&got, &expect) {
        (Ok(g), Expect::Ok(e)) if g == e => {}
        (Err(g), Expect::Err(e)) if g == e => {}
        (Err(DecodeError::Verify(why)), Expect::Malformed) => {
            assert!(!why.is_empty(), "{name}: empty verifier text");
            assert_eq!(got.as_ref().unwrap_err().code(), ErrorCode::MalformedFrame);
        }
        _ => panic!("{name}:\n  got    {got:?}\n  expect {expect:?}"),
    }
    if let Err(e) = &got {
        // Every error renders as one non-empty line, the form it takes in an Error frame.
        let text = e.to_string();
        assert!(
            !text.is_empty() && !text.contains('\n'),
            "{name}: display {text:?}"
        );
    }
}

fn enc_client(f: &ClientFrame) -> Vec<u8> {
    Encoder::new().encode_client(f).to_vec()
}

fn enc_server(f: &ServerFrame) -> Vec<u8> {
    Encoder::new().encode_server(f).to_vec()
}

fn id(n: u64) -> ClientMsgId {
    ClientMsgId::from_halves(
        0xdead_beef_0000_0000 | n,
        n.wrapping_mul(0x9e37_79b9_7f4a_7c15),
    )
}

fn send(target: Target, payload: Vec<u8>) -> SendReq {
    SendReq {
        client_msg_id: id(1),
        target,
        payload,
        reply_to: Seq(0),
        content_kind: ContentKind::Text,
        forwarded: false,
        media_ids: Vec::new(),
    }
}

fn msg(chat: u64, seq: u64, payload_len: usize) -> Message {
    Message {
        chat: ChatId(chat),
        seq: Seq(seq),
        msg_id: MsgId(1_000 + seq),
        sender_user: UserId(7),
        sender_device: DeviceId(2),
        timestamp_ms: 1_700_000_000_000 + seq,
        payload: (0..payload_len).map(|i| i as u8).collect(),
        reply_to: Seq(seq / 2),
        content_kind: ContentKind::Media,
        client_msg_id: id(seq),
        forwarded: false,
    }
}

fn users(range: std::ops::RangeInclusive<u64>) -> Vec<UserId> {
    range.map(UserId).collect()
}

fn create_group() -> CreateGroupReq {
    CreateGroupReq {
        request_id: 11,
        client_msg_id: id(11),
        name: "Climbing 🧗".into(),
        description: "Tuesdays and Thursdays".into(),
        avatar_media_id: "media/abc123".into(),
        members: users(2..=5),
        admins_only: false,
    }
}

fn update(op: GroupOp) -> GroupUpdateReq {
    GroupUpdateReq::new(id(12), ChatId((1 << 63) | 5), op)
}

fn group_info() -> GroupInfo {
    GroupInfo {
        request_id: 11,
        chat: ChatId((1 << 63) | 5),
        name: "Climbing 🧗".into(),
        description: "Tuesdays and Thursdays".into(),
        avatar_media_id: "media/abc123".into(),
        members: vec![
            (UserId(1), MemberRole::Owner),
            (UserId(2), MemberRole::Admin),
            (UserId(3), MemberRole::Member),
        ],
        admins_only: true,
        created_ms: 1_700_000_000_000,
        last_seq: Seq(17),
    }
}

fn receipt_list() -> ReceiptList {
    ReceiptList {
        request_id: 13,
        chat: ChatId((1 << 63) | 5),
        seq: Seq(4),
        delivered: users(2..=3),
        read: users(4..=4),
        pending: users(5..=9),
    }
}

/// One valid frame of every kind, plus edge values; also the fuzz seed corpus.
fn client_frames() -> Vec<ClientFrame> {
    vec![
        ClientFrame::Send(send(Target::Chat(ChatId(42)), b"hello".to_vec())),
        ClientFrame::Send(send(Target::Peer(UserId(u64::MAX)), Vec::new())),
        ClientFrame::Send(SendReq {
            reply_to: Seq(9),
            content_kind: ContentKind(77), // unknown to this version: passes through
            ..send(Target::Chat(ChatId(1)), vec![0xff; 300])
        }),
        ClientFrame::Send(send(Target::Chat(ChatId(3)), vec![1; PAYLOAD_BYTES_MAX])),
        ClientFrame::Delivered {
            chat: ChatId(5),
            up_to: Seq(1),
        },
        ClientFrame::Read {
            chat: ChatId(u64::MAX),
            up_to: Seq(u64::MAX),
        },
        ClientFrame::Sync {
            request_id: 0,
            cursors: Vec::new(),
        },
        ClientFrame::Sync {
            request_id: 9,
            cursors: vec![(ChatId(1), Seq(0)), (ChatId(2), Seq(17))],
        },
        ClientFrame::Sync {
            request_id: u32::MAX,
            cursors: (1..=SYNC_CURSORS_MAX as u64)
                .map(|c| (ChatId(c), Seq(c * 3)))
                .collect(),
        },
        ClientFrame::History {
            request_id: 3,
            chat: ChatId(8),
            before: Seq(0),
            limit: 1,
        },
        ClientFrame::History {
            request_id: 4,
            chat: ChatId(8),
            before: Seq(100),
            limit: HISTORY_PAGE_MESSAGES_MAX,
        },
        ClientFrame::Ping { nonce: 0 },
        ClientFrame::Ping { nonce: u64::MAX },
        ClientFrame::Send(SendReq {
            forwarded: true,
            ..send(Target::Chat(ChatId(2)), b"fwd".to_vec())
        }),
        ClientFrame::Send(SendReq {
            media_ids: vec!["AbC_-09".to_owned(), "x".repeat(SEND_MEDIA_ID_BYTES_MAX)],
            ..send(Target::Chat(ChatId(2)), b"photo".to_vec())
        }),
        ClientFrame::Send(SendReq {
            media_ids: (0..SEND_MEDIA_IDS_MAX).map(|i| format!("m{i}")).collect(),
            ..send(Target::Peer(UserId(2)), b"album".to_vec())
        }),
        ClientFrame::CreateGroup(create_group()),
        // Only what is required: a name.
        ClientFrame::CreateGroup(CreateGroupReq {
            request_id: 0,
            name: "g".into(),
            description: String::new(),
            avatar_media_id: String::new(),
            members: Vec::new(),
            ..create_group()
        }),
        // Every field at its limit.
        ClientFrame::CreateGroup(CreateGroupReq {
            request_id: u32::MAX,
            name: "é".repeat(GROUP_NAME_BYTES_MAX / 2),
            description: "d".repeat(GROUP_DESCRIPTION_BYTES_MAX),
            avatar_media_id: "a".repeat(MEDIA_ID_BYTES_MAX),
            members: users(1..=GROUP_USERS_MAX as u64),
            admins_only: true,
            ..create_group()
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            users: vec![UserId(u64::MAX)],
            ..update(GroupOp::AddMembers)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            users: users(7..=8),
            ..update(GroupOp::RemoveMembers)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            users: users(1..=GROUP_USERS_MAX as u64),
            ..update(GroupOp::Promote)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            users: vec![UserId(3)],
            ..update(GroupOp::Demote)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            name: Some("new name".into()),
            ..update(GroupOp::SetInfo)
        }),
        // Present but empty: clears the description.
        ClientFrame::GroupUpdate(GroupUpdateReq {
            description: Some(String::new()),
            ..update(GroupOp::SetInfo)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            name: Some("n".repeat(GROUP_NAME_BYTES_MAX)),
            description: Some("€".repeat(GROUP_DESCRIPTION_BYTES_MAX / 3)),
            avatar_media_id: Some("a".repeat(MEDIA_ID_BYTES_MAX)),
            ..update(GroupOp::SetInfo)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            avatar_media_id: Some(String::new()),
            ..update(GroupOp::SetInfo)
        }),
        ClientFrame::GroupUpdate(GroupUpdateReq {
            admins_only: true,
            ..update(GroupOp::SetAdminsOnly)
        }),
        ClientFrame::GroupUpdate(update(GroupOp::SetAdminsOnly)),
        ClientFrame::GroupUpdate(update(GroupOp::Leave)),
        ClientFrame::GetGroupInfo {
            request_id: 0,
            chat: ChatId(u64::MAX),
        },
        ClientFrame::Edit {
            client_msg_id: id(20),
            chat: ChatId(42),
            target: Seq(3),
            payload: b"fixed typo".to_vec(),
        },
        ClientFrame::Edit {
            client_msg_id: id(21),
            chat: ChatId(42),
            target: Seq(u64::MAX),
            payload: Vec::new(),
        },
        ClientFrame::Edit {
            client_msg_id: id(22),
            chat: ChatId(42),
            target: Seq(1),
            payload: vec![3; EDIT_PAYLOAD_BYTES_MAX],
        },
        ClientFrame::Delete {
            client_msg_id: id(23),
            chat: ChatId(42),
            target: Seq(1),
        },
        ClientFrame::React {
            client_msg_id: id(24),
            chat: ChatId(42),
            target: Seq(2),
            reaction: "👍🏽".into(),
        },
        // Empty: removes the reaction.
        ClientFrame::React {
            client_msg_id: id(25),
            chat: ChatId(42),
            target: Seq(2),
            reaction: String::new(),
        },
        ClientFrame::React {
            client_msg_id: id(26),
            chat: ChatId(42),
            target: Seq(2),
            reaction: "😀".repeat(REACTION_BYTES_MAX / 4),
        },
        ClientFrame::Typing {
            chat: ChatId(42),
            typing: true,
        },
        ClientFrame::Typing {
            chat: ChatId(42),
            typing: false,
        },
        ClientFrame::GetReceipts {
            request_id: 5,
            chat: ChatId(42),
            seq: Seq(1),
        },
        ClientFrame::GetReceipts {
            request_id: u32::MAX,
            chat: ChatId(u64::MAX),
            seq: Seq(u64::MAX),
        },
        ClientFrame::Block {
            request_id: 6,
            user: UserId(9),
            blocked: true,
        },
        ClientFrame::Block {
            request_id: 0,
            user: UserId(u64::MAX),
            blocked: false,
        },
        // Empty: clears the subscriptions.
        ClientFrame::Subscribe {
            request_id: 7,
            users: Vec::new(),
        },
        // Duplicates pass through; the server removes them.
        ClientFrame::Subscribe {
            request_id: 8,
            users: vec![UserId(3), UserId(u64::MAX), UserId(3)],
        },
        ClientFrame::Subscribe {
            request_id: u32::MAX,
            users: users(1..=PRESENCE_SUBSCRIPTIONS_MAX as u64),
        },
        ClientFrame::SetPrivacy {
            request_id: 9,
            last_seen: Visibility::Everyone,
            online: Visibility::Everyone,
        },
        ClientFrame::SetPrivacy {
            request_id: 10,
            last_seen: Visibility::Contacts,
            online: Visibility::Nobody,
        },
        ClientFrame::SetPrivacy {
            request_id: 0,
            last_seen: Visibility::Nobody,
            online: Visibility::Contacts,
        },
    ]
}

fn server_frames() -> Vec<ServerFrame> {
    vec![
        ServerFrame::SendAck(SendAck {
            client_msg_id: id(3),
            chat: ChatId(42),
            seq: Seq(1),
            msg_id: MsgId(99),
            timestamp_ms: 1_700_000_000_123,
            duplicate: false,
        }),
        ServerFrame::SendAck(SendAck {
            client_msg_id: id(4),
            chat: ChatId(42),
            seq: Seq(2),
            msg_id: MsgId(100),
            timestamp_ms: 0,
            duplicate: true,
        }),
        ServerFrame::Message(msg(42, 1, 0)),
        ServerFrame::Message(msg(42, 2, 100)),
        ServerFrame::Message(Message {
            client_msg_id: ClientMsgId::default(),
            ..msg(42, 3, 10)
        }),
        ServerFrame::Message(Message {
            content_kind: ContentKind(200),
            ..msg(1, 1, 1)
        }),
        ServerFrame::Message(msg(42, 4, PAYLOAD_BYTES_MAX)),
        ServerFrame::Receipt(Receipt {
            chat: ChatId(42),
            from: Seq(1),
            to: Seq(1),
            user: UserId(9),
            kind: ReceiptKind::Delivered,
        }),
        ServerFrame::Receipt(Receipt {
            chat: ChatId(42),
            from: Seq(3),
            to: Seq(u64::MAX),
            user: UserId(9),
            kind: ReceiptKind::Read,
        }),
        ServerFrame::HistoryPage(HistoryPage {
            request_id: 5,
            chat: ChatId(42),
            messages: Vec::new(),
            has_more: false,
        }),
        ServerFrame::HistoryPage(HistoryPage {
            request_id: 6,
            chat: ChatId(42),
            messages: (1..=HISTORY_PAGE_MESSAGES_MAX as u64)
                .rev()
                .map(|s| msg(42, s, 64))
                .collect(),
            has_more: true,
        }),
        ServerFrame::SyncDone {
            request_id: 7,
            messages: 0,
            more: false,
        },
        ServerFrame::SyncDone {
            request_id: 8,
            messages: 5000,
            more: true,
        },
        ServerFrame::Error(ErrorFrame {
            code: ErrorCode::NotMember,
            text: "not a member of chat 42".into(),
            client_msg_id: Some(id(5)),
            request_id: 0,
        }),
        ServerFrame::Error(ErrorFrame {
            code: ErrorCode::TooManyCursors,
            text: String::new(),
            client_msg_id: None,
            request_id: 77,
        }),
        ServerFrame::Error(ErrorFrame {
            code: ErrorCode::Internal,
            text: "é".repeat(ERROR_TEXT_BYTES_MAX / 2), // exactly at the limit
            client_msg_id: None,
            request_id: 0,
        }),
        ServerFrame::Pong { nonce: 0 },
        ServerFrame::Pong { nonce: 12345 },
        ServerFrame::Message(Message {
            forwarded: true,
            ..msg(42, 5, 3)
        }),
        // An event occupies a seq like any message; its payload is a "SWE1" buffer.
        ServerFrame::Message(Message {
            content_kind: ContentKind::Event,
            payload: encode_event(&ChatEvent {
                users: users(2..=3),
                ..ChatEvent::new(EventKind::MembersAdded)
            }),
            client_msg_id: ClientMsgId::default(),
            ..msg(42, 6, 0)
        }),
        // A purged message: only the ids are left.
        ServerFrame::Message(Message {
            content_kind: ContentKind::Deleted,
            ..msg(42, 7, 0)
        }),
        ServerFrame::GroupInfo(group_info()),
        ServerFrame::GroupInfo(GroupInfo {
            request_id: 0,
            name: String::new(),
            description: String::new(),
            avatar_media_id: String::new(),
            members: Vec::new(),
            admins_only: false,
            created_ms: 0,
            last_seq: Seq(0),
            ..group_info()
        }),
        // A role a newer server added passes through.
        ServerFrame::GroupInfo(GroupInfo {
            members: vec![(UserId(1), MemberRole(9))],
            ..group_info()
        }),
        ServerFrame::GroupInfo(GroupInfo {
            members: (1..=GROUP_USERS_MAX as u64)
                .map(|u| (UserId(u), MemberRole::Member))
                .collect(),
            ..group_info()
        }),
        ServerFrame::TypingNotice {
            chat: ChatId(42),
            user: UserId(7),
            typing: true,
        },
        ServerFrame::TypingNotice {
            chat: ChatId(u64::MAX),
            user: UserId(u64::MAX),
            typing: false,
        },
        ServerFrame::ReceiptList(receipt_list()),
        ServerFrame::ReceiptList(ReceiptList {
            delivered: Vec::new(),
            read: Vec::new(),
            pending: Vec::new(),
            ..receipt_list()
        }),
        ServerFrame::ReceiptList(ReceiptList {
            delivered: users(1..=GROUP_USERS_MAX as u64),
            read: users(1..=GROUP_USERS_MAX as u64),
            pending: users(1..=GROUP_USERS_MAX as u64),
            ..receipt_list()
        }),
        ServerFrame::Done { request_id: 0 },
        ServerFrame::Done {
            request_id: u32::MAX,
        },
        ServerFrame::Presence(Presence {
            user: UserId(9),
            online: true,
            last_seen_ms: 1_700_000_000_000,
            hidden: false,
        }),
        ServerFrame::Presence(Presence {
            user: UserId(u64::MAX),
            online: false,
            last_seen_ms: u64::MAX,
            hidden: false,
        }),
        // Online shown, last seen hidden.
        ServerFrame::Presence(Presence {
            user: UserId(9),
            online: true,
            last_seen_ms: 0,
            hidden: true,
        }),
        ServerFrame::Presence(Presence {
            user: UserId(1),
            online: false,
            last_seen_ms: 0,
            hidden: true,
        }),
        ServerFrame::PrekeysLow {
            device: DeviceId(1),
            remaining: 9,
        },
        ServerFrame::PrekeysLow {
            device: DeviceId(u32::MAX),
            remaining: 0,
        },
    ]
}

/// One event of every kind, plus edge values; also part of the mutation corpus.
fn events() -> Vec<ChatEvent> {
    vec![
        ChatEvent {
            users: users(2..=5),
            name: Some("Climbing".into()),
            description: Some("Tuesdays".into()),
            avatar_media_id: Some("media/1".into()),
            admins_only: true,
            ..ChatEvent::new(EventKind::GroupCreated)
        },
        // Created without members, description or avatar.
        ChatEvent {
            name: Some("g".into()),
            ..ChatEvent::new(EventKind::GroupCreated)
        },
        ChatEvent {
            users: vec![UserId(u64::MAX)],
            ..ChatEvent::new(EventKind::MembersAdded)
        },
        ChatEvent {
            users: users(3..=4),
            ..ChatEvent::new(EventKind::MembersRemoved)
        },
        ChatEvent::new(EventKind::MemberLeft),
        ChatEvent {
            name: Some("renamed".into()),
            ..ChatEvent::new(EventKind::InfoChanged)
        },
        // Present and empty: the description was cleared.
        ChatEvent {
            description: Some(String::new()),
            avatar_media_id: Some(String::new()),
            ..ChatEvent::new(EventKind::InfoChanged)
        },
        ChatEvent {
            users: vec![UserId(2)],
            role: MemberRole::Admin,
            ..ChatEvent::new(EventKind::RolesChanged)
        },
        ChatEvent {
            users: vec![UserId(2)],
            role: MemberRole::Owner,
            ..ChatEvent::new(EventKind::RolesChanged)
        },
        ChatEvent {
            admins_only: true,
            ..ChatEvent::new(EventKind::AdminsOnlyChanged)
        },
        ChatEvent::new(EventKind::AdminsOnlyChanged),
        ChatEvent {
            target: Seq(9),
            payload: b"fixed".to_vec(),
            ..ChatEvent::new(EventKind::Edited)
        },
        ChatEvent {
            target: Seq(u64::MAX),
            ..ChatEvent::new(EventKind::Edited)
        },
        ChatEvent {
            target: Seq(1),
            ..ChatEvent::new(EventKind::Deleted)
        },
        ChatEvent {
            target: Seq(2),
            reaction: "❤️".into(),
            ..ChatEvent::new(EventKind::Reacted)
        },
        // Empty: the reaction was removed.
        ChatEvent {
            target: Seq(2),
            ..ChatEvent::new(EventKind::Reacted)
        },
    ]
}

/// Events with fields at their limits: large, so not in the mutation corpus.
fn big_events() -> Vec<ChatEvent> {
    vec![
        // The largest GroupCreated: every member and every string at its limit.
        ChatEvent {
            users: users(1..=GROUP_USERS_MAX as u64),
            name: Some("é".repeat(GROUP_NAME_BYTES_MAX / 2)),
            description: Some("d".repeat(GROUP_DESCRIPTION_BYTES_MAX)),
            avatar_media_id: Some("a".repeat(MEDIA_ID_BYTES_MAX)),
            admins_only: true,
            ..ChatEvent::new(EventKind::GroupCreated)
        },
        ChatEvent {
            target: Seq(3),
            payload: vec![0xee; EDIT_PAYLOAD_BYTES_MAX],
            ..ChatEvent::new(EventKind::Edited)
        },
        ChatEvent {
            target: Seq(3),
            reaction: "😀".repeat(REACTION_BYTES_MAX / 4),
            ..ChatEvent::new(EventKind::Reacted)
        },
    ]
}

// ----------------------------------------------------------------------------- raw envelopes

/// Hand-built envelopes for frames the encoder cannot produce.
mod raw {
    use super::*;

    pub fn envelope<F>(body_type: fb::Body, body: F) -> Vec<u8>
    where
        F: FnOnce(
            &mut FlatBufferBuilder<'static>,
        ) -> Option<flatbuffers::WIPOffset<flatbuffers::UnionWIPOffset>>,
    {
        let mut fbb = FlatBufferBuilder::new();
        let body = body(&mut fbb);
        let env = fb::Envelope::create(&mut fbb, &fb::EnvelopeArgs { body_type, body });
        fb::finish_envelope_buffer(&mut fbb, env);
        fbb.finished_data().to_vec()
    }

    pub struct Send {
        pub id: Option<(u64, u64)>,
        pub chat: u64,
        pub peer: u64,
        pub payload: Option<usize>,
    }

    pub fn send(s: Send) -> Vec<u8> {
        envelope(fb::Body::Send, |fbb| {
            let payload = s.payload.map(|n| fbb.create_vector(&vec![7u8; n]));
            let uuid = s.id.map(|(hi, lo)| fb::Uuid::new(hi, lo));
            let args = fb::SendArgs {
                client_msg_id: uuid.as_ref(),
                chat_id: s.chat,
                peer_user: s.peer,
                payload,
                ..Default::default()
            };
            Some(fb::Send::create(fbb, &args).as_union_value())
        })
    }

    pub fn ok_send() -> Send {
        Send {
            id: Some((1, 2)),
            chat: 10,
            peer: 0,
            payload: Some(3),
        }
    }

    pub fn sync_cursors(cursors: &[(u64, u64)]) -> Vec<u8> {
        envelope(fb::Body::Sync, |fbb| {
            let v: Vec<fb::Cursor> = cursors
                .iter()
                .map(|&(c, s)| fb::Cursor::new(c, s))
                .collect();
            let cursors = fbb.create_vector(&v);
            let args = fb::SyncArgs {
                request_id: 1,
                cursors: Some(cursors),
            };
            Some(fb::Sync::create(fbb, &args).as_union_value())
        })
    }

    pub fn history(chat: u64, limit: u32) -> Vec<u8> {
        envelope(fb::Body::History, |fbb| {
            let args = fb::HistoryArgs {
                request_id: 2,
                chat_id: chat,
                before_seq: 0,
                limit,
            };
            Some(fb::History::create(fbb, &args).as_union_value())
        })
    }

    pub fn ping_as(body_type: fb::Body) -> Vec<u8> {
        envelope(body_type, |fbb| {
            Some(fb::Ping::create(fbb, &fb::PingArgs { nonce: 1 }).as_union_value())
        })
    }

    pub fn receipt(from: u64, to: u64, kind: fb::ReceiptKind) -> Vec<u8> {
        envelope(fb::Body::Receipt, |fbb| {
            let args = fb::ReceiptArgs {
                chat_id: 4,
                from_seq: from,
                to_seq: to,
                user: 5,
                kind,
            };
            Some(fb::Receipt::create(fbb, &args).as_union_value())
        })
    }

    pub fn create_group_without_name() -> Vec<u8> {
        envelope(fb::Body::CreateGroup, |fbb| {
            let uuid = fb::Uuid::new(1, 2);
            let args = fb::CreateGroupArgs {
                client_msg_id: Some(&uuid),
                ..Default::default()
            };
            Some(fb::CreateGroup::create(fbb, &args).as_union_value())
        })
    }

    pub fn edit_without_payload() -> Vec<u8> {
        envelope(fb::Body::Edit, |fbb| {
            let uuid = fb::Uuid::new(1, 2);
            let args = fb::EditArgs {
                client_msg_id: Some(&uuid),
                chat_id: 1,
                target_seq: 1,
                payload: None,
            };
            Some(fb::Edit::create(fbb, &args).as_union_value())
        })
    }

    /// A `Block` without its `blocked` field: the schema default (`true`) applies.
    pub fn block_without_flag(user: u64) -> Vec<u8> {
        envelope(fb::Body::Block, |fbb| {
            let mut b = fb::BlockBuilder::new(fbb);
            b.add_request_id(4);
            b.add_user(user);
            Some(b.finish().as_union_value())
        })
    }

    /// `bytes` with the first byte of the first occurrence of `needle` (a string in it) replaced
    /// by 0xff, which is never valid UTF-8.
    pub fn break_utf8(mut bytes: Vec<u8>, needle: &str) -> Vec<u8> {
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle.as_bytes())
            .expect("needle in buffer");
        bytes[at] = 0xff;
        bytes
    }

    pub fn error(code: fb::ErrorCode, text: &str) -> Vec<u8> {
        envelope(fb::Body::Error, |fbb| {
            let text = fbb.create_string(text);
            let nil = fb::Uuid::new(0, 0);
            let args = fb::ErrorArgs {
                code,
                text: Some(text),
                client_msg_id: Some(&nil),
                request_id: 3,
            };
            Some(fb::Error::create(fbb, &args).as_union_value())
        })
    }
}

// --------------------------------------------------------------------------------- round trips

#[test]
fn client_frames_round_trip() {
    let mut enc = Encoder::new();
    for f in client_frames() {
        let bytes = enc.encode_client(&f).to_vec();
        assert!(
            bytes.len() <= FRAME_BYTES_MAX,
            "{f:?} encodes to {} bytes",
            bytes.len()
        );
        check(&format!("{f:?}"), decode_client, &bytes, Expect::Ok(f));
    }
}

#[test]
fn server_frames_round_trip() {
    let mut enc = Encoder::new();
    for f in server_frames() {
        let bytes = enc.encode_server(&f).to_vec();
        assert!(bytes.len() <= SERVER_FRAME_BYTES_MAX);
        let name = format!("{:.120}", format!("{f:?}"));
        check(&name, decode_server, &bytes, Expect::Ok(f));
    }
}

/// Frames that decode to something other than what was encoded, by design.
#[test]
fn normalised_on_decode() {
    let history = |limit| ClientFrame::History {
        request_id: 1,
        chat: ChatId(2),
        before: Seq(3),
        limit,
    };
    let client_cases = [
        (
            "history limit 0 means the default",
            history(0),
            history(HISTORY_PAGE_MESSAGES_DEFAULT),
        ),
        (
            "history limit is clamped",
            history(HISTORY_PAGE_MESSAGES_MAX + 1),
            history(HISTORY_PAGE_MESSAGES_MAX),
        ),
        (
            "history limit u32::MAX is clamped",
            history(u32::MAX),
            history(HISTORY_PAGE_MESSAGES_MAX),
        ),
        (
            "group_update AddMembers keeps only users",
            ClientFrame::GroupUpdate(GroupUpdateReq {
                users: vec![UserId(2)],
                name: Some("x".into()),
                description: Some(String::new()),
                admins_only: true,
                ..update(GroupOp::AddMembers)
            }),
            ClientFrame::GroupUpdate(GroupUpdateReq {
                users: vec![UserId(2)],
                ..update(GroupOp::AddMembers)
            }),
        ),
        (
            "group_update SetInfo keeps only the strings",
            ClientFrame::GroupUpdate(GroupUpdateReq {
                users: vec![UserId(0)],
                name: Some("x".into()),
                admins_only: true,
                ..update(GroupOp::SetInfo)
            }),
            ClientFrame::GroupUpdate(GroupUpdateReq {
                name: Some("x".into()),
                ..update(GroupOp::SetInfo)
            }),
        ),
        (
            "group_update SetAdminsOnly keeps only admins_only",
            ClientFrame::GroupUpdate(GroupUpdateReq {
                users: vec![UserId(2)],
                avatar_media_id: Some("a".repeat(MEDIA_ID_BYTES_MAX + 1)),
                admins_only: true,
                ..update(GroupOp::SetAdminsOnly)
            }),
            ClientFrame::GroupUpdate(GroupUpdateReq {
                admins_only: true,
                ..update(GroupOp::SetAdminsOnly)
            }),
        ),
        (
            "group_update Leave keeps nothing",
            ClientFrame::GroupUpdate(GroupUpdateReq {
                users: users(1..=GROUP_USERS_MAX as u64 + 1),
                description: Some("d".into()),
                admins_only: true,
                ..update(GroupOp::Leave)
            }),
            ClientFrame::GroupUpdate(update(GroupOp::Leave)),
        ),
    ];
    for (name, input, expect) in client_cases {
        check(name, decode_client, &enc_client(&input), Expect::Ok(expect));
    }
    check(
        "block without the blocked field blocks (the schema default)",
        decode_client,
        &raw::block_without_flag(9),
        Expect::Ok(ClientFrame::Block {
            request_id: 4,
            user: UserId(9),
            blocked: true,
        }),
    );

    let error = |text: String, client_msg_id| {
        ServerFrame::Error(ErrorFrame {
            code: ErrorCode::Overloaded,
            text,
            client_msg_id,
            request_id: 0,
        })
    };
    let at_limit = "x".repeat(ERROR_TEXT_BYTES_MAX - 1);
    let server_cases = [
        (
            "long error text is cut on a char boundary",
            error(format!("{at_limit}é tail"), None),
            error(at_limit.clone(), None),
        ),
        (
            "a nil client_msg_id reads back as None",
            error("e".into(), Some(ClientMsgId::default())),
            error("e".into(), None),
        ),
    ];
    for (name, input, expect) in server_cases {
        check(name, decode_server, &enc_server(&input), Expect::Ok(expect));
    }

    let raw_cases = [
        (
            "unknown receipt kind falls back to Delivered",
            raw::receipt(1, 2, fb::ReceiptKind(9)),
            ServerFrame::Receipt(Receipt {
                chat: ChatId(4),
                from: Seq(1),
                to: Seq(2),
                user: UserId(5),
                kind: ReceiptKind::Delivered,
            }),
        ),
        (
            "unknown error code falls back to Unknown; nil id is None",
            raw::error(fb::ErrorCode(777), "new"),
            ServerFrame::Error(ErrorFrame {
                code: ErrorCode::Unknown,
                text: "new".into(),
                client_msg_id: None,
                request_id: 3,
            }),
        ),
        (
            "over-long error text from a peer is cut, not rejected",
            raw::error(fb::ErrorCode::Internal, &"€".repeat(ERROR_TEXT_BYTES_MAX)),
            ServerFrame::Error(ErrorFrame {
                code: ErrorCode::Internal,
                text: "€".repeat(ERROR_TEXT_BYTES_MAX / 3),
                client_msg_id: None,
                request_id: 3,
            }),
        ),
    ];
    for (name, input, expect) in raw_cases {
        check(name, decode_server, &input, Expect::Ok(expect));
    }
}

// ----------------------------------------------------------------------------- rule violations

#[test]
fn client_rule_violations() {
    use DecodeError::*;
    let send_to = |t| enc_client(&ClientFrame::Send(send(t, b"x".to_vec())));
    let cg = |c| enc_client(&ClientFrame::CreateGroup(c));
    let gu = |u| enc_client(&ClientFrame::GroupUpdate(u));
    let edit = |client_msg_id, chat, target, len| {
        enc_client(&ClientFrame::Edit {
            client_msg_id,
            chat: ChatId(chat),
            target: Seq(target),
            payload: vec![1; len],
        })
    };
    let delete = |client_msg_id, chat, target| {
        enc_client(&ClientFrame::Delete {
            client_msg_id,
            chat: ChatId(chat),
            target: Seq(target),
        })
    };
    let react = |client_msg_id, chat, target, reaction: &str| {
        enc_client(&ClientFrame::React {
            client_msg_id,
            chat: ChatId(chat),
            target: Seq(target),
            reaction: reaction.into(),
        })
    };
    let block = |user| {
        enc_client(&ClientFrame::Block {
            request_id: 1,
            user: UserId(user),
            blocked: true,
        })
    };
    let subscribe = |users| {
        enc_client(&ClientFrame::Subscribe {
            request_id: 1,
            users,
        })
    };
    let privacy = |last_seen, online| {
        enc_client(&ClientFrame::SetPrivacy {
            request_id: 1,
            last_seen,
            online,
        })
    };
    let cases: Vec<(&str, Vec<u8>, DecodeError, ErrorCode)> = vec![
        (
            "send to chat 0",
            send_to(Target::Chat(ChatId(0))),
            Invalid("send needs exactly one of chat_id and peer_user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send to user 0",
            send_to(Target::Peer(UserId(0))),
            Invalid("send needs exactly one of chat_id and peer_user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send to chat and peer",
            raw::send(raw::Send {
                peer: 3,
                ..raw::ok_send()
            }),
            Invalid("send needs exactly one of chat_id and peer_user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send without client_msg_id",
            raw::send(raw::Send {
                id: None,
                ..raw::ok_send()
            }),
            Invalid("send needs a non-nil client_msg_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send with nil client_msg_id",
            raw::send(raw::Send {
                id: Some((0, 0)),
                ..raw::ok_send()
            }),
            Invalid("send needs a non-nil client_msg_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send without payload",
            raw::send(raw::Send {
                payload: None,
                ..raw::ok_send()
            }),
            Invalid("send needs a payload"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send with too many media ids",
            enc_client(&ClientFrame::Send(SendReq {
                media_ids: (0..=SEND_MEDIA_IDS_MAX).map(|i| format!("m{i}")).collect(),
                ..send(Target::Chat(ChatId(1)), vec![1])
            })),
            Invalid("send has more than SEND_MEDIA_IDS_MAX media_ids"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send with a media id that is not one",
            enc_client(&ClientFrame::Send(SendReq {
                media_ids: vec!["ok".to_owned(), "../etc".to_owned()],
                ..send(Target::Chat(ChatId(1)), vec![1])
            })),
            Invalid("media_ids holds an id that is not 1..=64 of [A-Za-z0-9_-]"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send with an empty media id",
            enc_client(&ClientFrame::Send(SendReq {
                media_ids: vec![String::new()],
                ..send(Target::Chat(ChatId(1)), vec![1])
            })),
            Invalid("media_ids holds an id that is not 1..=64 of [A-Za-z0-9_-]"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send with an over-long media id",
            enc_client(&ClientFrame::Send(SendReq {
                media_ids: vec!["y".repeat(SEND_MEDIA_ID_BYTES_MAX + 1)],
                ..send(Target::Chat(ChatId(1)), vec![1])
            })),
            Invalid("media_ids holds an id that is not 1..=64 of [A-Za-z0-9_-]"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send claiming a server-only event",
            enc_client(&ClientFrame::Send(SendReq {
                content_kind: ContentKind::Event,
                ..send(Target::Chat(ChatId(1)), vec![1])
            })),
            Invalid("content_kind Event and Deleted are server-only"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send claiming a tombstone",
            enc_client(&ClientFrame::Send(SendReq {
                content_kind: ContentKind::Deleted,
                ..send(Target::Chat(ChatId(1)), vec![1])
            })),
            Invalid("content_kind Event and Deleted are server-only"),
            ErrorCode::InvalidArgument,
        ),
        (
            "send payload over the limit",
            enc_client(&ClientFrame::Send(send(
                Target::Chat(ChatId(1)),
                vec![0; PAYLOAD_BYTES_MAX + 1],
            ))),
            PayloadTooLarge {
                len: PAYLOAD_BYTES_MAX + 1,
                max: PAYLOAD_BYTES_MAX,
            },
            ErrorCode::PayloadTooLarge,
        ),
        (
            "delivered chat 0",
            enc_client(&ClientFrame::Delivered {
                chat: ChatId(0),
                up_to: Seq(1),
            }),
            Invalid("delivered needs a chat_id and up_to_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "delivered seq 0",
            enc_client(&ClientFrame::Delivered {
                chat: ChatId(1),
                up_to: Seq(0),
            }),
            Invalid("delivered needs a chat_id and up_to_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "read chat 0",
            enc_client(&ClientFrame::Read {
                chat: ChatId(0),
                up_to: Seq(1),
            }),
            Invalid("read needs a chat_id and up_to_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "read seq 0",
            enc_client(&ClientFrame::Read {
                chat: ChatId(1),
                up_to: Seq(0),
            }),
            Invalid("read needs a chat_id and up_to_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "sync cursor chat 0",
            raw::sync_cursors(&[(1, 1), (0, 5)]),
            Invalid("sync cursor needs a chat_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "sync with too many cursors",
            raw::sync_cursors(&vec![(1, 1); SYNC_CURSORS_MAX + 1]),
            TooManyCursors {
                n: SYNC_CURSORS_MAX + 1,
            },
            ErrorCode::TooManyCursors,
        ),
        (
            "history chat 0",
            raw::history(0, 10),
            Invalid("history needs a chat_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group with nil client_msg_id",
            cg(CreateGroupReq {
                client_msg_id: ClientMsgId::default(),
                ..create_group()
            }),
            Invalid("create_group needs a non-nil client_msg_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group without name",
            raw::create_group_without_name(),
            Invalid("create_group needs a name"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group with empty name",
            cg(CreateGroupReq {
                name: String::new(),
                ..create_group()
            }),
            Invalid("create_group needs a name"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group name over the limit",
            cg(CreateGroupReq {
                name: "n".repeat(GROUP_NAME_BYTES_MAX + 1),
                ..create_group()
            }),
            Invalid("group name is longer than GROUP_NAME_BYTES_MAX bytes"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group description over the limit",
            cg(CreateGroupReq {
                description: "d".repeat(GROUP_DESCRIPTION_BYTES_MAX + 1),
                ..create_group()
            }),
            Invalid("group description is longer than GROUP_DESCRIPTION_BYTES_MAX bytes"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group avatar over the limit",
            cg(CreateGroupReq {
                avatar_media_id: "a".repeat(MEDIA_ID_BYTES_MAX + 1),
                ..create_group()
            }),
            Invalid("avatar_media_id is longer than MEDIA_ID_BYTES_MAX bytes"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group with too many members",
            cg(CreateGroupReq {
                members: users(1..=GROUP_USERS_MAX as u64 + 1),
                ..create_group()
            }),
            Invalid("create_group names more than GROUP_USERS_MAX members"),
            ErrorCode::InvalidArgument,
        ),
        (
            "create_group with member 0",
            cg(CreateGroupReq {
                members: users(0..=2),
                ..create_group()
            }),
            Invalid("create_group member ids must be non-zero"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update with nil client_msg_id",
            gu(GroupUpdateReq {
                client_msg_id: ClientMsgId::default(),
                ..update(GroupOp::Leave)
            }),
            Invalid("group_update needs a non-nil client_msg_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update chat 0",
            gu(GroupUpdateReq {
                chat: ChatId(0),
                ..update(GroupOp::Leave)
            }),
            Invalid("group_update needs a chat_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update AddMembers without users",
            gu(update(GroupOp::AddMembers)),
            Invalid("group_update member ops need at least one user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update Demote without users",
            gu(update(GroupOp::Demote)),
            Invalid("group_update member ops need at least one user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update RemoveMembers with user 0",
            gu(GroupUpdateReq {
                users: users(0..=1),
                ..update(GroupOp::RemoveMembers)
            }),
            Invalid("group_update user ids must be non-zero"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update Promote with too many users",
            gu(GroupUpdateReq {
                users: users(1..=GROUP_USERS_MAX as u64 + 1),
                ..update(GroupOp::Promote)
            }),
            Invalid("group_update names more than GROUP_USERS_MAX users"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update SetInfo without any field",
            gu(update(GroupOp::SetInfo)),
            Invalid("group_update SetInfo needs a name, description or avatar_media_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update SetInfo with empty name",
            gu(GroupUpdateReq {
                name: Some(String::new()),
                ..update(GroupOp::SetInfo)
            }),
            Invalid("group name must not be empty"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update SetInfo name over the limit",
            gu(GroupUpdateReq {
                name: Some("n".repeat(GROUP_NAME_BYTES_MAX + 1)),
                ..update(GroupOp::SetInfo)
            }),
            Invalid("group name is longer than GROUP_NAME_BYTES_MAX bytes"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update SetInfo description over the limit",
            gu(GroupUpdateReq {
                name: Some("n".into()),
                description: Some("d".repeat(GROUP_DESCRIPTION_BYTES_MAX + 1)),
                ..update(GroupOp::SetInfo)
            }),
            Invalid("group description is longer than GROUP_DESCRIPTION_BYTES_MAX bytes"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update SetInfo avatar over the limit",
            gu(GroupUpdateReq {
                avatar_media_id: Some("a".repeat(MEDIA_ID_BYTES_MAX + 1)),
                ..update(GroupOp::SetInfo)
            }),
            Invalid("avatar_media_id is longer than MEDIA_ID_BYTES_MAX bytes"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update with the next op",
            gu(update(GroupOp(GroupOp::ENUM_MAX + 1))),
            Invalid("group_update op is unknown"),
            ErrorCode::InvalidArgument,
        ),
        (
            "group_update with op 255",
            gu(GroupUpdateReq {
                users: vec![UserId(1)],
                ..update(GroupOp(255))
            }),
            Invalid("group_update op is unknown"),
            ErrorCode::InvalidArgument,
        ),
        (
            "get_group_info chat 0",
            enc_client(&ClientFrame::GetGroupInfo {
                request_id: 1,
                chat: ChatId(0),
            }),
            Invalid("get_group_info needs a chat_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "edit with nil client_msg_id",
            edit(ClientMsgId::default(), 1, 1, 1),
            Invalid("edit needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "edit chat 0",
            edit(id(1), 0, 1, 1),
            Invalid("edit needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "edit target 0",
            edit(id(1), 1, 0, 1),
            Invalid("edit needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "edit without payload",
            raw::edit_without_payload(),
            Invalid("edit needs a payload"),
            ErrorCode::InvalidArgument,
        ),
        (
            "edit payload over the limit",
            edit(id(1), 1, 1, EDIT_PAYLOAD_BYTES_MAX + 1),
            PayloadTooLarge {
                len: EDIT_PAYLOAD_BYTES_MAX + 1,
                max: EDIT_PAYLOAD_BYTES_MAX,
            },
            ErrorCode::PayloadTooLarge,
        ),
        (
            "delete with nil client_msg_id",
            delete(ClientMsgId::default(), 1, 1),
            Invalid("delete needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "delete chat 0",
            delete(id(1), 0, 1),
            Invalid("delete needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "delete target 0",
            delete(id(1), 1, 0),
            Invalid("delete needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "react with nil client_msg_id",
            react(ClientMsgId::default(), 1, 1, "👍"),
            Invalid("react needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "react chat 0",
            react(id(1), 0, 1, "👍"),
            Invalid("react needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "react target 0",
            react(id(1), 1, 0, ""),
            Invalid("react needs a non-nil client_msg_id, a chat_id and a target_seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "react reaction over the limit",
            react(
                id(1),
                1,
                1,
                &format!("{}x", "😀".repeat(REACTION_BYTES_MAX / 4)),
            ),
            Invalid("reaction is longer than REACTION_BYTES_MAX bytes"),
            ErrorCode::InvalidArgument,
        ),
        (
            "typing chat 0",
            enc_client(&ClientFrame::Typing {
                chat: ChatId(0),
                typing: true,
            }),
            Invalid("typing needs a chat_id"),
            ErrorCode::InvalidArgument,
        ),
        (
            "get_receipts chat 0",
            enc_client(&ClientFrame::GetReceipts {
                request_id: 1,
                chat: ChatId(0),
                seq: Seq(1),
            }),
            Invalid("get_receipts needs a chat_id and seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "get_receipts seq 0",
            enc_client(&ClientFrame::GetReceipts {
                request_id: 1,
                chat: ChatId(1),
                seq: Seq(0),
            }),
            Invalid("get_receipts needs a chat_id and seq"),
            ErrorCode::InvalidArgument,
        ),
        (
            "block user 0",
            block(0),
            Invalid("block needs a user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "unblock user 0",
            enc_client(&ClientFrame::Block {
                request_id: 1,
                user: UserId(0),
                blocked: false,
            }),
            Invalid("block needs a user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "block without user",
            raw::block_without_flag(0),
            Invalid("block needs a user"),
            ErrorCode::InvalidArgument,
        ),
        (
            "subscribe to too many users",
            subscribe(users(1..=PRESENCE_SUBSCRIPTIONS_MAX as u64 + 1)),
            TooManySubscriptions {
                n: PRESENCE_SUBSCRIPTIONS_MAX + 1,
            },
            ErrorCode::TooManySubscriptions,
        ),
        (
            "subscribe to too many duplicates",
            subscribe(vec![UserId(5); PRESENCE_SUBSCRIPTIONS_MAX + 1]),
            TooManySubscriptions {
                n: PRESENCE_SUBSCRIPTIONS_MAX + 1,
            },
            ErrorCode::TooManySubscriptions,
        ),
        (
            "subscribe to user 0",
            subscribe(vec![UserId(1), UserId(0)]),
            Invalid("subscribe user ids must be non-zero"),
            ErrorCode::InvalidArgument,
        ),
        (
            "set_privacy with the next last_seen visibility",
            privacy(Visibility(Visibility::ENUM_MAX + 1), Visibility::Everyone),
            Invalid("set_privacy last_seen is unknown"),
            ErrorCode::InvalidArgument,
        ),
        (
            "set_privacy with online visibility 255",
            privacy(Visibility::Nobody, Visibility(255)),
            Invalid("set_privacy online is unknown"),
            ErrorCode::InvalidArgument,
        ),
        (
            "envelope without body",
            raw::envelope(fb::Body::NONE, |_| None),
            MissingBody,
            ErrorCode::MalformedFrame,
        ),
        (
            "unknown body type",
            raw::ping_as(fb::Body(200)),
            UnknownBody(200),
            ErrorCode::UnsupportedFrame,
        ),
        (
            "next body type",
            raw::ping_as(fb::Body(fb::Body::ENUM_MAX + 1)),
            UnknownBody(fb::Body::ENUM_MAX + 1),
            ErrorCode::UnsupportedFrame,
        ),
    ];
    for (name, input, err, code) in cases {
        assert_eq!(err.code(), code, "{name}: code");
        check(name, decode_client, &input, Expect::Err(err));
    }
}

#[test]
fn server_rule_violations() {
    use DecodeError::*;
    let page = |messages| {
        ServerFrame::HistoryPage(HistoryPage {
            request_id: 1,
            chat: ChatId(42),
            messages,
            has_more: false,
        })
    };
    let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
        (
            "message chat 0",
            enc_server(&ServerFrame::Message(msg(0, 1, 1))),
            Invalid("message needs a chat_id and seq"),
        ),
        (
            "message seq 0",
            enc_server(&ServerFrame::Message(msg(1, 0, 1))),
            Invalid("message needs a chat_id and seq"),
        ),
        (
            "message payload over the limit",
            enc_server(&ServerFrame::Message(msg(1, 1, PAYLOAD_BYTES_MAX + 1))),
            PayloadTooLarge {
                len: PAYLOAD_BYTES_MAX + 1,
                max: PAYLOAD_BYTES_MAX,
            },
        ),
        (
            "page with a bad message",
            enc_server(&page(vec![msg(42, 2, 1), msg(42, 0, 1)])),
            Invalid("message needs a chat_id and seq"),
        ),
        (
            "page with another chat's message",
            enc_server(&page(vec![msg(42, 2, 1), msg(43, 1, 1)])),
            Invalid("history_page holds a message of another chat"),
        ),
        (
            "page of chat 0",
            enc_server(&ServerFrame::HistoryPage(HistoryPage {
                request_id: 1,
                chat: ChatId(0),
                messages: vec![],
                has_more: false,
            })),
            Invalid("history_page needs a chat_id"),
        ),
        (
            "receipt from 0",
            raw::receipt(0, 2, fb::ReceiptKind::Read),
            Invalid("receipt needs 1 <= from_seq <= to_seq"),
        ),
        (
            "receipt from > to",
            raw::receipt(3, 2, fb::ReceiptKind::Read),
            Invalid("receipt needs 1 <= from_seq <= to_seq"),
        ),
        (
            "send_ack seq 0",
            enc_server(&ServerFrame::SendAck(SendAck {
                client_msg_id: id(1),
                chat: ChatId(1),
                seq: Seq(0),
                msg_id: MsgId(1),
                timestamp_ms: 1,
                duplicate: false,
            })),
            Invalid("send_ack needs a chat_id and seq"),
        ),
        (
            "group_info chat 0",
            enc_server(&ServerFrame::GroupInfo(GroupInfo {
                chat: ChatId(0),
                ..group_info()
            })),
            Invalid("group_info needs a chat_id"),
        ),
        (
            "group_info with member 0",
            enc_server(&ServerFrame::GroupInfo(GroupInfo {
                members: vec![
                    (UserId(1), MemberRole::Owner),
                    (UserId(0), MemberRole::Member),
                ],
                ..group_info()
            })),
            Invalid("group_info member ids must be non-zero"),
        ),
        (
            "group_info with too many members",
            enc_server(&ServerFrame::GroupInfo(GroupInfo {
                members: (1..=GROUP_USERS_MAX as u64 + 1)
                    .map(|u| (UserId(u), MemberRole::Member))
                    .collect(),
                ..group_info()
            })),
            Invalid("group_info has more than GROUP_USERS_MAX members"),
        ),
        (
            "typing_notice chat 0",
            enc_server(&ServerFrame::TypingNotice {
                chat: ChatId(0),
                user: UserId(1),
                typing: true,
            }),
            Invalid("typing_notice needs a chat_id and user"),
        ),
        (
            "typing_notice user 0",
            enc_server(&ServerFrame::TypingNotice {
                chat: ChatId(1),
                user: UserId(0),
                typing: false,
            }),
            Invalid("typing_notice needs a chat_id and user"),
        ),
        (
            "receipt_list chat 0",
            enc_server(&ServerFrame::ReceiptList(ReceiptList {
                chat: ChatId(0),
                ..receipt_list()
            })),
            Invalid("receipt_list needs a chat_id and seq"),
        ),
        (
            "receipt_list seq 0",
            enc_server(&ServerFrame::ReceiptList(ReceiptList {
                seq: Seq(0),
                ..receipt_list()
            })),
            Invalid("receipt_list needs a chat_id and seq"),
        ),
        (
            "receipt_list with too many readers",
            enc_server(&ServerFrame::ReceiptList(ReceiptList {
                read: users(1..=GROUP_USERS_MAX as u64 + 1),
                ..receipt_list()
            })),
            Invalid("receipt_list has more than GROUP_USERS_MAX users in a list"),
        ),
        (
            "receipt_list with pending user 0",
            enc_server(&ServerFrame::ReceiptList(ReceiptList {
                pending: users(0..=3),
                ..receipt_list()
            })),
            Invalid("receipt_list user ids must be non-zero"),
        ),
        (
            "presence user 0",
            enc_server(&ServerFrame::Presence(Presence {
                user: UserId(0),
                online: true,
                last_seen_ms: 1,
                hidden: false,
            })),
            Invalid("presence needs a user"),
        ),
        (
            "unknown body type",
            raw::ping_as(fb::Body(99)),
            UnknownBody(99),
        ),
        (
            "envelope without body",
            raw::envelope(fb::Body::NONE, |_| None),
            MissingBody,
        ),
    ];
    for (name, input, err) in cases {
        check(name, decode_server, &input, Expect::Err(err));
    }
}

#[test]
fn frames_in_the_wrong_direction() {
    for f in server_frames() {
        let bytes = enc_server(&f);
        let Err(e) = decode_client(&bytes) else {
            panic!("{f:?} accepted from a client")
        };
        // The big history page is over the client frame limit and stops at the size check.
        if bytes.len() > FRAME_BYTES_MAX {
            assert_eq!(
                e,
                DecodeError::TooLarge {
                    len: bytes.len(),
                    max: FRAME_BYTES_MAX
                }
            );
            continue;
        }
        assert!(
            matches!(e, DecodeError::WrongDirection { .. }),
            "{f:?}: {e:?}"
        );
        assert_eq!(e.code(), ErrorCode::UnsupportedFrame);
    }
    for f in client_frames() {
        let bytes = enc_client(&f);
        let got = decode_server(&bytes);
        assert!(
            matches!(got, Err(DecodeError::WrongDirection { .. })),
            "{f:?}: {got:?}"
        );
    }
    // The body type is kept for diagnostics.
    let pong = enc_server(&ServerFrame::Pong { nonce: 1 });
    let err = decode_client(&pong).unwrap_err();
    assert_eq!(
        err,
        DecodeError::WrongDirection {
            body: fb::Body::Pong.0
        }
    );
    assert_eq!(
        err.to_string(),
        "frame type Pong is not accepted in this direction"
    );
}

// ------------------------------------------------------------------------ not an envelope at all

#[test]
fn oversize_frames_are_rejected_before_parsing() {
    // All zeros: it would fail every later check too, so only the size check can explain the error.
    type Decode = fn(&[u8]) -> Result<(), DecodeError>;
    let cases: Vec<(&str, Decode, usize, Expect<()>)> = vec![
        (
            "client at the limit",
            |b| decode_client(b).map(drop),
            FRAME_BYTES_MAX,
            Expect::Err(DecodeError::BadIdentifier),
        ),
        (
            "client over the limit",
            |b| decode_client(b).map(drop),
            FRAME_BYTES_MAX + 1,
            Expect::Err(DecodeError::TooLarge {
                len: FRAME_BYTES_MAX + 1,
                max: FRAME_BYTES_MAX,
            }),
        ),
        (
            "server at the limit",
            |b| decode_server(b).map(drop),
            SERVER_FRAME_BYTES_MAX,
            Expect::Err(DecodeError::BadIdentifier),
        ),
        (
            "server over the limit",
            |b| decode_server(b).map(drop),
            SERVER_FRAME_BYTES_MAX + 1,
            Expect::Err(DecodeError::TooLarge {
                len: SERVER_FRAME_BYTES_MAX + 1,
                max: SERVER_FRAME_BYTES_MAX,
            }),
        ),
    ];
    for (name, decode, len, expect) in cases {
        check(name, decode, &vec![0u8; len], expect);
    }
    assert_eq!(
        DecodeError::TooLarge { len: 1, max: 0 }.code(),
        ErrorCode::FrameTooLarge
    );

    // A valid frame padded past the limit is still refused by size alone.
    let mut padded = enc_client(&ClientFrame::Ping { nonce: 1 });
    padded.resize(FRAME_BYTES_MAX + 1, 0);
    check(
        "padded ping",
        decode_client,
        &padded,
        Expect::Err(DecodeError::TooLarge {
            len: FRAME_BYTES_MAX + 1,
            max: FRAME_BYTES_MAX,
        }),
    );
}

#[test]
fn wrong_identifier_truncation_and_garbage() {
    let ping = enc_client(&ClientFrame::Ping { nonce: 5 });
    let send = enc_client(&ClientFrame::Send(send(
        Target::Chat(ChatId(1)),
        vec![9; 100],
    )));
    let with_ident = |ident: &[u8; 4]| {
        let mut b = ping.clone();
        b[4..8].copy_from_slice(ident);
        b
    };
    // Valid header, root offset pointing past the end.
    let mut bad_root = ping.clone();
    bad_root[0..4].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    // The root offset points at the header itself: the "table" there has a zero-length vtable
    // at offset 0, which the verifier accepts as a table without fields, so: no body.
    let mut self_root = ping.clone();
    self_root[0..4].copy_from_slice(&0u32.to_le_bytes());

    let cases: Vec<(&str, Vec<u8>, Expect<ClientFrame>)> = vec![
        ("empty", Vec::new(), Expect::Err(DecodeError::BadIdentifier)),
        ("one byte", vec![0], Expect::Err(DecodeError::BadIdentifier)),
        (
            "header minus one",
            ping[..7].to_vec(),
            Expect::Err(DecodeError::BadIdentifier),
        ),
        ("header only", ping[..8].to_vec(), Expect::Malformed),
        (
            "identifier SWB2",
            with_ident(b"SWB2"),
            Expect::Err(DecodeError::BadIdentifier),
        ),
        (
            "identifier swb1",
            with_ident(b"swb1"),
            Expect::Err(DecodeError::BadIdentifier),
        ),
        (
            "identifier zeros",
            with_ident(&[0; 4]),
            Expect::Err(DecodeError::BadIdentifier),
        ),
        (
            "text",
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            Expect::Err(DecodeError::BadIdentifier),
        ),
        (
            "json",
            br#"{"type":"send","chat":1}"#.to_vec(),
            Expect::Err(DecodeError::BadIdentifier),
        ),
        (
            "ping cut in half",
            ping[..ping.len() / 2].to_vec(),
            Expect::Malformed,
        ),
        (
            "send cut in half",
            send[..send.len() / 2].to_vec(),
            Expect::Malformed,
        ),
        (
            "send missing its last 8 bytes",
            send[..send.len() - 8].to_vec(),
            Expect::Malformed,
        ),
        ("root offset out of bounds", bad_root, Expect::Malformed),
        // The builder omits a NONE type (the default), leaving a body without a type.
        (
            "body without a type",
            raw::ping_as(fb::Body::NONE),
            Expect::Malformed,
        ),
        (
            "root offset at the header",
            self_root,
            Expect::Err(DecodeError::MissingBody),
        ),
        (
            "header and garbage",
            [&ping[..8], &[0xa5; 64][..]].concat(),
            Expect::Malformed,
        ),
    ];
    for (name, input, expect) in cases {
        check(name, decode_client, &input, expect);
    }

    // Every prefix: an error, or (when only alignment padding at the end was cut) the same frame.
    for (frame, bytes) in [(ClientFrame::Ping { nonce: 5 }, &ping)] {
        for len in 0..bytes.len() {
            match decode_client(&bytes[..len]) {
                Err(_) => {}
                Ok(f) => assert_eq!(f, frame, "prefix of {len} bytes"),
            }
        }
    }
}

#[test]
fn decode_error_codes() {
    use DecodeError::*;
    let cases = [
        (TooLarge { len: 2, max: 1 }, ErrorCode::FrameTooLarge),
        (BadIdentifier, ErrorCode::MalformedFrame),
        (Verify("x".into()), ErrorCode::MalformedFrame),
        (MissingBody, ErrorCode::MalformedFrame),
        (UnknownBody(99), ErrorCode::UnsupportedFrame),
        (WrongDirection { body: 1 }, ErrorCode::UnsupportedFrame),
        (
            PayloadTooLarge { len: 1, max: 0 },
            ErrorCode::PayloadTooLarge,
        ),
        (TooManyCursors { n: 1 }, ErrorCode::TooManyCursors),
        (
            TooManySubscriptions { n: 1 },
            ErrorCode::TooManySubscriptions,
        ),
        (Invalid("rule"), ErrorCode::InvalidArgument),
    ];
    for (err, code) in cases {
        assert_eq!(err.code(), code, "{err:?}");
        assert!(!err.to_string().is_empty());
        let _: &dyn std::error::Error = &err;
    }
}

#[test]
fn invalid_utf8_is_malformed() {
    // The verifier checks every string it reaches; the needle is a string the frame carries.
    let client = [
        (
            "create_group name",
            enc_client(&ClientFrame::CreateGroup(create_group())),
            "Climbing",
        ),
        (
            "create_group description",
            enc_client(&ClientFrame::CreateGroup(create_group())),
            "Tuesdays",
        ),
        (
            "group_update name",
            enc_client(&ClientFrame::GroupUpdate(GroupUpdateReq {
                name: Some("renamed".into()),
                ..update(GroupOp::SetInfo)
            })),
            "renamed",
        ),
        (
            "react reaction",
            enc_client(&ClientFrame::React {
                client_msg_id: id(1),
                chat: ChatId(1),
                target: Seq(1),
                reaction: "thumbs".into(),
            }),
            "thumbs",
        ),
    ];
    for (name, bytes, needle) in client {
        check(
            name,
            decode_client,
            &raw::break_utf8(bytes, needle),
            Expect::Malformed,
        );
    }
    let info = enc_server(&ServerFrame::GroupInfo(group_info()));
    check(
        "group_info name",
        decode_server,
        &raw::break_utf8(info, "Climbing"),
        Expect::Malformed,
    );
}

// -------------------------------------------------------------------------------------- events

#[test]
fn events_round_trip() {
    let mut enc = Encoder::new();
    for ev in events().into_iter().chain(big_events()) {
        let name = format!("{:.120}", format!("{ev:?}"));
        let bytes = encode_event(&ev);
        assert!(
            bytes.len() <= PAYLOAD_BYTES_MAX,
            "{name}: {} bytes",
            bytes.len()
        );
        assert_eq!(&bytes[4..8], EVENT_IDENTIFIER.as_bytes(), "{name}");
        // A reused encoder gives the same bytes as the free function's fresh builder.
        assert_eq!(enc.encode_event(&ev), &bytes[..], "{name}");
        check(&name, decode_event, &bytes, Expect::Ok(ev));
    }
}

#[test]
fn event_rule_violations() {
    use DecodeError::*;
    let ev = |e: ChatEvent| encode_event(&e);
    let created = ev(events()[0].clone());
    let no_target = Invalid("chat_event Edited, Deleted and Reacted need a target_seq");
    let cases: Vec<(&str, Vec<u8>, Expect<ChatEvent>)> = vec![
        (
            "the next kind",
            ev(ChatEvent::new(EventKind(EventKind::ENUM_MAX + 1))),
            Expect::Err(Invalid("chat_event kind is unknown")),
        ),
        (
            "kind 255",
            ev(ChatEvent::new(EventKind(255))),
            Expect::Err(Invalid("chat_event kind is unknown")),
        ),
        (
            "unknown role",
            ev(ChatEvent {
                users: vec![UserId(1)],
                role: MemberRole(MemberRole::ENUM_MAX + 1),
                ..ChatEvent::new(EventKind::RolesChanged)
            }),
            Expect::Err(Invalid("chat_event role is unknown")),
        ),
        (
            "edited without target",
            ev(ChatEvent {
                payload: b"x".to_vec(),
                ..ChatEvent::new(EventKind::Edited)
            }),
            Expect::Err(no_target.clone()),
        ),
        (
            "deleted without target",
            ev(ChatEvent::new(EventKind::Deleted)),
            Expect::Err(no_target.clone()),
        ),
        (
            "reacted without target",
            ev(ChatEvent {
                reaction: "👍".into(),
                ..ChatEvent::new(EventKind::Reacted)
            }),
            Expect::Err(no_target),
        ),
        (
            "too many users",
            ev(ChatEvent {
                users: users(1..=GROUP_USERS_MAX as u64 + 1),
                ..ChatEvent::new(EventKind::MembersAdded)
            }),
            Expect::Err(Invalid("chat_event names more than GROUP_USERS_MAX users")),
        ),
        (
            "user 0",
            ev(ChatEvent {
                users: users(0..=1),
                ..ChatEvent::new(EventKind::MembersRemoved)
            }),
            Expect::Err(Invalid("chat_event user ids must be non-zero")),
        ),
        (
            "name over the limit",
            ev(ChatEvent {
                name: Some("n".repeat(GROUP_NAME_BYTES_MAX + 1)),
                ..ChatEvent::new(EventKind::InfoChanged)
            }),
            Expect::Err(Invalid(
                "group name is longer than GROUP_NAME_BYTES_MAX bytes",
            )),
        ),
        (
            "description over the limit",
            ev(ChatEvent {
                description: Some("d".repeat(GROUP_DESCRIPTION_BYTES_MAX + 1)),
                ..ChatEvent::new(EventKind::InfoChanged)
            }),
            Expect::Err(Invalid(
                "group description is longer than GROUP_DESCRIPTION_BYTES_MAX bytes",
            )),
        ),
        (
            "avatar over the limit",
            ev(ChatEvent {
                avatar_media_id: Some("a".repeat(MEDIA_ID_BYTES_MAX + 1)),
                ..ChatEvent::new(EventKind::GroupCreated)
            }),
            Expect::Err(Invalid(
                "avatar_media_id is longer than MEDIA_ID_BYTES_MAX bytes",
            )),
        ),
        (
            "reaction over the limit",
            ev(ChatEvent {
                target: Seq(1),
                reaction: "r".repeat(REACTION_BYTES_MAX + 1),
                ..ChatEvent::new(EventKind::Reacted)
            }),
            Expect::Err(Invalid("reaction is longer than REACTION_BYTES_MAX bytes")),
        ),
        (
            "payload over the edit limit",
            ev(ChatEvent {
                target: Seq(1),
                payload: vec![0; EDIT_PAYLOAD_BYTES_MAX + 1],
                ..ChatEvent::new(EventKind::Edited)
            }),
            Expect::Err(PayloadTooLarge {
                len: EDIT_PAYLOAD_BYTES_MAX + 1,
                max: EDIT_PAYLOAD_BYTES_MAX,
            }),
        ),
        (
            "over the payload limit",
            vec![0; PAYLOAD_BYTES_MAX + 1],
            Expect::Err(TooLarge {
                len: PAYLOAD_BYTES_MAX + 1,
                max: PAYLOAD_BYTES_MAX,
            }),
        ),
        ("empty", Vec::new(), Expect::Err(BadIdentifier)),
        (
            "header minus one",
            created[..7].to_vec(),
            Expect::Err(BadIdentifier),
        ),
        (
            "an envelope",
            enc_client(&ClientFrame::Ping { nonce: 1 }),
            Expect::Err(BadIdentifier),
        ),
        ("header only", created[..8].to_vec(), Expect::Malformed),
        (
            "cut in half",
            created[..created.len() / 2].to_vec(),
            Expect::Malformed,
        ),
        (
            "invalid UTF-8 in the name",
            raw::break_utf8(created.clone(), "Climbing"),
            Expect::Malformed,
        ),
        (
            "invalid UTF-8 in the reaction",
            raw::break_utf8(
                ev(ChatEvent {
                    target: Seq(1),
                    reaction: "thumbs".into(),
                    ..ChatEvent::new(EventKind::Reacted)
                }),
                "thumbs",
            ),
            Expect::Malformed,
        ),
    ];
    for (name, input, expect) in cases {
        check(name, decode_event, &input, expect);
    }
    assert_eq!(
        DecodeError::Invalid("chat_event kind is unknown").code(),
        ErrorCode::InvalidArgument
    );

    // An event is not an envelope either way round.
    assert_eq!(decode_client(&created), Err(BadIdentifier));
    assert_eq!(decode_server(&created), Err(BadIdentifier));
    // Every prefix: an error, or (when only alignment padding at the end was cut) the same event.
    for len in 0..created.len() {
        match decode_event(&created[..len]) {
            Err(_) => {}
            Ok(e) => assert_eq!(e, events()[0], "prefix of {len} bytes"),
        }
    }
}

// ------------------------------------------------------------------------------------ encoder

#[test]
fn encoder_is_reusable_across_sizes_and_directions() {
    let mut enc = Encoder::default();
    let big = ServerFrame::Message(msg(1, 1, PAYLOAD_BYTES_MAX));
    let small = ClientFrame::Ping { nonce: 3 };
    for _ in 0..3 {
        let b = enc.encode_server(&big).to_vec();
        assert_eq!(decode_server(&b).unwrap(), big);
        let s = enc.encode_client(&small).to_vec();
        assert_eq!(decode_client(&s).unwrap(), small);
        // A reused builder gives the same bytes as a fresh one.
        assert_eq!(s, enc_client(&small));
        assert_eq!(&s[4..8], b"SWB1");
    }
}

#[test]
fn client_msg_id_wire_layout() {
    // hi = the first 8 bytes of the id read big-endian, stored little-endian in the Uuid struct.
    let frame = ClientFrame::Send(SendReq {
        client_msg_id: ClientMsgId(*b"0123456789abcdef"),
        ..send(Target::Chat(ChatId(1)), Vec::new())
    });
    let bytes = enc_client(&frame);
    let env = fb::root_as_envelope(&bytes).unwrap();
    let uuid = env
        .body_as_send()
        .unwrap()
        .client_msg_id()
        .copied()
        .unwrap();
    assert_eq!(uuid.hi(), u64::from_be_bytes(*b"01234567"));
    assert_eq!(uuid.lo(), u64::from_be_bytes(*b"89abcdef"));
}

// ------------------------------------------------------------------------------- never panics

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform enough in `0..n` for `n > 0`.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Decodes `bytes` both ways and as an event; whatever decodes must survive encode → decode
/// unchanged (decoding normalises, and normalising twice changes nothing).
fn decode_all_and_round_trip(enc: &mut Encoder, bytes: &[u8]) -> (bool, bool, bool) {
    let client = decode_client(bytes);
    if let Ok(f) = &client {
        let again = decode_client(enc.encode_client(f));
        assert_eq!(
            again.as_ref(),
            Ok(f),
            "client frame does not round-trip; input {bytes:02x?}"
        );
    }
    let server = decode_server(bytes);
    if let Ok(f) = &server {
        let again = decode_server(enc.encode_server(f));
        assert_eq!(
            again.as_ref(),
            Ok(f),
            "server frame does not round-trip; input {bytes:02x?}"
        );
    }
    let event = decode_event(bytes);
    if let Ok(e) = &event {
        let again = decode_event(enc.encode_event(e));
        assert_eq!(
            again.as_ref(),
            Ok(e),
            "event does not round-trip; input {bytes:02x?}"
        );
    }
    for e in [client.as_ref().err(), event.as_ref().err()]
        .into_iter()
        .flatten()
    {
        let _ = (e.code(), e.to_string());
    }
    (client.is_ok(), server.is_ok(), event.is_ok())
}

/// Mutates valid encodings of every frame kind (bit flips, byte overwrites with edge values,
/// truncation, insertion, deletion, copying a run over another) and of events, and feeds them,
/// plus random buffers with and without an identifier, to all three decoders. A panic fails the
/// test; so does a decoded frame or event that does not round-trip. Deterministic: the seed is
/// fixed.
#[test]
fn decoders_never_panic_on_mutated_or_random_input() {
    const MUTATED_ITERATIONS: usize = 200_000;
    const RANDOM_ITERATIONS: usize = 20_000;
    const INTERESTING: [u8; 8] = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff, 0x04, 0x08];

    // Small frames only, so each iteration copies a few hundred bytes at most.
    let mut enc = Encoder::new();
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    corpus.extend(
        client_frames()
            .iter()
            .map(|f| enc.encode_client(f).to_vec()),
    );
    corpus.extend(
        server_frames()
            .iter()
            .map(|f| enc.encode_server(f).to_vec()),
    );
    corpus.push(raw::receipt(1, 2, fb::ReceiptKind(9)));
    corpus.push(raw::error(fb::ErrorCode(777), "new"));
    let three = ServerFrame::HistoryPage(HistoryPage {
        request_id: 1,
        chat: ChatId(9),
        messages: vec![msg(9, 3, 4), msg(9, 2, 0), msg(9, 1, 8)],
        has_more: true,
    });
    corpus.push(enc.encode_server(&three).to_vec());
    corpus.push(raw::block_without_flag(3));
    // Rejected as they are; a mutation or two away from frames that decode.
    corpus.push(enc_client(&ClientFrame::SetPrivacy {
        request_id: 1,
        last_seen: Visibility(3),
        online: Visibility::Contacts,
    }));
    corpus.push(enc_client(&ClientFrame::Subscribe {
        request_id: 2,
        users: vec![UserId(4), UserId(0), UserId(4)],
    }));
    corpus.extend(events().iter().map(encode_event));
    corpus.retain(|c| c.len() <= 2048);
    assert!(corpus.len() >= 96);

    let mut rng = Rng(0x5eed_0f5b_1c0d_ec00);
    let (mut ok_client, mut ok_server, mut ok_event) = (0usize, 0usize, 0usize);
    let mut buf = Vec::with_capacity(4096);
    for _ in 0..MUTATED_ITERATIONS {
        buf.clear();
        buf.extend_from_slice(&corpus[rng.below(corpus.len())]);
        for _ in 0..1 + rng.below(4) {
            let len = buf.len();
            match rng.below(7) {
                0 if len > 0 => {
                    let i = rng.below(len);
                    buf[i] ^= 1 << rng.below(8);
                }
                1 if len > 0 => {
                    let i = rng.below(len);
                    buf[i] = INTERESTING[rng.below(INTERESTING.len())];
                }
                2 => buf.truncate(rng.below(len + 1)),
                3 => {
                    let i = rng.below(len + 1);
                    buf.insert(i, rng.next() as u8);
                }
                4 if len > 0 => {
                    buf.remove(rng.below(len));
                }
                5 if len >= 8 => {
                    // Overwrite a 4-byte word (often an offset) with a nearby small value.
                    let i = rng.below(len - 3) & !3;
                    let v = (rng.below(2 * len) as u32).to_le_bytes();
                    buf[i..i + 4].copy_from_slice(&v);
                }
                6 if len > 1 => {
                    let (from, to) = (rng.below(len), rng.below(len));
                    let n = rng.below(len - from.max(to)).min(16);
                    buf.copy_within(from..from + n, to);
                }
                _ => {}
            }
        }
        let (c, s, e) = decode_all_and_round_trip(&mut enc, &buf);
        ok_client += c as usize;
        ok_server += s as usize;
        ok_event += e as usize;
    }

    for i in 0..RANDOM_ITERATIONS {
        buf.clear();
        let len = rng.below(256);
        buf.extend((0..len).map(|_| rng.next() as u8));
        if i % 2 == 0 && len >= 8 {
            // Plant a plausible header so the verifier, not the identifier check, does the work.
            let root = (rng.below(len) as u32 & !3).to_le_bytes();
            buf[0..4].copy_from_slice(&root);
            let ident: &[u8; 4] = if i % 4 == 0 { b"SWB1" } else { b"SWE1" };
            buf[4..8].copy_from_slice(ident);
        }
        decode_all_and_round_trip(&mut enc, &buf);
    }

    // The mutations must not be so destructive that nothing decodes: then the field rules and
    // the round-trip assertion above would never run.
    eprintln!("decoded ok: client {ok_client}, server {ok_server}, event {ok_event}");
    assert!(
        ok_client > 1_000 && ok_server > 1_000 && ok_event > 1_000,
        "decoded ok: client {ok_client}, server {ok_server}, event {ok_event}"
    );
}

#[test]
fn repeated_media_ids_are_recorded_once() {
    let f = ClientFrame::Send(SendReq {
        media_ids: vec!["a".to_owned(), "b".to_owned(), "a".to_owned()],
        ..send(Target::Chat(ChatId(1)), vec![1])
    });
    let ClientFrame::Send(got) = decode_client(&enc_client(&f)).expect("decodes") else {
        panic!("a send");
    };
    assert_eq!(got.media_ids, vec!["a".to_owned(), "b".to_owned()]);
}
