//! The overlay's gateway role (issue 11, item 5): this host connects routing domains to a
//! physical network on its uplink, untagged or on a VLAN. A `forward` gateway routes one
//! domain's customer addresses as they are (the physical network routes the CA prefixes to
//! the gateway's address); a `nat` gateway lets the CAs of one or more domains share the
//! gateway's address (source NAT with port translation). IPv4 only for now.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};

use crate::{IpPrefix, MacAddr};

/// How a gateway carries a routing domain's traffic to the physical network.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GatewayMode {
    /// Routed as it is: the CAs are visible on the physical network (one domain only, since
    /// two domains may use the same CAs).
    #[default]
    Forward,
    /// Source NAT to the gateway's address, ports (and ICMP echo ids) translated.
    Nat,
}

impl std::fmt::Display for GatewayMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            GatewayMode::Forward => "forward",
            GatewayMode::Nat => "nat",
        })
    }
}

/// Limits of a NAT gateway's connection table. Timeouts follow RFC 5382 (TCP established
/// ≥ 2 h 4 min, transitory 4 min) and RFC 4787 (UDP ≥ 2 min), ICMP echo 60 s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatSettings {
    /// Outside ports (and echo ids) handed out, inclusive.
    #[serde(default = "default_port_min")]
    pub port_min: u16,
    #[serde(default = "default_port_max")]
    pub port_max: u16,
    /// Connections remembered at most; a new one beyond it is dropped (`nat_table_full`).
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    #[serde(default = "default_tcp_established")]
    pub tcp_established_secs: u32,
    /// After a FIN or RST was seen.
    #[serde(default = "default_tcp_transitory")]
    pub tcp_transitory_secs: u32,
    #[serde(default = "default_udp")]
    pub udp_secs: u32,
    #[serde(default = "default_icmp")]
    pub icmp_secs: u32,
}

fn default_port_min() -> u16 {
    20000
}
fn default_port_max() -> u16 {
    59999
}
fn default_max_connections() -> u32 {
    16384
}
fn default_tcp_established() -> u32 {
    7440
}
fn default_tcp_transitory() -> u32 {
    240
}
fn default_udp() -> u32 {
    300
}
fn default_icmp() -> u32 {
    60
}

impl Default for NatSettings {
    fn default() -> Self {
        NatSettings {
            port_min: default_port_min(),
            port_max: default_port_max(),
            max_connections: default_max_connections(),
            tcp_established_secs: default_tcp_established(),
            tcp_transitory_secs: default_tcp_transitory(),
            udp_secs: default_udp(),
            icmp_secs: default_icmp(),
        }
    }
}

/// One gateway between routing domains and a physical network on the uplink.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayConfig {
    pub name: String,
    #[serde(default)]
    pub mode: GatewayMode,
    /// The routing domains it serves (exactly one for `forward`).
    pub routing_domains: Vec<String>,
    /// The physical network's VLAN on the uplink; none for untagged.
    #[serde(default)]
    pub vlan: Option<u16>,
    /// The gateway's own address and the physical network's on-link prefix, e.g.
    /// `198.51.100.1/24`. ARP for it is answered on that VLAN; NAT translates to it.
    pub address: IpPrefix,
    /// Router for destinations outside `address`'s prefix; without one they are unreachable.
    #[serde(default)]
    pub next_hop: Option<IpAddr>,
    /// The gateway's MAC on the physical network (default `02:fe:` + the address's bytes).
    #[serde(default)]
    pub mac: Option<MacAddr>,
    #[serde(default)]
    pub nat: NatSettings,
    /// An IPv6 address and on-link prefix of the gateway (`forward` only), e.g.
    /// `2001:db8:30::1/64`: the domain's IPv6 CAs are routed to the physical network as they
    /// are. Neighbour solicitations for it are answered on the VLAN; next hops are resolved
    /// by neighbour discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address6: Option<IpPrefix>,
    /// IPv6 router for destinations outside `address6`'s prefix (on that prefix, or
    /// link-local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop6: Option<IpAddr>,
}

impl GatewayConfig {
    /// The gateway's IPv4 address (validated configurations only have IPv4).
    pub fn ipv4(&self) -> Ipv4Addr {
        match self.address.addr {
            IpAddr::V4(a) => a,
            IpAddr::V6(_) => Ipv4Addr::UNSPECIFIED,
        }
    }

