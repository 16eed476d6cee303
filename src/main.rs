//! The `xdpvs` command: the daemon (`run`), config validation (`check`), and the admin client
//! (`list`, `weight`, `drain`, `enable`, `reload`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use xdpvs::admin::{self, Request};
use xdpvs::config::{Config, DEFAULT_ADMIN_SOCKET};
use xdpvs::offline;

#[derive(Parser)]
#[command(
    name = "xdpvs",
    version,
    about = "Layer-4 load-balancing director with an XDP dataplane (an LVS/ldirectord replacement)",
    after_help = "Runtime changes (weight, drain, enable) last until the next reload or restart; \
                  to make them permanent, edit the config file and reload."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct SocketArg {
    /// Admin socket of the running daemon.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    socket: Option<PathBuf>,
    /// Read the admin socket path from this config file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// `xdpvs import FROM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ImportFrom {
    /// ldirectord.cf (ldirectord(8))
    Ldirectord,
    /// keepalived.conf (keepalived.conf(5)): virtual_server and vrrp_instance blocks
    Keepalived,
}

/// `xdpvs run --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the director in the foreground (SIGHUP reloads; SIGINT/SIGTERM detach and exit).
    ///
    /// A dataplane pinned by an earlier daemon on the same interface is adopted: its
    /// connections, counters and ids carry on. At stop the dataplane stays pinned and
    /// forwarding (`on_exit = "detach"` or `xdpvs detach` remove it).
    Run {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Discard a pinned dataplane instead of adopting it: starts with an empty connection
        /// table, so every open connection through the director is lost.
        #[arg(long)]
        fresh: bool,
        /// Log lines as text (for a terminal, journald) or as one JSON object per line (for log
        /// shippers: timestamp, level, target, message and the event's fields at top level).
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Validate a config file and exit (0 = valid).
    Check {
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
    },
    /// Translate an existing LVS configuration to xdpvs TOML (printed on stdout). Whatever
    /// cannot be translated is listed on stderr with its file and line; the output passes
    /// `xdpvs check`.
    Import {
        #[arg(value_enum)]
        from: ImportFrom,
        file: PathBuf,
    },
    /// Show the live table, like `ipvsadm -Ln`. With no daemon running, it is read from the
    /// pinned dataplane (marked as such).
    List {
        #[command(flatten)]
        socket: SocketArg,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Pinned dataplane to read when no daemon answers (default: from --config, or the
        /// only one under /sys/fs/bpf/xdpvs).
        #[arg(long, value_name = "DIR")]
        pin_path: Option<PathBuf>,
        /// Also list the persistence templates (client -> real, time left), like `ipvsadm -Lnc`.
        #[arg(long)]
        persistence: bool,
    },
    /// Take the director out of service: detach the XDP program and remove its pins (refused
    /// while a daemon runs on it). Every open connection through the director is lost.
    Detach {
        /// The config whose dataplane to detach.
        #[arg(long, short, value_name = "FILE", required_unless_present = "pin_path")]
        config: Option<PathBuf>,
        /// The pinned dataplane's directory instead.
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        pin_path: Option<PathBuf>,
    },
    /// Set a real's weight at runtime (until the next reload or restart).
    Weight {
        service: String,
        /// The real's address (ip:port, or ip for the service's port).
        real: String,
        weight: u32,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Stop new connections to a real; open ones continue (until `enable`, reload or restart).
    Drain {
        service: String,
        real: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Undo `weight`/`drain`: the real goes back to its configured weight.
    Enable {
        service: String,
        real: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Ask the daemon to reload its config file (like SIGHUP), and report the result.
    Reload {
        #[command(flatten)]
        socket: SocketArg,
    },
}

fn socket_path(s: &SocketArg) -> anyhow::Result<PathBuf> {
    if let Some(p) = &s.socket {
        return Ok(p.clone());
    }
    if let Some(c) = &s.config {
        let cfg = Config::load(c).map_err(|e| anyhow::anyhow!("{e}"))?;
        return Ok(cfg.director.admin_socket);
    }
    Ok(PathBuf::from(DEFAULT_ADMIN_SOCKET))
}

fn call(socket: &SocketArg, req: Request) -> anyhow::Result<admin::Response> {
    let path = socket_path(socket)?;
    let resp = admin::call(&path, &req)?;
    if !resp.ok {
        anyhow::bail!("{}", resp.error.unwrap_or_else(|| "failed".into()));
    }
    Ok(resp)
}

/// The daemon's table, or the pinned dataplane's when no daemon listens on the socket.
fn list_status(socket: &SocketArg, pin_path: Option<PathBuf>) -> anyhow::Result<admin::Status> {
    let path = socket_path(socket)?;
    match admin::call(&path, &Request::List) {
        Ok(r) if r.ok => r
            .status
            .ok_or_else(|| anyhow::anyhow!("the daemon sent no status")),
        Ok(r) => anyhow::bail!("{}", r.error.unwrap_or_else(|| "failed".into())),
        Err(daemon_err) => {
            let cfg = match &socket.config {
                Some(c) => Some(Config::load(c).map_err(|e| anyhow::anyhow!("{e}"))?),
                None => None,
            };
            let dir = match (pin_path, &cfg) {
                (Some(p), _) => p,
                (None, Some(c)) => offline::pin_dir_of(c),
                (None, None) => offline::only_pin_dir().map_err(|e| {
                    anyhow::anyhow!("{daemon_err:#}; and no pinned dataplane to read: {e:#}")
                })?,
            };
            if !dir.exists() {
                return Err(daemon_err.context(format!(
                    "no daemon answered and nothing is pinned at {}",
                    dir.display()
                )));
            }
            offline::status(&dir, cfg.as_ref())
        }
    }
}

fn detach(config: Option<PathBuf>, pin_path: Option<PathBuf>) -> anyhow::Result<()> {
    let dir = match (pin_path, config) {
        (Some(p), _) => p,
        (None, Some(c)) => {
            let cfg = Config::load(&c).map_err(|e| anyhow::anyhow!("{e}"))?;
            offline::pin_dir_of(&cfg)
        }
        (None, None) => anyhow::bail!("name the dataplane with --config or --pin-path"),
    };
    println!("{}", offline::detach(&dir)?);
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let reals: usize = cfg.services.iter().map(|s| s.reals.len()).sum();
    println!(
        "{}: OK ({} services, {} real servers)",
        path.display(),
        cfg.services.len(),
        reals
    );
    Ok(())
}

fn import(from: ImportFrom, file: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    let name = file.display().to_string();
    let out = match from {
        ImportFrom::Ldirectord => xdpvs::import::ldirectord::translate(&text, &name),
        ImportFrom::Keepalived => xdpvs::import::keepalived::translate(&text, &name),
    };
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    out.validate().map_err(|e| {
        anyhow::anyhow!("the translation does not pass `xdpvs check` (a bug of the importer): {e}")
    })?;
    print!("{}", out.toml);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run {
            config,
            fresh,
            log_format,
        } => {
            use std::io::IsTerminal;
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            match log_format {
                LogFormat::Text => tracing_subscriber::fmt()
                    .with_ansi(std::io::stdout().is_terminal())
                    .with_env_filter(filter)
                    .init(),
                LogFormat::Json => tracing_subscriber::fmt()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_env_filter(filter)
                    .init(),
            }
            match tokio::runtime::Runtime::new() {
                Ok(rt) => rt.block_on(xdpvs::daemon::run(
                    &config,
                    xdpvs::daemon::RunOptions { fresh },
                )),
                Err(e) => Err(e.into()),
            }
        }
        Cmd::Check { config } => check(&config),
        Cmd::Import { from, file } => import(from, &file),
        Cmd::List {
            socket,
            json,
            pin_path,
            persistence,
        } => list_status(&socket, pin_path).and_then(|status| {
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", admin::render(&status));
                if persistence {
                    print!("{}", admin::render_templates(&status));
                }
            }
            Ok(())
        }),
        Cmd::Weight {
            service,
            real,
            weight,
            socket,
        } => call(
            &socket,
            Request::Weight {
                service,
                real,
                weight,
            },
        )
        .map(print_message),
        Cmd::Drain {
            service,
            real,
            socket,
        } => call(&socket, Request::Drain { service, real }).map(print_message),
        Cmd::Enable {
            service,
            real,
            socket,
        } => call(&socket, Request::Enable { service, real }).map(print_message),
        Cmd::Reload { socket } => call(&socket, Request::Reload).map(print_message),
        Cmd::Detach { config, pin_path } => detach(config, pin_path),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xdpvs: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn print_message(r: admin::Response) {
    if let Some(m) = r.message {
        println!("{m}");
    }
}
