//! The calling thread's CPU priority (its nice value). Linux keeps a nice value per thread, so
//! a background thread (a lazy restore's readahead) can step back for the vCPUs without
//! touching the rest of the process.

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
}
