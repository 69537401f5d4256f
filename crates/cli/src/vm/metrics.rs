//! `vireo vm metrics NAME [--enable|--disable|--reset] [--output json]`: the VM's resource
//! metering report (`GET /v1/vms/{vm}/metrics`), or a change of its metering first (the report
//! printed is then the one the change answered: for --reset, the period it ended).

use clap::Args;
use vireo_api::VmMetrics;

use crate::api_client::Client;
use crate::disk::human;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::{render, utc};

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// The VM's name or id.
    pub vm: String,
    /// Start counting (the first enable starts the period).
    #[arg(long, group = "change")]
    pub enable: bool,
    /// Stop counting; the period keeps its totals.
    #[arg(long, group = "change")]
    pub disable: bool,
    /// End the period and print its final report; a new one starts now.
    #[arg(long, group = "change")]
    pub reset: bool,
    /// text, or json (the API's VmMetrics object).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

pub fn execute(client: &Client, args: MetricsArgs) -> Result<(), CliError> {
    let path = format!("{}/metrics", super::path(&args.vm)?);
    let change = [
        (args.enable, "enable"),
        (args.disable, "disable"),
        (args.reset, "reset"),
    ]
    .into_iter()
    .find_map(|(on, op)| on.then_some(op));
    let m: VmMetrics = match change {
        Some(op) => client.post(&format!("{path}/{op}"), None::<&()>)?,
        None => client.get(&path)?,
    };
    match args.output {
        OutputFormat::Json => emit(super::view::json(&m)),
        OutputFormat::Text => emit(text(&args.vm, change, &m)),
    }
}

fn text(vm: &str, change: Option<&str>, m: &VmMetrics) -> String {
    let mut out = String::new();
    match change {
        Some("reset") => out.push_str(&format!(
            "metering of VM {vm} reset; the period that ended:\n"
        )),
        Some(op) => out.push_str(&format!("metering of VM {vm}: {op}d\n")),
        None => {}
    }
    out.push_str(&format!(
        "metering:   {}\nperiod:     {}\nmetered:    {:.1} s\ncpu:        {:.1}% of one CPU (vCPUs {:.1}%)\nmemory:     avg {}  min {}  max {} ({} readings)\n",
        if m.enabled { "enabled" } else { "disabled" },
        // 0: metering was never enabled for this VM, so there is no period yet.
        if m.period_started_at == 0 {
            "none yet (vireo vm metrics VM --enable starts one)".to_string()
        } else {
            format!("since {}", utc(m.period_started_at))
        },
        m.metered_ms as f64 / 1000.0,
        m.cpu.average_percent,
        m.cpu.vcpu_average_percent,
        human(m.memory.average_bytes),
        human(m.memory.min_bytes),
        human(m.memory.max_bytes),
        m.memory.samples,
    ));
    if !m.disks.is_empty() {
        let rows: Vec<Vec<String>> = m
            .disks
            .iter()
            .map(|d| {
                vec![
                    d.path.display().to_string(),
                    d.read_bytes.to_string(),
                    d.write_bytes.to_string(),
                    d.normalized_ios.to_string(),
                    format!("{:.1}", d.average_iops),
                    format!("{:.3}", d.throttled_ns as f64 / 1e9),
                    d.min_iops_alerts.to_string(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&render(
            &[
                "DISK",
                "READ_BYTES",
                "WRITTEN_BYTES",
                "IOS_8K",
                "AVG_IOPS",
                "THROTTLED_S",
                "MIN_IOPS_ALERTS",
            ],
            &rows,
        ));
    }
    if m.nics.is_empty() {
        out.push_str("nics:       none metered\n");
    } else {
        // In: what the VM received; out: what it sent.
        let rows: Vec<Vec<String>> = m
            .nics
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.bytes_in.to_string(),
                    n.packets_in.to_string(),
                    n.bytes_out.to_string(),
                    n.packets_out.to_string(),
                    n.dropped.to_string(),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&render(
            &[
                "NIC",
                "IN_BYTES",
                "IN_PKTS",
                "OUT_BYTES",
                "OUT_PKTS",
                "DROPPED",
            ],
            &rows,
        ));
    }
    out
}
