//! Connection states and the TCP state machine, as the director sees a flow.
//!
//! In DR mode the director sees only the client's half of a connection, so (like IPVS's
//! input-only table) the state follows the client's flags: SYN opens, the ACK after it
//! establishes, FIN closes gracefully, RST closes at once. Only ESTABLISHED counts as an active
//! connection; every other live state counts as inactive. These are exactly IPVS's ActiveConn and
//! InActConn.

pub const NONE: u32 = 0;
pub const SYN_RECV: u32 = 1;
pub const ESTABLISHED: u32 = 2;
pub const FIN_WAIT: u32 = 3;
pub const CLOSE: u32 = 4;
pub const UDP: u32 = 5;
/// Retired: counters already released; the entry is about to be deleted.
pub const DEAD: u32 = 6;
pub const COUNT: usize = 8;

/// TCP flag bits as in the header's 13th byte.
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Whether a connection in `state` counts as active (else inactive, unless not live).
#[inline(always)]
pub fn is_active(state: u32) -> bool {
    state == ESTABLISHED
}

/// Whether a connection in `state` is counted at all.
#[inline(always)]
pub fn is_live(state: u32) -> bool {
    state != NONE && state != DEAD && (state as usize) < COUNT
}

/// The state a TCP connection moves to when the client sends `flags` in `state`.
#[inline(always)]
pub fn tcp_next(state: u32, flags: u8) -> u32 {
    if flags & TCP_RST != 0 {
        return CLOSE;
    }
    if flags & TCP_FIN != 0 {
        return if state == CLOSE { CLOSE } else { FIN_WAIT };
    }
    if flags & TCP_SYN != 0 {
        // A retransmitted SYN leaves the state alone; a new SYN on a closed tuple is handled by
        // the caller (it retires the entry and schedules afresh).
        return state;
    }
    if flags & TCP_ACK != 0 && state == SYN_RECV {
        return ESTABLISHED;
    }
    state
}

/// Whether a SYN arriving for an entry in `state` starts a new connection on a reused tuple.
#[inline(always)]
pub fn syn_reopens(state: u32) -> bool {
    state == FIN_WAIT || state == CLOSE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_then_fin() {
        let s = SYN_RECV;
        let s = tcp_next(s, TCP_SYN); // retransmitted SYN
        assert_eq!(s, SYN_RECV);
        let s = tcp_next(s, TCP_ACK);
        assert_eq!(s, ESTABLISHED);
        assert!(is_active(s));
        let s = tcp_next(s, TCP_ACK | 0x08); // data with PSH
        assert_eq!(s, ESTABLISHED);
        let s = tcp_next(s, TCP_FIN | TCP_ACK);
        assert_eq!(s, FIN_WAIT);
        assert!(!is_active(s) && is_live(s));
        assert_eq!(tcp_next(s, TCP_ACK), FIN_WAIT);
    }

    #[test]
    fn rst_closes_from_anywhere() {
        for s in [SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE] {
            assert_eq!(tcp_next(s, TCP_RST | TCP_ACK), CLOSE);
        }
    }

    #[test]
    fn syn_on_closed_tuple_reopens() {
        assert!(syn_reopens(FIN_WAIT));
        assert!(syn_reopens(CLOSE));
        assert!(!syn_reopens(SYN_RECV));
        assert!(!syn_reopens(ESTABLISHED));
    }

    #[test]
    fn dead_and_none_are_not_counted() {
        assert!(!is_live(DEAD));
        assert!(!is_live(NONE));
        assert!(is_live(UDP) && !is_active(UDP));
    }
}
