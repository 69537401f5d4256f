//! `vireo vm ...` / `vireo job ...` against a stand-in daemon (`fake_daemon`): the requests the
//! CLI sends, how it prints the answers, and the exit status and single line of each failure —
//! 4xx bodies, a 101 upgrade for the console, a socket nobody listens on.

use crate::fake_daemon;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use fake_daemon::{vm_of_name, FakeDaemon};
use vireo_api::{Job, JobState, Vm, VmSpec};

fn vireo(fake: &FakeDaemon) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vireo"));
    cmd.arg("--host").arg(fake.host());
    cmd.env_remove("VIREO_HOST");
    cmd
}

/// Runs `cmd` with `stdin`, killed (and the test failed) after 20 s.
fn run(mut cmd: Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("{cmd:?} did not finish within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn ok(fake: &FakeDaemon, args: &[&str]) -> String {
    let out = run(with_args(vireo(fake), args), b"");
    assert!(
        out.status.success(),
        "vireo {args:?}: {out:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn with_args(mut cmd: Command, args: &[&str]) -> Command {
    cmd.args(args);
    cmd
}

/// The exit status and stderr of a failing command.
fn fails(fake: &FakeDaemon, args: &[&str]) -> (i32, String) {
    let out = run(with_args(vireo(fake), args), b"");
    assert!(!out.status.success(), "vireo {args:?} succeeded: {out:?}");
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn one_line(stderr: &str) -> &str {
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("vireo: error: "), "{stderr:?}");
    stderr.trim_end()
}

#[test]
fn create_sends_the_spec_with_absolute_paths_and_prints_the_identity() {
    let fake = FakeDaemon::start();
    let cwd = tempfile::tempdir().unwrap();
    let mut cmd = vireo(&fake);
    cmd.current_dir(cwd.path()).args([
        "vm",
        "create",
        "web",
        "--kernel",
        "k.elf",
        "--disk",
        "disks/a.vhdx,ro",
        "--disk",
        "/abs/b.img,format=raw",
        "--memory",
        "64M",
        "--shutdown-line",
        "POWEROFF",
        "--auto-start=5",
    ]);
    let out = run(cmd, b"");
    assert!(out.status.success(), "{out:?}");
    let seen = fake.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        (seen[0].method.as_str(), seen[0].uri.as_str()),
        ("POST", "/v1/vms")
    );
    assert_eq!(seen[0].headers["content-type"], "application/json");
    let spec: VmSpec = serde_json::from_slice(&seen[0].body).unwrap();
    let cwd = cwd.path().canonicalize().unwrap();
    assert_eq!(spec.kernel, cwd.join("k.elf"));
    assert_eq!(spec.disks[0].path, cwd.join("disks/a.vhdx"));
    assert!(spec.disks[0].read_only);
    assert_eq!(spec.disks[1].path, Path::new("/abs/b.img"));
    assert_eq!(spec.memory_bytes, 64 << 20);
    assert_eq!(spec.shutdown_line.as_deref(), Some("POWEROFF"));
    assert!(spec.auto_start.enabled && spec.auto_start.delay_secs == 5);
    let text = String::from_utf8(out.stdout).unwrap();
    let id = vm_of_name("web");
    assert!(text.contains(&format!("id:            {id}\n")), "{text}");
    let serial = &id.simple().to_string()[..12];
    assert!(text.contains(&format!("serial {serial}-0)")), "{text}");

    // JSON: the API's VM object as the daemon sent it.
    let json = ok(
        &fake,
        &["vm", "create", "db", "--kernel", "/k", "--output", "json"],
    );
    let vm: Vm = serde_json::from_str(&json).unwrap();
    assert_eq!((vm.spec.name.as_str(), vm.id()), ("db", vm_of_name("db")));
}

#[test]
fn errors_are_one_line_with_the_status_of_their_kind() {
    let fake = FakeDaemon::start();
    let (code, err) = fails(&fake, &["vm", "show", "missing"]);
    assert_eq!(
        (code, one_line(&err)),
        (2, "vireo: error: no VM named \"missing\"")
    );
    let (code, err) = fails(&fake, &["vm", "create", "taken", "--kernel", "/k"]);
    assert_eq!(code, 1, "409 is a refusal, not bad input");
    assert_eq!(
        one_line(&err),
        "vireo: error: a VM named \"taken\" exists already"
    );
    let (code, err) = fails(&fake, &["vm", "rm", "boom"]);
    assert_eq!(
        (code, one_line(&err)),
        (1, "vireo: error: the store is unavailable")
    );
    let (code, err) = fails(&fake, &["vm", "show", "proxy"]);
    assert_eq!(code, 1);
    assert!(one_line(&err).contains("HTTP 502 with \"Bad Gateway\", not vireod's error shape"));
    let before = fake.seen().len();
    // Refused before any request: names that would change the URL, ids that are not UUIDs.
    for (args, want) in [
        (&["vm", "show", "a/b"][..], "\"a/b\" is not a VM name or id"),
        (
            &["vm", "start", "x?y"][..],
            "\"x?y\" is not a VM name or id",
        ),
        (
            &["vm", "rename", "web", "../etc"][..],
            "new name \"../etc\"",
        ),
        (&["job", "show", "42"][..], "\"42\" is not a job id"),
        (&["vm", "set", "web"][..], "nothing to change"),
        (&["vm", "create", "a b", "--kernel", "/k"][..], "\"a b\""),
    ] {
        let (code, err) = fails(&fake, args);
        assert_eq!(code, 2, "{args:?}");
        assert!(one_line(&err).contains(want), "{args:?}: {err}");
    }
    // Clap's own errors are bad input too.
    assert_eq!(
        fails(
            &fake,
            &["vm", "create", "a", "--kernel", "/k", "--disk", "x,zip"]
        )
        .0,
        2
    );
    assert_eq!(fake.seen().len(), before, "nothing was sent");
}

#[test]
fn an_unreachable_daemon_says_how_to_start_it() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on: connection refused.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let missing = dir.path().join("missing.sock");
    for (socket, why) in [
        (&stale, "Connection refused"),
        (&missing, "No such file or directory"),
    ] {
        let host = format!("unix:{}", socket.display());
        let out = run(
            with_args(
                Command::new(env!("CARGO_BIN_EXE_vireo")),
                &["--host", &host, "vm", "list"],
            ),
            b"",
        );
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        let line = one_line(&err);
        assert!(
            line.starts_with(&format!(
                "vireo: error: cannot reach vireod at {host}: {why}"
            )),
            "{line}"
        );
        assert!(
            line.ends_with("(is vireod running? start it with `vireod --state-dir DIR`)"),
            "{line}"
        );
    }
    // An https:// host without its token file is bad input, before any connection.
    let out = run(
        with_args(
            Command::new(env!("CARGO_BIN_EXE_vireo")),
            &["--host", "https://h:8443", "job", "list"],
        ),
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(one_line(&err).contains("needs the token"), "{err}");
}

#[test]
fn vireo_host_from_the_environment_and_listing_tables() {
    let fake = FakeDaemon::start();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vireo"));
    cmd.env("VIREO_HOST", fake.host()).args(["vm", "list"]);
    let out = run(cmd, b"");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "NAME  STATE    VCPUS  MEMORY  ID");
    assert_eq!(
        lines[1],
        format!("db    running  1      32 MiB  {}", vm_of_name("db"))
    );
    assert_eq!(
        lines[2],
        format!("web   off      1      32 MiB  {}", vm_of_name("web"))
    );
    let vms: Vec<Vm> =
        serde_json::from_str(&ok(&fake, &["vm", "list", "--output", "json"])).unwrap();
    assert_eq!(vms.len(), 2);
    let shown = ok(&fake, &["vm", "show", &vm_of_name("web").to_string()]);
    assert!(shown.starts_with("name:          "), "{shown}");
    assert!(
        shown.contains("disk:          1: /d/b.img (ro, detect, serial "),
        "{shown}"
    );
}

