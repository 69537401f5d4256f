//! The probe's workload commands under `vireo run`: `DISK i BENCH` answers rates and latency
//! percentiles and really moves the data (a seeded BENCH write leaves the pattern that VERIFY
//! and the host find), and `NET i BLAST`/`SINK` count sequence-numbered frames between two
//! probes on a Vireo switch (vhost-user ports).

use crate::common;

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_probe_image::console::field;
use vireo_probe_image::{probe_elf, ProbeConsole, ProbeError};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{MacAddr, PortConfig, Switch, SwitchConfig};

const T: Duration = Duration::from_secs(60);
const DISK_BYTES: u64 = 4 << 20;

struct Vm {
    child: Child,
    console: ProbeConsole,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_vm(extra: &[&str]) -> Vm {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["run", "--kernel", probe_elf().to_str().unwrap()])
        .args(["--memory", "64M"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let console = ProbeConsole::new(child.stdout.take().unwrap(), child.stdin.take().unwrap());
    let mut vm = Vm { child, console };
    vm.console.wait_ready(T).expect("probe ready");
    vm
}

fn num(answer: &str, key: &str) -> f64 {
    field(answer, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("`{answer}` has no number {key}="))
}

#[test]
fn kvm_probe_disk_bench_answers_rates_and_writes_the_pattern() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("bench.raw");
    std::fs::write(&disk, vec![0u8; DISK_BYTES as usize]).unwrap();
    let mut vm = start_vm(&["--disk", disk.to_str().unwrap()]);
    let c = &mut vm.console;

    for op in ["read", "write", "randread", "randwrite"] {
        let a = c.command(&format!("DISK 0 BENCH {op} 4K 4 1"), T).unwrap();
        let iops = num(&a, "iops");
        let ios = num(&a, "ios");
        let (p50, p99, p999) = (num(&a, "p50_us"), num(&a, "p99_us"), num(&a, "p999_us"));
        assert!(iops > 0.0 && ios > 0.0, "{a}");
        // One second at QD 4: IOPS is about the completed count.
        assert!(iops > ios * 0.5 && iops < ios * 2.0, "{a}");
        let mib_s = num(&a, "mib_s");
        assert!(
            (mib_s - iops * 4096.0 / 1048576.0).abs() < 0.1 + mib_s * 0.01,
            "{a}"
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{a}");
        // At most one notification per batch of submissions, and at least the first one.
        let kicks = num(&a, "kicks");
        assert!(kicks <= ios, "{a}");
    }

    // A seeded sequential write wraps the 4 MiB disk many times and leaves seed 9's pattern
    // everywhere, replacing seed 7's.
    assert_eq!(c.command("DISK 0 WRITE 0 8192 7", T).unwrap(), "OK");
    let a = c.command("DISK 0 BENCH write 4K 4 1 9", T).unwrap();
    assert!(
        num(&a, "ios") * 4096.0 >= DISK_BYTES as f64,
        "did not wrap: {a}"
    );
    assert_eq!(c.command("DISK 0 VERIFY 0 8192 9", T).unwrap(), "OK");
    // Seeded reads verify in the guest: the right seed passes, a wrong one is caught.
    let a = c.command("DISK 0 BENCH randread 4K 4 1 9", T).unwrap();
    assert!(num(&a, "ios") > 0.0, "{a}");
    match c.command("DISK 0 BENCH randread 4K 4 1 10", T) {
        Err(ProbeError::Err(e)) => assert!(e.starts_with("mismatch offset="), "{e}"),
        other => panic!("wrong seed not caught: {other:?}"),
    }
    assert_eq!(c.command("DISK 0 FLUSH", T).unwrap(), "OK");
    // Bad requests are refused, not run.
    for bad in [
        "DISK 0 BENCH read 4K 0 1",
        "DISK 0 BENCH read 4K 129 1",
        "DISK 0 BENCH read 1000 1 1",
        "DISK 0 BENCH scan 4K 1 1",
        "DISK 1 BENCH read 4K 1 1",
    ] {
        assert!(
            matches!(c.command(bad, T), Err(ProbeError::Err(_))),
            "{bad} accepted"
        );
    }
    drop(vm);
    let bytes = std::fs::read(&disk).unwrap();
    assert_eq!(
        vireo_probe_image::pattern::verify(&bytes, 9, 0),
        None,
        "host sees seed 9's pattern"
    );
}

#[test]
fn kvm_probe_net_blast_to_sink_counts_every_frame() {
    if !common::kvm_usable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let macs = [[0x52, 0x54, 0, 0x77, 0, 1], [0x52, 0x54, 0, 0x77, 0, 2]];
    let sw = Arc::new(Mutex::new(
        Switch::new(SwitchConfig::private("blast")).unwrap(),
    ));
    let rt = SwitchRuntime::start(sw.clone()).unwrap();
    let mut servers = Vec::new();
    let mut vms = Vec::new();
    for (k, mac) in macs.iter().enumerate() {
        let cfg = PortConfig {
            macs: vec![MacAddr(*mac)],
            ..PortConfig::access(&format!("vm{k}"), 1)
        };
        let id = lock(&sw).add_port(cfg).unwrap();
        let socket = dir.path().join(format!("vm{k}.sock"));
        let (port, server) = VhostUserServer::listen(&socket, &format!("vm{k}")).unwrap();
        rt.attach(id, port);
        servers.push(server);
        let net = format!("vhost-user={},mac={}", socket.display(), MacAddr(*mac));
        vms.push(start_vm(&["--net", &net]));
    }
    let (a, b) = vms.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    let dst = MacAddr(macs[1]);

    // Fewer frames than the sink has receive buffers: nothing may be dropped anywhere, so the
    // count is exact.
    for (size, n) in [(64, 60), (1500, 60)] {
        b.console.send_line("NET 0 SINK 20").unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let sent = a
            .console
            .command(&format!("NET 0 BLAST {size} {n} {dst}"), T)
            .unwrap();
        assert_eq!(num(&sent, "sent"), n as f64, "{sent}");
        let got = b.console.answer(T).unwrap();
        assert_eq!(num(&got, "frames"), n as f64, "{got}");
        assert_eq!(num(&got, "bytes"), (n * size) as f64, "{got}");
        assert_eq!(num(&got, "lost"), 0.0, "{got}");
        assert_eq!(num(&got, "reordered"), 0.0, "{got}");
        assert_eq!(num(&got, "other"), 0.0, "{got}");
        assert!(num(&sent, "kicks") <= n as f64, "{sent}");
    }
    // A timed blast: whatever the switch drops when the sink's ring is full, nothing is
    // counted twice or out of order, and the sink never sees more than was sent.
    b.console.send_line("NET 0 SINK 20").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let sent = a
        .console
        .command(&format!("NET 0 BLAST 64 1s {dst}"), T)
        .unwrap();
    let got = b.console.answer(T).unwrap();
    let (s, f) = (num(&sent, "sent"), num(&got, "frames"));
    assert!(s > 1000.0 && num(&sent, "frames_s") > 0.0, "{sent}");
    assert!(f > 0.0 && f + num(&got, "lost") <= s, "{sent} / {got}");
    assert_eq!(num(&got, "reordered"), 0.0, "{got}");
    // The same under backpressure (the benchmark's mode): the sink acks, the blaster keeps at
    // most a window of the sink's ring size in flight, so every frame sent is delivered.
    b.console.send_line("NET 0 SINK 20 1000 ack=16").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let sent = a
        .console
        .command(&format!("NET 0 BLAST 1500 1s {dst} window=64"), T)
        .unwrap();
    let got = b.console.answer(T).unwrap();
    let (s, f) = (num(&sent, "sent"), num(&got, "frames"));
    assert!(s > 64.0 && num(&sent, "acks") > 0.0, "{sent}");
    assert!(num(&got, "acks") > 0.0, "{got}");
    assert_eq!(num(&got, "reordered"), 0.0, "{got}");
    if num(&sent, "timeouts") == 0.0 {
        // No window was re-opened by force: nothing can have been dropped.
        assert_eq!((f, num(&got, "lost")), (s, 0.0), "{sent} / {got}");
    } else {
        assert!(f + num(&got, "lost") <= s, "{sent} / {got}");
    }
    // Errors: a frame too short for the header, a bad MAC, an empty window, acks every 0.
    for bad in [
        format!("NET 0 BLAST 20 10 {dst}"),
        "NET 0 BLAST 64 10 52:54:00".to_string(),
        format!("NET 0 BLAST 64 10 {dst} window=0"),
        format!("NET 0 BLAST 64 10 {dst} wndow=4"),
        "NET 0 SINK 1 ack=0".to_string(),
    ] {
        assert!(
            matches!(a.console.command(&bad, T), Err(ProbeError::Err(_))),
            "{bad} accepted"
        );
    }
    drop(vms);
    for s in servers {
        s.stop().unwrap();
    }
    rt.stop().unwrap();
}
