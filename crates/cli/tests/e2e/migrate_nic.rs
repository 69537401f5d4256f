//! End to end, under KVM and as root: `vireo vm migrate` of a probe VM whose NIC is a
//! vhost-user port of a switch, while frames flow to it. Two vireods on loopback, each with an
//! external switch `lan` whose uplinks are the two ends of one veth pair (the wire between
//! two hosts). A second probe VM on the source's switch blasts sequence-numbered frames at the
//! migrating VM (`NET BLAST ... window=64`, the sink acknowledging: docs/probe-protocol.md), the
//! migrating VM's `NET SINK` runs through the move and answers on the destination.
//!
//! Checked: the blast outlasts the migration, so frames were sent before, during and after it;
//! the sink, now on the destination, counted them, and the frames it lost are bounded by what
//! the blaster can have in flight (its window, once more for every time its window reopened
//! after acks stopped); the destination's port is connected and delivered frames, the source's
//! port is gone; and a second run, wholly after the move, loses nothing.
//!
//! Twice: in pre-copy, and in post-copy (`--postcopy always`), where the VM runs on the
//! destination before its pages are there: the switch there writes received frames into receive
//! buffers and rings that are still on the source, and must wait for them (its own
//! userfaultfd, handed to the VMM) rather than write into zero pages the VMM's copy would then
//! be refused on.

use std::process::Command;
use std::time::{Duration, Instant};

use vireo_api::switch_rest::SwitchInfo;
use vireo_api::NicSpec;

use crate::vireod_harness;
use vireod_harness::console::Console;
use vireod_harness::migration::{
    migration_address, trust_each_other, two_hosts, two_hosts_source_env, Storage,
};
use vireod_harness::Daemon;

const WINDOW: u64 = 64;

/// A veth pair in this namespace, deleted on drop.
struct Wire([String; 2]);

impl Wire {
    fn new(case: char) -> Wire {
        let tag = std::process::id() % 100_000;
        let ends = [format!("vm{case}A{tag}"), format!("vm{case}B{tag}")];
        let ip = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().unwrap();
            assert!(st.success(), "ip {args:?}");
        };
        ip(&[
            "link", "add", &ends[0], "type", "veth", "peer", "name", &ends[1],
        ]);
        for end in &ends {
            ip(&["link", "set", end, "up"]);
        }
        Wire(ends)
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.0[0]])
            .status();
    }
}

/// Switch processes outlive vireod by design: on the way out (also when an assertion fails)
/// the VMs are turned off and removed, then the switches.
struct RemoveAll<'a>([&'a Daemon; 2]);

impl Drop for RemoveAll<'_> {
    fn drop(&mut self) {
        for d in self.0 {
            for vm in ["m", "blaster", "n"] {
                let _ = d.vireo(&["vm", "turn-off", vm]).output();
                let _ = d.vireo(&["vm", "rm", vm]).output();
            }
            let _ = d.vireo(&["switch", "rm", "lan"]).output();
        }
    }
}

/// Each host's switch `lan` on its end of `wire`, the probe VMs `vms` (32 MiB, a NIC on
/// `lan`) started, and the hosts trusting each other.
fn switches_and_probes(wire: &Wire, hosts: [&Daemon; 2], vms: &[(&Daemon, &str)]) {
    for (d, uplink) in hosts.iter().zip(&wire.0) {
        d.ok(&[
            "switch", "create", "lan", "--type", "external", "--uplink", uplink,
        ]);
    }
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    for (d, vm) in vms {
        d.ok(&["vm", "create", vm, "--kernel", &kernel, "--memory", "32M"]);
        d.ok(&["vm", "nic", "add", vm, "--switch", "lan"]);
        d.ok(&["vm", "start", vm]);
    }
    trust_each_other(hosts[0], hosts[1]);
}

fn mac_of(d: &Daemon, vm: &str) -> String {
    let nics: Vec<NicSpec> =
        serde_json::from_str(&d.ok(&["vm", "nic", "list", vm, "--output", "json"])).unwrap();
    nics[0].mac.unwrap().to_string()
}

fn switch(d: &Daemon) -> SwitchInfo {
    serde_json::from_str(&d.ok(&["switch", "show", "lan", "--output", "json"])).unwrap()
}

/// `key=<n>` of a probe answer.
fn field(answer: &str, key: &str) -> u64 {
    vireo_probe_image::console::field(answer, key)
        .unwrap_or_else(|| panic!("no {key} in {answer}"))
        .parse()
        .unwrap()
}

