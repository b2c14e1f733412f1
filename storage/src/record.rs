//! The on-disk record format. Pure: no I/O, no clock, no allocation beyond the caller's buffer and
//! the decoded record.
//!
//! # Framing
//!
//! ```text
//! ┌───────────────┬────────────────────┬──────────────────────────────────────────────┐
//! │ u32 LE        │ u32 LE             │ body (body_len bytes)                        │
//! │ body_len      │ crc32c(body)       │ u8 tag │ u8 version │ fields (LE, fixed width) │
//! └───────────────┴────────────────────┴──────────────────────────────────────────────┘
//! ```
//!
//! Bodies, by tag (all integers little-endian, vectors prefixed with a `u32` length):
//!
//! | tag | record        | fields after `tag, version`                                                        |
//! |-----|---------------|------------------------------------------------------------------------------------|
//! | 1   | `ChatCreated` | `chat u64, kind u8, created_ms u64, members_len u32, members [u64]`                |
//! | 2   | `Message`     | `chat u64, seq u64, msg_id u64, sender_user u64, sender_device u32, timestamp_ms u64, client_msg_id [u8;16], reply_to u64, content_kind u8, flags u8 (version 2 only), payload_len u32, payload [u8]` |
//! | 3   | `Cursor`      | `chat u64, user u64, device u32, kind u8, seq u64`                                 |
//! | 4   | `Block`       | `chat u64, blocker u64, blocked u8 (0/1)`                                          |
//! | 5   | `UserMeta`    | `user u64, last_seen_ms u64, last_seen_visibility u8, online_visibility u8`        |
//! | 6   | `Account(Created)` | `user u64, created_ms u64, phone str`                                         |
//! | 7   | `Account(Device)`  | `user u64, device u32, created_ms u64, name str`                              |
//! | 8   | `Account(Revoke)`  | `user u64, device u32, through_s u64, removed u8 (0/1)`                       |
//! | 9   | `Account(Profile)` | `user u64, display_name str, about str, avatar_media_id str`                  |
//! | 10  | `Account(Keys)`    | `user u64, device u32, keys_len u32, keys [u8]`                               |
//! | 11  | `Account(PrekeyTaken)` | `user u64, device u32`                                                    |
//! | 12  | `MediaGrant`  | `chat u64, seq u64, media_id_len u8, media_id [u8] ([A-Za-z0-9_-], 1..=64)`         |
//!
//! `str` is a `u16` length and UTF-8 bytes, at most [`ACCOUNT_TEXT_BYTES_MAX`].
//!
//! Decoding is strict: the CRC must match, the tag and version must be known, every length is
//! bounded (`RECORD_BYTES_MAX`, `CHAT_MEMBERS_MAX`, `PAYLOAD_BYTES_MAX`) and a body must be consumed
//! exactly (no trailing bytes). Bytes read from disk never cause a panic: every failure is a
//! [`RecordError`].

use std::fmt;

use switchboard_wire::ids::{ChatId, ClientMsgId, DeviceId, MsgId, Seq, UserId};

/// Largest opaque message payload the store accepts. Equal to the protocol's payload limit; a
/// record can never be larger than what a client may send.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// Largest record body (tag, version and fields; the 8-byte frame header is not counted): the
/// largest payload plus 4 KiB for the fixed fields, which need 75 bytes for a message and at most
/// 8 KiB + 23 bytes for a `ChatCreated` with `CHAT_MEMBERS_MAX` members. A decoder that sees a
/// larger `body_len` rejects it before reading further, so a corrupt length can never make the
/// store allocate or read more than this.
pub const RECORD_BYTES_MAX: usize = PAYLOAD_BYTES_MAX + 4 * 1024;

/// Most members a chat may have (the member list is stored in its `ChatCreated` record). Bounds the
/// record size (8 bytes each) and the per-chat fan-out work.
pub const CHAT_MEMBERS_MAX: usize = 1024;

/// Bytes of framing before every body: `u32 body_len` and `u32 crc32c`.
pub const RECORD_HEADER_BYTES: usize = 8;

/// Bytes of a framed `Message` record that are not payload: header, tag, version, fixed fields
/// and the payload length. `frame_len - MESSAGE_FRAME_OVERHEAD_BYTES` is the payload length, which
/// lets a reader budget payload bytes from the index alone.
pub const MESSAGE_FRAME_OVERHEAD_BYTES: usize =
    RECORD_HEADER_BYTES + 2 + 8 * 4 + 4 + 8 + 16 + 8 + 1 + 1 + 4;

/// The record format version this code writes for `ChatCreated` and `Cursor`, and the only one
/// it reads for them.
pub const FORMAT_VERSION: u8 = 1;

/// The version written for `Message` records: version 2 added the `flags` byte. Version 1
/// messages (no flags) are still read.
pub const MESSAGE_FORMAT_VERSION: u8 = 2;

/// `StoredMessage::flags` bit: the sender forwarded this content from another chat.
pub const MESSAGE_FLAG_FORWARDED: u8 = 1;

/// `StoredMessage::content_kind` of a chat event (the payload is a wire `ChatEvent`); equal to
/// the wire's `ContentKind::Event`.
pub const CONTENT_KIND_EVENT: u8 = 5;
/// `StoredMessage::content_kind` of a deleted message whose payload was purged.
pub const CONTENT_KIND_DELETED: u8 = 254;

const TAG_CHAT_CREATED: u8 = 1;
const TAG_MESSAGE: u8 = 2;
const TAG_CURSOR: u8 = 3;
const TAG_BLOCK: u8 = 4;
const TAG_USER_META: u8 = 5;
const TAG_ACCOUNT_CREATED: u8 = 6;
const TAG_ACCOUNT_DEVICE: u8 = 7;
const TAG_ACCOUNT_REVOKE: u8 = 8;
const TAG_ACCOUNT_PROFILE: u8 = 9;
const TAG_ACCOUNT_KEYS: u8 = 10;
const TAG_ACCOUNT_PREKEY_TAKEN: u8 = 11;

