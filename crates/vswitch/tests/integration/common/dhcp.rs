//! DHCPv4 message bodies, shared by `common` and `fragbuild` (which includes this file).

/// A DHCPv4 message body: op, the magic cookie and option 53 (message type), padded with
/// options to `len` bytes (at least the 244 these take) so it can need many fragments.
pub fn bootp(op: u8, msg_type: u8, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(244)];
    p[0] = op;
    p[1] = 1;
    p[2] = 6;
    p[236..240].copy_from_slice(&[99, 130, 83, 99]);
    p[240] = 53;
    p[241] = 1;
    p[242] = msg_type;
    p[243] = 255;
    p
}
