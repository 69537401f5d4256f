//! Which member sends a frame. Pure: member eligibility and the clock come from the caller.
//! Address hashes are stateless; Hyper-V port pins each source MAC (a VM adapter) to a member;
//! dynamic cuts each L4 flow into flowlets at idle gaps and sends each new flowlet to the
//! member with the least recent load, so a long flow moves only where reordering cannot
//! happen (the gap is longer than the members' delay skew).

use vireo_netconfig::Distribution;

use crate::frame::{parse, FrameSummary};

/// Flowlet table slots (direct-mapped by flow hash; a collision only makes a flowlet start
/// early, never reorders more than a hash would).
const FLOWLET_SLOTS: usize = 4096;
/// Hyper-V port assignments remembered (source MACs); beyond it the least used is replaced.
const PORT_SLOTS: usize = 4096;
/// Load decays by half every this many ns, so "least loaded" means recently.
const LOAD_HALF_LIFE_NS: u64 = 10_000_000;

fn mix(mut h: u64) -> u64 {
    // splitmix64 finaliser: spreads the few differing bits of addresses and ports.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn mac_u64(m: &[u8; 6]) -> u64 {
    m.iter().fold(0u64, |a, b| a << 8 | *b as u64)
}

/// Symmetric hashes (both directions of a conversation give the same value).
pub fn hash(s: &FrameSummary, level: Distribution) -> u64 {
    let l2 = mac_u64(&s.src) ^ mac_u64(&s.dst);
    let ip = matches!(s.l3, crate::frame::L3::Ipv4 | crate::frame::L3::Ipv6);
    let l3 = || {
        let a = s.src_ip ^ s.dst_ip;
        (a as u64) ^ ((a >> 64) as u64) ^ ((s.proto as u64) << 56)
    };
    match level {
        Distribution::AddressHashL2 | Distribution::HyperVPort => mix(l2),
        Distribution::AddressHashL3 if ip => mix(l3()),
        Distribution::AddressHashL4 | Distribution::Dynamic if ip && s.has_l4 => {
            mix(l3() ^ ((s.sport ^ s.dport) as u64) << 32)
        }
        Distribution::AddressHashL4 | Distribution::Dynamic if ip => mix(l3()),
        _ => mix(l2),
    }
}

#[derive(Clone, Copy, Default)]
struct Flowlet {
    hash: u64,
    member: usize,
    last_ns: u64,
}

pub struct Distributor {
    pub mode: Distribution,
    gap_ns: u64,
    flowlets: Vec<Flowlet>,
    ports: Vec<([u8; 6], usize, u64)>,
    /// Decaying bytes per member (index = member).
    load: Vec<f64>,
    load_at: u64,
    /// Flowlets that went to a different member than the flow's previous flowlet.
    pub flowlet_moves: u64,
    pub flowlets_started: u64,
}

impl Distributor {
    pub fn new(mode: Distribution, members: usize, gap_us: u32) -> Self {
        Distributor {
            mode,
            gap_ns: gap_us as u64 * 1000,
            flowlets: if mode == Distribution::Dynamic {
                vec![Flowlet::default(); FLOWLET_SLOTS]
            } else {
                Vec::new()
            },
            ports: Vec::new(),
            load: vec![0.0; members],
            load_at: 0,
            flowlet_moves: 0,
            flowlets_started: 0,
        }
    }

    fn decay(&mut self, now: u64) {
        let dt = now.saturating_sub(self.load_at);
        if dt >= LOAD_HALF_LIFE_NS / 8 {
            let f = 0.5f64.powf(dt as f64 / LOAD_HALF_LIFE_NS as f64);
            for l in &mut self.load {
                *l *= f;
            }
            self.load_at = now;
        }
    }

    fn least_loaded(&self, eligible: &[usize]) -> usize {
        *eligible
            .iter()
            .min_by(|a, b| self.load[**a].total_cmp(&self.load[**b]))
            .expect("caller passes at least one member")
    }

    /// The member (an index into the team, one of `eligible`, which must not be empty) for
    /// `frame`. Frames that do not parse go by their first 12 bytes (MACs).
    pub fn pick(&mut self, frame: &[u8], eligible: &[usize], now: u64) -> usize {
        let s = parse(frame).unwrap_or_else(|_| {
            let mut s = FrameSummary::default();
            if frame.len() >= 12 {
                s.dst.copy_from_slice(&frame[0..6]);
                s.src.copy_from_slice(&frame[6..12]);
            }
            s
        });
        self.decay(now);
        let h = hash(&s, self.mode);
        let m = match self.mode {
            Distribution::Dynamic => self.pick_flowlet(h, eligible, now),
            Distribution::HyperVPort => self.pick_port(s.src, eligible, now),
            _ => eligible[(h % eligible.len() as u64) as usize],
        };
        self.load[m] += frame.len() as f64;
        m
    }

