//! The verified codec: WebSocket message bytes ⇄ owned frames.
//!
//! ```text
//!  decode:  bytes ─► length ≤ limit ─► identifier "SWB1" ─► bounded FlatBuffers verifier
//!                 ─► body type (known? right direction?) ─► field rules ─► ClientFrame / ServerFrame
//!  encode:  ClientFrame / ServerFrame ─► one reused FlatBufferBuilder ─► &[u8] (valid until the next encode)
//!
//!  events:  ChatEvent ─► encode_event ─► "SWE1" buffer ─► Message.payload (content_kind Event) / the log
//!           bytes ─► length ≤ PAYLOAD_BYTES_MAX ─► identifier "SWE1" ─► bounded verifier ─► rules ─► ChatEvent
//! ```
//!
//! Decoding never panics and never reads through an offset the verifier has not checked: every way
//! a frame can be wrong becomes a [`DecodeError`], and [`DecodeError::code`] gives the
//! [`ErrorCode`] the server answers with.
//!
//! Encoding trusts its input (frames come from our own code) and does not validate it; the peer's
//! decoder is the check. It does not allocate once the builder has grown to the largest frame seen.

use std::fmt;

use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, VerifierOptions, WIPOffset};

use crate::fb;
use crate::frames::{
    ChatEvent, ClientFrame, CreateGroupReq, ErrorCode, ErrorFrame, EventKind, GroupInfo, GroupOp,
    GroupUpdateReq, HistoryPage, Message, Presence, Receipt, ReceiptKind, ReceiptList, SendAck,
    SendReq, ServerFrame, Target,
};
use crate::ids::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};
use crate::limits::{
    EDIT_PAYLOAD_BYTES_MAX, ERROR_TEXT_BYTES_MAX, FRAME_BYTES_MAX, GROUP_DESCRIPTION_BYTES_MAX,
    GROUP_NAME_BYTES_MAX, GROUP_USERS_MAX, HISTORY_PAGE_MESSAGES_DEFAULT,
    HISTORY_PAGE_MESSAGES_MAX, MEDIA_ID_BYTES_MAX, PAYLOAD_BYTES_MAX, PRESENCE_SUBSCRIPTIONS_MAX,
    REACTION_BYTES_MAX, SEND_MEDIA_IDS_MAX, SEND_MEDIA_ID_BYTES_MAX, SERVER_FRAME_BYTES_MAX,
    SYNC_CURSORS_MAX, VERIFIER_DEPTH_MAX, VERIFIER_TABLES_MAX,
};

/// The file identifier of a [`ChatEvent`] buffer (the payload of a `Message` whose content kind
/// is `Event`). Distinct from the envelope's `"SWB1"` so neither can be mistaken for the other.
pub const EVENT_IDENTIFIER: &str = "SWE1";

// ---------------------------------------------------------------------------------------- errors

/// Why a frame was rejected. All of these are the peer's fault (a client bug, a newer or older
/// protocol version, or an attacker); none is a bug on this side.
///
/// The variants are grouped by how far decoding got. [`DecodeError::code`] maps each to the
/// [`ErrorCode`] sent back in an `Error` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    // ---- The bytes are not a Switchboard envelope. ------------------------------------------
    /// The message is longer than the limit for its direction ([`FRAME_BYTES_MAX`] for client
    /// frames, [`SERVER_FRAME_BYTES_MAX`] for server frames, [`PAYLOAD_BYTES_MAX`] for an event).
    /// Checked before anything is parsed. → [`ErrorCode::FrameTooLarge`].
    TooLarge { len: usize, max: usize },
    /// Shorter than the 8-byte FlatBuffers header, or its file identifier is not `"SWB1"` (an
    /// envelope) or [`EVENT_IDENTIFIER`] (an event). → [`ErrorCode::MalformedFrame`].
    BadIdentifier,
    /// The FlatBuffers verifier rejected the buffer: an offset out of bounds, a misaligned value,
    /// invalid UTF-8, an inconsistent union, or one of the verifier's depth/table/size bounds.
    /// Holds the verifier's description. → [`ErrorCode::MalformedFrame`].
    Verify(String),

    // ---- A well-formed envelope, but not a frame this side accepts. --------------------------
    /// The envelope has no body (union type `NONE`). → [`ErrorCode::MalformedFrame`].
    MissingBody,
    /// A union member this version does not know (sent by a newer peer).
    /// → [`ErrorCode::UnsupportedFrame`].
    UnknownBody(u8),
    /// A known frame sent in the wrong direction: a server frame from a client or a client frame
    /// from the server. Holds the union type. → [`ErrorCode::UnsupportedFrame`].
    WrongDirection { body: u8 },

    // ---- A known frame with a field that breaks a rule. --------------------------------------
    /// A `Send` or `Message` payload longer than [`PAYLOAD_BYTES_MAX`], or an `Edit` (or
    /// `Edited` event) payload longer than [`EDIT_PAYLOAD_BYTES_MAX`]; `max` is the limit broken.
    /// → [`ErrorCode::PayloadTooLarge`].
    PayloadTooLarge { len: usize, max: usize },
    /// A `Sync` with more than [`SYNC_CURSORS_MAX`] cursors. → [`ErrorCode::TooManyCursors`].
    TooManyCursors { n: usize },
    /// A `Subscribe` naming more than [`PRESENCE_SUBSCRIPTIONS_MAX`] users.
    /// → [`ErrorCode::TooManySubscriptions`].
    TooManySubscriptions { n: usize },
    /// Any other field rule broken (a zero id, a missing field, …); the text names the rule.
    /// → [`ErrorCode::InvalidArgument`].
    Invalid(&'static str),
}

impl DecodeError {
    /// The wire error code to answer this error with.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::BadIdentifier | DecodeError::Verify(_) | DecodeError::MissingBody => {
                ErrorCode::MalformedFrame
            }
            DecodeError::UnknownBody(_) | DecodeError::WrongDirection { .. } => {
                ErrorCode::UnsupportedFrame
            }
            DecodeError::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
            DecodeError::TooManyCursors { .. } => ErrorCode::TooManyCursors,
            DecodeError::TooManySubscriptions { .. } => ErrorCode::TooManySubscriptions,
            DecodeError::Invalid(_) => ErrorCode::InvalidArgument,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes is over the {max}-byte limit")
            }
            DecodeError::BadIdentifier => {
                f.write_str("not a Switchboard buffer (missing or wrong file identifier)")
            }
            DecodeError::Verify(why) => write!(f, "invalid FlatBuffer: {why}"),
            DecodeError::MissingBody => f.write_str("envelope has no body"),
            DecodeError::UnknownBody(t) => write!(f, "unknown frame type {t}"),
            DecodeError::WrongDirection { body } => {
                let name = fb::Body(*body).variant_name().unwrap_or("?");
                write!(f, "frame type {name} is not accepted in this direction")
            }
            DecodeError::PayloadTooLarge { len, max } => {
                write!(f, "payload of {len} bytes is over the {max}-byte limit")
            }
            DecodeError::TooManyCursors { n } => {
                write!(
                    f,
                    "{n} sync cursors is over the limit of {SYNC_CURSORS_MAX}"
                )
            }
            DecodeError::TooManySubscriptions { n } => {
                write!(
                    f,
                    "{n} presence subscriptions is over the limit of {PRESENCE_SUBSCRIPTIONS_MAX}"
                )
            }
            DecodeError::Invalid(rule) => write!(f, "invalid frame: {rule}"),
        }
    }
}

impl std::error::Error for DecodeError {}

