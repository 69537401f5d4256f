//! `vireo disk check`: report (and with --repair fix) a VHDX's structural problems, one per
//! line. Exit status 1 while an unrepaired problem remains.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use vireo_vhdx::{CheckReport, Vhdx};

use super::size::human;
use super::{errors, require_vhdx, OutputArg, Result};

#[derive(Args)]
pub struct CheckArgs {
    /// The VHDX to check.
    pub path: PathBuf,
    /// Fix what can be fixed safely (replay the log, rewrite a damaged header copy or region
    /// table, clear BAT entries pointing outside the file).
    #[arg(long)]
    pub repair: bool,
    /// text (default) or json.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputArg,
}

pub fn run(a: CheckArgs) -> Result<ExitCode> {
    require_vhdx(&a.path, "check")?;
    let report = Vhdx::check(&a.path, a.repair).map_err(|e| errors::vhdx(&a.path, e))?;
    match a.output {
        OutputArg::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputArg::Text => print!("{}", text(&report)),
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(crate::exit::FAILED)
    })
}

/// One line per problem (`PATH: severity: message`), then one summary line.
fn text(r: &CheckReport) -> String {
    let path = r.path.display();
    let mut out = String::new();
    for p in &r.problems {
        let fixed = if p.repaired { " (repaired)" } else { "" };
        out += &format!("{path}: {}: {}{fixed}\n", p.severity, p.message);
    }
    let remaining = r.problems.iter().filter(|p| !p.repaired).count();
    let repaired = r.problems.len() - remaining;
    let verdict = match (r.is_clean(), repaired) {
        // Clean with unrepaired lines left: those are warnings only.
        (true, _) if remaining > 0 => format!("no errors ({remaining} warnings)"),
        (true, 0) => "no problems found".to_string(),
        (true, n) => format!("{n} problems repaired, none remain"),
        (false, 0) => format!("PROBLEMS FOUND ({remaining})"),
        (false, n) => format!("PROBLEMS FOUND ({remaining} remain, {n} repaired)"),
    };
    out += &format!(
        "{path}: {verdict}; {} allocated blocks, {} log entries, file {}\n",
        r.allocated_blocks,
        r.log_entries,
        human(r.file_size)
    );
    out
}
