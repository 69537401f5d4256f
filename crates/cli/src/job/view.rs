//! How jobs print: a table for `job list`, `key: value` lines for `job show`, the API's JSON
//! for `--output json`.

use std::collections::HashMap;

use uuid::Uuid;
use vireo_api::{Job, JobKind};

use super::wait::state_name;
use crate::output::OutputFormat;
use crate::table::{render, utc};
use crate::vm::view::json;

/// `job list`: ID VM KIND STATE PROGRESS ERROR.
pub fn list(jobs: &[Job], names: &HashMap<Uuid, String>, output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return json(&jobs);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                job.id.to_string(),
                vm_name(job, names),
                kind_name(job.kind),
                state_name(job.state).to_string(),
                format!("{}%", job.progress),
                job.error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    render(&["ID", "VM", "KIND", "STATE", "PROGRESS", "ERROR"], &rows)
}

pub fn show(job: &Job, names: &HashMap<Uuid, String>, output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return json(job);
    }
    let vm = match job.vm_id {
        Some(id) => match names.get(&id) {
            Some(name) => format!("{name} ({id})"),
            None => id.to_string(),
        },
        None => "- (removed)".to_string(),
    };
    let lines = [
        ("id", job.id.to_string()),
        ("vm", vm),
        ("kind", kind_name(job.kind)),
        ("state", state_name(job.state).to_string()),
        ("progress", format!("{}%", job.progress)),
        ("error", job.error.clone().unwrap_or_else(|| "-".into())),
        ("created", utc(job.created_at)),
    ];
    let mut text: String = lines
        .iter()
        .map(|(k, v)| format!("{:9} {v}\n", format!("{k}:")))
        .collect();
    if let Some(m) = &job.migration {
        text.push_str(&migration_lines(m));
    }
    text
}

/// A migration job's progress: `vireo job show` and `vireo vm migrate` print it.
pub fn migration_lines(m: &vireo_api::worker::MigrateProgress) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
    let state = match serde_json::to_value(m.state) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{:?}", m.state),
    };
    let mut out = format!(
        "migration: {state}, round {}, sent {} of {} memory, remaining {}, dirty rate {}/s, \
         estimated downtime {} ms\n",
        m.round,
        mib(m.transferred_bytes),
        mib(m.memory_bytes),
        mib(m.remaining_bytes),
        mib(m.dirty_rate),
        m.estimated_downtime_ms
    );
    if let Some(d) = m.downtime_ms {
        out.push_str(&format!("downtime:  {d} ms\n"));
    }
    if let Some(msg) = &m.message {
        out.push_str(&format!("message:   {msg}\n"));
    }
    // Where the time went outside pre-copy: each step with its time since the job began and
    // since the step before.
    let mut before = 0;
    for (i, p) in m.phases.iter().enumerate() {
        let head = if i == 0 { "phases:" } else { "" };
        out.push_str(&format!(
            "{head:10} +{:>8.1} ms  ({:>+7.1} ms)  {}\n",
            p.at_us as f64 / 1e3,
            p.at_us.saturating_sub(before) as f64 / 1e3,
            p.name
        ));
        before = p.at_us;
    }
    out
}

/// The VM's name if it is known, else its id; `-` once the VM is removed.
fn vm_name(job: &Job, names: &HashMap<Uuid, String>) -> String {
    match job.vm_id {
        Some(id) => names.get(&id).cloned().unwrap_or_else(|| id.to_string()),
        None => "-".to_string(),
    }
}

/// The kind as the API spells it (`start`, `stop`, ...).
pub fn kind_name(kind: JobKind) -> String {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{kind:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_api::JobState;

    fn job(n: u128, vm: Option<Uuid>, state: JobState, error: Option<&str>) -> Job {
        Job {
            id: Uuid::from_u128(n),
            vm_id: vm,
            kind: JobKind::Start,
            state,
            progress: if state == JobState::Running { 40 } else { 100 },
            error: error.map(Into::into),
            created_at: 1_796_398_971_000,
            migration: None,
        }
    }

    #[test]
    fn list_shows_names_and_errors() {
        let web = Uuid::from_u128(7);
        let names = HashMap::from([(web, "web".to_string())]);
        let jobs = [
            job(1, Some(web), JobState::Running, None),
            job(2, None, JobState::Failed, Some("kernel /k: not found")),
        ];
        let text = list(&jobs, &names, OutputFormat::Text);
        assert_eq!(
            text,
            "ID                                    VM   KIND   STATE    PROGRESS  ERROR\n\
             00000000-0000-0000-0000-000000000001  web  start  running  40%       -\n\
             00000000-0000-0000-0000-000000000002  -    start  failed   100%      kernel /k: not found\n"
        );
        let back: Vec<Job> =
            serde_json::from_str(&list(&jobs, &names, OutputFormat::Json)).unwrap();
        assert_eq!(back, jobs);
    }

    #[test]
    fn show_lines() {
        let web = Uuid::from_u128(7);
        let names = HashMap::from([(web, "web".to_string())]);
        let text = show(
            &job(1, Some(web), JobState::Completed, None),
            &names,
            OutputFormat::Text,
        );
        assert!(
            text.contains("vm:       web (00000000-0000-0000-0000-000000000007)\n"),
            "{text}"
        );
        assert!(text.contains("state:    completed\n"), "{text}");
        assert!(
            text.contains("created:  2026-12-04 15:42:51 UTC\n"),
            "{text}"
        );
        assert_eq!(kind_name(JobKind::Checkpoint), "checkpoint");
    }

    #[test]
    fn a_migration_that_lost_the_vm_shows_lost_under_a_failed_job() {
        let mut j = job(1, None, JobState::Failed, Some("VM \"web\" was lost"));
        j.kind = JobKind::Migrate;
        j.migration = Some(vireo_api::worker::MigrateProgress {
            state: vireo_api::worker::MigrateState::Lost,
            message: Some("VM \"web\" was lost".into()),
            ..Default::default()
        });
        let text = show(&j, &HashMap::new(), OutputFormat::Text);
        assert!(text.contains("state:    failed\n"), "{text}");
        assert!(text.contains("\nmigration: lost, round 0, "), "{text}");
        assert!(text.contains("message:   VM \"web\" was lost\n"), "{text}");
    }

    #[test]
    fn a_migrations_phases_show_with_their_steps() {
        let phase = |name: &str, at_us| vireo_api::worker::MigratePhase {
            name: name.into(),
            at_us,
        };
        let m = vireo_api::worker::MigrateProgress {
            phases: vec![
                phase("peer connected (TLS)", 1_500),
                phase("offer accepted", 21_500),
            ],
            ..Default::default()
        };
        let text = migration_lines(&m);
        assert!(
            text.contains("phases:    +     1.5 ms  (   +1.5 ms)  peer connected (TLS)\n"),
            "{text}"
        );
        assert!(
            text.contains("           +    21.5 ms  (  +20.0 ms)  offer accepted\n"),
            "{text}"
        );
    }
}