// -------------------------------------------------------------------------------------- decoding

/// Bytes before the root table: the root offset and the file identifier.
const HEADER_BYTES: usize = flatbuffers::SIZE_UOFFSET + flatbuffers::FILE_IDENTIFIER_LENGTH;

/// Verifier bounds. The apparent size (bytes the verifier looks at, counting shared data once
/// per reference) is capped at the frame limit: a client frame has no nested tables that could
/// share data, and a server frame's shared vtables add a few KiB at most, far below the gap the
/// server keeps between a full history page and [`SERVER_FRAME_BYTES_MAX`]. The cap is also what
/// stops a crafted history page from pointing many entries at one large message to amplify the
/// copy into owned frames.
const fn verifier_options(max_apparent_size: usize) -> VerifierOptions {
    VerifierOptions {
        max_depth: VERIFIER_DEPTH_MAX,
        max_tables: VERIFIER_TABLES_MAX,
        max_apparent_size,
        ignore_missing_null_terminator: false,
    }
}
const CLIENT_VERIFIER: VerifierOptions = verifier_options(FRAME_BYTES_MAX);
const SERVER_VERIFIER: VerifierOptions = verifier_options(SERVER_FRAME_BYTES_MAX);
/// An event travels as a message payload, so it is bounded like one.
const EVENT_VERIFIER: VerifierOptions = verifier_options(PAYLOAD_BYTES_MAX);

// Rule texts shared by several frames (and events) that carry the same field.
const GROUP_NAME_TOO_LONG: &str = "group name is longer than GROUP_NAME_BYTES_MAX bytes";
const GROUP_NAME_EMPTY: &str = "group name must not be empty";
const GROUP_DESCRIPTION_TOO_LONG: &str =
    "group description is longer than GROUP_DESCRIPTION_BYTES_MAX bytes";
const AVATAR_TOO_LONG: &str = "avatar_media_id is longer than MEDIA_ID_BYTES_MAX bytes";
const REACTION_TOO_LONG: &str = "reaction is longer than REACTION_BYTES_MAX bytes";

/// Decodes one frame sent by a client (on the server).
///
/// Field rules beyond the schema: `Send` needs a non-nil `client_msg_id`, exactly one of
/// `chat_id`/`peer_user` non-zero, and a payload (possibly empty) of at most
/// [`PAYLOAD_BYTES_MAX`]; `Delivered`/`Read` need a non-zero chat and seq; `Sync` carries at most
/// [`SYNC_CURSORS_MAX`] cursors, each with a non-zero chat; `History` needs a non-zero chat, and
/// its `limit` is normalised (0 → [`HISTORY_PAGE_MESSAGES_DEFAULT`], clamped to
/// [`HISTORY_PAGE_MESSAGES_MAX`]). Unknown `ContentKind` values pass through: a newer client may
/// know kinds this server does not, and the server never looks inside payloads.
///
/// Groups and message actions: `CreateGroup` needs a non-nil `client_msg_id`, a name of 1 to
/// [`GROUP_NAME_BYTES_MAX`] bytes, a description of at most [`GROUP_DESCRIPTION_BYTES_MAX`], an
/// avatar id of at most [`MEDIA_ID_BYTES_MAX`], and at most [`GROUP_USERS_MAX`] members, all
/// non-zero. `GroupUpdate` needs a non-nil `client_msg_id`, a chat and a known `op`; the member
/// ops need 1 to [`GROUP_USERS_MAX`] non-zero users, `SetInfo` at least one of the three strings
/// (a present name is non-empty; each within its limit, an empty description or avatar clears
/// it). Fields the op does not use are dropped (see [`GroupUpdateReq`]). `Edit`, `Delete` and
/// `React` need a non-nil `client_msg_id`, a chat and a target seq; an `Edit` payload is present
/// and at most [`EDIT_PAYLOAD_BYTES_MAX`]; a reaction is at most [`REACTION_BYTES_MAX`] (empty
/// removes it). `Typing` and `GetGroupInfo` need a chat, `GetReceipts` a chat and a seq.
///
/// Blocking and presence: `Block` needs a non-zero user. `Subscribe` names at most
/// [`PRESENCE_SUBSCRIPTIONS_MAX`] users ([`DecodeError::TooManySubscriptions`]), all non-zero;
/// duplicates pass through (the server removes them) and an empty list clears the
/// subscriptions. `SetPrivacy` needs known `Visibility` values: unlike the kinds that pass
/// through, a setting the server does not understand cannot be enforced.
pub fn decode_client(bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
    let env = envelope(bytes, FRAME_BYTES_MAX, &CLIENT_VERIFIER)?;
    match env.body_type() {
        fb::Body::Send => send_req(member(env.body_as_send())?).map(ClientFrame::Send),
        fb::Body::Delivered => {
            let d = member(env.body_as_delivered())?;
            let (chat, up_to) = chat_seq(
                d.chat_id(),
                d.up_to_seq(),
                "delivered needs a chat_id and up_to_seq",
            )?;
            Ok(ClientFrame::Delivered { chat, up_to })
        }
        fb::Body::Read => {
            let r = member(env.body_as_read())?;
            let (chat, up_to) = chat_seq(
                r.chat_id(),
                r.up_to_seq(),
                "read needs a chat_id and up_to_seq",
            )?;
            Ok(ClientFrame::Read { chat, up_to })
        }
        fb::Body::Sync => sync(member(env.body_as_sync())?),
        fb::Body::History => {
            let h = member(env.body_as_history())?;
            let chat = nonzero(h.chat_id(), "history needs a chat_id")?;
            let limit = match h.limit() {
                0 => HISTORY_PAGE_MESSAGES_DEFAULT,
                n => n.min(HISTORY_PAGE_MESSAGES_MAX),
            };
            Ok(ClientFrame::History {
                request_id: h.request_id(),
                chat: ChatId(chat),
                before: Seq(h.before_seq()),
                limit,
            })
        }
        fb::Body::Ping => Ok(ClientFrame::Ping {
            nonce: member(env.body_as_ping())?.nonce(),
        }),
        fb::Body::CreateGroup => {
            create_group(member(env.body_as_create_group())?).map(ClientFrame::CreateGroup)
        }
        fb::Body::GroupUpdate => {
            group_update(member(env.body_as_group_update())?).map(ClientFrame::GroupUpdate)
        }
        fb::Body::GetGroupInfo => {
            let g = member(env.body_as_get_group_info())?;
            let chat = nonzero(g.chat_id(), "get_group_info needs a chat_id")?;
            Ok(ClientFrame::GetGroupInfo {
                request_id: g.request_id(),
                chat: ChatId(chat),
            })
        }
        fb::Body::Edit => {
            let e = member(env.body_as_edit())?;
            let (client_msg_id, chat, target) = action(
                e.client_msg_id(),
                e.chat_id(),
                e.target_seq(),
                "edit needs a non-nil client_msg_id, a chat_id and a target_seq",
            )?;
            let payload = e
                .payload()
                .ok_or(DecodeError::Invalid("edit needs a payload"))?
                .bytes();
            bounded_payload(payload.len(), EDIT_PAYLOAD_BYTES_MAX)?;
            Ok(ClientFrame::Edit {
                client_msg_id,
                chat,
                target,
                payload: payload.to_vec(),
            })
        }
        fb::Body::Delete => {
            let d = member(env.body_as_delete())?;
            let (client_msg_id, chat, target) = action(
                d.client_msg_id(),
                d.chat_id(),
                d.target_seq(),
                "delete needs a non-nil client_msg_id, a chat_id and a target_seq",
            )?;
            Ok(ClientFrame::Delete {
                client_msg_id,
                chat,
                target,
            })
        }
        fb::Body::React => {
            let r = member(env.body_as_react())?;
            let (client_msg_id, chat, target) = action(
                r.client_msg_id(),
                r.chat_id(),
                r.target_seq(),
                "react needs a non-nil client_msg_id, a chat_id and a target_seq",
            )?;
            // Absent or empty: remove this user's reaction.
            let reaction = bounded(r.reaction(), REACTION_BYTES_MAX, REACTION_TOO_LONG)?;
            Ok(ClientFrame::React {
                client_msg_id,
                chat,
                target,
                reaction: reaction.unwrap_or("").to_owned(),
            })
        }
        fb::Body::Typing => {
            let t = member(env.body_as_typing())?;
            let chat = nonzero(t.chat_id(), "typing needs a chat_id")?;
            Ok(ClientFrame::Typing {
                chat: ChatId(chat),
                typing: t.typing(),
            })
        }
        fb::Body::GetReceipts => {
            let g = member(env.body_as_get_receipts())?;
            let (chat, seq) =
                chat_seq(g.chat_id(), g.seq(), "get_receipts needs a chat_id and seq")?;
            Ok(ClientFrame::GetReceipts {
                request_id: g.request_id(),
                chat,
                seq,
            })
        }
        fb::Body::Block => {
            let b = member(env.body_as_block())?;
            let user = nonzero(b.user(), "block needs a user")?;
            Ok(ClientFrame::Block {
                request_id: b.request_id(),
                user: UserId(user),
                blocked: b.blocked(),
            })
        }
        fb::Body::Subscribe => subscribe(member(env.body_as_subscribe())?),
        fb::Body::SetPrivacy => {
            let p = member(env.body_as_set_privacy())?;
            if p.last_seen().variant_name().is_none() {
                return Err(DecodeError::Invalid("set_privacy last_seen is unknown"));
            }
            if p.online().variant_name().is_none() {
                return Err(DecodeError::Invalid("set_privacy online is unknown"));
            }
            Ok(ClientFrame::SetPrivacy {
                request_id: p.request_id(),
                last_seen: p.last_seen(),
                online: p.online(),
            })
        }
        other => Err(unexpected_body(other)),
    }
}

