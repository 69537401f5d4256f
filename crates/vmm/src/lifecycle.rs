//! Parking vCPU threads for pause, resume and reset.
//!
//! A vCPU thread checks [`RunControl::pause_requested`] before every KVM_RUN. The controller sets
//! the request and then kicks the thread (signal + `immediate_exit`, see `vcpu.rs`), so the
//! thread leaves KVM_RUN, sees the request and parks here, outside KVM_RUN, until it is
//! resumed or the VM ends. While parked it may be asked to load its boot state (reset): the
//! vCPU's registers can only be set by the thread that owns its fd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::state::VcpuState;

#[derive(Default)]
struct State {
    /// Pause requested (vCPUs must park or stay parked).
    paused: bool,
    /// vCPU threads started and not yet ended.
    alive: usize,
    /// vCPU threads parked now.
    parked: usize,
    /// Bumped to ask every parked vCPU to do `job`.
    job_epoch: u64,
    job: Job,
    /// vCPUs that did it for the current epoch, what failed, and what they saved.
    job_done: usize,
    job_errors: Vec<String>,
    job_saved: Vec<VcpuState>,
    /// The VM is ending: parked vCPUs leave and nothing parks any more.
    released: bool,
}

/// Work a parked vCPU does on its own thread (only that thread may use its fd).
#[derive(Clone, Debug, Default)]
pub enum Job {
    /// Load the boot state (host reset).
    #[default]
    Reset,
    /// Read the complete state (save).
    Save,
    /// Load a saved state (in-place apply of a checkpoint, `vm/apply.rs`).
    Load(std::sync::Arc<LoadJob>),
}

/// What each vCPU loads for [`Job::Load`].
#[derive(Debug)]
pub struct LoadJob {
    /// Indexed by vCPU id.
    pub vcpus: Vec<VcpuState>,
    /// How long the VM was down since the save: its clocks move on by that much.
    pub down_ns: u64,
}

/// What a vCPU hands back from a [`Job`].
pub enum JobOutput {
    Done,
    Saved(Box<VcpuState>),
}

/// A job asked of the parked vCPUs ([`RunControl::start_job`]): how many must answer.
#[must_use = "wait_job collects the answers"]
pub struct JobTicket {
    want: usize,
}

/// Every vCPU's answer to a [`Job`].
#[derive(Debug, Default)]
pub struct JobResults {
    pub errors: Vec<String>,
    pub saved: Vec<VcpuState>,
}

#[derive(Default)]
pub struct RunControl {
    pause: AtomicBool,
    state: Mutex<State>,
    cv: Condvar,
}

/// Why the vCPUs did not all park.
#[derive(Debug, PartialEq, Eq)]
pub enum ParkError {
    /// The VM is ending.
    Released,
    /// `parked` of `alive` vCPUs parked in time.
    Timeout { parked: usize, alive: usize },
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cheap check for the vCPU loop.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    pub fn paused(&self) -> bool {
        self.lock().paused
    }

    /// vCPU threads started and not yet ended.
    pub fn alive(&self) -> usize {
        self.lock().alive
    }

    /// A vCPU thread is about to start (called before it is spawned).
    pub fn vcpu_started(&self) {
        self.lock().alive += 1;
    }

    /// A vCPU thread has left its loop.
    pub fn vcpu_ended(&self) {
        let mut s = self.lock();
        s.alive = s.alive.saturating_sub(1);
        self.cv.notify_all();
    }

