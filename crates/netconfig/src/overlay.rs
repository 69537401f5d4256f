//! Network virtualization (issue 11): tenant routing domains made of virtual subnets (24-bit
//! VSIDs), customer addresses (CA) on VM ports, provider addresses (PA) on the uplink, and the
//! policy table mapping (routing domain, CA) → (PA, VSID, MAC). `OverlayConfig::validate`
//! refuses what the data path could not honour, naming the offending value.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{IpPrefix, MacAddr};

/// The largest VSID / VNI: 24 bits.
pub const MAX_VSID: u32 = 0x00ff_ffff;
/// The IANA VXLAN port (RFC 7348).
pub const VXLAN_PORT: u16 = 4789;

/// Tunnel encapsulation of one routing domain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encap {
    /// RFC 7348: outer IP / UDP 4789 / VXLAN header with VNI = VSID / inner Ethernet.
    #[default]
    Vxlan,
    /// RFC 7637: outer IP / GRE (key = VSID << 8 | flow id, protocol 0x6558) / inner Ethernet.
    Nvgre,
}

/// A virtual subnet of a routing domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualSubnet {
    /// 24-bit virtual subnet id (the VXLAN VNI / NVGRE VSID); unique on the switch.
    pub vsid: u32,
    /// Customer prefixes of the subnet (which CAs are on-link).
    #[serde(default)]
    pub prefixes: Vec<IpPrefix>,
    /// The distributed router's address in this subnet (the VMs' default gateway), answered
    /// by ARP/ND from the host. Without one, the subnet is not routed.
    #[serde(default)]
    pub gateway_ips: Vec<IpAddr>,
    /// The gateway's MAC (default `02:ff:` + the VSID's three bytes + `01`).
    #[serde(default)]
    pub gateway_mac: Option<MacAddr>,
}

impl VirtualSubnet {
    /// The gateway MAC in force.
    pub fn gateway_mac(&self) -> MacAddr {
        self.gateway_mac.unwrap_or_else(|| {
            let v = self.vsid.to_be_bytes();
            MacAddr([0x02, 0xff, v[1], v[2], v[3], 0x01])
        })
    }
}

/// One tenant's address space: frames never leave it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutingDomain {
    pub name: String,
    #[serde(default)]
    pub encap: Encap,
    pub subnets: Vec<VirtualSubnet>,
    /// The provider address of the host whose gateway serves this domain, when that is
    /// another host: routed traffic to outside addresses is tunnelled there, and routed
    /// packets from there with outside sources are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_pa: Option<IpAddr>,
}

/// A policy-table entry: where customer address `ca` of `routing_domain` lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyEntry {
    pub routing_domain: String,
    pub ca: IpAddr,
    pub mac: MacAddr,
    pub vsid: u32,
    /// Provider address of the host the VM runs on.
    pub pa: IpAddr,
}

/// A provider-network neighbour whose MAC is configured rather than resolved by ARP (IPv6
/// provider networks, or a provider gateway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderNeighbor {
    pub ip: IpAddr,
    pub mac: MacAddr,
}

/// Network virtualization on a switch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayConfig {
    /// This host's provider addresses, owned by the switch on its uplink (it answers ARP for
    /// them; the uplink interface itself needs no address).
    pub provider_addresses: Vec<IpAddr>,
    /// Source MAC of the switch's provider traffic.
    pub provider_mac: MacAddr,
    /// Largest outer IP packet the provider network carries (default 1500).
    #[serde(default = "default_provider_mtu")]
    pub provider_mtu: u32,
    #[serde(default)]
    pub provider_neighbors: Vec<ProviderNeighbor>,
    pub routing_domains: Vec<RoutingDomain>,
    /// Entries of remote CAs (and local ones not on a port of this switch).
    #[serde(default)]
    pub policies: Vec<PolicyEntry>,
    /// Gateways from routing domains to physical networks on the uplink (`gateway.rs`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<crate::GatewayConfig>,
    /// How long, after a VM moved away, this host still relays tunnel packets that stale
    /// senders address to it (counted from the move and from each relayed packet); after
    /// that they are dropped. Default [`DEFAULT_RELAY_EXPIRY_SECS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_expiry_secs: Option<u32>,
}

/// Five minutes: senders are redirected on their first relayed packet, so only a host that
/// cannot take redirects (a Linux VTEP) keeps relying on the relay; five minutes covers
/// its operator's reaction to the move, not indefinite forwarding.
pub const DEFAULT_RELAY_EXPIRY_SECS: u32 = 300;

fn default_provider_mtu() -> u32 {
    1500
}

/// A VM port's place in the overlay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortOverlay {
    pub routing_domain: String,
    pub vsid: u32,
    pub mac: MacAddr,
    /// The VM's customer addresses.
    pub cas: Vec<IpAddr>,
}