/// Decodes one frame sent by the server (in the client library).
///
/// Unknown `ReceiptKind` values (from a newer server) decode as [`ReceiptKind::Delivered`]: any
/// kind a later version adds (say, "played") implies delivery, so the fallback under-reports but
/// never claims a read that did not happen. Unknown `ErrorCode` values decode as
/// [`ErrorCode::Unknown`]. Unknown `ContentKind` values pass through. Error text longer than
/// [`ERROR_TEXT_BYTES_MAX`] is cut on a char boundary rather than rejected, so that the error
/// code still reaches the caller.
///
/// Field rules: a `Message` (alone or in a page) has a non-zero chat and seq and a payload of at
/// most [`PAYLOAD_BYTES_MAX`]; a page's messages belong to the page's chat; a `SendAck` has a
/// non-zero chat and seq; a `Receipt` has a non-zero chat and `1 <= from <= to`. A `GroupInfo`
/// has a non-zero chat and at most [`GROUP_USERS_MAX`] members, none of them user 0 (unknown
/// `MemberRole` values pass through); a `TypingNotice` has a non-zero chat and user; a
/// `ReceiptList` has a non-zero chat and seq and at most [`GROUP_USERS_MAX`] non-zero users in
/// each list. A `Presence` has a non-zero user.
pub fn decode_server(bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
    let env = envelope(bytes, SERVER_FRAME_BYTES_MAX, &SERVER_VERIFIER)?;
    match env.body_type() {
        fb::Body::SendAck => {
            let a = member(env.body_as_send_ack())?;
            let (chat, seq) = chat_seq(a.chat_id(), a.seq(), "send_ack needs a chat_id and seq")?;
            Ok(ServerFrame::SendAck(SendAck {
                client_msg_id: a.client_msg_id().map(client_msg_id).unwrap_or_default(),
                chat,
                seq,
                msg_id: MsgId(a.msg_id()),
                timestamp_ms: a.timestamp_ms(),
                duplicate: a.duplicate(),
            }))
        }
        fb::Body::Message => message(member(env.body_as_message())?).map(ServerFrame::Message),
        fb::Body::Receipt => {
            let r = member(env.body_as_receipt())?;
            let chat = nonzero(r.chat_id(), "receipt needs a chat_id")?;
            if r.from_seq() == 0 || r.from_seq() > r.to_seq() {
                return Err(DecodeError::Invalid(
                    "receipt needs 1 <= from_seq <= to_seq",
                ));
            }
            let kind = match r.kind() {
                k if k.variant_name().is_some() => k,
                _ => ReceiptKind::Delivered,
            };
            Ok(ServerFrame::Receipt(Receipt {
                chat: ChatId(chat),
                from: Seq(r.from_seq()),
                to: Seq(r.to_seq()),
                user: UserId(r.user()),
                kind,
            }))
        }
        fb::Body::HistoryPage => history_page(member(env.body_as_history_page())?),
        fb::Body::SyncDone => {
            let d = member(env.body_as_sync_done())?;
            Ok(ServerFrame::SyncDone {
                request_id: d.request_id(),
                messages: d.messages(),
                more: d.more(),
            })
        }
        fb::Body::Error => {
            let e = member(env.body_as_error())?;
            let code = match e.code() {
                c if c.variant_name().is_some() => c,
                _ => ErrorCode::Unknown,
            };
            Ok(ServerFrame::Error(ErrorFrame {
                code,
                text: truncate_utf8(e.text().unwrap_or(""), ERROR_TEXT_BYTES_MAX).to_owned(),
                client_msg_id: e
                    .client_msg_id()
                    .map(client_msg_id)
                    .filter(|id| !id.is_nil()),
                request_id: e.request_id(),
            }))
        }
        fb::Body::Pong => Ok(ServerFrame::Pong {
            nonce: member(env.body_as_pong())?.nonce(),
        }),
        fb::Body::GroupInfo => group_info(member(env.body_as_group_info())?),
        fb::Body::TypingNotice => {
            let t = member(env.body_as_typing_notice())?;
            if t.chat_id() == 0 || t.user() == 0 {
                return Err(DecodeError::Invalid(
                    "typing_notice needs a chat_id and user",
                ));
            }
            Ok(ServerFrame::TypingNotice {
                chat: ChatId(t.chat_id()),
                user: UserId(t.user()),
                typing: t.typing(),
            })
        }
        fb::Body::ReceiptList => receipt_list(member(env.body_as_receipt_list())?),
        fb::Body::Done => Ok(ServerFrame::Done {
            request_id: member(env.body_as_done())?.request_id(),
        }),
        fb::Body::Presence => {
            let p = member(env.body_as_presence())?;
            let user = nonzero(p.user(), "presence needs a user")?;
            Ok(ServerFrame::Presence(Presence {
                user: UserId(user),
                online: p.online(),
                last_seen_ms: p.last_seen_ms(),
                hidden: p.hidden(),
            }))
        }
        fb::Body::PrekeysLow => {
            let p = member(env.body_as_prekeys_low())?;
            if p.device_id() == 0 {
                return Err(DecodeError::Invalid("prekeys_low needs a device_id"));
            }
            Ok(ServerFrame::PrekeysLow {
                device: DeviceId(p.device_id()),
                remaining: p.remaining(),
            })
        }
        other => Err(unexpected_body(other)),
    }
}

