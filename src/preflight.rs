//! What the host must provide before the dataplane can forward, checked at start.
//!
//! The XDP program forwards by asking the kernel's FIB for each real's next hop, and the FIB
//! refuses while IP forwarding is off on the ingress interface (the default on a fresh host and
//! in a new network namespace): a daemon that started anyway would log `ready` and drop every
//! VIP packet. So these are refused at start with the fix in the message; what is only a risk
//! (the interface down) is a loud warning.

use anyhow::{bail, Result};
use tracing::warn;

use crate::config::Config;

/// Checks the host for `cfg`; an error says what to change.
pub fn check(cfg: &Config) -> Result<()> {
    let ifname = &cfg.director.interface;
    let flags = match interface_flags(ifname) {
        Some(f) => f,
        None => bail!(
            "interface {ifname} ([director] interface) does not exist in this network namespace"
        ),
    };
    if flags & libc::IFF_UP as u32 == 0 {
        warn!(
            interface = %ifname,
            "interface {ifname} is down: nothing reaches the XDP program until it is up \
             (ip link set {ifname} up)"
        );
    }
    let v4 = cfg.services.iter().any(|s| s.address.is_ipv4());
    let v6 = cfg.services.iter().any(|s| s.address.is_ipv6());
    for (family, wanted) in [("ipv4", v4), ("ipv6", v6)] {
        if !wanted {
            continue;
        }
        if let Some(problem) = forwarding_problem(family, ifname) {
            bail!("{problem}");
        }
    }
    if v6 {
        let table = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        for svc in &cfg.services {
            let std::net::IpAddr::V6(vip) = svc.address.ip() else {
                continue;
            };
            if svc.forwarding != crate::config::Forwarding::Dr {
                continue;
            }
            if let Some(dev) = preferred_on(&table, vip) {
                warn!(
                    service = %svc.name,
                    "IPv6 VIP {vip} is a preferred address on {dev}: the director's own packets \
                     to the reals (health checks) may leave from it, and DR reals, which hold \
                     it, answer themselves. Make it deprecated: `ip -6 addr change {vip}/128 \
                     dev {dev} preferred_lft 0` (VRRP adds IPv6 VIPs so)"
                );
            }
        }
    }
    Ok(())
}

/// The interface holding `ip` as a preferred (not deprecated) address, read from the lines of
/// `/proc/net/if_inet6` (address in 32 hex digits, ifindex, prefix length, scope, flags, name;
/// this process's network namespace).
fn preferred_on(table: &str, ip: std::net::Ipv6Addr) -> Option<String> {
    const IFA_F_DEPRECATED: u32 = 0x20;
    let want = format!("{:032x}", u128::from(ip));
    table.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let flags = u32::from_str_radix(f.get(4)?, 16).ok()?;
        (f.first()? == &want.as_str() && flags & IFA_F_DEPRECATED == 0)
            .then(|| f.get(5).map(|n| n.to_string()))
            .flatten()
    })
}

/// Why forwarding of `family` ("ipv4"/"ipv6") on `ifname` keeps the FIB from answering, if it
/// does; `None` when forwarding is on (or the sysctl cannot be read).
pub fn forwarding_problem(family: &str, ifname: &str) -> Option<String> {
    let path = format!("/proc/sys/net/{family}/conf/{ifname}/forwarding");
    let value = std::fs::read_to_string(&path).ok()?;
    if value.trim() != "0" {
        return None;
    }
    Some(format!(
        "{} forwarding is off on {ifname} (net.{family}.conf.{ifname}.forwarding = 0): the XDP \
         program asks the kernel's FIB for each real's next hop, and the FIB refuses while \
         forwarding is off, so every packet to a VIP would be dropped (drop_fib). Fix: \
         `sysctl -w net.{family}.conf.all.forwarding=1` (and make it permanent in \
         /etc/sysctl.d/)",
        if family == "ipv4" { "IPv4" } else { "IPv6" }
    ))
}

/// The interface's flags (`IFF_*`) from the kernel, in this process's network namespace;
/// `None` if it does not exist.
fn interface_flags(name: &str) -> Option<u32> {
    // SAFETY: SIOCGIFFLAGS fills the flags member of the union.
    ifreq_ioctl(name, libc::SIOCGIFFLAGS).map(|r| unsafe { r.ifr_ifru.ifru_flags } as u16 as u32)
}

/// Whether the interface is up with its carrier present (`IFF_UP` and `IFF_RUNNING`, the
/// kernel's operational state), in this process's network namespace; `None` if it is gone.
pub fn interface_running(name: &str) -> Option<bool> {
    interface_flags(name).map(|f| {
        let want = (libc::IFF_UP | libc::IFF_RUNNING) as u32;
        f & want == want
    })
}

/// The interface's MTU, in this process's network namespace (sysfs may show another one's).
pub fn interface_mtu(name: &str) -> Option<u32> {
    // SAFETY: SIOCGIFMTU fills the mtu member of the union.
    ifreq_ioctl(name, libc::SIOCGIFMTU).map(|r| unsafe { r.ifr_ifru.ifru_mtu } as u32)
}

fn ifreq_ioctl(name: &str, request: libc::c_ulong) -> Option<libc::ifreq> {
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: a plain datagram socket used only for the ioctl below, closed after it.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: ifreq is plain data; the name fits (checked above) and stays NUL-terminated.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    let rc = unsafe { libc::ioctl(fd, request, &mut req) };
    unsafe { libc::close(fd) };
    (rc == 0).then_some(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_exists_and_is_up() {
        let f = interface_flags("lo").expect("lo exists");
        assert_ne!(f & libc::IFF_UP as u32, 0);
        assert_ne!(f & libc::IFF_LOOPBACK as u32, 0);
    }

    #[test]
    fn loopback_has_an_mtu() {
        assert!(interface_mtu("lo").is_some_and(|m| m >= 1280));
    }

    #[test]
    fn a_preferred_ipv6_vip_is_found_a_deprecated_one_not() {
        let vip: std::net::Ipv6Addr = "2001:2::100".parse().unwrap();
        let preferred = "20010002000000000000000000000100 02 80 00 80       d0\n\
                         20010002000000000000000000000002 02 40 00 80       d0\n";
        assert_eq!(preferred_on(preferred, vip).as_deref(), Some("d0"));
        let deprecated = "20010002000000000000000000000100 02 80 00 a0       d0\n";
        assert_eq!(preferred_on(deprecated, vip), None);
        assert_eq!(preferred_on("", vip), None);
        assert_eq!(preferred_on("garbage\n", vip), None);
    }

    #[test]
    fn missing_interface_has_no_flags() {
        assert_eq!(interface_flags("xdpvs-nope0"), None);
        assert_eq!(interface_flags("a-name-longer-than-ifnamsiz"), None);
    }
}
