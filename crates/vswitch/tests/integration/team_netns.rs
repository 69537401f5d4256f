//! NIC teaming end to end: the switch's uplink is a team of two veth members whose far ends
//! sit in one namespace. This kernel has no bonding/team driver, so the far end is a Linux
//! bridge over both links (valid for switch-independent teaming, which is built for a switch
//! that does not know about the team) and, for LACP, scapy's LACP implementation
//! (`lacp_partner.py`) as the partner. Needs root, `ip netns`, iperf3, tcpdump and
//! python3-scapy: a recorded skip otherwise, a failure under CI. Namespaces, links and child
//! processes are removed on drop, even when an assert fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::team::TeamPort;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::common;
use common::host::*;
use common::netns::*;

const PYTHON: &str = "/usr/bin/python3";

/// Kills and reaps a child on drop.
struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One VM namespace (`n1`, 10.9.0.1) on a switch whose uplink is a team of `h2`,`h3`; their
/// far ends `g2`,`g3` are in namespace `n2`, bridged as `br0` with 10.9.0.2.
struct Topo {
    // Field order is drop order: the switch stops before the links go.
    rt: Option<SwitchRuntime>,
    team: Arc<TeamPort>,
    lab: Lab,
    a: String,
    b: String,
}

impl Drop for Topo {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            let _ = rt.stop();
        }
    }
}

fn available(tag: &str) -> bool {
    use vireo_testkit::{require_all, Need};
    netns_available(tag)
        && require_all(&[Need::Iperf3, Need::Tcpdump])
        && (Command::new(PYTHON)
            .args(["-c", "import scapy.contrib.lacp"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            || vireo_testkit::skip("python3-scapy (scapy.contrib.lacp; ./setup.sh installs it)"))
}

fn topo(tag: &str, cfg: impl FnOnce(&mut TeamConfig)) -> Topo {
    let mut lab = Lab::new("tm", tag);
    let a = lab.add_ns(1);
    set_ipv6(&a, false);
    let (h1, g1) = lab.veth(1);
    configure(&a, &g1, &["10.9.0.1"]);
    let b = lab.add_ns(2);
    set_ipv6(&b, false);
    must(&["ip", "-n", &b, "link", "add", "br0", "type", "bridge"]);
    let mut members = Vec::new();
    for k in [2, 3] {
        let (h, g) = (lab.host(k), lab.guest(k));
        must(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &g]);
        lab.own_link(h.clone());
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{h}.disable_ipv6=1"),
        ]);
        must(&["ip", "link", "set", &g, "netns", &b]);
        must(&["ip", "link", "set", &h, "up"]);
        // Our members read without virtio-net headers: full checksums, no TSO super-frames.
        must(&["ip", "netns", "exec", &b, "ethtool", "-K", &g, "tx", "off"]);
        must(&["ip", "-n", &b, "link", "set", &g, "master", "br0", "up"]);
        members.push(h);
    }
    must(&[
        "ip", "netns", "exec", &b, "ethtool", "-K", "br0", "tx", "off",
    ]);
    configure(&b, "br0", &["10.9.0.2"]);

    let mut sc = SwitchConfig::private("team");
    sc.fast_path = false;
    sc.ports = vec![
        PortConfig::access("vm", 1),
        PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("uplink", 1)
        },
    ];
    let members: Vec<&str> = members.iter().map(|m| m.as_str()).collect();
    let mut tc = TeamConfig::new(&members);
    cfg(&mut tc);
    let team = Arc::new(TeamPort::new("uplink", tc).expect("team"));
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(Switch::new(sc).unwrap()))).unwrap();
    rt.attach(PortId(0), Arc::new(PacketPort::bind_offload(&h1).unwrap()));
    rt.attach(PortId(1), team.clone());
    std::thread::sleep(Duration::from_millis(100));
    Topo {
        rt: Some(rt),
        team,
        lab,
        a,
        b,
    }
}