/// Longest text field of an account record (phone, device name, display name, about, avatar
/// media id), bytes of UTF-8. The API's own limits are lower (64 / 256 bytes).
pub const ACCOUNT_TEXT_BYTES_MAX: usize = 256;
/// Largest stored key-directory upload of one device (identity key, signed prekey, up to 100
/// one-time prekeys, re-encoded compactly by the engine: about 13 KiB at the API's limits).
pub const ACCOUNT_KEYS_BYTES_MAX: usize = 32 * 1024;
const _: () = assert!(2 + 8 + 4 + 4 + ACCOUNT_KEYS_BYTES_MAX <= RECORD_BYTES_MAX);
const _: () = assert!(2 + 8 + 3 * (2 + ACCOUNT_TEXT_BYTES_MAX) <= RECORD_BYTES_MAX);
const TAG_MEDIA_GRANT: u8 = 12;
const BLOCK_BODY_BYTES: usize = 2 + 8 + 8 + 1;
const USER_META_BODY_BYTES: usize = 2 + 8 + 8 + 1 + 1;
const MEDIA_GRANT_FIXED_BYTES: usize = 2 + 8 + 8 + 1;

/// Longest media id a `MediaGrant` holds (the protocol's `SEND_MEDIA_ID_BYTES_MAX`).
pub const MEDIA_ID_BYTES_MAX: usize = 64;
const _: () = assert!(MEDIA_ID_BYTES_MAX == switchboard_wire::limits::SEND_MEDIA_ID_BYTES_MAX);
const _: () = assert!(MEDIA_ID_BYTES_MAX <= u8::MAX as usize);

/// Whether `id` may be stored in a `MediaGrant`: 1..=64 of `[A-Za-z0-9_-]`.
pub fn is_valid_media_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MEDIA_ID_BYTES_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

const CHAT_CREATED_FIXED_BYTES: usize = 2 + 8 + 1 + 8 + 4;
const CURSOR_BODY_BYTES: usize = 2 + 8 + 8 + 4 + 1 + 8;

const _: () = assert!(MESSAGE_FRAME_OVERHEAD_BYTES == RECORD_HEADER_BYTES + 76);
const _: () = assert!(
    MESSAGE_FRAME_OVERHEAD_BYTES - RECORD_HEADER_BYTES + PAYLOAD_BYTES_MAX <= RECORD_BYTES_MAX
);
const _: () = assert!(CHAT_CREATED_FIXED_BYTES + 8 * CHAT_MEMBERS_MAX <= RECORD_BYTES_MAX);
// The store must hold anything the protocol lets a client send.
const _: () = assert!(switchboard_wire::limits::PAYLOAD_BYTES_MAX <= PAYLOAD_BYTES_MAX);
// body_len is a u32 on disk.
const _: () = assert!(RECORD_BYTES_MAX <= u32::MAX as usize);

/// What kind of chat a `ChatCreated` record creates. Stored as a `u8` tag so group chats can be
/// added without a format change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChatKind {
    /// A 1:1 chat between two users.
    Direct,
    /// A group chat: members, roles and info come from `ChatEvent`s in its sequence.
    Group,
}

impl ChatKind {
    fn tag(self) -> u8 {
        match self {
            ChatKind::Direct => 1,
            ChatKind::Group => 2,
        }
    }
    fn from_tag(tag: u8) -> Option<ChatKind> {
        match tag {
            1 => Some(ChatKind::Direct),
            2 => Some(ChatKind::Group),
            _ => None,
        }
    }
}

/// Which per-device cursor a `Cursor` record moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CursorKind {
    /// Highest seq delivered to the device.
    Delivered,
    /// Highest seq the user has read on the device.
    Read,
}

impl CursorKind {
    fn tag(self) -> u8 {
        match self {
            CursorKind::Delivered => 1,
            CursorKind::Read => 2,
        }
    }
    fn from_tag(tag: u8) -> Option<CursorKind> {
        match tag {
            1 => Some(CursorKind::Delivered),
            2 => Some(CursorKind::Read),
            _ => None,
        }
    }
}

/// One message as stored; the unit `read_messages*` returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub chat: ChatId,
    /// Position in the chat, starting at 1, gap-free.
    pub seq: Seq,
    pub msg_id: MsgId,
    pub sender_user: UserId,
    pub sender_device: DeviceId,
    pub timestamp_ms: u64,
    /// The sender's idempotency key; the nil id means "none".
    pub client_msg_id: ClientMsgId,
    /// The seq this message replies to, or 0.
    pub reply_to: Seq,
    pub content_kind: u8,
    /// `MESSAGE_FLAG_*` bits.
    pub flags: u8,
    /// Opaque (end-to-end encrypted) content, at most `PAYLOAD_BYTES_MAX` bytes.
    pub payload: Vec<u8>,
}

/// Account facts, stored in the account's shard (`engine/src/accounts.rs` decides which).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccountRecord {
    /// A user was created for a phone number; `user` encodes the shard that allocated it.
    Created {
        user: UserId,
        phone: String,
        created_ms: u64,
    },
    /// A device was added to a user (device ids are never reused within a user).
    Device {
        user: UserId,
        device: DeviceId,
        name: String,
        created_ms: u64,
    },
    /// Tokens of (user, device) expiring at or before `through_s` are revoked; `removed` also
    /// removes the device (logout, device removal), with its keys.
    Revoke {
        user: UserId,
        device: DeviceId,
        through_s: u64,
        removed: bool,
    },
    /// The whole profile, each time it changes.
    Profile {
        user: UserId,
        display_name: String,
        about: String,
        avatar_media_id: String,
    },
    /// A device's key-directory upload (opaque to storage).
    Keys {
        user: UserId,
        device: DeviceId,
        keys: Vec<u8>,
    },
    /// One one-time prekey of the device was handed out (the oldest).
    PrekeyTaken { user: UserId, device: DeviceId },
}

impl AccountRecord {
    fn tag(&self) -> u8 {
        match self {
            AccountRecord::Created { .. } => TAG_ACCOUNT_CREATED,
            AccountRecord::Device { .. } => TAG_ACCOUNT_DEVICE,
            AccountRecord::Revoke { .. } => TAG_ACCOUNT_REVOKE,
            AccountRecord::Profile { .. } => TAG_ACCOUNT_PROFILE,
            AccountRecord::Keys { .. } => TAG_ACCOUNT_KEYS,
            AccountRecord::PrekeyTaken { .. } => TAG_ACCOUNT_PREKEY_TAKEN,
        }
    }

    fn texts(&self) -> Vec<&str> {
        match self {
            AccountRecord::Created { phone, .. } => vec![phone],
            AccountRecord::Device { name, .. } => vec![name],
            AccountRecord::Profile {
                display_name,
                about,
                avatar_media_id,
                ..
            } => vec![display_name, about, avatar_media_id],
            _ => Vec::new(),
        }
    }

