//! Persistence (client affinity), as IPVS's persistent services do it: a new connection from a
//! client that has a live template for the service goes to the template's real instead of being
//! scheduled; a scheduled one leaves a template behind.
//!
//! A template is keyed by the client's address masked to the service's prefix (`/24` sends a
//! whole client network to one real) and lives `persist_timeout_s` after the last new
//! connection it placed. IPVS also keeps a template alive while connections it placed are open;
//! here a connection longer than the timeout does not hold its template (the operator sets the
//! timeout above the session length, see docs/config.md).
//!
//! A template is used only while its real is in the service's current real set with a weight
//! above 0: a drained, quiesced or failed real takes no new connections, persistent or not
//! (ldirectord's lesson with quiescent reals: templates must not keep feeding a dead real). The
//! new choice then replaces the template.
use xdpvs_common::{PersistKey, RealSet, Service, Template, MAX_REALS_PER_SERVICE, NO_REAL};

use crate::maps::{PERSIST, PERSIST_SCRATCH, REALSETS};
use crate::parse::Packet;

/// Per-CPU scratch for a template's key and value: the verifier bounds the stack of the
/// deepest call chain at 512 bytes, and the packet path's chain is close to it already.
#[repr(C)]
pub struct PersistScratch {
    pub key: PersistKey,
    pub template: Template,
}

/// This CPU's scratch, with the template key of `pkt`'s client for `svc` in it.
#[inline(always)]
fn key(svc: &Service, pkt: &Packet) -> Option<&'static mut PersistScratch> {
    let s = unsafe { &mut *PERSIST_SCRATCH.get_ptr_mut(0)? };
    let prefix = svc.persist_prefix as u32;
    let mut i = 0;
    while i < 4 {
        // Bits of this 32-bit word the prefix keeps (words are in network order).
        let bits = prefix.saturating_sub(i * 32).min(32);
        let mask = if bits == 0 {
            0
        } else {
            (u32::MAX << (32 - bits)).to_be()
        };
        s.key.client.w[i as usize] = pkt.src.w[i as usize] & mask;
        i += 1;
    }
    s.key.service = svc.id;
    s.key.family = pkt.family;
    s.key._pad = [0; 3];
    Some(s)
}

/// The real `pkt`'s client's live template names, if it may take a new connection now;
/// `NO_REAL` otherwise.
#[inline(never)]
pub fn lookup(svc: &Service, pkt: &Packet, now: u64) -> u32 {
    let Some(s) = key(svc, pkt) else {
        return NO_REAL;
    };
    let (real, used_ns) = match unsafe { PERSIST.get(&s.key) } {
        Some(t) => (t.real, t.used_ns),
        None => return NO_REAL,
    };
    if now.wrapping_sub(used_ns) >= svc.persist_timeout_s as u64 * 1_000_000_000 {
        return NO_REAL;
    }
    if xdpvs_persist_usable(svc.realset, real) == 0 {
        return NO_REAL;
    }
    real
}

/// Records that `real` took a new connection from `pkt`'s client (a new template, or the
/// existing one's time restarted).
#[inline(never)]
pub fn remember(svc: &Service, pkt: &Packet, real: u32, now: u64) {
    let Some(s) = key(svc, pkt) else {
        return;
    };
    // The template that placed this connection: its time restarts in place (a plain store;
    // an LRU insert would take the map's locks for every persistent connection).
    if let Some(t) = PERSIST.get_ptr_mut(&s.key) {
        unsafe {
            if (*t).real == real {
                (*t).used_ns = now;
                return;
            }
        }
    }
    s.template = Template {
        real,
        _pad: 0,
        used_ns: now,
    };
    // Best effort: an LRU insert only fails without memory; the connection is placed anyway.
    let _ = PERSIST.insert(&s.key, &s.template, 0);
}

/// 1 if `real` is in real set `realset` with a weight above 0. A global BPF function (exported
/// by the linker, see build.rs), verified once on its own like `xdpvs_pick`.
#[no_mangle]
#[inline(never)]
pub extern "C" fn xdpvs_persist_usable(realset: u32, real: u32) -> u32 {
    let set: &RealSet = match REALSETS.get(realset) {
        Some(s) => s,
        None => return 0,
    };
    let n = set.count;
    for i in 0..MAX_REALS_PER_SERVICE {
        if i as u32 >= n {
            break;
        }
        let slot = set.slots[i];
        if slot.real == real {
            return (slot.weight != 0) as u32;
        }
    }
    0
}
