//! `checkpoint`: a 256 MiB probe VM with a 64 MiB hot set it rewrites at full speed (DIRTY),
//! checkpointed and restored, Vireo vs QEMU on the same guest, alternating, ≥ 5 runs each.
//!
//! Vireo (in process, through `vireo-vmm`): `save_live` with `AfterSave::Resume` (the snapshot
//! a checkpoint takes); its guest-visible pause and its whole duration; then, after the same
//! 100 ms of guest work QEMU gets between savevm and loadvm, `apply_in_place` of the snapshot
//! to the VM that took it (what loadvm does in its running QEMU), timed from the call to the
//! guest's pass counter moving again: that is `restore_ms`. A second row, not hidden: the
//! snapshot restored (lazily) into a new VM whose RAM is freshly allocated, as a new worker
//! process would (`new_vm_restore_ms`).
//! QEMU: HMP `savevm` (qcow2 drive, stop-the-world: the whole command is the guest's pause) and
//! `loadvm` (timed to the counter moving, read with HMP `xp`), and as its fast save `migrate`
//! to a `file:` URI (live, QEMU's own downtime figure) and a new QEMU with `-incoming defer`
//! then `migrate-incoming`, timed from that command to the counter moving.

pub mod qmp;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use vireo_probe_image::qemu::{find_qemu, QemuProbe, QemuProbeConfig};
use vireo_probe_image::ProbeConsole;
use vireo_vmm::state::{trace, Identity};
use vireo_vmm::{
    AfterSave, ApplyOptions, ConsoleConfig, LiveSaveOptions, RamBacking, RestoreFrom, Vm, VmConfig,
    VmHandle,
};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::stats::{summarize, Summary};
use qmp::Qmp;

const MEMORY_MIB: u64 = 256;
const HOT_START_MIB: u64 = 16;
const HOT_MIB: u64 = 64;
/// The probe's pass counter (status page + 8), bumped after every pass over the hot set.
const PASSES: u64 = 0x80000 + 8;
const T: Duration = Duration::from_secs(30);
/// How long the workload runs before the checkpoint.
const WARM: Duration = Duration::from_millis(300);

const ABOUT: &str = "\
Checkpoint of a 256 MiB probe VM rewriting a 64 MiB hot set, Vireo (live save + resume; the
checkpoint applied in place to the running VM, and restored into a new VM) vs QEMU
(savevm/loadvm on a qcow2, and migrate to file / -incoming). Needs /dev/kvm,
qemu-system-x86_64 and qemu-img.
Last line: checkpoint_pause_ms=<n> qemu_savevm_ms=<n> ratio=<n> restore_ms=<n>
  qemu_loadvm_ms=<n> restore_ratio=<n> new_vm_restore_ms=<n> new_vm_restore_ratio=<n>
  (medians; restore_ms is the in-place apply, as loadvm is)
VIREO_RESTORE_TRACE=1 prints each step of Vireo's restores (docs/vm-state.md, Restore timing).";

