//! A sans-IO TLS server session: rustls over in-memory buffers, so the engine's connection task
//! (glommio sockets) drives it the same way it drives the HTTP and WebSocket codecs.
//!
//! ```text
//!  socket ──ciphertext──► feed_ciphertext ─► rustls ─► take_plaintext ──► http1::Conn / WebSocket
//!  socket ◄─ciphertext─── take_ciphertext ◄─ rustls ◄─ write_plaintext ◄── responses, frames
//! ```
//!
//! Call order after every socket read: `feed_ciphertext(bytes)`, then `take_plaintext`, then
//! `take_ciphertext` and write whatever it produced (handshake messages, alerts) to the socket.
//! After `write_plaintext`, `take_ciphertext` again. A `feed_ciphertext` error is fatal: send
//! what `take_ciphertext` still yields (the alert) and close.
//!
//! The crypto provider is `ring` (aws-lc-rs would need cmake and nasm to build); protocol
//! versions are rustls' safe defaults (TLS 1.3 and 1.2); ALPN offers `http/1.1` only (the
//! WebSocket upgrade is HTTP/1.1).

use std::io::{self, Read as _, Write as _};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

/// Largest plaintext rustls buffers for sending before `take_ciphertext` drains it (it also
/// bounds the encrypted bytes waiting to go out). `write_plaintext` accepts less than asked when
/// it is full, which is the back-pressure signal.
pub const TLS_SEND_BUFFER_BYTES_MAX: usize = 256 * 1024;
/// Largest certificate chain or key file read at start-up.
pub const TLS_PEM_FILE_BYTES_MAX: u64 = 1024 * 1024;

/// What went wrong with TLS.
#[derive(Debug)]
#[non_exhaustive]
pub enum TlsError {
    /// The peer broke the protocol (bad record, handshake failure, bad certificate…). Fatal for
    /// the connection; an alert may be waiting in `take_ciphertext`.
    Peer(rustls::Error),
    /// The certificate or key could not be read or used (start-up).
    Config(String),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Peer(e) => write!(f, "TLS error: {e}"),
            TlsError::Config(e) => write!(f, "TLS configuration: {e}"),
        }
    }
}

impl std::error::Error for TlsError {}

