//! End to end through vireod and the real `vireo-switch` (no VM is started, so no KVM): a
//! switch whose uplink is a team of two veths (far ends in a namespace this test makes) and
//! which carries an overlay, created with `vireo switch create --team ... --overlay-pa ...`;
//! `switch show` prints the members' state in text and JSON; `netvirt policy add|set|list|rm`
//! change the table the switch process holds; bad inputs are exit 2 with one line naming the
//! value, and change nothing.
//!
//! vireod and vireo-switch are other packages' binaries, found beside `vireo` in the target
//! directory (`cargo build --release -p vireo-hostd -p vireo-switchd`); without them the test is
//! a recorded skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vireo_api::switch_rest::SwitchInfo;
use vireo_netconfig::PolicyEntry;
use vireo_testkit::Need;

const VIREO: &str = env!("CARGO_BIN_EXE_vireo");

fn binaries() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(VIREO).parent().unwrap();
    let (d, s) = (dir.join("vireod"), dir.join("vireo-switch"));
    if d.is_file() && s.is_file() {
        return Some((d, s));
    }
    vireo_testkit::skip(&format!(
        "vireod and vireo-switch built in {} (cargo build --release -p vireo-hostd -p vireo-switchd)",
        dir.display()
    ));
    None
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// The namespace and veth pairs of the test; removed on drop (also on failure).
struct Wires {
    ns: String,
    near: Vec<String>,
}

impl Wires {
    fn new() -> Wires {
        let id = std::process::id() % 100_000;
        let w = Wires {
            ns: format!("vnw-cli-{id}"),
            near: (0..2).map(|i| format!("nwc{id}{i}")).collect(),
        };
        assert!(ip(&["netns", "add", &w.ns]));
        for (i, near) in w.near.iter().enumerate() {
            let far = format!("nwcf{id}{i}");
            assert!(ip(&[
                "link", "add", near, "type", "veth", "peer", "name", &far, "netns", &w.ns
            ]));
            assert!(ip(&["link", "set", near, "up"]));
            assert!(ip(&["-n", &w.ns, "link", "set", &far, "up"]));
        }
        w
    }
}

impl Drop for Wires {
    fn drop(&mut self) {
        for near in &self.near {
            ip(&["link", "del", near]);
        }
        ip(&["netns", "del", &self.ns]);
    }
}

/// vireod on a temporary state directory; on drop the switches go (their processes outlive
/// vireod by design), then vireod.
struct Daemon {
    dir: tempfile::TempDir,
    child: Child,
}

impl Daemon {
    fn start() -> Option<Daemon> {
        let (vireod, switch) = binaries()?;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("state/vireod.sock");
        let child = Command::new(vireod)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--switch-bin")
            .arg(switch)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("vireod.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "vireod did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Daemon { dir, child })
    }