#[derive(Args)]
#[command(about = ABOUT, long_about = ABOUT)]
pub struct CheckpointArgs {
    /// Runs of each side (alternating).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH].
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Restore Vireo's VM eagerly (all of memory.bin read before it runs) instead of lazily,
    /// to compare the two.
    #[arg(long)]
    eager: bool,
    /// Restore lazily without fetching the save's working set first (every page faults in or
    /// comes with the background copy), to see what the working set buys.
    #[arg(long, conflicts_with = "eager")]
    no_working_set: bool,
    /// Instead of the comparison: what the dirty log a checkpoint keeps on costs the guest.
    /// Prints the DIRTY pass rate over 1 s windows: before any snapshot, after a snapshot
    /// without tracking, after one with tracking (the default), after an in-place apply (which
    /// turns the log off and rebuilds the mappings).
    #[arg(long)]
    log_cost: bool,
    /// What backs the VM's RAM: `huge` (2 MiB host pages on a private tmpfs; a memfd where
    /// the host refuses the mount) or `memfd` (4 KiB pages on this host).
    #[arg(long, value_enum, default_value_t = GuestRam::Huge)]
    guest_ram: GuestRam,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum GuestRam {
    Huge,
    Memfd,
}

impl GuestRam {
    fn backing(self) -> RamBacking {
        match self {
            GuestRam::Huge => RamBacking::Huge,
            GuestRam::Memfd => RamBacking::Memfd,
        }
    }
}

#[derive(Default)]
struct Series {
    pause: Vec<f64>,
    save: Vec<f64>,
    restore: Vec<f64>,
    /// Vireo only: the restore into a new VM (fresh RAM).
    new_vm: Vec<f64>,
    /// Vireo only: pages the in-place apply copied back.
    applied_pages: Vec<f64>,
    rounds: Vec<f64>,
    written_mib: Vec<f64>,
    /// Vireo only: KVM's mappings of guest RAM 100 ms after the apply, 2 MiB and 4 KiB
    /// entries (whether the 2 MiB mappings came back once the log went off).
    mapped_after_apply: Vec<String>,
}

pub fn run(args: CheckpointArgs) -> Result<(), String> {
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    println!("guest RAM: {:?}", args.guest_ram);
    if args.log_cost {
        return log_cost(args.runs, args.guest_ram.backing());
    }
    let qemu = args
        .qemu
        .clone()
        .or_else(find_qemu)
        .ok_or("qemu-system-x86_64 not found (pass --qemu PATH)")?;
    let work = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let (mut v, mut q, mut m) = (Series::default(), Series::default(), Series::default());
    for i in 0..args.runs {
        let dir = work.path().join(format!("run{i}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        vireo_run(&dir, i as u64, &args, &mut v)?;
        qemu_savevm(&qemu, &dir, i as u64, &mut q)?;
        qemu_migrate(&qemu, &dir, i as u64, &mut m)?;
        eprintln!(
            "run {}: vireo pause {:.1} ms save {:.1} ms apply in place {:.1} ms ({:.0} pages; {}) new VM {:.1} ms | qemu savevm {:.1} ms loadvm {:.1} ms | migrate downtime {:.1} ms total {:.1} ms incoming {:.1} ms",
            i + 1,
            v.pause[i],
            v.save[i],
            v.restore[i],
            v.applied_pages[i],
            v.mapped_after_apply[i],
            v.new_vm[i],
            q.save[i],
            q.restore[i],
            m.pause[i],
            m.save[i],
            m.restore[i]
        );
        // Each run's files go before the next: 3 memory images of 256 MiB would add up.
        let _ = std::fs::remove_dir_all(&dir);
    }
    let s = |x: &[f64]| summarize(x).expect("at least one run");
    let show = |x: Summary| format!("{:.1} ({:.1}–{:.1})", x.median, x.min, x.max);
    println!(
        "{:<34} {:>24} {:>24} {:>24}",
        "median (min–max) ms", "Vireo", "QEMU savevm/loadvm", "QEMU migrate file"
    );
    println!(
        "{:<34} {:>24} {:>24} {:>24}",
        "guest-visible pause (checkpoint)",
        show(s(&v.pause)),
        show(s(&q.pause)),
        show(s(&m.pause))
    );
    println!(
        "{:<34} {:>24} {:>24} {:>24}",
        "save, whole",
        show(s(&v.save)),
        show(s(&q.save)),
        show(s(&m.save))
    );
    println!(
        "{:<34} {:>24} {:>24} {:>24}",
        "restore to counter moving",
        show(s(&v.restore)),
        show(s(&q.restore)),
        show(s(&m.restore))
    );
    println!(
        "{:<34} {:>24} {:>24} {:>24}",
        "restore in a new VM (fresh RAM)",
        show(s(&v.new_vm)),
        "-",
        "-"
    );
    println!(
        "Vireo's restore row is the checkpoint applied in place to the VM that took it ({:.0} pages copied back, median), as QEMU's loadvm is; the new-VM row is what a new worker process pays",
        s(&v.applied_pages).median
    );
    println!(
        "Vireo live save: {:.0} copy rounds, {:.0} MiB written (medians); QEMU's migrate pause is its own downtime figure",
        s(&v.rounds).median,
        s(&v.written_mib).median
    );
    println!(
        "Peers measured elsewhere: Firecracker full snapshot of 256 MiB 180 ms (its CI baseline)"
    );
    let (vp, qs, vr, ql, vn) = (
        s(&v.pause).median,
        s(&q.pause).median,
        s(&v.restore).median,
        s(&q.restore).median,
        s(&v.new_vm).median,
    );
    println!(
        "checkpoint_pause_ms={vp:.1} qemu_savevm_ms={qs:.1} ratio={:.3} restore_ms={vr:.1} qemu_loadvm_ms={ql:.1} restore_ratio={:.3} new_vm_restore_ms={vn:.1} new_vm_restore_ratio={:.3}",
        vp / qs,
        vr / ql,
        vn / ql
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The probe's commands that set up the guest: the hot set filled, then rewritten nonstop.
fn prepare(console: &mut ProbeConsole, seed: u64) -> Result<(), String> {
    for line in [
        format!("MEM FILL {HOT_START_MIB} {HOT_MIB} {seed}"),
        format!("DIRTY START {HOT_START_MIB} {HOT_MIB} 0"),
    ] {
        console
            .command(&line, T)
            .map_err(|e| format!("`{line}`: {e}"))?;
    }
    std::thread::sleep(WARM);
    Ok(())
}

/// Waits (bounded) until `read` returns more than `from`.
fn until_above(
    mut read: impl FnMut() -> Result<u64, String>,
    from: u64,
    what: &str,
) -> Result<(), String> {
    let deadline = Instant::now() + T;
    while read()? <= from {
        if Instant::now() > deadline {
            return Err(format!("{what}: the pass counter did not move in {T:?}"));
        }
        std::thread::yield_now();
    }
    Ok(())
}

fn vireo_config(backing: RamBacking) -> (VmConfig, std::os::unix::net::UnixStream) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let mut config = VmConfig::new(vireo_probe_image::probe_elf(), MEMORY_MIB << 20, 1);
    config.console = ConsoleConfig::Stream(theirs);
    config.ram_backing = backing;
    (config, ours)
}

fn counter(h: &VmHandle) -> Result<u64, String> {
    h.memory()
        .read_obj(GuestAddress(PASSES))
        .map_err(|e| e.to_string())
}

/// Stops a VM and waits for its run thread.
fn stop(h: &VmHandle, run: std::thread::JoinHandle<vireo_vmm::error::Result<vireo_vmm::VmExit>>) {
    h.request_stop();
    let _ = run.join();
}

fn vireo_run(dir: &Path, seed: u64, args: &CheckpointArgs, out: &mut Series) -> Result<(), String> {
    let (config, ours) = vireo_config(args.guest_ram.backing());
    let vm = Vm::new(config).map_err(|e| format!("vireo: {e}"))?;
    let h = vm.handle();
    let run = std::thread::spawn(move || vm.run());
    let mut console = ProbeConsole::new(ours.try_clone().map_err(|e| e.to_string())?, ours);
    let result = (|| {
        console.wait_ready(T).map_err(|e| format!("vireo: {e}"))?;
        prepare(&mut console, seed)?;
        let snap = dir.join("vireo");
        let opts = LiveSaveOptions {
            then: AfterSave::Resume,
            ..Default::default()
        };
        let r = h
            .save_live(&snap, Identity::default(), None, &opts)
            .map_err(|e| format!("vireo snapshot: {e}"))?;
        out.pause.push(ms(r.pause));
        out.save.push(ms(r.total));
        out.rounds.push(r.rounds as f64);
        out.written_mib.push((r.bytes_written >> 20) as f64);
        // QEMU's loadvm comes 100 ms after its savevm; the guest runs meanwhile here too.
        std::thread::sleep(Duration::from_millis(100));
        let saved = saved_counter(&snap)?;
        let started = Instant::now();
        trace::begin();
        let applied = h
            .apply_in_place(&snap, &ApplyOptions::default())
            .map_err(|e| format!("vireo apply in place: {e}"))?;
        until_above(|| counter(&h), saved, "vireo apply in place")?;
        out.restore.push(ms(started.elapsed()));
        trace::mark("counter advanced (in place)");
        out.applied_pages.push(applied.pages_copied as f64);
        std::thread::sleep(Duration::from_millis(100));
        out.mapped_after_apply
            .push(h.kvm_page_stats().map_or("no KVM stats".into(), |p| {
                format!("KVM maps {} x 2M + {} x 4K", p.pages_2m, p.pages_4k)
            }));
        if !applied.tracked {
            return Err("vireo apply in place: the snapshot was not tracked".into());
        }
        Ok::<_, String>(snap)
    })();
    stop(&h, run);
    drop(console);
    let snap = result?;

    // Restore: from the call to the counter moving in the new VM.
    let (config, _ours) = vireo_config(args.guest_ram.backing());
    let started = Instant::now();
    trace::begin();
    let mut from = RestoreFrom::dir(&snap).map_err(|e| format!("vireo restore: {e}"))?;
    from.eager = args.eager;
    if args.no_working_set {
        from.working_set = None;
    }
    trace::mark("state file read");
    let vm = Vm::restore(config, &from).map_err(|e| format!("vireo restore: {e}"))?;
    let h = vm.handle();
    let saved = counter(&h)?;
    trace::mark("counter read");
    let run = std::thread::spawn(move || vm.run());
    let result = h
        .resume()
        .map_err(|e| format!("vireo resume: {e}"))
        .and_then(|()| {
            trace::mark("resumed");
            until_above(|| counter(&h), saved, "vireo restore")
        });
    let elapsed = started.elapsed();
    trace::mark("counter advanced");
    stop(&h, run);
    result?;
    out.new_vm.push(ms(elapsed));
    Ok(())
}

/// The pass counter as the snapshot holds it (read before the timed apply, so a guest that
/// moves it quickly is not measured against a later value).
fn saved_counter(snap: &Path) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(snap.join(vireo_vmm::MEMORY_FILE))
        .map_err(|e| format!("{}: {e}", snap.display()))?;
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, PASSES)
        .map_err(|e| format!("{}: {e}", snap.display()))?;
    Ok(u64::from_le_bytes(b))
}

/// A QEMU probe with a QMP socket and `extra` arguments.
fn qemu_spawn(
    qemu: &Path,
    dir: &Path,
    name: &str,
    extra: &[String],
) -> Result<(QemuProbe, Qmp), String> {
    let sock = dir.join(format!("{name}.qmp"));
    let mut c = QemuProbeConfig::new(qemu, MEMORY_MIB as u32);
    c.extra_args = vec![
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", sock.display()),
    ];
    c.extra_args.extend(extra.iter().cloned());
    let p = c
        .spawn()
        .map_err(|e| format!("starting {}: {e}", qemu.display()))?;
    let q = Qmp::connect(&sock, T)?;
    Ok((p, q))
}

fn qemu_savevm(qemu: &Path, dir: &Path, seed: u64, out: &mut Series) -> Result<(), String> {
    let image = dir.join("snap.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&image)
        .arg("64M")
        .status()
        .map_err(|e| format!("qemu-img: {e}"))?;
    if !st.success() {
        return Err(format!("qemu-img create {} failed", image.display()));
    }
    // A drive with no device: savevm only needs a qcow2 node to hold the snapshot.
    let drive = format!("if=none,id=snap,format=qcow2,file={}", image.display());
    let (mut p, mut q) = qemu_spawn(qemu, dir, "savevm", &["-drive".into(), drive])?;
    p.console.wait_ready(T).map_err(|e| format!("qemu: {e}"))?;
    prepare(&mut p.console, seed)?;
    let t = Instant::now();
    let said = q.hmp("savevm cp")?;
    let save = t.elapsed();
    if !said.trim().is_empty() {
        return Err(format!("qemu savevm: {said}"));
    }
    // Stop-the-world: the guest is paused for the whole command.
    out.pause.push(ms(save));
    out.save.push(ms(save));
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    let said = q.hmp("loadvm cp")?;
    if !said.trim().is_empty() {
        return Err(format!("qemu loadvm: {said}"));
    }
    let saved = q.read_u64(PASSES)?;
    until_above(|| q.read_u64(PASSES), saved, "qemu loadvm")?;
    out.restore.push(ms(t.elapsed()));
    Ok(())
}

fn qemu_migrate(qemu: &Path, dir: &Path, seed: u64, out: &mut Series) -> Result<(), String> {
    let file = dir.join("qemu-migrate.bin");
    let uri = format!("file:{}", file.display());
    {
        let (mut p, mut q) = qemu_spawn(qemu, dir, "mig-src", &[])?;
        p.console.wait_ready(T).map_err(|e| format!("qemu: {e}"))?;
        prepare(&mut p.console, seed)?;
        // QEMU's default cap of 128 MiB/s never converges against this guest; a file can take
        // what the page cache takes.
        q.execute(
            "migrate-set-parameters",
            serde_json::json!({ "max-bandwidth": 100u64 << 30 }),
        )?;
        let t = Instant::now();
        q.execute("migrate", serde_json::json!({ "uri": uri }))?;
        let deadline = Instant::now() + T;
        let info = loop {
            let info = q.execute("query-migrate", serde_json::json!({}))?;
            match info["status"].as_str() {
                Some("completed") => break info,
                Some("failed") | Some("cancelled") => {
                    return Err(format!("qemu migrate to file: {info}"))
                }
                _ if Instant::now() > deadline => {
                    return Err("qemu migrate to file did not complete".into())
                }
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        };
        out.save.push(ms(t.elapsed()));
        out.pause
            .push(info["downtime"].as_f64().unwrap_or(f64::NAN));
    }
    let (_p, mut q) = qemu_spawn(qemu, dir, "mig-dst", &["-incoming".into(), "defer".into()])?;
    let t = Instant::now();
    q.execute("migrate-incoming", serde_json::json!({ "uri": uri }))?;
    let deadline = Instant::now() + T;
    while q.status()? != "running" {
        if Instant::now() > deadline {
            return Err("qemu -incoming never ran".into());
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let saved = q.read_u64(PASSES)?;
    until_above(|| q.read_u64(PASSES), saved, "qemu incoming")?;
    out.restore.push(ms(t.elapsed()));
    Ok(())
}

/// Passes of the hot set per second over `window`.
fn pass_rate(h: &VmHandle, window: Duration) -> Result<f64, String> {
    let (from, t) = (counter(h)?, Instant::now());
    std::thread::sleep(window);
    Ok((counter(h)? - from) as f64 / t.elapsed().as_secs_f64())
}

/// `--log-cost`: the guest's DIRTY pass rate in the 1 s after each step, `runs` times.
fn log_cost(runs: usize, backing: RamBacking) -> Result<(), String> {
    let work = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let window = Duration::from_secs(1);
    let steps = [
        "no snapshot",
        "after a snapshot, untracked",
        "after one, untracked, slots kept",
        "after a snapshot, tracked",
        "after an in-place apply (log off)",
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); steps.len()];
    let mut pauses: Vec<Vec<f64>> = vec![Vec::new(); steps.len()];
    let mut remaps = Vec::new();
    for i in 0..runs {
        let (config, ours) = vireo_config(backing);
        let vm = Vm::new(config).map_err(|e| format!("vireo: {e}"))?;
        let h = vm.handle();
        let run = std::thread::spawn(move || vm.run());
        let mut console = ProbeConsole::new(ours.try_clone().map_err(|e| e.to_string())?, ours);
        let result = (|| {
            console.wait_ready(T).map_err(|e| format!("vireo: {e}"))?;
            prepare(&mut console, i as u64)?;
            rates[0].push(pass_rate(&h, window)?);
            for (track, remap, step) in [(false, true, 1), (false, false, 2), (true, false, 3)] {
                let opts = LiveSaveOptions {
                    then: AfterSave::Resume,
                    track_changes: track,
                    remap_after: remap,
                    ..Default::default()
                };
                let snap = work.path().join(format!("snap{i}-{step}"));
                let r = h
                    .save_live(&snap, Identity::default(), None, &opts)
                    .map_err(|e| format!("vireo snapshot: {e}"))?;
                pauses[step].push(ms(r.pause));
                if remap {
                    remaps.push(ms(r.remap));
                }
                rates[step].push(pass_rate(&h, window)?);
                if track {
                    let a = h
                        .apply_in_place(&snap, &ApplyOptions::default())
                        .map_err(|e| format!("vireo apply in place: {e}"))?;
                    pauses[4].push(ms(a.paused));
                    rates[4].push(pass_rate(&h, window)?);
                }
                let _ = std::fs::remove_dir_all(&snap);
            }
            Ok::<_, String>(())
        })();
        stop(&h, run);
        result?;
        eprintln!(
            "run {}: passes/s {}",
            i + 1,
            rates
                .iter()
                .map(|r| format!("{:.1}", r[i]))
                .collect::<Vec<_>>()
                .join(" | ")
        );
    }
    println!("DIRTY passes/s over {HOT_MIB} MiB in the 1 s after each step, median (min–max):");
    for ((step, r), p) in steps.iter().zip(&rates).zip(&pauses) {
        let x = summarize(r).expect("at least one run");
        let pause = summarize(p).map_or(String::new(), |p| {
            format!(
                "   guest paused {:.2} ms ({:.2}–{:.2})",
                p.median, p.min, p.max
            )
        });
        println!(
            "{step:<34} {:.1} ({:.1}–{:.1}){pause}",
            x.median, x.min, x.max
        );
    }
    if let Some(r) = summarize(&remaps) {
        println!(
            "of the untracked pause, slots registered anew: {:.3} ms ({:.3}–{:.3})",
            r.median, r.min, r.max
        );
    }
    Ok(())
}
