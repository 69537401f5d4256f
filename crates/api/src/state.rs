//! The VM lifecycle as a pure state machine: `transition(state, action)` says what a request or
//! a worker event does, or why it is illegal now (the API answers 409 with the current state).
//! The daemon only ever changes a VM's state through this function.
//!
//! Requests: start, stop (graceful), turn_off (forced), pause, resume, reset, save.
//! Events from the worker/supervisor: started, start_failed, powered_off, saved, worker_exited.
//! `Critical` is a VM whose worker died unexpectedly; it can be started again or turned off
//! (which acknowledges the failure). Saving/Saved exist for the VM-state issue.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum VmState {
    Off,
    Starting,
    Running,
    Paused,
    Stopping,
    Saving,
    Saved,
    /// Arriving by migration from another host: the record exists here, the VM does not run
    /// here (yet). Ends `running` (it arrived), `saved` (a quick migration's state arrived) or
    /// with the record removed (the migration failed: the VM stays on its source).
    Incoming,
    Critical {
        reason: String,
    },
    /// A post-copy migration broke after the VM resumed on the destination: neither host has
    /// a whole VM any more (docs/migration.md, "Post-copy"). Like `critical` it can be started
    /// again (a cold boot from its disks) or turned off; `reason` says what broke.
    Lost {
        reason: String,
    },
}

impl VmState {
    /// The stored/displayed name (the `state` column; the reason goes in its own column).
    pub fn name(&self) -> &'static str {
        match self {
            VmState::Off => "off",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Saving => "saving",
            VmState::Saved => "saved",
            VmState::Incoming => "incoming",
            VmState::Critical { .. } => "critical",
            VmState::Lost { .. } => "lost",
        }
    }

    /// The inverse of `name` (+ reason for `critical`); `None` for an unknown name.
    pub fn from_parts(name: &str, reason: Option<String>) -> Option<VmState> {
        Some(match name {
            "off" => VmState::Off,
            "starting" => VmState::Starting,
            "running" => VmState::Running,
            "paused" => VmState::Paused,
            "stopping" => VmState::Stopping,
            "saving" => VmState::Saving,
            "saved" => VmState::Saved,
            "incoming" => VmState::Incoming,
            "critical" => VmState::Critical {
                reason: reason.unwrap_or_default(),
            },
            "lost" => VmState::Lost {
                reason: reason.unwrap_or_default(),
            },
            _ => return None,
        })
    }

    pub fn reason(&self) -> Option<&str> {
        match self {
            VmState::Critical { reason } | VmState::Lost { reason } => Some(reason),
            _ => None,
        }
    }

    /// A worker process exists in this state (the supervisor must watch it).
    pub fn has_worker(&self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Saving
        )
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmState::Critical { reason } => write!(f, "critical ({reason})"),
            VmState::Lost { reason } => write!(f, "lost ({reason})"),
            other => f.write_str(other.name()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    // Requests.
    Start,
    Stop,
    TurnOff,
    Pause,
    Resume,
    Reset,
    Save,
    // Events.
    /// The worker reports the VM running.
    Started,
    /// The worker could not start the VM (the job carries the error); nothing runs.
    StartFailed,
    /// The guest powered off and the worker exited cleanly.
    PoweredOff,
    /// The state is on disk and the worker has exited.
    Saved,
    /// The worker could not save; the VM runs on (or stays paused, `paused`).
    SaveFailed {
        paused: bool,
    },
    /// A start from a saved state failed before the VM ran; the saved state is kept.
    RestoreFailed,
    /// The worker died unexpectedly (exit status, signal, last vCPU error).
    WorkerExited {
        reason: String,
    },
    /// Quick migration: the saved state of an incoming VM is complete here.
    Arrived,
    /// The worker exited `migration_lost`: a post-copy migration broke after the switch-over.
    MigrationLost {
        reason: String,
    },
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::TurnOff => "turn_off",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Reset => "reset",
            Action::Save => "save",
            Action::Started => "started",
            Action::StartFailed => "start_failed",
            Action::PoweredOff => "powered_off",
            Action::Saved => "saved",
            Action::SaveFailed { .. } => "save_failed",
            Action::RestoreFailed => "restore_failed",
            Action::WorkerExited { .. } => "worker_exited",
            Action::Arrived => "arrived",
            Action::MigrationLost { .. } => "migration_lost",
        }
    }
}

