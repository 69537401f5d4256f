//! The `switch` benchmark: frames/s through the vswitch pipeline on one core (64 and 1500-byte
//! frames, no policies vs all policies), then TCP throughput (iperf3) between two network
//! namespaces through our switch (veth + AF_PACKET, moved by the switch runtime) vs through a
//! Linux bridge, in the same run. The bridge runs both with its netfilter hooks as found and
//! with them off (see `bridge_nf`); the ratio is against its better figure.

mod bridge_nf;

use crate::netlab::{iperf3, quiet, sh};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etherparse::PacketBuilder;
use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

#[derive(clap::Args)]
pub struct SwitchArgs {
    /// Seconds per pipeline measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    iperf_seconds: u32,
    /// iperf3 runs per path (rotating switch/bridge/bridge without netfilter hooks); the ratio uses
    /// the medians, against the better bridge.
    #[arg(long, default_value_t = 3)]
    iperf_runs: u32,
    /// In the MTU-sized run, bind the switch's AF_PACKET ports without offload (no vnet
    /// headers, so no coalescing): the comparison point for the switch's GRO.
    #[arg(long)]
    plain_ports: bool,
    /// Skip the namespace/iperf3 part.
    #[arg(long)]
    no_iperf: bool,
    /// Only run the 64-byte all-policies pipeline case (for profiling).
    #[arg(long, hide = true)]
    only_all_64: bool,
}

const A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];
/// Distinct UDP flows in the steady-state traffic mix.
const FLOWS: u16 = 64;

/// A frame of `size` bytes on the wire without FCS (60 ⇒ a 64-byte frame with FCS).
fn frame(size: usize, sport: u16, src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(src, dst)
        .ipv4([10, 0, 0, 10], [10, 0, 0, 11], 64)
        .udp(sport, 5001);
    let mut f = Vec::new();
    b.write(&mut f, &vec![0u8; size - 42]).expect("frame");
    f
}

fn rule(i: u16, dir: Direction) -> AclRule {
    AclRule {
        name: format!("r{i}"),
        priority: i,
        direction: dir,
        action: AclAction::Deny,
        local_mac: None,
        remote_mac: None,
        local_ip: None,
        remote_ip: Some(
            format!("172.{}.{}.0/24", 16 + i / 256, i % 256)
                .parse()
                .expect("prefix"),
        ),
        protocol: Some(if i & 1 == 0 { 6 } else { 17 }),
        local_ports: None,
        remote_ports: Some(PortRange {
            first: 1000 + i,
            last: 1000 + i,
        }),
        stateful: false,
    }
}

/// 99 deny rules that do not match the traffic, then a metering allow-all: a frame walks all
/// 100 rules when it misses the verdict cache.
fn acl100(dir: Direction) -> Vec<AclRule> {
    let mut v: Vec<AclRule> = (0..99).map(|i| rule(i, dir)).collect();
    v.push(AclRule {
        name: "meter-all".into(),
        priority: 1000,
        action: AclAction::Meter,
        remote_ip: None,
        protocol: None,
        remote_ports: None,
        ..rule(99, dir)
    });
    v
}

fn build_switch(all: bool) -> (Switch, PortId, PortId) {
    let mut cfg = SwitchConfig::private("bench");
    cfg.pvlan_domains = vec![PvlanDomain {
        primary: 100,
        isolated: Some(101),
        communities: vec![102],
    }];
    let mut sw = Switch::new(cfg).expect("switch");
    let (mut a, mut b) = (PortConfig::access("a", 1), PortConfig::access("b", 1));
    if all {
        a.vlan = VlanConfig::Private {
            primary: 100,
            secondary: 102,
            mode: PvlanMode::Community,
        };
        b.vlan = VlanConfig::Private {
            primary: 100,
            secondary: 0,
            mode: PvlanMode::Promiscuous,
        };
        for (p, m, ip) in [(&mut a, A, 10u8), (&mut b, B, 11)] {
            p.macs = vec![MacAddr(m)];
            p.guard.arp_nd_guard = true;
            p.guard.allowed_ipv4 = vec![[10, 0, 0, ip].into()];
            p.storm_limit_pps = Some(1000);
            p.mac_limit = Some(16);
            let fast = RateLimit {
                bits_per_sec: u64::MAX / 4,
                burst_bytes: 1 << 30,
            };
            p.qos.max_ingress = Some(fast);
            p.qos.max_egress = Some(fast);
        }
        a.acls = acl100(Direction::Ingress);
        b.acls = acl100(Direction::Egress);
    }
    let pa = sw.add_port(a).expect("port a");
    let pb = sw.add_port(b).expect("port b");
    if all {
        sw.add_port(PortConfig {
            vlan: VlanConfig::Private {
                primary: 100,
                secondary: 101,
                mode: PvlanMode::Isolated,
            },
            ..PortConfig::access("iso", 1)
        })
        .expect("iso");
        sw.add_port(PortConfig {
            vlan: VlanConfig::Trunk {
                allowed: vec![100, 101, 102],
                native: None,
            },
            ..PortConfig::access("trunk", 1)
        })
        .expect("trunk");
    } else {
        sw.add_port(PortConfig::access("c", 1)).expect("c");
        sw.add_port(PortConfig::access("d", 1)).expect("d");
    }
    (sw, pa, pb)
}

