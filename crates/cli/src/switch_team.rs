//! `vireo switch create`'s team and overlay flags, and how `vireo switch show` prints a team's
//! members and a switch's overlay. Validation stays in vireod (and `vireo_netconfig`): the
//! flags only build the REST body, so the CLI and the API refuse the same things.

use std::net::IpAddr;

use clap::{Args, ValueEnum};
use vireo_api::switch_rest::SwitchInfo;
use vireo_netconfig::{
    Distribution, Encap, IpPrefix, MacAddr, OverlayConfig, RoutingDomain, TeamConfig, TeamMode,
    VirtualSubnet,
};

use crate::exit::CliError;
use crate::table::render;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Mode {
    /// The physical switch knows nothing of the team (active/standby with --standby).
    SwitchIndependent,
    /// A static aggregate configured on the physical switch.
    Static,
    /// IEEE 802.1AX (LACP) negotiated with the physical switch.
    Lacp,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LoadBalance {
    /// Hash of IPs and TCP/UDP ports (falls back to IPs, then MACs).
    AddressHash,
    /// One member per VM network adapter (source MAC).
    #[value(name = "hyperv-port")]
    HyperVPort,
    /// Flowlets placed on the least-loaded member.
    Dynamic,
}

#[derive(Args, Debug)]
pub struct TeamArgs {
    /// External switch: a team of host interfaces as its uplink (1 to 32, comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "IFACE,IFACE")]
    pub team: Vec<String>,
    /// How the team agrees with the physical switch.
    #[arg(long, value_enum, requires = "team")]
    pub team_mode: Option<Mode>,
    /// How frames are spread over the members.
    #[arg(long, value_enum, requires = "team")]
    pub load_balance: Option<LoadBalance>,
    /// Switch-independent teams: this member carries traffic only when no other is up.
    #[arg(long, value_name = "IFACE", requires = "team")]
    pub standby: Option<String>,
    /// Send every frame with the VM's own MAC on whichever member carries it. By default a
    /// switch-independent address-hash or dynamic team sends frames on non-primary members
    /// with the member's MAC (ARP/ND and broadcasts on the primary with the VM's), so the
    /// physical switch sees each VM MAC on one port only (docs/teaming.md).
    #[arg(long, requires = "team")]
    pub no_mac_rewrite: bool,
}

impl TeamArgs {
    pub fn config(&self) -> Result<Option<TeamConfig>, CliError> {
        if self.team.is_empty() {
            return Ok(None);
        }
        let names: Vec<&str> = self.team.iter().map(|s| s.as_str()).collect();
        let mut t = TeamConfig::new(&names);
        if let Some(m) = self.team_mode {
            t.mode = match m {
                Mode::SwitchIndependent => TeamMode::SwitchIndependent,
                Mode::Static => TeamMode::Static,
                Mode::Lacp => TeamMode::Lacp,
            };
        }
        if let Some(lb) = self.load_balance {
            t.distribution = match lb {
                LoadBalance::AddressHash => Distribution::AddressHashL4,
                LoadBalance::HyperVPort => Distribution::HyperVPort,
                LoadBalance::Dynamic => Distribution::Dynamic,
            };
        }
        t.standby = self.standby.clone();
        t.source_mac_rewrite = !self.no_mac_rewrite;
        Ok(Some(t))
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum EncapArg {
    Vxlan,
    Nvgre,
}

#[derive(Args, Debug)]
pub struct OverlayArgs {
    /// Network virtualization: this host's provider address on the uplink (repeat for more).
    #[arg(long, value_name = "IP")]
    pub overlay_pa: Vec<IpAddr>,
    /// The switch's MAC on the provider network (default: a fresh locally administered one).
    #[arg(long, value_name = "MAC", requires = "overlay_pa")]
    pub provider_mac: Option<MacAddr>,
    /// The provider network's MTU (default 1500).
    #[arg(long, value_name = "BYTES", requires = "overlay_pa")]
    pub provider_mtu: Option<u32>,
    /// A virtual subnet: DOMAIN:VSID[=PREFIX[,PREFIX...]][@GATEWAY] (repeat; the routing
    /// domain is made by its first subnet).
    #[arg(long, value_name = "SPEC", requires = "overlay_pa")]
    pub virtual_subnet: Vec<String>,
    /// Encapsulation of the routing domains.
    #[arg(long, value_enum, requires = "overlay_pa")]
    pub encap: Option<EncapArg>,
}

/// `red:5001=10.0.0.0/24,10.0.1.0/24@10.0.0.1` → ("red", subnet).
fn parse_subnet(text: &str) -> Result<(String, VirtualSubnet), CliError> {
    let bad = |why: &str| {
        CliError::bad_input(format!(
            "--virtual-subnet {text:?}: {why}; write DOMAIN:VSID[=PREFIX[,PREFIX...]][@GATEWAY], \
             e.g. red:5001=10.0.0.0/24@10.0.0.1"
        ))
    };
    let (head, gateway) = match text.rsplit_once('@') {
        Some((h, g)) => (
            h,
            Some(
                g.parse::<IpAddr>()
                    .map_err(|_| bad(&format!("gateway {g:?} is not an IP address")))?,
            ),
        ),
        None => (text, None),
    };
    let (head, prefixes) = match head.split_once('=') {
        Some((h, p)) => (h, p),
        None => (head, ""),
    };
    let (domain, vsid) = head
        .split_once(':')
        .ok_or_else(|| bad("no ':' before the VSID"))?;
    if domain.is_empty() {
        return Err(bad("empty routing domain name"));
    }
    let vsid: u32 = vsid
        .parse()
        .map_err(|_| bad(&format!("VSID {vsid:?} is not a number")))?;
    let prefixes = prefixes
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<IpPrefix>().map_err(|e| bad(&e)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((
        domain.to_owned(),
        VirtualSubnet {
            vsid,
            prefixes,
            gateway_ips: gateway.into_iter().collect(),
            gateway_mac: None,
        },
    ))
}

/// A locally administered unicast MAC from the OS's randomness (`02:` + 5 random bytes).
fn fresh_mac() -> Result<MacAddr, CliError> {
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .map_err(|e| CliError::failed(format!("reading /dev/urandom for a provider MAC: {e}")))?;
    b[0] = 0x02;
    Ok(MacAddr(b))
}

impl OverlayArgs {
    pub fn config(&self) -> Result<Option<OverlayConfig>, CliError> {
        if self.overlay_pa.is_empty() {
            return Ok(None);
        }
        let encap = match self.encap {
            Some(EncapArg::Nvgre) => Encap::Nvgre,
            Some(EncapArg::Vxlan) | None => Encap::Vxlan,
        };
        let mut domains: Vec<RoutingDomain> = Vec::new();
        for text in &self.virtual_subnet {
            let (name, subnet) = parse_subnet(text)?;
            match domains.iter_mut().find(|d| d.name == name) {
                Some(d) => d.subnets.push(subnet),
                None => domains.push(RoutingDomain {
                    name,
                    encap,
                    subnets: vec![subnet],
                    gateway_pa: None,
                }),
            }
        }
        let mac = match self.provider_mac {
            Some(m) => m,
            None => fresh_mac()?,
        };
        Ok(Some(OverlayConfig {
            provider_addresses: self.overlay_pa.clone(),
            provider_mac: mac,
            provider_mtu: self.provider_mtu.unwrap_or(1500),
            provider_neighbors: Vec::new(),
            routing_domains: domains,
            policies: Vec::new(),
            gateways: Vec::new(),
            relay_expiry_secs: None,
        }))
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The team's state and each member's counters, from the process's report of the team port.
pub fn team_text(s: &SwitchInfo) -> String {
    let Some(cfg) = &s.spec.team else {
        return String::new();
    };
    let status = s.ports.iter().find_map(|p| p.team.as_ref());
    let mut out = format!(
        "\nteam:     {} ({:?}, {:?}{})\n",
        cfg.members.join(","),
        cfg.mode,
        cfg.distribution,
        cfg.standby
            .as_ref()
            .map(|s| format!(", standby {s}"))
            .unwrap_or_default()
    );
    let Some(t) = status else {
        out.push_str("          no state: the switch process does not report the team port\n");
        return out;
    };
    out.push_str(&format!(
        "          tx {} frames, rx {} frames, {} unsendable, {} failovers\n",
        t.tx_frames, t.rx_frames, t.tx_no_member, t.failovers
    ));
    let rows: Vec<Vec<String>> = t
        .members
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                if m.link_up { "up" } else { "down" }.into(),
                yes(m.distributing).into(),
                yes(m.collecting).into(),
                m.lacp
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:?}", l.rx_state).to_lowercase()),
                format!("{}/{}", m.tx_frames, m.tx_bytes),
                format!("{}/{}", m.rx_frames, m.rx_bytes),
            ]
        })
        .collect();
    out.push_str(&render(
        &[
            "MEMBER",
            "CARRIER",
            "TX_ACTIVE",
            "RX_ACTIVE",
            "LACP",
            "TX_FRAMES/BYTES",
            "RX_FRAMES/BYTES",
        ],
        &rows,
    ));
    out
}

/// Provider addresses and virtual subnets (the policy table: `vireo netvirt policy list`).
pub fn overlay_text(s: &SwitchInfo) -> String {
    let Some(o) = &s.spec.overlay else {
        return String::new();
    };
    let pas: Vec<String> = o.provider_addresses.iter().map(|a| a.to_string()).collect();
    let mut out = format!(
        "\noverlay:  PA {} (MAC {}, MTU {}), {} remote policy entries\n",
        pas.join(","),
        o.provider_mac,
        o.provider_mtu,
        o.policies.len()
    );
    let rows: Vec<Vec<String>> = o
        .routing_domains
        .iter()
        .flat_map(|d| {
            d.subnets.iter().map(move |sn| {
                let list = |v: Vec<String>| {
                    if v.is_empty() {
                        "-".into()
                    } else {
                        v.join(",")
                    }
                };
                vec![
                    d.name.clone(),
                    format!("{:?}", d.encap).to_lowercase(),
                    sn.vsid.to_string(),
                    list(sn.prefixes.iter().map(|p| p.to_string()).collect()),
                    list(sn.gateway_ips.iter().map(|p| p.to_string()).collect()),
                ]
            })
        })
        .collect();
    if !rows.is_empty() {
        out.push_str(&render(
            &["ROUTING_DOMAIN", "ENCAP", "VSID", "PREFIXES", "GATEWAY"],
            &rows,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_subnets_parse_with_every_part_and_refuse_with_the_text() {
        let (d, s) = parse_subnet("red:5001=10.0.0.0/24,fd00::/64@10.0.0.1").unwrap();
        assert_eq!(d, "red");
        assert_eq!(s.vsid, 5001);
        assert_eq!(s.prefixes.len(), 2);
        assert_eq!(s.gateway_ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        let (_, s) = parse_subnet("blue:7").unwrap();
        assert!(s.prefixes.is_empty() && s.gateway_ips.is_empty());
        for bad in ["red", ":5", "red:x", "red:5=10.0.0.0/99", "red:5@nope"] {
            let e = parse_subnet(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn team_flags_map_to_the_config() {
        let a = TeamArgs {
            team: vec!["a".into(), "b".into()],
            team_mode: Some(Mode::Lacp),
            load_balance: Some(LoadBalance::HyperVPort),
            standby: None,
            no_mac_rewrite: false,
        };
        let t = a.config().unwrap().unwrap();
        assert_eq!(t.members, ["a", "b"]);
        assert_eq!(t.mode, TeamMode::Lacp);
        assert_eq!(t.distribution, Distribution::HyperVPort);
        assert!(t.source_mac_rewrite);
        let off = TeamArgs {
            team: vec!["a".into(), "b".into()],
            team_mode: None,
            load_balance: Some(LoadBalance::Dynamic),
            standby: None,
            no_mac_rewrite: true,
        };
        assert!(!off.config().unwrap().unwrap().source_mac_rewrite);
        let none = TeamArgs {
            team: vec![],
            team_mode: None,
            load_balance: None,
            standby: None,
            no_mac_rewrite: false,
        };
        assert!(none.config().unwrap().is_none());
    }
}
