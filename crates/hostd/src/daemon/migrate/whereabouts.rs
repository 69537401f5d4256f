//! After a quick migration's `Commit`, the VM belongs to the destination: it restores it from
//! the files and keeps it, whether or not its `Running` reaches the source. A source whose
//! connection ended after it sent `Commit` therefore cannot tell "it runs there" from "it
//! never arrived", and restoring the VM here on a guess could run it on both hosts at once,
//! both writing its disks. So it asks, on a new connection (`WhereIs`), until the answer is
//! final or its time is up; with no answer the VM stays saved here and the job says where it
//! may be (docs/migration.md, "Quick migration after a lost answer").
//!
//! A live migration asks too when its worker failed or died in the switch-over and the
//! destination's word (`running`, or the answer to the source's `abort`) was lost with the
//! link: the destination's worker may have resumed the VM (`source::runs_there`); and when its
//! worker lost the VM in post-copy with the link gone: the destination may have completed it
//! (`source::lost_asked`).
//!
//! A record here that is `lost` (its post-copy lost the VM after it resumed here) is answered
//! `lost` with its reason, not `here`: the VM ran here last, so the source must not run it,
//! but neither does it run here; each caller says so in its job (docs/migration.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;
use vireo_api::migrate::{PeerMsg, VmWhereabouts};
use vireo_api::VmState;

use super::peer::Peer;
use crate::daemon::Daemon;

/// Between two questions (the destination is restoring, or unreachable).
const ASK_EVERY: Duration = Duration::from_secs(1);
/// One question's answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// Destination: answers a `WhereIs` for `vm_id` from this host's record of it.
pub async fn answer(d: &Arc<Daemon>, mut peer: Peer, vm_id: Uuid) {
    let state = d.store.get_by_id(vm_id).ok().map(|vm| vm.state);
    let here = whereabouts_of(state);
    tracing::info!(from = %peer.who, vm = %vm_id, ?here, "asked where a VM is");
    let _ = peer.send(&PeerMsg::Whereabouts { here }).await;
}

/// What a record in `state` (`None`: no record) tells a source.
fn whereabouts_of(state: Option<VmState>) -> VmWhereabouts {
    match state {
        None => VmWhereabouts::Absent,
        // The files are here and the restore is taken or under way (`saved` is the state the
        // arrival's start begins from; a failed start removes the record).
        Some(VmState::Incoming | VmState::Saved | VmState::Starting) => VmWhereabouts::Arriving,
        Some(VmState::Lost { reason }) => VmWhereabouts::Lost { reason },
        Some(_) => VmWhereabouts::Here,
    }
}

/// Source: asks `to` where `vm_id` is until the answer is `Here`, `Absent` or `Lost`, or
/// `vireod --migration-answer-wait` passed (`Err` with the last reason it could not tell, which
/// includes an answer this host cannot read: a newer peer's).
pub async fn ask(d: &Daemon, to: SocketAddr, vm_id: Uuid) -> Result<VmWhereabouts, String> {
    let deadline = tokio::time::Instant::now() + d.migrations.answer_wait();
    loop {
        let why = match ask_once(d, to, vm_id).await {
            Ok(VmWhereabouts::Arriving) => "its restore there is still under way".to_string(),
            Ok(final_answer) => return Ok(final_answer),
            Err(e) => e,
        };
        if tokio::time::Instant::now() + ASK_EVERY >= deadline {
            return Err(why);
        }
        tracing::info!(vm = %vm_id, "asking {to} again where the VM is: {why}");
        tokio::time::sleep(ASK_EVERY).await;
    }
}

async fn ask_once(d: &Daemon, to: SocketAddr, vm_id: Uuid) -> Result<VmWhereabouts, String> {
    let mut peer = Peer::connect(&d.host, to).await?;
    peer.send(&PeerMsg::WhereIs { vm_id }).await?;
    match peer.recv(ANSWER_LIMIT).await? {
        PeerMsg::Whereabouts { here } => Ok(here),
        other => Err(format!("{to} answered WhereIs with {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_record_is_answered_lost_with_its_reason() {
        let reason = "the source's stream ended with 12 pages still there".to_string();
        assert_eq!(
            whereabouts_of(Some(VmState::Lost {
                reason: reason.clone()
            })),
            VmWhereabouts::Lost { reason }
        );
    }

    #[test]
    fn the_other_records_keep_their_answers() {
        assert_eq!(whereabouts_of(None), VmWhereabouts::Absent);
        for s in [VmState::Incoming, VmState::Saved, VmState::Starting] {
            assert_eq!(whereabouts_of(Some(s)), VmWhereabouts::Arriving);
        }
        for s in [
            VmState::Running,
            VmState::Paused,
            VmState::Off,
            VmState::Critical {
                reason: "worker died".into(),
            },
        ] {
            assert_eq!(whereabouts_of(Some(s)), VmWhereabouts::Here);
        }
    }
}
