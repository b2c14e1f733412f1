//! Start-up: validate the config, prepare the data directory, build the core-to-core mesh, and
//! start one pinned glommio executor per core, each with its listener (SO_REUSEPORT), its shards
//! and their committers, and its mesh tasks.

use crate::config::Config;
use crate::core::Core;
use crate::metrics::CoreMetrics;
use crate::msg::CoreMsg;
use crate::shard::Shard;
use crate::token::TokenKey;
use crate::{conn, mesh};
use glommio::{LocalExecutorBuilder, Placement};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const META_FILE: &str = "switchboard.meta";
const SECRET_FILE: &str = "token.secret";

/// Reads the token secret from the config, else from `<data_dir>/token.secret` (created with 32
/// random bytes, mode 0600, on first use).
pub fn token_secret(cfg: &Config) -> Result<Vec<u8>, String> {
    if !cfg.token_secret.is_empty() {
        return Ok(cfg.token_secret.as_bytes().to_vec());
    }
    let path = cfg.data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let s = s.trim();
            if s.len() < 64 {
                return Err(format!(
                    "{}: secret shorter than 64 hex characters",
                    path.display()
                ));
            }
            Ok(s.as_bytes().to_vec())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(&cfg.data_dir)
                .map_err(|e| format!("create {}: {e}", cfg.data_dir.display()))?;
            let mut bytes = [0u8; 32];
            let mut f =
                std::fs::File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
            std::io::Read::read_exact(&mut f, &mut bytes)
                .map_err(|e| format!("/dev/urandom: {e}"))?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            use std::os::unix::fs::OpenOptionsExt;
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("create {}: {e}", path.display()))?;
            std::io::Write::write_all(&mut out, format!("{hex}\n").as_bytes())
                .map_err(|e| format!("write {}: {e}", path.display()))?;
            out.sync_all()
                .map_err(|e| format!("sync {}: {e}", path.display()))?;
            Ok(hex.into_bytes())
        }
        Err(e) => Err(format!("read {}: {e}", path.display())),
    }
}

/// The shard count is fixed when a data directory is created (= the core count then) and stored
/// in `switchboard.meta`; later starts with another core count spread the same shards over their
/// cores (`shard % cores`).
fn shard_count(data_dir: &Path, cores: usize) -> Result<u32, String> {
    let path = data_dir.join(META_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("shards="))
            .and_then(|v| v.trim().parse::<u32>().ok())
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{}: no valid shards= line", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let tmp = data_dir.join(format!("{META_FILE}.tmp"));
            std::fs::write(&tmp, format!("format=1\nshards={cores}\n"))
                .map_err(|e| format!("write {}: {e}", tmp.display()))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("sync {}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, &path).map_err(|e| format!("rename {}: {e}", path.display()))?;
            std::fs::File::open(data_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("sync {}: {e}", data_dir.display()))?;
            Ok(cores as u32)
        }
        Err(e) => Err(format!("read {}: {e}", path.display())),
    }
}

fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(sock)
}

