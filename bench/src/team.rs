//! `vireo-bench team`: NIC teaming of the switch's uplink over veth members each capped to
//! 1 Gbit/s with `tbf`. Aggregation: several iperf3 streams through a 2-member team vs the same
//! switch with a 1-member team (ratio, target ≥ 1.8). Failover: one paced iperf3 stream; the
//! member carrying it goes down (`ip link set down` here, and the far end's link down, which
//! only carrier polling sees); the longest silence in a capture of the stream is the gap.
//! The far end is a Linux bridge over the members' peers (switch-independent teaming; no
//! bonding driver on this kernel). Last line: `team_aggregation=<ratio> failover_gap_ms=<n>`.

use std::process::{Command, Stdio};

use crate::netlab::{iperf3, median, quiet, sh, Reap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::team::TeamPort;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::{
    Distribution, PortConfig, PortId, PortRole, Switch, SwitchConfig, TeamConfig, TeamStatus,
};

#[derive(Args)]
pub struct TeamArgs {
    /// Seconds per iperf3 aggregation run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// Parallel iperf3 streams in the aggregation runs.
    #[arg(long, default_value_t = 4)]
    streams: u32,
    /// Alternating rounds (1-member, 2-member); the ratio uses the medians.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Failover runs per kind (near-end down, far-end down); the median is reported.
    #[arg(long, default_value_t = 3)]
    failovers: u32,
    /// Member rate cap, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    member_mbit: u32,
    /// MTU of every link. Jumbo frames by default: the user-space switch path moves ~60 k
    /// frames/s per core here, under one member's 1 Gbit/s at 1,500 bytes, so aggregation
    /// would measure the switch's CPU instead of the team.
    #[arg(long, default_value_t = 9000)]
    mtu: u32,
    /// Distribution: l4 (address hash) or dynamic (flowlets).
    #[arg(long, default_value = "dynamic")]
    distribution: String,
    /// Dynamic distribution's flowlet gap, µs (the team's default; below the members'
    /// queueing skew, flowlets reorder and TCP slows down).
    #[arg(long, default_value_t = 25_000)]
    flowlet_gap_us: u32,
    /// Send every frame with the VM's MAC (the team's source-MAC rewrite off), for A/B runs.
    #[arg(long)]
    no_mac_rewrite: bool,
}

/// Namespace `<p>a` (10.77.0.1, the "VM") on the switch's VM port `<p>h1`; namespace `<p>b`
/// with bridge br0 (10.77.0.2) over `<p>g2`, `<p>g3`, whose peers `<p>h2`, `<p>h3` are the
/// team members, tbf-capped. Removed on drop.
struct Lab {
    p: String,
}

impl Lab {
    fn new(p: String, mbit: u32, mtu: u32) -> Result<Lab, String> {
        let lab = Lab { p };
        let mtu = mtu.to_string();
        let (a, b) = (lab.ns('a'), lab.ns('b'));
        for ns in [&a, &b] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let (h1, g1) = (lab.dev('h', 1), lab.dev('g', 1));
        sh(&[
            "ip", "link", "add", &h1, "mtu", &mtu, "type", "veth", "peer", "name", &g1, "mtu", &mtu,
        ])?;
        sh(&["ip", "link", "set", &g1, "netns", &a])?;
        sh(&["ip", "-n", &a, "addr", "add", "10.77.0.1/24", "dev", &g1])?;
        sh(&["ip", "-n", &a, "link", "set", &g1, "up"])?;
        quiet(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{h1}.disable_ipv6=1"),
        ]);
        sh(&["ip", "link", "set", &h1, "up"])?;
        sh(&[
            "ip", "-n", &b, "link", "add", "br0", "mtu", &mtu, "type", "bridge",
        ])?;
        let rate = format!("{mbit}mbit");
        for k in [2, 3] {
            let (h, g) = (lab.dev('h', k), lab.dev('g', k));
            sh(&[
                "ip", "link", "add", &h, "mtu", &mtu, "type", "veth", "peer", "name", &g, "mtu",
                &mtu,
            ])?;
            sh(&["ip", "link", "set", &g, "netns", &b])?;
            quiet(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{h}.disable_ipv6=1"),
            ]);
            sh(&["ip", "link", "set", &h, "up"])?;
            // A 1 Gbit/s NIC each way: our transmit here, the far end's transmit there.
            for (ns, dev) in [(None, &h), (Some(&b), &g)] {
                let mut args = vec!["tc"];
                if let Some(ns) = ns {
                    args.extend(["-n", ns.as_str()]);
                }
                args.extend([
                    "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate, "burst", "256kb",
                    "latency", "20ms",
                ]);
                sh(&args)?;
            }
            quiet(&["ip", "netns", "exec", &b, "ethtool", "-K", &g, "tx", "off"]);
            sh(&["ip", "-n", &b, "link", "set", &g, "master", "br0", "up"])?;
        }
        quiet(&[
            "ip", "netns", "exec", &b, "ethtool", "-K", "br0", "tx", "off",
        ]);
        sh(&["ip", "-n", &b, "addr", "add", "10.77.0.2/24", "dev", "br0"])?;
        sh(&["ip", "-n", &b, "link", "set", "br0", "up"])?;
        Ok(lab)
    }
    fn ns(&self, c: char) -> String {
        format!("{}{c}", self.p)
    }
    fn dev(&self, c: char, k: usize) -> String {
        format!("{}{c}{k}", self.p)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        quiet(&["ip", "netns", "del", &self.ns('a')]);
        quiet(&["ip", "netns", "del", &self.ns('b')]);
        for k in 1..4 {
            quiet(&["ip", "link", "del", &self.dev('h', k)]);
        }
    }
}

