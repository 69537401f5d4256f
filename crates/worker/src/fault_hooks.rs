//! Fault-injection holds for the end-to-end tests: an environment variable names a pause, in
//! milliseconds, at a point where a test wants to strike. Unset (every real run), nothing waits.

use std::time::Duration;

/// Sleeps the milliseconds `var` gives, saying in the log that `what` is held (the line a
/// test waits for). A value that is not a number is ignored with a warning.
pub fn hold(var: &str, what: &str) {
    let Some(text) = std::env::var_os(var) else {
        return;
    };
    match text.to_str().and_then(|t| t.parse::<u64>().ok()) {
        Some(ms) => {
            tracing::warn!("{what} held {ms} ms ({var})");
            std::thread::sleep(Duration::from_millis(ms));
        }
        None => tracing::warn!("{var}={text:?} ignored: expected milliseconds"),
    }
}