/// CPU time consumed by the calling thread, in seconds: on a shared machine this, not the wall
/// clock, is what "frames per second on one core" means.
fn thread_cpu_secs() -> f64 {
    // SAFETY: timespec is plain old data; all-zero is valid.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: clock_gettime writes one timespec that outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Frames per CPU-second of unicast a → b through the pipeline, measured for about `secs` of
/// CPU time.
fn pipeline_fps(all: bool, size: usize, new_flow_every_frame: bool, secs: f64) -> f64 {
    let (mut sw, pa, pb) = build_switch(all);
    let mut d = Delivery::default();
    // b speaks first so a's frames are known unicast.
    sw.process(pb, &mut frame(60, 1, B, A), 0, &mut d);
    let mut frames: Vec<Vec<u8>> = (0..FLOWS).map(|i| frame(size, 10_000 + i, A, B)).collect();
    let mut sport: u16 = 0;
    let start = Instant::now();
    let cpu0 = thread_cpu_secs();
    let mut n: u64 = 0;
    let mut delivered: u64 = 0;
    loop {
        let now = start.elapsed().as_nanos() as u64;
        for f in frames.iter_mut() {
            if new_flow_every_frame {
                sport = sport.wrapping_add(1);
                f[34..36].copy_from_slice(&sport.to_be_bytes());
            }
            sw.process(pa, f, now, &mut d);
            delivered += d.egress.len() as u64;
        }
        n += frames.len() as u64;
        if n % 65536 < FLOWS as u64 && thread_cpu_secs() - cpu0 >= secs {
            break;
        }
    }
    let fps = n as f64 / (thread_cpu_secs() - cpu0);
    assert_eq!(delivered, n, "every frame must be delivered exactly once");
    fps
}

/// One iperf3 run: throughput and where the CPU went.
#[derive(Clone, Copy, Debug)]
struct Run {
    bps: f64,
    retransmits: u64,
    secs: f64,
    /// CPU of the iperf3 client plus server, in cores (iperf3's own figures; they include the
    /// softirq work done in those processes' context).
    iperf_cpu: f64,
    /// CPU of this process (the switch runtime's thread; the bench itself sleeps), in cores.
    switch_cpu: f64,
}

impl Run {
    /// CPU-seconds (iperf3 client + server + switch thread) per GB moved.
    fn cpu_per_gb(&self) -> f64 {
        (self.iperf_cpu + self.switch_cpu) / (self.bps / 8e9)
    }
}

/// User + system CPU seconds of this whole process so far.
fn process_cpu_secs() -> f64 {
    // SAFETY: rusage is plain old data; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Two namespaces `<p>0` (10.88.0.1) and `<p>1` (10.88.0.2), each on a veth whose host end is
/// `<p>h0`/`<p>h1`. Everything is removed on drop.
struct Pair {
    p: String,
}

impl Pair {
    fn new(p: String, offload: bool) -> Result<Pair, String> {
        let pair = Pair { p };
        for k in 0..2 {
            let (ns, h, g) = (pair.ns(k), pair.host(k), format!("{}g{k}", pair.p));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &g])?;
            sh(&["ip", "link", "set", &g, "netns", &ns])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.88.0.{}/24", k + 1),
                "dev",
                &g,
            ])?;
            sh(&["ip", "-n", &ns, "link", "set", &g, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            quiet(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{h}.disable_ipv6=1"),
            ]);
            sh(&["ip", "link", "set", &h, "up"])?;
            if !offload {
                quiet(&["ip", "netns", "exec", &ns, "ethtool", "-K", &g, "tx", "off"]);
            }
        }
        Ok(pair)
    }
    fn ns(&self, k: usize) -> String {
        format!("{}n{k}", self.p)
    }
    fn host(&self, k: usize) -> String {
        format!("{}h{k}", self.p)
    }

    /// iperf3 TCP from namespace 0 to namespace 1.
    fn iperf(&self, secs: u32) -> Result<Run, String> {
        let r = iperf3(&self.ns(0), &self.ns(1), "10.88.0.2", secs, &[])?;
        Ok(Run {
            bps: r.bps,
            retransmits: r.retransmits,
            secs: r.secs,
            iperf_cpu: r.cpu,
            switch_cpu: 0.0,
        })
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for k in 0..2 {
            quiet(&["ip", "netns", "del", &self.ns(k)]);
            quiet(&["ip", "link", "del", &self.host(k)]);
        }
        quiet(&["ip", "link", "del", &format!("{}br", self.p)]);
    }
}