/// The switch with a team of `members` as its uplink, running.
struct Running {
    rt: Option<SwitchRuntime>,
    team: Arc<TeamPort>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let _ = rt.stop();
        }
    }
}

fn start(lab: &Lab, members: &[String], a: &TeamArgs) -> Result<Running, String> {
    let mut sc = SwitchConfig::private("team-bench");
    sc.fast_path = false;
    sc.ports = vec![
        PortConfig::access("vm", 1),
        PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("uplink", 1)
        },
    ];
    let names: Vec<&str> = members.iter().map(|m| m.as_str()).collect();
    let mut tc = TeamConfig::new(&names);
    tc.distribution = match a.distribution.as_str() {
        "l4" => Distribution::AddressHashL4,
        "dynamic" => Distribution::Dynamic,
        d => return Err(format!("unknown distribution {d:?}; use l4 or dynamic")),
    };
    tc.flowlet_gap_us = a.flowlet_gap_us;
    tc.source_mac_rewrite = !a.no_mac_rewrite;
    let team = Arc::new(TeamPort::new("uplink", tc).map_err(|e| e.to_string())?);
    let sw = Switch::new(sc).map_err(|e| e.to_string())?;
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).map_err(|e| e.to_string())?;
    let vm = PacketPort::bind_offload(&lab.dev('h', 1)).map_err(|e| e.to_string())?;
    rt.attach(PortId(0), Arc::new(vm));
    rt.attach(PortId(1), team.clone());
    std::thread::sleep(Duration::from_millis(200));
    // ARP and the MAC table settle before measuring.
    quiet(&[
        "ip",
        "netns",
        "exec",
        &lab.ns('a'),
        "ping",
        "-c",
        "2",
        "-i",
        "0.2",
        "-W",
        "1",
        "10.77.0.2",
    ]);
    Ok(Running { rt: Some(rt), team })
}

/// iperf3 TCP from namespace a to b for `secs` s; bits/s received.
fn iperf(lab: &Lab, extra: &[&str], secs: u32) -> Result<f64, String> {
    iperf3(&lab.ns('a'), &lab.ns('b'), "10.77.0.2", secs, extra).map(|r| r.bps)
}

fn member_tx(s: &TeamStatus) -> Vec<u64> {
    s.members.iter().map(|m| m.tx_bytes).collect()
}

