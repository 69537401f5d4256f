//! The `boot` benchmark: boot time to `PROBE READY` and VMM memory overhead, `vireo run` vs QEMU
//! microvm on the same probe image, alternating boots so machine noise hits both alike.

pub(crate) mod launch;
pub(crate) mod smaps;
pub(crate) mod stats;

use std::path::{Path, PathBuf};
use std::time::Duration;

use vireo_probe_image::qemu::{find_qemu, QemuProbeConfig};
use vireo_probe_image::{kvm_usable, probe_elf};

use launch::{Launcher, Sample};
use stats::{summarize, Summary};

const AFTER_HELP: &str = "\
What is measured, per boot (the same code path for both VMMs):
  boot time   process spawn until the probe's `PROBE READY` line is read from COM1 (the VMM's
              stdout); then `POWEROFF` is sent and the time until the process is reaped is
              reported separately (exit).
  memory      read from /proc/<pid>/smaps at PROBE READY. overhead = Σ Rss of all mappings
              minus Σ Rss of the guest-RAM mappings. Vireo's guest RAM is its RAM file's mapping
              (/vireo-guest-ram or /memfd:vireo-guest-ram); QEMU's is the anonymous mapping of
              exactly the -m size.
              The guest's touched pages are thus excluded for both; everything else (binary and
              libraries, heap, thread stacks, firmware copies) counts as overhead.
Boots alternate vireo, qemu, vireo, ... after --warmup unmeasured pairs. Each boot and each
power-off is bounded by --timeout-secs; the process is killed on timeout.

QEMU runs with the probe crate's fastest options (vireo_probe_image::qemu): -M microvm with
x-option-roms=off,acpi=off,rtc=off,pic=off, -bios qboot.rom, -enable-kvm, -nodefaults.

`vireo run` execs `vireo-run` beside it (same pid), so that is the process measured.
The vireo binary is looked up next to this executable (same target directory); build it first:
  cargo build --release -p vireo-cli -p vireo-bench
or pass --vireo PATH.

Output: a table of median/min/max, then as the last two lines
  overhead_kib=<vireo median> qemu_overhead_kib=<qemu median>
  boot_ms=<vireo median> qemu_ms=<qemu median> ratio=<vireo/qemu>";

#[derive(clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct BootArgs {
    /// Measured boots per VMM (the figures need at least 10).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Guest RAM for both VMMs: bytes with an optional K, M or G suffix, a whole number of MiB.
    #[arg(long, default_value = "256M", value_parser = parse_mib, value_name = "SIZE")]
    memory: u32,
    /// vCPUs for both VMMs (under QEMU only the boot vCPU runs the probe; under vireo the others
    /// spin on their heartbeat counters).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: u32,
    /// Unmeasured vireo+qemu boot pairs before measuring (warms the page cache).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100))]
    warmup: u32,
    /// Seconds a boot (or a power-off) may take before the VMM is killed and the run failed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout_secs: u64,
    /// The `vireo` binary [default: `vireo` next to this executable].
    #[arg(long, value_name = "PATH")]
    vireo: Option<PathBuf>,
    /// The QEMU binary [default: qemu-system-x86_64 from PATH].
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// Also list the largest non-guest mappings of each VMM (from its median-overhead boot).
    #[arg(long)]
    breakdown: bool,
}

/// "256M" → 256. Suffixes K, M, G (powers of 1024); the result must be a whole number of MiB
/// because QEMU's -m takes MiB.
fn parse_mib(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let (digits, unit) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&t[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 256M, 1G)"))?;
    let bytes = n
        .checked_mul(unit)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes == 0 || !bytes.is_multiple_of(1 << 20) {
        return Err(format!("'{s}' is not a positive whole number of MiB"));
    }
    u32::try_from(bytes >> 20).map_err(|_| format!("'{s}' is too large"))
}

pub(crate) fn locate_vireo(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("--vireo {}: no such file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating this executable: {e}"))?;
    let sibling = exe.with_file_name("vireo");
    if sibling.is_file() {
        Ok(sibling)
    } else {
        Err(format!(
            "{} not found: run `cargo build --release -p vireo-cli` (same target dir) first, or pass --vireo PATH",
            sibling.display()
        ))
    }
}

fn qemu_config(qemu: &Path, args: &BootArgs) -> QemuProbeConfig {
    let mut config = QemuProbeConfig::new(qemu, args.memory);
    config.cpus = args.vcpus;
    if config.firmware.is_none() {
        // Without qboot QEMU falls back to SeaBIOS, which starts PVH kernels through option ROMs.
        eprintln!(
            "note: {} missing, QEMU uses SeaBIOS (slower)",
            vireo_probe_image::qemu::QBOOT
        );
        config.machine = config.machine.replace("x-option-roms=off,", "");
    }
    config
}

/// Measured boots of one VMM.
#[derive(Default)]
struct Series {
    samples: Vec<Sample>,
    failures: Vec<String>,
}

impl Series {
    fn summary(&self, f: impl Fn(&Sample) -> f64) -> Option<Summary> {
        summarize(&self.samples.iter().map(f).collect::<Vec<_>>())
    }
}