#[test]
fn set_reads_changes_and_writes_back_the_spec() {
    let fake = FakeDaemon::start();
    let out = ok(
        &fake,
        &[
            "vm",
            "set",
            "web",
            "--memory",
            "1G",
            "--rm-disk",
            "0",
            "--add-disk",
            "/d/n.img,ro",
            "--no-auto-start",
        ],
    );
    assert!(out.contains("memory:        1 GiB"), "{out}");
    let seen = fake.seen();
    let calls: Vec<(&str, &str)> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.uri.as_str()))
        .collect();
    assert_eq!(calls, [("GET", "/v1/vms/web"), ("PUT", "/v1/vms/web/spec")]);
    let before = fake_daemon::vm("web", vireo_api::VmState::Off).spec;
    let sent: VmSpec = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(sent.memory_bytes, 1 << 30);
    assert_eq!(sent.disks.len(), 2);
    assert_eq!(
        sent.disks[0], before.disks[1],
        "b.img stays with its serial"
    );
    assert_eq!(
        (sent.disks[1].path.to_str(), sent.disks[1].serial.as_deref()),
        (Some("/d/n.img"), None)
    );
    // A disk the VM lacks: bad input, nothing written.
    let (code, err) = fails(&fake, &["vm", "set", "web", "--rm-disk", "5"]);
    assert_eq!(code, 2);
    assert!(
        one_line(&err).contains("--rm-disk 5: VM web has 2 disk(s), 0 to 1"),
        "{err}"
    );
    assert_eq!(fake.seen().iter().filter(|s| s.method == "PUT").count(), 1);
}

