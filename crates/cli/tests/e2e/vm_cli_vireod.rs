//! End to end: `vireo vm ...` / `vireo job ...` driving a real vireod (and its `vireo-vm`
//! workers running the probe guest) on a temporary state directory.
//!
//! vireod and vireo-vm are other packages' binaries: they are found beside `vireo` in the
//! target directory, where `cargo test --workspace` (./test.sh) builds them. Without them the
//! test is a recorded skip (a failure under CI).

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vireo_api::{Job, JobKind, JobState, Vm};

use crate::vireod_harness;

use vireod_harness::console::Console;
use vireod_harness::Daemon;

/// Creates a probe VM (32 MiB, shutdown line POWEROFF unless `shutdown_line` is false).
fn create_probe(d: &Daemon, name: &str, shutdown_line: bool) -> Vm {
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap();
    let mut args = vec!["vm", "create", name, "--kernel", kernel, "--memory", "32M"];
    if shutdown_line {
        args.extend(["--shutdown-line", "POWEROFF"]);
    }
    args.extend(["--output", "json"]);
    serde_json::from_str(&d.ok(&args)).unwrap()
}

/// A pty: (master, slave).
fn pty() -> (std::fs::File, std::fs::File) {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(name.to_str().unwrap())
        .unwrap();
    (std::fs::File::from(master), tty)
}

#[test]
fn create_list_show_set_rename_rm() {
    let Some(d) = Daemon::start() else { return };
    // A relative kernel path is sent absolute (from the current directory: the temp dir).
    d.state_file("k.elf", b"not run in this test");
    let disk = d.state_file("data.img", &[0u8; 4096]);
    let created = d.ok(&[
        "vm",
        "create",
        "web",
        "--kernel",
        "state/k.elf",
        "--vcpus",
        "1",
        "--disk",
        "state/data.img,ro",
    ]);
    assert!(created.contains("state:         off\n"), "{created}");
    let web = d.vm("web");
    assert_eq!(web.spec.kernel, d.dir.path().join("state/k.elf"));
    assert_eq!(web.spec.disks[0].path, disk);
    let serial = web.identity.disk_serials[0].clone();
    assert!(
        created.contains(&format!("id:            {}\n", web.id())),
        "{created}"
    );
    assert!(created.contains(&format!("serial {serial})")), "{created}");

    d.ok(&[
        "vm",
        "create",
        "db",
        "--kernel",
        k(),
        "--memory",
        "64M",
        "--auto-start=3",
    ]);
    let table = d.ok(&["vm", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "STATE", "VCPUS", "MEMORY", "ID"]
    );
    assert!(
        lines[1].starts_with("db ") && lines[1].contains("64 MiB"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("web") && lines[2].ends_with(&web.id().to_string()),
        "{table}"
    );
    // Show by id is the same VM.
    assert_eq!(d.vm(&web.id().to_string()), web);

    // set: a disk added beside the kept one, which keeps its serial.
    let more = d.state_file("more.img", &[0u8; 4096]);
    d.ok(&[
        "vm",
        "set",
        "web",
        "--memory",
        "128M",
        "--add-disk",
        more.to_str().unwrap(),
        "--shutdown-line",
        "POWEROFF",
    ]);
    let web2 = d.vm("web");
    assert_eq!(web2.spec.memory_bytes, 128 << 20);
    assert_eq!(web2.spec.disks.len(), 2);
    assert_eq!(web2.identity.disk_serials[0], serial);
    assert_ne!(web2.identity.disk_serials[1], serial);
    assert_eq!(web2.spec.shutdown_line.as_deref(), Some("POWEROFF"));
    d.ok(&["vm", "set", "web", "--rm-disk", "0"]);
    assert_eq!(d.vm("web").spec.disks[0].path, more);

    // rename keeps the identity; the old name is gone.
    assert_eq!(
        d.ok(&["vm", "rename", "web", "www"]),
        format!("renamed VM web to www ({})\n", web.id())
    );
    assert_eq!(d.vm("www").id(), web.id());
    assert_eq!(d.fails(&["vm", "show", "web"]).0, 2);
    let (code, line) = d.fails(&["vm", "rename", "www", "db"]);
    assert_eq!(code, 1, "a taken name is a conflict: {line}");

    // rm keeps the disk files unless asked.
    d.ok(&["vm", "rm", "www"]);
    assert!(more.exists());
    d.ok(&["vm", "rm", "db", "--delete-disks"]);
    assert!(d.vms().is_empty());
}

#[test]
fn bad_input_exits_2_with_one_line_and_changes_nothing() {
    let Some(d) = Daemon::start() else { return };
    d.ok(&["vm", "create", "web", "--kernel", k()]);
    let before = d.vms();
    for args in [
        &["vm", "show", "nope"][..],
        &["vm", "create", "x", "--kernel", k(), "--vcpus", "0"],
        &["vm", "create", "x", "--kernel", k(), "--memory", "1000"],
        &["vm", "create", "x", "--kernel", k(), "--memory", "64Q"],
        &["vm", "create", "x/y", "--kernel", k()],
        &["vm", "set", "web", "--vcpus", "100000"],
        &["vm", "set", "web", "--rm-disk", "0"],
        &["vm", "set", "nope", "--vcpus", "1"],
        &["vm", "rename", "web", "a..b"],
        &["vm", "start", "nope"],
        &["vm", "console", "nope", "--log"],
        &["job", "show", "00000000-0000-0000-0000-000000000000"],
        &["job", "list", "--vm", "nope"],
        &["job", "show", "not-a-uuid"],
    ] {
        let out = d.run(args);
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "vireo {args:?}: {err}");
        // Ours are one line; clap's own (a malformed size) add a hint after a blank line.
        if err.starts_with("vireo: error: ") {
            assert_eq!(err.lines().count(), 1, "vireo {args:?}: {err}");
        } else {
            assert!(err.starts_with("error: invalid value"), "{err}");
        }
    }
    // Refusals of the state machine are failures (1), not bad input.
    assert_eq!(
        d.fails(&["vm", "stop", "web"]),
        (1, "vireo: error: cannot stop a VM that is off".into())
    );
    assert_eq!(d.vms(), before, "nothing changed");
}

