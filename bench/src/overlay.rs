//! The `overlay` benchmark, three parts and one last line:
//! - TCP (iperf3) between two "VM" namespaces whose "hosts" are two more namespaces joined by
//!   one veth (the provider network), carried over VXLAN VNI 100 — once by two Vireo switch
//!   instances (an AF_PACKET uplink each, the overlay in user space), once by the Linux
//!   kernel's vxlan devices and bridges on the same veths — alternating. The VMs' MTU is 1450
//!   in both, so the encapsulated packets fit the provider's 1500. Vireo's runtimes run in the
//!   host namespaces, so after a connection's first frames its overlay flows are carried by
//!   the kernel fast path (tc/eBPF encap and decap, `fastpath/tunnel.rs`).
//! - The policies case (`overlay/policies.rs`): ports with ACLs, a VLAN and a rate limit,
//!   Vireo's kernel fast path vs a Linux bridge with the same rules in nftables.
//! - The team benchmark (`team.rs`, its options are accepted here too).
//!
//! Last line: `overlay_vs_linux_vxlan=<r> team_aggregation=<r> failover_gap_ms=<n>
//! policies_vs_bridge_nft=<r>`, ratios of medians.

mod policies;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::netlab::{in_netns, iperf3, median, quiet, sh};

use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

#[derive(clap::Args)]
pub struct OverlayArgs {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    iperf_seconds: u32,
    /// Runs per path (alternating Vireo / Linux); the ratio uses the medians.
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Leave out the team benchmark (its figures are then missing from the last line).
    #[arg(long)]
    skip_team: bool,
    #[command(flatten)]
    team: crate::team::TeamArgs,
}

const M0: &str = "02:00:00:00:01:01";
const M1: &str = "02:00:00:00:01:02";

/// Namespaces `<p>v0`, `<p>v1` (VMs), `<p>ha`, `<p>hb` (hosts); removed on drop.
struct Lab {
    p: String,
}

impl Lab {
    fn new() -> Result<Lab, String> {
        let lab = Lab {
            p: format!("ovb{}", std::process::id()),
        };
        let p = &lab.p;
        for n in ["v0", "v1", "ha", "hb"] {
            let ns = format!("{p}{n}");
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
        // VM k: g<k> in v<k>, h<k> in its host; the provider: wa in ha, wb in hb.
        for (a, an, b, bn) in [
            ("g0", "v0", "h0", "ha"),
            ("g1", "v1", "h1", "hb"),
            ("wa", "ha", "wb", "hb"),
        ] {
            let (a, b) = (format!("{p}{a}"), format!("{p}{b}"));
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            sh(&["ip", "link", "set", &a, "netns", &format!("{p}{an}")])?;
            sh(&["ip", "link", "set", &b, "netns", &format!("{p}{bn}")])?;
        }
        for (ns, dev) in [("ha", "h0"), ("hb", "h1"), ("ha", "wa"), ("hb", "wb")] {
            sh(&[
                "ip",
                "-n",
                &format!("{p}{ns}"),
                "link",
                "set",
                &format!("{p}{dev}"),
                "up",
            ])?;
        }
        for (k, ip, m) in [(0, "10.0.0.1/24", M0), (1, "10.0.0.2/24", M1)] {
            let (ns, g) = (format!("{p}v{k}"), format!("{p}g{k}"));
            sh(&[
                "ip", "-n", &ns, "link", "set", &g, "address", m, "mtu", "1450",
            ])?;
            sh(&["ip", "-n", &ns, "addr", "add", ip, "dev", &g])?;
            sh(&["ip", "-n", &ns, "link", "set", &g, "up"])?;
        }
        Ok(lab)
    }

    fn name(&self, s: &str) -> String {
        format!("{}{s}", self.p)
    }

    /// Guest checksum offload on (the kernel path) or off (frames through our plain sockets
    /// must carry complete checksums).
    fn guest_tx(&self, on: bool) {
        for k in 0..2 {
            quiet(&[
                "ip",
                "netns",
                "exec",
                &self.name(&format!("v{k}")),
                "ethtool",
                "-K",
                &self.name(&format!("g{k}")),
                "tx",
                if on { "on" } else { "off" },
            ]);
        }
    }

    /// The kernel's VTEPs: wa/wb get the PAs, a vxlan device and a bridge per host.
    fn linux_up(&self) -> Result<(), String> {
        for (h, w, vm, me, peer) in [
            ("ha", "wa", "h0", "192.168.79.1", "192.168.79.2"),
            ("hb", "wb", "h1", "192.168.79.2", "192.168.79.1"),
        ] {
            let ns = self.name(h);
            let (w, vm, vx, br) = (
                self.name(w),
                self.name(vm),
                self.name("vx"),
                self.name("br"),
            );
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{me}/24"),
                "dev",
                &w,
            ])?;
            sh(&[
                "ip", "-n", &ns, "link", "add", &vx, "type", "vxlan", "id", "100", "local", me,
                "remote", peer, "dstport", "4789", "dev", &w,
            ])?;
            sh(&["ip", "-n", &ns, "link", "add", &br, "type", "bridge"])?;
            sh(&["ip", "-n", &ns, "link", "set", &vx, "master", &br])?;
            sh(&["ip", "-n", &ns, "link", "set", &vm, "master", &br])?;
            for d in [&vx, &br] {
                sh(&["ip", "-n", &ns, "link", "set", d, "up"])?;
            }
        }
        Ok(())
    }

    fn linux_down(&self) {
        for (h, w) in [("ha", "wa"), ("hb", "wb")] {
            let ns = self.name(h);
            quiet(&["ip", "-n", &ns, "link", "del", &self.name("vx")]);
            quiet(&["ip", "-n", &ns, "link", "del", &self.name("br")]);
            quiet(&["ip", "-n", &ns, "addr", "flush", "dev", &self.name(w)]);
        }
    }

    /// iperf3 TCP from v0 to v1, bits/s received.
    fn iperf(&self, secs: u32) -> Result<f64, String> {
        // Warm-up: ARP for the provider and customer addresses.
        quiet(&[
            "ip",
            "netns",
            "exec",
            &self.name("v0"),
            "ping",
            "-c",
            "3",
            "-i",
            "0.2",
            "-W",
            "1",
            "10.0.0.2",
        ]);
        iperf3(&self.name("v0"), &self.name("v1"), "10.0.0.2", secs, &[]).map(|r| r.bps)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for n in ["v0", "v1", "ha", "hb"] {
            quiet(&["ip", "netns", "del", &self.name(n)]);
        }
    }
}

