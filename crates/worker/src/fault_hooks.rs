//! Fault-injection holds for the end-to-end tests: an environment variable names a pause, in
//! milliseconds, at a point where a test wants to strike. Unset (every real run), nothing waits.

use std::time::Duration;

/// The pause `var` names, if any. Read ahead of a path that must not pay for the lookup (the
/// switch-over); a value that is not a number is ignored with a warning.
pub fn read(var: &str) -> Option<Duration> {
    let text = std::env::var_os(var)?;
    match text.to_str().and_then(|t| t.parse::<u64>().ok()) {
        Some(ms) => Some(Duration::from_millis(ms)),
        None => {
            tracing::warn!("{var}={text:?} ignored: expected milliseconds");
            None
        }
    }
}

/// Sleeps `pause`, saying in the log that `what` is held (the line a test waits for).
pub fn hold_for(what: &str, var: &str, pause: Duration) {
    tracing::warn!("{what} held {} ms ({var})", pause.as_millis());
    std::thread::sleep(pause);
}

/// Sleeps the pause `var` names, if any ([`read`], then [`hold_for`]).
pub fn hold(var: &str, what: &str) {
    if let Some(pause) = read(var) {
        hold_for(what, var, pause);
    }
}
