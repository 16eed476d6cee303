//! Where the dataplane lives between daemons: a bpffs directory per director interface holding
//! the XDP link and every map, so packets keep flowing while no daemon runs and the next
//! `xdpvs run` adopts them.
//!
//! The directory defaults to `/sys/fs/bpf/xdpvs/<interface>`, or
//! `/sys/fs/bpf/xdpvs/<netns>/<interface>` inside a network namespace: bpffs belongs to the
//! mount namespace, not the network namespace, so two directors in two namespaces that both
//! have an `eth0` would otherwise share one directory. One daemon per directory, enforced
//! with a lock file under `/run/xdpvs/lock/`.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

/// Where bpffs is normally mounted.
pub const BPFFS: &str = "/sys/fs/bpf";
/// The pinned XDP link, beside the maps.
pub const LINK: &str = "link";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const LOCK_DIR: &str = "/run/xdpvs/lock";

/// The default pin directory of a director interface, in this process's network namespace.
pub fn default_dir(interface: &str) -> PathBuf {
    let base = Path::new(BPFFS).join("xdpvs");
    match netns_name() {
        None => base.join(interface),
        Some(ns) => base.join(ns).join(interface),
    }
}

/// `None` in the host's network namespace; otherwise its name under `/run/netns` (as
/// `ip netns` names it), or `netns-<inode>` for an unnamed one. Named namespaces are looked up
/// first: `/proc/1/ns/net` is not readable everywhere (containers, sandboxes), and where it is
/// not, an unnamed namespace is taken for the host's.
fn netns_name() -> Option<String> {
    let own = fs::metadata("/proc/self/ns/net").ok()?;
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            if let Ok(m) = fs::metadata(e.path()) {
                if (m.dev(), m.ino()) == (own.dev(), own.ino()) {
                    return Some(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    let init = fs::metadata("/proc/1/ns/net").ok()?;
    if (own.dev(), own.ino()) == (init.dev(), init.ino()) {
        return None;
    }
    Some(format!("netns-{}", own.ino()))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes only into the struct we pass.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Makes sure `dir` exists on bpffs (mounting bpffs at /sys/fs/bpf if nothing is mounted there).
/// Returns a warning to log when the pins cannot outlive this process.
pub fn prepare_dir(dir: &Path) -> Result<Option<String>> {
    let mut warning = None;
    if dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        let opts = c"mode=0700";
        // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                src.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            bail!(
                "no bpf filesystem at {BPFFS} and mounting one failed: {} \
                 (mount it with `mount -t bpf bpf {BPFFS}`)",
                io::Error::last_os_error()
            );
        }
        warning = Some(format!(
            "mounted a bpf filesystem at {BPFFS}, which had none. If this process runs in a \
             private mount namespace (`ip netns exec` makes one), the pins vanish with it and a \
             restart loses the open connections: start xdpvs with `nsenter --net=/run/netns/NAME` \
             instead, or mount bpffs on the host"
        ));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the pin directory {}", dir.display()))?;
    if !is_bpffs(dir) {
        bail!(
            "pin path {} is not on a bpf filesystem (mount one with `mount -t bpf bpf DIR`, or \
             leave [director] pin_path unset)",
            dir.display()
        );
    }
    Ok(warning)
}

/// Whether `dir` holds any pin.
pub fn has_pins(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// Removes every pin in `dir` and the directory itself (and its parent under
/// `/sys/fs/bpf/xdpvs` when that is left empty). Removing the link's pin detaches the program
/// once no process holds the link open.
pub fn remove_all(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    // The link first: traffic then stops going through maps about to disappear.
    let link = dir.join(LINK);
    if link.exists() {
        fs::remove_file(&link).with_context(|| format!("unpinning {}", link.display()))?;
    }
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        fs::remove_file(&p).with_context(|| format!("unpinning {}", p.display()))?;
    }
    fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))?;
    let base = Path::new(BPFFS).join("xdpvs");
    let mut parent = dir.parent();
    while let Some(p) = parent {
        if !p.starts_with(&base) || fs::remove_dir(p).is_err() {
            break;
        }
        parent = p.parent();
    }
    Ok(())
}

/// Held while a daemon owns a pin directory; the kernel drops the lock when the process dies,
/// however it dies.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

fn lock_path(dir: &Path) -> PathBuf {
    let name: String = dir
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    Path::new(LOCK_DIR).join(format!("{name}.lock"))
}

/// Takes the lock of pin directory `dir` for this process, or says who holds it.
pub fn lock(dir: &Path, who: &str) -> Result<Lock> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(LOCK_DIR)
        .with_context(|| format!("creating {LOCK_DIR}"))?;
    let path = lock_path(dir);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        bail!(
            "another xdpvs is running on this dataplane ({}; pin path {}): stop it first",
            holder.trim(),
            dir.display()
        );
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "pid {}, {who}", std::process::id())?;
    Ok(Lock { _file: file })
}

/// The running holder of `dir`'s lock (its pid line), if any.
pub fn holder(dir: &Path) -> Option<String> {
    let path = lock_path(dir);
    let mut file = File::open(&path).ok()?;
    // SAFETY: flock on a descriptor we own; a lock we get is released when `file` closes.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        return None;
    }
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    Some(s.trim().to_string())
}

/// What the kernel says about a pinned XDP link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    /// 0 once the interface it was attached to is gone.
    pub ifindex: u32,
    pub prog_id: u32,
}

/// Reads a pinned link's interface and program from the kernel (`/proc/self/fdinfo`).
pub fn link_info(path: &Path) -> Result<LinkInfo> {
    let fd =
        obj_get(path).with_context(|| format!("opening the pinned link {}", path.display()))?;
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let field = |name: &str| -> Option<u32> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    Ok(LinkInfo {
        ifindex: field("ifindex:").unwrap_or(0),
        prog_id: field("prog_id:")
            .ok_or_else(|| anyhow!("{} is not a bpf link", path.display()))?,
    })
}

/// BPF_OBJ_GET: a descriptor for a pinned object (aya keeps the one it opens private).
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: the attr struct and the path it points at live across the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_are_one_file_per_directory() {
        assert_eq!(
            lock_path(Path::new("/sys/fs/bpf/xdpvs/labdir/d0")),
            Path::new("/run/xdpvs/lock/sys_fs_bpf_xdpvs_labdir_d0.lock")
        );
        assert_ne!(
            lock_path(Path::new("/sys/fs/bpf/xdpvs/a/eth0")),
            lock_path(Path::new("/sys/fs/bpf/xdpvs/b/eth0"))
        );
    }

    #[test]
    fn default_dir_is_under_bpffs_and_ends_with_the_interface() {
        let d = default_dir("eth0");
        assert!(d.starts_with("/sys/fs/bpf/xdpvs"), "{}", d.display());
        assert_eq!(d.file_name().and_then(|n| n.to_str()), Some("eth0"));
    }
}
