//! Progress bars and Ctrl-C for long disk operations.
//!
//! SIGINT only sets a flag; the operation notices it between chunks and stops at a point where
//! the file is valid (convert removes its partial output), so an interrupted command never
//! leaves a corrupt image. A second SIGINT exits at once, after removing new files that are
//! still under their temporary names (`vireo_vhdx::newfile`): those never carry the final name
//! before they are complete.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

static CANCEL: AtomicBool = AtomicBool::new(false);

/// The process-wide cancel flag, with a SIGINT handler installed the first time.
pub fn cancel_flag() -> &'static AtomicBool {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // If a handler cannot be installed, Ctrl-C keeps its default (kill) behaviour.
        let _ = ctrlc::set_handler(|| {
            if CANCEL.swap(true, Ordering::SeqCst) {
                // Second Ctrl-C: the user insists. New files are still under their temporary
                // names; remove them so nothing half-written stays behind.
                vireo_vhdx::newfile::remove_pending();
                eprintln!("\nvireo: interrupted twice, exiting now; no new file was left behind");
                std::process::exit(crate::exit::INTERRUPTED.into());
            }
            eprintln!("\nvireo: stopping at the next safe point (Ctrl-C again to force)...");
        });
    });
    &CANCEL
}

/// A bar on stderr, drawn only when stderr is a terminal.
pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    pub fn new(what: &str) -> Bar {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Bar { bar }
    }

    /// A callback for operations that report `(done, total)`.
    pub fn update(&self, done: u64, total: u64) {
        if self.bar.length() != Some(total) {
            self.bar.set_length(total);
        }
        self.bar.set_position(done);
    }

    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}