/// Decodes a [`ChatEvent`]: the payload of a `Message` whose content kind is `Event`, and the
/// form events take in the server's log.
///
/// Checks, cheapest first: at most [`PAYLOAD_BYTES_MAX`] bytes, the identifier
/// [`EVENT_IDENTIFIER`], the bounded verifier, then the rules: a known `EventKind` and
/// `MemberRole` (the server is the only writer, so an unknown value is an error here; a client
/// skips events it cannot decode), at most [`GROUP_USERS_MAX`] users, none of them 0, strings
/// within the group limits, a reaction of at most [`REACTION_BYTES_MAX`], a payload of at most
/// [`EDIT_PAYLOAD_BYTES_MAX`], and a non-zero target seq for `Edited`, `Deleted` and `Reacted`.
/// Unlike frames, nothing is normalised: an event decodes to exactly what was encoded.
pub fn decode_event(bytes: &[u8]) -> Result<ChatEvent, DecodeError> {
    if bytes.len() > PAYLOAD_BYTES_MAX {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max: PAYLOAD_BYTES_MAX,
        });
    }
    // `buffer_has_identifier` asserts that the header is there, so the length goes first.
    if bytes.len() < HEADER_BYTES
        || !flatbuffers::buffer_has_identifier(bytes, EVENT_IDENTIFIER, false)
    {
        return Err(DecodeError::BadIdentifier);
    }
    let e = flatbuffers::root_with_opts::<fb::ChatEvent>(&EVENT_VERIFIER, bytes)
        .map_err(verify_error)?;
    let kind = e.kind();
    if kind.variant_name().is_none() {
        return Err(DecodeError::Invalid("chat_event kind is unknown"));
    }
    if e.role().variant_name().is_none() {
        return Err(DecodeError::Invalid("chat_event role is unknown"));
    }
    let target = Seq(e.target_seq());
    let needs_target = matches!(
        kind,
        EventKind::Edited | EventKind::Deleted | EventKind::Reacted
    );
    if needs_target && target.0 == 0 {
        return Err(DecodeError::Invalid(
            "chat_event Edited, Deleted and Reacted need a target_seq",
        ));
    }
    let users = user_ids(
        e.users(),
        "chat_event names more than GROUP_USERS_MAX users",
        "chat_event user ids must be non-zero",
    )?;
    let name = bounded(e.name(), GROUP_NAME_BYTES_MAX, GROUP_NAME_TOO_LONG)?;
    let description = bounded(
        e.description(),
        GROUP_DESCRIPTION_BYTES_MAX,
        GROUP_DESCRIPTION_TOO_LONG,
    )?;
    let avatar = bounded(e.avatar_media_id(), MEDIA_ID_BYTES_MAX, AVATAR_TOO_LONG)?;
    let reaction = bounded(e.reaction(), REACTION_BYTES_MAX, REACTION_TOO_LONG)?;
    let payload = e.payload().map(|p| p.bytes()).unwrap_or_default();
    bounded_payload(payload.len(), EDIT_PAYLOAD_BYTES_MAX)?;
    Ok(ChatEvent {
        kind,
        users,
        role: e.role(),
        name: name.map(str::to_owned),
        description: description.map(str::to_owned),
        avatar_media_id: avatar.map(str::to_owned),
        admins_only: e.admins_only(),
        target,
        payload: payload.to_vec(),
        reaction: reaction.unwrap_or("").to_owned(),
    })
}

/// Size check, identifier check and verification, in that order: the cheap checks first, and
/// nothing is parsed in a buffer over the limit.
fn envelope<'b>(
    bytes: &'b [u8],
    max: usize,
    opts: &VerifierOptions,
) -> Result<fb::Envelope<'b>, DecodeError> {
    if bytes.len() > max {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            max,
        });
    }
    // `buffer_has_identifier` asserts that the header is there, so the length goes first.
    if bytes.len() < HEADER_BYTES || !fb::envelope_buffer_has_identifier(bytes) {
        return Err(DecodeError::BadIdentifier);
    }
    fb::root_as_envelope_with_opts(opts, bytes).map_err(verify_error)
}

fn verify_error(e: flatbuffers::InvalidFlatbuffer) -> DecodeError {
    // The verifier's text spans several lines (the error, then a trace); keep one line.
    let text = e.to_string();
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    DecodeError::Verify(parts.join("; "))
}

/// The union member's table. The verifier guarantees it is present for a known body type; a
/// missing one is still an error rather than a panic.
fn member<T>(table: Option<T>) -> Result<T, DecodeError> {
    table.ok_or(DecodeError::MissingBody)
}

/// The error for a body type the caller's direction has no arm for.
fn unexpected_body(body: fb::Body) -> DecodeError {
    match body {
        fb::Body::NONE => DecodeError::MissingBody,
        b if b.variant_name().is_none() => DecodeError::UnknownBody(b.0),
        b => DecodeError::WrongDirection { body: b.0 },
    }
}

fn nonzero(v: u64, rule: &'static str) -> Result<u64, DecodeError> {
    if v == 0 {
        Err(DecodeError::Invalid(rule))
    } else {
        Ok(v)
    }
}

fn chat_seq(chat: u64, seq: u64, rule: &'static str) -> Result<(ChatId, Seq), DecodeError> {
    if chat == 0 || seq == 0 {
        return Err(DecodeError::Invalid(rule));
    }
    Ok((ChatId(chat), Seq(seq)))
}

fn client_msg_id(u: &fb::Uuid) -> ClientMsgId {
    ClientMsgId::from_halves(u.hi(), u.lo())
}

fn payload_ok(len: usize) -> Result<(), DecodeError> {
    bounded_payload(len, PAYLOAD_BYTES_MAX)
}

fn bounded_payload(len: usize, max: usize) -> Result<(), DecodeError> {
    if len > max {
        return Err(DecodeError::PayloadTooLarge { len, max });
    }
    Ok(())
}

/// An optional string of at most `max` bytes (the verifier has checked that it is UTF-8).
fn bounded<'a>(
    s: Option<&'a str>,
    max: usize,
    rule: &'static str,
) -> Result<Option<&'a str>, DecodeError> {
    match s {
        Some(s) if s.len() > max => Err(DecodeError::Invalid(rule)),
        s => Ok(s),
    }
}

fn non_nil(id: Option<&fb::Uuid>, rule: &'static str) -> Result<ClientMsgId, DecodeError> {
    let id = id.map(client_msg_id).unwrap_or_default();
    if id.is_nil() {
        return Err(DecodeError::Invalid(rule));
    }
    Ok(id)
}

/// The ids every message action (`Edit`, `Delete`, `React`) needs: all three non-zero.
fn action(
    id: Option<&fb::Uuid>,
    chat: u64,
    target: u64,
    rule: &'static str,
) -> Result<(ClientMsgId, ChatId, Seq), DecodeError> {
    let id = non_nil(id, rule)?;
    let (chat, target) = chat_seq(chat, target, rule)?;
    Ok((id, chat, target))
}

/// A list of at most [`GROUP_USERS_MAX`] non-zero user ids; absent reads as empty.
fn user_ids(
    v: Option<flatbuffers::Vector<'_, u64>>,
    too_many: &'static str,
    zero: &'static str,
) -> Result<Vec<UserId>, DecodeError> {
    let Some(v) = v else {
        return Ok(Vec::new());
    };
    // Checked before allocating: the verifier has bounded `len` by the buffer size only.
    if v.len() > GROUP_USERS_MAX {
        return Err(DecodeError::Invalid(too_many));
    }
    let mut out = Vec::with_capacity(v.len());
    for u in v.iter() {
        out.push(UserId(nonzero(u, zero)?));
    }
    Ok(out)
}

