//! A VM on a virtual network moves between hosts and keeps its address (issue 11,
//! docs/netvirt.md "A VM that moves"): three vireods A, B, C, each with an overlay switch
//! (real `vireo-switch` processes) whose uplink is a veth into one bridge namespace — the
//! provider network. VM X (CA 10.0.0.5) runs on A, probe VM P (CA 10.0.0.3) on C and keeps
//! sending UDP to X while X live-migrates A → B. A capture on the bridge shows every frame
//! C sent after the migration job completed went to B's PA and none to A's; C's table names
//! B (pushed by B over the peer channel before the source heard `Running`); A's table
//! forwards to B; and P received X's announcement tunnelled from B.
//!
//! X runs under the fake worker (its migration is the fake's contract; its NIC port exists
//! on the switches but no guest reads it — the frames are observed on the wire), P is a real
//! probe guest under /dev/kvm. The three vireods run in this namespace; only their switches'
//! uplinks cross the bridge namespace, and the peer channel runs over loopback. Needs root,
//! `ip netns`, /dev/kvm, tcpdump, `vireo-switch` and `vireo-vm`: a recorded skip otherwise.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{spec_json, wait_until, Vireod, FAKE_WORKER, VIREOD};
use common::probe::{console, wait_ready};
use serde_json::{json, Value};
use vireo_testkit::Need;

const T: Duration = Duration::from_secs(60);
const PA: [&str; 3] = ["192.0.2.1", "192.0.2.2", "192.0.2.3"];
const X_MAC: [u8; 6] = [2, 0, 0, 0, 0, 5];
const P_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
const X_CA: [u8; 4] = [10, 0, 0, 5];
const P_CA: [u8; 4] = [10, 0, 0, 3];

