//! The values the push pieces pass around: platforms, targets, notifications, outcomes.

use serde::{Deserialize, Serialize};

/// Longest push token accepted (FCM tokens are ~160 bytes, APNs 64 hex digits; webhook tokens
/// are whatever the receiver uses to find the device).
pub const TOKEN_BYTES_MAX: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Fcm,
    Apns,
    Webhook,
}

impl Platform {
    pub fn parse(s: &str) -> Option<Platform> {
        match s {
            "fcm" => Some(Platform::Fcm),
            "apns" => Some(Platform::Apns),
            "webhook" => Some(Platform::Webhook),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Fcm => "fcm",
            Platform::Apns => "apns",
            Platform::Webhook => "webhook",
        }
    }
}

/// Is `token` acceptable for `platform`? (Non-empty, bounded, printable ASCII; APNs tokens are
/// hex.) Used by the HTTP layer before registering.
pub fn valid_token(platform: Platform, token: &str) -> bool {
    !token.is_empty()
        && token.len() <= TOKEN_BYTES_MAX
        && token.bytes().all(|b| b.is_ascii_graphic())
        && (platform != Platform::Apns || token.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// One device's registered token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub user: u64,
    pub device: u32,
    pub platform: Platform,
    pub token: String,
}

/// What a sink sends: no message content, only counts and ids (payloads may be end-to-end
/// encrypted, and the server does not know display names unless told).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    pub chat: u64,
    /// New messages collapsed into this notification.
    pub count: u32,
    /// The sender when every collapsed message has the same one.
    pub sender: Option<u64>,
    pub sender_name: Option<String>,
    /// Highest seq covered.
    pub last_seq: u64,
    /// Unread messages of the user over all chats the push queue knows.
    pub badge: u32,
    pub title: String,
    pub body: String,
    /// Same id for every notification of a chat, so devices replace rather than stack them.
    pub collapse_id: String,
}

impl Notification {
    pub fn texts(
        chat: u64,
        count: u32,
        sender: Option<u64>,
        sender_name: Option<&str>,
    ) -> (String, String) {
        let what = if count == 1 {
            "1 new message".to_owned()
        } else {
            format!("{count} new messages")
        };
        match (sender, sender_name) {
            (Some(_), Some(name)) => (name.to_owned(), format!("{what} from {name}")),
            (Some(id), None) => (
                "New messages".to_owned(),
                format!("{what} from user {id} in chat {chat}"),
            ),
            (None, _) => ("New messages".to_owned(), format!("{what} in chat {chat}")),
        }
    }
}

/// How a sink's attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// The push service says the token is dead: forget it, do not retry.
    InvalidToken,
    /// Try again later (network error, timeout, 429, 5xx); `retry_after_ms` from the service.
    Retry {
        error: String,
        retry_after_ms: Option<u64>,
    },
    /// Retrying will not help (bad request, no sink configured): straight to the dead letters.
    Permanent {
        error: String,
    },
}
