//! Port ACLs compiled per port and direction into priority-sorted match structs, with an
//! exact-match verdict cache (the idea of OVS's EMC: most frames belong to a few flows, so a
//! hash probe replaces a scan of a hundred rules) and a connection table for stateful rules.

use std::collections::HashMap;
use std::net::IpAddr;

use rustc_hash::FxBuildHasher;

use crate::config::{AclAction, AclRule, Direction, IpPrefix, PortRange};
use crate::frame::{FrameSummary, Mac, L3};
use crate::meter::Counter;

/// Verdict cache slots per port (direct-mapped).
const CACHE_SLOTS: usize = 1024;
/// Tracked flows per port for stateful rules.
const MAX_FLOWS: usize = 65536;
/// How long a stateful flow stays open without traffic.
const FLOW_IDLE_NS: u64 = 300 * 1_000_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Prefix {
    v6: bool,
    net: u128,
    mask: u128,
}

impl Prefix {
    fn new(p: &IpPrefix) -> Self {
        let (v6, addr, bits) = match p.addr {
            IpAddr::V4(a) => (false, u32::from(a) as u128, 32u32),
            IpAddr::V6(a) => (true, u128::from(a), 128u32),
        };
        let len = p.len as u32;
        // Prefix bits at the top of a 128-bit word, then moved down to the family's width.
        let mask = if len == 0 {
            0
        } else {
            (u128::MAX << (128 - len)) >> (128 - bits)
        };
        Prefix {
            v6,
            net: addr & mask,
            mask,
        }
    }
    #[inline]
    fn matches(&self, v6: bool, a: u128) -> bool {
        self.v6 == v6 && a & self.mask == self.net
    }
}

#[derive(Clone, Debug)]
struct Rule {
    /// Index in the port's configuration (and its meter counter).
    idx: u16,
    action: AclAction,
    stateful: bool,
    local_mac: Option<Mac>,
    remote_mac: Option<Mac>,
    local_ip: Option<Prefix>,
    remote_ip: Option<Prefix>,
    proto: Option<u8>,
    lports: Option<PortRange>,
    rports: Option<PortRange>,
}

/// The fields of a frame an ACL looks at, oriented to the port (local/remote).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
struct View {
    ip: u8, // 0 none, 4, 6
    local_ip: u128,
    remote_ip: u128,
    local_mac: Mac,
    remote_mac: Mac,
    proto: u8,
    has_ports: bool,
    lport: u16,
    rport: u16,
}

fn view(s: &FrameSummary, dir: Direction) -> View {
    let ip = match s.l3 {
        L3::Ipv4 => 4,
        L3::Ipv6 => 6,
        _ => 0,
    };
    let (lip, rip, lmac, rmac, lp, rp) = if dir == Direction::Ingress {
        (s.src_ip, s.dst_ip, s.src, s.dst, s.sport, s.dport)
    } else {
        (s.dst_ip, s.src_ip, s.dst, s.src, s.dport, s.sport)
    };
    let has_ports = s.has_l4;
    View {
        ip,
        local_ip: if ip != 0 { lip } else { 0 },
        remote_ip: if ip != 0 { rip } else { 0 },
        local_mac: lmac,
        remote_mac: rmac,
        proto: if ip != 0 { s.proto } else { 0 },
        has_ports,
        lport: if has_ports { lp } else { 0 },
        rport: if has_ports { rp } else { 0 },
    }
}

impl Rule {
    /// Cheapest and most selective tests first: protocol, ports, then addresses.
    #[inline]
    fn matches(&self, v: &View) -> bool {
        if let Some(p) = self.proto {
            if v.ip == 0 || p != v.proto {
                return false;
            }
        }
        if let Some(r) = &self.lports {
            if !v.has_ports || v.lport < r.first || v.lport > r.last {
                return false;
            }
        }
        if let Some(r) = &self.rports {
            if !v.has_ports || v.rport < r.first || v.rport > r.last {
                return false;
            }
        }
        let v6 = v.ip == 6;
        if let Some(p) = &self.remote_ip {
            if v.ip == 0 || !p.matches(v6, v.remote_ip) {
                return false;
            }
        }
        if let Some(p) = &self.local_ip {
            if v.ip == 0 || !p.matches(v6, v.local_ip) {
                return false;
            }
        }
        if let Some(m) = &self.local_mac {
            if *m != v.local_mac {
                return false;
            }
        }
        if let Some(m) = &self.remote_mac {
            if *m != v.remote_mac {
                return false;
            }
        }
        true
    }
}

/// A [`View`] packed into words: cheap to hash and compare in the verdict cache.
type CacheKey = [u64; 7];

