//! The few IPv4 header fields the mesh reads, and WireGuard message types.

use std::net::Ipv4Addr;
use std::ops::Range;

pub(crate) const IPV4_MIN_HEADER: usize = 20;

/// WireGuard message types (first byte of every datagram; three zero bytes follow).
pub(crate) const MSG_HANDSHAKE_INIT: u8 = 1;
pub(crate) const MSG_HANDSHAKE_RESPONSE: u8 = 2;
pub(crate) const MSG_COOKIE_REPLY: u8 = 3;
pub(crate) const MSG_DATA: u8 = 4;

pub(crate) const HANDSHAKE_INIT_LEN: usize = 148;
pub(crate) const HANDSHAKE_RESPONSE_LEN: usize = 92;
pub(crate) const COOKIE_REPLY_LEN: usize = 64;
/// Data message header (16) plus the AEAD tag (16).
pub const DATA_OVERHEAD: usize = 32;

/// Destination of an IPv4 packet, `None` if it is not one.
pub(crate) fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < IPV4_MIN_HEADER || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

/// The WireGuard message type of a datagram whose header is well formed.
pub(crate) fn message_type(datagram: &[u8]) -> Option<u8> {
    match datagram {
        [t @ 1..=4, 0, 0, 0, ..] => Some(*t),
        _ => None,
    }
}

/// Minimum length of a well-formed message of this type.
pub(crate) fn message_min_len(message_type: u8) -> usize {
    match message_type {
        MSG_HANDSHAKE_INIT => HANDSHAKE_INIT_LEN,
        MSG_HANDSHAKE_RESPONSE => HANDSHAKE_RESPONSE_LEN,
        MSG_COOKIE_REPLY => COOKIE_REPLY_LEN,
        _ => DATA_OVERHEAD,
    }
}

/// Where `inner` sits inside the buffer starting at address `base`. boringtun
/// returns sub-slices of the caller's buffer; keeping ranges instead of the
/// borrowed slices lets the buffer be reused and re-sliced with its full lifetime.
pub(crate) fn range_in(base: usize, inner: &[u8]) -> Range<usize> {
    let start = (inner.as_ptr() as usize).wrapping_sub(base);
    start..start + inner.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_ipv4_destination_and_rejects_everything_else() {
        let mut packet = [0u8; 20];
        packet[0] = 0x45;
        packet[16..20].copy_from_slice(&[198, 19, 2, 7]);
        assert_eq!(
            ipv4_destination(&packet),
            Some(Ipv4Addr::new(198, 19, 2, 7))
        );
        assert_eq!(ipv4_destination(&packet[..19]), None);
        packet[0] = 0x60;
        assert_eq!(ipv4_destination(&packet), None);
        assert_eq!(ipv4_destination(&[]), None);
    }

    #[test]
    fn message_type_needs_the_reserved_zero_bytes() {
        assert_eq!(message_type(&[4, 0, 0, 0, 9]), Some(4));
        assert_eq!(message_type(&[4, 0, 1, 0]), None);
        assert_eq!(message_type(&[5, 0, 0, 0]), None);
        assert_eq!(message_type(&[1, 0, 0]), None);
    }
}
