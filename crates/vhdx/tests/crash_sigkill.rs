//! Power-loss tests: a writer process is SIGKILLed at random (seeded) points during
//! allocation-heavy writes and trims, resizes, and a merge. After every kill the file must open
//! (replaying its log), pass our checker and `qemu-img check`, and hold every write that a
//! completed flush acknowledged.
//!
//! The writer is this test binary re-executed with `VIREO_CRASH_CHILD` set (running only
//! `crash_child_entry_point`), so no extra build target is needed. It prints `READY`, then
//! `ACK <n>` after each completed flush: ops `0..n` are durable. The harness regenerates the same
//! op sequence from the seed, so it knows what each sector must contain.
//!
//! CI runs 40 crash points by default; `VIREO_CRASH_POINTS=N` runs N (split 1/2 writes,
//! 1/4 resize, 1/4 merge) and `VIREO_CRASH_SEED=S` picks the seed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vireo_block::BlockBackend;
use vireo_vhdx::{CreateOptions, DiskType, OpenOptions, Vhdx};

const CHILD_ENV: &str = "VIREO_CRASH_CHILD";
const SECTOR: u64 = 512;
const BLOCK: u32 = 1 << 20;
const MIN_SIZE: u64 = 16 << 20;
const MAX_SIZE: u64 = 48 << 20;
const START_SIZE: u64 = 32 << 20;
const FLUSH_EVERY: u64 = 6;
/// The writer stops by itself after this many ops (it is normally killed long before).
const MAX_OPS: u64 = 5_000;

// ---------------------------------------------------------------------------------------------
// The deterministic workload, shared by writer and checker.

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Write { lba: u64, sectors: u64 },
    Trim { lba: u64, sectors: u64 },
    Resize { size: u64 },
}

/// Op `i` of the workload; `size` is the disk size before it (updated by resizes).
fn workload(seed: u64, resize: bool) -> impl Iterator<Item = Op> {
    let mut rng = Rng(seed);
    let mut size = START_SIZE;
    std::iter::from_fn(move || {
        let roll = rng.below(100);
        let op = if resize && roll < 8 {
            size = MIN_SIZE + rng.below((MAX_SIZE - MIN_SIZE) / (1 << 20) + 1) * (1 << 20);
            Op::Resize { size }
        } else {
            let sectors = 1 + rng.below(96);
            let lba = rng.below(size / SECTOR - sectors);
            if roll < 88 {
                Op::Write { lba, sectors }
            } else {
                Op::Trim { lba, sectors }
            }
        };
        Some(op)
    })
}

fn sector_pattern(seed: u64, op: u64, lba: u64, out: &mut [u8]) {
    let mut rng = Rng(seed ^ op.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ lba.rotate_left(32));
    for word in out.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// The writer (child process).

/// Entry point of the writer process; a no-op in a normal test run.
#[test]
fn crash_child_entry_point() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let mode = parts.next().unwrap().to_string();
    let seed: u64 = parts.next().unwrap().parse().unwrap();
    let path = PathBuf::from(parts.next().unwrap());
    match mode.as_str() {
        "write" | "resize" => child_write(&path, seed, mode == "resize"),
        "merge" => child_merge(&path),
        other => panic!("unknown crash child mode {other}"),
    }
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").unwrap();
    out.flush().unwrap();
}

fn child_write(path: &Path, seed: u64, resize: bool) {
    let disk = Vhdx::open(path, &OpenOptions::default()).unwrap();
    say("READY");
    let mut buf = vec![0u8; 96 * SECTOR as usize];
    for (i, op) in workload(seed, resize).take(MAX_OPS as usize).enumerate() {
        let i = i as u64;
        let mut boundary = (i + 1).is_multiple_of(FLUSH_EVERY);
        match op {
            Op::Write { lba, sectors } => {
                let data = &mut buf[..(sectors * SECTOR) as usize];
                for (k, s) in data.chunks_exact_mut(SECTOR as usize).enumerate() {
                    sector_pattern(seed, i, lba + k as u64, s);
                }
                disk.write_at(data, lba * SECTOR).unwrap();
            }
            Op::Trim { lba, sectors } => disk.discard(lba * SECTOR, sectors * SECTOR).unwrap(),
            Op::Resize { size } => {
                disk.resize(size, true).unwrap();
                boundary = true;
            }
        }
        if boundary {
            disk.flush().unwrap();
            say(&format!("ACK {}", i + 1));
        }
    }
    say("DONE");
}

