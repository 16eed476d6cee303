//! The command line of `xdpvs`: the clap definitions, here in the library rather than in
//! `main.rs` so that the manual pages are generated from the same definitions the binary parses
//! (`xdpvs man DIR`, run by `scripts/deb.sh`; `clap_mangen`), and never drift from `--help`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser, Subcommand};
use clap_mangen::roff::{bold, roman, Roff};

#[derive(Parser)]
#[command(
    name = "xdpvs",
    version,
    about = "Layer-4 load-balancing director with an XDP dataplane (an LVS/ldirectord replacement)",
    after_help = "Runtime changes (weight, drain, enable) last until the next reload or restart; \
                  to make them permanent, edit the config file and reload."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Args)]
pub struct SocketArg {
    /// Admin socket of the running daemon.
    #[arg(long, value_name = "PATH", conflicts_with = "config")]
    pub socket: Option<PathBuf>,
    /// Read the admin socket path from this config file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// `xdpvs import FROM`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ImportFrom {
    /// ldirectord.cf (ldirectord(8))
    Ldirectord,
    /// keepalived.conf (keepalived.conf(5)): virtual_server and vrrp_instance blocks
    Keepalived,
}

/// `xdpvs run --log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the director in the foreground (SIGHUP reloads; SIGINT/SIGTERM detach and exit).
    ///
    /// A dataplane pinned by an earlier daemon on the same interface is adopted: its
    /// connections, counters and ids carry on. At stop the dataplane stays pinned and
    /// forwarding (`on_exit = "detach"` or `xdpvs detach` remove it).
    Run {
        /// The configuration file (TOML; the package's is /etc/xdpvs/xdpvs.toml).
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
        /// The configuration file to validate.
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
    /// Write the manual pages (xdpvs.8 and one per subcommand, xdpvs-run.8, ...) into DIR;
    /// the Debian package is built with them (scripts/deb.sh).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// Section 8: system administration commands and daemons.
const MAN_SECTION: &str = "8";

/// The manual pages: `xdpvs.8` for the command, with FILES, SIGNALS, ENVIRONMENT and SEE ALSO
/// sections the clap definitions cannot hold, and `xdpvs-SUB.8` for each visible subcommand.
/// (file name, roff source) pairs.
pub fn man_pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = Vec::new();
    let main = clap_mangen::Man::new(cmd.clone()).section(MAN_SECTION);
    let mut text = Vec::new();
    main.render(&mut text)?;
    let subs: Vec<String> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .map(|s| format!("xdpvs-{}", s.get_name()))
        .collect();
    text.write_all(extra_sections(&subs).as_bytes())?;
    pages.push((main.get_filename(), text));
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = clap_mangen::Man::new(sub.clone()).section(MAN_SECTION);
        let mut text = Vec::new();
        page.render(&mut text)?;
        pages.push((page.get_filename(), text));
    }
    Ok(pages)
}

fn extra_sections(subcommand_pages: &[String]) -> String {
    let mut r = Roff::new();
    r.control("SH", ["FILES"]);
    for (path, what) in [
        (
            "/etc/xdpvs/xdpvs.toml",
            "The configuration the packaged systemd unit runs with (every key: \
             /usr/share/doc/xdpvs/config.md).",
        ),
        (
            "/run/xdpvs/admin.sock",
            "The admin socket of the running daemon (list, weight, drain, enable, reload).",
        ),
        (
            "/sys/fs/bpf/xdpvs/",
            "The pinned dataplane (XDP link and maps), one directory per interface; it outlives \
             the daemon and the next run adopts it.",
        ),
    ] {
        r.control("TP", []);
        r.text([bold(path)]);
        r.text([roman(what)]);
    }
    r.control("SH", ["SIGNALS"]);
    for (sig, what) in [
        (
            "SIGHUP",
            "Reload the configuration file; a file with an error is rejected as a whole and the \
             running configuration keeps serving.",
        ),
        (
            "SIGTERM, SIGINT",
            "Stop; the dataplane stays pinned and forwarding unless on_exit = \"detach\".",
        ),
    ] {
        r.control("TP", []);
        r.text([bold(sig)]);
        r.text([roman(what)]);
    }
    r.control("SH", ["ENVIRONMENT"]);
    for (var, what) in [
        (
            "RUST_LOG",
            "Log filter (default info), e.g. RUST_LOG=xdpvs=debug.",
        ),
        (
            "NOTIFY_SOCKET",
            "Set by systemd for Type=notify: the daemon reports READY=1, RELOADING=1, \
             STOPPING=1 and a STATUS line there.",
        ),
    ] {
        r.control("TP", []);
        r.text([bold(var)]);
        r.text([roman(what)]);
    }
    r.control("SH", ["SEE ALSO"]);
    let mut refs: Vec<String> = subcommand_pages.iter().map(|p| format!("{p}(8)")).collect();
    refs.extend(["systemctl(1)", "journalctl(1)", "ipvsadm(8)"].map(String::from));
    r.text([roman(refs.join(", "))]);
    r.text([roman(
        "/usr/share/doc/xdpvs/README.md, operations.md, config.md, ha.md.",
    )]);
    r.to_roff()
}

/// Writes [`man_pages`] into `dir` (created if missing); the paths written.
pub fn write_man_pages(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, text) in man_pages()? {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn man_pages_cover_every_visible_subcommand() {
        let pages = man_pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        for sub in [
            "xdpvs.8",
            "xdpvs-run.8",
            "xdpvs-check.8",
            "xdpvs-list.8",
            "xdpvs-reload.8",
        ] {
            assert!(names.contains(&sub), "{sub} missing from {names:?}");
        }
        assert!(
            !names.iter().any(|n| n.contains("man")),
            "the hidden `man` has a page: {names:?}"
        );
        let main = String::from_utf8(pages[0].1.clone()).unwrap();
        assert!(
            main.starts_with(".ie"),
            "not roff: {}",
            &main[..40.min(main.len())]
        );
        for want in [
            ".TH xdpvs 8",
            "SIGHUP",
            "/etc/xdpvs/xdpvs.toml",
            "xdpvs\\-run(8)",
        ] {
            assert!(main.contains(want), "{want:?} not in xdpvs.8:\n{main}");
        }
    }
}
