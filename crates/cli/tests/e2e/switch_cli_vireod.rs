//! End to end: switches and VM NICs through vireod and the CLI — two probe VMs on a private
//! switch (its `vireo-switch` process supervised by vireod) exchange frames; a live VLAN change
//! cuts them apart and restores them; metering counts what the probes sent; vireod killed with
//! SIGKILL and restarted re-adopts the same switch process and the frames still flow. Bad
//! inputs leave the inventory unchanged.
//!
//! vireod, vireo-vm and vireo-switch are other packages' binaries, found beside `vireo` in the
//! target directory (`cargo build --release -p vireo-hostd -p vireo-worker -p vireo-switchd`;
//! ./test.sh builds them). Without them the test is a recorded skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vireo_api::switch_rest::SwitchInfo;
use vireo_api::{NicSpec, Vm, VmMetrics};
use vireo_probe_image::console::{decode_hex, ProbeConsole, ProbeError};
use vireo_probe_image::tagged_frame as frame;

const VIREO: &str = env!("CARGO_BIN_EXE_vireo");
const T: Duration = Duration::from_secs(20);

fn binaries() -> Option<[PathBuf; 3]> {
    let dir = Path::new(VIREO).parent().unwrap();
    let bins = ["vireod", "vireo-vm", "vireo-switch"].map(|b| dir.join(b));
    if bins.iter().all(|b| b.is_file()) {
        return Some(bins);
    }
    vireo_testkit::skip(&format!(
        "vireod, vireo-vm and vireo-switch built in {} (cargo build --release -p vireo-hostd \
         -p vireo-worker -p vireo-switchd)",
        dir.display()
    ));
    None
}

struct Daemon {
    dir: tempfile::TempDir,
    host: String,
    bins: [PathBuf; 3],
    child: Option<Child>,
}

impl Daemon {
    fn start() -> Option<Daemon> {
        let bins = binaries()?;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("state/vireod.sock");
        let mut d = Daemon {
            host: format!("unix:{}", socket.display()),
            dir,
            bins,
            child: None,
        };
        d.spawn();
        Some(d)
    }