#[test]
fn probe_guest_start_console_stop_turn_off() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    create_probe(&d, "p", true);
    let out = d.run(&["vm", "start", "p"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "VM p is running\n");
    assert_eq!(d.vm("p").state.name(), "running");

    // The console through pipes: a command in, its answer out, exit 0 at stdin's end.
    let mut console = Console::attach(&d, "p");
    let info = console.ask("INFO");
    assert!(
        info.starts_with("OK mem_mib=32 disks=0 nics=0 cpus=1"),
        "{info}"
    );
    assert_eq!(console.ask("PING"), "OK PONG");
    let (status, err) = console.finish(Duration::from_secs(10));
    assert!(status.success(), "{err}");
    // On a terminal: raw mode, LF (Ctrl-J) ends the probe's line, Ctrl-] detaches.
    let (mut master, tty) = pty();
    let mut child = d
        .vireo(&["vm", "console", "p"])
        .stdin(Stdio::from(tty))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    // Typed before raw mode is on, a line would be cooked (and echoed); wait for the banner.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut banner = String::new();
    stderr.read_line(&mut banner).unwrap();
    assert!(banner.contains("Ctrl-] detaches"), "{banner}");
    master.write_all(b"PING\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("no PONG within 20 s");
        if line.trim_end() == "OK PONG" {
            break;
        }
    }
    master.write_all(b"\x1d").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "Ctrl-] did not detach");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(
        d.vm("p").state.name(),
        "running",
        "detaching leaves the VM running"
    );

    // The ring kept what the guest printed, from boot on.
    let log = d.ok(&["vm", "console", "p", "--log"]);
    assert!(log.contains("PROBE READY"), "{log:?}");
    assert!(log.contains("OK PONG"), "{log:?}");

    // While it runs: its spec and its removal are refused (409 → 1), and a second start too.
    assert_eq!(d.fails(&["vm", "set", "p", "--vcpus", "2"]).0, 1);
    assert_eq!(d.fails(&["vm", "rm", "p"]).0, 1);
    assert_eq!(
        d.fails(&["vm", "start", "p"]),
        (1, "vireo: error: cannot start a VM that is running".into())
    );

    // stop: the shutdown line (POWEROFF) makes the probe power off; the job completes.
    let out = d.run(&["vm", "stop", "p", "--output", "json"]);
    assert!(out.status.success(), "{out:?}");
    let stop: Job = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (stop.kind, stop.state),
        (JobKind::Stop, JobState::Completed)
    );
    assert_eq!(d.vm("p").state.name(), "off");
    let (code, line) = d.fails(&["vm", "console", "p"]);
    assert_eq!(code, 1, "{line}");

    // --no-wait prints the job; job show follows it to the end.
    let job: Job =
        serde_json::from_str(&d.ok(&["vm", "start", "p", "--no-wait", "--output", "json"]))
            .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now: Job =
            serde_json::from_str(&d.ok(&["job", "show", &job.id.to_string(), "--output", "json"]))
                .unwrap();
        if now.state == JobState::Completed {
            break;
        }
        assert_eq!(now.state, JobState::Running, "{now:?}");
        assert!(
            Instant::now() < deadline,
            "start job still running after 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.ok(&["vm", "turn-off", "p"]), "VM p is off\n");
    assert_eq!(d.vm("p").state.name(), "off");

    let jobs = d.ok(&["job", "list", "--vm", "p"]);
    let kinds: Vec<&str> = jobs
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(kinds, ["start", "stop", "start"], "newest first:\n{jobs}");
    assert!(
        jobs.lines()
            .skip(1)
            .all(|l| l.contains(" p ") && l.contains("completed")),
        "{jobs}"
    );
}