    fn body_len(&self) -> usize {
        let texts: usize = self.texts().iter().map(|t| 2 + t.len()).sum();
        2 + texts
            + match self {
                AccountRecord::Created { .. } => 8 + 8,
                AccountRecord::Device { .. } => 8 + 4 + 8,
                AccountRecord::Revoke { .. } => 8 + 4 + 8 + 1,
                AccountRecord::Profile { .. } => 8,
                AccountRecord::Keys { keys, .. } => 8 + 4 + 4 + keys.len(),
                AccountRecord::PrekeyTaken { .. } => 8 + 4,
            }
    }

    fn encode_fields(&self, out: &mut Vec<u8>) {
        let text = |out: &mut Vec<u8>, t: &str| {
            out.extend_from_slice(&(t.len() as u16).to_le_bytes());
            out.extend_from_slice(t.as_bytes());
        };
        match self {
            AccountRecord::Created {
                user,
                phone,
                created_ms,
            } => {
                out.extend_from_slice(&user.0.to_le_bytes());
                out.extend_from_slice(&created_ms.to_le_bytes());
                text(out, phone);
            }
            AccountRecord::Device {
                user,
                device,
                name,
                created_ms,
            } => {
                out.extend_from_slice(&user.0.to_le_bytes());
                out.extend_from_slice(&device.0.to_le_bytes());
                out.extend_from_slice(&created_ms.to_le_bytes());
                text(out, name);
            }
            AccountRecord::Revoke {
                user,
                device,
                through_s,
                removed,
            } => {
                out.extend_from_slice(&user.0.to_le_bytes());
                out.extend_from_slice(&device.0.to_le_bytes());
                out.extend_from_slice(&through_s.to_le_bytes());
                out.push(u8::from(*removed));
            }
            AccountRecord::Profile {
                user,
                display_name,
                about,
                avatar_media_id,
            } => {
                out.extend_from_slice(&user.0.to_le_bytes());
                text(out, display_name);
                text(out, about);
                text(out, avatar_media_id);
            }
            AccountRecord::Keys { user, device, keys } => {
                out.extend_from_slice(&user.0.to_le_bytes());
                out.extend_from_slice(&device.0.to_le_bytes());
                out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
                out.extend_from_slice(keys);
            }
            AccountRecord::PrekeyTaken { user, device } => {
                out.extend_from_slice(&user.0.to_le_bytes());
                out.extend_from_slice(&device.0.to_le_bytes());
            }
        }
    }

    fn decode(tag: u8, r: &mut Reader<'_>) -> Result<AccountRecord, RecordError> {
        fn text(r: &mut Reader<'_>) -> Result<String, RecordError> {
            let len = u16::from_le_bytes(r.array()?) as usize;
            if len > ACCOUNT_TEXT_BYTES_MAX {
                return Err(RecordError::TextTooLong { len });
            }
            String::from_utf8(r.bytes(len)?.to_vec()).map_err(|_| RecordError::BadText)
        }
        Ok(match tag {
            TAG_ACCOUNT_CREATED => AccountRecord::Created {
                user: UserId(r.u64()?),
                created_ms: r.u64()?,
                phone: text(r)?,
            },
            TAG_ACCOUNT_DEVICE => AccountRecord::Device {
                user: UserId(r.u64()?),
                device: DeviceId(r.u32()?),
                created_ms: r.u64()?,
                name: text(r)?,
            },
            TAG_ACCOUNT_REVOKE => AccountRecord::Revoke {
                user: UserId(r.u64()?),
                device: DeviceId(r.u32()?),
                through_s: r.u64()?,
                removed: match r.u8()? {
                    0 => false,
                    1 => true,
                    _ => return Err(RecordError::Truncated),
                },
            },
            TAG_ACCOUNT_PROFILE => AccountRecord::Profile {
                user: UserId(r.u64()?),
                display_name: text(r)?,
                about: text(r)?,
                avatar_media_id: text(r)?,
            },
            TAG_ACCOUNT_KEYS => {
                let user = UserId(r.u64()?);
                let device = DeviceId(r.u32()?);
                let len = r.u32()? as usize;
                if len > ACCOUNT_KEYS_BYTES_MAX {
                    return Err(RecordError::PayloadTooLarge { len });
                }
                AccountRecord::Keys {
                    user,
                    device,
                    keys: r.bytes(len)?.to_vec(),
                }
            }
            _ => AccountRecord::PrekeyTaken {
                user: UserId(r.u64()?),
                device: DeviceId(r.u32()?),
            },
        })
    }
}

/// One durable fact about a shard. The log is a sequence of these; replaying them in order
/// rebuilds [`crate::ShardState`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// A chat came into existence with this member list.
    ChatCreated {
        chat: ChatId,
        kind: ChatKind,
        members: Vec<UserId>,
        created_ms: u64,
    },
    /// A message was appended to a chat.
    Message(StoredMessage),
    /// In the 1:1 chat `chat`, `blocker` blocked (or unblocked) the other member.
    Block {
        chat: ChatId,
        blocker: UserId,
        blocked: bool,
    },
    /// A user's presence state, stored in the user's home shard: the whole state each time it
    /// changes (last seen time, and who may see last seen / online: 0 everyone, 1 contacts,
    /// 2 nobody).
    UserMeta {
        user: UserId,
        last_seen_ms: u64,
        last_seen_visibility: u8,
        online_visibility: u8,
    },
    /// Message `seq` of `chat` referred to media object `media_id`: the chat's members may
    /// fetch it (written in the same batch as the message, so both are durable or neither).
    MediaGrant {
        chat: ChatId,
        seq: Seq,
        media_id: String,
    },
    /// A device's delivered or read cursor moved.
    Cursor {
        chat: ChatId,
        user: UserId,
        device: DeviceId,
        kind: CursorKind,
        seq: Seq,
    },
    /// Users, devices, revocations, profiles, keys (tags 6..=11).
    Account(AccountRecord),
}

