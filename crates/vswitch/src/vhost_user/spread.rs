//! Which receive queue of a multiqueue guest a frame goes to: a hash of its flow (IP addresses
//! and, for TCP/UDP that is not a later fragment, ports; the MAC addresses for anything else),
//! so every frame of one connection lands in the same queue and stays in order, while
//! different connections spread over the guest's vCPUs.

/// FNV-1a: cheap, and good enough to spread a handful of queues.
fn fnv(bytes: &[u8], mut h: u32) -> u32 {
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

const FNV_SEED: u32 = 0x811c_9dc5;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The flow hash of an Ethernet frame (untagged or with one VLAN tag).
pub(crate) fn flow_hash(frame: &[u8]) -> u32 {
    let macs = || fnv(frame.get(..12).unwrap_or(frame), FNV_SEED);
    let (ethertype, l3) = match frame.get(12..14) {
        Some([0x81, 0x00]) => (frame.get(16..18), 18),
        other => (other, 14),
    };
    let Some(l3_frame) = frame.get(l3..) else {
        return macs();
    };
    let (addrs, proto, l4) = match ethertype {
        Some([0x08, 0x00]) if l3_frame.len() >= 20 => {
            let ihl = usize::from(l3_frame[0] & 0x0f) * 4;
            // Later fragments have no ports; the first has them but its siblings do not, so
            // a fragmented datagram hashes on addresses alone.
            let fragmented = u16::from_be_bytes([l3_frame[6], l3_frame[7]]) & 0x3fff != 0;
            let proto = if fragmented { 0 } else { l3_frame[9] };
            (&l3_frame[12..20], proto, ihl)
        }
        Some([0x86, 0xdd]) if l3_frame.len() >= 40 => (&l3_frame[8..40], l3_frame[6], 40),
        _ => return macs(),
    };
    let h = fnv(addrs, FNV_SEED);
    match (proto, l3_frame.get(l4..l4 + 4)) {
        (IPPROTO_TCP | IPPROTO_UDP, Some(ports)) => fnv(ports, fnv(&[proto], h)),
        _ => h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(src_port: u16, payload: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + 4];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 9] = IPPROTO_TCP;
        f[14 + 12..14 + 20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        f[34..36].copy_from_slice(&src_port.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[54] = payload;
        f
    }

    #[test]
    fn one_flow_hashes_alike_and_flows_spread() {
        assert_eq!(flow_hash(&tcp4(1000, 1)), flow_hash(&tcp4(1000, 2)));
        let queues: std::collections::HashSet<u32> =
            (0..64).map(|p| flow_hash(&tcp4(1000 + p, 0)) % 4).collect();
        assert_eq!(queues.len(), 4, "64 flows over 4 queues left one empty");
        // Anything short or odd still hashes, without panicking.
        let f = tcp4(1, 0);
        for len in 0..f.len() {
            let _ = flow_hash(&f[..len]);
        }
    }
}