/// A server config from a PEM certificate chain (leaf first) and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1).
pub fn server_config_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Config(format!("certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::Config(
            "no certificate in the certificate PEM".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Config(format!("private key PEM: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(format!("certificate/key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// [`server_config_from_pem`] from files (`--tls-cert`, `--tls-key`); start-up only.
pub fn server_config_from_files(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &std::path::Path| -> Result<Vec<u8>, TlsError> {
        let file = std::fs::File::open(path)
            .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
        let mut bytes = Vec::new();
        file.take(TLS_PEM_FILE_BYTES_MAX + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| TlsError::Config(format!("{}: {e}", path.display())))?;
        if bytes.len() as u64 > TLS_PEM_FILE_BYTES_MAX {
            return Err(TlsError::Config(format!(
                "{}: larger than {TLS_PEM_FILE_BYTES_MAX} bytes",
                path.display()
            )));
        }
        Ok(bytes)
    };
    server_config_from_pem(&read(cert_path)?, &read(key_path)?)
}

/// One TLS server connection over memory buffers. See the module docs for the call order.
pub struct TlsSession {
    conn: ServerConnection,
    /// Decrypted bytes not yet taken.
    plaintext: Vec<u8>,
    peer_closed: bool,
}

impl std::fmt::Debug for TlsSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSession")
            .field("handshaking", &self.conn.is_handshaking())
            .field("plaintext", &self.plaintext.len())
            .field("peer_closed", &self.peer_closed)
            .finish()
    }
}

impl TlsSession {
    pub fn new(config: Arc<ServerConfig>) -> Result<Self, TlsError> {
        let mut conn = ServerConnection::new(config).map_err(TlsError::Peer)?;
        conn.set_buffer_limit(Some(TLS_SEND_BUFFER_BYTES_MAX));
        Ok(TlsSession {
            conn,
            plaintext: Vec::new(),
            peer_closed: false,
        })
    }

    /// Processes ciphertext read from the socket. Decrypted data waits for `take_plaintext`;
    /// handshake replies wait for `take_ciphertext`. Bytes after the peer's `close_notify` are
    /// ignored.
    pub fn feed_ciphertext(&mut self, mut bytes: &[u8]) -> Result<(), TlsError> {
        while !bytes.is_empty() && !self.peer_closed {
            let n = match self.conn.read_tls(&mut bytes) {
                Ok(n) => n,
                // Only "plaintext buffer full", which draining below prevents; treat as a peer
                // error rather than loop.
                Err(e) => return Err(TlsError::Peer(rustls::Error::General(e.to_string()))),
            };
            self.conn.process_new_packets().map_err(TlsError::Peer)?;
            self.drain_plaintext()?;
            if n == 0 {
                break;
            }
        }
        Ok(())
    }

    /// The peer closed the TCP connection. A close without `close_notify` after the handshake
    /// is not an error for HTTP/1.1 framed by lengths, so this only records it.
    pub fn feed_eof(&mut self) {
        // Reading from an empty slice marks EOF inside rustls.
        let _ = self.conn.read_tls(&mut io::empty());
        self.peer_closed = true;
    }

    fn drain_plaintext(&mut self) -> Result<(), TlsError> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.conn.reader().read(&mut chunk) {
                Ok(0) => {
                    self.peer_closed = true;
                    return Ok(());
                }
                Ok(n) => self.plaintext.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(TlsError::Peer(rustls::Error::General(e.to_string()))),
            }
        }
    }

    /// Appends the decrypted bytes received so far to `out`; returns how many.
    pub fn take_plaintext(&mut self, out: &mut Vec<u8>) -> usize {
        let n = self.plaintext.len();
        out.append(&mut self.plaintext);
        n
    }

    /// Queues application data for encryption (buffered until the handshake completes).
    /// Returns how many bytes were accepted: fewer than `data.len()` when the send buffer is
    /// full; drain it with `take_ciphertext` and offer the rest again.
    pub fn write_plaintext(&mut self, data: &[u8]) -> usize {
        // Writing into rustls' buffer only fails when it is full, which is `Ok(0)` here.
        self.conn.writer().write(data).unwrap_or(0)
    }

    /// Appends the ciphertext waiting to be sent to `out`; returns how many bytes.
    pub fn take_ciphertext(&mut self, out: &mut Vec<u8>) -> usize {
        let before = out.len();
        while self.conn.wants_write() {
            match self.conn.write_tls(out) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        out.len() - before
    }

    /// Sends `close_notify` (then `take_ciphertext`); nothing more can be written.
    pub fn close(&mut self) {
        self.conn.send_close_notify();
    }

    pub fn is_handshaking(&self) -> bool {
        self.conn.is_handshaking()
    }

    /// Ciphertext is waiting for `take_ciphertext`.
    pub fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// The peer sent `close_notify` (or EOF was fed): no more plaintext will come.
    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// The SNI host name the client asked for.
    pub fn server_name(&self) -> Option<&str> {
        self.conn.server_name()
    }

    /// The negotiated ALPN protocol (`http/1.1`, or none if the client offered none).
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    struct Pki {
        cert_pem: String,
        key_pem: String,
        cert_der: CertificateDer<'static>,
    }

    fn generate(names: &[&str]) -> Pki {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .expect("rcgen");
        Pki {
            cert_pem: ck.cert.pem(),
            key_pem: ck.key_pair.serialize_pem(),
            cert_der: ck.cert.der().clone(),
        }
    }

    fn client(
        pki: &Pki,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
        name: &str,
    ) -> ClientConnection {
        let mut roots = RootCertStore::empty();
        roots.add(pki.cert_der.clone()).expect("root");
        let mut config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = ServerName::try_from(name.to_owned()).expect("server name");
        let mut conn = ClientConnection::new(Arc::new(config), name).expect("client");
        conn.set_buffer_limit(None);
        conn
    }

    /// Moves bytes both ways until neither side has anything to send; returns the plaintext the
    /// server received, or the first error of either side (as text).
    fn pump(client: &mut ClientConnection, server: &mut TlsSession) -> Result<Vec<u8>, String> {
        pump_both(client, server, &mut Vec::new())
    }

    /// [`pump`], also collecting the plaintext the client receives into `to_client_plain`.
    fn pump_both(
        client: &mut ClientConnection,
        server: &mut TlsSession,
        to_client_plain: &mut Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        let mut received = Vec::new();
        for _ in 0..1000 {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client
                    .write_tls(&mut to_server)
                    .map_err(|e| e.to_string())?;
            }
            let fed = server.feed_ciphertext(&to_server);
            server.take_plaintext(&mut received);
            let mut to_client = Vec::new();
            server.take_ciphertext(&mut to_client);
            if !to_client.is_empty() {
                let mut rd = &to_client[..];
                while !rd.is_empty() {
                    if client.read_tls(&mut rd).map_err(|e| e.to_string())? == 0 {
                        break;
                    }
                    client
                        .process_new_packets()
                        .map_err(|e| format!("client: {e}"))?;
                    to_client_plain.extend(client_read_all(client));
                }
            }
            fed.map_err(|e| format!("server: {e}"))?;
            if to_server.is_empty() && to_client.is_empty() {
                return Ok(received);
            }
        }
        Err("no progress after 1000 rounds".to_owned())
    }

    fn client_read_all(client: &mut ClientConnection) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = client.reader().read_to_end(&mut out);
        out
    }

    #[test]
    fn handshake_and_data_both_ways() {
        let pki = generate(&["localhost"]);
        let config = server_config_from_pem(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes())
            .expect("config");
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let mut server = TlsSession::new(config.clone()).expect("session");
            let mut client = client(&pki, &[version], &[b"h2", b"http/1.1"], "localhost");
            // The request is written before the handshake; the client buffers it.
            client
                .writer()
                .write_all(b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .expect("client write");
            let received = pump(&mut client, &mut server).expect("handshake");
            assert!(!server.is_handshaking());
            assert!(!client.is_handshaking());
            assert_eq!(server.protocol_version(), Some(version.version));
            assert_eq!(server.server_name(), Some("localhost"));
            assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
            assert_eq!(received, b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\n\r\n");

            // A response larger than a record and than the send buffer, written in parts.
            let big: Vec<u8> = (0..(TLS_SEND_BUFFER_BYTES_MAX * 2 + 7))
                .map(|i| (i % 251) as u8)
                .collect();
            let mut offset = 0;
            let mut got = Vec::new();
            while offset < big.len() {
                let n = server.write_plaintext(&big[offset..]);
                assert!(n > 0 || server.wants_write());
                offset += n;
                pump_both(&mut client, &mut server, &mut got).expect("pump");
            }
            assert_eq!(got.len(), big.len());
            assert!(got == big, "payload differs");

            // Client → server after the handshake, in one big write.
            let upload = vec![7u8; 100_000];
            client.writer().write_all(&upload).expect("client write");
            let received = pump(&mut client, &mut server).expect("upload");
            assert_eq!(received.len(), upload.len());

            // Orderly close both ways.
            client.send_close_notify();
            pump(&mut client, &mut server).expect("close");
            assert!(server.peer_closed());
            server.close();
            pump(&mut client, &mut server).expect("close");
        }
    }

    #[test]
    fn wrong_name_fails_on_the_client() {
        let pki = generate(&["localhost"]);
        let config = server_config_from_pem(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes())
            .expect("config");
        let mut server = TlsSession::new(config).expect("session");
        let mut client = client(&pki, &[&rustls::version::TLS13], &[], "example.com");
        let err = pump(&mut client, &mut server).expect_err("must fail");
        assert!(err.starts_with("client:"), "{err}");
        // The client's alert reaches the server, which fails too.
        let mut alert = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut alert).expect("alert");
        }
        assert!(server.feed_ciphertext(&alert).is_err());
        // No ALPN offered: none negotiated (the connection is still HTTP/1.1).
        assert_eq!(server.alpn_protocol(), None);
    }

    #[test]
    fn garbage_is_a_peer_error_with_an_alert() {
        let pki = generate(&["localhost"]);
        let config = server_config_from_pem(pki.cert_pem.as_bytes(), pki.key_pem.as_bytes())
            .expect("config");
        let mut server = TlsSession::new(config).expect("session");
        // A plain-HTTP request on the TLS port.
        let err = server
            .feed_ciphertext(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .expect_err("not TLS");
        assert!(matches!(err, TlsError::Peer(_)), "{err}");
        let mut out = Vec::new();
        assert!(server.take_ciphertext(&mut out) > 0, "an alert is sent");
        assert_eq!(out[0], 21, "record type alert");
    }

    #[test]
    fn bad_pem_is_a_config_error() {
        let pki = generate(&["localhost"]);
        let other = generate(&["localhost"]);
        let cases: &[(&str, &str, &str)] = &[
            ("", &pki.key_pem, "no certificate"),
            ("not pem", &pki.key_pem, "no certificate"),
            (&pki.cert_pem, "", "private key PEM"),
            (&pki.cert_pem, &pki.cert_pem, "private key PEM"),
            // A key that does not match the certificate.
            (&pki.cert_pem, &other.key_pem, "certificate/key"),
        ];
        for (cert, key, expect) in cases {
            match server_config_from_pem(cert.as_bytes(), key.as_bytes()) {
                Err(TlsError::Config(msg)) => {
                    assert!(msg.contains(expect), "{msg} (want {expect})")
                }
                other => panic!("expected a config error containing {expect:?}, got {other:?}"),
            }
        }
    }

    #[test]
    fn config_from_files() {
        let pki = generate(&["localhost"]);
        let dir = std::env::temp_dir().join(format!("switchboard-api-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &pki.cert_pem).expect("write cert");
        std::fs::write(&key, &pki.key_pem).expect("write key");
        assert!(server_config_from_files(&cert, &key).is_ok());
        let missing = server_config_from_files(&dir.join("nope.pem"), &key);
        assert!(matches!(missing, Err(TlsError::Config(m)) if m.contains("nope.pem")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