    /// The VM is ending: parked vCPUs return (their loop then sees the exit reason) and
    /// waiting controllers give up.
    pub fn release(&self) {
        let mut s = self.lock();
        s.released = true;
        s.paused = false;
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Asks every vCPU to park; `kick` is called to get them out of KVM_RUN, again every
    /// few milliseconds until all have parked or `timeout` passed. On failure the request
    /// stays set: the caller decides (resume, or stop the VM).
    pub fn pause_vcpus(&self, timeout: Duration, kick: impl Fn()) -> Result<(), ParkError> {
        {
            let mut s = self.lock();
            if s.released {
                return Err(ParkError::Released);
            }
            s.paused = true;
            self.pause.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + timeout;
        loop {
            kick();
            let s = self.lock();
            let (s, _) = self
                .cv
                .wait_timeout_while(s, Duration::from_millis(5), |s| {
                    !s.released && s.parked < s.alive
                })
                .unwrap_or_else(|p| p.into_inner());
            if s.released {
                return Err(ParkError::Released);
            }
            if s.parked >= s.alive {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ParkError::Timeout {
                    parked: s.parked,
                    alive: s.alive,
                });
            }
        }
    }

    /// Lets parked vCPUs run again.
    pub fn resume_vcpus(&self) {
        let mut s = self.lock();
        s.paused = false;
        self.pause.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// With every vCPU parked: each loads its boot state; returns the failures (empty: all
    /// did), or `Err` when the VM ended or they did not answer in time.
    pub fn reset_vcpus(&self, timeout: Duration) -> Result<Vec<String>, ParkError> {
        self.run_job(Job::Reset, timeout).map(|r| r.errors)
    }

    /// With every vCPU parked: each does `job` on its thread; returns their answers, or `Err`
    /// when the VM ended or they did not all answer in time.
    pub fn run_job(&self, job: Job, timeout: Duration) -> Result<JobResults, ParkError> {
        let ticket = self.start_job(job);
        self.wait_job(ticket, timeout)
    }

    /// [`RunControl::run_job`]'s first half: asks the parked vCPUs to do `job` and returns at
    /// once, so the caller can work meanwhile (the switch-over sends the last pages while the
    /// vCPUs save their state); [`RunControl::wait_job`] collects their answers.
    pub fn start_job(&self, job: Job) -> JobTicket {
        let mut s = self.lock();
        s.job_epoch += 1;
        s.job = job;
        s.job_done = 0;
        s.job_errors.clear();
        s.job_saved.clear();
        self.cv.notify_all();
        JobTicket { want: s.alive }
    }

    /// Waits (at most `timeout`) until every vCPU did the job [`RunControl::start_job`] asked.
    pub fn wait_job(&self, ticket: JobTicket, timeout: Duration) -> Result<JobResults, ParkError> {
        let want = ticket.want;
        let s = self.lock();
        let (mut s, _) = self
            .cv
            .wait_timeout_while(s, timeout, |s| !s.released && s.job_done < want)
            .unwrap_or_else(|p| p.into_inner());
        if s.released {
            return Err(ParkError::Released);
        }
        if s.job_done < want {
            return Err(ParkError::Timeout {
                parked: s.job_done,
                alive: want,
            });
        }
        Ok(JobResults {
            errors: std::mem::take(&mut s.job_errors),
            saved: std::mem::take(&mut s.job_saved),
        })
    }

    /// vCPU thread: parks until resumed or released; `work` runs (unlocked) whenever a job is
    /// asked for meanwhile.
    pub fn park(&self, mut work: impl FnMut(Job) -> Result<JobOutput, String>) {
        let mut s = self.lock();
        let mut epoch = s.job_epoch;
        s.parked += 1;
        self.cv.notify_all();
        while s.paused && !s.released {
            if s.job_epoch != epoch {
                epoch = s.job_epoch;
                let job = s.job.clone();
                drop(s);
                let result = work(job);
                s = self.lock();
                if epoch == s.job_epoch {
                    s.job_done += 1;
                    match result {
                        Ok(JobOutput::Done) => {}
                        Ok(JobOutput::Saved(state)) => s.job_saved.push(*state),
                        Err(e) => s.job_errors.push(e),
                    }
                    self.cv.notify_all();
                }
                continue;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// Fake vCPU threads: run "KVM_RUN" (a sleep) until asked to park.
    fn spawn_vcpus(
        ctl: &Arc<RunControl>,
        n: usize,
        resets: &Arc<AtomicUsize>,
    ) -> Vec<std::thread::JoinHandle<()>> {
        (0..n)
            .map(|_| {
                ctl.vcpu_started();
                let ctl = ctl.clone();
                let resets = resets.clone();
                std::thread::spawn(move || {
                    let stop = Instant::now() + Duration::from_secs(30);
                    while Instant::now() < stop {
                        if ctl.lock().released {
                            break;
                        }
                        if ctl.pause_requested() {
                            ctl.park(|job| {
                                assert!(matches!(job, Job::Reset));
                                resets.fetch_add(1, Ordering::SeqCst);
                                Ok(JobOutput::Done)
                            });
                            continue;
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    ctl.vcpu_ended();
                })
            })
            .collect()
    }

    #[test]
    fn pause_resume_reset_and_release() {
        let ctl = Arc::new(RunControl::default());
        let resets = Arc::new(AtomicUsize::new(0));
        let threads = spawn_vcpus(&ctl, 3, &resets);
        for _ in 0..5 {
            ctl.pause_vcpus(Duration::from_secs(10), || {}).unwrap();
            assert!(ctl.paused());
            assert_eq!(ctl.lock().parked, 3);
            ctl.pause_vcpus(Duration::ZERO, || {}).unwrap();
            ctl.resume_vcpus();
            ctl.resume_vcpus();
        }
        ctl.pause_vcpus(Duration::from_secs(10), || {}).unwrap();
        assert_eq!(ctl.reset_vcpus(Duration::from_secs(10)), Ok(vec![]));
        assert_eq!(resets.load(Ordering::SeqCst), 3);
        // Released while paused: every thread leaves.
        ctl.release();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ctl.lock().alive, 0);
        assert_eq!(
            ctl.pause_vcpus(Duration::from_secs(1), || {}),
            Err(ParkError::Released)
        );
    }

    /// A vCPU state with only its id set.
    fn saved(id: u32) -> VcpuState {
        use crate::state::Blob;
        VcpuState {
            id,
            regs: Blob(Default::default()),
            sregs: Blob(Default::default()),
            fpu: Blob(Default::default()),
            xsave: None,
            xcrs: None,
            debugregs: None,
            lapic: Blob(Default::default()),
            events: Blob(Default::default()),
            mp_state: 0,
            msrs: vec![],
            tsc_khz: None,
        }
    }

    #[test]
    fn a_save_job_collects_every_parked_vcpus_state_and_errors() {
        let ctl = Arc::new(RunControl::default());
        let threads: Vec<_> = (0..3u32)
            .map(|id| {
                ctl.vcpu_started();
                let ctl = ctl.clone();
                std::thread::spawn(move || {
                    while !ctl.pause_requested() {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    ctl.park(|job| match (job, id) {
                        (Job::Save, 2) => Err("vCPU 2: KVM_GET_REGS failed".into()),
                        (Job::Save, _) => Ok(JobOutput::Saved(Box::new(saved(id)))),
                        (Job::Reset | Job::Load(_), _) => Ok(JobOutput::Done),
                    });
                    ctl.vcpu_ended();
                })
            })
            .collect();
        ctl.pause_vcpus(Duration::from_secs(10), || {}).unwrap();
        let r = ctl.run_job(Job::Save, Duration::from_secs(10)).unwrap();
        let mut ids: Vec<u32> = r.saved.iter().map(|s| s.id).collect();
        ids.sort();
        assert_eq!(ids, vec![0, 1]);
        assert_eq!(r.errors, vec!["vCPU 2: KVM_GET_REGS failed".to_string()]);
        // A second job starts from scratch, and a reset saves nothing.
        let r = ctl.run_job(Job::Reset, Duration::from_secs(10)).unwrap();
        assert!(r.saved.is_empty() && r.errors.is_empty());
        ctl.release();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_vcpu_that_never_parks_times_out() {
        let ctl = RunControl::default();
        ctl.vcpu_started();
        let t0 = Instant::now();
        let e = ctl.pause_vcpus(Duration::from_millis(50), || {});
        assert_eq!(
            e,
            Err(ParkError::Timeout {
                parked: 0,
                alive: 1
            })
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