fn built(name: &str, how: &str) -> Option<PathBuf> {
    let bin = Path::new(VIREOD).with_file_name(name);
    (bin.is_file() || vireo_testkit::skip(&format!("{} ({how})", bin.display()))).then_some(bin)
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

fn must(args: &[&str]) {
    assert!(ip(args), "ip {args:?} failed");
}

/// The provider network: a bridge in its own namespace, one veth per host whose near end
/// (here) is that host's switch uplink. Removed on drop.
struct ProviderNet {
    ns: String,
    uplinks: Vec<String>,
}

impl ProviderNet {
    fn new(hosts: usize) -> ProviderNet {
        // Unique per test too: the tests of this binary run in parallel.
        static NEXT: AtomicU16 = AtomicU16::new(0);
        let id =
            std::process::id() % 10_000 * 10 + u32::from(NEXT.fetch_add(1, Ordering::SeqCst) % 10);
        let net = ProviderNet {
            ns: format!("vnm-{id}"),
            uplinks: (0..hosts).map(|i| format!("nmu{i}{id}")).collect(),
        };
        must(&["netns", "add", &net.ns]);
        must(&["-n", &net.ns, "link", "add", "br0", "type", "bridge"]);
        must(&["-n", &net.ns, "link", "set", "br0", "up"]);
        for (i, near) in net.uplinks.iter().enumerate() {
            let far = format!("nmf{i}{id}");
            must(&[
                "link", "add", near, "type", "veth", "peer", "name", &far, "netns", &net.ns,
            ]);
            // No IPv6 chatter from the kernel on the wires: the capture holds our frames.
            let _ = Command::new("sysctl")
                .args(["-qw", &format!("net.ipv6.conf.{near}.disable_ipv6=1")])
                .status();
            must(&["link", "set", near, "up"]);
            must(&["-n", &net.ns, "link", "set", &far, "master", "br0"]);
            must(&["-n", &net.ns, "link", "set", &far, "up"]);
        }
        net
    }
}

impl Drop for ProviderNet {
    fn drop(&mut self) {
        for near in &self.uplinks {
            ip(&["link", "del", near]);
        }
        ip(&["netns", "del", &self.ns]);
    }
}

/// tcpdump on the bridge into a pcap file; stopped (and flushed) by `stop`, killed on drop.
struct Capture(Option<Child>);

impl Capture {
    fn start(ns: &str, file: &Path) -> Capture {
        let c = Command::new("ip")
            .args([
                "netns", "exec", ns, "tcpdump", "-i", "br0", "-U", "-n", "-w",
            ])
            .arg(file)
            .args(["udp", "port", "4789"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tcpdump");
        wait_until(Duration::from_secs(10), "tcpdump's file", || {
            file.metadata().is_ok_and(|m| m.len() >= 24)
        });
        Capture(Some(c))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: signals our own child (`ip netns exec` execs tcpdump in place).
            unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
            let _ = c.wait();
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A VXLAN packet on the wire: outer addresses and the inner frame.
struct Tunnelled {
    outer_src: [u8; 4],
    outer_dst: [u8; 4],
    inner: Vec<u8>,
}

/// The VXLAN-over-IPv4 packets of a pcap file (Ethernet link type).
fn read_pcap(file: &Path) -> Vec<Tunnelled> {
    let b = std::fs::read(file).unwrap();
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= b.len() {
        let len = u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()) as usize;
        let Some(f) = b.get(at + 16..at + 16 + len) else {
            break;
        };
        at += 16 + len;
        if f.len() < 14 + 20 + 8 + 8 + 14 || f[12..14] != [8, 0] {
            continue;
        }
        let ihl = usize::from(f[14] & 15) * 4;
        let udp = 14 + ihl;
        if f[23] != 17 || f.len() < udp + 16 + 14 || f[udp + 2..udp + 4] != 4789u16.to_be_bytes() {
            continue;
        }
        out.push(Tunnelled {
            outer_src: f[26..30].try_into().unwrap(),
            outer_dst: f[30..34].try_into().unwrap(),
            inner: f[udp + 16..].to_vec(),
        });
    }
    out
}

fn pa(i: usize) -> [u8; 4] {
    PA[i].parse::<std::net::Ipv4Addr>().unwrap().octets()
}

/// The sequence number of one of P's UDP frames to X (its source port), if `inner` is one.
fn seq_of(inner: &[u8]) -> Option<u16> {
    (inner.len() >= 42
        && inner[0..6] == X_MAC
        && inner[12..14] == [8, 0]
        && inner[23] == 17
        && inner[26..30] == P_CA
        && inner[30..34] == X_CA)
        .then(|| u16::from_be_bytes([inner[34], inner[35]]))
}

/// An IPv4/UDP frame P → X with `seq` as its source port.
fn udp_frame(seq: u16) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&X_MAC);
    f.extend_from_slice(&P_MAC);
    f.extend_from_slice(&[8, 0]);
    let payload = b"vireo-moves";
    let total = (20 + 8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&P_CA);
    ip.extend_from_slice(&X_CA);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let c = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&seq.to_be_bytes());
    f.extend_from_slice(&9u16.to_be_bytes());
    f.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn trust(d: &Vireod, other: &Vireod, name: &str) {
    let fp = other.show("/v1/host/identity")["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = d.post_json(
        "/v1/host/trusted",
        &json!({"fingerprint": fp, "name": name}),
    );
    assert!(r.status == 201 || r.status == 200, "{:?}", r.json());
}

fn created(r: common::daemon::Response) {
    assert!(
        r.status == 201 || r.status == 200,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

fn overlay_switch(d: &Vireod, uplink: &str, i: usize) {
    created(d.post_json(
        "/v1/switches",
        &json!({
            "name": "nv",
            "kind": {"type": "external", "interface": uplink},
            "overlay": {
                "provider_addresses": [PA[i]],
                "provider_mac": format!("02:00:00:00:01:0{}", i + 1),
                "routing_domains": [{"name": "red", "encap": "vxlan",
                    "subnets": [{"vsid": 5001, "prefixes": ["10.0.0.0/24"]}]}]
            }
        }),
    ));
}

fn mac_text(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

fn entry(ca: [u8; 4], mac: [u8; 6], pa: &str) -> Value {
    json!({"routing_domain": "red", "ca": std::net::Ipv4Addr::from(ca), "mac": mac_text(mac),
           "vsid": 5001, "pa": pa})
}

/// The PA `d`'s switch process names for X's CA.
fn x_pa(d: &Vireod) -> Option<String> {
    d.show("/v1/switches/nv/policies")
        .as_array()?
        .iter()
        .find(|e| e["ca"] == "10.0.0.5")
        .and_then(|e| e["pa"].as_str().map(str::to_owned))
}

/// X's announcement, tunnelled from B to P's host C: an ARP reply "10.0.0.5 is at X's MAC".
fn x_announced_from_b(t: &Tunnelled) -> bool {
    t.outer_src == pa(1)
        && t.outer_dst == pa(2)
        && t.inner.len() >= 42
        && t.inner[12..14] == [8, 6]
        && t.inner[20..22] == [0, 2]
        && t.inner[22..28] == X_MAC
        && t.inner[28..32] == X_CA
}

/// VM `name` (the fake worker's `words` in its command line) with a NIC in VSID 5001 at `ca`,
/// started.
fn vm_with_nic(d: &Vireod, name: &str, words: &str, mac: [u8; 6], ca: [u8; 4]) {
    d.create(&spec_json(name, words));
    created(d.post_json(
        &format!("/v1/vms/{name}/nics"),
        &json!({"switch": "nv", "mac": mac_text(mac),
                "virtual_subnet": {"vsid": 5001, "ca": [std::net::Ipv4Addr::from(ca)]}}),
    ));
    d.start_vm(name);
}

/// Three vireods (`workers[i]` for host i), each with the overlay switch `nv` on its uplink
/// into `net`, each trusting the others and naming them `--netvirt-peer`s. Returns their
/// migration addresses and the daemons.
fn three_hosts(net: &ProviderNet, tmp: &Path, workers: [&Path; 3]) -> (Vec<String>, [Vireod; 3]) {
    let ports: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let start = |i: usize| {
        let mut args = vec!["--migration-listen", ports[i].as_str()];
        for (_, p) in ports.iter().enumerate().filter(|(j, _)| *j != i) {
            args.extend(["--netvirt-peer", p.as_str()]);
        }
        Vireod::start_args(&tmp.join(format!("h{i}")), workers[i], &args)
    };
    let hosts = [start(0), start(1), start(2)];
    for (i, d) in hosts.iter().enumerate() {
        for (j, o) in hosts.iter().enumerate().filter(|(j, _)| *j != i) {
            trust(d, o, &format!("host-{j}"));
        }
        overlay_switch(d, &net.uplinks[i], i);
    }
    (ports, hosts)
}

#[test]
fn a_moved_vm_is_reached_through_its_new_host_from_a_third_host() {
    if !vireo_testkit::require(Need::Netns)
        || !vireo_testkit::require(Need::Kvm)
        || !vireo_testkit::require(Need::Tcpdump)
    {
        return;
    }
    let (Some(_), Some(real_worker)) = (
        built("vireo-switch", "cargo build --release -p vireo-switchd"),
        built("vireo-vm", "cargo build --release -p vireo-worker"),
    ) else {
        return;
    };
    let net = ProviderNet::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let fake = Path::new(FAKE_WORKER);
    let (ports, hosts) = three_hosts(&net, tmp.path(), [fake, fake, &real_worker]);
    let [a, b, c] = &hosts;
    // X on A; P on C. A and B know P; C knows X at A.
    for d in [a, b] {
        created(d.post_json("/v1/switches/nv/policies", &entry(P_CA, P_MAC, PA[2])));
    }
    created(c.post_json("/v1/switches/nv/policies", &entry(X_CA, X_MAC, PA[0])));
    vm_with_nic(a, "x", "", X_MAC, X_CA);
    vm_with_nic(c, "p", "", P_MAC, P_CA);
    wait_ready(c, "p");

    let pcap = tmp.path().join("provider.pcap");
    let mut capture = Capture::start(&net.ns, &pcap);
    // P sends continuously from here on; `seq` is the next frame's number.
    let seq = Arc::new(AtomicU16::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut p_console = console(c, "p");
    let sender = {
        let (seq, stop) = (seq.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = seq.fetch_add(1, Ordering::SeqCst);
                let hex = vireo_probe_image::console::encode_hex(&udp_frame(n));
                let a = p_console.command(&format!("NET 0 SEND {hex}"), T).unwrap();
                assert_eq!(a, "OK", "frame {n}");
                std::thread::sleep(Duration::from_millis(5));
            }
            p_console
        })
    };
    wait_until(T, "frames before the move", || {
        seq.load(Ordering::SeqCst) > 40
    });
    let moving_from = seq.load(Ordering::SeqCst);

    let r = a.post_json("/v1/vms/x/migrate", &json!({"to": ports[1]}));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let job = a.wait_job(r.json()["id"].as_str().unwrap(), T);
    // Frames numbered from here on were sent after the move was complete.
    let moved_at = seq.load(Ordering::SeqCst);
    assert_eq!(job["state"], "completed", "{job}\n{}", a.log());
    assert_eq!(b.state("x"), "running");
    // B pushed the new PA before A heard `Running`: C's switch already sends to B.
    assert_eq!(x_pa(c).as_deref(), Some(PA[1]), "C's table\n{}", c.log());
    assert_eq!(
        x_pa(a).as_deref(),
        Some(PA[1]),
        "A forwards to B\n{}",
        a.log()
    );

    wait_until(T, "frames after the move", || {
        seq.load(Ordering::SeqCst) > moved_at + 60
    });
    stop.store(true, Ordering::SeqCst);
    let mut p_console = sender.join().unwrap();
    let last = seq.load(Ordering::SeqCst) - 1;
    // The capture lags the probe's `OK` (two switches and tcpdump on a shared machine).
    // X's announcement, tunnelled from B to P: "10.0.0.5 is at X's MAC".
    // The capture lags the probe's `OK` (two switches and tcpdump on a shared machine).
    wait_until(
        T,
        "the last frame and the announcement in the capture",
        || {
            let wire = read_pcap(&pcap);
            wire.iter().any(|t| seq_of(&t.inner) == Some(last))
                && wire.iter().any(x_announced_from_b)
        },
    );
    capture.stop();

    let wire = read_pcap(&pcap);
    let from_c: Vec<(u16, [u8; 4])> = wire
        .iter()
        .filter(|t| t.outer_src == pa(2))
        .filter_map(|t| seq_of(&t.inner).map(|s| (s, t.outer_dst)))
        .collect();
    let to = |host: usize, range: std::ops::RangeInclusive<u16>| {
        from_c
            .iter()
            .filter(|(s, d)| range.contains(s) && *d == pa(host))
            .count()
    };
    let after = moved_at..=last;
    // Before the move C tunnels to A (its first frame may have become the ARP for A's MAC).
    assert!(to(0, 1..=moving_from) >= 30, "{from_c:?}");
    assert_eq!(
        to(0, after.clone()),
        0,
        "frames to A after the move: {from_c:?}"
    );
    assert_eq!(
        to(1, after.clone()),
        after.clone().count(),
        "every frame after the move tunnelled to B: {from_c:?}"
    );
    // The frames sent while it moved: to A (delivered or forwarded there) or to B.
    let during = to(0, moving_from..=moved_at - 1) + to(1, moving_from..=moved_at - 1);
    let forwarded = wire
        .iter()
        .filter(|t| t.outer_src == pa(0) && t.outer_dst == pa(1) && seq_of(&t.inner).is_some())
        .count();
    let last_to_a = from_c
        .iter()
        .filter(|(_, d)| *d == pa(0))
        .map(|(s, _)| *s)
        .max();
    let first_to_b = from_c
        .iter()
        .filter(|(_, d)| *d == pa(1))
        .map(|(s, _)| *s)
        .min();
    eprintln!(
        "moved while frames {moving_from}..{moved_at} were sent: {during} of them on the wire \
         from C, {forwarded} forwarded by A to B; last frame to A {last_to_a:?}, first to B \
         {first_to_b:?}; after the move {} of {} went to B",
        to(1, after.clone()),
        after.count()
    );

    let mut heard = false;
    for _ in 0..64 {
        let Ok(a) = p_console.command("NET 0 RECV 2000", T) else {
            break;
        };
        let Some(f) = a
            .strip_prefix("OK ")
            .and_then(vireo_probe_image::console::decode_hex)
        else {
            break;
        };
        if f.len() >= 42 && f[12..14] == [8, 6] && f[22..28] == X_MAC && f[28..32] == X_CA {
            heard = true;
            break;
        }
    }
    assert!(heard, "P did not receive X's announcement");
}

/// X moves A → B and B's vireod is killed mid-arrival, then restarted; the network must
/// then follow X as after any arrival: B's stale entry for X (B had talked to X at A)
/// dropped, C's and A's tables moved to B's PA, X's announcement tunnelled from B.
/// - quick: B's worker is restoring X (a large restore: the worker answers only once the VM is
///   built, `fake.restore_bind_ms`); the restarted vireod adopts it once it answers. Before
///   `network_owed` the adopted start ran X on B with all three left as they were.
/// - live: B's worker is in the switch-over (`fake.switch_ms`) and runs X while vireod is
///   down; the restarted vireod's recovery adopts it. It used to announce X's ports only.
fn restarted_destination_moves_the_network(quick: bool) {
    if !vireo_testkit::require(Need::Netns) || !vireo_testkit::require(Need::Tcpdump) {
        return;
    }
    if built("vireo-switch", "cargo build --release -p vireo-switchd").is_none() {
        return;
    }
    let net = ProviderNet::new(3);
    let tmp = tempfile::tempdir().unwrap();
    let fake = Path::new(FAKE_WORKER);
    let (ports, [a, mut b, c]) = three_hosts(&net, tmp.path(), [fake, fake, fake]);
    // P's entry, where X's announcement goes; each other host's view of X at A.
    for d in [&a, &b] {
        created(d.post_json("/v1/switches/nv/policies", &entry(P_CA, P_MAC, PA[2])));
    }
    for d in [&b, &c] {
        created(d.post_json("/v1/switches/nv/policies", &entry(X_CA, X_MAC, PA[0])));
    }
    let words = if quick {
        "fake.restore_bind_ms=6000"
    } else {
        "fake.migrate_ms=200 fake.switch_ms=1500"
    };
    vm_with_nic(&a, "x", words, X_MAC, X_CA);
    let pcap = tmp.path().join("provider.pcap");
    let mut capture = Capture::start(&net.ns, &pcap);

    let r = a.post_json(
        "/v1/vms/x/migrate",
        &json!({"to": ports[1], "quick": quick}),
    );
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let job_id = r.json()["id"].as_str().unwrap().to_owned();
    if quick {
        wait_until(T, "X restoring on B", || {
            let r = b.get("/v1/vms/x");
            r.status == 200 && r.json()["state"] == "starting"
        });
    } else {
        wait_until(T, "the switch-over", || {
            let j = a.show(&format!("/v1/jobs/{job_id}"));
            j["migration"]["state"] == "switching" || j["state"] != "running"
        });
        // The source released; the destination sits in its switch-over.
        std::thread::sleep(Duration::from_millis(400));
    }
    b.kill9();
    b.restart();
    let job = a.wait_job(&job_id, T);
    if quick {
        assert_eq!(job["state"], "completed", "{job}\n{}", a.log());
    }
    b.wait_state("x", "running", T);
    wait_until(T, "C's and A's tables naming B for X", || {
        x_pa(&c).as_deref() == Some(PA[1]) && x_pa(&a).as_deref() == Some(PA[1])
    });
    let stored_x = |d: &Vireod| {
        d.show("/v1/switches/nv")["spec"]["overlay"]
            .to_string()
            .contains("10.0.0.5")
    };
    assert!(!stored_x(&b), "B still stores X at A\n{}", b.log());
    wait_until(T, "X's announcement from B in the capture", || {
        read_pcap(&pcap).iter().any(x_announced_from_b)
    });
    capture.stop();
    let owed = tmp
        .path()
        .join("h1/vms")
        .read_dir()
        .unwrap()
        .flatten()
        .any(|e| e.path().join("network-owed").exists());
    assert!(!owed, "the takeover is still recorded as owed");
}

#[test]
fn a_quick_migration_whose_destination_vireod_restarted_mid_restore_still_moves_the_network() {
    restarted_destination_moves_the_network(true);
}

#[test]
fn a_live_migration_whose_destination_vireod_restarted_mid_switch_over_still_moves_the_network() {
    restarted_destination_moves_the_network(false);
}
