//! The switch process over its socket, as vireod drives it: ports added, changed, reported and
//! removed; refused changes (bad version, malformed lines, a taken name or socket, an invalid
//! policy, a file in the way) change nothing; Shutdown and SIGTERM end it cleanly, and the
//! death of its parent does not. VM NIC ports here are vhost-user sockets no VM connects to
//! (the KVM test connects probe VMs); no root needed except for the interface case.

use crate::common;

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use vireo_api::switch::{PortAttach, SwitchOp, SwitchPort, SwitchReply, SWITCH_PROTOCOL_VERSION};
use vireo_vswitch::{PortConfig, SwitchConfig, VlanConfig};

fn is_private_socket(p: &Path) -> bool {
    std::fs::symlink_metadata(p)
        .is_ok_and(|m| m.file_type().is_socket() && m.permissions().mode() & 0o777 == 0o600)
}

fn names(s: &Switchd) -> Vec<String> {
    s.status().into_iter().map(|p| p.config.name).collect()
}

#[test]
fn ports_are_added_changed_reported_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A relative socket path is taken from the switch's folder; ports/ is created.
    let id = write_launch(
        dir,
        SwitchConfig::private("sw"),
        vec![vhost("vm0", "ports/vm0.sock", 10)],
    );
    let mut s = Switchd::start(dir);
    let mut c = s.client();
    match c.op(SwitchOp::Hello) {
        SwitchReply::Hello {
            version,
            switch_id,
            pid,
        } => {
            assert_eq!(
                (version, switch_id, pid),
                (SWITCH_PROTOCOL_VERSION, id, s.pid)
            );
        }
        r => panic!("{r:?}"),
    }
    assert!(is_private_socket(&s.socket()));
    let vm0 = dir.join("ports/vm0.sock");
    assert!(is_private_socket(&vm0));
    let mode = std::fs::metadata(dir.join("ports"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700, "ports/ is owner-only");
    let st = s.status();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].config, PortConfig::access("vm0", 10));
    assert_eq!(
        st[0].attach,
        Some(PortAttach::VhostUser {
            socket: "ports/vm0.sock".into()
        })
    );
    assert!(!st[0].connected, "no VM on the socket yet");
    assert_eq!(st[0].meters, Default::default());

    let vm1 = dir.join("ports/vm1.sock");
    c.ok(SwitchOp::AddPort {
        port: vhost("vm1", &vm1, 20),
    });
    assert!(is_private_socket(&vm1));
    assert_eq!(names(&s), ["vm0", "vm1"]);

    // Live change, then read back.
    let mut cfg = PortConfig::access("vm1", 30);
    cfg.macs = vec!["02:00:00:00:00:07".parse().unwrap()];
    c.ok(SwitchOp::SetPort {
        config: cfg.clone(),
    });
    assert_eq!(s.port("vm1").config, cfg);
    c.ok(SwitchOp::ResetMeters);

    c.ok(SwitchOp::RemovePort { name: "vm1".into() });
    assert!(!vm1.exists(), "the port's socket goes with it");
    assert_eq!(names(&s), ["vm0"]);
    let e = c.error(SwitchOp::RemovePort { name: "vm1".into() });
    assert!(e.contains("no port named \"vm1\""), "{e}");
    // The name and the socket are free again.
    c.ok(SwitchOp::AddPort {
        port: vhost("vm1", &vm1, 20),
    });
    assert!(is_private_socket(&vm1));

    c.ok(SwitchOp::Shutdown);
    let st = s.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(0), "log:\n{}", s.log());
    for p in [s.socket(), vm0, vm1] {
        assert!(!p.exists(), "{} left behind", p.display());
    }
    assert!(s.log().contains("shutdown requested"), "{}", s.log());
}

