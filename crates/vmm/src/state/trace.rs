//! Where a restore's time goes (`VIREO_RESTORE_TRACE=1`, docs/vm-state.md "Restore timing"):
//! one stderr line per step, each with the time since the restore began, the page faults the
//! lazy restore has served so far (and the time the fault thread spent on them) and the bytes
//! the background copy has filled. Off by default: then every call is one relaxed load.
//!
//! Process-wide on purpose: a restore is one VM per process in the worker, and the steps happen
//! on different threads (the caller, the vCPUs, the fault thread) that share nothing else.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

static ENABLED: OnceLock<bool> = OnceLock::new();
static ORIGIN: Mutex<Option<Instant>> = Mutex::new(None);
static FAULTS: AtomicU64 = AtomicU64::new(0);
static FAULT_NS: AtomicU64 = AtomicU64::new(0);
static FAULT_MAX_NS: AtomicU64 = AtomicU64::new(0);
static PREFETCHED: AtomicU64 = AtomicU64::new(0);
static POPULATED: AtomicU64 = AtomicU64::new(0);
/// "First KVM_RUN" is printed once per restore, by whichever vCPU gets there first.
static RAN: AtomicBool = AtomicBool::new(true);

/// True when `VIREO_RESTORE_TRACE` is set to something other than `0` or empty.
pub fn enabled() -> bool {
    *ENABLED.get_or_init(|| {
        std::env::var("VIREO_RESTORE_TRACE").is_ok_and(|v| !v.is_empty() && v != "0")
    })
}

/// Starts a new trace (the restore was requested): the clock and the counters go back to 0.
pub fn begin() {
    if !enabled() {
        return;
    }
    *ORIGIN.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    for c in [&FAULTS, &FAULT_NS, &FAULT_MAX_NS, &PREFETCHED, &POPULATED] {
        c.store(0, Ordering::Relaxed);
    }
    RAN.store(false, Ordering::Relaxed);
    mark("restore requested");
}

/// Prints one step.
pub fn mark(what: &str) {
    if !enabled() {
        return;
    }
    let Some(origin) = *ORIGIN.lock().unwrap_or_else(|p| p.into_inner()) else {
        return;
    };
    let ms = origin.elapsed().as_secs_f64() * 1e3;
    let faults = FAULTS.load(Ordering::Relaxed);
    let fault_ms = FAULT_NS.load(Ordering::Relaxed) as f64 / 1e6;
    let max_us = FAULT_MAX_NS.load(Ordering::Relaxed) as f64 / 1e3;
    let pre = PREFETCHED.load(Ordering::Relaxed) >> 20;
    let pop = POPULATED.load(Ordering::Relaxed) >> 20;
    eprintln!(
        "restore-trace {ms:9.3} ms  {what:<34} faults={faults} (served in {fault_ms:.3} ms, \
         max {max_us:.0} us) prefetched={pre} MiB populated={pop} MiB"
    );
}

/// A vCPU is about to enter KVM_RUN; the first one after [`begin`] is printed.
pub fn vcpu_entering() {
    if enabled() && !RAN.swap(true, Ordering::Relaxed) {
        mark("first KVM_RUN");
    }
}

/// The fault thread served one fault in `ns`.
pub fn fault_served(ns: u64) {
    if !enabled() {
        return;
    }
    if FAULTS.fetch_add(1, Ordering::Relaxed) == 0 {
        mark("first fault served");
    }
    FAULT_NS.fetch_add(ns, Ordering::Relaxed);
    FAULT_MAX_NS.fetch_max(ns, Ordering::Relaxed);
}

/// `bytes` were filled before the vCPUs ran (the saved working set).
pub fn prefetched(bytes: u64) {
    if enabled() {
        PREFETCHED.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// The background copy filled `bytes` more.
pub fn populated(bytes: u64) {
    if enabled() {
        POPULATED.fetch_add(bytes, Ordering::Relaxed);
    }
}
