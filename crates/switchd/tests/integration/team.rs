//! A team port over the switch process's socket: added with `PortAttach::Team`, reported with
//! its members and counters, its members refused to other ports, bad teams refused with the
//! offending value named. Needs root (veth pairs in this namespace): a recorded skip
//! otherwise, a failure under CI. The veths are removed on drop.

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use vireo_api::switch::{PortAttach, SwitchOp, SwitchPort};
use vireo_vswitch::{PortConfig, PortRole, SwitchConfig, TeamConfig, TeamMode};

struct Veths(Vec<String>);
impl Drop for Veths {
    fn drop(&mut self) {
        for v in &self.0 {
            let _ = Command::new("ip").args(["link", "del", v]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let ok = Command::new("ip")
        .args(args)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ip {args:?}");
}

fn team_port(members: &[&str], mode: TeamMode) -> SwitchPort {
    let mut team = TeamConfig::new(members);
    team.mode = mode;
    SwitchPort {
        config: PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("uplink", 1)
        },
        attach: PortAttach::Team { team },
    }
}

#[test]
fn team_ports_are_added_reported_and_guarded() {
    if !vireo_testkit::require(vireo_testkit::Need::Root) {
        return;
    }
    let p = format!("vst{}", std::process::id());
    let (a, b) = (format!("{p}a"), format!("{p}b"));
    let _veths = Veths(vec![a.clone(), b.clone()]);
    for v in [&a, &b] {
        ip(&[
            "link",
            "add",
            v,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{v}x"),
        ]);
        ip(&["link", "set", v, "up"]);
        ip(&["link", "set", &format!("{v}x"), "up"]);
    }
    let tmp = tempfile::tempdir().unwrap();
    write_launch(tmp.path(), SwitchConfig::private("sw"), vec![]);
    let s = Switchd::start(tmp.path());
    let mut c = s.client();

    let e = c.error(SwitchOp::AddPort {
        port: team_port(&[&a, &a], TeamMode::Static),
    });
    assert!(e.contains("listed twice") && e.contains(&a), "{e}");
    let e = c.error(SwitchOp::AddPort {
        port: team_port(&[&a, "vireo-no-such0"], TeamMode::Static),
    });
    assert!(e.contains("vireo-no-such0"), "{e}");

    c.ok(SwitchOp::AddPort {
        port: team_port(&[&a, &b], TeamMode::Lacp),
    });
    let e = c.error(SwitchOp::AddPort { port: iface(&b, 1) });
    assert!(
        e.contains("already attached") && e.contains("uplink"),
        "{e}"
    );

    // The monitor sends LACPDUs (no partner here): counted in the report.
    assert!(wait_until(Duration::from_secs(3), || {
        s.port("uplink").team.is_some_and(|t| {
            t.members.len() == 2
                && t.members
                    .iter()
                    .all(|m| m.link_up && m.lacp.as_ref().is_some_and(|l| l.pdus_tx >= 1))
        })
    }));
    let t = s.port("uplink").team.unwrap();
    assert_eq!(t.mode, TeamMode::Lacp);
    assert!(
        t.members.iter().all(|m| !m.distributing),
        "no partner, no distribution"
    );
    c.ok(SwitchOp::RemovePort {
        name: "uplink".into(),
    });
    c.ok(SwitchOp::AddPort { port: iface(&b, 1) });
    assert!(s.port(&b).team.is_none());
}