#[test]
fn refused_changes_leave_the_switch_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_launch(
        dir,
        SwitchConfig::private("sw"),
        vec![
            vhost("vm0", dir.join("vm0.sock"), 10),
            vhost("vm1", dir.join("vm1.sock"), 10),
        ],
    );
    let s = Switchd::start(dir);
    let mut c = s.client();
    let before = s.status();
    let files = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    std::fs::write(dir.join("in-the-way.sock"), b"not a socket").unwrap();
    let files_before = files(dir);

    // A name that is taken (with a fresh socket path: that socket must not appear).
    let e = c.error(SwitchOp::AddPort {
        port: vhost("vm0", dir.join("new.sock"), 10),
    });
    assert!(e.contains("already exists"), "{e}");
    // A socket another port serves (it must keep serving it).
    let e = c.error(SwitchOp::AddPort {
        port: vhost("vm2", dir.join("vm0.sock"), 10),
    });
    assert!(e.contains("vm0.sock") && e.contains("\"vm0\""), "{e}");
    assert!(UnixStream::connect(dir.join("vm0.sock")).is_ok());
    // A file that is not a socket: refused, and left alone.
    let e = c.error(SwitchOp::AddPort {
        port: vhost("vm2", dir.join("in-the-way.sock"), 10),
    });
    assert!(
        e.contains("in-the-way.sock") && e.contains("not a socket"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(dir.join("in-the-way.sock")).unwrap(),
        b"not a socket"
    );
    // A socket path too long to bind, in a folder that does not exist yet: the folder made
    // for it goes again.
    let long = dir.join("newdir").join(format!("{}.sock", "a".repeat(120)));
    let e = c.error(SwitchOp::AddPort {
        port: vhost("vm2", &long, 10),
    });
    assert!(e.contains("newdir"), "{e}");
    // Invalid policies: a VLAN out of range, a private VLAN of a domain the switch lacks.
    let e = c.error(SwitchOp::AddPort {
        port: vhost("vm2", dir.join("vm2.sock"), 5000),
    });
    assert!(e.contains("invalid VLAN"), "{e}");
    let e = c.error(SwitchOp::SetPort {
        config: PortConfig::access("vm1", 4095),
    });
    assert!(e.contains("invalid VLAN"), "{e}");
    let e = c.error(SwitchOp::SetPort {
        config: PortConfig {
            vlan: VlanConfig::Private {
                primary: 100,
                secondary: 101,
                mode: vireo_vswitch::PvlanMode::Isolated,
            },
            ..PortConfig::access("vm1", 1)
        },
    });
    assert!(e.contains("invalid VLAN"), "{e}");
    let e = c.error(SwitchOp::SetPort {
        config: PortConfig::access("nobody", 2),
    });
    assert!(e.contains("no port named \"nobody\""), "{e}");
    // An interface that does not exist.
    let e = c.error(SwitchOp::AddPort {
        port: SwitchPort {
            config: PortConfig::access("eth-none", 1),
            attach: PortAttach::Interface {
                name: "vireo-no-such0".into(),
            },
        },
    });
    assert!(e.contains("vireo-no-such0"), "{e}");

    assert_eq!(s.status(), before, "a refused change changed the switch");
    assert_eq!(
        files(dir),
        files_before,
        "a refused change touched the folder"
    );
    assert!(s.alive());
}