/// Why bytes did not decode to a record, or why a record cannot be encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RecordError {
    /// The body's CRC32C does not match the one in the header.
    Crc { stored: u32, computed: u32 },
    /// `body_len` exceeds `RECORD_BYTES_MAX`.
    BodyTooLarge { len: usize },
    /// `body_len` is too small to hold even the tag and version.
    BodyTooShort { len: usize },
    /// Unknown record type tag.
    UnknownTag(u8),
    /// A format version this code does not read.
    UnknownVersion(u8),
    /// Unknown `ChatKind` tag.
    UnknownChatKind(u8),
    /// Unknown `CursorKind` tag.
    UnknownCursorKind(u8),
    /// A field runs past the end of the body.
    Truncated,
    /// The body holds bytes after its last field.
    TrailingBytes { extra: usize },
    /// More than `CHAT_MEMBERS_MAX` members.
    TooManyMembers { len: usize },
    /// A payload larger than `PAYLOAD_BYTES_MAX`.
    PayloadTooLarge { len: usize },
    /// An account text field longer than `ACCOUNT_TEXT_BYTES_MAX`.
    TextTooLong { len: usize },
    /// An account text field that is not UTF-8.
    BadText,
    /// A `MediaGrant` whose media id is empty, too long or has other characters.
    BadMediaId,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecordError::Crc { stored, computed } => {
                write!(
                    f,
                    "crc mismatch (stored {stored:#010x}, computed {computed:#010x})"
                )
            }
            RecordError::BodyTooLarge { len } => {
                write!(f, "record body of {len} bytes exceeds {RECORD_BYTES_MAX}")
            }
            RecordError::BodyTooShort { len } => {
                write!(f, "record body of {len} bytes is too short")
            }
            RecordError::UnknownTag(t) => write!(f, "unknown record tag {t}"),
            RecordError::UnknownVersion(v) => write!(f, "unknown record format version {v}"),
            RecordError::UnknownChatKind(k) => write!(f, "unknown chat kind {k}"),
            RecordError::UnknownCursorKind(k) => write!(f, "unknown cursor kind {k}"),
            RecordError::Truncated => write!(f, "field runs past the end of the record body"),
            RecordError::TrailingBytes { extra } => {
                write!(f, "{extra} trailing bytes after the last field")
            }
            RecordError::TooManyMembers { len } => {
                write!(f, "{len} members exceed {CHAT_MEMBERS_MAX}")
            }
            RecordError::PayloadTooLarge { len } => {
                write!(f, "payload of {len} bytes exceeds {PAYLOAD_BYTES_MAX}")
            }
            RecordError::TextTooLong { len } => {
                write!(f, "text of {len} bytes exceeds {ACCOUNT_TEXT_BYTES_MAX}")
            }
            RecordError::BadText => write!(f, "text field is not UTF-8"),
            RecordError::BadMediaId => write!(f, "invalid media id in a media grant"),
        }
    }
}

impl std::error::Error for RecordError {}

impl Record {
    /// Checks the limits `encode_into` relies on. The store calls this on every record before it
    /// writes anything, so an oversized record is a typed error, never a panic or a bad log.
    pub fn validate(&self) -> Result<(), RecordError> {
        match self {
            Record::ChatCreated { members, .. } if members.len() > CHAT_MEMBERS_MAX => {
                Err(RecordError::TooManyMembers { len: members.len() })
            }
            Record::Message(m) if m.payload.len() > PAYLOAD_BYTES_MAX => {
                Err(RecordError::PayloadTooLarge {
                    len: m.payload.len(),
                })
            }
            Record::Account(a) => {
                if let Some(t) = a.texts().iter().find(|t| t.len() > ACCOUNT_TEXT_BYTES_MAX) {
                    return Err(RecordError::TextTooLong { len: t.len() });
                }
                match a {
                    AccountRecord::Keys { keys, .. } if keys.len() > ACCOUNT_KEYS_BYTES_MAX => {
                        Err(RecordError::PayloadTooLarge { len: keys.len() })
                    }
                    _ => Ok(()),
                }
            }
            Record::MediaGrant { media_id, .. } if !is_valid_media_id(media_id) => {
                Err(RecordError::BadMediaId)
            }
            _ => Ok(()),
        }
    }