#[test]
fn console_ends_when_the_guest_powers_off_and_stop_without_a_shutdown_line_turns_off() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    create_probe(&d, "p", true);
    d.ok(&["vm", "start", "p"]);
    // POWEROFF through the console: the guest goes, vireod closes the console, vireo exits 0
    // while its stdin is still open.
    let mut console = Console::attach(&d, "p");
    assert_eq!(console.ask("POWEROFF"), "OK");
    let deadline = Instant::now() + Duration::from_secs(20);
    while console.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "console did not end with the VM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, err) = console.finish(Duration::from_secs(1));
    assert!(status.success(), "{err}");
    assert!(
        err.contains("vireod closed VM p's console (the VM stopped"),
        "{err}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.vm("p").state.name() != "off" {
        assert!(
            Instant::now() < deadline,
            "VM not off after the guest powered off"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Without a shutdown line the guest is never asked: stop waits --timeout, then turns off.
    create_probe(&d, "q", false);
    d.ok(&["vm", "start", "q"]);
    let started = Instant::now();
    assert_eq!(
        d.ok(&["vm", "stop", "q", "--timeout", "1"]),
        "VM q is off\n"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(d.vm("q").state.name(), "off");
}

/// A kernel path that exists inside the storage roots (never booted where it is used).
fn k() -> &'static str {
    vireo_probe_image::probe_elf().to_str().unwrap()
}

/// Lines until one contains `want` (bounded); panics with what came instead.
fn wait_line(console: &Console, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.lines.recv_timeout(left) {
            Ok(line) if line.contains(want) => return,
            Ok(line) => seen.push(line),
            Err(_) => panic!("no {want:?} within {limit:?}; saw {seen:?}"),
        }
    }
}