impl Topo {
    fn member(&self, k: usize) -> String {
        self.lab.host(k + 2)
    }
    fn status(&self) -> TeamStatus {
        self.team.status()
    }
    /// Polls `ok` on the team status every 50 ms for at most `secs`.
    fn wait(&self, secs: u64, ok: impl Fn(&TeamStatus) -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if ok(&self.status()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        ok(&self.status())
    }
    fn iperf(&self, extra: &[&str]) -> Child {
        let mut args = vec![
            "netns", "exec", &self.a, "iperf3", "-c", "10.9.0.2", "-p", "5201",
        ];
        args.extend_from_slice(extra);
        Command::new("ip")
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("iperf3 client")
    }
}

/// Waits at most `secs` for a child; its exit status and output, or None if it had to be killed.
fn finish(c: Child, secs: u64) -> Option<(bool, String)> {
    let mut c = Reap(c);
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if let Ok(Some(_)) = c.0.try_wait() {
            let mut out = String::new();
            use std::io::Read;
            if let Some(mut o) = c.0.stdout.take() {
                let _ = o.read_to_string(&mut out);
            }
            if let Some(mut e) = c.0.stderr.take() {
                let _ = e.read_to_string(&mut out);
            }
            let ok = c.0.wait().is_ok_and(|s| s.success());
            return Some((ok, out));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Longest silence (ms) between consecutive packets of a `tcpdump -tt` capture file.
fn longest_gap_ms(pcap: &Path) -> f64 {
    let text = output(&["tcpdump", "-r", pcap.to_str().unwrap(), "-tt", "-n"]);
    let times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        times.len() > 100,
        "capture too small: {} packets",
        times.len()
    );
    times
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max)
}

#[test]
fn switch_independent_dynamic_spreads_fails_over_and_rejoins() {
    if !available("a") {
        return;
    }
    let t = topo("a", |c| c.distribution = Distribution::Dynamic);
    assert!(ping(&t.a, 3, 6, &["10.9.0.2"]), "ping across the team");
    let srv = Reap(iperf_server(&t.b, 5201));

    // Several streams: dynamic distribution puts new flowlets on the least-loaded member.
    let (ok, out) = finish(t.iperf(&["-P", "4", "-t", "2"]), 20).expect("iperf3 finished");
    assert!(ok, "iperf3 -P 4 failed: {out}");
    drop(srv);
    let s = t.status();
    assert!(
        s.members.iter().all(|m| m.tx_frames > 1000),
        "both members carry traffic: {s:#?}"
    );
    assert!(s.flowlets >= 4, "flowlets counted: {s:#?}");

    // One paced stream; the member carrying it goes down mid-transfer.
    let srv = Reap(iperf_server(&t.b, 5201));
    let pcap = std::env::temp_dir().join(format!("{}-gap.pcap", t.lab.prefix));
    let cap = Reap(
        Command::new("ip")
            .args([
                "netns", "exec", &t.b, "tcpdump", "-i", "br0", "-s", "96", "-U", "-w",
            ])
            .arg(&pcap)
            .args(["tcp", "dst", "port", "5201", "and", "greater", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump"),
    );
    std::thread::sleep(Duration::from_millis(500));
    let before = t.status();
    let client = t.iperf(&["-t", "4", "-b", "200M"]);
    std::thread::sleep(Duration::from_millis(1500));
    let mid = t.status();
    let busy = (0..2)
        .max_by_key(|k| mid.members[*k].tx_bytes - before.members[*k].tx_bytes)
        .unwrap();
    must(&["ip", "link", "set", &t.member(busy), "down"]);
    let downed_at = t.status().members[busy].tx_bytes;
    let (ok, out) = finish(client, 20).expect("iperf3 finished");
    assert!(ok, "the TCP stream survives the member going down: {out}");
    drop(cap);
    drop(srv);
    let after = t.status();
    assert!(!after.members[busy].link_up && !after.members[busy].distributing);
    assert!(after.failovers >= 1, "{after:#?}");
    assert_eq!(
        after.members[busy].tx_bytes, downed_at,
        "nothing sent on a down member"
    );
    let other = 1 - busy;
    assert!(
        after.members[other].tx_bytes > mid.members[other].tx_bytes + 1_000_000,
        "the stream moved to the other member: {after:#?}"
    );
    let gap = longest_gap_ms(&pcap);
    let _ = std::fs::remove_file(&pcap);
    println!("failover_gap_ms={gap:.1}");

    must(&["ip", "link", "set", &t.member(busy), "up"]);
    assert!(
        t.wait(5, |s| s.members[busy].link_up
            && s.members[busy].distributing),
        "the member rejoins: {:#?}",
        t.status()
    );
    assert!(ping(&t.a, 3, 6, &["10.9.0.2"]), "ping after rejoin");
}

/// The ports of the far-end bridge on which its forwarding table shows `mac`, sampled every
/// 50 ms while `busy` runs (and once after).
fn fdb_ports_while(t: &Topo, mac: &str, mut busy: Child, secs: u64) -> (Vec<String>, bool, String) {
    let mut ports: Vec<String> = Vec::new();
    let mut both_at_once = false;
    let end = Instant::now() + Duration::from_secs(secs);
    let sample = |ports: &mut Vec<String>| {
        let fdb = output(&["bridge", "-n", &t.b, "fdb", "show", "br", "br0"]);
        let now: Vec<String> = fdb
            .lines()
            .filter(|l| l.starts_with(mac) && !l.contains("permanent"))
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
            .collect();
        for p in &now {
            if !ports.contains(p) {
                ports.push(p.clone());
            }
        }
        now.len() > 1
    };
    while Instant::now() < end && busy.try_wait().ok().flatten().is_none() {
        both_at_once |= sample(&mut ports);
        std::thread::sleep(Duration::from_millis(50));
    }
    both_at_once |= sample(&mut ports);
    // `finish` reaps (and kills, past the deadline) the child.
    let out = match finish(busy, 1) {
        Some((true, _)) => String::new(),
        Some((false, out)) => out,
        None => "timed out".into(),
    };
    (ports, both_at_once, out)
}

/// Source-MAC rewrite (on by default for a switch-independent dynamic team): while 4 TCP
/// streams spread over both members with flowlets moving between them, the far-end bridge
/// learns the VM's MAC only on the primary's port (the other member's frames carry that
/// member's MAC); both members carry traffic and the streams complete. With the rewrite off
/// the same run shows the bridge the VM's MAC on both ports.
#[test]
fn switch_independent_dynamic_rewrites_source_macs_so_a_vm_mac_never_moves() {
    if !available("r") {
        return;
    }
    const VM_MAC: &str = "02:00:00:00:09:01";
    for rewrite in [true, false] {
        let t = topo(if rewrite { "r" } else { "o" }, |c| {
            c.distribution = Distribution::Dynamic;
            // Short gaps: many flowlet moves, the case the rewrite exists for.
            c.flowlet_gap_us = 2_000;
            c.source_mac_rewrite = rewrite;
        });
        must(&[
            "ip",
            "-n",
            &t.a,
            "link",
            "set",
            &t.lab.guest(1),
            "address",
            VM_MAC,
        ]);
        assert!(ping(&t.a, 3, 6, &["10.9.0.2"]), "ping across the team");
        assert_eq!(t.status().source_mac_rewrite, rewrite);
        let srv = Reap(iperf_server(&t.b, 5201));
        let before = t.status();
        let client = t.iperf(&["-P", "4", "-t", "3"]);
        let (ports, both_at_once, failed) = fdb_ports_while(&t, VM_MAC, client, 20);
        drop(srv);
        assert_eq!(failed, "", "iperf3 -P 4 (rewrite {rewrite})");
        let s = t.status();
        let sent = |k: usize| s.members[k].tx_frames - before.members[k].tx_frames;
        assert!(
            sent(0) > 1000 && sent(1) > 1000,
            "both members carry traffic: {s:#?}"
        );
        assert!(s.flowlet_moves > before.flowlet_moves, "{s:#?}");
        if rewrite {
            assert_eq!(
                ports,
                vec![t.lab.guest(2)],
                "the bridge learned the VM's MAC on the primary's port only"
            );
            assert!(!both_at_once);
            assert_eq!(s.members[0].tx_mac_rewritten, 0, "{s:#?}");
            assert!(
                s.members[1].tx_mac_rewritten > 1000,
                "member 1 sends with its own MAC: {s:#?}"
            );
            let m1 = output(&["cat", &format!("/sys/class/net/{}/address", t.member(1))]);
            let fdb = output(&["bridge", "-n", &t.b, "fdb", "show", "br", "br0"]);
            assert!(
                fdb.lines()
                    .any(|l| l.starts_with(m1.trim()) && l.contains(&t.lab.guest(3))),
                "member 1's MAC learned behind its port:\n{fdb}"
            );
            // A peer that answers the L2 source (here: a neighbour entry pinned to member
            // 1's MAC) reaches the VM: the team gives the frames back to the VM that talks
            // to that peer through member 1.
            must(&[
                "ip",
                "-n",
                &t.b,
                "neigh",
                "replace",
                "10.9.0.1",
                "lladdr",
                m1.trim(),
                "dev",
                "br0",
                "nud",
                "permanent",
            ]);
            assert!(
                ping(&t.b, 3, 6, &["10.9.0.1"]),
                "ping to the VM via member 1's MAC"
            );
            let s = t.status();
            assert!(s.members[1].rx_mac_restored >= 3, "{s:#?}");
        } else {
            assert_eq!(
                ports.len(),
                2,
                "without rewrite the VM's MAC moves: {ports:?}"
            );
            assert_eq!(s.members[1].tx_mac_rewritten, 0);
        }
    }
}

#[test]
fn switch_independent_standby_takes_over_only_when_needed() {
    if !available("s") {
        return;
    }
    let mut standby = String::new();
    let t = topo("s", |c| {
        c.standby = Some(c.members[1].clone());
        standby = c.members[1].clone();
        c.distribution = Distribution::AddressHashL4;
    });
    assert!(ping(&t.a, 5, 8, &["10.9.0.2"]), "ping across the team");
    let s = t.status();
    assert!(
        s.members[0].tx_frames >= 5 && s.members[1].tx_frames == 0,
        "{s:#?}"
    );
    assert!(!s.members[1].distributing && !s.members[1].collecting);
    must(&["ip", "link", "set", &t.member(0), "down"]);
    assert!(
        t.wait(2, |s| s.members[1].distributing),
        "standby takes over"
    );
    assert!(ping(&t.a, 5, 8, &["10.9.0.2"]), "ping over the standby");
    assert!(t.status().members[1].tx_frames >= 5);
    must(&["ip", "link", "set", &t.member(0), "up"]);
    assert!(
        t.wait(3, |s| s.members[0].distributing
            && !s.members[1].distributing),
        "the active member takes back over: {:#?}",
        t.status()
    );
}

/// The scapy partner in namespace `b` on both far ends; its control directory and log.
fn partner(t: &Topo) -> (Reap, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("{}-lacp", t.lab.prefix));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("log");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lacp_partner.py");
    let ifaces = format!("{},{}", t.lab.guest(2), t.lab.guest(3));
    let c = Command::new("ip")
        .args(["netns", "exec", &t.b, PYTHON])
        .arg(&script)
        .args(["--ifaces", &ifaces, "--duration", "60", "--dir"])
        .arg(&dir)
        .arg("--log")
        .arg(&log)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("lacp partner");
    (Reap(c), dir, log)
}

#[test]
fn lacp_with_scapy_partner_negotiates_times_out_and_survives_garbage() {
    if !available("l") {
        return;
    }
    let t = topo("l", |c| {
        c.mode = TeamMode::Lacp;
        c.distribution = Distribution::AddressHashL4;
    });
    // tcpdump's own LACP decoder reads our LACPDUs.
    let dump = Command::new("timeout")
        .args([
            "10", "ip", "netns", "exec", &t.b, "tcpdump", "-v", "-n", "-c", "2", "-i",
        ])
        .arg(t.lab.guest(2))
        .args(["ether", "proto", "0x8809", "and", "ether", "src"])
        .arg(format!("{}", MacAddr(read_mac(&t.member(0)))))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (_p, dir, log) = partner(&t);
    let all_dist = |s: &TeamStatus| s.members.iter().all(|m| m.distributing && m.collecting);
    assert!(t.wait(10, all_dist), "LACP negotiation: {:#?}", t.status());
    let (_, text) = finish(dump, 12).expect("tcpdump finished");
    assert!(
        text.contains("LACPv1") && text.contains("Actor Information TLV"),
        "tcpdump decodes our LACPDUs:\n{text}"
    );
    let s = t.status();
    let l0 = s.members[0].lacp.clone().unwrap();
    assert_eq!(l0.partner.system.to_string(), "02:aa:00:00:00:01");
    // Scapy decoded our LACPDUs with collecting+distributing set.
    assert!(wait_for(5, || std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .any(
            |l| l.contains("actor_state=") && state_of(l) & 0x30 == 0x30
        )));
    assert!(ping(&t.a, 3, 6, &["10.9.0.2"]), "ping across the aggregate");

    // Malformed LACPDUs: counted, nothing else changes.
    std::fs::write(dir.join(format!("garbage-{}", t.lab.guest(2))), b"").unwrap();
    assert!(
        t.wait(5, |s| s.members[0].lacp.as_ref().unwrap().bad_pdus >= 5),
        "{:#?}",
        t.status()
    );
    assert!(all_dist(&t.status()));

    // The partner stops talking on one link: that member leaves after its timeout
    // (3 s expired + up to 3 s defaulted), the other stays, traffic keeps flowing.
    std::fs::write(dir.join(format!("silence-{}", t.lab.guest(3))), b"").unwrap();
    assert!(
        t.wait(8, |s| !s.members[1].distributing
            && s.members[0].distributing),
        "LACP timeout: {:#?}",
        t.status()
    );
    assert!(t.status().members[1].lacp.as_ref().unwrap().timeouts >= 1);
    assert!(
        ping(&t.a, 3, 6, &["10.9.0.2"]),
        "ping over the remaining member"
    );
    std::fs::remove_file(dir.join(format!("silence-{}", t.lab.guest(3)))).unwrap();
    assert!(
        t.wait(6, all_dist),
        "rejoin after timeout: {:#?}",
        t.status()
    );

    // The partner changes its system id: counted; the aggregate re-forms with the new one.
    std::fs::write(dir.join("system2"), b"").unwrap();
    assert!(
        t.wait(8, |s| all_dist(s)
            && s.members.iter().all(|m| {
                let l = m.lacp.as_ref().unwrap();
                l.partner_changes >= 1 && l.partner.system.to_string() == "02:bb:00:00:00:02"
            })),
        "partner change: {:#?}",
        t.status()
    );
    std::fs::write(dir.join("stop"), b"").unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn state_of(line: &str) -> u32 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("actor_state="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn wait_for(secs: u64, ok: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn read_mac(ifname: &str) -> [u8; 6] {
    let s = std::fs::read_to_string(format!("/sys/class/net/{ifname}/address")).unwrap();
    s.trim().parse::<MacAddr>().unwrap().0
}
