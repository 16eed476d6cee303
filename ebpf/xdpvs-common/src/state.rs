//! Connection states and the TCP state machine, as the director sees a flow.
//!
//! In DR mode the director sees only the client's half of a connection, so (like IPVS's
//! input-only table) the state follows the client's flags: SYN opens, the ACK after it
//! establishes, FIN closes gracefully, RST closes at once. Only ESTABLISHED counts as an active
//! connection; every other live state counts as inactive. These are exactly IPVS's ActiveConn and
//! InActConn.
//!
//! In NAT mode the director also sees the real's half: [`tcp_next_reply`] follows its flags, so
//! a close is seen from both ends (FIN_WAIT: the client closed first, CLOSE_WAIT: the real did;
//! CLOSE once both have), as IPVS's in/out state tables do.

pub const NONE: u32 = 0;
pub const SYN_RECV: u32 = 1;
pub const ESTABLISHED: u32 = 2;
pub const FIN_WAIT: u32 = 3;
pub const CLOSE: u32 = 4;
pub const UDP: u32 = 5;
/// Retired: counters already released; the entry is about to be deleted.
pub const DEAD: u32 = 6;
/// NAT only (the director sees both directions): the real sent its FIN first.
pub const CLOSE_WAIT: u32 = 7;
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
        return match state {
            CLOSE | CLOSE_WAIT => CLOSE,
            _ => FIN_WAIT,
        };
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

/// The state a NAT connection moves to when the real sends `flags` in `state`: its RST closes,
/// its FIN half-closes (or completes the close the client began); nothing else moves the state,
/// so a connection is established only by the client's ACK, as in DR.
#[inline(always)]
pub fn tcp_next_reply(state: u32, flags: u8) -> u32 {
    if flags & TCP_RST != 0 {
        return CLOSE;
    }
    if flags & TCP_FIN != 0 {
        return match state {
            FIN_WAIT | CLOSE => CLOSE,
            _ => CLOSE_WAIT,
        };
    }
    state
}

/// Whether a SYN arriving for an entry in `state` starts a new connection on a reused tuple.
#[inline(always)]
pub fn syn_reopens(state: u32) -> bool {
    state == FIN_WAIT || state == CLOSE || state == CLOSE_WAIT
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
    fn nat_close_is_seen_from_both_ends() {
        // The real closes first (an HTTP server ending a response).
        let s = tcp_next_reply(ESTABLISHED, TCP_FIN | TCP_ACK);
        assert_eq!(s, CLOSE_WAIT);
        assert!(is_live(s) && !is_active(s));
        assert_eq!(tcp_next(s, TCP_ACK), CLOSE_WAIT);
        assert_eq!(
            tcp_next_reply(s, TCP_FIN | TCP_ACK),
            CLOSE_WAIT,
            "retransmitted FIN"
        );
        assert_eq!(tcp_next(s, TCP_FIN | TCP_ACK), CLOSE);
        // The client closes first.
        let s = tcp_next(ESTABLISHED, TCP_FIN | TCP_ACK);
        assert_eq!(tcp_next_reply(s, TCP_ACK), FIN_WAIT);
        assert_eq!(tcp_next_reply(s, TCP_FIN | TCP_ACK), CLOSE);
        // The real's SYN-ACK does not establish; its RST closes from anywhere.
        assert_eq!(tcp_next_reply(SYN_RECV, TCP_SYN | TCP_ACK), SYN_RECV);
        for s in [SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT] {
            assert_eq!(tcp_next_reply(s, TCP_RST), CLOSE);
        }
        assert!(syn_reopens(CLOSE_WAIT));
    }

    #[test]
    fn dead_and_none_are_not_counted() {
        assert!(!is_live(DEAD));
        assert!(!is_live(NONE));
        assert!(is_live(UDP) && !is_active(UDP));
    }
}
