//! Atomic operations on map values.
//!
//! `core::sync::atomic` has no fetch-add on the BPF target, so these wrap the intrinsics that
//! lower to BPF atomic instructions. SeqCst throughout: this LLVM miscompiles a Relaxed fetch
//! whose result is used (see shared/TOOLCHAIN.md).
use core::intrinsics::{atomic_cxchg, atomic_xadd, atomic_xsub, AtomicOrdering};

#[inline(always)]
pub unsafe fn add(p: *mut u64, v: u64) {
    atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v);
}

#[inline(always)]
pub unsafe fn sub(p: *mut u64, v: u64) {
    atomic_xsub::<u64, u64, { AtomicOrdering::SeqCst }>(p, v);
}

/// Returns the previous value.
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u64, v: u64) -> u64 {
    atomic_xadd::<u64, u64, { AtomicOrdering::SeqCst }>(p, v)
}

/// Sets `*p` to `new` if it holds `old`; true if this call made the change.
#[inline(always)]
pub unsafe fn cas_u32(p: *mut u32, old: u32, new: u32) -> bool {
    atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
}

/// Sets `*p` to `new` if it holds `old`; true if this call made the change.
#[inline(always)]
pub unsafe fn cas_u64(p: *mut u64, old: u64, new: u64) -> bool {
    atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(p, old, new).1
}