#[inline]
fn cache_key(v: &View, dir: Direction) -> CacheKey {
    let mac48 = |m: &Mac| u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0]);
    [
        (v.local_ip >> 64) as u64,
        v.local_ip as u64,
        (v.remote_ip >> 64) as u64,
        v.remote_ip as u64,
        mac48(&v.local_mac) | (v.lport as u64) << 48,
        mac48(&v.remote_mac) | (v.rport as u64) << 48,
        v.ip as u64
            | (v.proto as u64) << 8
            | (v.has_ports as u64) << 16
            | ((dir == Direction::Ingress) as u64) << 24,
    ]
}

#[inline]
fn cache_slot(k: &CacheKey) -> usize {
    let mut h: u64 = 0;
    for w in k {
        h = (h.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    // Multiplication only carries differences upwards; fold the high half back down.
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h as usize & (CACHE_SLOTS - 1)
}

#[derive(Clone, Copy, Debug, Default)]
struct CacheSlot {
    key: CacheKey,
    valid: bool,
    allow: bool,
    track: bool,
    /// Bit i set: rule with config index i matched (and is counted).
    counted: u128,
    /// In the first slot of a pair: which way the next fill replaces.
    recent: bool,
}

#[inline]
fn same_key(a: &CacheKey, b: &CacheKey) -> bool {
    a.iter().zip(b).fold(0, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    local_ip: u128,
    remote_ip: u128,
    lport: u16,
    rport: u16,
}

/// A port's ACLs, ready for the pipeline.
#[derive(Debug, Default)]
pub struct PortAcl {
    ingress: Vec<Rule>,
    egress: Vec<Rule>,
    cache: Vec<CacheSlot>,
    cacheable: bool,
    flows: HashMap<FlowKey, u64, FxBuildHasher>,
    last_sweep: u64,
}

/// The ACL decision for one frame in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AclVerdict {
    Allow,
    Deny,
}

impl PortAcl {
    pub fn compile(rules: &[AclRule]) -> Self {
        let mut all: Vec<(u16, usize, &AclRule)> = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (r.priority, i, r))
            .collect();
        all.sort_by_key(|(p, i, _)| (*p, *i));
        let mut acl = PortAcl {
            cacheable: rules.len() <= 128,
            ..Default::default()
        };
        for (_, i, r) in all {
            let rule = Rule {
                idx: i as u16,
                action: r.action,
                stateful: r.stateful && r.action == AclAction::Allow,
                local_mac: r.local_mac.map(|m| m.0),
                remote_mac: r.remote_mac.map(|m| m.0),
                local_ip: r.local_ip.as_ref().map(Prefix::new),
                remote_ip: r.remote_ip.as_ref().map(Prefix::new),
                proto: r.protocol,
                lports: r.local_ports,
                rports: r.remote_ports,
            };
            if r.direction.covers(Direction::Ingress) {
                acl.ingress.push(rule.clone());
            }
            if r.direction.covers(Direction::Egress) {
                acl.egress.push(rule);
            }
        }
        acl
    }

    pub fn is_empty(&self) -> bool {
        self.ingress.is_empty() && self.egress.is_empty()
    }

    fn scan(
        &self,
        dir: Direction,
        v: &View,
        meters: &mut [Counter],
        len: usize,
    ) -> (bool, bool, u128) {
        let rules = if dir == Direction::Ingress {
            &self.ingress
        } else {
            &self.egress
        };
        let mut counted = 0u128;
        for r in rules {
            if !r.matches(v) {
                continue;
            }
            if let Some(m) = meters.get_mut(r.idx as usize) {
                m.add(len);
            }
            if r.idx < 128 {
                counted |= 1 << r.idx;
            }
            match r.action {
                AclAction::Meter => continue,
                AclAction::Allow => return (true, r.stateful, counted),
                AclAction::Deny => return (false, false, counted),
            }
        }
        (true, false, counted)
    }

    /// Decides one frame, counting every matching rule in `meters` (indexed like the config).
    pub fn evaluate(
        &mut self,
        dir: Direction,
        s: &FrameSummary,
        len: usize,
        now: u64,
        meters: &mut [Counter],
    ) -> AclVerdict {
        let rules = if dir == Direction::Ingress {
            &self.ingress
        } else {
            &self.egress
        };
        if rules.is_empty() && self.flows.is_empty() {
            return AclVerdict::Allow;
        }
        let v = view(s, dir);
        if dir == Direction::Egress && !self.flows.is_empty() && v.ip != 0 {
            let k = FlowKey {
                proto: v.proto,
                local_ip: v.local_ip,
                remote_ip: v.remote_ip,
                lport: v.lport,
                rport: v.rport,
            };
            if let Some(exp) = self.flows.get(&k) {
                if *exp >= now {
                    return AclVerdict::Allow;
                }
            }
        }
        let (allow, track) = if self.cacheable {
            if self.cache.is_empty() {
                self.cache = vec![CacheSlot::default(); CACHE_SLOTS];
            }
            let key = cache_key(&v, dir);
            // Two-way set associative: a flow lives in either slot of its pair, so two hot
            // flows hashing alike do not evict each other on every frame.
            let set = cache_slot(&key) & !1;
            let hit = (set..set + 2)
                .find(|i| self.cache[*i].valid && same_key(&self.cache[*i].key, &key));
            if let Some(i) = hit {
                let c = &self.cache[i];
                let mut bits = c.counted;
                while bits != 0 {
                    let i = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if let Some(m) = meters.get_mut(i) {
                        m.add(len);
                    }
                }
                (c.allow, c.track)
            } else {
                let (allow, track, counted) = self.scan(dir, &v, meters, len);
                // Replace the way not used last; `recent` alternates on each fill.
                let way = set + self.cache[set].recent as usize;
                self.cache[set].recent = !self.cache[set].recent;
                let recent = self.cache[way].recent;
                self.cache[way] = CacheSlot {
                    key,
                    valid: true,
                    allow,
                    track,
                    counted,
                    recent,
                };
                (allow, track)
            }
        } else {
            let (a, t, _) = self.scan(dir, &v, meters, len);
            (a, t)
        };
        if track && v.ip != 0 {
            self.track(&v, now);
        }
        if allow {
            AclVerdict::Allow
        } else {
            AclVerdict::Deny
        }
    }

    /// Remembers a flow opened from the port, keyed as its replies will look (egress view).
    fn track(&mut self, v: &View, now: u64) {
        let k = FlowKey {
            proto: v.proto,
            local_ip: v.local_ip,
            remote_ip: v.remote_ip,
            lport: v.lport,
            rport: v.rport,
        };
        let exp = now.saturating_add(FLOW_IDLE_NS);
        if let Some(e) = self.flows.get_mut(&k) {
            *e = exp;
            return;
        }
        if self.flows.len() >= MAX_FLOWS {
            // Sweep at most once a second: a guest opening flows as fast as it can must not make
            // every frame pay for a scan of the whole table.
            if now.saturating_sub(self.last_sweep) >= 1_000_000_000 {
                self.last_sweep = now;
                self.flows.retain(|_, e| *e >= now);
            }
            if self.flows.len() >= MAX_FLOWS {
                return;
            }
        }
        self.flows.insert(k, exp);
    }

    /// Counts traffic the kernel forwarded for one connection this ACL allowed (the fast
    /// path's flows through ACL ports are single connections): `packets` frames, `bytes` in
    /// all, against every rule a frame `s` of it matches, as the pipeline would have, and
    /// keeps a stateful rule's connection open while the kernel carries it (only with `now`:
    /// a flow's last counters, read when it is removed, leave the table alone).
    pub fn account_offloaded(
        &mut self,
        dir: Direction,
        s: &FrameSummary,
        packets: u64,
        bytes: u64,
        now: Option<u64>,
        meters: &mut [Counter],
    ) {
        let v = view(s, dir);
        if dir == Direction::Egress && v.ip != 0 {
            let k = FlowKey {
                proto: v.proto,
                local_ip: v.local_ip,
                remote_ip: v.remote_ip,
                lport: v.lport,
                rport: v.rport,
            };
            // A reply of a tracked connection: allowed without counting any rule.
            if self
                .flows
                .get(&k)
                .is_some_and(|exp| now.is_none_or(|n| *exp >= n))
            {
                return;
            }
        }
        let rules = if dir == Direction::Ingress {
            &self.ingress
        } else {
            &self.egress
        };
        let mut track = false;
        for r in rules.iter().filter(|r| r.matches(&v)) {
            if let Some(m) = meters.get_mut(r.idx as usize) {
                m.packets += packets;
                m.bytes += bytes;
            }
            match r.action {
                AclAction::Meter => continue,
                AclAction::Allow => track = r.stateful,
                AclAction::Deny => {}
            }
            break;
        }
        if let Some(now) = now.filter(|_| track && v.ip != 0) {
            self.track(&v, now);
        }
    }

    pub fn tracked_flows(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_masks() {
        let p = Prefix::new(&"10.1.0.0/16".parse().unwrap());
        assert!(p.matches(false, 0x0a01_ff01));
        assert!(!p.matches(false, 0x0a02_0001));
        assert!(!p.matches(true, 0x0a01_0001));
        let any = Prefix::new(&"0.0.0.0/0".parse().unwrap());
        assert!(any.matches(false, 0xdead_beef));
        let p6 = Prefix::new(&"fd00::/8".parse().unwrap());
        assert!(p6.matches(true, 0xfd00u128 << 112 | 5));
        assert!(!p6.matches(true, 0xfe80u128 << 112));
        let host = Prefix::new(&"10.0.0.1".parse().unwrap());
        assert!(host.matches(false, 0x0a00_0001) && !host.matches(false, 0x0a00_0002));
    }
}
