//! The phases of a migration's set-up and end as they happened, for the log line
//! (`migration timeline (...)`), `MigrateStatus` (`phases`) and from there `vireo job show`:
//! where the time outside pre-copy goes. Each mark is the time since the migration began on
//! this side (the `MigrateOut` request on the source, the worker's start on the destination).
//!
//! Locking: the marks' mutex is a leaf.

use std::sync::Mutex;
use std::time::Instant;

use vireo_api::worker::MigratePhase;

pub struct Timeline {
    start: Instant,
    marks: Mutex<Vec<MigratePhase>>,
}

impl Timeline {
    pub fn starting_at(start: Instant) -> Timeline {
        Timeline {
            start,
            marks: Mutex::new(Vec::new()),
        }
    }

    /// Records that `name` happened now.
    pub fn mark(&self, name: &str) {
        let at_us = self.start.elapsed().as_micros() as u64;
        super::lock(&self.marks).push(MigratePhase {
            name: name.to_string(),
            at_us,
        });
    }

    pub fn phases(&self) -> Vec<MigratePhase> {
        super::lock(&self.marks).clone()
    }

    /// `name +1.23 ms, name +4.56 ms, ...`
    pub fn line(&self) -> String {
        format_phases(&self.phases())
    }
}

pub fn format_phases(phases: &[MigratePhase]) -> String {
    phases
        .iter()
        .map(|p| format!("{} +{:.2} ms", p.name, p.at_us as f64 / 1e3))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_keep_their_order_and_grow() {
        let t = Timeline::starting_at(Instant::now());
        t.mark("connected");
        std::thread::sleep(std::time::Duration::from_millis(2));
        t.mark("first page");
        let p = t.phases();
        assert_eq!(
            p.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
            ["connected", "first page"]
        );
        assert!(p[1].at_us >= p[0].at_us + 2000, "{p:?}");
        let line = t.line();
        assert!(line.starts_with("connected +0."), "{line}");
        assert!(line.contains(", first page +"), "{line}");
    }
}