fn child_merge(child: &Path) {
    say("READY");
    Vhdx::merge_into_parent(child, &|_, _| {}, &AtomicBool::new(false)).unwrap();
    say("MERGED");
}

// ---------------------------------------------------------------------------------------------
// The harness.

struct Run {
    lines: Vec<String>,
    killed: bool,
}

/// Starts the writer, kills it `delay` after it printed READY (unless it finishes first).
fn run_child(mode: &str, seed: u64, path: &Path, delay: Duration) -> Run {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "crash_child_entry_point",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{mode}:{seed}:{}", path.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let ready = Arc::new(Mutex::new(None::<Instant>));
    let reader = {
        let lines = lines.clone();
        let ready = ready.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // libtest may print "test name ... " in front of the first line.
                if line.ends_with("READY") {
                    *ready.lock().unwrap() = Some(Instant::now());
                }
                lines.lock().unwrap().push(line);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed = false;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "writer failed: {status:?} {:?}",
                lines.lock().unwrap()
            );
            break;
        }
        let started = *ready.lock().unwrap();
        if started.is_some_and(|t| t.elapsed() >= delay) || Instant::now() > deadline {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            killed = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    reader.join().unwrap();
    let lines = lines.lock().unwrap().clone();
    Run { lines, killed }
}

