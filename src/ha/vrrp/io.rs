//! The socket side of a VRRP instance: adverts in and out, virtual addresses, gratuitous ARP/NA,
//! and the tokio loop that feeds them to the pure [`Machine`].
//!
//! Interoperability follows keepalived's default (`use_vmac` off): adverts leave through the
//! kernel from the interface's own MAC and primary address, a raw IP socket for protocol 112 with
//! TTL / hop limit 255, DSCP CS6, multicast loop off; the virtual addresses are plain secondary
//! addresses on the interface; gratuitous ARP goes out on an `AF_PACKET` socket and the
//! unsolicited NA on an ICMPv6 socket (the kernel fills in its checksum).
//!
//! Receiving uses a second, unbound raw socket joined to 224.0.0.18 / ff02::12 on the interface
//! (a raw IPv4 socket bound to an address sees only unicast to it). IPv4 delivers the whole IP
//! header, so TTL, source and destination come from it; IPv6 strips it, so the hop limit and
//! destination come from `IPV6_RECVHOPLIMIT` / `IPV6_RECVPKTINFO`.
//!
//! Virtual addresses are added and removed by running `ip addr` (iproute2): one command per
//! master transition is not a hot path, it matches what an operator would type and see, and it
//! keeps an rtnetlink stack (and its async runtime coupling) out of the daemon. Its failures are
//! logged and counted; "already there" / "not there" count as success.

use std::ffi::CString;
use std::future::Future;
use std::io;
use std::mem::{size_of, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, SockFilter, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::machine::{Action, Event, Machine, Params, State};
use super::packet::{self, Advert, Family, Local, Received, Reject, RejectCounts};
use crate::ha::config::VrrpConfig;

/// Longest time between two carrier checks of the interface.
const LINK_POLL: std::time::Duration = std::time::Duration::from_millis(50);

/// A state change, reported to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The `[[vrrp]]` name.
    pub name: String,
    pub from: State,
    pub to: State,
    /// The master as known after the change (ourselves when `to` is Master).
    pub master: Option<IpAddr>,
    pub priority: u8,
}

/// What an instance has done, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Packets read from the VRRP socket (before validation; our own excluded).
    pub received: AtomicU64,
    /// Adverts accepted and fed to the state machine.
    pub accepted: AtomicU64,
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
    pub rejected: RejectCounts,
    pub transitions: AtomicU64,
    pub gratuitous_sent: AtomicU64,
    /// `ip addr add/del` that failed.
    pub address_errors: AtomicU64,
    /// The interface lost its carrier (or went down or away): out of the election until back.
    pub link_down: std::sync::atomic::AtomicBool,
    /// The current [`State`] as `State as u8` (0 initialize, 1 backup, 2 master).
    state: AtomicU8,
    /// Running priority (tracked services lower it).
    priority: AtomicU8,
    /// The master as last known (ourselves while master; `None` before any advert).
    master: std::sync::Mutex<Option<IpAddr>>,
}