#[test]
fn probe_guest_pause_resume_reset_and_metering_of_what_it_wrote() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    d.state_file("m.img", &vec![0u8; 1 << 20]);
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap();
    d.ok(&[
        "vm",
        "create",
        "m",
        "--kernel",
        kernel,
        "--memory",
        "32M",
        "--disk",
        "state/m.img",
    ]);
    // Not running: nothing to pause (409 → exit 1).
    assert_eq!(d.fails(&["vm", "pause", "m"]).0, 1);
    d.ok(&["vm", "start", "m"]);
    let mut console = Console::attach(&d, "m");
    assert_eq!(console.ask("PING"), "OK PONG");
    let on: vireo_api::VmMetrics =
        serde_json::from_str(&d.ok(&["vm", "metrics", "m", "--enable", "--output", "json"]))
            .unwrap();
    assert!(on.enabled);

    // What the guest writes is what metering counts, exactly.
    for _ in 0..3 {
        assert_eq!(console.ask("DISK 0 WRITE 0 64 7"), "OK");
    }
    let m: vireo_api::VmMetrics =
        serde_json::from_str(&d.ok(&["vm", "metrics", "m", "--output", "json"])).unwrap();
    assert_eq!(m.disks.len(), 1, "{m:?}");
    assert_eq!(m.disks[0].write_bytes, 3 * 64 * 512, "{m:?}");
    assert_eq!(m.disks[0].read_bytes, 0, "{m:?}");
    assert_eq!(
        m.disks[0].normalized_ios,
        3 * vireo_api::normalized_ios(64 * 512),
        "{m:?}"
    );
    assert!(m.metered_ms > 0 && m.memory.max_bytes > 0, "{m:?}");
    assert!(m.nics.is_empty());
    let text = d.ok(&["vm", "metrics", "m"]);
    assert!(text.contains("metering:   enabled"), "{text}");
    assert!(text.contains(&(3 * 64 * 512).to_string()), "{text}");

    // Paused: the guest answers nothing until resumed.
    assert_eq!(d.ok(&["vm", "pause", "m"]), "VM m is paused\n");
    assert_eq!(d.vm("m").state.name(), "paused");
    assert_eq!(d.fails(&["vm", "pause", "m"]).0, 1);
    let stdin = console.stdin.as_mut().unwrap();
    stdin.write_all(b"PING\n").unwrap();
    stdin.flush().unwrap();
    let quiet_until = Instant::now() + Duration::from_secs(1);
    while let Some(left) = quiet_until.checked_duration_since(Instant::now()) {
        if let Ok(line) = console.lines.recv_timeout(left) {
            assert!(!line.contains("PONG"), "a paused guest answered: {line}");
        }
    }
    assert_eq!(d.ok(&["vm", "resume", "m"]), "VM m is running\n");
    wait_line(&console, "OK PONG", Duration::from_secs(20));

    // Reset: the guest boots again.
    assert_eq!(d.ok(&["vm", "reset", "m"]), "VM m is running\n");
    wait_line(&console, "PROBE READY", Duration::from_secs(20));
    assert_eq!(console.ask("PING"), "OK PONG");
    assert_eq!(d.vm("m").state.name(), "running");

    // The billing cycle: reset answers the period it ends; the new one starts empty.
    let ended: vireo_api::VmMetrics =
        serde_json::from_str(&d.ok(&["vm", "metrics", "m", "--reset", "--output", "json"]))
            .unwrap();
    assert_eq!(ended.disks[0].write_bytes, 3 * 64 * 512, "{ended:?}");
    assert_eq!(console.ask("DISK 0 WRITE 8 16 3"), "OK");
    let next: vireo_api::VmMetrics =
        serde_json::from_str(&d.ok(&["vm", "metrics", "m", "--output", "json"])).unwrap();
    assert_eq!(next.disks[0].write_bytes, 16 * 512, "{next:?}");
    assert!(next.period_started_at >= ended.period_started_at);
    let (status, err) = console.finish(Duration::from_secs(10));
    assert!(status.success(), "{err}");
}

/// The disks of `vm disk list --output json`.
fn disk_list(d: &Daemon, vm: &str) -> Vec<vireo_api::DiskSpec> {
    serde_json::from_str(&d.ok(&["vm", "disk", "list", vm, "--output", "json"])).unwrap()
}