    fn run(&self, args: &[&str]) -> Output {
        let socket = self.dir.path().join("state/vireod.sock");
        let mut child = Command::new(VIREO)
            .arg("--host")
            .arg(format!("unix:{}", socket.display()))
            .args(args)
            .env_remove("VIREO_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vireo {args:?} hangs");
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

    /// A refusal: its exit status and its one error line.
    fn refused(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "vireo {args:?} succeeded");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("vireo: error: "), "{err}");
        (out.status.code().unwrap(), err)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.extend(["--output", "json"]);
        serde_json::from_str(&self.ok(&a)).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.run(&["switch", "rm", "nv"]);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn teamed_overlay_switch_and_its_policy_table_through_the_cli() {
    if !vireo_testkit::require(Need::Netns) {
        return;
    }
    let wires = Wires::new();
    let Some(d) = Daemon::start() else { return };
    let team = wires.near.join(",");

    // An unknown member and a bad subnet are refused, naming them; nothing is stored.
    let (_, e) = d.refused(&[
        "switch",
        "create",
        "nv",
        "--type",
        "external",
        "--team",
        "nwnosuch9",
    ]);
    assert!(e.contains("nwnosuch9"), "{e}");
    let (_, e) = d.refused(&[
        "switch",
        "create",
        "nv",
        "--type",
        "external",
        "--team",
        &team,
        "--overlay-pa",
        "192.0.2.1",
        "--virtual-subnet",
        "red:99999999",
    ]);
    assert!(e.contains("99999999"), "{e}");
    let (code, e) = d.refused(&[
        "switch", "create", "nv", "--type", "private", "--team", &team,
    ]);
    assert!(e.contains("--team"), "{e}");
    assert_eq!(code, 2, "bad input: {e}");
    let none: Vec<SwitchInfo> = d.json(&["switch", "list"]);
    assert!(none.is_empty());

    d.ok(&[
        "switch",
        "create",
        "nv",
        "--type",
        "external",
        "--team",
        &team,
        "--team-mode",
        "switch-independent",
        "--load-balance",
        "hyperv-port",
        "--standby",
        &wires.near[1],
        "--overlay-pa",
        "192.0.2.1",
        "--virtual-subnet",
        "red:5001=10.0.0.0/24@10.0.0.1",
        "--encap",
        "nvgre",
    ]);
    let s: SwitchInfo = d.json(&["switch", "show", "nv"]);
    let t = s.spec.team.as_ref().unwrap();
    assert_eq!(t.members, wires.near);
    assert_eq!(t.standby.as_deref(), Some(wires.near[1].as_str()));
    let o = s.spec.overlay.as_ref().unwrap();
    assert_eq!(o.routing_domains[0].subnets[0].vsid, 5001);
    assert_eq!(o.routing_domains[0].encap, vireo_netconfig::Encap::Nvgre);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s: SwitchInfo = d.json(&["switch", "show", "nv"]);
        let st = s.ports.iter().find_map(|p| p.team.clone());
        if let Some(st) = st.filter(|st| st.members.iter().all(|m| m.link_up)) {
            break st;
        }
        assert!(Instant::now() < deadline, "members not up: {:?}", s.ports);
        std::thread::sleep(Duration::from_millis(200));
    };
    // The standby member carries nothing while the other is up.
    assert!(status.members[0].distributing && !status.members[1].distributing);
    let text = d.ok(&["switch", "show", "nv"]);
    assert!(
        text.contains("MEMBER") && text.contains(&wires.near[0]),
        "{text}"
    );
    assert!(
        text.contains("external (team") && text.contains("nvgre"),
        "{text}"
    );

    // The policy table.
    let add = |ca: &str, pa: &str| -> Vec<String> {
        [
            "netvirt",
            "policy",
            "add",
            "nv",
            "--domain",
            "red",
            "--ca",
            ca,
            "--mac",
            "02:00:00:00:00:07",
            "--vsid",
            "5001",
            "--pa",
            pa,
        ]
        .map(String::from)
        .to_vec()
    };
    let args = add("10.0.0.7", "192.0.2.2");
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    d.ok(&args);
    let (_, e) = d.refused(&args);
    assert!(e.contains("10.0.0.7"), "{e}");
    let mut set = args.clone();
    set[2] = "set";
    *set.last_mut().unwrap() = "192.0.2.3";
    d.ok(&set);
    let table: Vec<PolicyEntry> = d.json(&["netvirt", "policy", "list", "nv"]);
    assert_eq!(table.len(), 1, "{table:?}");
    assert_eq!(table[0].pa.to_string(), "192.0.2.3");
    let text = d.ok(&["netvirt", "policy", "list", "nv"]);
    assert!(
        text.contains("192.0.2.3") && text.contains("ROUTING_DOMAIN"),
        "{text}"
    );
    let mut bad = args.clone();
    bad[11] = "16777216";
    let (_, e) = d.refused(&bad);
    assert!(e.contains("16777216"), "{e}");
    d.ok(&[
        "netvirt", "policy", "rm", "nv", "--domain", "red", "--ca", "10.0.0.7",
    ]);
    let table: Vec<PolicyEntry> = d.json(&["netvirt", "policy", "list", "nv"]);
    assert!(table.is_empty(), "{table:?}");
    let out = d.run(&[
        "netvirt", "policy", "rm", "nv", "--domain", "red", "--ca", "10.0.0.7",
    ]);
    assert!(!out.status.success());
    let (_, e) = d.refused(&["netvirt", "policy", "list", "no/such"]);
    assert!(e.contains("no/such"), "{e}");
    drop(d);
    drop(wires);
}