    fn spawn(&mut self) {
        let state = self.dir.path().join("state");
        let socket = state.join("vireod.sock");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("vireod.log"))
            .unwrap();
        let child = Command::new(&self.bins[0])
            .arg("--state-dir")
            .arg(&state)
            .arg("--worker-bin")
            .arg(&self.bins[1])
            .arg("--switch-bin")
            .arg(&self.bins[2])
            .arg("--storage-root")
            .arg(vireo_probe_image::probe_elf().parent().unwrap())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "vireod did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
        // Its stale socket would pass for the next vireod listening.
        std::fs::remove_file(self.dir.path().join("state/vireod.sock")).unwrap();
    }

    fn vireo(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(VIREO);
        cmd.arg("--host").arg(&self.host).args(args);
        cmd.env_remove("VIREO_HOST");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut child = self
            .vireo(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vireo {args:?} did not finish within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vireo {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A refused command: its exit status and its one error line.
    fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        assert!(!out.status.success(), "vireo {args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        let line = err.lines().last().unwrap_or_default().to_owned();
        assert!(line.starts_with("vireo: error: "), "{err}");
        (out.status.code().unwrap(), line)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// `GET /metrics` over the socket.
    fn scrape(&self) -> String {
        use std::io::{Read, Write};
        let path = self.host.strip_prefix("unix:").unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    }

    /// The inventory as the CLI shows it: VMs and switches without process details.
    fn inventory(&self) -> (Vec<Vm>, Vec<(String, String, usize)>) {
        let vms: Vec<Vm> = self.json(&["vm", "list"]);
        let sws: Vec<SwitchInfo> = self.json(&["switch", "list"]);
        let sws = sws
            .into_iter()
            .map(|s| (s.id.to_string(), s.spec.name, s.nics.len()))
            .collect();
        (vms, sws)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_none() {
            return;
        }
        if let Ok(out) = self.vireo(&["vm", "list", "--output", "json"]).output() {
            let vms: Vec<Vm> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for vm in vms.iter().filter(|vm| vm.state.has_worker()) {
                let _ = self.vireo(&["vm", "turn-off", &vm.spec.name]).output();
            }
        }
        // Switch processes outlive vireod by design: remove the VMs, then the switches.
        for vm in ["a", "b"] {
            let _ = self.vireo(&["vm", "rm", vm]).output();
        }
        if let Ok(out) = self.vireo(&["switch", "list", "--output", "json"]).output() {
            let sws: Vec<SwitchInfo> = serde_json::from_slice(&out.stdout).unwrap_or_default();
            for s in sws {
                let _ = self.vireo(&["switch", "rm", &s.spec.name]).output();
            }
        }
        let mut c = self.child.take().unwrap();
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A probe VM's COM1 through `vireo vm console` (pipes).
struct Console {
    child: Child,
    probe: ProbeConsole,
}

impl Console {
    fn attach(d: &Daemon, vm: &str) -> Console {
        let mut child = d
            .vireo(&["vm", "console", vm])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let probe = ProbeConsole::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
        let mut c = Console { child, probe };
        // The guest may still be booting: ask until it answers.
        let deadline = Instant::now() + T;
        loop {
            match c.probe.command("NET 0 MAC", Duration::from_secs(2)) {
                Ok(a) if a.starts_with("OK mac=") => return c,
                _ if Instant::now() < deadline => {}
                other => panic!("probe {vm} never answered NET 0 MAC: {other:?}"),
            }
        }
    }

    fn send(&mut self, f: &[u8]) {
        self.probe.net_send(0, f).unwrap();
    }

    /// True when `f` arrives within `window` (other frames are skipped).
    fn received(&mut self, f: &[u8], window: Duration) -> bool {
        self.probe.net_receive(0, window, |got| got == f).unwrap()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn mac_of(d: &Daemon, vm: &str) -> [u8; 6] {
    let nics: Vec<NicSpec> = d.json(&["vm", "nic", "list", vm]);
    nics[0].mac.unwrap().0
}

fn nic_usage(d: &Daemon, vm: &str) -> (u64, u64, u64, u64) {
    let m: VmMetrics = d.json(&["vm", "metrics", vm]);
    let n = m
        .nics
        .iter()
        .find(|n| n.name == "nic0")
        .unwrap_or_else(|| panic!("no nic0 in {m:?}"));
    (n.packets_out, n.bytes_out, n.packets_in, n.bytes_in)
}

#[test]
fn kvm_switch_through_vireod_live_vlan_metering_and_readoption() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(mut d) = Daemon::start() else { return };
    let kernel = vireo_probe_image::probe_elf();
    let kernel = kernel.to_str().unwrap();

    d.ok(&["switch", "create", "lan", "--type", "private"]);
    let sw: SwitchInfo = d.json(&["switch", "show", "lan"]);
    assert!(sw.process.running, "{:?}", sw.process);
    let switch_pid = sw.process.pid.unwrap();

    for vm in ["a", "b"] {
        d.ok(&["vm", "create", vm, "--kernel", kernel, "--memory", "32M"]);
        let out = d.ok(&["vm", "nic", "add", vm, "--switch", "lan"]);
        assert!(out.contains("added NIC nic0 on switch lan"), "{out}");
    }

    // Bad inputs: refused with one line, nothing stored.
    let before = d.inventory();
    let (_, e) = d.fails(&["vm", "nic", "add", "a", "--switch", "nope"]);
    assert!(e.contains("no switch \"nope\""), "{e}");
    let (_, e) = d.fails(&["vm", "nic", "add", "a", "--switch", "lan", "--vlan", "5000"]);
    assert!(e.contains("5000"), "{e}");
    let (_, e) = d.fails(&["switch", "create", "lan", "--type", "private"]);
    assert!(e.contains("already exists"), "{e}");
    let (code, e) = d.fails(&["switch", "create", "x", "--type", "internal"]);
    assert_eq!(code, 2, "{e}");
    let (_, e) = d.fails(&["switch", "rm", "lan"]);
    assert!(e.contains("a, b"), "{e}");
    let (_, e) = d.fails(&["vm", "nic", "set", "a", "nic0", "--vlan", "4095"]);
    assert!(e.contains("4095"), "{e}");
    assert_eq!(
        d.inventory(),
        before,
        "a refused request changed the inventory"
    );

    for vm in ["a", "b"] {
        d.ok(&["vm", "start", vm]);
        d.ok(&["vm", "metrics", vm, "--enable"]);
    }
    let (ma, mb) = (mac_of(&d, "a"), mac_of(&d, "b"));
    let (mut a, mut b) = (Console::attach(&d, "a"), Console::attach(&d, "b"));
    let (_, e) = d.fails(&["vm", "nic", "add", "a", "--switch", "lan"]);
    assert!(e.contains("stop the VM first"), "{e}");

    // a → b: three frames arrive.
    for tag in 1..=3 {
        let f = frame(mb, ma, tag);
        a.send(&f);
        assert!(b.received(&f, T), "a -> b #{tag}");
    }
    // b → a: one.
    let f = frame(ma, mb, 9);
    b.send(&f);
    assert!(a.received(&f, T), "b -> a");

    // b's NIC to VLAN 5, live: a's frames no longer reach it; back to VLAN 1: they do.
    let out = d.ok(&["vm", "nic", "set", "b", "nic0", "--vlan", "5"]);
    assert!(out.contains("access 5"), "{out}");
    let f = frame(mb, ma, 4);
    a.send(&f);
    assert!(!b.received(&f, Duration::from_secs(2)), "crossed VLANs");
    d.ok(&["vm", "nic", "set", "b", "nic0", "--vlan", "1"]);
    let f = frame(mb, ma, 5);
    a.send(&f);
    assert!(b.received(&f, T), "VLAN restored");

    // Metering: a sent 5 frames of 64 bytes and received 1; b received 4 and sent 1.
    assert_eq!(nic_usage(&d, "a"), (5, 5 * 64, 1, 64));
    assert_eq!(nic_usage(&d, "b"), (1, 64, 4, 4 * 64));
    // /metrics: the switch port's counters per NIC.
    let prom = d.scrape();
    for line in [
        "vireo_vm_nic_sent_bytes_total{vm=\"a\",nic=\"nic0\"} 320",
        "vireo_vm_nic_received_packets_total{vm=\"b\",nic=\"nic0\"} 4",
    ] {
        assert!(prom.lines().any(|l| l == line), "no {line:?} in:\n{prom}");
    }

    // vireod killed: the switch process lives on and is re-adopted, the inventory is intact.
    let before = d.inventory();
    drop((a, b));
    d.kill9();
    d.spawn();
    let sw: SwitchInfo = d.json(&["switch", "show", "lan"]);
    assert_eq!(sw.process.pid, Some(switch_pid), "{:?}", sw.process);
    assert_eq!(sw.process.restarts, 0);
    let (vms, sws) = d.inventory();
    assert_eq!(sws, before.1);
    let strip = |v: &[Vm]| -> Vec<_> {
        v.iter()
            .map(|v| (v.spec.clone(), v.identity.clone(), v.state.clone()))
            .collect()
    };
    assert_eq!(strip(&vms), strip(&before.0));
    let (mut a, mut b) = (Console::attach(&d, "a"), Console::attach(&d, "b"));
    let f = frame(mb, ma, 6);
    a.send(&f);
    assert!(b.received(&f, T), "a -> b after vireod's restart");
    // The counts carry on across the restart.
    assert_eq!(nic_usage(&d, "a"), (6, 6 * 64, 1, 64));
    // (Read now: what a switch process counted after its last reading dies with it.)
    assert_eq!(nic_usage(&d, "b"), (1, 64, 5, 5 * 64));
    drop((a, b));

    // The switch process killed: vireod restarts it (a new pid), and the VMs get their link
    // back at their next start.
    // SAFETY: kill(2) on the switch process this test's vireod started.
    assert_eq!(unsafe { libc::kill(switch_pid as i32, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let sw = loop {
        let sw: SwitchInfo = d.json(&["switch", "show", "lan"]);
        if sw.process.running && sw.process.pid != Some(switch_pid) {
            break sw;
        }
        assert!(Instant::now() < deadline, "not restarted: {:?}", sw.process);
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(sw.process.restarts, 1);
    assert_eq!(sw.ports.len(), 2, "{:?}", sw.ports);
    for vm in ["a", "b"] {
        d.ok(&["vm", "turn-off", vm]);
        d.ok(&["vm", "start", vm]);
    }
    let (mut a, mut b) = (Console::attach(&d, "a"), Console::attach(&d, "b"));
    let f = frame(mb, ma, 7);
    a.send(&f);
    assert!(
        b.received(&f, T),
        "a -> b after the switch process restarted"
    );
    // Metering counts the new process's counters from zero on top of the totals.
    assert_eq!(nic_usage(&d, "a"), (7, 7 * 64, 1, 64));
    assert_eq!(nic_usage(&d, "b"), (1, 64, 6, 6 * 64));
    drop((a, b));

    // Removing a VM removes its port from the switch process; b still holds the switch.
    d.ok(&["vm", "turn-off", "a"]);
    d.ok(&["vm", "rm", "a"]);
    let sw: SwitchInfo = d.json(&["switch", "show", "lan"]);
    assert_eq!(sw.ports.len(), 1, "{:?}", sw.ports);
    assert_eq!(sw.nics.len(), 1);
    assert_eq!(sw.ports[0].config.name, sw.nics[0].port);
    let (_, e) = d.fails(&["switch", "rm", "lan"]);
    assert!(e.contains("VM(s) b;"), "{e}");
}

fn sh(args: &[&str]) -> Output {
    Command::new(args[0]).args(&args[1..]).output().unwrap()
}

fn must(args: &[&str]) {
    let out = sh(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a veth pair into it; removed on drop.
struct Lab {
    ns: String,
    host: String,
    guest: String,
}

impl Lab {
    fn new() -> Lab {
        let k = std::process::id() % 100_000;
        let lab = Lab {
            ns: format!("vireo-netd-{k}"),
            host: format!("vnd{k}h"),
            guest: format!("vnd{k}g"),
        };
        must(&["ip", "netns", "add", &lab.ns]);
        let _ = sh(&[
            "ip",
            "netns",
            "exec",
            &lab.ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ]);
        must(&[
            "ip", "link", "add", &lab.host, "type", "veth", "peer", "name", &lab.guest,
        ]);
        let _ = sh(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{}.disable_ipv6=1", lab.host),
        ]);
        must(&["ip", "link", "set", &lab.guest, "netns", &lab.ns]);
        must(&["ip", "link", "set", &lab.host, "up"]);
        must(&[
            "ip",
            "-n",
            &lab.ns,
            "addr",
            "add",
            "10.93.0.1/24",
            "dev",
            &lab.guest,
        ]);
        must(&["ip", "-n", &lab.ns, "link", "set", &lab.guest, "up"]);
        lab
    }

    fn rx_packets(&self) -> u64 {
        let path = format!("/sys/class/net/{}/statistics/rx_packets", self.guest);
        let out = sh(&["ip", "netns", "exec", &self.ns, "cat", &path]);
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = sh(&["ip", "link", "del", &self.host]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}

#[test]
fn kvm_netns_interface_port_and_a_vm_exchange_frames() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm)
        || !vireo_testkit::require(vireo_testkit::Need::Netns)
    {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    let lab = Lab::new();
    let kernel = vireo_probe_image::probe_elf();
    d.ok(&["switch", "create", "ext", "--type", "private"]);
    d.ok(&["switch", "port", "add", "ext", "--iface", &lab.host]);
    let (_, e) = d.fails(&["switch", "port", "add", "ext", "--iface", &lab.host]);
    assert!(e.contains("already has a port"), "{e}");
    // The VM's name is a/b in the Drop's clean-up list.
    d.ok(&[
        "vm",
        "create",
        "a",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
    ]);
    d.ok(&["vm", "nic", "add", "a", "--switch", "ext"]);
    d.ok(&["vm", "start", "a"]);
    let ma = mac_of(&d, "a");
    let mut a = Console::attach(&d, "a");

    // VM → namespace: three broadcast frames reach the veth in the namespace.
    let rx = lab.rx_packets();
    for tag in 1..=3 {
        a.send(&frame([0xff; 6], ma, tag));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while lab.rx_packets() < rx + 3 {
        assert!(
            Instant::now() < deadline,
            "the namespace got {} frames",
            lab.rx_packets() - rx
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sw: SwitchInfo = d.json(&["switch", "show", "ext"]);
    let port = sw.ports.iter().find(|p| p.config.name == lab.host).unwrap();
    assert!(port.meters.packets_out >= 3, "{:?}", port.meters);

    // Namespace → VM: a ping's ARP request (broadcast) arrives at the probe.
    let ns = lab.ns.clone();
    let pinger = std::thread::spawn(move || {
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "ping",
            "-c",
            "3",
            "-W",
            "1",
            "10.93.0.2",
        ])
    });
    let mut arp = false;
    for _ in 0..20 {
        match a.probe.command("NET 0 RECV 1000", T) {
            Ok(answer) => {
                let f = decode_hex(answer.trim_start_matches("OK").trim()).unwrap_or_default();
                if f.len() > 14 && f[12..14] == [0x08, 0x06] {
                    arp = true;
                    break;
                }
            }
            Err(ProbeError::Err(e)) if e == "timeout" => {}
            Err(e) => panic!("NET RECV: {e}"),
        }
    }
    let _ = pinger.join();
    assert!(arp, "no ARP request from the namespace reached the VM");
    drop(a);
}