#[test]
fn rename_and_rm() {
    let fake = FakeDaemon::start();
    let out = ok(&fake, &["vm", "rename", "web", "www"]);
    assert_eq!(
        out,
        format!("renamed VM web to www ({})\n", vm_of_name("web"))
    );
    let seen = fake.seen();
    assert_eq!(seen[0].uri, "/v1/vms/web/rename");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&seen[0].body).unwrap(),
        serde_json::json!({"name": "www"})
    );
    let (code, err) = fails(&fake, &["vm", "rename", "web", "db"]);
    assert_eq!(
        (code, one_line(&err)),
        (1, "vireo: error: a VM named \"db\" exists already")
    );
    ok(&fake, &["vm", "rm", "web"]);
    ok(&fake, &["vm", "rm", "web", "--delete-disks"]);
    let deletes: Vec<String> = fake
        .seen()
        .into_iter()
        .filter(|s| s.method == "DELETE")
        .map(|s| s.uri)
        .collect();
    assert_eq!(
        deletes,
        [
            "/v1/vms/web?delete_disks=false",
            "/v1/vms/web?delete_disks=true"
        ]
    );
}

#[test]
fn start_follows_its_job_and_fails_with_the_jobs_error() {
    let fake = FakeDaemon::start();
    let out = run(with_args(vireo(&fake), &["vm", "start", "web"]), b"");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "VM web is running\n"
    );
    // Not a terminal: one plain line per change, no bar.
    let err = String::from_utf8(out.stderr).unwrap();
    let progress: Vec<&str> = err
        .lines()
        .map(|l| l.rsplit(": ").next().unwrap())
        .collect();
    assert_eq!(
        progress,
        ["running 0%", "running 50%", "completed 100%"],
        "{err}"
    );
    assert!(err.lines().all(|l| l.contains("(start web)")), "{err}");

    let (code, err) = fails(&fake, &["vm", "start", "bad"]);
    assert_eq!(code, 1);
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("vireo: error: start of VM bad failed: kernel /k/probe.elf: not an ELF or bzImage (job "),
        "{err}"
    );

    // A job that failed before the 202 fails the command, --no-wait or not.
    for args in [
        &["vm", "start", "nospawn"][..],
        &["vm", "start", "nospawn", "--no-wait"],
    ] {
        let (code, err) = fails(&fake, args);
        assert_eq!(code, 1, "{args:?}");
        let last = err.lines().last().unwrap();
        assert!(
            last.starts_with(
                "vireo: error: start of VM nospawn failed: cannot spawn /nonexistent/vireo-vm"
            ),
            "{args:?}: {err}"
        );
    }

    // --no-wait: the job as it began, and no polling.
    let before = fake.seen().len();
    let json = ok(
        &fake,
        &["vm", "start", "web", "--no-wait", "--output", "json"],
    );
    let job: Job = serde_json::from_str(&json).unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!(fake.seen().len(), before + 1);
    // Stop sends its timeout.
    assert_eq!(
        ok(&fake, &["vm", "stop", "web", "--timeout", "7"]),
        "VM web is off\n"
    );
    let stop = fake
        .seen()
        .into_iter()
        .find(|s| s.uri == "/v1/vms/web/stop")
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&stop.body).unwrap(),
        serde_json::json!({"timeout_secs": 7})
    );
    assert_eq!(ok(&fake, &["vm", "turn-off", "web"]), "VM web is off\n");
}

