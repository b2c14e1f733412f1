//! Users, their phone numbers and devices, behind the [`AccountStore`] trait. The in-memory
//! implementation serves tests and development; the durable one (in `storage/`) comes with the
//! engine wiring.
//!
//! ```text
//!  otp::Otp::verify ─► AccountStore::login(phone, device_name) ─► Login { user_id, device_id }
//!  DELETE /v1/devices/{id} ─► AccountStore::remove_device
//! ```
//!
//! Device ids are never reused within a user, so a token minted for a removed device can never
//! name a later device.

use std::collections::HashMap;

use switchboard_wire::{DeviceId, UserId};

/// Fewest digits in an E.164 number (country code included); the shortest numbers in use
/// (e.g. Niue, +683 xxxx) have 7.
pub const PHONE_DIGITS_MIN: usize = 7;
/// Most digits in an E.164 number (ITU-T E.164 §6.1).
pub const PHONE_DIGITS_MAX: usize = 15;
/// Most devices per user (a phone plus linked devices); logging in on one more gets 409.
pub const DEVICES_PER_USER_MAX: usize = 5;
/// Longest device name ("Alice's laptop"), in bytes of UTF-8.
pub const DEVICE_NAME_BYTES_MAX: usize = 64;

/// A phone number in E.164 form: `+` and 7 to 15 digits, the first not 0.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Phone(String);

impl Phone {
    /// Strict E.164: no spaces, dashes or brackets (clients normalise before sending).
    pub fn parse(s: &str) -> Option<Phone> {
        let digits = s.strip_prefix('+')?;
        let valid = (PHONE_DIGITS_MIN..=PHONE_DIGITS_MAX).contains(&digits.len())
            && digits.bytes().all(|b| b.is_ascii_digit())
            && !digits.starts_with('0');
        valid.then(|| Phone(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Phone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `name` is an acceptable device name: 1..=64 bytes, no control characters, not only
/// whitespace.
pub fn is_valid_device_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= DEVICE_NAME_BYTES_MAX
        && !name.chars().any(char::is_control)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub name: String,
}

/// A successful login: the user (created if the phone was new) and the new device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Login {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub new_user: bool,
}

/// Why the store refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// The user already has [`DEVICES_PER_USER_MAX`] devices. 409.
    DevicesFull,
    /// The store could not answer (I/O, overload). 503.
    Unavailable(String),
}

impl StoreError {
    pub fn status(&self) -> u16 {
        match self {
            StoreError::DevicesFull => 409,
            StoreError::Unavailable(_) => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            StoreError::DevicesFull => "too_many_devices",
            StoreError::Unavailable(_) => "unavailable",
        }
    }
}

/// Where users, phones and devices live.
pub trait AccountStore {
    fn user_by_phone(&self, phone: &Phone) -> Result<Option<UserId>, StoreError>;
    fn phone_of(&self, user: UserId) -> Result<Option<Phone>, StoreError>;
    /// Finds or creates the user owning `phone` and adds a device named `device_name`, as one
    /// atomic step. `device_name` is valid ([`is_valid_device_name`]).
    fn login(&mut self, phone: &Phone, device_name: &str) -> Result<Login, StoreError>;
    fn devices(&self, user: UserId) -> Result<Vec<Device>, StoreError>;
    /// Removes a device; `Ok(false)` if it did not exist. Revoking its tokens is the caller's
    /// job (the token check consults the device list).
    fn remove_device(&mut self, user: UserId, device: DeviceId) -> Result<bool, StoreError>;
}

#[derive(Clone, Debug)]
struct UserRecord {
    phone: Phone,
    devices: Vec<Device>,
    next_device: u32,
}

/// An [`AccountStore`] in memory (tests, development).
#[derive(Clone, Debug, Default)]
pub struct InMemoryAccounts {
    by_phone: HashMap<Phone, UserId>,
    users: HashMap<UserId, UserRecord>,
    /// The last user id handed out; ids start at 1 (0 is never valid).
    last_user: u64,
}

impl InMemoryAccounts {
    pub fn new() -> Self {
        InMemoryAccounts::default()
    }
}

impl AccountStore for InMemoryAccounts {
    fn user_by_phone(&self, phone: &Phone) -> Result<Option<UserId>, StoreError> {
        Ok(self.by_phone.get(phone).copied())
    }

    fn phone_of(&self, user: UserId) -> Result<Option<Phone>, StoreError> {
        Ok(self.users.get(&user).map(|u| u.phone.clone()))
    }