fn qemu_check(path: &Path) -> Option<String> {
    // qemu-img missing (a recorded skip; fails under CI): our own checks still run.
    if !vireo_testkit::require(vireo_testkit::Need::QemuImg) {
        return None;
    }
    let out = Command::new("qemu-img")
        .args(["check", "-q", "-f", "vhdx"])
        .arg(path)
        .output()
        .unwrap();
    if out.status.success() {
        None
    } else {
        Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Opens (replaying the log), checks with our checker and qemu-img.
fn recover_and_check(path: &Path, what: &str) {
    drop(Vhdx::open(path, &OpenOptions::default()).unwrap_or_else(|e| panic!("{what}: open: {e}")));
    let report = Vhdx::check(path, false).unwrap_or_else(|e| panic!("{what}: check: {e}"));
    assert!(report.is_clean(), "{what}: our check: {report:?}");
    if let Some(err) = qemu_check(path) {
        panic!("{what}: qemu-img check: {err}");
    }
}

fn crash_points() -> u64 {
    std::env::var("VIREO_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40)
}

fn base_seed() -> u64 {
    std::env::var("VIREO_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe)
}

/// Checks the disk against the ops acknowledged (`0..acked`) and the ones that may or may not
/// have reached the disk (`acked..acked + 2 * FLUSH_EVERY`).
fn verify_writes(path: &Path, seed: u64, resize: bool, acked: u64, what: &str) {
    let ops: Vec<Op> = workload(seed, resize)
        .take((acked + 2 * FLUSH_EVERY) as usize)
        .collect();
    // Sector state at the last acknowledged flush: 0 = zero, n = written by op n-1.
    let max_sectors = (MAX_SIZE / SECTOR) as usize;
    let mut model = vec![0u32; max_sectors];
    let mut size = START_SIZE;
    for (i, op) in ops[..acked as usize].iter().enumerate() {
        match *op {
            Op::Write { lba, sectors } => {
                model[lba as usize..(lba + sectors) as usize].fill(i as u32 + 1)
            }
            Op::Trim { lba, sectors } => model[lba as usize..(lba + sectors) as usize].fill(0),
            Op::Resize { size: s } => {
                if s < size {
                    model[(s / SECTOR) as usize..].fill(0);
                }
                size = s;
            }
        }
    }
    let maybe = &ops[acked as usize..];
    let mut sizes = vec![size];
    sizes.extend(maybe.iter().filter_map(|o| match o {
        Op::Resize { size } => Some(*size),
        _ => None,
    }));
    let disk = Vhdx::open(path, &OpenOptions::read_only()).unwrap();
    let actual_size = disk.size();
    assert!(
        sizes.contains(&actual_size),
        "{what}: size {actual_size} is none of {sizes:?}"
    );
    let smallest_maybe = sizes.iter().copied().min().unwrap();
    let mut data = vec![0u8; actual_size as usize];
    disk.read_at(&mut data, 0).unwrap();
    let mut expect = [0u8; SECTOR as usize];
    let mut mismatches = 0;
    for (lba, got) in data.chunks_exact(SECTOR as usize).enumerate() {
        let lba = lba as u64;
        let candidate = |op: u32, out: &mut [u8; 512]| {
            if op == 0 {
                out.fill(0);
            } else {
                sector_pattern(seed, op as u64 - 1, lba, out);
            }
        };
        let state = if lba * SECTOR >= size {
            0
        } else {
            model[lba as usize]
        };
        candidate(state, &mut expect);
        if got == expect {
            continue;
        }
        // Not the acknowledged state: fine only if an unacknowledged op could explain it.
        let mut explained = lba * SECTOR >= smallest_maybe && got.iter().all(|&b| b == 0);
        for (k, op) in maybe.iter().enumerate() {
            if explained {
                break;
            }
            match *op {
                Op::Write { lba: l, sectors } if (l..l + sectors).contains(&lba) => {
                    candidate(acked as u32 + k as u32 + 1, &mut expect);
                    explained = got == expect;
                }
                Op::Trim { lba: l, sectors } if (l..l + sectors).contains(&lba) => {
                    explained = got.iter().all(|&b| b == 0);
                }
                _ => {}
            }
        }
        if !explained {
            mismatches += 1;
            if mismatches <= 3 {
                eprintln!("{what}: sector {lba} lost acknowledged state {state}");
            }
        }
    }
    assert_eq!(
        mismatches, 0,
        "{what}: {mismatches} sectors lost acknowledged data"
    );
}

fn acked_of(run: &Run) -> u64 {
    run.lines
        .iter()
        .filter_map(|l| l[l.find("ACK ")? + 4..].trim().parse().ok())
        .max()
        .unwrap_or(0)
}

fn new_disk(path: &Path) {
    let _ = std::fs::remove_file(path);
    Vhdx::create(
        path,
        &CreateOptions {
            size: START_SIZE,
            disk_type: DiskType::Dynamic,
            block_size: BLOCK,
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

fn crash_writes(mode: &str, points: u64, rng: &mut Rng, dir: &Path) -> u64 {
    let path = dir.join(format!("{mode}.vhdx"));
    let mut ran = 0;
    for point in 0..points {
        let seed = rng.next();
        new_disk(&path);
        // Kill anywhere from "before the first write" to a few hundred ops in.
        let delay = Duration::from_micros(rng.below(250_000));
        let run = run_child(mode, seed, &path, delay);
        let acked = acked_of(&run);
        let what = format!("{mode} point {point} (seed {seed:#x}, {delay:?}, acked {acked})");
        let t = Instant::now();
        recover_and_check(&path, &what);
        verify_writes(&path, seed, mode == "resize", acked, &what);
        eprintln!(
            "{what}: killed={} verified in {:?}",
            run.killed,
            t.elapsed()
        );
        if point == 0 {
            verifier_catches_damage(&path, seed, mode == "resize", acked);
        }
        ran += run.killed as u64;
    }
    ran
}

/// The checker itself must be able to fail: damage one acknowledged sector and expect a panic.
fn verifier_catches_damage(path: &Path, seed: u64, resize: bool, acked: u64) {
    let disk = Vhdx::open(path, &OpenOptions::default()).unwrap();
    let size = disk.size();
    let target = workload(seed, resize)
        .take(acked as usize)
        .find_map(|op| match op {
            Op::Write { lba, .. } if (lba + 1) * SECTOR <= size.min(MIN_SIZE) => Some(lba),
            _ => None,
        });
    let Some(lba) = target else { return };
    disk.write_at(&[0xee; SECTOR as usize], lba * SECTOR)
        .unwrap();
    disk.flush().unwrap();
    drop(disk);
    let caught = std::panic::catch_unwind(|| verify_writes(path, seed, resize, acked, "damaged"));
    assert!(
        caught.is_err(),
        "the verifier missed a damaged sector at lba {lba}"
    );
}

/// Parent with data, differencing child with other data over part of it; returns the view.
fn merge_fixture(dir: &Path, seed: u64) -> (PathBuf, PathBuf, Vec<u8>) {
    let parent = dir.join("parent.vhdx");
    let child = dir.join("child.avhdx");
    let _ = std::fs::remove_file(&parent);
    let _ = std::fs::remove_file(&child);
    let size = START_SIZE;
    let mut view = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    {
        let p = Vhdx::create(
            &parent,
            &CreateOptions {
                size,
                block_size: BLOCK,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        for i in 0..40u64 {
            let sectors = 1 + rng.below(512);
            let lba = rng.below(size / SECTOR - sectors);
            let range = (lba * SECTOR) as usize..((lba + sectors) * SECTOR) as usize;
            for (k, s) in view[range.clone()].chunks_exact_mut(512).enumerate() {
                sector_pattern(seed, i, lba + k as u64, s);
            }
            p.write_at(&view[range], lba * SECTOR).unwrap();
        }
        p.flush().unwrap();
    }
    let c = Vhdx::create(
        &child,
        &CreateOptions {
            disk_type: DiskType::Differencing,
            parent: Some(parent.clone()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    for i in 1000..1060u64 {
        let sectors = 1 + rng.below(512);
        let lba = rng.below(size / SECTOR - sectors);
        let range = (lba * SECTOR) as usize..((lba + sectors) * SECTOR) as usize;
        for (k, s) in view[range.clone()].chunks_exact_mut(512).enumerate() {
            sector_pattern(seed, i, lba + k as u64, s);
        }
        c.write_at(&view[range], lba * SECTOR).unwrap();
    }
    c.discard(3 << 20, 1 << 20).unwrap();
    view[3 << 20..4 << 20].fill(0);
    c.flush().unwrap();
    (parent, child, view)
}

fn crash_merges(points: u64, rng: &mut Rng, dir: &Path) -> u64 {
    // One uninterrupted merge to learn how long a merge takes here.
    let (_, child, _) = merge_fixture(dir, 1);
    let t = Instant::now();
    let run = run_child("merge", 0, &child, Duration::from_secs(60));
    assert!(
        run.lines.iter().any(|l| l.ends_with("MERGED")),
        "{:?}",
        run.lines
    );
    let full = t.elapsed();
    let mut ran = 0;
    for point in 0..points {
        let seed = rng.next();
        let (parent, child, view) = merge_fixture(dir, seed);
        let delay = full.mul_f64(rng.below(1000) as f64 / 1000.0);
        let run = run_child("merge", seed, &child, delay);
        let what = format!("merge point {point} (seed {seed:#x}, {delay:?} of {full:?})");
        // The parent must be a valid disk at every point, and the merge must resume.
        recover_and_check(&parent, &what);
        // The merge deletes the child as its very last step; a child still present means the
        // merge was interrupted and must resume.
        if child.exists() {
            Vhdx::merge_into_parent(&child, &|_, _| {}, &AtomicBool::new(false))
                .unwrap_or_else(|e| panic!("{what}: resuming the merge: {e}"));
            recover_and_check(&parent, &what);
        }
        let disk = Vhdx::open(&parent, &OpenOptions::read_only()).unwrap();
        let mut got = vec![0u8; view.len()];
        disk.read_at(&mut got, 0).unwrap();
        assert!(
            got == view,
            "{what}: merged parent differs from the child's view"
        );
        eprintln!("{what}: killed={}", run.killed);
        ran += run.killed as u64;
    }
    ran
}

#[test]
fn crash_sigkill_writes_resize_merge() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let points = crash_points();
    let seed = base_seed();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(seed);
    let writes = crash_writes("write", points / 2, &mut rng, dir.path());
    let resizes = crash_writes("resize", points / 4, &mut rng, dir.path());
    let merges = crash_merges(points - points / 2 - points / 4, &mut rng, dir.path());
    println!(
        "crash points: {} writes, {} resizes, {} merges killed mid-operation (of {points}), seed {seed:#x}",
        writes, resizes, merges
    );
    // Most runs must really be interrupted, or the test proves nothing.
    assert!(writes + resizes >= (points / 2 + points / 4) / 2);
}