/// Binds an AF_PACKET port on `dev` from a thread inside namespace `ns`.
fn bind_in(ns: &str, dev: String) -> Result<PacketPort, String> {
    in_netns(ns, move || {
        PacketPort::bind(&dev).map_err(|e| format!("bind {dev}: {e}"))
    })
}

/// [`bind_in`] with segmentation/checksum offload (vnet headers).
fn bind_offload_in(ns: &str, dev: String) -> Result<PacketPort, String> {
    in_netns(ns, move || {
        PacketPort::bind_offload(&dev).map_err(|e| format!("bind {dev}: {e}"))
    })
}

fn host_switch(
    name: &str,
    pa: &str,
    pmac: &str,
    peer_pa: &str,
    me: (&str, &str),
    peer: (&str, &str),
) -> Result<(Switch, PortId, PortId), String> {
    let mut c = SwitchConfig::private(name);
    c.overlay = Some(
        serde_json::from_value(serde_json::json!({
            "provider_addresses": [pa],
            "provider_mac": pmac,
            "routing_domains": [{"name": "t", "encap": "vxlan",
                "subnets": [{"vsid": 100, "prefixes": ["10.0.0.0/24"]}]}],
            "policies": [{"routing_domain": "t", "ca": peer.0, "mac": peer.1,
                "vsid": 100, "pa": peer_pa}],
        }))
        .map_err(|e| e.to_string())?,
    );
    let mut sw = Switch::new(c).map_err(|e| e.to_string())?;
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .map_err(|e| e.to_string())?;
    let vm = sw
        .add_port(PortConfig {
            overlay: Some(PortOverlay {
                routing_domain: "t".into(),
                vsid: 100,
                mac: me.1.parse().map_err(|e: String| e)?,
                cas: vec![me
                    .0
                    .parse()
                    .map_err(|e: std::net::AddrParseError| e.to_string())?],
            }),
            ..PortConfig::access("vm", 1)
        })
        .map_err(|e| e.to_string())?;
    Ok((sw, up, vm))
}

