//! Running the real `vireo` binary from the vhdx crate's end-to-end tests (`cli_*.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `vireo` binary of this test run's profile, built first (a no-op when up to date).
/// Under `./test.sh` (`VIREO_WORKSPACE_BUILT`) the workspace's own test build made it: a
/// `cargo build -p vireo-cli` then unifies other features and rebuilt a dozen crates (~140 s
/// in CI) for the same binary.
pub fn vireo() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let built = profile_dir.join("vireo");
        if std::env::var_os("VIREO_WORKSPACE_BUILT").is_some() {
            assert!(
                built.is_file(),
                "{} missing: VIREO_WORKSPACE_BUILT says `cargo test --workspace` built it",
                built.display()
            );
            return built;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-q", "-p", "vireo-cli"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        // Same target directory as this test binary, so an up-to-date build is a no-op.
        build.env("CARGO_TARGET_DIR", profile_dir.parent().unwrap());
        assert!(build.status().unwrap().success(), "building vireo failed");
        profile_dir.join("vireo")
    })
}

/// `vireo disk ARGS` run in `dir`.
pub fn disk(dir: &Path, args: &[&str]) -> Output {
    Command::new(vireo())
        .arg("disk")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

/// `vireo disk ARGS` must succeed; returns its stdout.
pub fn ok(dir: &Path, args: &[&str]) -> String {
    let out = disk(dir, args);
    assert!(
        out.status.success(),
        "vireo disk {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
