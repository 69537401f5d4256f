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

/// What Ctrl-C does while a job is followed.
#[derive(Clone, Copy)]
enum OnCtrlC<'a> {
    /// Stop waiting; the job goes on.
    StopWaiting,
    /// Cancel the job and exit 130 at once.
    Cancel,
    /// Cancel the job, say `note` (what becomes of the VM), and keep following it to its end,
    /// which the caller reports; a second Ctrl-C stops waiting.
    CancelAndFollow(&'a str),
}

/// Polls `job` until it is no longer running and returns its last state. `what` labels the
/// progress ("start web").
pub fn wait(client: &Client, job: Job, what: &str) -> Result<Job, CliError> {
    follow(client, job, what, OnCtrlC::StopWaiting, &|_| None)
}

/// [`wait`], but Ctrl-C cancels the job (export, import, clone: a cancelled one removes what
/// it wrote) and waits for the cancel to be acknowledged.
pub fn wait_or_cancel(client: &Client, job: Job, what: &str) -> Result<Job, CliError> {
    follow(client, job, what, OnCtrlC::Cancel, &|_| None)
}

/// [`wait`] for jobs whose cancel takes effect at a safe point (storage move, migration):
/// Ctrl-C asks for the cancel, prints `cancelling` (what becomes of the VM) and follows the
/// job to its end (cancelled, or completed when it was too late), which the caller reports;
/// Ctrl-C again stops waiting. `detail` adds the job's own figures to the progress line.
pub fn follow_cancellable(
    client: &Client,
    job: Job,
    what: &str,
    cancelling: &str,
    detail: &dyn Fn(&Job) -> Option<String>,
) -> Result<Job, CliError> {
    follow(
        client,
        job,
        what,
        OnCtrlC::CancelAndFollow(cancelling),
        detail,
    )
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
    on_ctrl_c: OnCtrlC,
    detail: &dyn Fn(&Job) -> Option<String>,
) -> Result<Job, CliError> {
    let stop = interrupted();
    let mut shown = Progress::new(what, &job);
    let mut cancel_asked = false;
    loop {
        shown.update(&job, detail(&job), what, cancel_asked);
        if job.state != JobState::Running {
            shown.finish();
            return Ok(job);
        }
        let next = Instant::now() + POLL;
        while Instant::now() < next {
            if stop.swap(false, Ordering::SeqCst) {
                match on_ctrl_c {
                    OnCtrlC::CancelAndFollow(note) if !cancel_asked => {
                        cancel_asked = true;
                        shown.say(&format!(
                            "cancelling: {note} (Ctrl-C again to stop waiting)"
                        ));
                        let _: Job =
                            client.post(&format!("/v1/jobs/{}/cancel", job.id), None::<&()>)?;
                    }
                    OnCtrlC::Cancel => {
                        shown.finish();
                        return cancel(client, &job, what);
                    }
                    _ => {
                        shown.finish();
                        let goes_on = if cancel_asked {
                            "is being cancelled"
                        } else {
                            "goes on"
                        };
                        return Err(CliError::interrupted(format!(
                            "stopped waiting; job {id} ({what}) {goes_on}: `vireo job show {id}` follows it",
                            id = job.id
                        )));
                    }
                }
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

    /// Shows the job's progress; `detail` beside it (not once a cancel was asked: the bar
    /// then keeps saying so).
    fn update(&mut self, job: &Job, detail: Option<String>, what: &str, cancel_asked: bool) {
        let detail = detail.filter(|_| !cancel_asked);
        match self {
            Progress::Bar(bar) => {
                bar.set_position(job.progress.min(100).into());
                if let Some(d) = detail {
                    bar.set_message(format!("{what} ({d})"));
                }
            }
            Progress::Lines { label, last } => {
                let now = (job.state, job.progress);
                if *last != Some(now) {
                    let d = detail.map(|d| format!(" ({d})")).unwrap_or_default();
                    eprintln!("{label}: {} {}%{d}", state_name(job.state), job.progress);
                    *last = Some(now);
                }
            }
        }
    }

    /// A message for the person: on the bar, or a line of its own.
    fn say(&self, msg: &str) {
        match self {
            Progress::Bar(bar) => bar.set_message(msg.to_string()),
            Progress::Lines { .. } => eprintln!("{msg}"),
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
