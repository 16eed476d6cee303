//! The `xdpvs` command: the daemon (`run`), config validation (`check`), and the admin client
//! (`list`, `weight`, `drain`, `enable`, `reload`). The command line itself is defined in
//! [`xdpvs::cli`], where the manual pages are generated from it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use xdpvs::admin::{self, Request};
use xdpvs::cli::{Cli, Cmd, ImportFrom, LogFormat, SocketArg};
use xdpvs::config::{Config, DEFAULT_ADMIN_SOCKET};
use xdpvs::offline;

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
        Cmd::Man { dir } => xdpvs::cli::write_man_pages(&dir)
            .map(|written| {
                for p in written {
                    println!("{}", p.display());
                }
            })
            .map_err(|e| anyhow::anyhow!("writing manual pages into {}: {e}", dir.display())),
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
