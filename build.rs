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
    let mut bytes = std::fs::read(&obj).with_context(|| format!("reading {}", obj.display()))?;
    sanitize_btf(&mut bytes).context("sanitizing the XDP object's BTF")?;
    std::fs::write(out.join("xdpvs.bpf.o"), bytes).context("writing xdpvs.bpf.o")?;
    Ok(())
}

fn le<const N: usize>(b: &[u8], o: usize) -> Result<[u8; N]> {
    b.get(o..o + N)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| anyhow::anyhow!("truncated at offset {o}"))
}

/// Makes the object's BTF acceptable to the kernel. rustc describes a data-carrying enum
/// (e.g. `Parsed`) as a BTF union whose variant members sit at non-zero bit offsets, which
/// BPF_BTF_LOAD rejects ("Invalid member bits_offset"); aya then loads the programs without
/// BTF, and without BTF func_info the kernel refuses callbacks (`bpf_for_each_map_elem`,
/// `bpf_loop`) and verifies "global" functions inline. Zeroing those offsets changes only
/// debug descriptions of enum payloads, never a map or a function signature.
fn sanitize_btf(obj: &mut [u8]) -> Result<()> {
    let u16_at = |b: &[u8], o| -> Result<usize> { Ok(u16::from_le_bytes(le(b, o)?) as usize) };
    let u32_at = |b: &[u8], o| -> Result<usize> { Ok(u32::from_le_bytes(le(b, o)?) as usize) };
    let u64_at = |b: &[u8], o| -> Result<usize> { Ok(u64::from_le_bytes(le(b, o)?) as usize) };
    // ELF64 little endian: section headers, and the section-name string table.
    let (shoff, shentsize) = (u64_at(obj, 0x28)?, u16_at(obj, 0x3a)?);
    let (shnum, shstrndx) = (u16_at(obj, 0x3c)?, u16_at(obj, 0x3e)?);
    let sh = |i: usize| shoff + i * shentsize;
    let names = u64_at(obj, sh(shstrndx) + 24)?;
    let mut btf = None;
    for i in 0..shnum {
        let name = names + u32_at(obj, sh(i))?;
        if obj.get(name..name + 5) == Some(b".BTF\0") {
            btf = Some(u64_at(obj, sh(i) + 24)?);
        }
    }
    let Some(b) = btf else {
        bail!("no .BTF section (is -Clink-arg=--btf set?)");
    };
    let start = b + u32_at(obj, b + 4)? + u32_at(obj, b + 8)?;
    let end = start + u32_at(obj, b + 12)?;
    let mut p = start;
    while p < end {
        let info = u32_at(obj, p + 4)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, info & 0xffff);
        p += 12;
        p += match kind {
            1 | 14 | 17 => 4,         // INT, VAR, DECL_TAG
            3 => 12,                  // ARRAY
            4 | 15 | 19 => 12 * vlen, // STRUCT, DATASEC, ENUM64
            6 | 13 => 8 * vlen,       // ENUM, FUNC_PROTO
            5 => {
                // UNION: every member at offset 0.
                for m in 0..vlen {
                    let o = p + m * 12 + 8;
                    le::<4>(obj, o)?;
                    obj[o..o + 4].copy_from_slice(&[0; 4]);
                }
                12 * vlen
            }
            _ => 0,
        };
    }
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
            "-Clink-arg=--export=xdpvs_persist_usable",
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