/// TCP through our switch. With `offload`, guests keep their default offloads (64 KiB
/// super-frames); without, guests turn TX checksum offload off and send MTU-sized frames. With
/// `port_offload`, the AF_PACKET ports carry virtio-net headers: super-frames pass whole, and
/// the switch coalesces MTU-sized TCP segments into super-frames (GRO). With `fast_path` (the
/// product default) the switch hands the approved TCP flows to the kernel (tc redirect).
fn through_switch(
    secs: u32,
    offload: bool,
    port_offload: bool,
    fast_path: bool,
) -> Result<Run, String> {
    let pair = Pair::new(
        format!(
            "vsb{}{}{}",
            std::process::id(),
            if offload { "x" } else { "s" },
            if fast_path { "f" } else { "u" }
        ),
        offload,
    )?;
    let mut cfg = SwitchConfig::private("iperf");
    cfg.fast_path = fast_path;
    let mut sw = Switch::new(cfg).map_err(|e| e.to_string())?;
    let p0 = sw
        .add_port(PortConfig::access("h0", 1))
        .map_err(|e| e.to_string())?;
    let p1 = sw
        .add_port(PortConfig::access("h1", 1))
        .map_err(|e| e.to_string())?;
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).map_err(|e| e.to_string())?;
    let bind = |h: &str| {
        if port_offload {
            PacketPort::bind_offload(h)
        } else {
            PacketPort::bind(h)
        }
    };
    rt.attach_packet(
        p0,
        Arc::new(bind(&pair.host(0)).map_err(|e| e.to_string())?),
    );
    rt.attach_packet(
        p1,
        Arc::new(bind(&pair.host(1)).map_err(|e| e.to_string())?),
    );
    let cpu0 = process_cpu_secs();
    let r = pair.iperf(secs).map(|mut r| {
        r.switch_cpu = (process_cpu_secs() - cpu0) / r.secs;
        r
    });
    // Let the fast path's revalidation fold the kernel's counters into the meters.
    std::thread::sleep(Duration::from_millis(600));
    let flows = rt.offloaded_flows().len();
    {
        let sw = vireo_vswitch::runtime::lock(rt.switch());
        for id in [p0, p1] {
            if let Some(st) = sw.status(id) {
                eprintln!(
                    "    port {}: in {} out {} drops {:?}, {flows} flows in the kernel",
                    st.config.name,
                    st.meters.ingress.packets,
                    st.meters.egress.packets,
                    st.meters.drops
                );
            }
        }
    }
    let _ = rt.stop();
    r
}

/// TCP through a Linux bridge; with `hooks_off`, br_netfilter's hooks are off for this run only
/// (restored before returning, whatever happens).
fn through_bridge(secs: u32, offload: bool, hooks_off: bool) -> Result<Run, String> {
    let _off = if hooks_off {
        Some(bridge_nf::HooksOff::new(Path::new(bridge_nf::SYSCTL_DIR))?)
    } else {
        None
    };
    let pair = Pair::new(
        format!(
            "vsb{}{}{}",
            std::process::id(),
            if offload { "o" } else { "b" },
            if hooks_off { "n" } else { "" }
        ),
        offload,
    )?;
    let br = format!("{}br", pair.p);
    sh(&["ip", "link", "add", &br, "type", "bridge"])?;
    sh(&["ip", "link", "set", &br, "up"])?;
    for k in 0..2 {
        sh(&["ip", "link", "set", &pair.host(k), "master", &br])?;
    }
    pair.iperf(secs)
}

fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

