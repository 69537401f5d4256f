//! The policies case of the `overlay` benchmark: plain TCP (iperf3) between two namespaces
//! through two ports that carry an ACL set (stateful: the client may open TCP 5201 only, and
//! only replies come back), a VLAN and a rate limit above the link speed — once through a
//! Vireo switch (its kernel fast path applies the verdicts, the tbf shapers), once through a
//! Linux bridge with the same rules in nftables (br_netfilter, conntrack) and the same tbf
//! qdiscs. Both in one namespace `<p>sw` holding the two host ends, so neither touches the
//! host's own tables.
//!
//! The VLAN is an access VLAN on both Vireo ports (untagged on the wire): this kernel has no
//! bridge VLAN filtering (and no 8021q), so the bridge side has none, which costs it nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::netlab::{in_netns, iperf3, quiet, sh, Iperf};

/// 100 Gbit/s: above what veths carry here, so the limit is configured but never binds.
const RATE_BITS: u64 = 100_000_000_000;
const BURST: u64 = 1 << 20;

/// Namespaces `<p>c0` (10.66.0.1), `<p>c1` (10.66.0.2) and `<p>sw` with the host ends
/// `<p>h0`, `<p>h1`; removed on drop.
pub struct Lab {
    p: String,
}

impl Lab {
    pub fn new() -> Result<Lab, String> {
        let lab = Lab {
            p: format!("ovp{}", std::process::id()),
        };
        let sw = lab.ns("sw");
        for n in ["c0", "c1", "sw"] {
            let ns = lab.ns(n);
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            quiet(&[
                "ip",
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv6.conf.all.disable_ipv6=1",
            ]);
        }
        for k in 0..2 {
            let (c, g, h) = (lab.ns(&format!("c{k}")), lab.dev('g', k), lab.dev('h', k));
            sh(&[
                "ip", "-n", &sw, "link", "add", &h, "type", "veth", "peer", "name", &g,
            ])?;
            sh(&["ip", "-n", &sw, "link", "set", &g, "netns", &c])?;
            let ip = format!("10.66.0.{}/24", k + 1);
            sh(&["ip", "-n", &c, "addr", "add", &ip, "dev", &g])?;
            sh(&["ip", "-n", &c, "link", "set", &g, "up"])?;
            sh(&["ip", "-n", &sw, "link", "set", &h, "up"])?;
        }
        Ok(lab)
    }

    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.p)
    }

    fn dev(&self, kind: char, k: usize) -> String {
        format!("{}{kind}{k}", self.p)
    }

    fn iperf(&self, secs: u32) -> Result<Iperf, String> {
        iperf3(&self.ns("c0"), &self.ns("c1"), "10.66.0.2", secs, &[])
    }

    /// The same rate limit as a tbf on both host ends (what Vireo's fast path installs).
    fn tbf(&self, on: bool) -> Result<(), String> {
        let sw = self.ns("sw");
        for k in 0..2 {
            let h = self.dev('h', k);
            if on {
                let rate = format!("{RATE_BITS}bit");
                let burst = BURST.to_string();
                sh(&[
                    "tc", "-n", &sw, "qdisc", "replace", "dev", &h, "root", "tbf", "rate", &rate,
                    "burst", &burst, "limit", "33554432",
                ])?;
            } else {
                quiet(&["tc", "-n", &sw, "qdisc", "del", "dev", &h, "root"]);
            }
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in ["c0", "c1", "sw"] {
            quiet(&["ip", "netns", "del", &self.ns(n)]);
        }
    }
}

fn rule(
    name: &str,
    priority: u16,
    direction: Direction,
    action: AclAction,
    remote_port: Option<u16>,
    stateful: bool,
) -> AclRule {
    AclRule {
        name: name.into(),
        priority,
        direction,
        action,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: None,
        protocol: Some(6),
        local_ports: None,
        remote_ports: remote_port.map(|p| PortRange { first: p, last: p }),
        stateful,
    }
}