impl Counters {
    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            1 => State::Backup,
            2 => State::Master,
            _ => State::Initialize,
        }
    }

    fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Relaxed);
    }

    pub fn priority(&self) -> u8 {
        self.priority.load(Ordering::Relaxed)
    }

    pub fn master(&self) -> Option<IpAddr> {
        *self.master.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observe(&self, m: &Machine) {
        self.priority.store(m.priority(), Ordering::Relaxed);
        *self.master.lock().unwrap_or_else(|p| p.into_inner()) = m.master();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VrrpError {
    #[error("interface {0}: {1}")]
    Interface(String, io::Error),
    #[error("interface {0} has no {1} address to advertise from")]
    NoPrimary(String, &'static str),
    #[error("{0}: {1}")]
    Socket(&'static str, io::Error),
}

fn sock(what: &'static str) -> impl FnOnce(io::Error) -> VrrpError {
    move |e| VrrpError::Socket(what, e)
}

/// One VRRP instance with its sockets open: built in the network namespace it serves.
pub struct Instance {
    config: VrrpConfig,
    family: Family,
    ifindex: u32,
    mac: [u8; 6],
    /// The interface's primary address (IPv6: its link-local): advert source and tie-breaker.
    primary: IpAddr,
    rx: AsyncFd<Socket>,
    tx: Socket,
    counters: Arc<Counters>,
    priority: watch::Receiver<u8>,
    priority_tx: watch::Sender<u8>,
}

impl Instance {
    /// Resolves the interface and opens the sockets (needs CAP_NET_RAW); call inside a tokio
    /// runtime.
    pub fn new(config: VrrpConfig) -> Result<Instance, VrrpError> {
        let ifname = config.interface.clone();
        let ifindex = if_index(&ifname).map_err(|e| VrrpError::Interface(ifname.clone(), e))?;
        let mac = if_mac(&ifname).map_err(|e| VrrpError::Interface(ifname.clone(), e))?;
        let family = config.family();
        let vips: Vec<IpAddr> = config.addresses.iter().map(|a| a.ip).collect();
        let primary = primary_address(&ifname, family, &vips)
            .map_err(|e| VrrpError::Interface(ifname.clone(), e))?
            .ok_or(VrrpError::NoPrimary(
                ifname.clone(),
                if family == Family::V4 {
                    "IPv4"
                } else {
                    "IPv6 link-local"
                },
            ))?;
        let (rx, tx) = open_sockets(family, &ifname, ifindex, primary)?;
        let (priority_tx, priority) = watch::channel(config.priority);
        Ok(Instance {
            family,
            ifindex,
            mac,
            primary,
            // SAFETY: the Socket owns its fd, which stays open as long as the AsyncFd owns it.
            rx: unsafe { AsyncFd::register_with_interest(rx, tokio::io::Interest::READABLE) }
                .map_err(|e| VrrpError::Socket("register the VRRP socket", e.into()))?,
            tx,
            counters: Arc::new(Counters::default()),
            priority,
            priority_tx,
            config,
        })
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Changes the running priority (tracked services); the owner's 255 never changes.
    pub fn priority_handle(&self) -> watch::Sender<u8> {
        self.priority_tx.clone()
    }

    pub fn primary(&self) -> IpAddr {
        self.primary
    }

    /// Runs the election until `shutdown` completes, then leaves cleanly: a master sends
    /// priority 0 (so the backup takes over after Skew_Time) and removes the addresses.
    pub async fn run(
        self,
        events: mpsc::UnboundedSender<Transition>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), VrrpError> {
        tokio::pin!(shutdown);
        let mut priority = self.priority.clone();
        let mut m = Machine::new(Params {
            priority: self.config.priority,
            advert_interval_cs: self.config.advert_interval_cs(),
            preempt: self.config.preempt,
            preempt_delay: self.config.preempt_delay,
            primary: self.primary,
        });
        tracing::info!(
            vrrp = %self.config.name, interface = %self.config.interface,
            vrid = self.config.virtual_router_id, priority = self.config.priority,
            primary = %self.primary, "vrrp instance starting"
        );
        self.step(&mut m, Event::Startup, &events).await;
        if m.state() == State::Backup {
            // A daemon killed while master left its addresses on the interface: a backup must
            // not answer ARP for them.
            self.addresses("del").await;
        }
        let mut buf = vec![0u8; 2048];
        // Carrier is polled (one ioctl), at least as often as adverts are sent.
        let mut link_tick = tokio::time::interval(LINK_POLL.min(self.config.advert_interval));
        link_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut link_up = true;
        loop {
            let deadline = m.next_deadline();
            let timer = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut shutdown => {
                    self.step(&mut m, Event::Shutdown, &events).await;
                    return Ok(());
                }
                _ = timer => self.step(&mut m, Event::Timer, &events).await,
                r = self.recv(&mut buf) => match r {
                    Ok(Some((from, advert))) => {
                        let ev = Event::Advert {
                            from,
                            priority: advert.priority,
                            max_adver_int_cs: advert.max_adver_int_cs,
                        };
                        self.step(&mut m, ev, &events).await;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(vrrp = %self.config.name, "receive failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                },
                _ = link_tick.tick() => {
                    let up = crate::preflight::interface_running(&self.config.interface)
                        .unwrap_or(false);
                    if up != link_up {
                        link_up = up;
                        self.link_changed(&mut m, up, &events).await;
                    }
                }
                Ok(()) = priority.changed() => {
                    let p = *priority.borrow_and_update();
                    self.step(&mut m, Event::SetPriority(p), &events).await;
                }
            }
        }
    }

    /// keepalived's FAULT: without carrier the instance leaves the election (as master it
    /// gives up the addresses: it cannot defend them), and rejoins as a backup when the carrier
    /// returns, so a master whose link was cut takes its addresses back only through a fresh
    /// election, with gratuitous ARP that points the clients at it again.
    async fn link_changed(
        &self,
        m: &mut Machine,
        up: bool,
        events: &mpsc::UnboundedSender<Transition>,
    ) {
        self.counters.link_down.store(!up, Ordering::Relaxed);
        if up {
            tracing::info!(vrrp = %self.config.name, interface = %self.config.interface, "carrier back: rejoining the election");
            self.step(m, Event::Startup, events).await;
            if m.state() == State::Backup {
                self.addresses("del").await;
            }
        } else {
            tracing::warn!(vrrp = %self.config.name, interface = %self.config.interface, "interface down or without carrier: leaving the election until it returns");
            self.step(m, Event::Shutdown, events).await;
        }
    }

    async fn step(&self, m: &mut Machine, ev: Event, events: &mpsc::UnboundedSender<Transition>) {
        let from = m.state();
        let actions = m.step(ev, Instant::now());
        let to = m.state();
        // Taking over, the daemon is told first: it starts forwarding for the VIPs while the
        // addresses are added and announced, so the first client packet after the gratuitous
        // ARP finds the dataplane ready. Leaving, it is told after the addresses are gone.
        let report = |counters: &Counters| {
            if to != from {
                counters.transitions.fetch_add(1, Ordering::Relaxed);
                counters.set_state(to);
                tracing::info!(vrrp = %self.config.name, %from, %to, master = ?m.master(), "vrrp transition");
                let _ = events.send(Transition {
                    name: self.config.name.clone(),
                    from,
                    to,
                    master: m.master(),
                    priority: m.priority(),
                });
            }
        };
        if to == State::Master {
            report(&self.counters);
        }
        for a in actions {
            match a {
                Action::SendAdvert { priority } => self.send_advert(priority),
                Action::AddAddresses => self.addresses("add").await,
                Action::RemoveAddresses => self.addresses("del").await,
                Action::SendGratuitous => self.gratuitous(),
                // The loop sleeps until `next_deadline`, which already reflects these.
                Action::Arm { .. } | Action::Cancel(_) => {}
            }
        }
        if to != State::Master {
            report(&self.counters);
        }
        self.counters.observe(m);
    }

    /// Reads one packet; `Some` when it is a valid advert from another router.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(IpAddr, Advert)>> {
        loop {
            let mut guard = self.rx.readable().await?;
            let r = guard.try_io(|fd| match self.family {
                Family::V4 => recv_v4(fd.get_ref().as_raw_fd(), buf),
                Family::V6 => recv_v6(fd.get_ref().as_raw_fd(), buf),
            });
            let Ok(r) = r else { continue };
            let (ttl, src, dst, at, len) = r?;
            if src == self.primary {
                return Ok(None);
            }
            self.counters.received.fetch_add(1, Ordering::Relaxed);
            let rx = match self.family {
                Family::V4 => packet::parse_ipv4(&buf[..len]),
                Family::V6 => Ok(Received {
                    ttl,
                    src,
                    dst,
                    payload: &buf[at..len],
                }),
            };
            let vips: Vec<IpAddr> = self.config.addresses.iter().map(|a| a.ip).collect();
            let local = Local {
                vrid: self.config.virtual_router_id,
                priority: self.config.priority,
                addresses: &vips,
            };
            let res = rx.and_then(|rx| packet::validate(&rx, &local).map(|a| (rx.src, a)));
            return Ok(match res {
                Ok((from, advert)) => {
                    self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                    Some((from, advert))
                }
                Err(reason) => {
                    self.reject(reason, src);
                    None
                }
            });
        }
    }

    fn reject(&self, reason: Reject, src: IpAddr) {
        self.counters.rejected.count(reason);
        tracing::debug!(vrrp = %self.config.name, %src, %reason, "advert dropped");
    }

    fn send_advert(&self, priority: u8) {
        let (dst, to): (IpAddr, SockAddr) = match self.family {
            Family::V4 => (
                IpAddr::V4(packet::GROUP_V4),
                SocketAddrV4::new(packet::GROUP_V4, 0).into(),
            ),
            Family::V6 => (
                IpAddr::V6(packet::GROUP_V6),
                SocketAddrV6::new(packet::GROUP_V6, 0, 0, self.ifindex).into(),
            ),
        };
        let advert = Advert {
            vrid: self.config.virtual_router_id,
            priority,
            max_adver_int_cs: self.config.advert_interval_cs(),
            addresses: self.config.addresses.iter().map(|a| a.ip).collect(),
        };
        let sent = packet::encode(&advert, self.primary, dst)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
            .and_then(|p| self.tx.send_to(&p, &to));
        match sent {
            Ok(_) => self.counters.sent.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(vrrp = %self.config.name, "advert not sent: {e}");
                self.counters.send_errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }

    async fn addresses(&self, op: &str) {
        for a in &self.config.addresses {
            let cidr = a.to_string();
            let mut cmd = tokio::process::Command::new("ip");
            if a.ip.is_ipv6() {
                cmd.arg("-6");
            }
            cmd.args(["addr", op, &cidr, "dev", &self.config.interface]);
            if op == "add" && a.ip.is_ipv6() {
                // Deprecated at once (preferred_lft 0): still answered in neighbour discovery
                // and accepted, but never picked as the source of the director's own packets
                // (RFC 6724 rule 3). A preferred /128 VIP would win source selection over the
                // /64 interface address (longest match within the prefix), and DR reals would
                // answer the health checks to the VIP, which they hold themselves.
                cmd.args(["nodad", "preferred_lft", "0"]);
            }
            let out = cmd.stdin(std::process::Stdio::null()).output().await;
            let failed = match out {
                Ok(o) if o.status.success() => None,
                Ok(o) => {
                    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                    let benign = (op == "add" && err.contains("File exists"))
                        || (op == "del"
                            && (err.contains("Cannot assign requested address")
                                || err.contains("Address not found")));
                    (!benign).then_some(err)
                }
                Err(e) => Some(e.to_string()),
            };
            if let Some(err) = failed {
                self.counters.address_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(vrrp = %self.config.name, "ip addr {op} {cidr} dev {}: {err}", self.config.interface);
            }
        }
    }

    fn gratuitous(&self) {
        for a in &self.config.addresses {
            let r = match a.ip {
                IpAddr::V4(ip) => send_garp(self.ifindex, self.mac, ip),
                IpAddr::V6(ip) => {
                    send_unsolicited_na(&self.config.interface, self.ifindex, self.mac, ip)
                }
            };
            match r {
                Ok(()) => {
                    self.counters
                        .gratuitous_sent
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(vrrp = %self.config.name, vip = %a.ip, "gratuitous ARP/NA not sent: {e}")
                }
            }
        }
    }
}

fn open_sockets(
    family: Family,
    ifname: &str,
    ifindex: u32,
    primary: IpAddr,
) -> Result<(Socket, Socket), VrrpError> {
    let proto = Some(Protocol::from(i32::from(packet::IPPROTO_VRRP)));
    let domain = match family {
        Family::V4 => Domain::IPV4,
        Family::V6 => Domain::IPV6,
    };
    let rx = Socket::new(domain, Type::RAW, proto).map_err(sock("open the VRRP socket"))?;
    let tx = Socket::new(domain, Type::RAW, proto).map_err(sock("open the VRRP socket"))?;
    for s in [&rx, &tx] {
        s.bind_device(Some(ifname.as_bytes()))
            .map_err(sock("bind the VRRP socket to its interface"))?;
    }
    match (family, primary) {
        (Family::V4, IpAddr::V4(src)) => {
            rx.join_multicast_v4_n(&packet::GROUP_V4, &InterfaceIndexOrAddress::Index(ifindex))
                .map_err(sock("join 224.0.0.18"))?;
            tx.set_multicast_ttl_v4(u32::from(packet::TTL))
                .map_err(sock("IP_MULTICAST_TTL"))?;
            tx.set_ttl_v4(u32::from(packet::TTL))
                .map_err(sock("IP_TTL"))?;
            tx.set_multicast_loop_v4(false)
                .map_err(sock("IP_MULTICAST_LOOP"))?;
            tx.set_multicast_if_v4(&src)
                .map_err(sock("IP_MULTICAST_IF"))?;
            // DSCP CS6 (network control), as keepalived sends.
            tx.set_tos_v4(0xc0).map_err(sock("IP_TOS"))?;
            tx.bind(&SocketAddrV4::new(src, 0).into())
                .map_err(sock("bind the advert source address"))?;
        }
        (Family::V6, IpAddr::V6(src)) => {
            rx.join_multicast_v6(&packet::GROUP_V6, ifindex)
                .map_err(sock("join ff02::12"))?;
            set_int(
                rx.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVHOPLIMIT,
                1,
            )
            .map_err(sock("IPV6_RECVHOPLIMIT"))?;
            set_int(
                rx.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVPKTINFO,
                1,
            )
            .map_err(sock("IPV6_RECVPKTINFO"))?;
            tx.set_multicast_hops_v6(u32::from(packet::TTL))
                .map_err(sock("IPV6_MULTICAST_HOPS"))?;
            tx.set_unicast_hops_v6(u32::from(packet::TTL))
                .map_err(sock("IPV6_UNICAST_HOPS"))?;
            tx.set_multicast_loop_v6(false)
                .map_err(sock("IPV6_MULTICAST_LOOP"))?;
            tx.set_multicast_if_v6(ifindex)
                .map_err(sock("IPV6_MULTICAST_IF"))?;
            set_int(tx.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 0xc0)
                .map_err(sock("IPV6_TCLASS"))?;
            tx.bind(&SocketAddrV6::new(src, 0, 0, ifindex).into())
                .map_err(sock("bind the advert source address"))?;
        }
        _ => {
            return Err(VrrpError::Socket(
                "open the VRRP socket",
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "primary address of the wrong family",
                ),
            ))
        }
    }
    // The send socket is bound to our address, so the kernel would queue unicast VRRP on it
    // that nobody reads: a filter that accepts nothing.
    tx.attach_filter(&[SockFilter::new(0x06, 0, 0, 0)])
        .map_err(sock("SO_ATTACH_FILTER"))?;
    rx.set_nonblocking(true).map_err(sock("O_NONBLOCK"))?;
    Ok((rx, tx))
}

fn set_int(fd: RawFd, level: i32, name: i32, v: i32) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to an int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const v).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// (ttl, src, dst, payload offset, length): IPv4 gives the whole datagram, parsed later.
type Recv = (u8, IpAddr, IpAddr, usize, usize);

fn recv_v4(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    // SAFETY: buf is valid for writes of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = n as usize;
    // Only the source is needed here (to skip our own); the rest is parsed by `parse_ipv4`.
    let src = buf.get(12..16).map_or(Ipv4Addr::UNSPECIFIED, |b| {
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    });
    Ok((0, IpAddr::V4(src), IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, n))
}

fn recv_v6(fd: RawFd, buf: &mut [u8]) -> io::Result<Recv> {
    let mut name = MaybeUninit::<libc::sockaddr_in6>::zeroed();
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: zeroed msghdr is valid; every pointer below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<[u64; 16]>();
    // SAFETY: msg points at valid buffers.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel filled in a sockaddr_in6 (msg_namelen says how much; zeroed otherwise).
    let name = unsafe { name.assume_init() };
    let src = Ipv6Addr::from(name.sin6_addr.s6_addr);
    // Missing control data reads as hop limit 0 and dst ::, which validation then rejects.
    let (mut hops, mut dst) = (0u8, Ipv6Addr::UNSPECIFIED);
    // SAFETY: CMSG_* walk the control buffer the kernel filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT) => {
                    let v = std::ptr::read_unaligned(data.cast::<i32>());
                    hops = u8::try_from(v).unwrap_or(0);
                }
                (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) => {
                    let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                    dst = Ipv6Addr::from(info.ipi6_addr.s6_addr);
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((hops, IpAddr::V6(src), IpAddr::V6(dst), 0, n as usize))
}

fn if_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(i)
    }
}

fn if_mac(name: &str) -> io::Result<[u8; 6]> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    // SAFETY: ifreq is plain data; the name fits (validated to IFNAMSIZ - 1).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = b as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the union member SIOCGIFHWADDR wrote.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok(mac)
}

/// The first address of `family` on `ifname` that is not one of the VIPs: for IPv4 the primary
/// address, for IPv6 the link-local one (RFC 5798 5.1.2.1: adverts come from it).
fn primary_address(ifname: &str, family: Family, vips: &[IpAddr]) -> io::Result<Option<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut found = None;
    let mut cur = head;
    // SAFETY: walking the list getifaddrs returned; pointers are valid until freeifaddrs.
    unsafe {
        while !cur.is_null() && found.is_none() {
            let ifa = &*cur;
            cur = ifa.ifa_next;
            if ifa.ifa_addr.is_null()
                || std::ffi::CStr::from_ptr(ifa.ifa_name).to_bytes() != ifname.as_bytes()
            {
                continue;
            }
            let ip = match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET if family == Family::V4 => {
                    let sa = &*ifa.ifa_addr.cast::<libc::sockaddr_in>();
                    IpAddr::V4(Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)))
                }
                libc::AF_INET6 if family == Family::V6 => {
                    let sa = &*ifa.ifa_addr.cast::<libc::sockaddr_in6>();
                    let a = Ipv6Addr::from(sa.sin6_addr.s6_addr);
                    if a.segments()[0] & 0xffc0 != 0xfe80 {
                        continue;
                    }
                    IpAddr::V6(a)
                }
                _ => continue,
            };
            if !vips.contains(&ip) {
                found = Some(ip);
            }
        }
        libc::freeifaddrs(head);
    }
    Ok(found)
}

