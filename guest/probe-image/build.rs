//! Builds the probe guest (guest/probe, a separate no_std cargo project) with a clean nested
//! `cargo build --release`, copies the ELF into OUT_DIR and exports its path as VIREO_PROBE_ELF.
//! The probe must not contain instructions KVM-PVM cannot run; if objdump is available the ELF is
//! disassembled and checked.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mnemonic prefixes that make KVM_RUN fail under KVM-PVM (AVX is caught as VEX `v...`
/// mnemonics and ymm/zmm operands).
const FORBIDDEN_MNEMONICS: &[&str] = &[
    "cmpxchg16b",
    "xsave",
    "xrstor",
    "xgetbv",
    "popcnt",
    "rdtscp",
    "stac",
];
const FORBIDDEN_REGISTERS: &[&str] = &["%ymm", "%zmm"];

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let probe_dir = manifest_dir
        .join("../probe")
        .canonicalize()
        .expect("guest/probe exists");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    for path in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "linker.ld",
        ".cargo/config.toml",
    ] {
        println!("cargo:rerun-if-changed={}", probe_dir.join(path).display());
    }

    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out_dir.join("probe-target");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&probe_dir)
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target_dir);
    // The outer build's flags, wrappers and target dir are meant for host code, not the probe.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if inherited_build_setting(key) {
            cmd.env_remove(key);
        }
    }
    let status = cmd.status().expect("run cargo to build guest/probe");
    assert!(status.success(), "building guest/probe failed ({status})");

    let built = target_dir.join("x86_64-unknown-linux-gnu/release/vireo-probe");
    let elf = out_dir.join("vireo-probe.elf");
    std::fs::copy(&built, &elf).expect("copy the probe ELF");
    check_instructions(&elf);
    println!("cargo:rustc-env=VIREO_PROBE_ELF={}", elf.display());
}

fn inherited_build_setting(key: &str) -> bool {
    const KEEP: &[&str] = &[
        "CARGO_HOME",
        "CARGO_NET_",
        "CARGO_HTTP_",
        "CARGO_REGISTRIES_",
        "CARGO_REGISTRY_",
    ];
    if key.starts_with("CARGO_") {
        return !KEEP.iter().any(|k| key.starts_with(k));
    }
    matches!(
        key,
        "RUSTFLAGS"
            | "RUSTDOCFLAGS"
            | "RUSTC_WRAPPER"
            | "RUSTC_WORKSPACE_WRAPPER"
            | "RUSTC_LINKER"
            | "TARGET"
            | "HOST"
            | "OUT_DIR"
            | "PROFILE"
            | "OPT_LEVEL"
            | "DEBUG"
            | "NUM_JOBS"
            | "MAKEFLAGS"
            | "MFLAGS"
    )
}

/// Fails the build if the disassembly contains an instruction KVM-PVM cannot run. `int3` is
/// allowed only where it can never execute: the padding LLVM puts between functions and after
/// calls that do not return, i.e. runs that follow a call/jmp/ret or end at a 16-byte boundary.
fn check_instructions(elf: &Path) {
    let Ok(out) = Command::new("objdump")
        .arg("-d")
        .arg("--no-show-raw-insn")
        .arg(elf)
        .output()
    else {
        println!("cargo:warning=objdump not found: the probe's instructions were not checked");
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut problems = Vec::new();
    let mut prev_is_transfer = true;
    // (address of the run's first int3, whether it follows an unconditional transfer, end)
    let mut int3_run: Option<(u64, bool, u64)> = None;
    for line in text.lines() {
        let Some((addr, insn)) = line.trim_start().split_once(":\t") else {
            continue;
        };
        let Ok(addr) = u64::from_str_radix(addr.trim(), 16) else {
            continue;
        };
        let insn = insn.trim();
        let mnemonic = insn.split_whitespace().next().unwrap_or("");
        if mnemonic == "int3" {
            let run = int3_run.get_or_insert((addr, prev_is_transfer, addr));
            run.2 = addr + 1;
            continue;
        }
        if let Some((start, after_transfer, end)) = int3_run.take() {
            if !after_transfer && end % 16 != 0 {
                problems.push(format!("{start:#x}: int3 that is not padding"));
            }
        }
        prev_is_transfer = matches!(mnemonic, "call" | "jmp" | "ret" | "ud2" | "iretq")
            || mnemonic.starts_with("call")
            || mnemonic.starts_with("jmp")
            || mnemonic.starts_with("ret");
        let is_vex = mnemonic.starts_with('v') && mnemonic != "verr" && mnemonic != "verw";
        let operands = insn.split('#').next().unwrap_or("");
        if is_vex
            || FORBIDDEN_MNEMONICS.iter().any(|f| mnemonic.starts_with(f))
            || FORBIDDEN_REGISTERS.iter().any(|r| operands.contains(r))
        {
            problems.push(format!("{addr:#x}: {insn}"));
        }
    }
    assert!(
        problems.is_empty(),
        "the probe contains instructions KVM-PVM cannot run:\n{}",
        problems.join("\n")
    );
}
