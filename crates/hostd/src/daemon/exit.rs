//! What a worker's end means for its VM: a pure function of the VM's state, the worker's
//! `exit.json` (if it wrote one for this pid), how the process ended and whether a turn-off was
//! under way. The supervisor applies the result through `Store::set_state`, which re-checks it
//! against the state of that moment.

use vireo_api::worker::WorkerExitReason;
use vireo_api::{transition, Action, VmState};

use super::sys::signal_name;

/// How the process ended, as far as vireod can know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Death {
    /// Our child, ended by a signal.
    Signal(i32),
    /// Our child, exited with this status.
    Code(i32),
    /// Not our child (adopted): gone, status unknown.
    Unknown,
    /// Found gone when vireod started.
    GoneWhileDown,
}

/// The action to apply and the one-line account of the end (the failed job's error, the log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// `None`: nothing applies to the current state (already off, e.g. after a turn-off).
    pub action: Option<Action>,
    pub message: String,
}

pub fn describe(reason: &WorkerExitReason) -> String {
    match reason {
        WorkerExitReason::PoweredOff { status } => {
            format!("the guest powered off (status {status})")
        }
        WorkerExitReason::Reset => "the guest reset the machine".into(),
        WorkerExitReason::TurnedOff => "the VM was turned off".into(),
        WorkerExitReason::StartFailed { message } => message.clone(),
        WorkerExitReason::VcpuFailed { message } => format!("a vCPU failed: {message}"),
        WorkerExitReason::MigrationLost { message } => {
            format!("the VM was lost in a post-copy migration: {message}")
        }
        WorkerExitReason::Saved { dir } => format!("the VM was saved to {}", dir.display()),
        WorkerExitReason::MigratedAway {
            to, downtime_ms, ..
        } => {
            format!("the VM was migrated to {to} (paused {downtime_ms} ms)")
        }
    }
}

fn death_message(pid: u32, death: Death) -> String {
    match death {
        Death::Signal(s) => format!("worker pid {pid} killed by signal {}", signal_name(s)),
        Death::Code(c) => format!("worker pid {pid} exited with status {c} without a record"),
        Death::Unknown => format!("worker pid {pid} exited without a record"),
        Death::GoneWhileDown => format!("worker pid {pid} gone while vireod was down"),
    }
}

/// The first of `candidates` legal in `state`.
fn first_legal(state: &VmState, candidates: Vec<Action>) -> Option<Action> {
    candidates
        .into_iter()
        .find(|a| transition(state, a).is_ok())
}

