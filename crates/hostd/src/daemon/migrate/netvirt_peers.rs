//! Pushing a moved VM's policy entries to the other hosts of its virtual networks
//! (`vireod --netvirt-peer ADDR:PORT`, their migration listeners), over the same mutual-TLS
//! peer channel as migration (`peer.rs`): a peer must trust this host, and this host that
//! peer, or nothing is sent. `docs/netvirt.md`, "A VM that moves", says why a push rather
//! than learning from the data plane.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use vireo_api::migrate::{PeerMsg, PEER_PROTOCOL_VERSION};
use vireo_netconfig::PolicyEntry;

use super::peer::Peer;
use crate::daemon::switches::netvirt_move;
use crate::daemon::Daemon;

/// One peer's connect, handshake and answer at most: an unreachable peer must not hold the
/// arrival up (its stale senders are forwarded by the source meanwhile).
const PUSH_LIMIT: Duration = Duration::from_secs(3);

/// Sends `entries` to every configured peer at once; returns each peer's outcome (logged).
pub async fn push(
    d: &Arc<Daemon>,
    entries: &[PolicyEntry],
) -> Vec<(SocketAddr, Result<u32, String>)> {
    let peers = d.migrations.netvirt_peers();
    if entries.is_empty() || peers.is_empty() {
        return Vec::new();
    }
    let mut sends = tokio::task::JoinSet::new();
    for to in peers {
        let (d, entries) = (d.clone(), entries.to_vec());
        sends.spawn(async move {
            let r = tokio::time::timeout(PUSH_LIMIT, push_one(&d, to, entries))
                .await
                .unwrap_or_else(|_| Err(format!("no answer from {to} within {PUSH_LIMIT:?}")));
            match &r {
                Ok(n) => tracing::info!(peer = %to, updated = n, "moved policy entries pushed"),
                Err(e) => tracing::warn!(peer = %to, "moved policy entries not pushed: {e}"),
            }
            (to, r)
        });
    }
    sends.join_all().await
}

async fn push_one(d: &Daemon, to: SocketAddr, entries: Vec<PolicyEntry>) -> Result<u32, String> {
    let mut peer = Peer::connect(&d.host, to).await?;
    peer.send(&PeerMsg::PolicyMoved {
        version: PEER_PROTOCOL_VERSION,
        entries,
    })
    .await?;
    match peer.recv(PUSH_LIMIT).await? {
        PeerMsg::PolicyUpdated { updated } => Ok(updated),
        PeerMsg::Refused { reason } => Err(format!("{to} refused: {reason}")),
        other => Err(format!("{to} answered {other:?}")),
    }
}

/// A peer's `PolicyMoved` (the first line of its connection), answered on it.
pub async fn receive(d: &Daemon, mut peer: Peer, version: u32, entries: Vec<PolicyEntry>) {
    let answer = if version != PEER_PROTOCOL_VERSION {
        PeerMsg::Refused {
            reason: format!(
                "this host speaks migration protocol {PEER_PROTOCOL_VERSION}, not {version}; \
                 upgrade the older host"
            ),
        }
    } else {
        match netvirt_move::apply_moved(d, &entries).await {
            Ok(updated) => {
                tracing::info!(from = %peer.who, updated, "policy entries moved by a peer");
                PeerMsg::PolicyUpdated { updated }
            }
            Err(reason) => {
                tracing::warn!(from = %peer.who, "a peer's moved entries: {reason}");
                PeerMsg::Refused { reason }
            }
        }
    };
    if let Err(e) = peer.send(&answer).await {
        tracing::info!("answering a peer's moved entries: {e}");
    }
}