#[test]
fn probe_guest_disk_hot_add_write_and_remove() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    d.state_file("boot.img", &vec![0u8; 1 << 20]);
    let hot = d.state_file("hot.img", &vec![0u8; 1 << 20]);
    d.state_file("cold.img", &vec![0u8; 1 << 20]);
    d.ok(&[
        "vm",
        "create",
        "h",
        "--kernel",
        k(),
        "--memory",
        "32M",
        "--disk",
        "state/boot.img",
    ]);

    // Off: only the spec changes.
    let out = d.ok(&["vm", "disk", "add", "h", "state/cold.img,ro"]);
    assert!(out.starts_with("added disk "), "{out}");
    assert!(out.contains("as disk 1 (serial "), "{out}");
    let listed = disk_list(&d, "h");
    assert_eq!(listed.len(), 2);
    assert!(listed[1].read_only && listed[1].path.ends_with("cold.img"));
    let table = d.ok(&["vm", "disk", "list", "h"]);
    assert!(
        table.starts_with("INDEX") && table.contains("cold.img"),
        "{table}"
    );
    d.ok(&["vm", "disk", "rm", "h", "1"]);
    assert_eq!(disk_list(&d, "h").len(), 1);

    // Bad input: one line naming the value, nothing changes.
    let before = disk_list(&d, "h");
    let (code, line) = d.fails(&["vm", "disk", "add", "h", "state/missing.img"]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("missing.img"), "{line}");
    let (code, line) = d.fails(&["vm", "disk", "add", "h", "/etc/hostname"]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("outside vireod's storage roots"), "{line}");
    let (code, line) = d.fails(&["vm", "disk", "add", "h", "state/boot.img"]);
    assert_eq!(code, 1, "{line}");
    assert!(
        line.contains("already attached to VM \"h\" as disk 0"),
        "{line}"
    );
    let (code, line) = d.fails(&["vm", "disk", "rm", "h", "nope"]);
    assert_eq!(code, 2, "{line}");
    assert!(line.contains("has no disk \"nope\""), "{line}");
    assert_eq!(disk_list(&d, "h"), before);

    // Running: hot add, the guest finds it on RESCAN, writes to it; metered per disk.
    d.ok(&["vm", "start", "h"]);
    let mut console = Console::attach(&d, "h");
    assert!(console.ask("INFO").contains(" disks=1 "));
    d.ok(&["vm", "metrics", "h", "--enable"]);
    let out = d.ok(&["vm", "disk", "add", "h", "state/hot.img,max-iops=2000"]);
    assert!(out.contains("as disk 1 (serial "), "{out}");
    assert!(out.contains("hot-added"), "{out}");
    assert_eq!(console.ask("RESCAN"), "OK disks=2 added=1 removed=0");
    assert_eq!(console.ask("DISK 1 WRITE 16 64 9"), "OK");
    assert_eq!(console.ask("DISK 1 VERIFY 16 64 9"), "OK");
    let listed = disk_list(&d, "h");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1].max_iops, Some(2000));
    let serial = listed[1].serial.clone().expect("vireod assigns a serial");
    assert_eq!(console.ask("DISK 1 ID"), format!("OK id={serial}"));
    let m: vireo_api::VmMetrics =
        serde_json::from_str(&d.ok(&["vm", "metrics", "h", "--output", "json"])).unwrap();
    let hot_m = m
        .disks
        .iter()
        .find(|x| x.path.ends_with("hot.img"))
        .unwrap_or_else(|| panic!("no hot.img in {m:?}"));
    assert_eq!(hot_m.write_bytes, 64 * 512, "{m:?}");
    assert_eq!(hot_m.read_bytes, 64 * 512, "{m:?}");
    // The same file twice is refused while running too.
    let (code, line) = d.fails(&["vm", "disk", "add", "h", "state/hot.img"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("already attached"), "{line}");

    // Slots: 8 in all; the ninth disk is refused and nothing changes.
    for i in 2..8 {
        d.state_file(&format!("x{i}.img"), &vec![0u8; 64 << 10]);
        d.ok(&["vm", "disk", "add", "h", &format!("state/x{i}.img")]);
    }
    d.state_file("x8.img", &vec![0u8; 64 << 10]);
    let (code, line) = d.fails(&["vm", "disk", "add", "h", "state/x8.img"]);
    assert_eq!(code, 1, "{line}");
    assert!(line.contains("no free disk slot"), "{line}");
    assert_eq!(disk_list(&d, "h").len(), 8);
    assert_eq!(console.ask("RESCAN"), "OK disks=8 added=6 removed=0");
    for i in (2..8).rev() {
        d.ok(&["vm", "disk", "rm", "h", &i.to_string()]);
    }

    // Hot remove by serial: gone from the guest and the spec; the data is in the file.
    let out = d.ok(&["vm", "disk", "rm", "h", &serial]);
    assert!(out.contains("1 disk(s) left"), "{out}");
    assert_eq!(console.ask("RESCAN"), "OK disks=1 added=0 removed=7");
    assert!(console.ask("INFO").contains(" disks=1 "));
    assert_eq!(disk_list(&d, "h").len(), 1);
    let bytes = std::fs::read(&hot).unwrap();
    assert_eq!(
        vireo_probe_image::pattern::verify(&bytes[16 * 512..80 * 512], 9, 16 * 512),
        None
    );
    assert_eq!(console.ask("DISK 0 WRITE 0 8 1"), "OK");
    let (status, err) = console.finish(Duration::from_secs(10));
    assert!(status.success(), "{err}");
    d.ok(&["vm", "turn-off", "h"]);
    assert_eq!(disk_list(&d, "h").len(), 1);
}