/// The sink's answer, once it appears in the VM's console log on `d`.
fn sink_answer(d: &Daemon, vm: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = d.ok(&["vm", "console", vm, "--log"]);
        // Whole lines only: on a loaded host the log was read mid-answer once.
        let whole = log.split_inclusive('\n').filter(|l| l.ends_with('\n'));
        if let Some(line) = whole
            .map(str::trim_end)
            .find(|l| l.starts_with("OK frames="))
        {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "the sink never answered: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `frames` frames from `a`'s VM `from` to `mac`, counted by a sink on `vm` of host `at` that
/// ends `idle_ms` after the last one: the blaster's answer and the sink's.
fn blast_to_sink(
    (a, from): (&Daemon, &str),
    (at, vm): (&Daemon, &str),
    mac: &str,
    frames: u32,
    idle_ms: u32,
) -> (String, String) {
    let sink = ask_in_background(at, vm, format!("NET 0 SINK 170 {idle_ms} ack=16"));
    std::thread::sleep(Duration::from_millis(300));
    let mut blaster = Console::attach(a, from);
    let blasted = blaster.ok(&format!("NET 0 BLAST 64 {frames} {mac} window={WINDOW}"));
    let sunk = sink.join().unwrap().expect("the sink's answer");
    (blasted, sunk)
}

/// A timed `NET 0 BLAST` running on a thread; [`Blast::end`] ends it early (the probe ends a
/// timed blast on any console byte), so a test waits for the move, not the blast's worst-case
/// length.
struct Blast {
    answer: std::thread::JoinHandle<Option<String>>,
    stdin: std::process::ChildStdin,
}

impl Blast {
    fn start(d: &Daemon, vm: &str, command: String) -> Blast {
        let mut c = Console::attach(d, vm);
        c.ok("PING");
        c.send(&command).unwrap();
        let stdin = c.stdin.take().unwrap();
        Blast {
            answer: answer_on_a_thread(c, command),
            stdin,
        }
    }

    fn is_finished(&self) -> bool {
        self.answer.is_finished()
    }

    /// Ends the blast now (a bare newline) and returns its answer.
    fn end(mut self) -> Option<String> {
        use std::io::Write;
        let _ = self.stdin.write_all(b"\n");
        let _ = self.stdin.flush();
        self.answer.join().unwrap()
    }
}

/// Runs `command` on `vm`'s console on a thread: its answer when it comes.
fn ask_in_background(
    d: &Daemon,
    vm: &str,
    command: String,
) -> std::thread::JoinHandle<Option<String>> {
    let mut c = Console::attach(d, vm);
    c.ok("PING");
    c.send(&command).unwrap();
    answer_on_a_thread(c, command)
}

/// The answer to `command`, already sent on `c`, waited for on a thread.
fn answer_on_a_thread(mut c: Console, command: String) -> std::thread::JoinHandle<Option<String>> {
    std::thread::spawn(move || {
        let started = Instant::now();
        let answer = c.try_answer(Duration::from_secs(180));
        eprintln!("{command}: {answer:?} after {:?}", started.elapsed());
        answer
    })
}

/// Starts a sink of at most `seconds` on `vm` of `d` that runs through a move (idle 5 s: the
/// move's pause must not end it) and answers on the destination: the console it was sent on,
/// to drop once the VM moved.
fn sink_through_the_move(d: &Daemon, vm: &str, seconds: u32) -> Console {
    let mut sink = Console::attach(d, vm);
    sink.ok("PING");
    sink.send(&format!("NET 0 SINK {seconds} 5000 ack=16"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    sink
}

/// KVM and network namespaces, which every case needs (skipped and said so otherwise).
fn can_run() -> bool {
    vireo_testkit::require(vireo_testkit::Need::Kvm)
        && vireo_testkit::require(vireo_testkit::Need::Netns)
}

/// One at a time: each case runs two vireods, two switches and three or four probe VMs.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn probe_guest_with_a_switch_nic_migrates_while_frames_flow_to_it() {
    migrates_while_frames_flow('p', "never");
}

#[test]
fn probe_guest_with_a_switch_nic_migrates_in_post_copy_while_frames_flow_to_it() {
    migrates_while_frames_flow('c', "always");
}

fn migrates_while_frames_flow(case: char, postcopy: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    let switch_bin = std::path::Path::new(vireod_harness::VIREO)
        .parent()
        .unwrap()
        .join("vireo-switch");
    if !switch_bin.is_file() {
        vireo_testkit::skip(
            "vireo-switch built beside vireo (cargo build --release -p vireo-switchd)",
        );
        return;
    }
    let wire = Wire::new(case);
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    let _remove = RemoveAll([&a, &b]);
    switches_and_probes(&wire, [&a, &b], &[(&a, "m"), (&a, "blaster")]);
    let to = migration_address(&b);
    let m_mac = mac_of(&a, "m");
    let m_port = switch(&a)
        .nics
        .iter()
        .find(|n| n.vm == "m")
        .expect("m's port on the source switch")
        .port
        .clone();

    // The sink runs through the move: it answers on the destination.
    let sink = sink_through_the_move(&a, "m", 170);
    // 35 s: the move must end inside it. It takes seconds idle, but on a host whose disk is
    // busy (a build beside the tests) vireod's fsyncs of the arrival's records took 8-9 s
    // each on both sides, and a 20 s blast ended first.
    let blast = Blast::start(
        &a,
        "blaster",
        format!("NET 0 BLAST 64 35s {m_mac} window={WINDOW}"),
    );
    std::thread::sleep(Duration::from_secs(1));
    let out = a.ok(&[
        "vm",
        "migrate",
        "m",
        "--to",
        &to,
        "--max-downtime",
        "50ms",
        "--postcopy",
        postcopy,
        // Post-copy over two streams: pages placed from two threads, each waking the back
        // end's waiters.
        "--streams",
        if postcopy == "always" { "2" } else { "1" },
        "--output",
        "json",
    ]);
    let job: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(job["state"], "completed", "{job}");
    let phases = job["migration"]["phases"].to_string();
    assert_eq!(
        phases.contains("post-copy served"),
        postcopy == "always",
        "post-copy {postcopy}: {phases}"
    );
    assert!(
        !blast.is_finished(),
        "the blast ended before the migration did: nothing was sent after the move (a slower \
         machine than this test allows for); the migration's phases: {phases}"
    );
    drop(sink);

    // The source's port is gone, the destination's is connected.
    let here = switch(&a);
    assert!(here.nics.iter().all(|n| n.vm != "m"), "{:?}", here.nics);
    assert!(
        here.ports.iter().all(|p| p.config.name != m_port),
        "{:?}",
        here.ports
    );
    let there = switch(&b);
    let nic = there
        .nics
        .iter()
        .find(|n| n.vm == "m")
        .unwrap_or_else(|| panic!("no port for m on the destination: {:?}", there.nics));
    let port = there
        .ports
        .iter()
        .find(|p| p.config.name == nic.port)
        .unwrap_or_else(|| panic!("{} not reported: {:?}", nic.port, there.ports));
    assert!(port.connected, "{port:?}");

    // Frames flowed to the destination's port for a while: the blast may end.
    let until = Instant::now() + Duration::from_secs(10);
    while switch(&b)
        .ports
        .iter()
        .find(|p| p.config.name == nic.port)
        .is_none_or(|p| p.meters.packets_out < 1000)
    {
        assert!(
            Instant::now() < until,
            "no frames through the destination's port"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let blasted = blast.end().expect("the blaster's answer");
    assert!(blasted.starts_with("OK"), "{blasted}");
    let sunk = sink_answer(&b, "m");
    eprintln!(
        "frames through the migration (downtime {} ms): blaster {blasted}; sink {sunk}",
        job["migration"]["downtime_ms"]
    );
    let (sent, timeouts) = (field(&blasted, "sent"), field(&blasted, "timeouts"));
    let (frames, lost) = (field(&sunk, "frames"), field(&sunk, "lost"));
    // Frames reached the VM on the destination's port (the switch delivered them there).
    let there = switch(&b);
    let port = there
        .ports
        .iter()
        .find(|p| p.config.name == nic.port)
        .unwrap();
    assert!(port.meters.packets_out > 0, "{port:?}");
    // What the blaster can have had in flight when the path broke, and again each time its
    // window reopened without acks, is all a move may cost.
    let bound = WINDOW * (timeouts + 1);
    assert!(frames <= sent, "{sunk} / {blasted}");
    assert!(
        sent - frames <= bound,
        "{} frames missing, more than {bound}: {sunk} / {blasted}",
        sent - frames
    );
    assert!(lost <= bound, "{sunk} / {blasted}");

    // Wholly after the move: nothing lost.
    let (blasted, sunk) = blast_to_sink((&a, "blaster"), (&b, "m"), &m_mac, 5000, 2000);
    eprintln!("after the move: blaster {blasted}; sink {sunk}");
    assert_eq!(field(&blasted, "sent"), 5000, "{blasted}");
    assert_eq!(field(&sunk, "frames"), 5000, "{sunk}");
    assert_eq!(field(&sunk, "lost"), 0, "{sunk}");
}

/// Post-copy's risk, with a switch NIC: the source's worker is SIGKILLed while the VM runs on
/// the destination with pages still on the source, and frames keep coming for it. The VM is
/// lost there (never run on zero pages), and the destination's switch, whose thread may have
/// been waiting for one of those pages, is released: frames to another VM on it still flow.
#[test]
fn a_post_copy_lost_with_a_switch_nic_leaves_the_destination_switch_working() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    let wire = Wire::new('l');
    let Some((a, b)) = two_hosts(Storage::Separate) else {
        return;
    };
    let _remove = RemoveAll([&a, &b]);
    switches_and_probes(&wire, [&a, &b], &[(&a, "m"), (&a, "blaster"), (&b, "n")]);
    let to = migration_address(&b);
    let (m_mac, n_mac) = (mac_of(&a, "m"), mac_of(&b, "n"));
    let source_worker = a.worker_pid("m");

    // Frames fill the receive buffers the sink leaves posted; then the guest rewrites an 8 MiB
    // hot set at full speed while the blaster keeps sending: at the switch-over the hot set
    // and those buffers are still on the source, and the switch there writes frames into them.
    let sink = ask_in_background(&a, "m", "NET 0 SINK 170 500 ack=16".into());
    std::thread::sleep(Duration::from_millis(300));
    let mut blaster = Console::attach(&a, "blaster");
    blaster.ok(&format!("NET 0 BLAST 64 2000 {m_mac} window={WINDOW}"));
    drop(blaster);
    sink.join().unwrap().expect("the first sink's answer");
    let mut m = Console::attach(&a, "m");
    m.ok("DIRTY START 16 8 0");
    let blast = Blast::start(
        &a,
        "blaster",
        format!("NET 0 BLAST 64 20s {m_mac} window={WINDOW}"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let migrate = migrate_in_post_copy(&a, &to);
    // The source's job says `postcopy` once the VM runs on the destination.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs: serde_json::Value =
            serde_json::from_str(&a.ok(&["job", "list", "--output", "json"])).unwrap();
        let in_postcopy = jobs.as_array().unwrap().iter().any(|j| {
            let id = j["id"].as_str().unwrap_or_default();
            let shown = a
                .vireo(&["job", "show", id, "--output", "json"])
                .output()
                .unwrap();
            let job: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap_or_default();
            job["migration"]["state"] == "postcopy"
        });
        if in_postcopy {
            break;
        }
        assert!(Instant::now() < deadline, "no post-copy: {jobs}");
        assert!(
            !migrate.is_finished(),
            "the migration ended before post-copy"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("m runs on the destination");
    // SAFETY: kill(2) of the source's worker, a process this test's vireod started.
    let killed = unsafe { libc::kill(source_worker as i32, libc::SIGKILL) };
    assert_eq!(
        killed,
        0,
        "killing the source worker {source_worker}: {}",
        std::io::Error::last_os_error()
    );
    settles_lost(&a, &b, migrate.join().unwrap());
    let _ = blast.end();

    // The destination's switch still forwards: every frame reaches the other VM there.
    every_frame_reaches_n(&a, &b, &n_mac);
}

/// The release itself (docs/migration.md, "Post-copy with a vhost-user NIC", step 6). The source
/// holds its pages after the switch-over (`VIREO_TEST_POSTCOPY_SERVE_HOLD_MS`), so on the
/// destination a thread of the switch waits on a missing page of m when the source worker is
/// killed: the vhost-user thread of m's port, which reads the receive ring's `used.idx` on
/// `SET_VRING_ADDR` (frames flowed to m's sink in the pre-copy, so that page is dirty). The
/// switch keeps its own userfaultfd open and the thread that would close it on `POSTCOPY_END`
/// is the one waiting, so neither that message nor the lost worker's end can wake it: only
/// `release_foreign`, answering the fault the fault thread read before the loss (the worker's
/// log counts it). Then frames flow through that switch to another VM.
///
/// Not shown: the switch thread proper (`vswitch`) waiting on a frame's page, nor frames flowing
/// while the lost worker still lives. The port's rings start only once that `used.idx` page
/// came, and a source that serves at all sends its first background batch (the lowest 64
/// missing pages, where the rings and receive buffers are) at once; and m's vCPUs stop at the
/// loss at once (their waits are interruptible), so the worker ends right after the release.
#[test]
fn a_post_copy_lost_releases_the_switch_thread_waiting_on_its_pages() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    if !can_run() {
        return;
    }
    let wire = Wire::new('r');
    let hold = [("VIREO_TEST_POSTCOPY_SERVE_HOLD_MS", "20000")];
    let Some((a, b)) = two_hosts_source_env(Storage::Separate, &hold) else {
        return;
    };
    let _remove = RemoveAll([&a, &b]);
    let vms = [(&a, "m"), (&a, "blaster"), (&b, "n")];
    switches_and_probes(&wire, [&a, &b], &vms);
    let to = migration_address(&b);
    let (m_mac, n_mac) = (mac_of(&a, "m"), mac_of(&b, "n"));
    let id = a.vm("m").identity.id.to_string();
    let source_worker = a.worker_pid("m");

    // The guest rewrites an 8 MiB hot set, but first, for 4 s of the pre-copy (8 MiB at 1 MB/s
    // take 8 s), frames flow to its sink (the blast goes on until after the loss): the rings they are
    // written into are missing on the destination.
    Console::attach(&a, "m").ok("DIRTY START 16 8 0");
    let sink = sink_through_the_move(&a, "m", 4);
    let blast = Blast::start(
        &a,
        "blaster",
        format!("NET 0 BLAST 64 20s {m_mac} window={WINDOW}"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let migrate = migrate_in_post_copy(&a, &to);
    let switch_pid = switch(&b)
        .process
        .pid
        .expect("the destination's switch process");
    // Within the hold, before the destination's 10 s fault limit.
    let deadline = Instant::now() + Duration::from_secs(60);
    while waiting_on_faults(switch_pid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no thread of the destination's switch waited on a page fault: {}",
            thread_waits(switch_pid)
        );
        assert!(
            !migrate.is_finished(),
            "the migration ended before the switch waited on a page"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let worker = worker_pid_of(&b, &id);
    eprintln!(
        "m runs on the destination (worker {worker}); waiting on its pages there: switch \
         threads {:?}",
        waiting_on_faults(switch_pid)
    );
    // SAFETY: kill(2) of the source's worker, a process this test's vireod started.
    let killed = unsafe { libc::kill(source_worker as i32, libc::SIGKILL) };
    assert_eq!(killed, 0, "{}", std::io::Error::last_os_error());
    let struck = Instant::now();
    drop(sink);

    // The release: 300 ms after the loss, bounded by 5 s. The switch thread must be woken by
    // then: nothing else will wake it.
    let released = "vhost-user back ends were released";
    let log = wait_for_log(&b, &id, released, Duration::from_secs(7));
    let alive = lives(worker);
    let mut still = waiting_on_faults(switch_pid);
    eprintln!(
        "{:?} after the kill: the lost worker {}; switch threads waiting on a page {still:?}",
        struck.elapsed(),
        if alive { "lives" } else { "has ended" },
    );
    // Once the worker ended too (its own limit is 8 s): its end does not wake the thread.
    let deadline = Instant::now() + Duration::from_secs(9);
    while lives(worker) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    still.extend(waiting_on_faults(switch_pid));
    assert!(
        still.is_empty(),
        "{:?} after the kill (the lost worker {}), switch threads still wait on m's pages: \
         {still:?}; the lost worker's log:\n{log}",
        struck.elapsed(),
        if lives(worker) { "lives" } else { "has ended" },
    );
    // The switch's fault was read by the fault thread before the loss, and answered after it.
    let line = log
        .lines()
        .find(|l| l.contains(released))
        .unwrap_or_else(|| panic!("no release in the lost worker's log:\n{log}"));
    let before: u64 = line
        .split(" of them read before the loss")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of faults read before the loss in: {line}"));
    assert!(before >= 1, "{line}");
    settles_lost(&a, &b, migrate.join().unwrap());
    // Settled (the worker's end, m's port gone there): the switch forwards.
    // The blast to m ends first: the switch floods frames to a MAC it no longer has a port
    // for, and n's sink would count them.
    let _ = blast.end();
    every_frame_reaches_n(&a, &b, &n_mac);
}

/// After the loss: every one of 3000 frames from `a`'s blaster reaches the VM `n` on `b`'s switch.
fn every_frame_reaches_n(a: &Daemon, b: &Daemon, n_mac: &str) {
    let (blasted, sunk) = blast_to_sink((a, "blaster"), (b, "n"), n_mac, 3000, 2000);
    eprintln!("after the loss, to another VM there: blaster {blasted}; sink {sunk}");
    assert_eq!(field(&sunk, "frames"), 3000, "{sunk} / {blasted}");
}

/// The threads of process `pid` that wait in the kernel for a userfaultfd to answer their
/// page fault.
fn waiting_on_faults(pid: u32) -> Vec<String> {
    thread_waits(pid)
        .split(", ")
        .filter(|t| t.ends_with(": handle_userfault"))
        .map(|t| t.trim_end_matches(": handle_userfault").to_owned())
        .collect()
}

/// `name: where it sleeps` of each thread of `pid` (/proc's wchan), for the messages.
fn thread_waits(pid: u32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("no process {pid}");
    };
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
    tasks
        .flatten()
        .map(|t| {
            let name = read(t.path().join("comm"));
            format!("{}: {}", name.trim(), read(t.path().join("wchan")).trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pid of the worker of the VM with id `id` on `d` (its record, while vireod's `vm show`
/// may still say it is arriving).
fn worker_pid_of(d: &Daemon, id: &str) -> u32 {
    let record = d.dir.path().join("state/vms").join(id).join("worker.json");
    let text = std::fs::read(&record).unwrap_or_else(|e| panic!("{}: {e}", record.display()));
    let rec: serde_json::Value = serde_json::from_slice(&text).unwrap();
    rec["pid"].as_u64().expect("a pid in worker.json") as u32
}

/// Whether `pid` still runs (a zombie, exited and not yet reaped, does not).
fn lives(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// The worker log of the VM with id `id` on `d` once it holds `line`, waited for at most
/// `limit` (then as it is).
fn wait_for_log(d: &Daemon, id: &str, line: &str, limit: Duration) -> String {
    let path = d.dir.path().join("state/vms").join(id).join("worker.log");
    let deadline = Instant::now() + limit;
    loop {
        let log = std::fs::read_to_string(&path).unwrap_or_default();
        if log.contains(line) || Instant::now() >= deadline {
            return log;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `vireo vm migrate m --postcopy always --bandwidth 1M` from `a` to `to`, on a thread: its
/// output once it ends.
fn migrate_in_post_copy(a: &Daemon, to: &str) -> std::thread::JoinHandle<std::process::Output> {
    let mut cmd = a.vireo(&[
        "vm",
        "migrate",
        "m",
        "--to",
        to,
        "--postcopy",
        "always",
        "--bandwidth",
        "1M",
        "--output",
        "json",
    ]);
    std::thread::spawn(move || cmd.output().unwrap())
}

/// After m's source worker was killed in post-copy (`out`: the migration's output): exactly
/// one record, on the destination, `lost` with its reason (pages were still on the source:
/// the VM cannot be whole); the job failed saying so; the source forgot the VM.
fn settles_lost(a: &Daemon, b: &Daemon, out: std::process::Output) {
    eprintln!(
        "the migration, its source worker killed in post-copy: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    // Exactly one record, on the destination: `lost` with its reason if pages were still on
    // the source; `running` if the last of them had come (the VM is whole there).
    let deadline = Instant::now() + Duration::from_secs(60);
    let outcome = loop {
        let shown = b
            .vireo(&["vm", "show", "m", "--output", "json"])
            .output()
            .unwrap();
        let Ok(vm) = serde_json::from_slice::<vireo_api::Vm>(&shown.stdout) else {
            let log = std::fs::read_to_string(b.dir.path().join("vireod.log")).unwrap_or_default();
            panic!(
                "no record of m on the destination: {}\n{log}",
                String::from_utf8_lossy(&shown.stderr)
            );
        };
        match vm.state.name() {
            "lost" => break format!("{:?}", vm.state),
            "running" if !b.ok(&["job", "list"]).is_empty() => {
                let mut c = Console::attach(b, "m");
                if c.try_ask("PING", Duration::from_secs(5)).is_some() {
                    break "running, whole".to_string();
                }
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "m is {:?} on the destination, neither lost nor running",
            vm.state
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("on the destination: {outcome}");
    assert!(
        outcome.starts_with("Lost"),
        "pages were still on the source: the VM cannot be whole ({outcome}; job {job})"
    );
    assert_eq!(job["state"], "failed", "{job}");
    // One record: the source forgot the VM once the destination said it was lost there.
    let (_, line) = a.fails(&["vm", "show", "m"]);
    assert!(line.contains("no VM \"m\""), "{line}");
    let error = job["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("was lost in the post-copy migration"),
        "{job}"
    );
}