    /// Bytes `encode_into` appends for this record, header included.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            Record::ChatCreated { members, .. } => CHAT_CREATED_FIXED_BYTES + 8 * members.len(),
            Record::Message(m) => {
                MESSAGE_FRAME_OVERHEAD_BYTES - RECORD_HEADER_BYTES + m.payload.len()
            }
            Record::Cursor { .. } => CURSOR_BODY_BYTES,
            Record::Block { .. } => BLOCK_BODY_BYTES,
            Record::UserMeta { .. } => USER_META_BODY_BYTES,
            Record::Account(a) => a.body_len(),
            Record::MediaGrant { media_id, .. } => MEDIA_GRANT_FIXED_BYTES + media_id.len(),
        }
    }

    /// Appends one framed record (`[body_len][crc32c][body]`) to `out`.
    ///
    /// # Panics
    /// If the record breaks a limit ([`Record::validate`] returns an error): callers validate
    /// first, so this is an internal invariant.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        assert!(
            self.validate().is_ok(),
            "encode_into on an invalid record: {:?}",
            self.validate()
        );
        let body_len = self.body_len();
        out.reserve(RECORD_HEADER_BYTES + body_len);
        let start = out.len();
        // The CRC is patched in once the body is written.
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        let body_start = out.len();
        match self {
            Record::ChatCreated {
                chat,
                kind,
                members,
                created_ms,
            } => {
                out.push(TAG_CHAT_CREATED);
                out.push(FORMAT_VERSION);
                out.extend_from_slice(&chat.0.to_le_bytes());
                out.push(kind.tag());
                out.extend_from_slice(&created_ms.to_le_bytes());
                out.extend_from_slice(&(members.len() as u32).to_le_bytes());
                for m in members {
                    out.extend_from_slice(&m.0.to_le_bytes());
                }
            }
            Record::Message(m) => {
                out.push(TAG_MESSAGE);
                out.push(MESSAGE_FORMAT_VERSION);
                out.extend_from_slice(&m.chat.0.to_le_bytes());
                out.extend_from_slice(&m.seq.0.to_le_bytes());
                out.extend_from_slice(&m.msg_id.0.to_le_bytes());
                out.extend_from_slice(&m.sender_user.0.to_le_bytes());
                out.extend_from_slice(&m.sender_device.0.to_le_bytes());
                out.extend_from_slice(&m.timestamp_ms.to_le_bytes());
                out.extend_from_slice(&m.client_msg_id.0);
                out.extend_from_slice(&m.reply_to.0.to_le_bytes());
                out.push(m.content_kind);
                out.push(m.flags);
                out.extend_from_slice(&(m.payload.len() as u32).to_le_bytes());
                out.extend_from_slice(&m.payload);
            }
            Record::Cursor {
                chat,
                user,
                device,
                kind,
                seq,
            } => {
                out.push(TAG_CURSOR);
                out.push(FORMAT_VERSION);
                out.extend_from_slice(&chat.0.to_le_bytes());
                out.extend_from_slice(&user.0.to_le_bytes());
                out.extend_from_slice(&device.0.to_le_bytes());
                out.push(kind.tag());
                out.extend_from_slice(&seq.0.to_le_bytes());
            }
            Record::Block {
                chat,
                blocker,
                blocked,
            } => {
                out.push(TAG_BLOCK);
                out.push(FORMAT_VERSION);
                out.extend_from_slice(&chat.0.to_le_bytes());
                out.extend_from_slice(&blocker.0.to_le_bytes());
                out.push(u8::from(*blocked));
            }
            Record::UserMeta {
                user,
                last_seen_ms,
                last_seen_visibility,
                online_visibility,
            } => {
                out.push(TAG_USER_META);
                out.push(FORMAT_VERSION);
                out.extend_from_slice(&user.0.to_le_bytes());
                out.extend_from_slice(&last_seen_ms.to_le_bytes());
                out.push(*last_seen_visibility);
                out.push(*online_visibility);
            }
            Record::Account(a) => {
                out.push(a.tag());
                out.push(FORMAT_VERSION);
                a.encode_fields(out);
            }
            Record::MediaGrant {
                chat,
                seq,
                media_id,
            } => {
                out.push(TAG_MEDIA_GRANT);
                out.push(FORMAT_VERSION);
                out.extend_from_slice(&chat.0.to_le_bytes());
                out.extend_from_slice(&seq.0.to_le_bytes());
                out.push(media_id.len() as u8);
                out.extend_from_slice(media_id.as_bytes());
            }
        }
        assert_eq!(
            out.len() - body_start,
            body_len,
            "body_len() disagrees with the encoder"
        );
        let crc = crc32c::crc32c(&out[body_start..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// The chat this record belongs to (`None` for user records).
    pub fn chat(&self) -> Option<ChatId> {
        match self {
            Record::ChatCreated { chat, .. }
            | Record::Cursor { chat, .. }
            | Record::Block { chat, .. }
            | Record::MediaGrant { chat, .. } => Some(*chat),
            Record::Message(m) => Some(m.chat),
            Record::UserMeta { .. } | Record::Account(_) => None,
        }
    }
}

/// Decodes the first framed record in `buf`.
///
/// - `Ok(Some((record, consumed)))`: a complete, CRC-valid record of `consumed` bytes.
/// - `Ok(None)`: `buf` holds the beginning of a record but not all of it (fewer than 8 header
///   bytes, or fewer body bytes than `body_len` says). At the end of a log this is a torn tail.
/// - `Err(_)`: the bytes are not a valid record. An oversize `body_len` is reported before the
///   body is needed, so a corrupt length cannot make the caller wait for (or read) more bytes.
pub fn decode_one(buf: &[u8]) -> Result<Option<(Record, usize)>, RecordError> {
    let Some(header) = buf.get(..RECORD_HEADER_BYTES) else {
        return Ok(None);
    };
    let mut h = Reader::new(header);
    let body_len = h.u32()? as usize;
    let stored = h.u32()?;
    if body_len > RECORD_BYTES_MAX {
        return Err(RecordError::BodyTooLarge { len: body_len });
    }
    if body_len < 2 {
        return Err(RecordError::BodyTooShort { len: body_len });
    }
    let total = RECORD_HEADER_BYTES + body_len;
    let Some(body) = buf.get(RECORD_HEADER_BYTES..total) else {
        return Ok(None);
    };
    let computed = crc32c::crc32c(body);
    if computed != stored {
        return Err(RecordError::Crc { stored, computed });
    }
    let record = decode_body(body)?;
    Ok(Some((record, total)))
}

fn decode_body(body: &[u8]) -> Result<Record, RecordError> {
    let mut r = Reader::new(body);
    let tag = r.u8()?;
    let version = r.u8()?;
    if !matches!(
        tag,
        TAG_CHAT_CREATED
            | TAG_MESSAGE
            | TAG_CURSOR
            | TAG_BLOCK
            | TAG_USER_META
            | TAG_ACCOUNT_CREATED..=TAG_ACCOUNT_PREKEY_TAKEN | TAG_MEDIA_GRANT
    ) {
        return Err(RecordError::UnknownTag(tag));
    }
    let known =
        version == FORMAT_VERSION || (tag == TAG_MESSAGE && version == MESSAGE_FORMAT_VERSION);
    if !known {
        return Err(RecordError::UnknownVersion(version));
    }
    let record = match tag {
        TAG_CHAT_CREATED => {
            let chat = ChatId(r.u64()?);
            let kind_tag = r.u8()?;
            let kind =
                ChatKind::from_tag(kind_tag).ok_or(RecordError::UnknownChatKind(kind_tag))?;
            let created_ms = r.u64()?;
            let len = r.u32()? as usize;
            if len > CHAT_MEMBERS_MAX {
                return Err(RecordError::TooManyMembers { len });
            }
            // Check the bytes are there before allocating for them.
            if r.remaining() < len * 8 {
                return Err(RecordError::Truncated);
            }
            let mut members = Vec::with_capacity(len);
            for _ in 0..len {
                members.push(UserId(r.u64()?));
            }
            Record::ChatCreated {
                chat,
                kind,
                members,
                created_ms,
            }
        }
        TAG_MESSAGE => {
            let chat = ChatId(r.u64()?);
            let seq = Seq(r.u64()?);
            let msg_id = MsgId(r.u64()?);
            let sender_user = UserId(r.u64()?);
            let sender_device = DeviceId(r.u32()?);
            let timestamp_ms = r.u64()?;
            let client_msg_id = ClientMsgId(r.array16()?);
            let reply_to = Seq(r.u64()?);
            let content_kind = r.u8()?;
            let flags = if version >= 2 { r.u8()? } else { 0 };
            let len = r.u32()? as usize;
            if len > PAYLOAD_BYTES_MAX {
                return Err(RecordError::PayloadTooLarge { len });
            }
            let payload = r.bytes(len)?.to_vec();
            Record::Message(StoredMessage {
                chat,
                seq,
                msg_id,
                sender_user,
                sender_device,
                timestamp_ms,
                client_msg_id,
                reply_to,
                content_kind,
                flags,
                payload,
            })
        }
        TAG_BLOCK => {
            let chat = ChatId(r.u64()?);
            let blocker = UserId(r.u64()?);
            let blocked = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(RecordError::Truncated),
            };
            Record::Block {
                chat,
                blocker,
                blocked,
            }
        }
        TAG_USER_META => Record::UserMeta {
            user: UserId(r.u64()?),
            last_seen_ms: r.u64()?,
            last_seen_visibility: r.u8()?,
            online_visibility: r.u8()?,
        },
        TAG_ACCOUNT_CREATED..=TAG_ACCOUNT_PREKEY_TAKEN => {
            Record::Account(AccountRecord::decode(tag, &mut r)?)
        }
        TAG_MEDIA_GRANT => {
            let chat = ChatId(r.u64()?);
            let seq = Seq(r.u64()?);
            let len = r.u8()? as usize;
            let id = std::str::from_utf8(r.bytes(len)?).map_err(|_| RecordError::BadMediaId)?;
            if !is_valid_media_id(id) {
                return Err(RecordError::BadMediaId);
            }
            Record::MediaGrant {
                chat,
                seq,
                media_id: id.to_owned(),
            }
        }
        _ => {
            let chat = ChatId(r.u64()?);
            let user = UserId(r.u64()?);
            let device = DeviceId(r.u32()?);
            let kind_tag = r.u8()?;
            let kind =
                CursorKind::from_tag(kind_tag).ok_or(RecordError::UnknownCursorKind(kind_tag))?;
            let seq = Seq(r.u64()?);
            Record::Cursor {
                chat,
                user,
                device,
                kind,
                seq,
            }
        }
    };
    if r.remaining() != 0 {
        return Err(RecordError::TrailingBytes {
            extra: r.remaining(),
        });
    }
    Ok(record)
}

