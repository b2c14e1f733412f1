//! The `switchboard` binary: `serve` runs the server, `token` mints a session token.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use switchboard::config::{Config, DEFAULT_LISTEN};
use switchboard::token::{parse_ttl, Claims, TokenKey};
use switchboard_wire::{DeviceId, UserId};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "switchboard",
    version,
    about = "A thread-per-core messaging server: durable 1:1 chat over binary WebSocket frames.",
    long_about = "A thread-per-core messaging server: durable 1:1 chat over binary WebSocket frames (FlatBuffers).\n\n\
With no arguments it serves on 127.0.0.1:7070 with the embedded store in ./data.\n\
Endpoints on the one port: GET /v1/ws (WebSocket, Authorization: Bearer <token> or ?token=), GET /metrics \
(Prometheus), GET /health, GET /v1/echo (only with --echo), and the HTTP API (api/README.md)."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(clap::Args, Default)]
struct Common {
    /// TOML config file; flags override it. `serve --print-config` shows every key and default.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Data directory of the embedded store (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the server (the default when no command is given).
    Serve {
        #[command(flatten)]
        common: Common,
        /// Listen address (default 127.0.0.1:7070). Port 0 picks a free port (printed on stdout).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Number of cores (reactors); 0 = all CPUs.
        #[arg(long)]
        cores: Option<usize>,
        /// Serve the unauthenticated echo endpoint GET /v1/echo (conformance testing only).
        #[arg(long)]
        echo: bool,
        /// PEM certificate chain: serve https/wss on the same port too (with --tls-key).
        #[arg(long)]
        tls_cert: Option<PathBuf>,
        /// PEM private key for --tls-cert.
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// Send login codes to this SMS webhook (`http://host:port/path`) instead of the log.
        #[arg(long)]
        sms_webhook: Option<String>,
        /// Secret signing the SMS webhook's requests (with --sms-webhook).
        #[arg(long)]
        sms_webhook_secret: Option<String>,
        /// Allow this browser Origin (repeatable; `*` for any): HTTP API and WebSocket upgrades.
        #[arg(long = "allow-origin")]
        allow_origin: Vec<String>,
        /// Print the effective configuration as TOML and exit.
        #[arg(long)]
        print_config: bool,
    },
    /// Mint a session token for a user's device (signed with the server's secret).
    Token {
        #[command(flatten)]
        common: Common,
        /// User id (non-zero).
        #[arg(long)]
        user: u64,
        /// Device id (non-zero).
        #[arg(long, default_value_t = 1)]
        device: u32,
        /// Lifetime: seconds, or with a unit: 90s, 15m, 12h, 30d.
        #[arg(long, default_value = "30d")]
        ttl: String,
    },
}

fn load(common: &Common) -> Result<Config, String> {
    let mut cfg = match &common.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(d) = &common.data_dir {
        cfg.data_dir = d.clone();
    }
    Ok(cfg)
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.cmd.unwrap_or(Cmd::Serve {
        common: Common::default(),
        listen: None,
        cores: None,
        echo: false,
        tls_cert: None,
        tls_key: None,
        sms_webhook: None,
        sms_webhook_secret: None,
        allow_origin: Vec::new(),
        print_config: false,
    }) {
        Cmd::Serve {
            common,
            listen,
            cores,
            echo,
            tls_cert,
            tls_key,
            sms_webhook,
            sms_webhook_secret,
            allow_origin,
            print_config,
        } => load(&common).and_then(|mut cfg| {
            if tls_cert.is_some() {
                cfg.tls_cert = tls_cert;
            }
            if tls_key.is_some() {
                cfg.tls_key = tls_key;
            }
            if let Some(url) = sms_webhook {
                cfg.sms = "webhook".into();
                cfg.sms_webhook_url = url;
            }
            if let Some(secret) = sms_webhook_secret {
                cfg.sms_webhook_secret = secret;
            }
            cfg.allowed_origins.extend(allow_origin);
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if let Some(c) = cores {
                cfg.cores = c;
            }
            cfg.echo_endpoint |= echo;
            cfg.validate().map_err(|e| e.to_string())?;
            if print_config {
                print!("{}", toml::to_string(&cfg).map_err(|e| e.to_string())?);
                return Ok(());
            }
            let _ = DEFAULT_LISTEN;
            switchboard::server::run(cfg)
        }),
        Cmd::Token {
            common,
            user,
            device,
            ttl,
        } => load(&common).and_then(|cfg| {
            if user == 0 || device == 0 {
                return Err("--user and --device must be non-zero".into());
            }
            let ttl = parse_ttl(&ttl)?;
            let key = TokenKey::new(&switchboard::server::token_secret(&cfg)?);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            println!(
                "{}",
                key.mint(Claims {
                    user: UserId(user),
                    device: DeviceId(device),
                    expires_unix_s: now + ttl
                })
            );
            Ok(())
        }),
    };
    if let Err(e) = result {
        eprintln!("switchboard: {e}");
        std::process::exit(2);
    }
}
