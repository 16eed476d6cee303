//! Builds the XDP program (`ebpf/xdpvs-ebpf`) and leaves the object in `OUT_DIR/xdpvs.bpf.o`
//! for `include_bytes_aligned!`.
//!
//! The BPF target needs `-Z build-std=core`, which needs library sources: rustup here has no
//! `rust-src`, so the program is built with Debian's `rustc-web` and its `rust-web-src` (see
//! shared/TOOLCHAIN.md), whatever toolchain builds this crate. `scripts/setup.sh` installs them.
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn main() -> Result<()> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let ebpf = root.join("ebpf/xdpvs-ebpf");
    for p in [
        "ebpf/xdpvs-ebpf/src",
        "ebpf/xdpvs-ebpf/Cargo.toml",
        "ebpf/xdpvs-ebpf/Cargo.lock",
        "ebpf/xdpvs-common/src",
        "ebpf/xdpvs-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let target_dir = out.join("ebpf");
    build(&ebpf, &target_dir)?;
    let obj = target_dir.join("bpfel-unknown-none/release/xdpvs");
    std::fs::copy(&obj, out.join("xdpvs.bpf.o"))
        .with_context(|| format!("copying {}", obj.display()))?;
    Ok(())
}

fn build(ebpf: &Path, target_dir: &Path) -> Result<()> {
    let cargo = which("cargo", "/usr/bin/cargo")?;
    let rustc = which("rustc", "/usr/bin/rustc")?;
    let mut cmd = Command::new(cargo);
    cmd.current_dir(ebpf)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(target_dir);
    // The outer cargo's environment describes the host build; none of it applies here.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTUP_TOOLCHAIN"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    cmd.env("RUSTC", rustc).env("RUSTC_BOOTSTRAP", "1").env(
        "CARGO_ENCODED_RUSTFLAGS",
        [
            "-Cdebuginfo=2",
            "-Clink-arg=--btf",
            "-Ctarget-cpu=v3",
            // Global BPF functions, verified once each (see ebpf/xdpvs-ebpf/src/schedule.rs).
            "-Clink-arg=--export=xdpvs_pick",
        ]
        .join("\x1f"),
    );
    // bpf-linker lives in cargo's bin directory; make sure it is found.
    if let Some(home) = std::env::var_os("CARGO_HOME").or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo").into_os_string())
    }) {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = vec![PathBuf::from(home).join("bin")];
        dirs.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(dirs)?);
    }
    let status = cmd
        .status()
        .context("running Debian's cargo for the eBPF crate")?;
    if !status.success() {
        bail!(
            "building the XDP program failed ({status}); run scripts/setup.sh to install \
             rustc-web, rust-web-src, llvm-22-dev and bpf-linker"
        );
    }
    Ok(())
}

/// Debian's toolchain binary, by fixed path (rustup's shims come first on PATH).
fn which(name: &str, path: &str) -> Result<PathBuf> {
    let p = PathBuf::from(path);
    if p.exists() {
        Ok(p)
    } else {
        bail!("{name} not found at {path}: run scripts/setup.sh (installs Debian's rustc-web)")
    }
}
