//! `vireo checkpoint ...` against a real vireod (off VM, no KVM needed): create, list (the
//! tree with "now"), show, rename, apply, rm, `--output json`, and bad input as one line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use vireo_api::Checkpoint;

const VIREO: &str = env!("CARGO_BIN_EXE_vireo");

struct Daemon {
    dir: tempfile::TempDir,
    host: String,
    child: Child,
}

impl Daemon {
    fn start() -> Option<Daemon> {
        let bin = Path::new(VIREO).parent().unwrap();
        let (vireod, worker) = (bin.join("vireod"), bin.join("vireo-vm"));
        if !vireod.is_file() {
            vireo_testkit::skip("vireod built beside vireo (cargo build --release -p vireo-hostd)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let socket = state.join("vireod.sock");
        let child = Command::new(vireod)
            .arg("--state-dir")
            .arg(&state)
            .arg("--worker-bin")
            .arg(worker)
            .arg("--storage-root")
            .arg(dir.path())
            .arg("--storage-root")
            .arg(vireo_probe_image::probe_elf().parent().unwrap())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("vireod.log")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "vireod did not listen within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Daemon {
            host: format!("unix:{}", socket.display()),
            dir,
            child,
        })
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(VIREO)
            .arg("--host")
            .arg(&self.host)
            .args(args)
            .env_remove("VIREO_HOST")
            .stdin(Stdio::null())
            .output()
            .unwrap()
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

    fn fails(&self, args: &[&str]) -> (i32, String) {
        let out = self.run(args);
        assert!(!out.status.success(), "vireo {args:?} succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        (
            out.status.code().unwrap(),
            err.lines().last().unwrap_or_default().to_owned(),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
