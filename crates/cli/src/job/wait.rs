//! Following a job until it ends: poll `GET /v1/jobs/{id}`, draw its progress (a bar on a
//! terminal, one line per change otherwise), and let Ctrl-C stop the *waiting*: the job is the
//! daemon's and goes on, so vireo says so, prints its id and exits 130.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use vireo_api::{Job, JobState};

use crate::api_client::Client;
use crate::exit::CliError;

/// Between polls; a start takes ~100 ms to seconds, so this keeps the wait short and the
/// daemon idle.
const POLL: Duration = Duration::from_millis(200);

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Set by Ctrl-C; the handler is installed on first use (one per process, like
/// `disk::progress`, which a `vm` command never uses).
fn interrupted() -> &'static AtomicBool {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        // Without a handler Ctrl-C keeps its default: the process ends, the job goes on.
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
    });
    &INTERRUPTED
}

/// Polls `job` until it is no longer running and returns its last state. `what` labels the
/// progress ("start web").
pub fn wait(client: &Client, job: Job, what: &str) -> Result<Job, CliError> {
    follow(client, job, what, false)
}

/// [`wait`], but Ctrl-C cancels the job (export, import, clone: a cancelled one removes what
/// it wrote) and waits for the cancel to be acknowledged.
pub fn wait_or_cancel(client: &Client, job: Job, what: &str) -> Result<Job, CliError> {
    follow(client, job, what, true)
}

/// Cancels `job` after Ctrl-C and reports it (exit 130).
fn cancel(client: &Client, job: &Job, what: &str) -> Result<Job, CliError> {
    let ended: Result<Job, _> = client.post(&format!("/v1/jobs/{}/cancel", job.id), None::<&()>);
    match ended {
        Ok(_) => Err(CliError::interrupted(format!(
            "cancelled job {} ({what}); vireod removes what it had written",
            job.id
        ))),
        Err(e) => Err(CliError::interrupted(format!(
            "interrupted, but job {} ({what}) could not be cancelled: {e}; `vireo job show {}`",
            job.id, job.id
        ))),
    }
}

fn follow(
    client: &Client,
    mut job: Job,
    what: &str,
    cancel_on_interrupt: bool,
) -> Result<Job, CliError> {
    let stop = interrupted();
    let mut shown = Progress::new(what, &job);
    loop {
        shown.update(&job);
        if job.state != JobState::Running {
            shown.finish();
            return Ok(job);
        }
        let next = Instant::now() + POLL;
        while Instant::now() < next {
            if stop.load(Ordering::SeqCst) {
                shown.finish();
                if cancel_on_interrupt {
                    return cancel(client, &job, what);
                }
                return Err(CliError::interrupted(format!(
                    "stopped waiting; job {id} ({what}) goes on: `vireo job show {id}` follows it",
                    id = job.id
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        job = client.get(&format!("/v1/jobs/{}", job.id))?;
    }
}

/// A bar for a person at a terminal; plain lines on stderr for a log or a pipe.
enum Progress {
    Bar(ProgressBar),
    Lines {
        label: String,
        last: Option<(JobState, u8)>,
    },
}

impl Progress {
    fn new(what: &str, job: &Job) -> Progress {
        let label = format!("job {} ({what})", job.id);
        if !std::io::stderr().is_terminal() {
            return Progress::Lines { label, last: None };
        }
        let bar = ProgressBar::with_draw_target(Some(100), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos:>3}% {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        Progress::Bar(bar)
    }

    fn update(&mut self, job: &Job) {
        match self {
            Progress::Bar(bar) => bar.set_position(job.progress.min(100).into()),
            Progress::Lines { label, last } => {
                let now = (job.state, job.progress);
                if *last != Some(now) {
                    eprintln!("{label}: {} {}%", state_name(job.state), job.progress);
                    *last = Some(now);
                }
            }
        }
    }

    fn finish(self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

pub fn state_name(state: JobState) -> &'static str {
    match state {
        JobState::Running => "running",
        JobState::Completed => "completed",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}
