//! A scripted local HTTP server for the sink tests: HTTP/1.1 or HTTP/2 (h2c prior knowledge
//! or TLS with ALPN h2), records every request, answers with a closure.

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub version: hyper::Version,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Req {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("json body")
    }
}

pub type Handler = dyn Fn(&Req, usize) -> (u16, Vec<(String, String)>, String) + Send + Sync;

pub struct Server {
    pub addr: SocketAddr,
    pub reqs: Arc<Mutex<Vec<Req>>>,
}

pub enum Proto {
    H1,
    H1Tls(Arc<rustls::ServerConfig>),
    H2c,
    H2Tls(Arc<rustls::ServerConfig>),
}

impl Server {
    /// Starts the server on its own thread (a current-thread tokio runtime); it lives until the
    /// test process ends.
    pub fn start(proto: Proto, handler: Arc<Handler>) -> Server {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let reqs: Arc<Mutex<Vec<Req>>> = Arc::default();
        let r = reqs.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let proto = Arc::new(proto);
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let (reqs, handler, proto) = (r.clone(), handler.clone(), proto.clone());
                    tokio::spawn(async move {
                        let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                            let (reqs, handler) = (reqs.clone(), handler.clone());
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body.collect().await.unwrap().to_bytes().to_vec();
                                let rec = Req {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path().to_owned(),
                                    version: parts.version,
                                    headers: parts.headers,
                                    body,
                                    at: Instant::now(),
                                };
                                let n = {
                                    let mut g = reqs.lock().unwrap();
                                    g.push(rec.clone());
                                    g.len()
                                };
                                let (status, headers, body) = handler(&rec, n);
                                let mut b = hyper::Response::builder().status(status);
                                for (k, v) in headers {
                                    b = b.header(k, v);
                                }
                                Ok::<_, std::convert::Infallible>(
                                    b.body(Full::new(Bytes::from(body))).unwrap(),
                                )
                            }
                        });
                        match &*proto {
                            Proto::H1 => {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(tcp), svc)
                                    .await;
                            }
                            Proto::H1Tls(cfg) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                                let Ok(tls) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(TokioIo::new(tls), svc)
                                    .await;
                            }
                            Proto::H2c => {
                                let _ =
                                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                        .serve_connection(TokioIo::new(tcp), svc)
                                        .await;
                            }
                            Proto::H2Tls(cfg) => {
                                let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                                let Ok(tls) = acceptor.accept(tcp).await else {
                                    return;
                                };
                                let _ =
                                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                        .serve_connection(TokioIo::new(tls), svc)
                                        .await;
                            }
                        }
                    });
                }
            });
        });
        Server { addr, reqs }
    }

    pub fn url(&self, scheme: &str, path: &str) -> String {
        format!("{scheme}://127.0.0.1:{}{path}", self.addr.port())
    }

    pub fn requests(&self) -> Vec<Req> {
        self.reqs.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived (or panics after 10 s).
    pub fn wait_for(&self, n: usize) -> Vec<Req> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "waited for {n} requests, got {}: {:?}",
                r.len(),
                r.iter().map(|r| &r.path).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Waits until `cond` holds (or panics after 10 s).
pub fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// A self-signed certificate for `localhost`/127.0.0.1: (server config with ALPN h2, CA PEM).
pub fn tls_h2() -> (Arc<rustls::ServerConfig>, String) {
    tls(b"h2")
}

/// The same for HTTP/1.1.
pub fn tls_h1() -> (Arc<rustls::ServerConfig>, String) {
    tls(b"http/1.1")
}

fn tls(alpn: &[u8]) -> (Arc<rustls::ServerConfig>, String) {
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert_pem = ck.cert.pem();
    let cert = ck.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(rustls_pki_types::PrivatePkcs8KeyDer::from(
        ck.key_pair.serialize_der(),
    ));
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    (Arc::new(cfg), cert_pem)
}