fn create_group(c: fb::CreateGroup<'_>) -> Result<CreateGroupReq, DecodeError> {
    let client_msg_id = non_nil(
        c.client_msg_id(),
        "create_group needs a non-nil client_msg_id",
    )?;
    let name = match bounded(c.name(), GROUP_NAME_BYTES_MAX, GROUP_NAME_TOO_LONG)? {
        Some(name) if !name.is_empty() => name,
        _ => return Err(DecodeError::Invalid("create_group needs a name")),
    };
    let description = bounded(
        c.description(),
        GROUP_DESCRIPTION_BYTES_MAX,
        GROUP_DESCRIPTION_TOO_LONG,
    )?;
    let avatar = bounded(c.avatar_media_id(), MEDIA_ID_BYTES_MAX, AVATAR_TOO_LONG)?;
    let members = user_ids(
        c.members(),
        "create_group names more than GROUP_USERS_MAX members",
        "create_group member ids must be non-zero",
    )?;
    Ok(CreateGroupReq {
        request_id: c.request_id(),
        client_msg_id,
        name: name.to_owned(),
        description: description.unwrap_or("").to_owned(),
        avatar_media_id: avatar.unwrap_or("").to_owned(),
        members,
        admins_only: c.admins_only(),
    })
}

fn group_update(u: fb::GroupUpdate<'_>) -> Result<GroupUpdateReq, DecodeError> {
    let client_msg_id = non_nil(
        u.client_msg_id(),
        "group_update needs a non-nil client_msg_id",
    )?;
    let chat = ChatId(nonzero(u.chat_id(), "group_update needs a chat_id")?);
    // Only the fields `op` uses are kept, so the engine never sees (or stores) the others.
    let mut req = GroupUpdateReq::new(client_msg_id, chat, u.op());
    match u.op() {
        GroupOp::AddMembers | GroupOp::RemoveMembers | GroupOp::Promote | GroupOp::Demote => {
            req.users = user_ids(
                u.users(),
                "group_update names more than GROUP_USERS_MAX users",
                "group_update user ids must be non-zero",
            )?;
            if req.users.is_empty() {
                return Err(DecodeError::Invalid(
                    "group_update member ops need at least one user",
                ));
            }
        }
        GroupOp::SetInfo => {
            let name = bounded(u.name(), GROUP_NAME_BYTES_MAX, GROUP_NAME_TOO_LONG)?;
            let description = bounded(
                u.description(),
                GROUP_DESCRIPTION_BYTES_MAX,
                GROUP_DESCRIPTION_TOO_LONG,
            )?;
            let avatar = bounded(u.avatar_media_id(), MEDIA_ID_BYTES_MAX, AVATAR_TOO_LONG)?;
            if name.is_none() && description.is_none() && avatar.is_none() {
                return Err(DecodeError::Invalid(
                    "group_update SetInfo needs a name, description or avatar_media_id",
                ));
            }
            if name == Some("") {
                return Err(DecodeError::Invalid(GROUP_NAME_EMPTY));
            }
            req.name = name.map(str::to_owned);
            req.description = description.map(str::to_owned);
            req.avatar_media_id = avatar.map(str::to_owned);
        }
        GroupOp::SetAdminsOnly => req.admins_only = u.admins_only(),
        GroupOp::Leave => {}
        _ => return Err(DecodeError::Invalid("group_update op is unknown")),
    }
    Ok(req)
}

fn group_info(g: fb::GroupInfo<'_>) -> Result<ServerFrame, DecodeError> {
    let chat = ChatId(nonzero(g.chat_id(), "group_info needs a chat_id")?);
    let members = match g.members() {
        None => Vec::new(),
        Some(v) => {
            if v.len() > GROUP_USERS_MAX {
                return Err(DecodeError::Invalid(
                    "group_info has more than GROUP_USERS_MAX members",
                ));
            }
            let mut out = Vec::with_capacity(v.len());
            for m in v.iter() {
                let user = nonzero(m.user(), "group_info member ids must be non-zero")?;
                // A role a newer server added passes through, like an unknown content kind.
                out.push((UserId(user), m.role()));
            }
            out
        }
    };
    Ok(ServerFrame::GroupInfo(GroupInfo {
        request_id: g.request_id(),
        chat,
        name: g.name().unwrap_or("").to_owned(),
        description: g.description().unwrap_or("").to_owned(),
        avatar_media_id: g.avatar_media_id().unwrap_or("").to_owned(),
        members,
        admins_only: g.admins_only(),
        created_ms: g.created_ms(),
        last_seq: Seq(g.last_seq()),
    }))
}

fn receipt_list(r: fb::ReceiptList<'_>) -> Result<ServerFrame, DecodeError> {
    let (chat, seq) = chat_seq(r.chat_id(), r.seq(), "receipt_list needs a chat_id and seq")?;
    let list = |v| {
        user_ids(
            v,
            "receipt_list has more than GROUP_USERS_MAX users in a list",
            "receipt_list user ids must be non-zero",
        )
    };
    Ok(ServerFrame::ReceiptList(ReceiptList {
        request_id: r.request_id(),
        chat,
        seq,
        delivered: list(r.delivered())?,
        read: list(r.read())?,
        pending: list(r.pending())?,
    }))
}

fn send_req(s: fb::Send<'_>) -> Result<SendReq, DecodeError> {
    let client_msg_id = s.client_msg_id().map(client_msg_id).unwrap_or_default();
    if client_msg_id.is_nil() {
        return Err(DecodeError::Invalid("send needs a non-nil client_msg_id"));
    }
    let target = match (s.chat_id(), s.peer_user()) {
        (chat, 0) if chat != 0 => Target::Chat(ChatId(chat)),
        (0, peer) if peer != 0 => Target::Peer(UserId(peer)),
        _ => {
            return Err(DecodeError::Invalid(
                "send needs exactly one of chat_id and peer_user",
            ))
        }
    };
    // An absent payload is a client bug; an empty one is allowed (the content kind may say it all).
    let payload = s
        .payload()
        .ok_or(DecodeError::Invalid("send needs a payload"))?
        .bytes();
    payload_ok(payload.len())?;
    // Event and Deleted are written by the server only: a client's message claiming to be one
    // would be misread by every other client (and by storage recovery, for Deleted).
    let content_kind = s.content_kind();
    if content_kind == fb::ContentKind::Event || content_kind == fb::ContentKind::Deleted {
        return Err(DecodeError::Invalid(
            "content_kind Event and Deleted are server-only",
        ));
    }
    let mut media_ids = Vec::new();
    if let Some(ids) = s.media_ids() {
        if ids.len() > SEND_MEDIA_IDS_MAX {
            return Err(DecodeError::Invalid(
                "send has more than SEND_MEDIA_IDS_MAX media_ids",
            ));
        }
        media_ids.reserve_exact(ids.len());
        for id in ids.iter() {
            if !is_valid_media_id(id) {
                return Err(DecodeError::Invalid(
                    "media_ids holds an id that is not 1..=64 of [A-Za-z0-9_-]",
                ));
            }
            if !media_ids.iter().any(|m: &String| m == id) {
                media_ids.push(id.to_owned());
            }
        }
    }
    Ok(SendReq {
        client_msg_id,
        target,
        payload: payload.to_vec(),
        reply_to: Seq(s.reply_to()),
        content_kind,
        forwarded: s.forwarded(),
        media_ids,
    })
}

