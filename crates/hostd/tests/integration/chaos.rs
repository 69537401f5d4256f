//! Concurrent random lifecycle requests (start, stop, turn-off, cancel, console log, spec
//! update) from several clients on a few VMs with fake workers: every answer is a success or a
//! 409, never another error; once the clients stop and every VM is turned off, no job is left
//! running, every VM is off and no worker process of this state directory is left alive.
//! The seed is printed; VIREO_CHAOS_SEED replays one.

use crate::common;

use std::time::{Duration, Instant};

use common::daemon::{spec_json, Vireod};
use serde_json::json;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmd).contains(needle) && common::daemon::alive(pid) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn random_concurrent_lifecycle_requests_end_consistent() {
    let cmdlines = [
        "fake.boot_ms=10",
        "fake.boot_ms=300",
        "fake.boot_ms=50 fake.ignore_shutdown",
        "fake.boot_ms=0",
    ];
    let specs = cmdlines
        .iter()
        .enumerate()
        .map(|(i, c)| spec_json(&format!("vm{i}"), c))
        .collect();
    chaos(std::path::Path::new(common::daemon::FAKE_WORKER), specs, 60);
}

/// The same with `vireo-vm` and probe guests (KVM).
#[test]
fn random_concurrent_lifecycle_requests_with_probe_vms_end_consistent() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let bin = std::path::Path::new(common::daemon::VIREOD).with_file_name("vireo-vm");
    assert!(
        bin.exists(),
        "{} missing: cargo build --release -p vireo-worker",
        bin.display()
    );
    let specs = (0..3)
        .map(|i| {
            json!({
                "version": 1,
                "name": format!("probe{i}"),
                "vcpus": 1,
                "memory_bytes": 32 << 20,
                "kernel": vireo_probe_image::probe_elf(),
                "cmdline": "console=ttyS0",
                "shutdown_line": "POWEROFF",
            })
        })
        .collect();
    chaos(&bin, specs, 30);
}

fn chaos(worker_bin: &std::path::Path, specs: Vec<serde_json::Value>, ops_per_client: usize) {
    let seed: u64 = std::env::var("VIREO_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    eprintln!("VIREO_CHAOS_SEED={seed}");
    let tmp = tempfile::tempdir().unwrap();
    let d = Vireod::start_with(&tmp.path().join("state"), worker_bin);
    let ids: Vec<String> = specs
        .iter()
        .map(|spec| {
            d.create(spec)["identity"]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let accepted = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let accepted = &accepted;
            let (d, ids) = (&d, &ids);
            s.spawn(move || {
                let mut rng = Rng((seed ^ (t + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)) | 1);
                for _ in 0..ops_per_client {
                    let id = &ids[rng.below(ids.len() as u64) as usize];
                    let r = match rng.below(7) {
                        0 | 1 => d.post(&format!("/v1/vms/{id}/start")),
                        2 => {
                            d.post_json(&format!("/v1/vms/{id}/stop"), &json!({"timeout_secs": 1}))
                        }
                        3 => d.post(&format!("/v1/vms/{id}/turn-off")),
                        4 => {
                            let jobs = d.show(&format!("/v1/jobs?vm={id}"));
                            match jobs.as_array().unwrap().first() {
                                Some(j) => d.post(&format!(
                                    "/v1/jobs/{}/cancel",
                                    j["id"].as_str().unwrap()
                                )),
                                None => continue,
                            }
                        }
                        5 => d.get(&format!("/v1/vms/{id}/console/log")),
                        _ => {
                            let vm = d.show(&format!("/v1/vms/{id}"));
                            let body = serde_json::to_vec(&vm["spec"]).unwrap();
                            d.request(
                                "PUT",
                                &format!("/v1/vms/{id}/spec"),
                                Some(("application/json", &body)),
                            )
                        }
                    };
                    assert!(
                        matches!(r.status, 200 | 202 | 409),
                        "{} {:?}\n{}",
                        r.status,
                        String::from_utf8_lossy(&r.body),
                        d.log()
                    );
                    if r.status == 202 {
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(rng.below(30)));
                }
            });
        }
    });
    let accepted = accepted.into_inner();
    eprintln!("{accepted} jobs accepted");
    assert!(accepted >= 4, "hardly anything happened: {accepted} jobs");
    // Quiesce: turn everything off (a busy VM is retried), then every job must end.
    let start = Instant::now();
    for id in &ids {
        loop {
            let r = d.post(&format!("/v1/vms/{id}/turn-off"));
            if r.status == 200 || d.state(id) == "off" {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{id} never off: {:?}",
                String::from_utf8_lossy(&r.body)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    loop {
        let jobs = d.show("/v1/jobs");
        let running: Vec<_> = jobs
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["state"] == "running")
            .collect();
        if running.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "jobs still running: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for id in &ids {
        assert_eq!(d.state(id), "off", "{}", d.log());
    }
    for job in d.show("/v1/jobs").as_array().unwrap() {
        if job["state"] == "failed" {
            assert!(
                job["error"].as_str().is_some_and(|e| !e.is_empty()),
                "{job}"
            );
        }
    }
    let state_dir = d.state_dir.to_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_mentioning(&format!("{state_dir}/vms/"));
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "worker processes left: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