/// Runs the server until the process is killed. Prints `switchboard listening on ADDR` on stdout
/// once every core accepts connections.
pub fn run(mut cfg: Config) -> Result<(), String> {
    cfg.validate().map_err(|e| e.to_string())?;
    // glommio opens directories relative to nothing: give the store an absolute path.
    cfg.data_dir = std::path::absolute(&cfg.data_dir)
        .map_err(|e| format!("data_dir {}: {e}", cfg.data_dir.display()))?;
    let cores = cfg.effective_cores();
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|e| format!("create {}: {e}", cfg.data_dir.display()))?;
    let key = TokenKey::new(&token_secret(&cfg)?);
    // Media directories, and uploads a previous process left half-written: once, before any
    // core serves.
    let media = crate::media_svc::media_dir(&cfg);
    switchboard_media::LocalStore::prepare(&media)
        .map_err(|e| format!("media directory {}: {e}", media.display()))?;
    let shards_total = shard_count(&cfg.data_dir, cores)?;
    // TLS material is read here, on the main thread, before any reactor runs.
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => Some(
            switchboard_api::tls::server_config_from_files(cert, key).map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    // Bind the first listener here so port 0 resolves once and every core shares that port.
    let first = bind(cfg.listen, cfg.listen_backlog)
        .map_err(|e| format!("listen on {}: {e}", cfg.listen))?;
    let addr = first
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or("listener has no address")?;
    let mut first = Some(first);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let pin = cfg.pin_cores && cores <= cpus;
    let metrics: Arc<Vec<CoreMetrics>> =
        Arc::new((0..cores).map(|_| CoreMetrics::new(cores)).collect());
    let pressure = Arc::new(crate::shard::ShardPressure::new(shards_total));
    let cfg = Arc::new(cfg);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    // SIGINT/SIGTERM are blocked in every thread (the executors inherit the mask) and taken
    // synchronously by this thread with sigwait, which then asks every core to stop.
    let signals = shutdown_signals();
    // SAFETY: the set is initialised by shutdown_signals; blocking signals has no other effect.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    // The push thread starts after the signal mask so it never takes SIGINT/SIGTERM.
    let (push, _push_thread) =
        switchboard_push::PushService::start(cfg.push.clone(), &cfg.data_dir)
            .map_err(|e| format!("push: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(cores);
    for (id, ends) in mesh::build(cores, cfg.mesh_channel_batches_max)
        .into_iter()
        .enumerate()
    {
        let placement = if pin {
            Placement::Fixed(id)
        } else {
            Placement::Unbound
        };
        let (cfg, key, metrics, ready) =
            (cfg.clone(), key.clone(), metrics.clone(), ready_tx.clone());
        let pressure = pressure.clone();
        let tls = tls.clone();
        let (stop, push) = (stop.clone(), push.clone());
        let listener = match first.take() {
            Some(l) => l,
            None => bind(addr, cfg.listen_backlog).map_err(|e| format!("listen on {addr}: {e}"))?,
        };
        let mut builder = LocalExecutorBuilder::new(placement)
            .name(&format!("sb-core-{id}"))
            .ring_depth(cfg.io_ring_entries);
        if cfg.spin_before_park_us > 0 {
            builder = builder.spin_before_park(Duration::from_micros(cfg.spin_before_park_us));
        }
        let handle = builder
            .spawn(move || async move {
                let cfg = Rc::new((*cfg).clone());
                let mut shards = HashMap::new();
                for s in (0..shards_total).filter(|s| *s as usize % cores == id) {
                    match Shard::open(&cfg.data_dir, s, shards_total, &cfg, pressure.clone()).await
                    {
                        Ok(shard) => {
                            shards.insert(s, Rc::new(shard));
                        }
                        Err(e) => {
                            let _ = ready.send(Err(format!("core {id}: opening shard {s}: {e}")));
                            return;
                        }
                    }
                }
                let mut core =
                    Core::new(id, cores, shards_total, cfg, key, metrics, shards, pressure);
                core.tls = tls;
                let _ = core.push.set(push);
                let core = Rc::new(core);
                {
                    // Coalesced presence updates go out on a ticker.
                    let c = core.clone();
                    glommio::spawn_local(async move {
                        loop {
                            glommio::timer::sleep(Duration::from_millis(250)).await;
                            c.flush_presence();
                        }
                    })
                    .detach();
                }
                {
                    // The reactor lag probe: how late a timer runs is how long anything that
                    // became ready on this core waited for its task to run.
                    let c = core.clone();
                    glommio::spawn_local(async move {
                        let every = crate::metrics::REACTOR_LAG_PROBE_INTERVAL;
                        loop {
                            let due = std::time::Instant::now() + every;
                            glommio::timer::sleep(every).await;
                            let late = std::time::Instant::now().saturating_duration_since(due);
                            c.metrics().reactor_lag_us.observe(
                                &crate::metrics::REACTOR_LAG_BUCKETS_US,
                                late.as_micros() as u64,
                            );
                        }
                    })
                    .detach();
                }
                {
                    // Ping and idle deadlines of every chat connection, checked in one sweep
                    // instead of a timer per connection.
                    let c = core.clone();
                    let every = conn::sweep_interval(&c.cfg);
                    glommio::spawn_local(async move {
                        loop {
                            glommio::timer::sleep(every).await;
                            conn::sweep_conns(&c, std::time::Instant::now());
                        }
                    })
                    .detach();
                }
                for shard in core.shards.values() {
                    glommio::spawn_local(shard.clone().run_committer(core.clone())).detach();
                    glommio::spawn_local(shard.clone().run_pressure_announcer(core.clone()))
                        .detach();
                }
                {
                    // Share the blocks recovered from this core's shards with every core.
                    let blocks: Vec<_> = core
                        .shards
                        .values()
                        .flat_map(|s| s.owner.borrow().state.blocks().collect::<Vec<_>>())
                        .collect();
                    let c = core.clone();
                    glommio::spawn_local(async move {
                        for (blocker, blocked) in blocks {
                            c.broadcast(|| CoreMsg::BlockState {
                                blocker,
                                blocked,
                                on: true,
                            })
                            .await;
                        }
                    })
                    .detach();
                }
                for (dest, tx) in ends.senders.into_iter().enumerate() {
                    if let Some(tx) = tx {
                        let c = core.clone();
                        glommio::spawn_local(async move { c.mesh.run_flusher(dest, tx).await })
                            .detach();
                    }
                }
                for rx in ends.receivers.into_iter().flatten() {
                    let c = core.clone();
                    glommio::spawn_local(mesh::run_receiver(rx, move |m| c.handle(m))).detach();
                }
                {
                    // Every core learns the revocations recovered from this core's shards, then
                    // a marker; a core accepts only after all markers (below), so no revoked
                    // token is accepted after a restart. Per-pair FIFO keeps the marker last.
                    let revs: Vec<_> = core
                        .shards
                        .values()
                        .flat_map(|s| {
                            s.accounts
                                .borrow()
                                .revocations
                                .iter()
                                .map(|(k, v)| (*k, *v))
                                .collect::<Vec<_>>()
                        })
                        .collect();
                    let c = core.clone();
                    glommio::spawn_local(async move {
                        for ((user, device), through_s) in revs {
                            c.broadcast(|| CoreMsg::Revoked {
                                user,
                                device,
                                through_s,
                                removed: false,
                            })
                            .await;
                        }
                        c.broadcast(|| CoreMsg::RevocationsLoaded).await;
                    })
                    .detach();
                }
                while core.revocations_loaded.get() < cores {
                    core.revocations_ready.notified().await;
                }
                // SAFETY: `into_raw_fd` hands us sole ownership of a valid listening socket.
                let listener =
                    unsafe { glommio::net::TcpListener::from_raw_fd(listener.into_raw_fd()) };
                let _ = ready.send(Ok(()));
                let accept_loop = async {
                    loop {
                        match listener.accept().await {
                            Ok(stream) => {
                                glommio::spawn_local(conn::serve(core.clone(), stream)).detach();
                            }
                            Err(e) => {
                                // EMFILE/ENFILE under a connection storm: back off instead of spinning.
                                eprintln!("core {id}: accept failed: {e}");
                                glommio::timer::sleep(Duration::from_millis(10)).await;
                            }
                        }
                    }
                };
                let stop_watch = async {
                    while !stop.load(Ordering::Relaxed) {
                        glommio::timer::sleep(SHUTDOWN_POLL).await;
                    }
                };
                futures_lite::future::or(accept_loop, stop_watch).await;
                // Shutting down: stop accepting (the listener drops with this future), tell every
                // client to go away, and give them a moment to receive the close frame. Staged
                // but uncommitted sends were never acknowledged, so dropping them loses nothing.
                drop(listener);
                let conns: Vec<_> = core.conns.borrow().values().cloned().collect();
                for c in conns {
                    c.close(&(crate::ws::close::GOING_AWAY, "server shutting down"));
                }
                let deadline = std::time::Instant::now() + SHUTDOWN_DRAIN;
                while !core.conns.borrow().is_empty() && std::time::Instant::now() < deadline {
                    glommio::timer::sleep(SHUTDOWN_POLL).await;
                }
            })
            .map_err(|e| format!("start core {id}: {e}"))?;
        handles.push(handle);
    }
    drop(ready_tx);
    for _ in 0..cores {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err("a core exited during start-up".into()),
        }
    }
    println!("switchboard listening on {addr} (cores={cores}, shards={shards_total}, pinned={pin}, data_dir={})", cfg.data_dir.display());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let mut sig: libc::c_int = 0;
    // SAFETY: `signals` is a valid, initialised set and `sig` a valid out-pointer.
    unsafe { libc::sigwait(&signals, &mut sig) };
    eprintln!("switchboard: signal {sig}: closing connections and stopping");
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

/// How often cores check the stop flag, and how long they wait for clients to take their close.
const SHUTDOWN_POLL: Duration = Duration::from_millis(50);
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);

fn shutdown_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill the zeroed set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}
