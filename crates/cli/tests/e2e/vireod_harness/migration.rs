//! Two vireods that migrate VMs between them: host identities, mutual trust, migration jobs.

use std::time::{Duration, Instant};

use super::Daemon;

/// `vireo host identity --output json`.
pub fn identity(d: &Daemon) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["host", "identity", "--output", "json"])).unwrap()
}

/// The address other hosts migrate VMs to (`--migration-listen`, port resolved).
pub fn migration_address(d: &Daemon) -> String {
    identity(d)["migration_listen"]
        .as_str()
        .expect("vireod started with --migration-listen")
        .to_owned()
}

/// Each host trusts the other's certificate, named `host-a` and `host-b`.
pub fn trust_each_other(a: &Daemon, b: &Daemon) {
    let fingerprint = |d: &Daemon| identity(d)["fingerprint"].as_str().unwrap().to_owned();
    let (fp_a, fp_b) = (fingerprint(a), fingerprint(b));
    a.ok(&["host", "trust", "add", &fp_b, "host-b"]);
    b.ok(&["host", "trust", "add", &fp_a, "host-a"]);
}

/// `vireo job show ID --output json`.
pub fn job(d: &Daemon, id: &str) -> serde_json::Value {
    serde_json::from_str(&d.ok(&["job", "show", id, "--output", "json"])).unwrap()
}

/// `vireo vm migrate ARGS... --no-wait --output json` on `d`: the job's id.
pub fn start_migration(d: &Daemon, args: &[&str]) -> String {
    let mut all = vec!["vm", "migrate"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--no-wait", "--output", "json"]);
    let started: serde_json::Value = serde_json::from_str(&d.ok(&all)).unwrap();
    started["id"].as_str().unwrap().to_owned()
}

/// `vireo vm migrate VM --to TO --with-storage --dest-dir DEST EXTRA.. --no-wait` on `d`: the
/// shared-nothing migration job's id.
pub fn start_shared_nothing(
    d: &Daemon,
    vm: &str,
    to: &str,
    dest: &std::path::Path,
    extra: &[&str],
) -> String {
    let dest = dest.to_str().unwrap();
    let mut args = vec![vm, "--to", to, "--with-storage", "--dest-dir", dest];
    args.extend_from_slice(extra);
    start_migration(d, &args)
}

/// Waits (at most `limit`) until the job is no longer running; the job as it ended.
pub fn wait_for_end(d: &Daemon, job_id: &str, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let j = job(d, job_id);
        if j["state"] != "running" {
            return j;
        }
        assert!(Instant::now() < deadline, "the job never ended: {j}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// As [`wait_for_end`], and on every poll the job's `migration.<counter>` is at least what
/// it was at the one before (and at least `from`): a figure that only grows.
pub fn wait_for_end_growing(
    d: &Daemon,
    job_id: &str,
    counter: &str,
    from: u64,
    limit: Duration,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let mut last = from;
    loop {
        let j = job(d, job_id);
        let now = j["migration"][counter].as_u64().unwrap_or(0);
        assert!(now >= last, "{counter} fell from {last} to {now}: {j}");
        last = now;
        if j["state"] != "running" {
            return j;
        }
        assert!(Instant::now() < deadline, "the job never ended: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The job's `migration.<counter>` now.
pub fn progress_of(d: &Daemon, job_id: &str, counter: &str) -> u64 {
    job(d, job_id)["migration"][counter].as_u64().unwrap_or(0)
}

/// Waits (at most 60 s) until the migration job's `migration.<counter>` is above 0, e.g.
/// `transferred_bytes` or `disk_bytes_copied`; the job must still be running meanwhile.
pub fn wait_for_progress(d: &Daemon, job_id: &str, counter: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(d, job_id);
        assert_eq!(j["state"], "running", "ended before {counter} moved: {j}");
        if j["migration"][counter].as_u64().unwrap_or(0) > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{counter} never moved: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the second host of [`two_hosts`] sees the first one's folder.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// B's `--storage-root` is A's folder: disks live where both hosts reach them.
    Shared,
    /// Each host sees only its own folder (shared-nothing).
    Separate,
}

/// Two vireods listening for migrations on loopback ports (`--migration-listen 127.0.0.1:0`),
/// not yet trusting each other; `None` when vireod cannot start here (already reported).
pub fn two_hosts(storage: Storage) -> Option<(Daemon, Daemon)> {
    two_hosts_source_env(storage, &[])
}

/// [`two_hosts`], the first (the source) with `env` (a `VIREO_TEST_*` fault hook its workers
/// inherit).
pub fn two_hosts_source_env(storage: Storage, env: &[(&str, &str)]) -> Option<(Daemon, Daemon)> {
    let listen = ["--migration-listen", "127.0.0.1:0"];
    let a = Daemon::start_args_env(&listen, env)?;
    let a_dir = a.dir.path().to_str().unwrap().to_owned();
    let b = match storage {
        Storage::Shared => Daemon::start_args(&[listen[0], listen[1], "--storage-root", &a_dir]),
        Storage::Separate => Daemon::start_args(&listen),
    }?;
    Some((a, b))
}

/// `vireo disk create CHILD --parent PARENT` on `d`: a differencing VHDX.
pub fn create_child(d: &Daemon, child: &std::path::Path, parent: &std::path::Path) {
    d.ok(&[
        "disk",
        "create",
        child.to_str().unwrap(),
        "--parent",
        parent.to_str().unwrap(),
    ]);
}

/// A probe VM `name` (32 MiB) on one sparse raw disk of `disk_len` bytes in `d`'s folder,
/// started, with its console attached.
pub fn start_probe_on_raw_disk(d: &Daemon, name: &str, disk_len: u64) -> super::console::Console {
    let disk = format!("{name}.img");
    std::fs::File::create(d.dir.path().join(&disk))
        .unwrap()
        .set_len(disk_len)
        .unwrap();
    let kernel = vireo_probe_image::probe_elf().to_str().unwrap().to_owned();
    d.ok(&[
        "vm", "create", name, "--kernel", &kernel, "--memory", "32M", "--disk", &disk,
    ]);
    d.ok(&["vm", "start", name]);
    super::console::Console::attach(d, name)
}

/// The names of the entries in `dir`, sorted.
pub fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
