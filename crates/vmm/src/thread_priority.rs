//! The calling thread's CPU priority (its nice value). Linux keeps a nice value per thread, so
//! a background thread (a lazy restore's readahead) can step back for the vCPUs without
//! touching the rest of the process; and a migration's threads can step ahead of them.

/// The calling thread's nice value (`None`: unreadable).
pub(crate) fn nice() -> Option<i32> {
    // SAFETY: plain syscalls on the calling thread (a Linux thread id is a valid `who` for
    // PRIO_PROCESS); getpriority's -1 is ambiguous, hence errno.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        (*libc::__errno_location() == 0).then_some(now)
    }
}

/// Sets the calling thread's nice value (clamped to -20..=19). Whether it took effect.
pub(crate) fn set_nice(value: i32) -> bool {
    // SAFETY: as in `nice`.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, value.clamp(-20, 19)) == 0
    }
}

/// Lowers the calling thread's priority by `delta` nice steps; failure leaves it as it was.
pub(crate) fn lower_by(delta: i32) {
    if let Some(now) = nice() {
        set_nice(now + delta);
    }
}

/// Nice steps a live migration's page streams (the source's senders, the destination's
/// receivers) run above the worker's other threads. The link is CPU-bound (TLS, copies); the
/// guest's vCPUs compete for the same cores, and each ms they take from the streams is a ms
/// more of pre-copy in which they dirty pages to send again. On this 2-core host,
/// `vireo-bench migrate` alternating with and without (2026-12-07, 13 pairs): median total
/// −13 to −15 % in both cases, the guest's gap unchanged. Raising the whole `migrate-out`
/// thread (its rounds, the connects, the throttle) as well made both worse (7 pairs: total
/// +10 to +18 %, gap +0.1–0.2 ms), so only the stream threads are raised.
pub(crate) const MIGRATION_BOOST: i32 = 10;

/// Raises the calling thread by [`MIGRATION_BOOST`]; only for threads that end with their
/// pass (threads it spawns inherit it). Without the privilege (CAP_SYS_NICE, or an
/// RLIMIT_NICE that allows it) it stays as it was.
pub(crate) fn raise_for_migration() {
    if let Some(now) = nice() {
        if !set_nice(now - MIGRATION_BOOST) {
            tracing::debug!("a migration thread stays at nice {now}: raising it was refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_lowers_itself_without_touching_the_others() {
        let main = nice().unwrap();
        let inside = std::thread::spawn(|| {
            let before = nice().unwrap();
            lower_by(3);
            (before, nice().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(inside.1, (inside.0 + 3).min(19));
        assert_eq!(nice().unwrap(), main, "the calling thread is unchanged");
    }

    #[test]
    fn a_migration_thread_steps_ahead_of_the_rest() {
        let main = nice().unwrap();
        let (before, after) = std::thread::spawn(|| {
            // From 15 steps down, so the raise stays within what was the thread's own.
            lower_by(15);
            let before = nice().unwrap();
            raise_for_migration();
            (before, nice().unwrap())
        })
        .join()
        .unwrap();
        // SAFETY: a plain syscall.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(after, before - MIGRATION_BOOST);
        } else {
            assert!(
                after == before || after == before - MIGRATION_BOOST,
                "{before} -> {after}"
            );
        }
        assert_eq!(nice().unwrap(), main, "the calling thread is unchanged");
    }
}
