//! Live migration between two workers (docs/migration.md, docs/worker.md): `MigrateOut` on
//! the source ([`out`]), the `incoming` launch mode on the destination ([`incoming`]), the
//! disk handoff between them ([`handoff`]), the disk copy of a shared-nothing migration
//! ([`storage`]), and `MigrateStatus`/`MigrateCancel` on both.
//!
//! Locking: [`Migration`]'s mutexes are leaves (nothing else is taken while one is held). The
//! VM's own locking is the VMM's (`migrate_out` holds the VM's lifecycle lock while it runs).

pub mod handoff;
pub mod incoming;
pub mod out;
pub mod postcopy;
pub mod storage;
pub mod timeline;

use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vireo_api::worker::{MigrateProgress, MigrateState, MigrationTls};
use vireo_migration::hostauth::{HostIdentity, TrustStore};
use vireo_vmm::MigrateShared;

use timeline::Timeline;

/// Every read and write on a migration stream times out after this: a peer that died or
/// hangs ends the migration instead of holding it forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// A worker's migration (one at a time, either direction).
#[derive(Default)]
pub struct Migration {
    progress: Mutex<MigrateProgress>,
    shared: Mutex<Arc<MigrateShared>>,
    /// The streams' sockets, to cut them on a cancel (a blocked read ends at once).
    sockets: Mutex<Vec<TcpStream>>,
    /// Source: the VM runs on the destination: (its address, downtime ms).
    migrated_to: Mutex<Option<(String, u64)>>,
    /// Post-copy failed after the switch-over: why the VM is lost (the worker exits
    /// `MigrationLost`).
    lost: Mutex<Option<String>>,
    /// The current (or last) migration's phases.
    timeline: Mutex<Option<Arc<Timeline>>>,
    /// Destination: when vireod last said the source is still sending the disks
    /// (`MigrateSourceAlive`); the wait for the memory streams counts from then.
    source_alive: Mutex<Option<std::time::Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Migration {
    /// What `MigrateStatus` answers.
    pub fn progress(&self) -> MigrateProgress {
        let mut p = lock(&self.progress).clone();
        if p.state != MigrateState::Idle {
            let s = lock(&self.shared).stats();
            p.round = s.round;
            p.memory_bytes = s.memory_bytes;
            p.transferred_bytes = s.transferred_bytes;
            p.remaining_bytes = s.remaining_bytes;
            p.dirty_rate = s.dirty_rate;
            p.link_rate = s.link_rate;
            p.estimated_downtime_ms = s.estimated_downtime_ms;
        }
        if let Some(t) = lock(&self.timeline).as_ref() {
            p.phases = t.phases();
        }
        p
    }

    /// Listening, pre-copy, switching or post-copy.
    pub fn is_active(&self) -> bool {
        matches!(
            lock(&self.progress).state,
            MigrateState::Listening
                | MigrateState::Precopy
                | MigrateState::Switching
                | MigrateState::Postcopy
        )
    }

    /// Starts a migration in `state`: refused if one is active. Its phases are timed from
    /// `start`.
    fn begin(
        &self,
        state: MigrateState,
        start: Instant,
    ) -> Result<(Arc<MigrateShared>, Arc<Timeline>), String> {
        let mut p = lock(&self.progress);
        if matches!(
            p.state,
            MigrateState::Listening
                | MigrateState::Precopy
                | MigrateState::Switching
                | MigrateState::Postcopy
        ) {
            return Err("a migration of this VM is running already".into());
        }
        *p = MigrateProgress {
            state,
            ..Default::default()
        };
        let shared = Arc::new(MigrateShared::default());
        *lock(&self.shared) = shared.clone();
        *lock(&self.source_alive) = None;
        lock(&self.sockets).clear();
        let timeline = Arc::new(Timeline::starting_at(start));
        *lock(&self.timeline) = Some(timeline.clone());
        Ok((shared, timeline))
    }

    fn set_state(&self, state: MigrateState) {
        lock(&self.progress).state = state;
    }

    fn update(&self, f: impl FnOnce(&mut MigrateProgress)) {
        f(&mut lock(&self.progress));
    }

    fn add_socket(&self, s: &TcpStream) {
        if let Ok(c) = s.try_clone() {
            lock(&self.sockets).push(c);
        }
    }

    /// Ends the migration: `Completed`, or `Failed`/`Cancelled` with the reason.
    fn finish(&self, result: &Result<(), String>) {
        let cancelled = lock(&self.shared).cancelled();
        self.update(|p| match result {
            Ok(()) => p.state = MigrateState::Completed,
            Err(why) => {
                p.state = if cancelled {
                    MigrateState::Cancelled
                } else {
                    MigrateState::Failed
                };
                p.message = Some(why.clone());
            }
        });
        lock(&self.sockets).clear();
    }

    /// `MigrateSourceAlive`: the destination's wait for the source starts again now.
    pub fn source_alive(&self) -> Result<(), String> {
        if lock(&self.progress).state != MigrateState::Listening {
            return Err("this worker is not waiting for a migration source".into());
        }
        *lock(&self.source_alive) = Some(std::time::Instant::now());
        Ok(())
    }

    /// Destination: the last `MigrateSourceAlive` of this migration, if any.
    fn source_alive_at(&self) -> Option<std::time::Instant> {
        *lock(&self.source_alive)
    }

    /// `MigrateCancel`: `Err` once the switch-over has begun.
    pub fn cancel(&self) -> Result<(), String> {
        let p = lock(&self.progress);
        match p.state {
            MigrateState::Switching | MigrateState::Postcopy => {
                Err("the switch-over has begun; it is too late to cancel".into())
            }
            MigrateState::Listening | MigrateState::Precopy => {
                lock(&self.shared).cancel();
                for s in lock(&self.sockets).iter() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Marks a phase on the current migration's timeline (the worker's own steps around it:
    /// its VM torn down after the VM left).
    pub fn mark(&self, name: &str) {
        if let Some(t) = lock(&self.timeline).as_ref() {
            t.mark(name);
        }
    }

    /// The current migration's timeline as one line.
    pub fn timeline_line(&self) -> Option<String> {
        lock(&self.timeline).as_ref().map(|t| t.line())
    }

    /// Why the VM was lost in post-copy, if it was.
    pub fn lost(&self) -> Option<String> {
        lock(&self.lost).clone()
    }

    /// Source: where the VM went, once it runs there.
    pub fn migrated_to(&self) -> Option<(String, u64)> {
        lock(&self.migrated_to).clone()
    }
}

/// This host's identity and trust store, from the launch's or the request's files.
fn load_tls(tls: &MigrationTls) -> Result<(HostIdentity, TrustStore), String> {
    let id = HostIdentity::load(&tls.cert, &tls.key).map_err(|e| e.to_string())?;
    let trusted = TrustStore::load(&tls.trusted).map_err(|e| e.to_string())?;
    if trusted.entries().next().is_none() {
        return Err(format!(
            "trust store {} lists no host; add the peer's fingerprint first",
            tls.trusted.display()
        ));
    }
    Ok((id, trusted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_migration_at_a_time_and_cancel_only_before_the_switch_over() {
        let m = Migration::default();
        assert_eq!(m.progress().state, MigrateState::Idle);
        assert!(m.cancel().is_ok(), "nothing to cancel is fine");
        let (shared, _) = m.begin(MigrateState::Precopy, Instant::now()).unwrap();
        assert!(m.is_active());
        assert!(m.begin(MigrateState::Precopy, Instant::now()).is_err());
        m.set_state(MigrateState::Switching);
        assert!(m.cancel().unwrap_err().contains("too late"));
        assert!(!shared.cancelled());
        m.set_state(MigrateState::Precopy);
        m.cancel().unwrap();
        assert!(shared.cancelled());
        m.finish(&Err("cancelled".into()));
        let p = m.progress();
        assert_eq!(p.state, MigrateState::Cancelled);
        assert_eq!(p.message.as_deref(), Some("cancelled"));
        assert!(!m.is_active());
        // A new migration starts clean: not cancelled, no message.
        let (again, _) = m.begin(MigrateState::Listening, Instant::now()).unwrap();
        assert!(!again.cancelled());
        assert_eq!(m.progress().message, None);
        m.finish(&Err("stream broke".into()));
        assert_eq!(m.progress().state, MigrateState::Failed);
        m.begin(MigrateState::Precopy, Instant::now()).unwrap();
        m.finish(&Ok(()));
        assert_eq!(m.progress().state, MigrateState::Completed);
    }

    #[test]
    fn an_empty_trust_store_is_refused_with_the_way_out() {
        let dir = tempfile::tempdir().unwrap();
        HostIdentity::load_or_create(dir.path(), "h").unwrap();
        let tls = MigrationTls {
            cert: dir.path().join("host.crt"),
            key: dir.path().join("host.key"),
            trusted: dir.path().join("trusted"),
        };
        let e = load_tls(&tls).unwrap_err();
        assert!(e.contains("lists no host"), "{e}");
        let missing = MigrationTls {
            cert: dir.path().join("nope.crt"),
            ..tls
        };
        assert!(load_tls(&missing).unwrap_err().contains("nope.crt"));
    }
}