impl OverlayConfig {
    /// Checks the configuration alone: PAs, VSIDs (24-bit, unique), domain names, policies
    /// naming existing domains and subnets, conflicting entries for one (domain, CA).
    pub fn validate(&self) -> Result<(), String> {
        if self.provider_addresses.is_empty() {
            return Err("overlay needs at least one provider address".into());
        }
        if self.provider_mac.0[0] & 1 == 1 || self.provider_mac.0 == [0; 6] {
            return Err(format!(
                "provider MAC {} is not a unicast address; use a locally administered one such as 02:..",
                self.provider_mac
            ));
        }
        if let Some(secs) = self.relay_expiry_secs.filter(|s| !(1..=86_400).contains(s)) {
            return Err(format!(
                "relay expiry {secs} s is outside 1..=86400; leave it out for the default of {DEFAULT_RELAY_EXPIRY_SECS} s"
            ));
        }
        if !(576..=9000).contains(&self.provider_mtu) {
            return Err(format!(
                "provider MTU {} is outside 576..=9000",
                self.provider_mtu
            ));
        }
        let mut vsids = HashMap::new();
        for d in &self.routing_domains {
            if self
                .routing_domains
                .iter()
                .filter(|o| o.name == d.name)
                .count()
                > 1
            {
                return Err(format!("routing domain {:?} is defined twice", d.name));
            }
            for s in &d.subnets {
                if s.vsid > MAX_VSID || s.vsid == 0 {
                    return Err(format!(
                        "VSID {} of routing domain {:?} is outside 1..={MAX_VSID}",
                        s.vsid, d.name
                    ));
                }
                if let Some(o) = vsids.insert(s.vsid, &d.name) {
                    return Err(format!(
                        "VSID {} is used twice (routing domains {o:?} and {:?}); each virtual subnet needs its own",
                        s.vsid, d.name
                    ));
                }
            }
        }
        let names: Vec<&str> = self
            .routing_domains
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        crate::validate_gateways(&self.gateways, &names, &self.provider_addresses)?;
        for d in &self.routing_domains {
            let local = self
                .gateways
                .iter()
                .any(|g| g.routing_domains.contains(&d.name));
            match d.gateway_pa {
                Some(pa) if local && !self.provider_addresses.contains(&pa) => {
                    return Err(format!(
                        "routing domain {:?} has a gateway on this switch and gateway_pa {pa} elsewhere; keep one",
                        d.name
                    ))
                }
                Some(pa) if pa.is_unspecified() || pa.is_multicast() => {
                    return Err(format!(
                        "gateway_pa {pa} of routing domain {:?} is not a unicast address",
                        d.name
                    ))
                }
                _ => {}
            }
        }
        let mut seen: HashMap<(&str, IpAddr), &PolicyEntry> = HashMap::new();
        for e in &self.policies {
            self.check_entry(e)?;
            if let Some(o) = seen.insert((e.routing_domain.as_str(), e.ca), e) {
                if o != e {
                    return Err(format!(
                        "conflicting policy entries for CA {} in routing domain {:?} ({} at {} vs {} at {}); keep one",
                        e.ca, e.routing_domain, o.mac, o.pa, e.mac, e.pa
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks one entry against the domains.
    pub fn check_entry(&self, e: &PolicyEntry) -> Result<(), String> {
        let d = self
            .routing_domains
            .iter()
            .find(|d| d.name == e.routing_domain)
            .ok_or_else(|| format!("no routing domain {:?}", e.routing_domain))?;
        if !d.subnets.iter().any(|s| s.vsid == e.vsid) {
            return Err(format!(
                "VSID {} is not a virtual subnet of routing domain {:?}",
                e.vsid, d.name
            ));
        }
        if e.mac.0[0] & 1 == 1 {
            return Err(format!("customer MAC {} is multicast", e.mac));
        }
        Ok(())
    }

    /// Checks a port's overlay membership against the domains.
    pub fn check_port(&self, p: &PortOverlay) -> Result<(), String> {
        let d = self
            .routing_domains
            .iter()
            .find(|d| d.name == p.routing_domain)
            .ok_or_else(|| format!("no routing domain {:?}", p.routing_domain))?;
        if !d.subnets.iter().any(|s| s.vsid == p.vsid) {
            return Err(format!(
                "VSID {} is not a virtual subnet of routing domain {:?}",
                p.vsid, d.name
            ));
        }
        if p.mac.0[0] & 1 == 1 {
            return Err(format!("customer MAC {} is multicast", p.mac));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OverlayConfig {
        serde_json::from_str(
            r#"{"provider_addresses":["192.168.1.1"],"provider_mac":"02:00:00:00:01:01",
            "routing_domains":[{"name":"red","encap":"nvgre","subnets":[{"vsid":5001,"prefixes":["10.0.0.0/24"]}]}],
            "policies":[{"routing_domain":"red","ca":"10.0.0.2","mac":"02:00:00:00:00:02","vsid":5001,"pa":"192.168.1.2"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_valid_config_round_trips() {
        let c = cfg();
        c.validate().unwrap();
        assert_eq!(c.provider_mtu, 1500);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<OverlayConfig>(&j).unwrap(), c);
    }

    #[test]
    fn conflicting_entries_are_refused_with_both_named() {
        let mut c = cfg();
        let mut e = c.policies[0].clone();
        e.pa = "192.168.1.9".parse().unwrap();
        c.policies.push(e);
        let err = c.validate().unwrap_err();
        assert!(
            err.contains("conflicting") && err.contains("192.168.1.9"),
            "{err}"
        );
    }

    #[test]
    fn bad_vsids_and_duplicates_are_refused() {
        let mut c = cfg();
        c.routing_domains[0].subnets[0].vsid = 1 << 24;
        assert!(c.validate().unwrap_err().contains("outside"));
        let mut c = cfg();
        let mut d = c.routing_domains[0].clone();
        d.name = "blue".into();
        c.routing_domains.push(d);
        assert!(c.validate().unwrap_err().contains("used twice"));
        let mut c = cfg();
        c.policies[0].vsid = 7;
        assert!(c.validate().unwrap_err().contains("not a virtual subnet"));
    }
}