/// Whether `id` is a media id as the HTTP API mints and accepts them: 1..=`SEND_MEDIA_ID_BYTES_MAX`
/// of `[A-Za-z0-9_-]`.
pub fn is_valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= SEND_MEDIA_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn sync(s: fb::Sync<'_>) -> Result<ClientFrame, DecodeError> {
    let cursors = match s.cursors() {
        None => Vec::new(),
        Some(v) => {
            // Checked before allocating: the verifier has bounded `len` by the frame size only.
            if v.len() > SYNC_CURSORS_MAX {
                return Err(DecodeError::TooManyCursors { n: v.len() });
            }
            let mut out = Vec::with_capacity(v.len());
            for c in v.iter() {
                let chat = nonzero(c.chat_id(), "sync cursor needs a chat_id")?;
                out.push((ChatId(chat), Seq(c.seq())));
            }
            out
        }
    };
    Ok(ClientFrame::Sync {
        request_id: s.request_id(),
        cursors,
    })
}

fn subscribe(s: fb::Subscribe<'_>) -> Result<ClientFrame, DecodeError> {
    let users = match s.users() {
        None => Vec::new(),
        Some(v) => {
            // Checked before allocating: the verifier has bounded `len` by the frame size only.
            if v.len() > PRESENCE_SUBSCRIPTIONS_MAX {
                return Err(DecodeError::TooManySubscriptions { n: v.len() });
            }
            let mut out = Vec::with_capacity(v.len());
            for u in v.iter() {
                out.push(UserId(nonzero(u, "subscribe user ids must be non-zero")?));
            }
            out
        }
    };
    Ok(ClientFrame::Subscribe {
        request_id: s.request_id(),
        users,
    })
}

fn message(m: fb::Message<'_>) -> Result<Message, DecodeError> {
    let (chat, seq) = chat_seq(m.chat_id(), m.seq(), "message needs a chat_id and seq")?;
    let payload = m.payload().map(|p| p.bytes()).unwrap_or_default();
    payload_ok(payload.len())?;
    Ok(Message {
        chat,
        seq,
        msg_id: MsgId(m.msg_id()),
        sender_user: UserId(m.sender_user()),
        sender_device: DeviceId(m.sender_device()),
        timestamp_ms: m.timestamp_ms(),
        payload: payload.to_vec(),
        reply_to: Seq(m.reply_to()),
        content_kind: m.content_kind(),
        client_msg_id: m.client_msg_id().map(client_msg_id).unwrap_or_default(),
        forwarded: m.forwarded(),
    })
}

fn history_page(p: fb::HistoryPage<'_>) -> Result<ServerFrame, DecodeError> {
    let chat = ChatId(nonzero(p.chat_id(), "history_page needs a chat_id")?);
    let messages = match p.messages() {
        None => Vec::new(),
        Some(v) => {
            // `len` is bounded by the verifier's table limit.
            let mut out = Vec::with_capacity(v.len());
            for m in v.iter() {
                let m = message(m)?;
                if m.chat != chat {
                    return Err(DecodeError::Invalid(
                        "history_page holds a message of another chat",
                    ));
                }
                out.push(m);
            }
            out
        }
    };
    Ok(ServerFrame::HistoryPage(HistoryPage {
        request_id: p.request_id(),
        chat,
        messages,
        has_more: p.has_more(),
    }))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    // A char is at most 4 bytes, so this loop runs at most 3 times.
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// -------------------------------------------------------------------------------------- encoding

/// Initial builder capacity: a text message or an ack fits without growing. The builder keeps
/// the largest size it has grown to (at most [`SERVER_FRAME_BYTES_MAX`] plus slack), so one
/// encoder per core costs well under 1 MiB.
const ENCODER_BUFFER_BYTES_INITIAL: usize = 8 * 1024;

/// Encodes frames into one reused buffer.
///
/// Each `encode_*` call resets the builder and returns the finished envelope, borrowed until the
/// next call: copy it into the outgoing WebSocket message (or write it) before encoding again.
/// After warm-up, encoding allocates nothing. Frames are not validated (see the module docs).
pub struct Encoder {
    fbb: FlatBufferBuilder<'static>,
    /// A history page's message offsets: tables cannot be built while a vector is open, so the
    /// offsets are collected first. Kept across calls to reuse its allocation.
    messages: Vec<WIPOffset<fb::Message<'static>>>,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Encoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoder").finish_non_exhaustive()
    }
}

impl Encoder {
    pub fn new() -> Self {
        Encoder {
            fbb: FlatBufferBuilder::with_capacity(ENCODER_BUFFER_BYTES_INITIAL),
            messages: Vec::new(),
        }
    }

