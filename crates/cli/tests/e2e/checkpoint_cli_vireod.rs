//! `vireo checkpoint ...` against a real vireod (off VM, no KVM needed): create, list (the
//! tree with "now"), show, rename, apply, rm, `--output json`, and bad input as one line.

use crate::vireod_harness;

use std::path::{Path, PathBuf};

use vireo_api::Checkpoint;
use vireod_harness::Daemon;

fn vhdx(dir: &Path) -> PathBuf {
    let p = dir.join("cli-cp.vhdx");
    let opts = vireo_vhdx::CreateOptions {
        size: 8 << 20,
        ..Default::default()
    };
    drop(vireo_vhdx::Vhdx::create(&p, &opts).unwrap());
    p
}

#[test]
fn checkpoint_commands_through_vireod() {
    let Some(d) = Daemon::start() else { return };
    let disk = vhdx(d.dir.path());
    let kernel = vireo_probe_image::probe_elf();
    d.ok(&[
        "vm",
        "create",
        "cpvm",
        "--kernel",
        kernel.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
    ]);
    assert_eq!(d.ok(&["checkpoint", "list", "cpvm"]), "no checkpoints\n");
    let out = d.ok(&["checkpoint", "create", "cpvm", "first"]);
    assert!(out.contains("checkpoint first of VM cpvm created"), "{out}");
    d.ok(&["checkpoint", "create", "cpvm", "second"]);
    let tree = d.ok(&["checkpoint", "list", "cpvm"]);
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with("first  ("), "{tree}");
    assert!(lines[1].starts_with("  second  ("), "{tree}");
    assert_eq!(lines[2], "    └─ now", "{tree}");
    let json: Vec<Checkpoint> =
        serde_json::from_str(&d.ok(&["checkpoint", "list", "cpvm", "--output", "json"])).unwrap();
    assert_eq!(json.len(), 2);
    assert_eq!(json[0].disks[0].frozen, disk);
    let show = d.ok(&["checkpoint", "show", "cpvm", "first"]);
    assert!(show.contains(&format!("{}", disk.display())), "{show}");
    d.ok(&["checkpoint", "rename", "cpvm", "second", "two"]);
    let out = d.ok(&["checkpoint", "apply", "cpvm", "first"]);
    assert!(
        out.contains("VM cpvm is at checkpoint first (off)"),
        "{out}"
    );
    let tree = d.ok(&["checkpoint", "list", "cpvm"]);
    assert!(
        tree.starts_with("first  (") && tree.contains("\n  └─ now\n"),
        "{tree}"
    );
    d.ok(&["checkpoint", "rm", "cpvm", "first", "--subtree"]);
    assert_eq!(d.ok(&["checkpoint", "list", "cpvm"]), "no checkpoints\n");
    // Bad input: one line naming the value.
    let (code, line) = d.fails(&["checkpoint", "show", "cpvm", "nope"]);
    assert!(line.contains("\"nope\""), "{code} {line}");
    let (code, line) = d.fails(&["checkpoint", "create", "cpvm", "a/b"]);
    assert_eq!(code, 2, "{line}");
}