fn send_link(ifindex: u32, ethertype: u16, frame: &[u8]) -> io::Result<()> {
    let s = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(i32::from(ethertype.to_be()))),
    )?;
    // SAFETY: sockaddr_ll is plain data.
    let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    ll.sll_family = libc::AF_PACKET as u16;
    ll.sll_protocol = ethertype.to_be();
    ll.sll_ifindex = ifindex as i32;
    ll.sll_halen = 6;
    ll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: frame and ll are valid for the lengths given.
    let n = unsafe {
        libc::sendto(
            s.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A gratuitous ARP request (RFC 5227 announcement: sender = target = the VIP), broadcast.
pub fn garp_frame(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip.octets());
    f
}

fn send_garp(ifindex: u32, mac: [u8; 6], ip: Ipv4Addr) -> io::Result<()> {
    send_link(ifindex, 0x0806, &garp_frame(mac, ip))
}

/// An unsolicited Neighbor Advertisement (RFC 4861 7.2.6) for `target`, Override set, to all
/// nodes; the kernel computes the ICMPv6 checksum of raw ICMPv6 sockets.
pub fn unsolicited_na(mac: [u8; 6], target: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&mac);
    m
}

fn send_unsolicited_na(
    ifname: &str,
    ifindex: u32,
    mac: [u8; 6],
    target: Ipv6Addr,
) -> io::Result<()> {
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.bind_device(Some(ifname.as_bytes()))?;
    s.set_multicast_hops_v6(255)?;
    s.set_multicast_if_v6(ifindex)?;
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    s.send_to(
        &unsolicited_na(mac, target),
        &SocketAddrV6::new(all_nodes, 0, 0, ifindex).into(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garp_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let f = garp_frame(mac, Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(f.len(), 42);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        // Request, sender and target protocol address both the VIP.
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[198, 18, 0, 100]);
        assert_eq!(&f[38..42], &[198, 18, 0, 100]);
    }

    #[test]
    fn na_layout() {
        let mac = [2, 0, 0, 0, 0, 1];
        let t: Ipv6Addr = "2001:2::100".parse().unwrap();
        let m = unsolicited_na(mac, t);
        assert_eq!(m.len(), 32);
        assert_eq!(m[0], 136);
        assert_eq!(m[4] & 0x20, 0x20, "override flag");
        assert_eq!(m[4] & 0x40, 0, "not solicited");
        assert_eq!(&m[8..24], &t.octets());
        assert_eq!(&m[24..26], &[2, 1]);
        assert_eq!(&m[26..], &mac);
    }
}