#[test]
fn ctrl_c_while_waiting_leaves_the_job_running() {
    let fake = FakeDaemon::start();
    let child = vireo(&fake)
        .args(["vm", "start", "slow"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first poll: the handler is installed and the job exists.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fake.seen().iter().any(|s| s.uri.starts_with("/v1/jobs/")) {
        assert!(Instant::now() < deadline, "no poll within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    let last = err.lines().last().unwrap();
    let job = fake
        .seen()
        .into_iter()
        .find(|s| s.uri.starts_with("/v1/jobs/"))
        .unwrap()
        .uri;
    let id = job.trim_start_matches("/v1/jobs/");
    assert_eq!(
        last,
        format!("vireo: error: stopped waiting; job {id} (start slow) goes on: `vireo job show {id}` follows it")
    );
    // That job can still be cancelled; an ended one cannot (409 → 1).
    assert_eq!(
        ok(&fake, &["job", "cancel", id]),
        format!("job {id} is cancelled\n")
    );
    let done: Job =
        serde_json::from_str(&ok(&fake, &["vm", "stop", "web", "--output", "json"])).unwrap();
    let (code, err) = fails(&fake, &["job", "cancel", &done.id.to_string()]);
    assert_eq!(
        (code, one_line(&err)),
        (
            1,
            format!("vireo: error: job {} has ended", done.id).as_str()
        )
    );
}

#[test]
fn job_list_and_show_name_the_vm() {
    let fake = FakeDaemon::start();
    let started: Job = serde_json::from_str(&ok(
        &fake,
        &["vm", "start", "web", "--no-wait", "--output", "json"],
    ))
    .unwrap();
    ok(&fake, &["vm", "stop", "db", "--no-wait"]);
    let table = ok(&fake, &["job", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "VM", "KIND", "STATE", "PROGRESS", "ERROR"]
    );
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        table.contains(&format!(
            "{}  web  start  running    0%        -",
            started.id
        )),
        "{table}"
    );
    let only: Vec<Job> = serde_json::from_str(&ok(
        &fake,
        &["job", "list", "--vm", "web", "--output", "json"],
    ))
    .unwrap();
    assert_eq!(only.iter().map(|j| j.id).collect::<Vec<_>>(), [started.id]);
    assert!(fake.seen().iter().any(|s| s.uri == "/v1/jobs?vm=web"));
    let shown = ok(&fake, &["job", "show", &started.id.to_string()]);
    assert!(
        shown.contains(&format!("vm:       web ({})\n", vm_of_name("web"))),
        "{shown}"
    );
    let (code, err) = fails(
        &fake,
        &["job", "show", "00000000-0000-0000-0000-000000000000"],
    );
    assert_eq!(
        (code, one_line(&err)),
        (
            2,
            "vireo: error: no job 00000000-0000-0000-0000-000000000000"
        )
    );
}

#[test]
fn console_through_pipes_upgrades_and_pumps_both_ways() {
    let fake = FakeDaemon::start();
    let started = Instant::now();
    let out = run(
        with_args(vireo(&fake), &["vm", "console", "web"]),
        b"info\nping\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"INFO\nPING\n");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exits after the drain"
    );
    let seen = fake.seen();
    let attach = seen
        .iter()
        .find(|s| s.uri == "/v1/vms/web/console")
        .unwrap();
    assert_eq!(attach.method, "GET");
    assert_eq!(attach.headers["upgrade"], "vireo-console");
    assert!(attach.headers["connection"]
        .to_str()
        .unwrap()
        .eq_ignore_ascii_case("upgrade"));

    // The daemon hangs up (the VM powered off): the last output is printed, exit 0.
    let out = run(
        with_args(vireo(&fake), &["vm", "console", "web"]),
        b"POWEROFF\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"OK\n");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("vireod closed VM web's console (the VM stopped"));

    // A VM that is not running: the daemon's 409, one line, exit 1.
    let (code, err) = fails(&fake, &["vm", "console", "off"]);
    assert_eq!(
        (code, one_line(&err)),
        (1, "vireo: error: cannot attach to a VM that is off")
    );

    // --log: the ring's bytes, unchanged.
    let out = run(
        with_args(vireo(&fake), &["vm", "console", "web", "--log"]),
        b"",
    );
    assert!(out.status.success());
    assert_eq!(out.stdout, b"\nPROBE READY\nOK PONG\n\xff\x00binary");
}

#[test]
fn console_timeout_ends_a_session_whose_stdin_stays_open() {
    let fake = FakeDaemon::start();
    let mut child = vireo(&fake)
        .args(["vm", "console", "web", "--timeout", "1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello\n").unwrap();
    let started = Instant::now();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = Vec::new();
    stdout.read_to_end(&mut got).unwrap();
    let status = child.wait().unwrap();
    let took = started.elapsed();
    drop(stdin);
    assert!(status.success());
    assert_eq!(got, b"HELLO\n");
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// A pty for vireo's stdin: (master, slave).
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

/// `vireo vm console web` with stdin on `tty`, once it has put the terminal in raw mode.
fn attach_on_terminal(fake: &FakeDaemon, tty: &std::fs::File) -> std::process::Child {
    use rustix::termios::{tcgetattr, LocalModes};
    let child = vireo(fake)
        .args(["vm", "console", "web"])
        .stdin(Stdio::from(tty.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tcgetattr(tty)
        .unwrap()
        .local_modes
        .contains(LocalModes::ICANON)
    {
        assert!(
            Instant::now() < deadline,
            "vireo never put the terminal in raw mode"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn wait_exit(child: &mut std::process::Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_restored(tty: &std::fs::File, before: &rustix::termios::Termios) {
    let after = rustix::termios::tcgetattr(tty).unwrap();
    assert_eq!(
        after.local_modes, before.local_modes,
        "the terminal is restored"
    );
    assert_eq!(after.input_modes, before.input_modes);
    assert_eq!(after.output_modes, before.output_modes);
}

#[test]
fn console_on_a_terminal_is_raw_until_ctrl_bracket() {
    let fake = FakeDaemon::start();
    let (mut master, tty) = pty();
    let before = rustix::termios::tcgetattr(&tty).unwrap();
    let mut child = attach_on_terminal(&fake, &tty);
    // In raw mode a line needs no Enter to travel, and Ctrl-C is a byte for the guest.
    master.write_all(b"ab\x03").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    master.write_all(b"\x1d").unwrap();
    wait_exit(&mut child, "Ctrl-] did not detach");
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"AB\x03");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("Ctrl-] detaches"), "{err}");
    assert!(err.contains("detached from VM web's console"), "{err}");
    assert_restored(&tty, &before);
}

#[test]
fn a_signal_on_a_terminal_restores_it_before_exiting() {
    let fake = FakeDaemon::start();
    let (_master, tty) = pty();
    let before = rustix::termios::tcgetattr(&tty).unwrap();
    for (signal, status) in [(libc::SIGTERM, 143), (libc::SIGHUP, 1)] {
        let mut child = attach_on_terminal(&fake, &tty);
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        wait_exit(&mut child, "a signal did not end the console");
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(status), "{out:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.lines()
                .last()
                .unwrap()
                .contains("left VM web's console (the VM runs on)"),
            "{err}"
        );
        assert_restored(&tty, &before);
    }
}

#[test]
fn help_lists_vm_and_job_and_completions_cover_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for cmd in ["\n  vm ", "\n  job ", "\n  completions "] {
        assert!(help.contains(cmd), "{cmd:?} missing from:\n{help}");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_vireo"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["turn-off", "console", "cancel", "delete-disks"] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vireo"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn job_progress_is_a_bar_on_a_terminal() {
    let fake = FakeDaemon::start();
    let (mut master, tty) = pty();
    // Everything the terminal shows, read until vireo closes its side.
    let reader = std::thread::spawn(move || {
        let mut shown = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            shown.extend_from_slice(&buf[..n]);
        }
        shown
    });
    let mut child = vireo(&fake)
        .args(["vm", "start", "web"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(tty))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "vm start did not finish");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, b"VM web is running\n");
    // The pty's master reads EIO once no one holds the slave: the reader ends.
    let shown = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    assert!(shown.contains("start web ["), "a bar: {shown:?}");
    assert!(
        shown.contains("\x1b[2K"),
        "redrawn in place, then cleared: {shown:?}"
    );
    assert!(
        !shown.contains("running 0%"),
        "no plain lines on a terminal: {shown:?}"
    );
}

#[test]
fn a_reader_that_went_away_is_not_an_error() {
    let fake = FakeDaemon::start();
    for args in [
        &["vm", "list"][..],
        &["job", "list"],
        &["completions", "bash"],
    ] {
        // A pipe whose reader is gone: every write fails with EPIPE (like `| head -0`).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = vireo(&fake)
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "vireo {args:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "vireo {args:?}");
    }
}
