//! The upload check, sans-IO: counts and hashes the body as it streams through, so the whole
//! object is never in memory and a body longer than declared is refused at the first byte too
//! many.

use sha2::{Digest, Sha256};

use crate::MediaError;

/// Checks a streamed body against the declared size and SHA-256.
#[derive(Clone, Debug)]
pub struct Verifier {
    declared_size: u64,
    declared_sha256: [u8; 32],
    received: u64,
    hasher: Sha256,
}

impl Verifier {
    pub fn new(declared_size: u64, declared_sha256: [u8; 32]) -> Self {
        Verifier {
            declared_size,
            declared_sha256,
            received: 0,
            hasher: Sha256::new(),
        }
    }

    /// Bytes accepted so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Takes the next piece of the body; refuses it if the body would exceed the declared size.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<(), MediaError> {
        let received = self.received.saturating_add(chunk.len() as u64);
        if received > self.declared_size {
            return Err(MediaError::SizeMismatch {
                declared: self.declared_size,
                received,
            });
        }
        self.hasher.update(chunk);
        self.received = received;
        Ok(())
    }

    /// The body ended: it must be complete and hash to the declared digest.
    pub fn finish(self) -> Result<(), MediaError> {
        if self.received != self.declared_size {
            return Err(MediaError::SizeMismatch {
                declared: self.declared_size,
                received: self.received,
            });
        }
        let got: [u8; 32] = self.hasher.finalize().into();
        // Not secret: the client declared the digest and sent the bytes.
        if got != self.declared_sha256 {
            return Err(MediaError::Sha256Mismatch);
        }
        Ok(())
    }
}

/// SHA-256 of `bytes` (tests and clients).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exact_body_in_any_split() {
        let body = b"hello media world";
        for split in 0..=body.len() {
            let mut v = Verifier::new(body.len() as u64, sha256(body));
            v.feed(&body[..split]).expect("fits");
            v.feed(&body[split..]).expect("fits");
            assert_eq!(v.received(), body.len() as u64);
            v.finish().expect("matches");
        }
    }

    #[test]
    fn refuses_wrong_size_or_hash() {
        let body = b"0123456789";
        let mut v = Verifier::new(9, sha256(body));
        assert!(matches!(
            v.feed(body),
            Err(MediaError::SizeMismatch {
                declared: 9,
                received: 10
            })
        ));
        let mut v = Verifier::new(11, sha256(body));
        v.feed(body).expect("fits");
        assert_eq!(v.finish().map_err(|e| e.code()), Err("size_mismatch"));
        let mut v = Verifier::new(10, sha256(b"0123456788"));
        v.feed(body).expect("fits");
        assert_eq!(v.finish().map_err(|e| e.code()), Err("sha256_mismatch"));
    }
}