#[test]
fn pool_commands_and_the_metering_of_two_probe_guests() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let Some(d) = Daemon::start() else { return };
    let pools = |args: &[&str]| -> Vec<vireo_api::Pool> {
        let mut all = vec!["pool", "list", "--output", "json"];
        all.extend(args);
        serde_json::from_str(&d.ok(&all)).unwrap()
    };
    assert!(d.ok(&["pool", "create", "p"]).contains("vms:     0\n"));
    // A taken name: vireod's 409, exit 1; a bad name: refused before any request, exit 2.
    let (status, err) = d.fails(&["pool", "create", "p"]);
    assert_eq!(status, 1, "{err}");
    assert!(err.contains("\"p\""), "{err}");
    assert_eq!(d.fails(&["pool", "create", "a/b"]).0, 2);
    assert_eq!(d.fails(&["pool", "show", "none"]).0, 2);
    assert_eq!(pools(&[]).len(), 1);

    for (vm, pool) in [("m1", Some("p")), ("m2", None), ("out", None)] {
        d.state_file(&format!("{vm}.img"), &vec![0u8; 1 << 20]);
        let disk = format!("state/{vm}.img");
        let mut args = vec!["vm", "create", vm, "--kernel", k(), "--memory", "32M"];
        args.extend(["--disk", &disk]);
        if let Some(pool) = pool {
            args.extend(["--pool", pool]);
        }
        d.ok(&args);
    }
    assert_eq!(
        d.fails(&["vm", "create", "x", "--kernel", k(), "--pool", "none"])
            .0,
        2
    );
    assert_eq!(
        d.ok(&["pool", "add", "p", "m2"]),
        "VM m2 is in pool p (2 VMs)\n"
    );
    let table = d.ok(&["pool", "list"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!((row[0], row[1], row[3]), ("p", "2", "m1,m2"), "{table}");
    assert_eq!(pools(&["--vm", "m2"])[0].name, "p");
    assert!(pools(&["--vm", "out"]).is_empty());

    // Each guest writes its own amount; the pool counts the members' sum, not "out"'s.
    let mut consoles = Vec::new();
    for (vm, writes) in [("m1", 1), ("m2", 2), ("out", 4)] {
        d.ok(&["vm", "start", vm]);
        let mut console = Console::attach(&d, vm);
        assert_eq!(console.ask("PING"), "OK PONG");
        d.ok(&["vm", "metrics", vm, "--enable"]);
        for _ in 0..writes {
            assert_eq!(console.ask("DISK 0 WRITE 0 64 7"), "OK");
        }
        consoles.push(console);
    }
    let m: vireo_api::PoolMetrics =
        serde_json::from_str(&d.ok(&["pool", "metrics", "p", "--output", "json"])).unwrap();
    assert_eq!((m.vms, m.enabled_vms), (2, 2), "{m:?}");
    assert_eq!(m.disk.write_bytes, 3 * 64 * 512, "{m:?}");
    assert_eq!(m.disk.disks, 2, "{m:?}");
    let names: Vec<&str> = m.members.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["m1", "m2"]);
    let members: Vec<vireo_api::PoolMemberMetrics> = m.members.clone();
    // Equal up to the last bit of the averages: they went through JSON, whose float parsing
    // may round one ULP differently from the sum vireod computed.
    assert_json_close(
        &serde_json::to_value(vireo_api::PoolMetrics::aggregate("p", members)).unwrap(),
        &serde_json::to_value(&m).unwrap(),
    );
    let text = d.ok(&["pool", "metrics", "p"]);
    assert!(
        text.starts_with("pool:       p (2 VMs, 2 metered)\n"),
        "{text}"
    );
    assert!(text.contains("written 96 KiB"), "{text}");
    assert!(text.contains("\nm2 "), "{text}");

    // A pool with VMs goes only with --force, and its VMs stay (running, metered).
    assert_eq!(d.fails(&["pool", "rm", "p"]).0, 1);
    assert_eq!(d.ok(&["pool", "remove", "p", "m2"]), "VM m2 left pool p\n");
    assert_eq!(d.fails(&["pool", "remove", "p", "m2"]).0, 2);
    d.ok(&["pool", "rm", "p", "--force"]);
    assert!(pools(&[]).is_empty());
    assert_eq!(d.vm("m1").state.name(), "running");
    for console in consoles {
        let (status, err) = console.finish(Duration::from_secs(10));
        assert!(status.success(), "{err}");
    }
}