    /// The gateway's IPv6 address, if it routes IPv6.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        match self.address6.map(|p| p.addr) {
            Some(IpAddr::V6(a)) => Some(a),
            _ => None,
        }
    }

    /// True when `ip` is on the physical network's IPv6 on-link prefix.
    pub fn on_link6(&self, ip: Ipv6Addr) -> bool {
        let Some(p) = self.address6 else {
            return false;
        };
        let IpAddr::V6(a) = p.addr else {
            return false;
        };
        let len = u32::from(p.len.min(128));
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        u128::from(ip) & mask == u128::from(a) & mask
    }

    fn validate6(&self, pas: &[IpAddr]) -> Result<(), String> {
        let n = &self.name;
        let Some(p) = self.address6 else {
            return match self.next_hop6 {
                Some(h) => Err(format!(
                    "gateway {n:?}: next_hop6 {h} needs an address6 (the gateway's IPv6 address)"
                )),
                None => Ok(()),
            };
        };
        let IpAddr::V6(a) = p.addr else {
            return Err(format!("gateway {n:?}: address6 {p} is not an IPv6 prefix"));
        };
        if self.mode != GatewayMode::Forward {
            return Err(format!(
                "gateway {n:?}: address6 needs mode forward (NAT66/NAT64 are not built)"
            ));
        }
        if !(1..=127).contains(&p.len) {
            return Err(format!(
                "gateway {n:?}: prefix length of {p} must be 1..=127 (the physical network's on-link prefix)"
            ));
        }
        if a.is_unspecified()
            || a.is_multicast()
            || a.is_loopback()
            || a.segments()[0] & 0xffc0 == 0xfe80
        {
            return Err(format!(
                "gateway {n:?}: address6 {a} is not a global or unique-local unicast address"
            ));
        }
        if pas.contains(&IpAddr::V6(a)) {
            return Err(format!(
                "gateway {n:?}: address6 {a} is a provider address of this switch; use another"
            ));
        }
        match self.next_hop6 {
            Some(IpAddr::V6(h))
                if h != a
                    && !h.is_multicast()
                    && (self.on_link6(h) || h.segments()[0] & 0xffc0 == 0xfe80) => {}
            Some(h) => {
                return Err(format!(
                    "gateway {n:?}: next_hop6 {h} must be another IPv6 address inside {p} or a link-local one"
                ))
            }
            None => {}
        }
        Ok(())
    }

    /// The MAC in force.
    pub fn gateway_mac(&self) -> MacAddr {
        self.mac.unwrap_or_else(|| {
            let o = self.ipv4().octets();
            MacAddr([0x02, 0xfe, o[0], o[1], o[2], o[3]])
        })
    }

    /// True when `ip` is on the physical network's on-link prefix.
    pub fn on_link(&self, ip: Ipv4Addr) -> bool {
        let len = u32::from(self.address.len);
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        u32::from(ip) & mask == u32::from(self.ipv4()) & mask
    }

    /// Checks the gateway on its own; `domains` are the overlay's routing domain names,
    /// `pas` its provider addresses.
    pub fn validate(&self, domains: &[&str], pas: &[IpAddr]) -> Result<(), String> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 32
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "gateway name {n:?} must be 1-32 letters, digits, '-' or '_'"
            ));
        }
        let IpAddr::V4(a) = self.address.addr else {
            return Err(format!(
                "gateway {n:?}: address {} is IPv6; only IPv4 gateways are built",
                self.address
            ));
        };
        if !(1..=30).contains(&self.address.len) {
            return Err(format!(
                "gateway {n:?}: prefix length of {} must be 1..=30 (the physical network's on-link prefix)",
                self.address
            ));
        }
        if a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback() {
            return Err(format!(
                "gateway {n:?}: address {a} is not a unicast address"
            ));
        }
        if pas.contains(&IpAddr::V4(a)) {
            return Err(format!(
                "gateway {n:?}: address {a} is a provider address of this switch; use another"
            ));
        }
        if let Some(v) = self.vlan {
            if !(1..=4094).contains(&v) {
                return Err(format!("gateway {n:?}: VLAN {v} is outside 1..=4094"));
            }
        }
        match self.next_hop {
            Some(IpAddr::V4(h)) if self.on_link(h) && h != a => {}
            Some(h) => {
                return Err(format!(
                    "gateway {n:?}: next hop {h} must be another IPv4 address inside {}",
                    self.address
                ))
            }
            None => {}
        }
        self.validate6(pas)?;
        let m = self.gateway_mac();
        if m.0[0] & 1 == 1 || m.0 == [0; 6] {
            return Err(format!("gateway {n:?}: MAC {m} is not a unicast address"));
        }
        if self.routing_domains.is_empty() {
            return Err(format!("gateway {n:?} serves no routing domain"));
        }
        for d in &self.routing_domains {
            if !domains.contains(&d.as_str()) {
                return Err(format!("gateway {n:?}: no routing domain {d:?}"));
            }
        }
        if self.mode == GatewayMode::Forward && self.routing_domains.len() != 1 {
            return Err(format!(
                "gateway {n:?}: a forward gateway serves exactly one routing domain (tenants may share CAs); use mode nat for several"
            ));
        }
        let s = &self.nat;
        if s.port_min == 0 || s.port_min > s.port_max {
            return Err(format!(
                "gateway {n:?}: NAT port range {}-{} is empty or starts at 0",
                s.port_min, s.port_max
            ));
        }
        if !(1..=1_000_000).contains(&s.max_connections) {
            return Err(format!(
                "gateway {n:?}: NAT max_connections {} is outside 1..=1000000",
                s.max_connections
            ));
        }
        for (what, v) in [
            ("tcp_established_secs", s.tcp_established_secs),
            ("tcp_transitory_secs", s.tcp_transitory_secs),
            ("udp_secs", s.udp_secs),
            ("icmp_secs", s.icmp_secs),
        ] {
            if !(1..=86400).contains(&v) {
                return Err(format!(
                    "gateway {n:?}: NAT {what} {v} is outside 1..=86400"
                ));
            }
        }
        Ok(())
    }
}