    fn pick_flowlet(&mut self, h: u64, eligible: &[usize], now: u64) -> usize {
        let slot = (h as usize) % FLOWLET_SLOTS;
        let f = self.flowlets[slot];
        let same_flow = f.hash == h && f.last_ns != 0;
        let m = if same_flow
            && now.saturating_sub(f.last_ns) < self.gap_ns
            && eligible.contains(&f.member)
        {
            f.member
        } else {
            self.flowlets_started += 1;
            let m = self.least_loaded(eligible);
            if same_flow && m != f.member {
                self.flowlet_moves += 1;
            }
            m
        };
        self.flowlets[slot] = Flowlet {
            hash: h,
            member: m,
            last_ns: now.max(1),
        };
        m
    }

    fn pick_port(&mut self, src: [u8; 6], eligible: &[usize], now: u64) -> usize {
        if let Some(e) = self.ports.iter_mut().find(|e| e.0 == src) {
            if eligible.contains(&e.1) {
                e.2 = now;
                return e.1;
            }
        }
        // New VM adapter (or its member failed): the member with the fewest adapters.
        let m = *eligible
            .iter()
            .min_by_key(|m| self.ports.iter().filter(|e| e.1 == **m).count())
            .expect("caller passes at least one member");
        if let Some(e) = self.ports.iter_mut().find(|e| e.0 == src) {
            *e = (src, m, now);
        } else if self.ports.len() < PORT_SLOTS {
            self.ports.push((src, m, now));
        } else if let Some(e) = self.ports.iter_mut().min_by_key(|e| e.2) {
            *e = (src, m, now);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(sport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 64];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&50u16.to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&5201u16.to_be_bytes());
        f[46] = 0x50;
        f
    }

    #[test]
    fn l4_hash_spreads_flows_and_keeps_each_on_one_member() {
        let mut d = Distributor::new(Distribution::AddressHashL4, 2, 500);
        let mut used = [0u32; 2];
        for p in 0..64u16 {
            let m = d.pick(&tcp(40000 + p), &[0, 1], 0);
            assert_eq!(d.pick(&tcp(40000 + p), &[0, 1], 1), m);
            used[m] += 1;
        }
        assert!(used[0] > 10 && used[1] > 10, "{used:?}");
        // L2 hashing puts all of them on one member.
        let mut d = Distributor::new(Distribution::AddressHashL2, 2, 500);
        let m = d.pick(&tcp(1), &[0, 1], 0);
        assert!((0..64).all(|p| d.pick(&tcp(p), &[0, 1], 0) == m));
    }

    #[test]
    fn failed_member_traffic_moves_to_the_rest() {
        for mode in [
            Distribution::AddressHashL4,
            Distribution::HyperVPort,
            Distribution::Dynamic,
        ] {
            let mut d = Distributor::new(mode, 3, 500);
            for p in 0..32 {
                assert_ne!(d.pick(&tcp(p), &[0, 2], p as u64), 1, "{mode:?}");
            }
        }
    }

    #[test]
    fn dynamic_moves_flowlets_only_after_a_gap() {
        let mut d = Distributor::new(Distribution::Dynamic, 2, 500);
        let gap = 500_000;
        // Two flows back to back share the load: each gets its own member.
        let a = d.pick(&tcp(1), &[0, 1], 1);
        let b = d.pick(&tcp(2), &[0, 1], 2);
        assert_ne!(a, b);
        // A burst of flow 1 stays put however loaded its member gets.
        for t in 0..100u64 {
            assert_eq!(d.pick(&tcp(1), &[0, 1], 3 + t * 1000), a);
        }
        assert_eq!(d.flowlet_moves, 0);
        // Flow 2 keeps sending; flow 1 pauses longer than the gap. Its member is the busier
        // one now; the next burst still starts a flowlet (counted) and goes least-loaded.
        let t = 200_000 + gap;
        let before = d.flowlets_started;
        let _ = d.pick(&tcp(1), &[0, 1], t);
        assert_eq!(d.flowlets_started, before + 1);
        // Make member `a` idle and `b` busy: flow 2's next flowlet moves to `a`.
        for i in 0..200u64 {
            let _ = d.pick(&tcp(2), &[b], t + 1 + i);
        }
        let moved = d.pick(&tcp(2), &[0, 1], t + 10 * gap);
        assert_eq!(moved, a);
        assert!(d.flowlet_moves >= 1);
    }

    #[test]
    fn hyperv_port_pins_source_macs() {
        let mut d = Distributor::new(Distribution::HyperVPort, 2, 500);
        let mut f1 = tcp(1);
        let mut f2 = tcp(1);
        f1[11] = 0x11;
        f2[11] = 0x22;
        let m1 = d.pick(&f1, &[0, 1], 0);
        let m2 = d.pick(&f2, &[0, 1], 0);
        assert_ne!(m1, m2, "two adapters on two members");
        for p in 0..20 {
            let mut f = tcp(p);
            f[11] = 0x11;
            assert_eq!(d.pick(&f, &[0, 1], 1), m1);
        }
    }
}