    fn login(&mut self, phone: &Phone, device_name: &str) -> Result<Login, StoreError> {
        debug_assert!(is_valid_device_name(device_name));
        let existing = self.by_phone.get(phone).copied();
        if let Some(user) = existing {
            if self
                .users
                .get(&user)
                .is_some_and(|u| u.devices.len() >= DEVICES_PER_USER_MAX)
            {
                return Err(StoreError::DevicesFull);
            }
        }
        let user_id = existing.unwrap_or_else(|| {
            self.last_user += 1;
            UserId(self.last_user)
        });
        let record = self.users.entry(user_id).or_insert_with(|| UserRecord {
            phone: phone.clone(),
            devices: Vec::new(),
            next_device: 1,
        });
        let device_id = DeviceId(record.next_device);
        record.next_device += 1;
        record.devices.push(Device {
            id: device_id,
            name: device_name.to_owned(),
        });
        self.by_phone.insert(phone.clone(), user_id);
        Ok(Login {
            user_id,
            device_id,
            new_user: existing.is_none(),
        })
    }

    fn devices(&self, user: UserId) -> Result<Vec<Device>, StoreError> {
        Ok(self
            .users
            .get(&user)
            .map(|u| u.devices.clone())
            .unwrap_or_default())
    }

    fn remove_device(&mut self, user: UserId, device: DeviceId) -> Result<bool, StoreError> {
        let Some(record) = self.users.get_mut(&user) else {
            return Ok(false);
        };
        let before = record.devices.len();
        record.devices.retain(|d| d.id != device);
        Ok(record.devices.len() != before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164() {
        for (input, valid) in [
            ("+14155550123", true),
            ("+4930123456", true),
            ("+6834002", true),
            ("+123456789012345", true),
            ("+1234567890123456", false),
            ("+123456", false),
            ("14155550123", false),
            ("+04155550123", false),
            ("+1 415 555 0123", false),
            ("+1-415-555-0123", false),
            ("+1415555012a", false),
            ("++14155550123", false),
            ("+", false),
            ("", false),
            ("+１４１５５５５０１２３", false),
        ] {
            assert_eq!(Phone::parse(input).is_some(), valid, "{input:?}");
        }
    }

    #[test]
    fn device_names() {
        assert!(is_valid_device_name("Alice's laptop"));
        assert!(is_valid_device_name("téléphone"));
        assert!(is_valid_device_name(&"x".repeat(DEVICE_NAME_BYTES_MAX)));
        assert!(!is_valid_device_name(
            &"x".repeat(DEVICE_NAME_BYTES_MAX + 1)
        ));
        assert!(!is_valid_device_name(""));
        assert!(!is_valid_device_name("   "));
        assert!(!is_valid_device_name("a\nb"));
        assert!(!is_valid_device_name("a\u{7f}"));
    }

    #[test]
    fn logins_devices_and_removal() {
        let mut s = InMemoryAccounts::new();
        let a = Phone::parse("+14155550123").expect("phone");
        let b = Phone::parse("+4930123456").expect("phone");
        let first = s.login(&a, "phone").expect("login");
        assert_eq!(
            first,
            Login {
                user_id: UserId(1),
                device_id: DeviceId(1),
                new_user: true
            }
        );
        let second = s.login(&a, "laptop").expect("login");
        assert_eq!(
            (second.user_id, second.device_id, second.new_user),
            (UserId(1), DeviceId(2), false)
        );
        assert_eq!(s.login(&b, "phone").expect("login").user_id, UserId(2));
        assert_eq!(s.user_by_phone(&a), Ok(Some(UserId(1))));
        assert_eq!(s.phone_of(UserId(2)), Ok(Some(b)));
        assert_eq!(s.phone_of(UserId(9)), Ok(None));
        for i in 2..DEVICES_PER_USER_MAX {
            s.login(&a, &format!("d{i}")).expect("login");
        }
        assert_eq!(s.login(&a, "one too many"), Err(StoreError::DevicesFull));
        assert_eq!(s.remove_device(UserId(1), DeviceId(1)), Ok(true));
        assert_eq!(s.remove_device(UserId(1), DeviceId(1)), Ok(false));
        assert_eq!(s.remove_device(UserId(9), DeviceId(1)), Ok(false));
        // Device ids are never reused.
        let next = s.login(&a, "new phone").expect("login");
        assert_eq!(next.device_id, DeviceId(DEVICES_PER_USER_MAX as u32 + 1));
        assert_eq!(
            s.devices(UserId(1)).expect("devices").len(),
            DEVICES_PER_USER_MAX
        );
    }
}