/// A bounds-checked little-endian cursor over a byte slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    fn remaining(&self) -> usize {
        self.buf.len()
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if n > self.buf.len() {
            return Err(RecordError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.array::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, RecordError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, RecordError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    fn array16(&mut self) -> Result<[u8; 16], RecordError> {
        self.array()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, payload: &[u8]) -> Record {
        Record::Message(StoredMessage {
            chat: ChatId(7),
            seq: Seq(seq),
            msg_id: MsgId(seq.wrapping_add(1000)),
            sender_user: UserId(1),
            sender_device: DeviceId(2),
            timestamp_ms: 1_700_000_000_000,
            client_msg_id: ClientMsgId::from_halves(0xaa, seq),
            reply_to: Seq(0),
            content_kind: 3,
            flags: 0,
            payload: payload.to_vec(),
        })
    }

    fn samples() -> Vec<Record> {
        vec![
            Record::ChatCreated {
                chat: ChatId(7),
                kind: ChatKind::Direct,
                members: vec![UserId(1), UserId(2)],
                created_ms: 5,
            },
            Record::ChatCreated {
                chat: ChatId(8),
                kind: ChatKind::Direct,
                members: vec![],
                created_ms: 0,
            },
            msg(1, b"hello"),
            msg(2, b""),
            msg(u64::MAX, &[0xff; 300]),
            Record::MediaGrant {
                chat: ChatId(7),
                seq: Seq(2),
                media_id: "AbC_-09".to_owned(),
            },
            Record::MediaGrant {
                chat: ChatId(u64::MAX),
                seq: Seq(u64::MAX),
                media_id: "z".repeat(MEDIA_ID_BYTES_MAX),
            },
            Record::Cursor {
                chat: ChatId(7),
                user: UserId(2),
                device: DeviceId(1),
                kind: CursorKind::Delivered,
                seq: Seq(1),
            },
            Record::Cursor {
                chat: ChatId(7),
                user: UserId(2),
                device: DeviceId(1),
                kind: CursorKind::Read,
                seq: Seq(u64::MAX),
            },
            Record::Account(AccountRecord::Created {
                user: UserId(3),
                phone: "+14155550123".into(),
                created_ms: 9,
            }),
            Record::Account(AccountRecord::Device {
                user: UserId(3),
                device: DeviceId(2),
                name: "téléphone".into(),
                created_ms: 10,
            }),
            Record::Account(AccountRecord::Revoke {
                user: UserId(3),
                device: DeviceId(2),
                through_s: u64::MAX,
                removed: true,
            }),
            Record::Account(AccountRecord::Profile {
                user: UserId(3),
                display_name: "Alice".into(),
                about: String::new(),
                avatar_media_id: "m".repeat(ACCOUNT_TEXT_BYTES_MAX),
            }),
            Record::Account(AccountRecord::Keys {
                user: UserId(3),
                device: DeviceId(2),
                keys: vec![7; 300],
            }),
            Record::Account(AccountRecord::PrekeyTaken {
                user: UserId(3),
                device: DeviceId(2),
            }),
        ]
    }

    fn encode(r: &Record) -> Vec<u8> {
        let mut out = Vec::new();
        r.encode_into(&mut out);
        out
    }

    /// Re-frames `body` with a correct header so body-level checks can be exercised.
    fn frame(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Account records: oversize or non-UTF-8 text, oversize keys, a bad flag byte and
    /// truncation are typed errors, never panics; oversize values are refused before writing.
    #[test]
    fn account_records_are_bounded() {
        let created = |phone: &str| {
            Record::Account(AccountRecord::Created {
                user: UserId(1),
                phone: phone.into(),
                created_ms: 0,
            })
        };
        let long = created(&"9".repeat(ACCOUNT_TEXT_BYTES_MAX + 1));
        assert_eq!(
            long.validate(),
            Err(RecordError::TextTooLong {
                len: ACCOUNT_TEXT_BYTES_MAX + 1
            })
        );
        let keys = Record::Account(AccountRecord::Keys {
            user: UserId(1),
            device: DeviceId(1),
            keys: vec![0; ACCOUNT_KEYS_BYTES_MAX + 1],
        });
        assert!(matches!(
            keys.validate(),
            Err(RecordError::PayloadTooLarge { .. })
        ));
        // Hand-made bodies the encoder would never write.
        let body = |text_len: u16, text: &[u8]| {
            let mut b = vec![TAG_ACCOUNT_CREATED, FORMAT_VERSION];
            b.extend_from_slice(&1u64.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
            b.extend_from_slice(&text_len.to_le_bytes());
            b.extend_from_slice(text);
            b
        };
        let too_long = vec![b'1'; ACCOUNT_TEXT_BYTES_MAX + 1];
        assert_eq!(
            decode_one(&frame(&body(too_long.len() as u16, &too_long))),
            Err(RecordError::TextTooLong {
                len: ACCOUNT_TEXT_BYTES_MAX + 1
            })
        );
        assert_eq!(
            decode_one(&frame(&body(2, &[0xff, 0xfe]))),
            Err(RecordError::BadText)
        );
        assert_eq!(
            decode_one(&frame(&body(5, b"+1"))),
            Err(RecordError::Truncated)
        );
        let mut revoke = encode(&Record::Account(AccountRecord::Revoke {
            user: UserId(1),
            device: DeviceId(1),
            through_s: 5,
            removed: true,
        }));
        let last = revoke.len() - 1;
        revoke[last] = 2; // the removed flag is 0 or 1
        let body = revoke[RECORD_HEADER_BYTES..].to_vec();
        assert!(decode_one(&frame(&body)).is_err());
    }

    #[test]
    fn round_trip_every_kind() {
        for r in samples() {
            let bytes = encode(&r);
            assert_eq!(bytes.len(), r.encoded_len());
            let (back, used) = decode_one(&bytes).unwrap().unwrap();
            assert_eq!(back, r);
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn largest_records_fit() {
        let big = msg(1, &vec![1u8; PAYLOAD_BYTES_MAX]);
        let bytes = encode(&big);
        assert!(bytes.len() - RECORD_HEADER_BYTES <= RECORD_BYTES_MAX);
        assert_eq!(decode_one(&bytes).unwrap().unwrap().0, big);
        let many = Record::ChatCreated {
            chat: ChatId(1),
            kind: ChatKind::Direct,
            members: (0..CHAT_MEMBERS_MAX as u64).map(UserId).collect(),
            created_ms: 1,
        };
        assert_eq!(decode_one(&encode(&many)).unwrap().unwrap().0, many);
    }

    #[test]
    fn message_overhead_matches_encoding() {
        for n in [0usize, 1, 200, 4096] {
            let r = msg(1, &vec![0; n]);
            assert_eq!(encode(&r).len(), MESSAGE_FRAME_OVERHEAD_BYTES + n);
        }
    }

    #[test]
    fn validate_rejects_oversize() {
        assert_eq!(
            msg(1, &vec![0; PAYLOAD_BYTES_MAX + 1]).validate(),
            Err(RecordError::PayloadTooLarge {
                len: PAYLOAD_BYTES_MAX + 1
            })
        );
        let r = Record::ChatCreated {
            chat: ChatId(1),
            kind: ChatKind::Direct,
            members: vec![UserId(1); CHAT_MEMBERS_MAX + 1],
            created_ms: 0,
        };
        assert_eq!(
            r.validate(),
            Err(RecordError::TooManyMembers {
                len: CHAT_MEMBERS_MAX + 1
            })
        );
    }

    #[test]
    fn concatenated_records_decode_in_order() {
        let mut buf = Vec::new();
        for r in samples() {
            r.encode_into(&mut buf);
        }
        let mut at = 0;
        let mut out = Vec::new();
        while let Some((r, n)) = decode_one(&buf[at..]).unwrap() {
            out.push(r);
            at += n;
        }
        assert_eq!(at, buf.len());
        assert_eq!(out, samples());
    }

    #[test]
    fn every_proper_prefix_is_incomplete() {
        for r in samples() {
            let bytes = encode(&r);
            for cut in 0..bytes.len() {
                assert_eq!(decode_one(&bytes[..cut]), Ok(None), "{r:?} cut at {cut}");
            }
        }
    }

    /// Data-driven: `(name, bytes, expected result)`.
    #[test]
    fn check_decode_errors() {
        let good_msg = encode(&msg(1, b"abc"));
        let body = |bytes: &[u8]| bytes[RECORD_HEADER_BYTES..].to_vec();

        let mut bad_crc = good_msg.clone();
        *bad_crc.last_mut().unwrap() ^= 1;

        let mut bad_tag = body(&good_msg);
        bad_tag[0] = 99;
        let mut bad_version = body(&good_msg);
        bad_version[1] = 3;
        let mut trailing = body(&good_msg);
        trailing.push(0);
        let mut short_payload = body(&good_msg);
        short_payload.pop();
        let mut huge_payload_len = body(&good_msg);
        let plen_at = huge_payload_len.len() - 3 - 4;
        huge_payload_len[plen_at..plen_at + 4]
            .copy_from_slice(&((PAYLOAD_BYTES_MAX + 1) as u32).to_le_bytes());

        let chat = encode(&Record::ChatCreated {
            chat: ChatId(1),
            kind: ChatKind::Direct,
            members: vec![UserId(1)],
            created_ms: 0,
        });
        let mut bad_kind = body(&chat);
        bad_kind[10] = 0;
        let mut many_members = body(&chat);
        many_members[19..23].copy_from_slice(&((CHAT_MEMBERS_MAX + 1) as u32).to_le_bytes());
        let mut members_past_end = body(&chat);
        members_past_end[19..23].copy_from_slice(&2u32.to_le_bytes());

        let cursor = encode(&Record::Cursor {
            chat: ChatId(1),
            user: UserId(1),
            device: DeviceId(1),
            kind: CursorKind::Read,
            seq: Seq(1),
        });
        let mut bad_cursor_kind = body(&cursor);
        bad_cursor_kind[22] = 7;

        let mut header_only_too_large = Vec::new();
        header_only_too_large.extend_from_slice(&((RECORD_BYTES_MAX + 1) as u32).to_le_bytes());
        header_only_too_large.extend_from_slice(&[0; 4]);

        let cases: Vec<(&str, Vec<u8>, Result<(), RecordError>)> = vec![
            ("empty", vec![], Ok(())),
            (
                "zeros",
                vec![0; 16],
                Err(RecordError::BodyTooShort { len: 0 }),
            ),
            (
                "one byte body",
                frame(&[TAG_CURSOR]),
                Err(RecordError::BodyTooShort { len: 1 }),
            ),
            (
                "too large, header only",
                header_only_too_large,
                Err(RecordError::BodyTooLarge {
                    len: RECORD_BYTES_MAX + 1,
                }),
            ),
            (
                "bad crc",
                bad_crc.clone(),
                Err(RecordError::Crc {
                    stored: u32::from_le_bytes(bad_crc[4..8].try_into().unwrap()),
                    computed: crc32c::crc32c(&bad_crc[8..]),
                }),
            ),
            ("bad tag", frame(&bad_tag), Err(RecordError::UnknownTag(99))),
            (
                "bad version",
                frame(&bad_version),
                Err(RecordError::UnknownVersion(3)),
            ),
            (
                "trailing",
                frame(&trailing),
                Err(RecordError::TrailingBytes { extra: 1 }),
            ),
            (
                "short payload",
                frame(&short_payload),
                Err(RecordError::Truncated),
            ),
            (
                "payload len too large",
                frame(&huge_payload_len),
                Err(RecordError::PayloadTooLarge {
                    len: PAYLOAD_BYTES_MAX + 1,
                }),
            ),
            (
                "bad chat kind",
                frame(&bad_kind),
                Err(RecordError::UnknownChatKind(0)),
            ),
            (
                "too many members",
                frame(&many_members),
                Err(RecordError::TooManyMembers {
                    len: CHAT_MEMBERS_MAX + 1,
                }),
            ),
            (
                "members past end",
                frame(&members_past_end),
                Err(RecordError::Truncated),
            ),
            (
                "bad cursor kind",
                frame(&bad_cursor_kind),
                Err(RecordError::UnknownCursorKind(7)),
            ),
            (
                "tag+version only",
                frame(&[TAG_MESSAGE, FORMAT_VERSION]),
                Err(RecordError::Truncated),
            ),
        ];
        for (name, bytes, expect) in cases {
            let got = decode_one(&bytes).map(|_| ());
            assert_eq!(got, expect, "case {name}");
        }
    }

    /// Deterministic mutation test: flip, overwrite, truncate and extend valid encodings in many
    /// ways; the decoder must never panic and must never report consuming more than it was given.
    #[test]
    fn mutations_never_panic() {
        // xorshift64*: deterministic, no dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let seeds: Vec<Vec<u8>> = samples().iter().map(encode).collect();
        let mut decoded_ok = 0;
        for i in 0..40_000u32 {
            let mut bytes = seeds[i as usize % seeds.len()].clone();
            let rounds = 1 + next() % 4;
            for _ in 0..rounds {
                let len = bytes.len().max(1) as u64;
                match next() % 6 {
                    0 => {
                        let at = (next() % len) as usize;
                        if let Some(b) = bytes.get_mut(at) {
                            *b ^= 1 << (next() % 8);
                        }
                    }
                    1 => {
                        let at = (next() % len) as usize;
                        if let Some(b) = bytes.get_mut(at) {
                            *b = next() as u8;
                        }
                    }
                    2 => bytes.truncate((next() % len) as usize),
                    3 => bytes.push(next() as u8),
                    4 => {
                        // Corrupt the body, then fix the CRC so the body parser is exercised.
                        let at = 8 + (next() % len) as usize;
                        if let Some(b) = bytes.get_mut(at) {
                            *b = next() as u8;
                        }
                        if bytes.len() >= 8 {
                            let crc = crc32c::crc32c(&bytes[8..]);
                            let body_len = (bytes.len() - 8) as u32;
                            bytes[0..4].copy_from_slice(&body_len.to_le_bytes());
                            bytes[4..8].copy_from_slice(&crc.to_le_bytes());
                        }
                    }
                    _ => {
                        // Overwrite a length-ish field with a random u32.
                        let at = (next() % len) as usize;
                        let v = (next() as u32).to_le_bytes();
                        for (k, b) in v.iter().enumerate() {
                            if let Some(x) = bytes.get_mut(at + k) {
                                *x = *b;
                            }
                        }
                    }
                }
            }
            if let Ok(Some((_, used))) = decode_one(&bytes) {
                assert!(used <= bytes.len());
                decoded_ok += 1;
            }
        }
        // Some mutations are harmless (e.g. a byte rewritten with its own value); the test is
        // meaningful only if most are rejected.
        assert!(
            decoded_ok < 40_000 / 2,
            "{decoded_ok} mutated inputs decoded"
        );
    }

    #[test]
    fn media_grants_hold_only_valid_ids() {
        for bad in ["", "a/b", "é"] {
            let r = Record::MediaGrant {
                chat: ChatId(1),
                seq: Seq(1),
                media_id: bad.to_owned(),
            };
            assert_eq!(r.validate(), Err(RecordError::BadMediaId), "{bad:?}");
        }
        let long = Record::MediaGrant {
            chat: ChatId(1),
            seq: Seq(1),
            media_id: "a".repeat(MEDIA_ID_BYTES_MAX + 1),
        };
        assert_eq!(long.validate(), Err(RecordError::BadMediaId));
        // On disk: a grant whose id bytes were changed to a '/' fails to decode (CRC fixed up,
        // so only the id check can catch it).
        let mut body = vec![TAG_MEDIA_GRANT, FORMAT_VERSION];
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.push(3);
        body.extend_from_slice(b"a/b");
        assert_eq!(decode_one(&frame(&body)), Err(RecordError::BadMediaId));
        body.pop();
        assert_eq!(decode_one(&frame(&body)), Err(RecordError::Truncated));
    }

    #[test]
    fn block_and_user_meta_round_trip() {
        for r in [
            Record::Block {
                chat: ChatId(7),
                blocker: UserId(3),
                blocked: true,
            },
            Record::Block {
                chat: ChatId(7),
                blocker: UserId(3),
                blocked: false,
            },
            Record::UserMeta {
                user: UserId(9),
                last_seen_ms: 123,
                last_seen_visibility: 1,
                online_visibility: 2,
            },
        ] {
            let mut out = Vec::new();
            r.encode_into(&mut out);
            assert_eq!(out.len(), r.encoded_len());
            assert_eq!(decode_one(&out).unwrap(), Some((r.clone(), out.len())));
        }
        // A blocked flag other than 0/1 is invalid.
        let mut out = Vec::new();
        Record::Block {
            chat: ChatId(7),
            blocker: UserId(3),
            blocked: true,
        }
        .encode_into(&mut out);
        let last = out.len() - 1;
        out[last] = 2;
        let crc = crc32c::crc32c(&out[8..]);
        out[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(decode_one(&out).is_err());
    }
}