fn through_vireo(lab: &Lab, secs: u32) -> Result<(f64, usize), String> {
    // Checksum and segmentation offload as for Linux: the VM ports take vnet headers.
    lab.guest_tx(true);
    let (a, a_up, a_vm) = host_switch(
        "a",
        "192.168.79.1",
        "02:aa:00:00:00:01",
        "192.168.79.2",
        ("10.0.0.1", M0),
        ("10.0.0.2", M1),
    )?;
    let (b, b_up, b_vm) = host_switch(
        "b",
        "192.168.79.2",
        "02:bb:00:00:00:01",
        "192.168.79.1",
        ("10.0.0.2", M1),
        ("10.0.0.1", M0),
    )?;
    // Each host's runtime lives in its namespace: the kernel fast path installs its tc
    // filters where the ports' netdevs are.
    let start_in = |ns: String, sw: Switch| {
        in_netns(&ns, move || {
            SwitchRuntime::start(Arc::new(Mutex::new(sw))).map_err(|e| e.to_string())
        })
    };
    let ra = start_in(lab.name("ha"), a)?;
    let rb = start_in(lab.name("hb"), b)?;
    ra.attach_packet(a_up, Arc::new(bind_in(&lab.name("ha"), lab.name("wa"))?));
    ra.attach_packet(
        a_vm,
        Arc::new(bind_offload_in(&lab.name("ha"), lab.name("h0"))?),
    );
    rb.attach_packet(b_up, Arc::new(bind_in(&lab.name("hb"), lab.name("wb"))?));
    rb.attach_packet(
        b_vm,
        Arc::new(bind_offload_in(&lab.name("hb"), lab.name("h1"))?),
    );
    std::thread::sleep(Duration::from_millis(100));
    let r = lab.iperf(secs);
    let flows = ra.offloaded_flows().len() + rb.offloaded_flows().len();
    let _ = ra.stop();
    let _ = rb.stop();
    r.map(|bps| (bps, flows))
}

fn through_linux(lab: &Lab, secs: u32) -> Result<f64, String> {
    lab.guest_tx(true);
    let r = lab.linux_up().and_then(|()| lab.iperf(secs));
    lab.linux_down();
    r
}

fn gbits(v: &[f64]) -> String {
    v.iter()
        .map(|b| format!("{:.2}", b / 1e9))
        .collect::<Vec<_>>()
        .join(" ")
}

fn spread(v: &[f64]) -> String {
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
    format!("{:.2}–{:.2}", lo / 1e9, hi / 1e9)
}

pub fn run(args: OverlayArgs) -> Result<(), Box<dyn std::error::Error>> {
    let lab = Lab::new()?;
    let (mut ours, mut linux, mut kernel_flows) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs.max(1) {
        let (bps, flows) = through_vireo(&lab, args.iperf_seconds)?;
        ours.push(bps);
        kernel_flows.push(flows);
        linux.push(through_linux(&lab, args.iperf_seconds)?);
    }
    drop(lab);
    println!(
        "TCP over VXLAN between two hosts, iperf3 -t {}, {} alternating runs (Gbit/s):",
        args.iperf_seconds, args.runs
    );
    println!(
        "  vireo (two switches, AF_PACKET uplinks, overlay flows encapsulated and decapsulated \
         by tc/eBPF; flows in the kernel at the end {kernel_flows:?}): {}",
        gbits(&ours)
    );
    println!(
        "  linux (vxlan devices + bridges, kernel, TSO/GRO):             {}",
        gbits(&linux)
    );
    let (o, l) = (median(&mut ours), median(&mut linux));
    println!(
        "  medians: vireo {:.2} Gbit/s, linux {:.2} Gbit/s (both with guest TSO and \
         checksum offload)",
        o / 1e9,
        l / 1e9
    );
    let overlay = o / l;

    let lab = policies::Lab::new()?;
    let (mut ours, mut bridge, mut flows) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs.max(1) {
        let (r, n) = policies::through_vireo(&lab, args.iperf_seconds)?;
        ours.push(r.bps);
        flows.push(n);
        bridge.push(policies::through_bridge(&lab, args.iperf_seconds)?.bps);
    }
    drop(lab);
    println!(
        "TCP through two ports with a stateful ACL set, an access VLAN and a 100 Gbit/s egress \
         limit, iperf3 -t {}, {} alternating runs (Gbit/s):",
        args.iperf_seconds, args.runs
    );
    println!(
        "  vireo (kernel fast path: per-connection verdicts, tbf; flows in the kernel {flows:?}): {}",
        gbits(&ours)
    );
    println!(
        "  linux bridge + nftables (br_netfilter, conntrack) + tbf:                 {}",
        gbits(&bridge)
    );
    println!(
        "  spread: vireo {}, bridge {}",
        spread(&ours),
        spread(&bridge)
    );
    let policies = median(&mut ours) / median(&mut bridge);

    let team = if args.skip_team {
        None
    } else {
        println!("NIC teaming (as `vireo-bench team`):");
        Some(crate::team::measure(&args.team)?)
    };
    let (agg, gap) = team.map_or(("skipped".into(), "skipped".into()), |(r, g)| {
        (format!("{r:.2}"), format!("{g:.0}"))
    });
    println!(
        "overlay_vs_linux_vxlan={overlay:.3} team_aggregation={agg} failover_gap_ms={gap} \
         policies_vs_bridge_nft={policies:.3}"
    );
    Ok(())
}
