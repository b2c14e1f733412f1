//! A small HTTP client for the sinks on the push thread's tokio runtime: hyper 1 connections
//! (HTTP/1.1 pooled per host, HTTP/2 one multiplexed connection per host), rustls with the
//! Mozilla roots plus an optional extra CA, and a deadline on every request.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper::{HeaderMap, Request, StatusCode, Uri};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Idle HTTP/1.1 connections kept per host.
pub const H1_IDLE_PER_HOST_MAX: usize = 16;
/// Largest response body read from a push service (their answers are small JSON).
pub const RESPONSE_BODY_BYTES_MAX: usize = 64 * 1024;

pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// `Retry-After` in seconds, as ms.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.headers
            .get(hyper::header::RETRY_AFTER)?
            .to_str()
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
            .map(|s| s.saturating_mul(1000))
    }
}

type H1 = http1::SendRequest<Full<Bytes>>;
type H2 = http2::SendRequest<Full<Bytes>>;

pub struct HttpClient {
    tls_h1: TlsConnector,
    tls_h2: TlsConnector,
    timeout: Duration,
    h1_idle: Mutex<HashMap<String, Vec<H1>>>,
    h2: Mutex<HashMap<String, H2>>,
}

impl HttpClient {
    pub fn new(extra_ca_pem: Option<&[u8]>, timeout: Duration) -> Result<HttpClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(pem) = extra_ca_pem {
            use rustls_pki_types::pem::PemObject;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("ca_file: {e}"))?;
                roots.add(cert).map_err(|e| format!("ca_file: {e}"))?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let make = |alpn: &[u8]| -> Result<TlsConnector, String> {
            let mut c = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(TlsConnector::from(Arc::new(c)))
        };
        Ok(HttpClient {
            tls_h1: make(b"http/1.1")?,
            tls_h2: make(b"h2")?,
            timeout,
            h1_idle: Mutex::new(HashMap::new()),
            h2: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `req` (absolute URI) over HTTP/2 if `h2`, else HTTP/1.1, and reads the response.
    pub async fn send(&self, req: Request<Full<Bytes>>, h2: bool) -> Result<Response, String> {
        match tokio::time::timeout(self.timeout, self.send_inner(req, h2)).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {} ms", self.timeout.as_millis())),
        }
    }

    async fn send_inner(
        &self,
        mut req: Request<Full<Bytes>>,
        h2: bool,
    ) -> Result<Response, String> {
        let uri = req.uri().clone();
        let (tls, host, port) = target(&uri)?;
        let key = format!("{}://{host}:{port}", if tls { "https" } else { "http" });
        if h2 {
            let mut sender = self.h2_sender(&key, tls, &host, port).await?;
            let res = sender.send_request(req).await;
            let res = match res {
                Ok(r) => r,
                Err(e) => {
                    self.h2.lock().expect("h2 pool").remove(&key);
                    return Err(format!("HTTP/2 request: {e}"));
                }
            };
            return read(res).await;
        }
        // HTTP/1.1: origin-form target and an explicit Host.
        let host_header = match uri.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        req.headers_mut().insert(
            hyper::header::HOST,
            host_header.parse().map_err(|_| "bad host".to_owned())?,
        );
        *req.uri_mut() = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .parse()
            .map_err(|_| "bad path".to_owned())?;
        let mut sender = loop {
            let idle = self
                .h1_idle
                .lock()
                .expect("h1 pool")
                .get_mut(&key)
                .and_then(Vec::pop);
            match idle {
                Some(mut s) => {
                    if !s.is_closed() && s.ready().await.is_ok() {
                        break s;
                    }
                }
                None => break self.h1_connect(tls, &host, port).await?,
            }
        };
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| format!("HTTP/1.1 request: {e}"))?;
        let out = read(res).await;
        if out.is_ok() && !sender.is_closed() {
            let mut pool = self.h1_idle.lock().expect("h1 pool");
            let idle = pool.entry(key).or_default();
            if idle.len() < H1_IDLE_PER_HOST_MAX {
                idle.push(sender);
            }
        }
        out
    }

    async fn h1_connect(&self, tls: bool, host: &str, port: u16) -> Result<H1, String> {
        async fn hs<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
            io: T,
        ) -> Result<H1, String> {
            let (sender, conn) = http1::handshake(TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP/1.1 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
        let tcp = connect(host, port).await?;
        if tls {
            hs(self.tls(&self.tls_h1, tcp, host).await?).await
        } else {
            hs(tcp).await
        }
    }

    async fn h2_sender(&self, key: &str, tls: bool, host: &str, port: u16) -> Result<H2, String> {
        let cached = self.h2.lock().expect("h2 pool").get(key).cloned();
        if let Some(mut s) = cached {
            if !s.is_closed() && s.ready().await.is_ok() {
                return Ok(s);
            }
            self.h2.lock().expect("h2 pool").remove(key);
        }
        async fn hs<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
            io: T,
        ) -> Result<H2, String> {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(sender)
        }
        let tcp = connect(host, port).await?;
        let mut sender = if tls {
            hs(self.tls(&self.tls_h2, tcp, host).await?).await?
        } else {
            hs(tcp).await?
        };
        sender
            .ready()
            .await
            .map_err(|e| format!("HTTP/2 connection: {e}"))?;
        self.h2
            .lock()
            .expect("h2 pool")
            .insert(key.to_owned(), sender.clone());
        Ok(sender)
    }

    async fn tls(
        &self,
        connector: &TlsConnector,
        tcp: TcpStream,
        host: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|e| format!("server name {host}: {e}"))?;
        connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS with {host}: {e}"))
    }
}

fn target(uri: &Uri) -> Result<(bool, String, u16), String> {
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{uri}: scheme must be http or https")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("{uri}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok((tls, host, port))
}

async fn connect(host: &str, port: u16) -> Result<TcpStream, String> {
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

async fn read(res: hyper::Response<hyper::body::Incoming>) -> Result<Response, String> {
    let (parts, body) = res.into_parts();
    let body = http_body_util::Limited::new(body, RESPONSE_BODY_BYTES_MAX)
        .collect()
        .await
        .map_err(|e| format!("response body: {e}"))?
        .to_bytes();
    Ok(Response {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Builds a request with a JSON (or other) body.
pub fn request(
    method: hyper::Method,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> Result<Request<Full<Bytes>>, String> {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("request to {url}: {e}"))
}
