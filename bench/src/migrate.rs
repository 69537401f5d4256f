//! `migrate`: live migration of a 256 MiB probe VM between two VMMs on this machine, Vireo vs
//! QEMU on the same guest and workload, alternating, ≥ 5 runs per case, medians.
//!
//! Cases (issue 12): `hot` rewrites a 64 MiB hot set at full speed; `bounded` dirties the same
//! range at 64 MiB/s. Downtime is taken twice: each VMM's own figure, and the guest's: the gap
//! between the last move of the probe's page counter on the source and its first move on the
//! destination, watched from outside (`migrate/watch.rs`).

mod link;
mod qemu;
mod vireo;
mod watch;

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use vireo_probe_image::qemu::find_qemu;
use vireo_probe_image::ProbeConsole;

use crate::boot::stats::summarize;

pub const MEMORY_MIB: u64 = 256;
const HOT_START_MIB: u64 = 16;
const HOT_MIB: u64 = 64;
pub const T: Duration = Duration::from_secs(60);
/// How long the workload runs before the migration starts.
const WARM: Duration = Duration::from_millis(300);

const ABOUT: &str = "\
Live migration of a 256 MiB probe VM rewriting a 64 MiB hot set (full speed, and bounded to
64 MiB/s), Vireo worker to worker over mutual TLS vs QEMU (multifd 2 channels, -incoming defer,
downtime-limit = --max-downtime) over loopback. Needs /dev/kvm and qemu-system-x86_64.
Downtime is the guest's: from its page counter's last move on the source to the first value
past it on the destination (both read from outside).
Total (like for like): from the source being told to migrate (Vireo: worker.sock MigrateOut;
QEMU: QMP `migrate`) until the source says `completed`, i.e. the destination runs the VM
(Vireo: MigrateStatus; QEMU: query-migrate, both polled every 1 ms). Both destinations are
started and listening before the clock starts (QEMU with -incoming defer + migrate-incoming,
Vireo's worker launched `incoming`), so neither total holds a process start; each case also
prints that start-up (spawn to listening), the totals with it, and Vireo's total up to the
source worker's exit (its VM torn down). Each Vireo run prints both workers' `migration
timeline` lines (set-up phases: streams' TLS and OK, pre-copy, streams done, RUNNING).
The workers inherit the environment, for A/B runs (docs/migration.md):
VIREO_DIRTY_CLEAR=on-fetch gives Vireo KVM's classic dirty log (each fetch re-protects every
page it reports) instead of the default manual protection (each region re-protected right
before its copy).
Last line (medians, the worse case of the two): downtime_ms=<n> qemu_downtime_ms=<n> ratio=<n>
  total_ms=<n> qemu_total_ms=<n> (like for like, as above)";

#[derive(Args)]
#[command(about = ABOUT, long_about = ABOUT)]
pub struct MigrateArgs {
    /// Runs of each side per case (alternating). Nine since session 38: on this host a
    /// median of five moved by a millisecond from one invocation to the next on either side.
    #[arg(long, default_value_t = 9)]
    runs: usize,
    /// Downtime target given to both VMMs, milliseconds.
    #[arg(long, default_value_t = 10)]
    max_downtime: u32,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH].
    #[arg(long)]
    qemu: Option<PathBuf>,
    /// Vireo's post-copy mode (QEMU stays pre-copy): `always` or `auto` measure post-copy's
    /// downtime (the guest's gap includes its first faults on missing pages).
    #[arg(long, default_value = "never", value_parser = ["never", "auto", "always"])]
    postcopy: String,
    /// Vireo's page streams (`vireo vm migrate --streams`; QEMU keeps multifd 2 channels).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=16))]
    streams: u16,
    /// Measure the migration link alone (framing, compression, TLS; no VM): rate and CPU
    /// per MiB for 1 and 2 streams and each codec, then stop.
    #[arg(long)]
    link: bool,
    /// With `--link`: the receivers read every record whole into their own buffer before
    /// applying it (the path before session 29), not page data straight from TLS's buffers.
    #[arg(long, requires = "link")]
    link_whole_records: bool,
}

pub struct Case {
    pub name: &'static str,
    /// 0 = as fast as the guest can.
    pub rate_mib_s: u64,
    pub max_downtime_ms: u32,
    /// Vireo's `--postcopy`.
    pub postcopy: vireo_api::worker::PostcopyMode,
    /// Vireo's page streams.
    pub streams: u16,
}

/// One migration as measured.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// The VMM's own downtime figure.
    pub downtime_ms: f64,
    /// The guest's: its counter's gap across the switch-over.
    pub guest_gap_ms: f64,
    /// From the source being told to migrate to its saying `completed` (the destination
    /// runs the VM), the destination started and listening before.
    pub total_ms: f64,
    /// Vireo: to the source worker's exit (its VM torn down); QEMU: as `total_ms`.
    pub total_to_exit_ms: f64,
    /// Starting the destination process until it listens (outside `total_ms` on both sides).
    pub destination_start_ms: f64,
    pub rounds: f64,
    pub transferred_mib: f64,
}