/// The client port's ACLs: TCP out to 5201 only (stateful), nothing TCP in but replies.
fn client_acls() -> Vec<AclRule> {
    vec![
        rule(
            "no-telnet",
            5,
            Direction::Ingress,
            AclAction::Deny,
            Some(23),
            false,
        ),
        rule(
            "iperf",
            10,
            Direction::Ingress,
            AclAction::Allow,
            Some(5201),
            true,
        ),
        rule(
            "count-tcp",
            20,
            Direction::Both,
            AclAction::Meter,
            None,
            false,
        ),
        rule(
            "no-other-tcp-out",
            90,
            Direction::Ingress,
            AclAction::Deny,
            None,
            false,
        ),
        rule(
            "replies-only-in",
            100,
            Direction::Egress,
            AclAction::Deny,
            None,
            false,
        ),
    ]
}

/// The same policy for the bridge, by address (br_netfilter's forward hook sees the bridge,
/// not its ports, as the interface).
const NFT_RULES: &str = "table inet vireobench {
  chain filt {
    type filter hook forward priority 0; policy accept;
    ip saddr 10.66.0.1 tcp dport 23 drop
    ip saddr 10.66.0.1 tcp dport 5201 accept
    ip saddr 10.66.0.1 ip protocol tcp drop
    ip daddr 10.66.0.1 ct state established,related accept
    ip daddr 10.66.0.1 ip protocol tcp drop
  }
}
";

/// One run through a Vireo switch in `<p>sw`; also how many flows the kernel carried.
pub fn through_vireo(lab: &Lab, secs: u32) -> Result<(Iperf, usize), String> {
    let (h0, h1) = (lab.dev('h', 0), lab.dev('h', 1));
    let rt = in_netns(&lab.ns("sw"), move || {
        let mut sw = Switch::new(SwitchConfig::private("policies")).map_err(|e| e.to_string())?;
        let limit = Some(RateLimit {
            bits_per_sec: RATE_BITS,
            burst_bytes: BURST,
        });
        let mut a = PortConfig::access("a", 10);
        a.acls = client_acls();
        a.qos.max_egress = limit;
        let mut b = PortConfig::access("b", 10);
        b.qos.max_egress = limit;
        let a = sw.add_port(a).map_err(|e| e.to_string())?;
        let b = sw.add_port(b).map_err(|e| e.to_string())?;
        let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).map_err(|e| e.to_string())?;
        for (id, dev) in [(a, &h0), (b, &h1)] {
            let p = PacketPort::bind_offload(dev).map_err(|e| format!("bind {dev}: {e}"))?;
            rt.attach_packet(id, Arc::new(p));
        }
        Ok(rt)
    })?;
    std::thread::sleep(Duration::from_millis(100));
    let r = lab.iperf(secs);
    let flows = rt.offloaded_flows().len();
    let _ = rt.stop();
    Ok((r?, flows))
}

/// One run through a Linux bridge with the rules in nftables and the tbf qdiscs.
pub fn through_bridge(lab: &Lab, secs: u32) -> Result<Iperf, String> {
    let sw = lab.ns("sw");
    let br = format!("{}br", lab.p);
    sh(&["ip", "-n", &sw, "link", "add", &br, "type", "bridge"])?;
    let r = (|| {
        for k in 0..2 {
            sh(&[
                "ip",
                "-n",
                &sw,
                "link",
                "set",
                &lab.dev('h', k),
                "master",
                &br,
            ])?;
        }
        sh(&["ip", "-n", &sw, "link", "set", &br, "up"])?;
        // br_netfilter hands bridged IPv4 to the inet forward hook (the default, made sure).
        quiet(&[
            "ip",
            "netns",
            "exec",
            &sw,
            "sysctl",
            "-qw",
            "net.bridge.bridge-nf-call-iptables=1",
        ]);
        let rules = std::env::temp_dir().join(format!("{}.nft", lab.p));
        std::fs::write(&rules, NFT_RULES).map_err(|e| e.to_string())?;
        let loaded = sh(&[
            "ip",
            "netns",
            "exec",
            &sw,
            "nft",
            "-f",
            &rules.to_string_lossy(),
        ]);
        let _ = std::fs::remove_file(&rules);
        loaded?;
        lab.tbf(true)?;
        lab.iperf(secs)
    })();
    lab.tbf(false).ok();
    quiet(&[
        "ip",
        "netns",
        "exec",
        &sw,
        "nft",
        "delete",
        "table",
        "inet",
        "vireobench",
    ]);
    quiet(&["ip", "-n", &sw, "link", "del", &br]);
    r
}