pub fn run(args: SwitchArgs) -> Result<(), Box<dyn std::error::Error>> {
    if args.only_all_64 {
        println!(
            "{:.2} Mpps",
            pipeline_fps(true, 60, false, args.seconds) / 1e6
        );
        return Ok(());
    }
    println!("pipeline, frames per CPU-second of one thread, unicast a→b, {FLOWS} UDP flows (sizes exclude the 4-byte FCS):");
    let mut mpps_64_all = 0.0;
    for (size, label) in [(60, "64B"), (1514, "1518B")] {
        let none = pipeline_fps(false, size, false, args.seconds);
        let all = pipeline_fps(true, size, false, args.seconds);
        let miss = pipeline_fps(true, size, true, args.seconds);
        println!(
            "  {label:>6}: no policies {:.2} Mpps | all policies {:.2} Mpps ({:.1} Gbit/s) | all policies, every frame a new flow (ACL cache miss) {:.2} Mpps",
            none / 1e6,
            all / 1e6,
            all * size as f64 * 8.0 / 1e9,
            miss / 1e6
        );
        if size == 60 {
            mpps_64_all = all / 1e6;
        }
    }
    let mut ratio = String::from("n/a");
    if args.no_iperf {
        println!("iperf3 part skipped (--no-iperf)");
    } else {
        println!(
            "TCP between two namespaces, iperf3 -t {}, {} alternating runs per path (median):",
            args.iperf_seconds, args.iperf_runs
        );
        let show = |label: &str, r: &Result<Run, String>| {
            match r {
            Ok(r) => println!(
                "    {label}: {:.2} Gbit/s, {} retransmits, CPU: iperf3 {:.2} + switch {:.2} cores = {:.2} CPU-s/GB",
                r.bps / 1e9,
                r.retransmits,
                r.iperf_cpu,
                r.switch_cpu,
                r.cpu_per_gb()
            ),
            Err(e) => println!("    {label}: failed: {e}"),
        }
        };
        // Where br_netfilter is not loaded the bridge skips netfilter already: one variant.
        let hooks = bridge_nf::describe(Path::new(bridge_nf::SYSCTL_DIR));
        let variants: Vec<(String, bool)> = match &hooks {
            Some(h) => vec![
                (
                    format!("linux bridge, netfilter hooks as found ({h})"),
                    false,
                ),
                ("linux bridge, netfilter hooks off".to_string(), true),
            ],
            None => vec![("linux bridge (br_netfilter not loaded)".to_string(), false)],
        };
        let mut ours = Vec::new();
        let mut bridge = vec![Vec::new(); variants.len()];
        println!("  guest offloads on (default); vireo = veth + AF_PACKET with vnet headers, kernel fast path on (default):");
        for i in 0..args.iperf_runs as usize {
            // Rotate which path goes first so drifting background load hits all alike.
            let paths = 1 + variants.len();
            let mut runs: Vec<Option<Result<Run, String>>> = vec![None; paths];
            for j in 0..paths {
                let k = (i + j) % paths;
                runs[k] = Some(if k == 0 {
                    through_switch(args.iperf_seconds, true, true, true)
                } else {
                    through_bridge(args.iperf_seconds, true, variants[k - 1].1)
                });
            }
            let mut runs = runs.into_iter().map(|r| r.expect("every path ran"));
            let o = runs.next().expect("switch run");
            show("vireo switch", &o);
            ours.extend(o.ok().map(|r| r.bps));
            for ((label, _), (r, acc)) in variants.iter().zip(runs.zip(bridge.iter_mut())) {
                show(label, &r);
                acc.extend(r.ok().map(|r| r.bps));
            }
        }
        // For reference: every frame through user space (the path before the fast path).
        let user = through_switch(args.iperf_seconds, true, true, false);
        show("vireo switch, fast path off (user-space path only)", &user);
        println!(
            "  guest TX checksum offload off (MTU-sized frames), fast path off; vireo ports {}:",
            if args.plain_ports {
                "without vnet headers"
            } else {
                "with vnet headers (switch coalesces segments, GRO)"
            }
        );
        let ours_plain = through_switch(args.iperf_seconds, false, !args.plain_ports, false);
        show("vireo switch", &ours_plain);
        let mut best_plain: Option<f64> = None;
        for (label, off) in &variants {
            let b = through_bridge(args.iperf_seconds, false, *off);
            show(label, &b);
            if let Ok(b) = b {
                best_plain = Some(best_plain.map_or(b.bps, |x| x.max(b.bps)));
            }
        }
        if let (Ok(o), Some(b)) = (&ours_plain, best_plain) {
            println!("    ratio (against the better bridge): {:.3}", o.bps / b);
        }
        let medians: Vec<Option<f64>> = bridge.iter_mut().map(|v| median(v)).collect();
        for ((label, _), m) in variants.iter().zip(&medians) {
            if let Some(m) = m {
                println!("  offloads on, median: {label}: {:.2} Gbit/s", m / 1e9);
            }
        }
        let best = medians
            .iter()
            .zip(&variants)
            .filter_map(|(m, (_, off))| m.map(|m| (m, *off)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let (Some(o), Some((b, off))) = (median(&mut ours), best) {
            println!(
                "  offloads on, median: vireo {:.2} Gbit/s, better bridge ({}) {:.2} Gbit/s",
                o / 1e9,
                if off { "hooks off" } else { "hooks as found" },
                b / 1e9
            );
            ratio = format!("{:.3}", o / b);
            if let Ok(u) = &user {
                println!(
                    "  fast path off (reference): vireo {:.2} Gbit/s = {:.3} of the better bridge median",
                    u.bps / 1e9,
                    u.bps / b
                );
            }
        }
    }
    println!("switch_mpps_64b_all_policies={mpps_64_all:.2} vs_linux_bridge={ratio}");
    Ok(())
}
