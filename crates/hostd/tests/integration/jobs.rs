//! Jobs: progress, one end, removal of their VM, and failure of jobs a dead vireod left running.

use crate::common;

use vireo_api::{ApiError, JobKind, JobState};
use vireo_hostd::{Store, StoreError};

#[test]
fn a_job_moves_then_ends_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let vm = store.create_vm(&common::spec("a")).unwrap().id();
    let job = store.create_job(Some(vm), JobKind::Start).unwrap();
    assert_eq!((job.state, job.progress), (JobState::Running, 0));
    assert_eq!(store.set_job_progress(job.id, 40).unwrap().progress, 40);
    assert_eq!(
        store.set_job_progress(job.id, 250).unwrap().progress,
        100,
        "clamped"
    );
    let done = store.finish_job(job.id, Ok(())).unwrap();
    assert_eq!((done.state, done.progress), (JobState::Completed, 100));
    assert_eq!(store.get_job(job.id).unwrap(), done);
    for again in [
        store.cancel_job(job.id),
        store.finish_job(job.id, Err("x".into())),
        store.set_job_progress(job.id, 1),
    ] {
        let err = again.unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::JobEnded {
                    state: JobState::Completed,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(ApiError::from(&err).code.http_status(), 409);
    }

    let failed = store.create_job(Some(vm), JobKind::Save).unwrap();
    let failed = store
        .finish_job(failed.id, Err("disk full: /srv/a.vhdx".into()))
        .unwrap();
    assert_eq!(
        (failed.state, failed.error.as_deref()),
        (JobState::Failed, Some("disk full: /srv/a.vhdx"))
    );
    let cancelled = store.create_job(None, JobKind::Import).unwrap();
    assert_eq!(
        store.cancel_job(cancelled.id).unwrap().state,
        JobState::Cancelled
    );

    assert_eq!(store.list_jobs(None).unwrap().len(), 3);
    assert_eq!(store.list_jobs(Some(vm)).unwrap().len(), 2);
    store.remove(vm).unwrap();
    let kept = store.get_job(done.id).unwrap();
    assert_eq!(kept.vm_id, None, "a job outlives its VM, detached");
}

#[test]
fn a_job_for_a_missing_vm_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = store
        .create_job(Some(uuid::Uuid::new_v4()), JobKind::Stop)
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(store.list_jobs(None).unwrap().is_empty());
}

#[test]
fn running_jobs_of_a_dead_vireod_fail_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let running = store.create_job(None, JobKind::Export).unwrap();
    let done = store.create_job(None, JobKind::Export).unwrap();
    let done = store.finish_job(done.id, Ok(())).unwrap();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    let after = store.get_job(running.id).unwrap();
    assert_eq!(after.state, JobState::Failed);
    assert!(after.error.unwrap().contains("vireod restarted"));
    assert_eq!(store.get_job(done.id).unwrap(), done);
}