/// An action that does not apply to the VM's current state (HTTP 409).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a VM that is {current}")]
pub struct IllegalTransition {
    pub current: VmState,
    pub action: &'static str,
}

/// The lifecycle: the next state, or why `action` is illegal in `from`.
pub fn transition(from: &VmState, action: &Action) -> Result<VmState, IllegalTransition> {
    use VmState::*;
    let next = match (from, action) {
        (Off | Saved | Critical { .. } | Lost { .. }, Action::Start) => Starting,
        (Starting | Incoming, Action::Started) => Running,
        (Incoming, Action::Arrived) => Saved,
        (Starting, Action::StartFailed) => Off,
        (Running, Action::Stop) => Stopping,
        (Running | Stopping, Action::PoweredOff) => Off,
        // Forced: pulls the plug in any state with a worker, discards a saved state, and
        // acknowledges a crash. Not while saving: the save job must finish or fail first.
        (
            Starting | Running | Paused | Stopping | Saved | Critical { .. } | Lost { .. },
            Action::TurnOff,
        ) => Off,
        (Running, Action::Pause) => Paused,
        (Paused, Action::Resume) => Running,
        (Running | Paused, Action::Reset) => Running,
        (Running | Paused, Action::Save) => Saving,
        (Saving, Action::Saved) => Saved,
        (Saving, Action::SaveFailed { paused: false }) => Running,
        (Saving, Action::SaveFailed { paused: true }) => Paused,
        (Starting, Action::RestoreFailed) => Saved,
        (s, Action::WorkerExited { reason }) if s.has_worker() => Critical {
            reason: reason.clone(),
        },
        // An arrival's worker resumed the VM in post-copy and lost it: the record stays, lost.
        (s, Action::MigrationLost { reason }) if s.has_worker() || *s == Incoming => Lost {
            reason: reason.clone(),
        },
        _ => {
            return Err(IllegalTransition {
                current: from.clone(),
                action: action.name(),
            })
        }
    };
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_restore_transitions() {
        use VmState::*;
        assert_eq!(transition(&Running, &Action::Save), Ok(Saving));
        assert_eq!(transition(&Paused, &Action::Save), Ok(Saving));
        assert!(transition(&Off, &Action::Save).is_err());
        assert!(transition(&Saved, &Action::Save).is_err());
        assert_eq!(transition(&Saving, &Action::Saved), Ok(Saved));
        let failed = |paused| Action::SaveFailed { paused };
        assert_eq!(transition(&Saving, &failed(false)), Ok(Running));
        assert_eq!(transition(&Saving, &failed(true)), Ok(Paused));
        assert!(transition(&Running, &failed(false)).is_err());
        assert_eq!(transition(&Saved, &Action::Start), Ok(Starting));
        assert_eq!(transition(&Starting, &Action::RestoreFailed), Ok(Saved));
        assert!(transition(&Running, &Action::RestoreFailed).is_err());
        assert_eq!(transition(&Saved, &Action::TurnOff), Ok(Off));
        assert!(transition(&Saving, &Action::TurnOff).is_err());
    }

    #[test]
    fn a_migration_lost_in_post_copy_is_its_own_state_with_the_reason() {
        use VmState::*;
        let lost = Action::MigrationLost {
            reason: "the source's stream ended".into(),
        };
        let state = transition(&Running, &lost).unwrap();
        assert_eq!(state.name(), "lost");
        assert_eq!(state.reason(), Some("the source's stream ended"));
        assert_eq!(state.to_string(), "lost (the source's stream ended)");
        assert_eq!(
            VmState::from_parts("lost", Some("the source's stream ended".into())),
            Some(state.clone())
        );
        // Without a worker there is nothing to lose.
        assert!(transition(&Off, &lost).is_err());
        // An arrival lost in post-copy (its worker had resumed it) is recorded lost too.
        assert_eq!(transition(&Incoming, &lost), Ok(state.clone()));
        // Acknowledged by a turn-off, or booted again from its disks.
        assert_eq!(transition(&state, &Action::TurnOff), Ok(Off));
        assert_eq!(transition(&state, &Action::Start), Ok(Starting));
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(json["state"], "lost");
        assert_eq!(json["reason"], "the source's stream ended");
    }
}