    /// Encodes a frame a client sends.
    pub fn encode_client(&mut self, f: &ClientFrame) -> &[u8] {
        let fbb = &mut self.fbb;
        fbb.reset();
        let (body_type, body) = match f {
            ClientFrame::Send(s) => {
                let payload = fbb.create_vector(&s.payload);
                let media_ids = if s.media_ids.is_empty() {
                    None
                } else if s.media_ids.len() <= SEND_MEDIA_IDS_MAX {
                    // On the stack: encoding allocates nothing after warm-up.
                    let mut ids = [flatbuffers::WIPOffset::new(0); SEND_MEDIA_IDS_MAX];
                    for (slot, m) in ids.iter_mut().zip(&s.media_ids) {
                        *slot = fbb.create_string(m);
                    }
                    Some(fbb.create_vector(&ids[..s.media_ids.len()]))
                } else {
                    // More than the server accepts (it will refuse the frame); encoded as asked.
                    let ids: Vec<_> = s.media_ids.iter().map(|m| fbb.create_string(m)).collect();
                    Some(fbb.create_vector(&ids))
                };
                let id = uuid(s.client_msg_id);
                let (chat_id, peer_user) = match s.target {
                    Target::Chat(c) => (c.0, 0),
                    Target::Peer(u) => (0, u.0),
                };
                let args = fb::SendArgs {
                    client_msg_id: Some(&id),
                    chat_id,
                    peer_user,
                    payload: Some(payload),
                    reply_to: s.reply_to.0,
                    content_kind: s.content_kind,
                    forwarded: s.forwarded,
                    media_ids,
                };
                (
                    fb::Body::Send,
                    fb::Send::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Delivered { chat, up_to } => {
                let args = fb::DeliveredArgs {
                    chat_id: chat.0,
                    up_to_seq: up_to.0,
                };
                (
                    fb::Body::Delivered,
                    fb::Delivered::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Read { chat, up_to } => {
                let args = fb::ReadArgs {
                    chat_id: chat.0,
                    up_to_seq: up_to.0,
                };
                (
                    fb::Body::Read,
                    fb::Read::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Sync {
                request_id,
                cursors,
            } => {
                let cursors = fbb.create_vector_from_iter(
                    cursors
                        .iter()
                        .map(|(chat, seq)| fb::Cursor::new(chat.0, seq.0)),
                );
                let args = fb::SyncArgs {
                    request_id: *request_id,
                    cursors: Some(cursors),
                };
                (
                    fb::Body::Sync,
                    fb::Sync::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::History {
                request_id,
                chat,
                before,
                limit,
            } => {
                let args = fb::HistoryArgs {
                    request_id: *request_id,
                    chat_id: chat.0,
                    before_seq: before.0,
                    limit: *limit,
                };
                (
                    fb::Body::History,
                    fb::History::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Ping { nonce } => {
                let args = fb::PingArgs { nonce: *nonce };
                (
                    fb::Body::Ping,
                    fb::Ping::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::CreateGroup(c) => {
                let name = fbb.create_string(&c.name);
                let description = nonempty_string(fbb, &c.description);
                let avatar_media_id = nonempty_string(fbb, &c.avatar_media_id);
                let members = user_vector(fbb, &c.members);
                let id = uuid(c.client_msg_id);
                let args = fb::CreateGroupArgs {
                    request_id: c.request_id,
                    client_msg_id: Some(&id),
                    name: Some(name),
                    description,
                    avatar_media_id,
                    members,
                    admins_only: c.admins_only,
                };
                (
                    fb::Body::CreateGroup,
                    fb::CreateGroup::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::GroupUpdate(u) => {
                let users = user_vector(fbb, &u.users);
                // `Some("")` is written: in `SetInfo` it clears the description or avatar.
                let name = u.name.as_deref().map(|s| fbb.create_string(s));
                let description = u.description.as_deref().map(|s| fbb.create_string(s));
                let avatar_media_id = u.avatar_media_id.as_deref().map(|s| fbb.create_string(s));
                let id = uuid(u.client_msg_id);
                let args = fb::GroupUpdateArgs {
                    client_msg_id: Some(&id),
                    chat_id: u.chat.0,
                    op: u.op,
                    users,
                    name,
                    description,
                    avatar_media_id,
                    admins_only: u.admins_only,
                };
                (
                    fb::Body::GroupUpdate,
                    fb::GroupUpdate::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::GetGroupInfo { request_id, chat } => {
                let args = fb::GetGroupInfoArgs {
                    request_id: *request_id,
                    chat_id: chat.0,
                };
                (
                    fb::Body::GetGroupInfo,
                    fb::GetGroupInfo::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Edit {
                client_msg_id,
                chat,
                target,
                payload,
            } => {
                let payload = fbb.create_vector(payload);
                let id = uuid(*client_msg_id);
                let args = fb::EditArgs {
                    client_msg_id: Some(&id),
                    chat_id: chat.0,
                    target_seq: target.0,
                    payload: Some(payload),
                };
                (
                    fb::Body::Edit,
                    fb::Edit::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Delete {
                client_msg_id,
                chat,
                target,
            } => {
                let id = uuid(*client_msg_id);
                let args = fb::DeleteArgs {
                    client_msg_id: Some(&id),
                    chat_id: chat.0,
                    target_seq: target.0,
                };
                (
                    fb::Body::Delete,
                    fb::Delete::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::React {
                client_msg_id,
                chat,
                target,
                reaction,
            } => {
                let reaction = nonempty_string(fbb, reaction);
                let id = uuid(*client_msg_id);
                let args = fb::ReactArgs {
                    client_msg_id: Some(&id),
                    chat_id: chat.0,
                    target_seq: target.0,
                    reaction,
                };
                (
                    fb::Body::React,
                    fb::React::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Typing { chat, typing } => {
                let args = fb::TypingArgs {
                    chat_id: chat.0,
                    typing: *typing,
                };
                (
                    fb::Body::Typing,
                    fb::Typing::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::GetReceipts {
                request_id,
                chat,
                seq,
            } => {
                let args = fb::GetReceiptsArgs {
                    request_id: *request_id,
                    chat_id: chat.0,
                    seq: seq.0,
                };
                (
                    fb::Body::GetReceipts,
                    fb::GetReceipts::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Block {
                request_id,
                user,
                blocked,
            } => {
                let args = fb::BlockArgs {
                    request_id: *request_id,
                    user: user.0,
                    blocked: *blocked,
                };
                (
                    fb::Body::Block,
                    fb::Block::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::Subscribe { request_id, users } => {
                let users = user_vector(fbb, users);
                let args = fb::SubscribeArgs {
                    request_id: *request_id,
                    users,
                };
                (
                    fb::Body::Subscribe,
                    fb::Subscribe::create(fbb, &args).as_union_value(),
                )
            }
            ClientFrame::SetPrivacy {
                request_id,
                last_seen,
                online,
            } => {
                let args = fb::SetPrivacyArgs {
                    request_id: *request_id,
                    last_seen: *last_seen,
                    online: *online,
                };
                (
                    fb::Body::SetPrivacy,
                    fb::SetPrivacy::create(fbb, &args).as_union_value(),
                )
            }
        };
        finish(fbb, body_type, body)
    }

    /// Encodes a frame the server sends. `Error` text is cut to [`ERROR_TEXT_BYTES_MAX`] bytes on
    /// a char boundary.
    pub fn encode_server(&mut self, f: &ServerFrame) -> &[u8] {
        let fbb = &mut self.fbb;
        fbb.reset();
        let (body_type, body) = match f {
            ServerFrame::SendAck(a) => {
                let id = uuid(a.client_msg_id);
                let args = fb::SendAckArgs {
                    client_msg_id: Some(&id),
                    chat_id: a.chat.0,
                    seq: a.seq.0,
                    msg_id: a.msg_id.0,
                    timestamp_ms: a.timestamp_ms,
                    duplicate: a.duplicate,
                };
                (
                    fb::Body::SendAck,
                    fb::SendAck::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::Message(m) => (fb::Body::Message, message_table(fbb, m).as_union_value()),
            ServerFrame::Receipt(r) => {
                let args = fb::ReceiptArgs {
                    chat_id: r.chat.0,
                    from_seq: r.from.0,
                    to_seq: r.to.0,
                    user: r.user.0,
                    kind: r.kind,
                };
                (
                    fb::Body::Receipt,
                    fb::Receipt::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::HistoryPage(p) => {
                self.messages.clear();
                for m in &p.messages {
                    self.messages.push(message_table(fbb, m));
                }
                let messages = fbb.create_vector(&self.messages);
                let args = fb::HistoryPageArgs {
                    request_id: p.request_id,
                    chat_id: p.chat.0,
                    messages: Some(messages),
                    has_more: p.has_more,
                };
                (
                    fb::Body::HistoryPage,
                    fb::HistoryPage::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::SyncDone {
                request_id,
                messages,
                more,
            } => {
                let args = fb::SyncDoneArgs {
                    request_id: *request_id,
                    messages: *messages,
                    more: *more,
                };
                (
                    fb::Body::SyncDone,
                    fb::SyncDone::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::Error(e) => {
                let text = truncate_utf8(&e.text, ERROR_TEXT_BYTES_MAX);
                // An absent string reads back as "", so an empty one is not written.
                let text = (!text.is_empty()).then(|| fbb.create_string(text));
                let id = e.client_msg_id.map(uuid);
                let args = fb::ErrorArgs {
                    code: e.code,
                    text,
                    client_msg_id: id.as_ref(),
                    request_id: e.request_id,
                };
                (
                    fb::Body::Error,
                    fb::Error::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::Pong { nonce } => {
                let args = fb::PongArgs { nonce: *nonce };
                (
                    fb::Body::Pong,
                    fb::Pong::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::GroupInfo(g) => {
                let name = nonempty_string(fbb, &g.name);
                let description = nonempty_string(fbb, &g.description);
                let avatar_media_id = nonempty_string(fbb, &g.avatar_media_id);
                let members = (!g.members.is_empty()).then(|| {
                    fbb.create_vector_from_iter(
                        g.members
                            .iter()
                            .map(|&(user, role)| fb::Member::new(user.0, role)),
                    )
                });
                let args = fb::GroupInfoArgs {
                    request_id: g.request_id,
                    chat_id: g.chat.0,
                    name,
                    description,
                    avatar_media_id,
                    members,
                    admins_only: g.admins_only,
                    created_ms: g.created_ms,
                    last_seq: g.last_seq.0,
                };
                (
                    fb::Body::GroupInfo,
                    fb::GroupInfo::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::TypingNotice { chat, user, typing } => {
                let args = fb::TypingNoticeArgs {
                    chat_id: chat.0,
                    user: user.0,
                    typing: *typing,
                };
                (
                    fb::Body::TypingNotice,
                    fb::TypingNotice::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::ReceiptList(r) => {
                let delivered = user_vector(fbb, &r.delivered);
                let read = user_vector(fbb, &r.read);
                let pending = user_vector(fbb, &r.pending);
                let args = fb::ReceiptListArgs {
                    request_id: r.request_id,
                    chat_id: r.chat.0,
                    seq: r.seq.0,
                    delivered,
                    read,
                    pending,
                };
                (
                    fb::Body::ReceiptList,
                    fb::ReceiptList::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::Done { request_id } => {
                let args = fb::DoneArgs {
                    request_id: *request_id,
                };
                (
                    fb::Body::Done,
                    fb::Done::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::Presence(p) => {
                let args = fb::PresenceArgs {
                    user: p.user.0,
                    online: p.online,
                    last_seen_ms: p.last_seen_ms,
                    hidden: p.hidden,
                };
                (
                    fb::Body::Presence,
                    fb::Presence::create(fbb, &args).as_union_value(),
                )
            }
            ServerFrame::PrekeysLow { device, remaining } => {
                let args = fb::PrekeysLowArgs {
                    device_id: device.0,
                    remaining: *remaining,
                };
                (
                    fb::Body::PrekeysLow,
                    fb::PrekeysLow::create(fbb, &args).as_union_value(),
                )
            }
        };
        finish(fbb, body_type, body)
    }

    /// Encodes a [`ChatEvent`] as a `"SWE1"` buffer (see [`encode_event`]), borrowed until the
    /// next call. Allocates nothing after warm-up, like the frame encoders.
    pub fn encode_event(&mut self, ev: &ChatEvent) -> &[u8] {
        let fbb = &mut self.fbb;
        fbb.reset();
        let root = event_table(fbb, ev);
        fbb.finish(root, Some(EVENT_IDENTIFIER));
        fbb.finished_data()
    }
}

/// Encodes a [`ChatEvent`] as a FlatBuffer with the identifier [`EVENT_IDENTIFIER`]: the
/// payload of a `Message` whose content kind is `Event`. Not validated, like every encoder here;
/// [`decode_event`] is the check. Uses a fresh builder sized for the event, so the result is
/// one allocation; on a hot path prefer [`Encoder::encode_event`].
pub fn encode_event(ev: &ChatEvent) -> Vec<u8> {
    let strings = [&ev.name, &ev.description, &ev.avatar_media_id]
        .iter()
        .map(|s| s.as_ref().map_or(0, |s| s.len() + 8))
        .sum::<usize>();
    // Header, vtable, scalars and offsets take < 128 bytes; vectors and strings add a length
    // word, a NUL and padding.
    let bytes = 128 + 8 * ev.users.len() + strings + ev.payload.len() + ev.reaction.len() + 16;
    let mut fbb = FlatBufferBuilder::with_capacity(bytes);
    let root = event_table(&mut fbb, ev);
    fbb.finish(root, Some(EVENT_IDENTIFIER));
    // The finished buffer sits at the end of the builder's vector.
    let (mut buf, head) = fbb.collapse();
    buf.drain(..head);
    buf
}

/// An absent string reads back as "", so an empty one is not written.
fn nonempty_string(
    fbb: &mut FlatBufferBuilder<'static>,
    s: &str,
) -> Option<WIPOffset<&'static str>> {
    (!s.is_empty()).then(|| fbb.create_string(s))
}

/// An absent vector reads back as empty, so an empty one is not written.
fn user_vector(
    fbb: &mut FlatBufferBuilder<'static>,
    users: &[UserId],
) -> Option<WIPOffset<flatbuffers::Vector<'static, u64>>> {
    (!users.is_empty()).then(|| fbb.create_vector_from_iter(users.iter().map(|u| u.0)))
}

fn event_table(
    fbb: &mut FlatBufferBuilder<'static>,
    ev: &ChatEvent,
) -> WIPOffset<fb::ChatEvent<'static>> {
    let users = user_vector(fbb, &ev.users);
    // `Some("")` is written: in `InfoChanged` it says the description or avatar was cleared.
    let name = ev.name.as_deref().map(|s| fbb.create_string(s));
    let description = ev.description.as_deref().map(|s| fbb.create_string(s));
    let avatar_media_id = ev.avatar_media_id.as_deref().map(|s| fbb.create_string(s));
    let payload = (!ev.payload.is_empty()).then(|| fbb.create_vector(&ev.payload));
    let reaction = nonempty_string(fbb, &ev.reaction);
    let args = fb::ChatEventArgs {
        kind: ev.kind,
        users,
        role: ev.role,
        name,
        description,
        avatar_media_id,
        admins_only: ev.admins_only,
        target_seq: ev.target.0,
        payload,
        reaction,
    };
    fb::ChatEvent::create(fbb, &args)
}

fn uuid(id: ClientMsgId) -> fb::Uuid {
    let (hi, lo) = id.halves();
    fb::Uuid::new(hi, lo)
}

fn message_table(
    fbb: &mut FlatBufferBuilder<'static>,
    m: &Message,
) -> WIPOffset<fb::Message<'static>> {
    let payload = fbb.create_vector(&m.payload);
    // Server-originated messages have no client id; an absent id reads back as nil.
    let id = (!m.client_msg_id.is_nil()).then(|| uuid(m.client_msg_id));
    let args = fb::MessageArgs {
        chat_id: m.chat.0,
        seq: m.seq.0,
        msg_id: m.msg_id.0,
        sender_user: m.sender_user.0,
        sender_device: m.sender_device.0,
        timestamp_ms: m.timestamp_ms,
        payload: Some(payload),
        reply_to: m.reply_to.0,
        content_kind: m.content_kind,
        client_msg_id: id.as_ref(),
        forwarded: m.forwarded,
    };
    fb::Message::create(fbb, &args)
}

fn finish<'e>(
    fbb: &'e mut FlatBufferBuilder<'static>,
    body_type: fb::Body,
    body: WIPOffset<UnionWIPOffset>,
) -> &'e [u8] {
    let env = fb::Envelope::create(
        fbb,
        &fb::EnvelopeArgs {
            body_type,
            body: Some(body),
        },
    );
    fb::finish_envelope_buffer(fbb, env);
    fbb.finished_data()
}

#[cfg(test)]
mod tests {
    use super::truncate_utf8;

    #[test]
    fn truncate_utf8_respects_char_boundaries() {
        // (input, max, expect)
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, ""),
            ("abc", 3, "abc"),
            ("abc", 2, "ab"),
            ("aé", 2, "a"), // é is 2 bytes
            ("a€", 3, "a"), // € is 3 bytes
            ("a€", 4, "a€"),
            ("😀x", 3, ""), // 😀 is 4 bytes
        ];
        for &(input, max, expect) in cases {
            assert_eq!(
                truncate_utf8(input, max),
                expect,
                "truncate_utf8({input:?}, {max})"
            );
        }
    }
}
