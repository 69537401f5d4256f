//! The CPU priority of the threads that move frames: the switch thread and the vhost-user
//! daemon's ring threads run at nice [`NICE_DEFAULT`] (`VIREO_SWITCH_NICE`, -20 to 19; 0 leaves
//! them alone).
//!
//! Why: on a small host the switch competes for cores with the vCPU threads, and a guest that
//! polls its rings keeps its vCPU busy all the time. At equal weight the switch thread, woken
//! by a kick, often waited behind a spinning vCPU, and every frame in flight waited with it. A
//! larger CFS weight lets it run when woken; it never spins (it sleeps in epoll between
//! batches), so the vCPUs keep all the CPU it does not use. Measured with `vireo-bench guestio`
//! (docs/datapath.md, "Thread priority"). Lowering a nice value needs CAP_SYS_NICE: without it
//! the threads keep the nice they were started with.

use std::io;
use std::sync::OnceLock;

/// Nice value of the frame-moving threads (the vCPU threads run at 0).
pub const NICE_DEFAULT: i32 = -10;

/// The nice value the frame-moving threads ask for (`VIREO_SWITCH_NICE`, read once).
pub fn nice() -> i32 {
    static NICE: OnceLock<i32> = OnceLock::new();
    *NICE.get_or_init(|| parse_nice(std::env::var("VIREO_SWITCH_NICE").ok().as_deref()))
}

/// `VIREO_SWITCH_NICE`'s value: unset is [`NICE_DEFAULT`]; a value that is not a nice value
/// (-20 to 19) is said in one warning line, naming it, and the default is used.
fn parse_nice(value: Option<&str>) -> i32 {
    let Some(v) = value else {
        return NICE_DEFAULT;
    };
    match v.trim().parse::<i32>() {
        Ok(n) if (-20..=19).contains(&n) => n,
        _ => {
            eprintln!(
                "vswitch: VIREO_SWITCH_NICE={v:?} is not a nice value (-20 to 19; 0 leaves the \
                 frame threads alone): using {NICE_DEFAULT}"
            );
            NICE_DEFAULT
        }
    }
}

/// Gives the calling thread nice value `nice` (Linux nice values are per thread).
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: plain system calls on the calling thread's own id.
    let r = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the calling thread the frame-moving threads' nice value ([`nice`]); a refusal (no
/// CAP_SYS_NICE) leaves it as it was.
pub fn prioritize_current_thread() -> io::Result<()> {
    match nice() {
        0 => Ok(()),
        n => set_current_thread_nice(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_nice() -> i32 {
        // SAFETY: getpriority on the calling thread; -1 is a valid nice, so errno is not
        // consulted (the call cannot fail for the calling thread).
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn vireo_switch_nice_takes_nice_values_only() {
        assert_eq!(parse_nice(None), NICE_DEFAULT);
        assert_eq!(parse_nice(Some(" 5 ")), 5);
        assert_eq!(parse_nice(Some("0")), 0);
        assert_eq!(parse_nice(Some("-20")), -20);
        for bad in ["", "abc", "-21", "20", "5.5"] {
            assert_eq!(parse_nice(Some(bad)), NICE_DEFAULT, "{bad:?}");
        }
    }

    #[test]
    fn a_thread_gets_the_nice_value_and_its_siblings_keep_theirs() {
        let before = own_nice();
        // Raising a nice value needs no privilege.
        let got = std::thread::spawn(|| {
            set_current_thread_nice(7).unwrap();
            own_nice()
        })
        .join()
        .unwrap();
        assert_eq!(got, 7);
        assert_eq!(
            own_nice(),
            before,
            "another thread's nice must not change ours"
        );
    }
}
