//! JSON Web Tokens signed with ring: RS256 for the FCM service-account assertion, ES256 for
//! the APNs provider token. Only signing; the push services verify.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, RsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;

pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn pkcs8_der(pem: &str) -> Result<Vec<u8>, String> {
    match PrivateKeyDer::from_pem_slice(pem.as_bytes()) {
        Ok(PrivateKeyDer::Pkcs8(k)) => Ok(k.secret_pkcs8_der().to_vec()),
        Ok(_) => Err("private key is not PKCS#8 (\"BEGIN PRIVATE KEY\")".into()),
        Err(e) => Err(format!("private key PEM: {e}")),
    }
}

fn signing_input(header: &serde_json::Value, claims: &serde_json::Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// RS256 (RSASSA-PKCS1-v1_5 with SHA-256), as Google's OAuth2 JWT bearer flow requires.
pub struct Rs256 {
    key: RsaKeyPair,
    rng: SystemRandom,
}

impl Rs256 {
    pub fn from_pem(pem: &str) -> Result<Rs256, String> {
        let key = RsaKeyPair::from_pkcs8(&pkcs8_der(pem)?)
            .map_err(|e| format!("RSA private key: {e}"))?;
        Ok(Rs256 {
            key,
            rng: SystemRandom::new(),
        })
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let input = signing_input(&serde_json::json!({"alg": "RS256", "typ": "JWT"}), claims);
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, input.as_bytes(), &mut sig)
            .expect("RSA signing with a valid key and buffer");
        format!("{input}.{}", b64(&sig))
    }

    /// DER `RSAPublicKey` (for tests that verify).
    pub fn public_key_der(&self) -> Vec<u8> {
        self.key.public().as_ref().to_vec()
    }
}

/// ES256 (ECDSA P-256, SHA-256, fixed-size r‖s), as APNs provider tokens require.
pub struct Es256 {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    key_id: String,
}

impl Es256 {
    pub fn from_pem(pem: &str, key_id: &str) -> Result<Es256, String> {
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8_der(pem)?, &rng)
                .map_err(|e| format!("P-256 private key: {e}"))?;
        Ok(Es256 {
            key,
            rng,
            key_id: key_id.to_owned(),
        })
    }

    pub fn sign(&self, claims: &serde_json::Value) -> String {
        let input = signing_input(
            &serde_json::json!({"alg": "ES256", "kid": self.key_id}),
            claims,
        );
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .expect("ECDSA signing with a valid key");
        format!("{input}.{}", b64(sig.as_ref()))
    }

    /// Uncompressed public point (for tests that verify).
    pub fn public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair;
        self.key.public_key().as_ref().to_vec()
    }
}

/// Splits and verifies a JWT; returns (header, claims). For tests and local test servers.
pub fn verify(
    jwt: &str,
    alg: &'static dyn ring::signature::VerificationAlgorithm,
    public_key: &[u8],
) -> Result<(serde_json::Value, serde_json::Value), String> {
    let mut parts = jwt.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not three parts".into());
    };
    let dec = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|e| e.to_string());
    let sig = dec(s)?;
    ring::signature::UnparsedPublicKey::new(alg, public_key)
        .verify(format!("{h}.{c}").as_bytes(), &sig)
        .map_err(|_| "bad signature".to_owned())?;
    let json = |b: Vec<u8>| serde_json::from_slice(&b).map_err(|e| e.to_string());
    Ok((json(dec(h)?)?, json(dec(c)?)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256};

    pub const TEST_RSA_PEM: &str = include_str!("../tests/fixtures/test-rsa-key.pem");

    #[test]
    fn rs256_round_trip() {
        let k = Rs256::from_pem(TEST_RSA_PEM).unwrap();
        let jwt = k.sign(&serde_json::json!({"iss": "a@b", "exp": 5}));
        let (h, c) = verify(&jwt, &RSA_PKCS1_2048_8192_SHA256, &k.public_key_der()).unwrap();
        assert_eq!(h["alg"], "RS256");
        assert_eq!(c["iss"], "a@b");
        let mut bad = jwt.clone();
        bad.pop();
        bad.push(if jwt.ends_with('A') { 'B' } else { 'A' });
        assert!(verify(&bad, &RSA_PKCS1_2048_8192_SHA256, &k.public_key_der()).is_err());
        assert!(Rs256::from_pem("nope").is_err());
    }

    #[test]
    fn es256_round_trip() {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let k = Es256::from_pem(&kp.serialize_pem(), "KEY123").unwrap();
        let jwt = k.sign(&serde_json::json!({"iss": "TEAM", "iat": 1}));
        let (h, c) = verify(&jwt, &ECDSA_P256_SHA256_FIXED, &k.public_key()).unwrap();
        assert_eq!(h["kid"], "KEY123");
        assert_eq!(h["alg"], "ES256");
        assert_eq!(c["iss"], "TEAM");
        assert!(Es256::from_pem(TEST_RSA_PEM, "k").is_err());
    }
}