/// The probe's commands that set up the workload.
pub fn prepare(console: &mut ProbeConsole, case: &Case, seed: u64) -> Result<(), String> {
    for line in [
        format!("MEM FILL {HOT_START_MIB} {HOT_MIB} {seed}"),
        format!("DIRTY START {HOT_START_MIB} {HOT_MIB} {}", case.rate_mib_s),
    ] {
        console
            .command(&line, T)
            .map_err(|e| format!("`{line}`: {e}"))?;
    }
    std::thread::sleep(WARM);
    Ok(())
}

pub fn run(args: MigrateArgs) -> Result<(), String> {
    if args.runs == 0 {
        return Err("--runs must be at least 1".into());
    }
    if args.link {
        return link::run(args.runs, args.link_whole_records);
    }
    let qemu = args
        .qemu
        .clone()
        .or_else(find_qemu)
        .ok_or("qemu-system-x86_64 not found (pass --qemu PATH)")?;
    let postcopy = match args.postcopy.as_str() {
        "always" => vireo_api::worker::PostcopyMode::Always,
        "auto" => vireo_api::worker::PostcopyMode::Auto,
        _ => vireo_api::worker::PostcopyMode::Never,
    };
    let cases = [
        Case {
            name: "hot 64 MiB, full speed",
            rate_mib_s: 0,
            max_downtime_ms: args.max_downtime,
            postcopy,
            streams: args.streams,
        },
        Case {
            name: "64 MiB at 64 MiB/s",
            rate_mib_s: 64,
            max_downtime_ms: args.max_downtime,
            postcopy,
            streams: args.streams,
        },
    ];
    let work = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let mut worst: Option<(f64, f64, f64, f64)> = None;
    println!(
        "{:<24} {:>6} | {:>9} {:>9} {:>9} {:>7} {:>8} | {:>9} {:>9} {:>9} {:>7} {:>8}",
        "case (medians)",
        "",
        "gap ms",
        "own ms",
        "total ms",
        "rounds",
        "MiB",
        "gap ms",
        "own ms",
        "total ms",
        "rounds",
        "MiB"
    );
    for case in &cases {
        let (mut v, mut q) = (Vec::new(), Vec::new());
        for i in 0..args.runs {
            let dir = work.path().join(format!("{}-{i}", case.rate_mib_s));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let a = vireo::run(&dir, case, i as u64)?;
            let b = qemu::run(&qemu, &dir, case, i as u64)?;
            eprintln!(
                "{} run {}: vireo gap {:.1} ms (own {:.1}) total {:.0} ms | qemu gap {:.1} ms (own {:.1}) total {:.0} ms",
                case.name,
                i + 1,
                a.guest_gap_ms,
                a.downtime_ms,
                a.total_ms,
                b.guest_gap_ms,
                b.downtime_ms,
                b.total_ms
            );
            v.push(a);
            q.push(b);
            let _ = std::fs::remove_dir_all(&dir);
        }
        let med = |s: &[Sample], f: fn(&Sample) -> f64| {
            summarize(&s.iter().map(f).collect::<Vec<_>>())
                .map(|x| x.median)
                .unwrap_or(f64::NAN)
        };
        let row = |s: &[Sample]| {
            format!(
                "{:>9.1} {:>9.1} {:>9.0} {:>7.0} {:>8.0}",
                med(s, |x| x.guest_gap_ms),
                med(s, |x| x.downtime_ms),
                med(s, |x| x.total_ms),
                med(s, |x| x.rounds),
                med(s, |x| x.transferred_mib)
            )
        };
        println!("{:<24} {:>6} | {} | {}", case.name, "", row(&v), row(&q));
        let (vs, qs) = (
            med(&v, |x| x.destination_start_ms),
            med(&q, |x| x.destination_start_ms),
        );
        println!(
            "  {:<22} destination start (spawn to listening, not in total): vireo {vs:.0} ms, \
             qemu {qs:.0} ms; total with it: vireo {:.0} ms, qemu {:.0} ms; vireo to the \
             source's exit {:.0} ms",
            "",
            med(&v, |x| x.total_ms + x.destination_start_ms),
            med(&q, |x| x.total_ms + x.destination_start_ms),
            med(&v, |x| x.total_to_exit_ms),
        );
        let this = (
            med(&v, |x| x.guest_gap_ms),
            med(&q, |x| x.guest_gap_ms),
            med(&v, |x| x.total_ms),
            med(&q, |x| x.total_ms),
        );
        // The last line reports the case where Vireo compares worst (highest gap ratio).
        if worst.is_none_or(|w| this.0 / this.1 > w.0 / w.1) {
            worst = Some(this);
        }
    }
    println!("columns: Vireo | QEMU; gap = the guest's own pause, own = the VMM's downtime figure");
    let (vd, qd, vt, qt) = worst.expect("two cases");
    println!(
        "downtime_ms={vd:.1} qemu_downtime_ms={qd:.1} ratio={:.3} total_ms={vt:.0} qemu_total_ms={qt:.0}",
        vd / qd
    );
    Ok(())
}
