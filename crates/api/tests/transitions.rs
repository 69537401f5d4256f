//! Every state × every action against a table written out by hand: a change to the lifecycle
//! must change this table too.

use vireo_api::{transition, Action, VmState};

fn crit() -> VmState {
    VmState::Critical {
        reason: "old".into(),
    }
}

fn lost() -> VmState {
    VmState::Lost {
        reason: "old".into(),
    }
}

fn all_states() -> Vec<VmState> {
    use VmState::*;
    vec![
        Off,
        Starting,
        Running,
        Paused,
        Stopping,
        Saving,
        Saved,
        Incoming,
        crit(),
        lost(),
    ]
}

fn all_actions() -> Vec<Action> {
    use Action::*;
    vec![
        Start,
        Stop,
        TurnOff,
        Pause,
        Resume,
        Reset,
        Save,
        Started,
        StartFailed,
        PoweredOff,
        Saved,
        // `paused: true` goes to Paused instead (crates/api/src/state.rs tests it).
        SaveFailed { paused: false },
        RestoreFailed,
        WorkerExited {
            reason: "killed by signal 9".into(),
        },
        Arrived,
        MigrationLost {
            reason: "stream 0 ended".into(),
        },
    ]
}

/// Fails to compile when a variant is added without extending the lists above.
#[allow(dead_code)]
fn lists_are_complete(s: VmState, a: Action) {
    match s {
        VmState::Off
        | VmState::Starting
        | VmState::Running
        | VmState::Paused
        | VmState::Stopping
        | VmState::Saving
        | VmState::Saved
        | VmState::Incoming
        | VmState::Critical { .. }
        | VmState::Lost { .. } => {}
    }
    match a {
        Action::Start
        | Action::Stop
        | Action::TurnOff
        | Action::Pause
        | Action::Resume
        | Action::Reset
        | Action::Save
        | Action::Started
        | Action::StartFailed
        | Action::PoweredOff
        | Action::Saved
        | Action::SaveFailed { .. }
        | Action::RestoreFailed
        | Action::WorkerExited { .. }
        | Action::Arrived
        | Action::MigrationLost { .. } => {}
    }
}

/// The legal moves; every pair not listed must be refused.
fn legal() -> Vec<(VmState, &'static str, VmState)> {
    use VmState::*;
    let died = Critical {
        reason: "killed by signal 9".into(),
    };
    let gone = Lost {
        reason: "stream 0 ended".into(),
    };
    vec![
        (Off, "start", Starting),
        (Saved, "start", Starting),
        (crit(), "start", Starting),
        (Starting, "started", Running),
        (Starting, "start_failed", Off),
        (Running, "stop", Stopping),
        (Running, "powered_off", Off),
        (Stopping, "powered_off", Off),
        (Starting, "turn_off", Off),
        (Running, "turn_off", Off),
        (Paused, "turn_off", Off),
        (Stopping, "turn_off", Off),
        (Saved, "turn_off", Off),
        (crit(), "turn_off", Off),
        (Running, "pause", Paused),
        (Paused, "resume", Running),
        (Running, "reset", Running),
        (Paused, "reset", Running),
        (Running, "save", Saving),
        (Paused, "save", Saving),
        (Saving, "saved", Saved),
        (Saving, "save_failed", Running),
        (Starting, "restore_failed", Saved),
        (Starting, "worker_exited", died.clone()),
        (Running, "worker_exited", died.clone()),
        (Paused, "worker_exited", died.clone()),
        (Stopping, "worker_exited", died.clone()),
        (Saving, "worker_exited", died),
        // A post-copy that broke after the switch-over: whole nowhere, not crashed.
        (Starting, "migration_lost", gone.clone()),
        (Running, "migration_lost", gone.clone()),
        (Paused, "migration_lost", gone.clone()),
        (Stopping, "migration_lost", gone.clone()),
        (Saving, "migration_lost", gone.clone()),
        // An arrival whose worker resumed it in post-copy and then lost it.
        (Incoming, "migration_lost", gone),
        (lost(), "start", Starting),
        (lost(), "turn_off", Off),
        // Migration: an arriving VM runs (live) or its saved state is complete (quick).
        (Incoming, "started", Running),
        (Incoming, "arrived", Saved),
    ]
}

#[test]
fn every_state_and_action_matches_the_table() {
    let table = legal();
    let mut checked = 0;
    for state in all_states() {
        for action in all_actions() {
            let expected = table
                .iter()
                .find(|(s, a, _)| *s == state && *a == action.name())
                .map(|(_, _, next)| next.clone());
            match (transition(&state, &action), expected) {
                (Ok(next), Some(want)) => assert_eq!(next, want, "{state} + {}", action.name()),
                (Err(e), None) => {
                    assert_eq!(e.current, state, "the error carries the current state");
                    assert_eq!(e.action, action.name());
                    assert!(e.to_string().contains(state.name()), "{e}");
                }
                (got, want) => panic!(
                    "{state} + {}: got {got:?}, table says {want:?}",
                    action.name()
                ),
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 10 * 16);
    // Each table row names a real (state, action) pair.
    for (s, a, _) in &table {
        assert!(all_actions().iter().any(|x| x.name() == *a), "{a}");
        assert!(all_states().contains(s), "{s}");
    }
}

#[test]
fn state_names_round_trip() {
    for s in all_states() {
        let back = VmState::from_parts(s.name(), s.reason().map(str::to_owned)).unwrap();
        assert_eq!(back, s);
    }
    assert_eq!(VmState::from_parts("exploded", None), None);
    let json = serde_json::to_string(&crit()).unwrap();
    assert_eq!(json, r#"{"state":"critical","reason":"old"}"#);
}

#[test]
fn a_vm_shows_its_state_beside_its_fields() {
    let spec: vireo_api::VmSpec = serde_json::from_str(
        r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k"}"#,
    )
    .unwrap();
    let id = uuid::Uuid::nil();
    let vm = vireo_api::Vm {
        identity: vireo_api::VmIdentity::of(id, &spec),
        spec,
        state: crit(),
        created_at: 1,
        updated_at: 2,
    };
    let json = serde_json::to_value(&vm).unwrap();
    assert_eq!(json["state"], "critical");
    assert_eq!(json["reason"], "old");
    let back: vireo_api::Vm = serde_json::from_value(json).unwrap();
    assert_eq!(back, vm);
}