/// `a == b`, but numbers that are not integers need only agree to 1e-9 relative.
fn assert_json_close(a: &serde_json::Value, b: &serde_json::Value) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            assert_eq!(x.len(), y.len(), "{a} vs {b}");
            for (k, v) in x {
                assert_json_close(v, y.get(k).unwrap_or(&Value::Null));
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            assert_eq!(x.len(), y.len(), "{a} vs {b}");
            x.iter().zip(y).for_each(|(v, w)| assert_json_close(v, w));
        }
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!((x - y).abs() <= 1e-9 * x.abs().max(y.abs()), "{x} vs {y}");
        }
        _ => assert_eq!(a, b),
    }
}

#[test]
fn host_identity_and_trust_between_two_daemons() {
    let Some(a) = Daemon::start() else { return };
    let Some(b) = Daemon::start() else { return };
    let fp_a = a.ok(&["host", "identity"]).trim().to_string();
    let fp_b = b.ok(&["host", "identity"]).trim().to_string();
    assert!(fp_a.starts_with("sha256:") && fp_a.len() == 71, "{fp_a}");
    assert_ne!(fp_a, fp_b, "every host has its own identity");
    assert_eq!(
        a.ok(&["host", "identity"]).trim(),
        fp_a,
        "made once, then kept"
    );
    assert!(a
        .ok(&["host", "identity", "--pem"])
        .starts_with("-----BEGIN CERTIFICATE-----"));
    let key = a.dir.path().join("state/host/host.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    assert!(a
        .ok(&["host", "trust", "add", &fp_b, "node-b"])
        .contains("node-b"));
    b.ok(&["host", "trust", "add", &fp_a, "node-a"]);
    let listed: Vec<vireo_api::TrustedHost> =
        serde_json::from_str(&a.ok(&["host", "trust", "list", "--output", "json"])).unwrap();
    assert_eq!(
        listed,
        vec![vireo_api::TrustedHost {
            fingerprint: fp_b.clone(),
            name: "node-b".into()
        }]
    );
    assert!(a.ok(&["host", "trust", "list"]).contains("node-b"));
    // Adding again renames; the list keeps one entry.
    a.ok(&["host", "trust", "add", &fp_b, "b2"]);
    assert!(a.ok(&["host", "trust", "list"]).contains("b2"));

    // Bad input exits 2 with one line naming the problem: refused before any request (a
    // malformed fingerprint) or by vireod's 422 (this host's own, a bad name).
    assert_eq!(a.fails(&["host", "trust", "add", "sha256:12", "x"]).0, 2);
    let (status, err) = a.fails(&["host", "trust", "add", &fp_a, "me"]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("own fingerprint"), "{err}");
    assert_eq!(a.fails(&["host", "trust", "add", &fp_b, "bad name"]).0, 2);

    a.ok(&["host", "trust", "rm", &fp_b]);
    assert_eq!(
        a.ok(&["host", "trust", "list", "--output", "json"]).trim(),
        "[]"
    );
    let (status, err) = a.fails(&["host", "trust", "rm", &fp_b]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("not a trusted host"), "{err}");
}