/// One failover run: a 200 Mbit/s stream, its member taken down after 1.5 s (`far`: the peer
/// end, seen only as carrier loss), the longest silence of the stream in ms. The member is
/// brought back up and must rejoin.
fn failover(lab: &Lab, run: &Running, far: bool) -> Result<f64, String> {
    let pcap = std::env::temp_dir().join(format!("{}-gap.pcap", lab.p));
    let cap = Reap(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.ns('b'),
                "tcpdump",
                "-i",
                "br0",
                "-s",
                "96",
                "-U",
                "-w",
            ])
            .arg(&pcap)
            .args(["tcp", "dst", "port", "5201", "and", "greater", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("tcpdump: {e}"))?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = member_tx(&run.team.status());
    let lab_p = lab.p.clone();
    let ns_b = lab.ns('b');
    let team = run.team.clone();
    let downer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1900));
        let now = member_tx(&team.status());
        let busy = (0..2).max_by_key(|k| now[*k] - before[*k]).unwrap_or(0);
        let (dev, ns) = if far {
            (format!("{lab_p}g{}", busy + 2), Some(ns_b))
        } else {
            (format!("{lab_p}h{}", busy + 2), None)
        };
        let mut args = vec!["ip".to_string()];
        if let Some(ns) = &ns {
            args.extend(["-n".to_string(), ns.clone()]);
        }
        args.extend(["link", "set", &dev, "down"].map(String::from));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        quiet(&a);
        (a.iter().map(|s| s.to_string()).collect::<Vec<_>>(), busy)
    });
    let got = iperf(lab, &["-b", "200M"], 4);
    let (mut args, busy) = downer.join().map_err(|_| "down thread panicked")?;
    *args.last_mut().unwrap() = "up".into();
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    quiet(&a);
    if far {
        quiet(&[
            "ip",
            "-n",
            &lab.ns('b'),
            "link",
            "set",
            &format!("{}g{}", lab.p, busy + 2),
            "master",
            "br0",
        ]);
    }
    drop(cap);
    got.map_err(|e| format!("the stream did not survive the failover: {e}"))?;
    let text = Command::new("tcpdump")
        .arg("-r")
        .arg(&pcap)
        .args(["-tt", "-n"])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = std::fs::remove_file(&pcap);
    let times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    if times.len() < 100 {
        return Err(format!("capture too small ({} packets)", times.len()));
    }
    let gap = times
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max);
    // Rejoin before the next run.
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end {
        let s = run.team.status();
        if s.members.iter().all(|m| m.link_up && m.distributing) {
            return Ok(gap);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the member did not rejoin within 5 s".into())
}

pub fn run(a: TeamArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (ratio, gap) = measure(&a)?;
    println!("team_aggregation={ratio:.2} failover_gap_ms={gap:.0}");
    Ok(())
}

/// Runs the aggregation rounds and the failovers, printing each; returns the aggregation
/// ratio and the near-end failover gap (ms), medians.
pub fn measure(a: &TeamArgs) -> Result<(f64, f64), Box<dyn std::error::Error>> {
    let lab = Lab::new(format!("vbt{}", std::process::id()), a.member_mbit, a.mtu)?;
    let members = [lab.dev('h', 2), lab.dev('h', 3)];
    let streams = a.streams.to_string();
    let (mut one, mut two) = (Vec::new(), Vec::new());
    println!(
        "{} iperf3 streams, {} s, members tbf-capped to {} Mbit/s, MTU {}, distribution {}, source-MAC rewrite {}",
        a.streams,
        a.seconds,
        a.member_mbit,
        a.mtu,
        a.distribution,
        if a.no_mac_rewrite { "off" } else { "on" }
    );
    println!(
        "{:<28} {:>12} {:>26} {:>9} {:>6}",
        "run", "Gbit/s", "per-member MB sent", "flowlets", "moves"
    );
    for r in 0..a.rounds {
        for (k, out) in [(1usize, &mut one), (2, &mut two)] {
            let run = start(&lab, &members[..k], a)?;
            let before = member_tx(&run.team.status());
            let bps = iperf(&lab, &["-P", &streams], a.seconds)?;
            let st = run.team.status();
            let after = member_tx(&st);
            let per: Vec<String> = after
                .iter()
                .zip(&before)
                .map(|(x, y)| format!("{:.0}", (x - y) as f64 / 1e6))
                .collect();
            println!(
                "{:<28} {:>12.3} {:>26} {:>9} {:>6}",
                format!("round {r}: {k}-member team"),
                bps / 1e9,
                per.join(" / "),
                st.flowlets,
                st.flowlet_moves
            );
            out.push(bps);
        }
    }
    let ratio = median(&mut two) / median(&mut one);
    println!("aggregation (2 members / 1 member, medians): {ratio:.2}");

    let run = start(&lab, &members, a)?;
    let mut gaps = Vec::new();
    for far in [false, true] {
        let mut g = Vec::new();
        for _ in 0..a.failovers {
            g.push(failover(&lab, &run, far)?);
        }
        let what = if far {
            "far end down (carrier poll)"
        } else {
            "member down (ip link set down)"
        };
        println!(
            "failover, {what}: gaps ms {:?}",
            g.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>()
        );
        gaps.push(median(&mut g));
    }
    println!(
        "failover medians: near-end {:.1} ms, far-end {:.1} ms; team failovers counted {}",
        gaps[0],
        gaps[1],
        run.team.status().failovers
    );
    Ok((ratio, gaps[0]))
}