pub fn decide(
    state: &VmState,
    pid: u32,
    exit: Option<&WorkerExitReason>,
    death: Death,
    forced: bool,
    log_line: Option<&str>,
) -> Verdict {
    let message = match exit {
        Some(reason) => describe(reason),
        None => match (death, log_line) {
            (Death::GoneWhileDown, _) | (_, None) => death_message(pid, death),
            (_, Some(line)) => format!("{}; worker.log: {line}", death_message(pid, death)),
        },
    };
    // A turn-off (request, stop timeout, cancelled start) ends in Off however the worker went;
    // but a worker that had recorded a VM lost in post-copy lost it before the turn-off came
    // (an arrival being removed after its source aborted): that stays what happened.
    if forced && !matches!(exit, Some(WorkerExitReason::MigrationLost { .. })) {
        let action = first_legal(state, vec![Action::TurnOff]);
        return Verdict { action, message };
    }
    let crashed = Action::WorkerExited {
        reason: message.clone(),
    };
    let candidates = match (state, exit) {
        // Gone with no trace while nobody watched: that is a crash, even mid-start.
        (_, None) if death == Death::GoneWhileDown => vec![crashed],
        (_, Some(WorkerExitReason::VcpuFailed { .. })) => vec![crashed],
        // Not a crash: a post-copy broke after the switch-over, the VM is whole nowhere.
        (_, Some(WorkerExitReason::MigrationLost { .. })) => vec![
            Action::MigrationLost {
                reason: message.clone(),
            },
            crashed,
        ],
        (VmState::Saving, Some(WorkerExitReason::Saved { .. })) => vec![Action::Saved],
        (VmState::Starting, Some(WorkerExitReason::PoweredOff { .. }))
        | (VmState::Starting, Some(WorkerExitReason::Reset))
        | (VmState::Starting, Some(WorkerExitReason::TurnedOff)) => {
            vec![Action::TurnOff]
        }
        // Whatever else ends a start (its own StartFailed, a crash) fails the start.
        (VmState::Starting, _) => vec![Action::StartFailed],
        (_, Some(WorkerExitReason::StartFailed { .. })) | (_, None) => vec![crashed],
        (_, Some(_)) => vec![Action::PoweredOff, Action::TurnOff, crashed],
    };
    Verdict {
        action: first_legal(state, candidates),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(state: VmState, exit: Option<WorkerExitReason>, death: Death, forced: bool) -> Verdict {
        decide(&state, 7, exit.as_ref(), death, forced, Some("last words"))
    }

    #[test]
    fn an_arrival_lost_in_post_copy_stays_lost_even_when_it_was_being_turned_off() {
        let lost = || {
            Some(WorkerExitReason::MigrationLost {
                message: "the migration source went away".into(),
            })
        };
        for forced in [false, true] {
            let v = run(VmState::Incoming, lost(), Death::Code(1), forced);
            assert!(
                matches!(v.action, Some(Action::MigrationLost { .. })),
                "forced {forced}: {v:?}"
            );
        }
        // Any other exit of a worker being turned off is a turn-off.
        let v = run(VmState::Running, None, Death::Signal(15), true);
        assert_eq!(v.action, Some(Action::TurnOff));
    }

    #[test]
    fn a_saved_exit_while_saving_means_saved() {
        let dir = std::path::PathBuf::from("/vm/saved");
        let v = run(
            VmState::Saving,
            Some(WorkerExitReason::Saved { dir }),
            Death::Code(0),
            false,
        );
        assert_eq!(v.action, Some(Action::Saved));
        assert_eq!(v.message, "the VM was saved to /vm/saved");
        // A worker that dies mid-save is a crash.
        let v = run(VmState::Saving, None, Death::Signal(9), false);
        assert!(matches!(v.action, Some(Action::WorkerExited { .. })));
    }

    #[test]
    fn exits_map_onto_the_lifecycle() {
        use WorkerExitReason as R;
        let off = run(
            VmState::Running,
            Some(R::PoweredOff { status: 0 }),
            Death::Code(0),
            false,
        );
        assert_eq!(off.action, Some(Action::PoweredOff));
        let reset = run(VmState::Paused, Some(R::Reset), Death::Code(0), false);
        assert_eq!(reset.action, Some(Action::TurnOff));
        let stop = run(VmState::Stopping, Some(R::TurnedOff), Death::Code(0), false);
        assert_eq!(stop.action, Some(Action::PoweredOff));
        let vcpu = run(
            VmState::Running,
            Some(R::VcpuFailed {
                message: "triple fault".into(),
            }),
            Death::Code(1),
            false,
        );
        assert_eq!(
            vcpu.action,
            Some(Action::WorkerExited {
                reason: "a vCPU failed: triple fault".into()
            })
        );
        let killed = run(VmState::Running, None, Death::Signal(9), false);
        assert_eq!(
            killed.message,
            "worker pid 7 killed by signal 9 (SIGKILL); worker.log: last words"
        );
        assert!(matches!(killed.action, Some(Action::WorkerExited { .. })));
        let start = run(
            VmState::Starting,
            Some(R::StartFailed {
                message: "no kernel".into(),
            }),
            Death::Code(1),
            false,
        );
        assert_eq!(start.action, Some(Action::StartFailed));
        assert_eq!(start.message, "no kernel");
        let start_crash = run(VmState::Starting, None, Death::Code(101), false);
        assert_eq!(start_crash.action, Some(Action::StartFailed));
        let gone = run(VmState::Starting, None, Death::GoneWhileDown, false);
        assert_eq!(
            gone.action,
            Some(Action::WorkerExited {
                reason: "worker pid 7 gone while vireod was down".into()
            })
        );
        let lost = run(
            VmState::Running,
            Some(R::MigrationLost {
                message: "stream 0 ended".into(),
            }),
            Death::Code(1),
            false,
        );
        assert_eq!(
            lost.action,
            Some(Action::MigrationLost {
                reason: "the VM was lost in a post-copy migration: stream 0 ended".into()
            })
        );
        let forced = run(VmState::Running, None, Death::Signal(9), true);
        assert_eq!(forced.action, Some(Action::TurnOff));
        let already_off = run(VmState::Off, Some(R::TurnedOff), Death::Code(0), true);
        assert_eq!(already_off.action, None);
    }
}
