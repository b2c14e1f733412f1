//! Protocol limits. Every one is named `noun_unit_max`, and the codec enforces them on decode.

/// Largest WebSocket message (one envelope) either side accepts. Bounds the verifier's work and
/// the memory one frame can pin.
pub const FRAME_BYTES_MAX: usize = 64 * 1024 + 1024;

/// Largest opaque payload in a `Send`/`Message`. The envelope around it needs < 1 KiB, which is
/// why `FRAME_BYTES_MAX` is the payload limit plus 1 KiB.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;

/// Most cursors one `Sync` may carry: a client with more chats syncs in several requests.
pub const SYNC_CURSORS_MAX: usize = 4000;

/// Most messages one `History` page returns (a larger `limit` is clamped).
pub const HISTORY_PAGE_MESSAGES_MAX: u32 = 200;

/// Messages in a `History` page when the request's `limit` is 0 (unset).
pub const HISTORY_PAGE_MESSAGES_DEFAULT: u32 = 50;

/// Most bytes of text in an `Error` frame.
pub const ERROR_TEXT_BYTES_MAX: usize = 512;

/// FlatBuffers verifier bounds: our schema nests at most Envelope > HistoryPage > Message > vec.
pub const VERIFIER_DEPTH_MAX: usize = 8;
/// Tables in one frame: a full history page of 200 messages plus the wrappers.
pub const VERIFIER_TABLES_MAX: usize = 1024;

// Envelope + HistoryPage + one table per message.
const _: () = assert!(HISTORY_PAGE_MESSAGES_MAX as usize + 2 <= VERIFIER_TABLES_MAX);

const _: () = assert!(PAYLOAD_BYTES_MAX + 1024 <= FRAME_BYTES_MAX);
const _: () = assert!(HISTORY_PAGE_MESSAGES_DEFAULT > 0);
const _: () = assert!(HISTORY_PAGE_MESSAGES_DEFAULT <= HISTORY_PAGE_MESSAGES_MAX);
const _: () = assert!(SYNC_CURSORS_MAX * 16 + 1024 < FRAME_BYTES_MAX);

/// Largest frame the server sends. Only `HistoryPage` and sync batches come near it: the server
/// stops adding messages to a page once `HISTORY_PAGE_BYTES_MAX` of payload is in it (at least one
/// message always fits).
pub const SERVER_FRAME_BYTES_MAX: usize = 512 * 1024;

/// Payload bytes after which the server closes a history page (`has_more = true`).
pub const HISTORY_PAGE_BYTES_MAX: usize = 256 * 1024;

const _: () =
    assert!(HISTORY_PAGE_BYTES_MAX + PAYLOAD_BYTES_MAX + 64 * 1024 <= SERVER_FRAME_BYTES_MAX);

/// Longest group name, bytes of UTF-8.
pub const GROUP_NAME_BYTES_MAX: usize = 128;
/// Longest group description, bytes of UTF-8.
pub const GROUP_DESCRIPTION_BYTES_MAX: usize = 1024;
/// Longest media id (avatar), bytes.
pub const MEDIA_ID_BYTES_MAX: usize = 128;
/// Most users one `CreateGroup` or `GroupUpdate` may name (the group size limit itself is the
/// server's `group_members_max`, at most this).
pub const GROUP_USERS_MAX: usize = 1024;
/// Longest reaction (one emoji sequence), bytes of UTF-8.
pub const REACTION_BYTES_MAX: usize = 32;
/// Largest payload of an `Edit`: the new content travels inside a `ChatEvent`, which must itself
/// fit in `PAYLOAD_BYTES_MAX`.
pub const EDIT_PAYLOAD_BYTES_MAX: usize = PAYLOAD_BYTES_MAX - 1024;

// A GroupCreated event names every member plus the info strings, and must fit in a payload.
const _: () = assert!(
    GROUP_USERS_MAX * 8
        + GROUP_NAME_BYTES_MAX
        + GROUP_DESCRIPTION_BYTES_MAX
        + MEDIA_ID_BYTES_MAX
        + 1024
        <= PAYLOAD_BYTES_MAX
);

/// Most users one `Subscribe` may name; also the per-connection cap (a `Subscribe` replaces the
/// connection's whole subscription set).
pub const PRESENCE_SUBSCRIPTIONS_MAX: usize = 256;

const _: () = assert!(PRESENCE_SUBSCRIPTIONS_MAX * 8 + 1024 <= FRAME_BYTES_MAX);

/// Most media ids one `Send` may reference (an album of photos is a handful; the owner stores one
/// grant record per id, so this bounds the records one message adds).
pub const SEND_MEDIA_IDS_MAX: usize = 32;
/// Longest media id in a `Send` (ids the server mints are 22 characters; the HTTP API accepts at
/// most 64).
pub const SEND_MEDIA_ID_BYTES_MAX: usize = 64;

// The ids travel in the same frame as the payload and count toward `FRAME_BYTES_MAX` (a
// message with a maximal payload carries fewer); a full list alone fits easily.
const _: () = assert!(SEND_MEDIA_IDS_MAX * (SEND_MEDIA_ID_BYTES_MAX + 8) + 1024 <= FRAME_BYTES_MAX);
