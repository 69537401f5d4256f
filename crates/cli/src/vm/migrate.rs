//! `vireo vm migrate NAME --to HOST:PORT [--quick] ...`: move a running VM to another vireod
//! (docs/migration.md). Follows the daemon's `migrate` job with a progress bar showing the
//! pre-copy round, what remains and the estimated downtime; Ctrl-C *cancels* the migration
//! (before the switch-over the VM keeps running here), a second Ctrl-C stops waiting.

use std::error::Error;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use vireo_api::migrate::MigrateRequest;
use vireo_api::worker::{CompressMode, PostcopyMode};
use vireo_api::{Job, JobState};

use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Compress {
    Auto,
    Zstd,
    Lz4,
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Postcopy {
    Auto,
    Always,
    Never,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM's name or id (running; --quick also takes a paused one).
    pub vm: String,
    /// The destination vireod's migration listener, ADDR:PORT (its `vireod
    /// --migration-listen`; `vireo host identity --output json` there shows it). Each host
    /// must trust the other (`vireo host trust add`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub to: String,
    /// Live: switch over once the final pause is estimated to fit this (e.g. 10ms, 1s;
    /// default 300ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_ms)]
    pub max_downtime: Option<u32>,
    /// Live: cap on the link, bytes per second (suffixes K, M, G: 1024-based).
    #[arg(long, value_name = "BYTES_PER_SEC", value_parser = parse_bytes)]
    pub bandwidth: Option<u64>,
    /// Live: compression of memory pages.
    #[arg(long, value_enum, default_value = "auto")]
    pub compress: Compress,
    /// Live: parallel TLS streams (1-16).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub streams: u16,
    /// Live: post-copy runs the VM on the destination at once and fetches its missing pages
    /// on fault: `auto` switches to it instead of throttling a guest that pre-copy cannot
    /// catch up with, `always` after the first pass, `never` throttles instead. Risk: if the
    /// source host dies during post-copy, the VM is lost (docs/migration.md).
    #[arg(long, value_enum, default_value = "auto")]
    pub postcopy: Postcopy,
    /// Quick migration: save the VM, send its saved state, restore it there (a pause of
    /// seconds; needs no live-migration support in the workers). The VM's checkpoints move
    /// with it, as they do in a live migration on shared storage (their files first, then the
    /// disks the guest writes copied live into new children there).
    #[arg(long)]
    pub quick: bool,
    /// Shared-nothing migration: copy the disks too, over the same authenticated channel,
    /// for a destination that cannot reach this host's files. Each disk arrives as one file
    /// in --dest-dir (a VHDX chain flattened into one VHDX; raw stays raw). Once the VM runs
    /// there, its disk files here are deleted (see --keep-source). A VM with checkpoints takes
    /// its tree along: the base disks the first checkpoint froze arrive in --dest-dir under
    /// their names, vireod's files of the tree in the destination's folder for the VM; a disk
    /// in none of the checkpoints arrives flattened in --dest-dir. The kernel and initrd
    /// travel too, into --dest-dir, unless the destination has the same files (same SHA-256:
    /// at the same path, booting another of its VMs, or in --dest-dir already).
    #[arg(long, requires = "dest_dir", conflicts_with = "quick")]
    pub with_storage: bool,
    /// With --with-storage: the folder on the destination (inside its storage roots) the
    /// disk copies are created in.
    #[arg(long, value_name = "DIR", requires = "with_storage")]
    pub dest_dir: Option<std::path::PathBuf>,
    /// With --with-storage: keep this host's disk files once the VM runs on the destination.
    /// Without it they are deleted then: each disk's file and its VHDX parents (a VM with
    /// checkpoints: the base disks its tree froze; vireod's own checkpoint files always go).
    /// Never deleted: a file another VM on this host uses (its disks, their parents, its
    /// checkpoints), one another process holds open, the kernel and initrd; nothing at all if
    /// the migration fails. `vireo job show` lists what was deleted and what stayed.
    #[arg(long, requires = "with_storage")]
    pub keep_source: bool,
    /// Print the job and return at once; `vireo job show ID` follows it.
    #[arg(long)]
    pub no_wait: bool,
    /// text, or json (the job as it ended).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

/// `10ms`, `2s`, or a plain number of milliseconds.
fn parse_ms(s: &str) -> Result<u32, String> {
    let bad = || format!("{s:?}: expected a duration such as 10ms or 1s");
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else {
        (s, 1)
    };
    let v: u32 = num.trim().parse().map_err(|_| bad())?;
    v.checked_mul(mult).filter(|v| *v > 0).ok_or_else(bad)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?}: expected bytes per second such as 500M or 1G");
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let v: u64 = num.parse().map_err(|_| bad())?;
    v.checked_mul(mult).filter(|v| *v > 0).ok_or_else(bad)
}

pub fn execute(client: &Client, args: MigrateArgs) -> Result<ExitCode, Box<dyn Error>> {
    let path = super::path(&args.vm)?;
    let body = MigrateRequest {
        to: args.to.clone(),
        max_downtime_ms: args.max_downtime,
        bandwidth: args.bandwidth,
        compress: match args.compress {
            Compress::Auto => CompressMode::Auto,
            Compress::Zstd => CompressMode::Zstd,
            Compress::Lz4 => CompressMode::Lz4,
            Compress::None => CompressMode::None,
        },
        streams: Some(args.streams),
        postcopy: match args.postcopy {
            Postcopy::Auto => PostcopyMode::Auto,
            Postcopy::Always => PostcopyMode::Always,
            Postcopy::Never => PostcopyMode::Never,
        },
        quick: args.quick,
        with_storage: args.with_storage,
        dest_dir: args.dest_dir.clone(),
        keep_source: args.keep_source,
    };
    let job: Job = client.post(&format!("{path}/migrate"), Some(&body))?;
    if args.no_wait {
        if args.output == OutputFormat::Json {
            emit(super::view::json(&job))?;
        } else {
            emit(format!(
                "job {} (migration of {} to {}) is running; `vireo job show {}` follows it\n",
                job.id, args.vm, args.to, job.id
            ))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let job = crate::job::wait::follow_cancellable(
        client,
        job,
        &format!("migrate {}", args.vm),
        "before the switch-over the VM keeps running here",
        &|job: &Job| {
            job.migration.as_ref().map(|m| {
                if m.disk_bytes_total > 0 && m.round == 0 && m.transferred_bytes == 0 {
                    return format!(
                        "disks {} / {} MiB",
                        m.disk_bytes_copied >> 20,
                        m.disk_bytes_total >> 20
                    );
                }
                format!(
                    "round {}, remaining {} MiB, est. downtime {} ms",
                    m.round,
                    m.remaining_bytes >> 20,
                    m.estimated_downtime_ms
                )
            })
        },
    )?;
    if args.output == OutputFormat::Json {
        emit(super::view::json(&job))?;
    }
    match job.state {
        JobState::Completed => {
            if args.output == OutputFormat::Text {
                let downtime = job
                    .migration
                    .as_ref()
                    .and_then(|m| m.downtime_ms)
                    .map(|d| format!(" (paused {d} ms)"))
                    .unwrap_or_default();
                emit(format!(
                    "migrated VM {} to {}{downtime}\n",
                    args.vm, args.to
                ))?;
                // Shared-nothing: what became of this host's disk files (the job's phases
                // `source file(s) deleted|kept: ...`).
                let fates: String = job
                    .migration
                    .iter()
                    .flat_map(|m| &m.phases)
                    .filter(|p| p.name.starts_with("source file"))
                    .map(|p| format!("{}\n", p.name))
                    .collect();
                emit(fates)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        JobState::Cancelled => Err(CliError::failed(format!(
            "the migration of VM {} was cancelled; it runs here (job {})",
            args.vm, job.id
        ))
        .into()),
        _ => Err(CliError::failed(format!(
            "the migration of VM {} failed: {} (job {})",
            args.vm,
            job.error.as_deref().unwrap_or("no reason given"),
            job.id
        ))
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates() {
        assert_eq!(parse_ms("10ms"), Ok(10));
        assert_eq!(parse_ms("2s"), Ok(2000));
        assert_eq!(parse_ms("40"), Ok(40));
        assert!(parse_ms("0ms").is_err() && parse_ms("fast").is_err());
        assert_eq!(parse_bytes("500M"), Ok(500 << 20));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("0").is_err() && parse_bytes("xM").is_err());
    }
}