pub fn run(args: BootArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !kvm_usable() {
        return Err("/dev/kvm is missing or not readable and writable by this user".into());
    }
    let qemu =
        match args.qemu.clone().or_else(find_qemu) {
            Some(q) if q.is_file() => q,
            Some(q) => return Err(format!("--qemu {}: no such file", q.display()).into()),
            None => return Err(
                "qemu-system-x86_64 not found in PATH (install qemu-system-x86; ./setup.sh does)"
                    .into(),
            ),
        };
    let vireo = locate_vireo(args.vireo.clone())?;
    if args.runs < 10 {
        eprintln!(
            "note: {} runs per VMM; the issue's figures use at least 10",
            args.runs
        );
    }
    let launchers = [
        Launcher::vireo(&vireo, probe_elf(), args.memory, args.vcpus),
        Launcher::qemu(&qemu_config(&qemu, &args)),
    ];
    let timeout = Duration::from_secs(args.timeout_secs);

    println!(
        "boot: probe guest, {} MiB, {} vCPU(s), {} boots per VMM alternating, {} warm-up pair(s)",
        args.memory, args.vcpus, args.runs, args.warmup
    );
    for l in &launchers {
        println!("  {:5}: {}", l.vmm.name(), l.command_line());
    }

    for i in 0..args.warmup {
        for l in &launchers {
            l.boot(timeout)
                .map_err(|e| format!("warm-up boot {} of {}: {e}", i + 1, l.vmm.name()))?;
        }
    }

    let mut series: [Series; 2] = Default::default();
    for i in 0..args.runs {
        let mut line = format!("run {}/{}:", i + 1, args.runs);
        for (l, s) in launchers.iter().zip(series.iter_mut()) {
            match l.boot(timeout) {
                Ok(sample) => {
                    line.push_str(&format!(
                        " {} {:.1} ms {} KiB",
                        l.vmm.name(),
                        ms(sample.ready),
                        sample.memory.overhead()
                    ));
                    s.samples.push(sample);
                }
                Err(e) => {
                    line.push_str(&format!(" {} FAILED", l.vmm.name()));
                    eprintln!("{} boot {} failed: {e}", l.vmm.name(), i + 1);
                    s.failures.push(e);
                }
            }
        }
        eprintln!("{line}");
    }

    for (l, s) in launchers.iter().zip(&series) {
        if s.samples.len() * 2 < args.runs as usize {
            return Err(format!(
                "{} failed {} of {} boots; first error: {}",
                l.vmm.name(),
                s.failures.len(),
                args.runs,
                s.failures.first().map_or("-", String::as_str)
            )
            .into());
        }
    }

    print_table(&series);
    if args.breakdown {
        for (l, s) in launchers.iter().zip(&series) {
            print_breakdown(l, s);
        }
    }

    let [v, q] = &series;
    let med = |s: &Series, f: fn(&Sample) -> f64| s.summary(f).map_or(f64::NAN, |x| x.median);
    let overhead = |s: &Sample| s.memory.overhead() as f64;
    let ready = |s: &Sample| ms(s.ready);
    let (boot_v, boot_q) = (med(v, ready), med(q, ready));
    println!(
        "overhead_kib={} qemu_overhead_kib={}",
        med(v, overhead).round(),
        med(q, overhead).round()
    );
    println!(
        "boot_ms={boot_v:.1} qemu_ms={boot_q:.1} ratio={:.3}",
        boot_v / boot_q
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn print_table(series: &[Series; 2]) {
    type Metric = (&'static str, fn(&Sample) -> f64, usize);
    let rows: [Metric; 8] = [
        ("spawn->READY (ms)", |s| ms(s.ready), 1),
        ("POWEROFF->exit (ms)", |s| ms(s.exit), 1),
        ("RSS (KiB)", |s| s.memory.total_rss as f64, 0),
        ("guest RAM RSS (KiB)", |s| s.memory.guest_ram_rss as f64, 0),
        ("overhead (KiB)", |s| s.memory.overhead() as f64, 0),
        ("  anon: heap/stacks", |s| s.memory.anon as f64, 0),
        ("  file: binary/libs", |s| s.memory.file as f64, 0),
        ("  other: vdso...", |s| s.memory.other as f64, 0),
    ];
    println!();
    println!(
        "{:<22}{:>27}{:>27}",
        "", "vireo median/min/max", "qemu median/min/max"
    );
    for (name, f, decimals) in rows {
        let mut line = format!("{name:<22}");
        for s in series {
            let cell = match s.summary(f) {
                Some(x) => format!(
                    "{:.d$} / {:.d$} / {:.d$}",
                    x.median,
                    x.min,
                    x.max,
                    d = decimals
                ),
                None => "-".into(),
            };
            line.push_str(&format!("{cell:>27}"));
        }
        println!("{line}");
    }
    let ok = |s: &Series| format!("{}/{}", s.samples.len(), s.samples.len() + s.failures.len());
    println!(
        "{:<22}{:>27}{:>27}",
        "boots ok",
        ok(&series[0]),
        ok(&series[1])
    );
    println!();
}

/// The largest mappings outside guest RAM in the boot whose overhead was the median.
fn print_breakdown(launcher: &Launcher, series: &Series) {
    let mut by_overhead: Vec<&Sample> = series.samples.iter().collect();
    by_overhead.sort_by_key(|s| s.memory.overhead());
    let Some(sample) = by_overhead.get(by_overhead.len() / 2) else {
        return;
    };
    println!(
        "{} largest mappings outside guest RAM (boot with overhead {} KiB):",
        launcher.vmm.name(),
        sample.memory.overhead()
    );
    for m in smaps::largest_overhead(&sample.maps, launcher.ram_rule(), 12) {
        let name = if m.path.is_empty() { "[anon]" } else { &m.path };
        println!(
            "  {:>7} KiB rss of {:>8} KiB {} {}",
            m.rss_kib, m.size_kib, m.perms, name
        );
    }
    println!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mib("256M"), Ok(256));
        assert_eq!(parse_mib("1G"), Ok(1024));
        assert_eq!(parse_mib("2048k"), Ok(2));
        assert_eq!(parse_mib("1048576"), Ok(1));
        assert!(parse_mib("1000k").is_err());
        assert!(parse_mib("0M").is_err());
        assert!(parse_mib("abc").is_err());
        assert!(parse_mib("99999999999G").is_err());
    }
}
