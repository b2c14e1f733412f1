//! Identifier newtypes shared by every crate. Plain integers on the wire; newtypes in Rust so a
//! user id can never be passed where a chat id is expected.

use std::fmt;

/// A user account. 0 is never a valid user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct UserId(pub u64);

/// One device (phone, laptop, browser) of a user; unique per user. 0 is never a valid device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct DeviceId(pub u32);

/// A chat. 1:1 chats have ids derived from their two members (see [`ChatId::direct`]); the top
/// bit is clear for direct chats and set for group chats (a later issue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChatId(pub u64);

/// A position in a chat's total order. Starts at 1 and is gap-free; 0 means "before the first".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Seq(pub u64);

/// A server-assigned message id, unique across the whole deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MsgId(pub u64);

/// A client-chosen 16-byte id that makes `Send` idempotent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ClientMsgId(pub [u8; 16]);

impl ClientMsgId {
    pub fn from_halves(hi: u64, lo: u64) -> Self {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&hi.to_be_bytes());
        b[8..].copy_from_slice(&lo.to_be_bytes());
        ClientMsgId(b)
    }
    pub fn halves(&self) -> (u64, u64) {
        let hi = u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"));
        let lo = u64::from_be_bytes(self.0[8..].try_into().expect("8 bytes"));
        (hi, lo)
    }
    pub fn is_nil(&self) -> bool {
        self.0 == [0u8; 16]
    }
}

impl fmt::Display for ClientMsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

const GROUP_BIT: u64 = 1 << 63;

impl ChatId {
    /// The 1:1 chat of two distinct users: the same id whichever of them asks. A 63-bit
    /// hash (FNV-1a over the ordered pair, then a SplitMix64 finalizer); the chat's stored
    /// member list is checked on every send, so a (vanishingly rare) collision is an error, never
    /// a message in the wrong chat.
    pub fn direct(a: UserId, b: UserId) -> ChatId {
        let (lo, hi) = if a <= b { (a.0, b.0) } else { (b.0, a.0) };
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in lo.to_le_bytes().into_iter().chain(hi.to_le_bytes()) {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h = splitmix64(h);
        let id = h & !GROUP_BIT;
        // 0 means "no chat" on the wire.
        ChatId(if id == 0 { 1 } else { id })
    }
    /// The group created by `creator` with idempotency key `client_msg_id`: deterministic, so a
    /// retried `CreateGroup` lands on the same chat (and the same owner shard), where the retry is
    /// recognised.
    pub fn group(creator: UserId, client_msg_id: ClientMsgId) -> ChatId {
        let (hi, lo) = client_msg_id.halves();
        let h = splitmix64(splitmix64(creator.0 ^ 0x6772_6f75_7073_0000) ^ hi) ^ lo;
        ChatId(splitmix64(h) | GROUP_BIT)
    }

    pub fn is_direct(&self) -> bool {
        self.0 & GROUP_BIT == 0
    }
}

/// SplitMix64 finalizer: a cheap, well-mixed 64-bit hash step. Also used to spread chats and users
/// over shards.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_chat_is_symmetric_and_direct() {
        for (a, b) in [(1, 2), (7, 1_000_000), (u64::MAX, 3)] {
            let x = ChatId::direct(UserId(a), UserId(b));
            assert_eq!(x, ChatId::direct(UserId(b), UserId(a)));
            assert!(x.is_direct());
            assert_ne!(x.0, 0);
        }
        assert_ne!(
            ChatId::direct(UserId(1), UserId(2)),
            ChatId::direct(UserId(1), UserId(3))
        );
    }

    #[test]
    fn client_msg_id_halves_roundtrip() {
        let id = ClientMsgId::from_halves(0x0102_0304_0506_0708, 0x1112_1314_1516_1718);
        assert_eq!(id.halves(), (0x0102_0304_0506_0708, 0x1112_1314_1516_1718));
        assert_eq!(id.to_string(), "01020304050607081112131415161718");
    }
}