#[test]
fn malformed_requests_get_errors_and_the_connection_stays_usable() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_launch(dir, SwitchConfig::private("sw"), vec![]);
    let s = Switchd::start(dir);
    let mut c = s.client();
    let err = |r: SwitchReply| match r {
        SwitchReply::Error { message } => message,
        r => panic!("expected an error: {r:?}"),
    };
    let e = err(c.raw(br#"{"version":2,"op":"hello"}"#));
    assert!(e.contains("protocol version 2 is not spoken here"), "{e}");
    let e = err(c.raw(br#"{"version":2,"op":"shutdown"}"#));
    assert!(e.contains("version 2"), "{e}");
    assert!(err(c.raw(br#"{"op":"status"}"#)).contains("no \"version\""));
    assert!(err(c.raw(b"{\"version\":1,")).contains("not JSON"));
    assert!(err(c.raw(b"\xff\xfe garbage")).contains("not JSON"));
    assert!(err(c.raw(br#"{"version":1,"op":"explode"}"#)).contains("malformed request"));
    assert!(err(c.raw(br#"{"version":1,"op":"add_port"}"#)).contains("malformed request"));
    assert!(err(c.raw(br#"[1,2,3]"#)).contains("no \"version\""));
    let mut long = vec![b' '; 2 << 20];
    long[0] = b'{';
    assert!(err(c.raw(&long)).contains("longer than"));
    // Blank lines are skipped, not answered; the next request is.
    assert!(matches!(
        c.raw(b"\n{\"version\":1,\"op\":\"hello\"}"),
        SwitchReply::Hello { .. }
    ));

    // A client that goes away in the middle of a line, or without reading its reply.
    let mut half = UnixStream::connect(s.socket()).unwrap();
    half.write_all(br#"{"version":1,"op":"sta"#).unwrap();
    drop(half);
    let mut rude = UnixStream::connect(s.socket()).unwrap();
    rude.write_all(b"{\"version\":1,\"op\":\"status\"}\n")
        .unwrap();
    drop(rude);
    assert!(matches!(
        s.client().op(SwitchOp::Hello),
        SwitchReply::Hello { .. }
    ));
    assert!(s.alive());
    // The first connection still works.
    assert!(matches!(c.op(SwitchOp::Status), SwitchReply::Status { .. }));
}

#[test]
fn sigterm_and_sigint_shut_down_cleanly() {
    for sig in ["-TERM", "-INT"] {
        shuts_down_on(sig);
    }
}

fn shuts_down_on(sig: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_launch(
        dir,
        SwitchConfig::private("sw"),
        vec![vhost("vm0", dir.join("vm0.sock"), 1)],
    );
    let mut s = Switchd::start(dir);
    assert!(Command::new("kill")
        .args([sig, &s.pid.to_string()])
        .status()
        .unwrap()
        .success());
    let st = s.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(st.code(), Some(0), "log:\n{}", s.log());
    assert!(!dir.join("switch.sock").exists());
    assert!(!dir.join("vm0.sock").exists());
}

#[test]
fn the_switch_outlives_its_parent_until_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_launch(
        dir,
        SwitchConfig::private("sw"),
        vec![vhost("vm0", dir.join("vm0.sock"), 1)],
    );
    // The "parent" (standing in for vireod) starts the switch in its own process group, says
    // its pid, and is then killed with SIGKILL.
    let script = format!(
        "setsid {bin} --dir {dir} </dev/null >/dev/null 2>{dir}/switch.log & echo $!; exec sleep 600",
        bin = BIN,
        dir = dir.display()
    );
    let mut parent = Command::new("sh")
        .args(["-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(parent.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid: u32 = line.trim().parse().unwrap();
    let mut s = Switchd::adopt(dir, pid);
    parent.kill().unwrap();
    parent.wait().unwrap();

    std::thread::sleep(Duration::from_millis(500));
    assert!(s.alive(), "the switch died with its parent");
    // A hangup (vireod's terminal closing) does not end it either.
    assert!(Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.alive(), "SIGHUP ended the switch");
    match s.client().op(SwitchOp::Hello) {
        SwitchReply::Hello { pid: p, .. } => assert_eq!(p, pid),
        r => panic!("{r:?}"),
    }
    assert_eq!(names(&s), ["vm0"]);
    s.client().ok(SwitchOp::Shutdown);
    s.wait_exit(Duration::from_secs(10));
    assert!(!dir.join("switch.sock").exists());
    assert!(!dir.join("vm0.sock").exists());
}

#[test]
fn a_second_process_for_the_same_switch_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_launch(dir, SwitchConfig::private("sw"), vec![]);
    let s = Switchd::start(dir);
    let other = tmp.path().join("other.log");
    let out = Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .stderr(std::fs::File::create(&other).unwrap())
        .status()
        .unwrap();
    assert_eq!(out.code(), Some(1));
    let log = std::fs::read_to_string(&other).unwrap();
    assert!(log.contains("switch.sock is in use"), "{log}");
    assert!(matches!(
        s.client().op(SwitchOp::Hello),
        SwitchReply::Hello { .. }
    ));
}

#[test]
fn a_bad_launch_file_is_one_clear_line_and_exit_1() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let run = |dir: &Path| {
        let out = Command::new(BIN).arg("--dir").arg(dir).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(dir);
    assert_eq!(code, Some(1));
    assert!(err.contains("switch.json"), "{err}");
    std::fs::write(dir.join("switch.json"), b"{\"switch_id\": 5}").unwrap();
    let (code, err) = run(dir);
    assert_eq!(code, Some(1));
    assert!(err.contains("not a valid SwitchLaunch"), "{err}");
    assert!(!dir.join("switch.sock").exists());
}

#[test]
fn a_launch_port_that_cannot_attach_is_left_out_and_the_rest_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("blocked.sock"), b"data").unwrap();
    write_launch(
        dir,
        SwitchConfig::private("sw"),
        vec![
            vhost("bad", dir.join("blocked.sock"), 1),
            vhost("good", dir.join("good.sock"), 1),
        ],
    );
    let s = Switchd::start(dir);
    assert_eq!(names(&s), ["good"]);
    assert_eq!(std::fs::read(dir.join("blocked.sock")).unwrap(), b"data");
    assert!(s.log().contains("port \"bad\" left out"), "{}", s.log());
}