/// One live NAT connection, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatConnection {
    pub routing_domain: String,
    /// IP protocol number (1 ICMP echo, 6 TCP, 17 UDP).
    pub proto: u8,
    pub ca: Ipv4Addr,
    /// The CA's port (or ICMP echo id).
    pub port: u16,
    pub peer: Ipv4Addr,
    pub peer_port: u16,
    /// The port (or echo id) it has at the gateway's address.
    pub outside_port: u16,
    /// Seconds since its last packet (as of the switch's last frame).
    pub idle_secs: u64,
}

/// A gateway as the switch runs it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatus {
    pub config: GatewayConfig,
    /// The MAC in force.
    pub mac: MacAddr,
    /// Physical-side neighbours resolved on its VLAN.
    pub neighbors: usize,
    /// Live NAT connections (`nat` mode; empty for `forward`).
    pub connections: Vec<NatConnection>,
}

/// Checks a switch's gateways together: each valid, names unique, a routing domain served by
/// one gateway at most, no two gateways with one address or MAC on one VLAN.
pub fn validate_gateways(
    gws: &[GatewayConfig],
    domains: &[&str],
    pas: &[IpAddr],
) -> Result<(), String> {
    let (mut names, mut served, mut addrs, mut macs) = (
        HashSet::new(),
        HashSet::new(),
        HashSet::new(),
        HashSet::new(),
    );
    for g in gws {
        g.validate(domains, pas)?;
        if !names.insert(g.name.as_str()) {
            return Err(format!("gateway {:?} is defined twice", g.name));
        }
        for d in &g.routing_domains {
            if !served.insert(d.as_str()) {
                return Err(format!(
                    "routing domain {d:?} is served by two gateways; a domain has one way out"
                ));
            }
        }
        if !addrs.insert((g.vlan, g.ipv4())) {
            return Err(format!(
                "gateway {:?}: address {} is already another gateway's on that VLAN",
                g.name,
                g.ipv4()
            ));
        }
        if !macs.insert((g.vlan, g.gateway_mac())) {
            return Err(format!(
                "gateway {:?}: MAC {} is already another gateway's on that VLAN",
                g.name,
                g.gateway_mac()
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(name: &str, mode: GatewayMode, rds: &[&str], addr: &str) -> GatewayConfig {
        GatewayConfig {
            name: name.into(),
            mode,
            routing_domains: rds.iter().map(|s| s.to_string()).collect(),
            vlan: Some(30),
            address: addr.parse().unwrap(),
            next_hop: None,
            mac: None,
            nat: NatSettings::default(),
            address6: None,
            next_hop6: None,
        }
    }

    #[test]
    fn ipv6_forwarding_is_checked() {
        let mut g = gw("v6", GatewayMode::Forward, &["red"], "198.51.100.1/24");
        g.address6 = Some("2001:db8:30::1/64".parse().unwrap());
        g.next_hop6 = Some("2001:db8:30::fe".parse().unwrap());
        assert_eq!(g.validate(&["red"], &[]), Ok(()));
        assert!(g.on_link6("2001:db8:30::9".parse().unwrap()));
        assert!(!g.on_link6("2001:db8:31::9".parse().unwrap()));
        g.next_hop6 = Some("fe80::1".parse().unwrap());
        assert_eq!(g.validate(&["red"], &[]), Ok(()));
        for (addr6, hop, mode, want) in [
            (
                "2001:db8:30::1/64",
                "2001:db8:31::1",
                GatewayMode::Forward,
                "next_hop6",
            ),
            (
                "fe80::1/64",
                "fe80::2",
                GatewayMode::Forward,
                "not a global",
            ),
            (
                "2001:db8:30::1/128",
                "fe80::2",
                GatewayMode::Forward,
                "prefix length",
            ),
            (
                "198.51.100.5/24",
                "fe80::2",
                GatewayMode::Forward,
                "not an IPv6",
            ),
            ("2001:db8:30::1/64", "fe80::2", GatewayMode::Nat, "NAT66"),
        ] {
            let mut g = gw("v6", mode, &["red"], "198.51.100.1/24");
            g.address6 = Some(addr6.parse().unwrap());
            g.next_hop6 = Some(hop.parse().unwrap());
            let e = g.validate(&["red"], &[]).unwrap_err();
            assert!(e.contains(want), "{addr6} {hop}: {e}");
        }
        let mut g = gw("v6", GatewayMode::Forward, &["red"], "198.51.100.1/24");
        g.next_hop6 = Some("fe80::2".parse().unwrap());
        assert!(g
            .validate(&["red"], &[])
            .unwrap_err()
            .contains("needs an address6"));
    }

    #[test]
    fn defaults_and_round_trip() {
        let g: GatewayConfig = serde_json::from_str(
            r#"{"name":"out","routing_domains":["red"],"address":"198.51.100.1/24"}"#,
        )
        .unwrap();
        assert_eq!(g.mode, GatewayMode::Forward);
        assert_eq!(g.nat, NatSettings::default());
        assert_eq!(g.gateway_mac().to_string(), "02:fe:c6:33:64:01");
        assert!(g.on_link("198.51.100.77".parse().unwrap()));
        assert!(!g.on_link("198.51.101.1".parse().unwrap()));
        g.validate(&["red"], &[]).unwrap();
        let j = serde_json::to_string(&g).unwrap();
        assert_eq!(serde_json::from_str::<GatewayConfig>(&j).unwrap(), g);
    }

    #[test]
    fn bad_gateways_are_refused_by_name() {
        let d = ["red", "blue"];
        let g = gw(
            "f",
            GatewayMode::Forward,
            &["red", "blue"],
            "198.51.100.1/24",
        );
        assert!(g.validate(&d, &[]).unwrap_err().contains("exactly one"));
        let g = gw("f", GatewayMode::Nat, &["green"], "198.51.100.1/24");
        assert!(g.validate(&d, &[]).unwrap_err().contains("\"green\""));
        let g = gw("f", GatewayMode::Nat, &["red"], "2001:db8::1/64");
        assert!(g.validate(&d, &[]).unwrap_err().contains("IPv6"));
        let g = gw("f", GatewayMode::Nat, &["red"], "198.51.100.1/32");
        assert!(g.validate(&d, &[]).unwrap_err().contains("1..=30"));
        let pa: IpAddr = "198.51.100.1".parse().unwrap();
        let g = gw("f", GatewayMode::Nat, &["red"], "198.51.100.1/24");
        assert!(g.validate(&d, &[pa]).unwrap_err().contains("provider"));
        let mut g = gw("f", GatewayMode::Nat, &["red"], "198.51.100.1/24");
        g.next_hop = Some("203.0.113.1".parse().unwrap());
        assert!(g.validate(&d, &[]).unwrap_err().contains("203.0.113.1"));
        let mut g = gw("f", GatewayMode::Nat, &["red"], "198.51.100.1/24");
        g.nat.port_min = 5000;
        g.nat.port_max = 4000;
        assert!(g.validate(&d, &[]).unwrap_err().contains("5000-4000"));
        let a = gw("a", GatewayMode::Nat, &["red"], "198.51.100.1/24");
        let b = gw("b", GatewayMode::Forward, &["red"], "198.51.100.2/24");
        assert!(validate_gateways(&[a.clone(), b], &d, &[])
            .unwrap_err()
            .contains("two gateways"));
        let b = gw("b", GatewayMode::Forward, &["blue"], "198.51.100.1/24");
        assert!(validate_gateways(&[a, b], &d, &[])
            .unwrap_err()
            .contains("already another"));
    }
}
