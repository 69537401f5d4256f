//! `migrate --link`: the migration link alone, without VMs — what Vireo's page path (framing,
//! zero-page markers, compression, mutual TLS, one thread per stream on each side) moves per
//! second and what it costs in CPU, over loopback. The VM benchmark's total and downtime
//! follow from this rate; the CPU cost per MiB is the figure that survives a loaded machine
//! (wall-clock rates swing with whatever else runs on the two cores here).
//!
//! The "guest" is 256 MiB with a 64 MiB incompressible region (the probe's `MEM FILL`
//! pattern) and zeroes elsewhere, like the VM benchmark's full pass; then the 64 MiB region
//! alone, like its dirty rounds.

use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vireo_migration::auto::AutoCompress;
use vireo_migration::hostauth::{self, HostIdentity, TrustStore};
use vireo_migration::preamble::Preamble;
use vireo_migration::record::Transport;
use vireo_migration::sender::{Compression, Sender};
use vireo_migration::{Codec, Receiver};

const GUEST: usize = 256 << 20;
const HOT_AT: usize = 16 << 20;
const HOT: usize = 64 << 20;
/// Reads from "guest RAM" in runs of this size, as the VMM does.
const CHUNK: usize = 1 << 20;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The guest's RAM as a memfd (the VMM reads its RAM the same way, with `pread`).
fn memfd(name: &str) -> Result<std::fs::File, String> {
    let name = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: memfd_create takes a C string we own and returns a new fd (or -1).
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the fd is new and ours alone.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

fn guest() -> Result<std::fs::File, String> {
    let f = memfd("link-src")?;
    f.set_len(GUEST as u64).map_err(|e| e.to_string())?;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut buf = vec![0u8; CHUNK];
    for at in (HOT_AT..HOT_AT + HOT).step_by(CHUNK) {
        for w in buf.chunks_exact_mut(8) {
            // splitmix-like: incompressible, like the probe's pattern.
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            w.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
        }
        f.write_all_at(&buf, at as u64).map_err(|e| e.to_string())?;
    }
    Ok(f)
}

struct Pass {
    name: &'static str,
    from: usize,
    len: usize,
}

/// One measurement: `streams` streams, `codec` (`None`: auto), both passes.
fn measure(
    ram: &Arc<std::fs::File>,
    streams: u16,
    codec: Option<Codec>,
    whole_records: bool,
) -> Result<Vec<(f64, f64, f64, String)>, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    for d in ["a", "b"] {
        std::fs::create_dir(dir.path().join(d)).map_err(|e| e.to_string())?;
    }
    let a = HostIdentity::load_or_create(&dir.path().join("a"), "a").map_err(|e| e.to_string())?;
    let b = HostIdentity::load_or_create(&dir.path().join("b"), "b").map_err(|e| e.to_string())?;
    let mut ta = TrustStore::new();
    ta.trust(b.fingerprint(), "b");
    let mut tb = TrustStore::new();
    tb.trust(a.fingerprint(), "a");
    let scfg = hostauth::server_config(&b, &tb).map_err(|e| e.to_string())?;
    let ccfg = hostauth::client_config(&a, &ta).map_err(|e| e.to_string())?;
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let session = uuid::Uuid::new_v4();
    let t_io = Duration::from_secs(60);
    let passes = [
        Pass {
            name: "full 256 MiB (64 MiB data)",
            from: 0,
            len: GUEST,
        },
        Pass {
            name: "dirty 64 MiB",
            from: HOT_AT,
            len: HOT,
        },
    ];
    // Receivers: one thread per stream, into one shared "destination RAM".
    let dst = Arc::new(DstRam::new()?);
    let rx = std::thread::spawn({
        let dst = dst.clone();
        move || -> Result<Duration, String> {
            let mut threads = Vec::new();
            for _ in 0..streams {
                let (tcp, _) = listener.accept().map_err(|e| e.to_string())?;
                let mut s = hostauth::accept(tcp, scfg.clone(), t_io).map_err(|e| e.to_string())?;
                let dst = dst.clone();
                threads.push(std::thread::spawn(move || -> Result<Duration, String> {
                    let c0 = thread_cpu();
                    let mut r = Receiver::start(&mut s, Some(session), Transport::Authenticated)
                        .map_err(|e| e.to_string())?;
                    // `dst` (moved in) keeps the mapping alive while `ram` writes to it.
                    let mut ram = dst.writer();
                    if whole_records {
                        r.run(&mut s, &mut ram)
                    } else {
                        r.run_buffered(&mut s, &mut ram)
                    }
                    .map_err(|e| e.to_string())?;
                    Ok(thread_cpu() - c0)
                }));
            }
            let mut cpu = Duration::ZERO;
            for t in threads {
                cpu += t.join().map_err(|_| "receiver panicked")??;
            }
            Ok(cpu)
        }
    });
    let mut senders = Vec::new();
    let mut suite = String::new();
    for i in 0..streams {
        let s = hostauth::connect(addr, ccfg.clone(), t_io).map_err(|e| e.to_string())?;
        suite = format!("{:?}", Some(s.suite()));
        let compression = match codec {
            Some(c) => Compression::Fixed(c),
            None => Compression::Auto(AutoCompress::default()),
        };
        senders.push(
            Sender::start(
                s,
                Preamble::new(session, i, streams),
                compression,
                Transport::Authenticated,
            )
            .map_err(|e| format!("starting stream {i}: {e}"))?,
        );
    }
    let sent = send_passes(ram, &mut senders, streams, &passes);
    let out = match sent {
        Ok(o) => o,
        Err(e) => {
            drop(senders);
            let why = rx.join().map_err(|_| "receivers panicked")?.err();
            return Err(format!("{e} (receiver: {why:?})"));
        }
    };
    let mut out = out;
    let mut wire = 0;
    let mut done_err = None;
    // Kept open until the receivers are through: closing a TLS stream with the server's
    // session tickets unread makes the kernel reset it, and the reset can overtake data.
    let mut open = Vec::new();
    for s in senders {
        match s.done() {
            Ok((w, st)) => {
                wire += st.wire_bytes;
                open.push(w);
            }
            Err(e) => {
                done_err.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = done_err {
        let why = rx.join().map_err(|_| "receivers panicked")?.err();
        return Err(format!("ending the streams: {e} (receiver: {why:?})"));
    }
    let rx_cpu = rx.join().map_err(|_| "receivers panicked")??;
    drop(open);
    let rx_us = rx_cpu.as_secs_f64() * 1e6 / ((2 * HOT) as f64 / (1 << 20) as f64);
    for o in &mut out {
        o.3 = format!(
            "{} | receiver {rx_us:.0} µs CPU/MiB (both passes), {} MiB on the wire, {suite}",
            o.3,
            wire >> 20
        );
    }
    Ok(out)
}

type Row = (f64, f64, f64, String);

fn send_passes(
    ram: &Arc<std::fs::File>,
    senders: &mut [Sender<hostauth::ClientStream>],
    streams: u16,
    passes: &[Pass],
) -> Result<Vec<Row>, String> {
    let mut out = Vec::new();
    for p in passes {
        let t = Instant::now();
        let cpu: Duration = std::thread::scope(|scope| {
            let threads: Vec<_> = senders
                .iter_mut()
                .enumerate()
                .map(|(i, s)| (i, s, ram.clone()))
                .map(|(i, s, ram)| {
                    scope.spawn(move || -> Result<Duration, String> {
                        let c0 = thread_cpu();
                        // Each stream its 2 MiB regions, as `streams::stream_of` deals them.
                        for at in (p.from..p.from + p.len).step_by(CHUNK) {
                            if vireo_migration::streams::stream_of(at as u64, streams) as usize != i
                            {
                                continue;
                            }
                            s.send_run_with(at as u64, CHUNK, |gpa, buf| {
                                ram.read_exact_at(buf, gpa)
                            })
                            .map_err(|e| e.to_string())?;
                        }
                        Ok(thread_cpu() - c0)
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().map_err(|_| "sender panicked".to_string())?)
                .sum::<Result<Duration, String>>()
        })?;
        let secs = t.elapsed().as_secs_f64();
        // Only page data counts toward the rate, as the VMM's link estimate counts it.
        let data = if p.from == 0 { HOT } else { p.len } as f64;
        out.push((
            data / secs / 1e6,
            cpu.as_secs_f64() * 1e6 / (data / (1 << 20) as f64),
            secs * 1e3,
            p.name.to_string(),
        ));
    }
    Ok(out)
}

/// The destination's RAM as the worker's receive threads see it: a shared mapping that page
/// data is copied into (`RamWriter` in the VMM). Touched once before the streams start, so
/// first-touch faults (a separate cost, see docs/migration.md) stay out of the figure.
struct MappedRam(*mut u8);

// SAFETY: the mapping lives as long as `DstRam`, which outlives the receive threads; the
// streams write disjoint 2 MiB regions, as a destination's do.
unsafe impl Send for MappedRam {}

struct DstRam(MappedRam);

// SAFETY: shared only to hand out writers (see `MappedRam`) and to unmap at the end.
unsafe impl Sync for DstRam {}

impl DstRam {
    fn new() -> Result<DstRam, String> {
        // SAFETY: a new anonymous shared mapping we own; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                GUEST,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(DstRam(MappedRam(p.cast())))
    }

    fn writer(&self) -> MappedRam {
        MappedRam(self.0 .0)
    }
}

impl Drop for DstRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used by any thread.
        unsafe { libc::munmap(self.0 .0.cast(), GUEST) };
    }
}

impl vireo_migration::GuestRam for MappedRam {
    fn size(&self) -> u64 {
        GUEST as u64
    }
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        self.write_part(gpa, data)
    }
    fn zero_page(&mut self, gpa: u64) {
        // SAFETY: the receiver checked gpa + 4 KiB against `size`.
        unsafe { std::ptr::write_bytes(self.0.add(gpa as usize), 0, 4096) };
    }
    fn write_run(&mut self, gpa: u64, data: &[u8]) {
        self.write_part(gpa, data)
    }
    fn write_part(&mut self, gpa: u64, data: &[u8]) {
        assert!(
            gpa as usize + data.len() <= GUEST,
            "checked by the receiver"
        );
        // SAFETY: inside the mapping (asserted); `data` is not in it.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.0.add(gpa as usize), data.len())
        };
    }
}

/// `whole_records`: the receivers read each record whole into their buffer before applying
/// it (`Receiver::run`, the destination's path before session 29) instead of copying page
/// data straight from rustls' buffers.
pub fn run(runs: usize, whole_records: bool) -> Result<(), String> {
    let ram = Arc::new(guest()?);
    println!("migration link alone (no VM), loopback, mutual TLS; medians of {runs} runs");
    println!(
        "{:<8} {:<6} | {:>9} {:>14} {:>9} | pass",
        "streams", "codec", "MB/s", "send µs/MiB", "ms"
    );
    for streams in [1u16, 2] {
        for codec in [None, Some(Codec::None), Some(Codec::Lz4)] {
            let mut all: Vec<Vec<(f64, f64, f64, String)>> = Vec::new();
            for _ in 0..runs {
                all.push(measure(&ram, streams, codec, whole_records)?);
            }
            for pass in 0..all[0].len() {
                let med = |f: fn(&(f64, f64, f64, String)) -> f64| {
                    let mut v: Vec<f64> = all.iter().map(|r| f(&r[pass])).collect();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                println!(
                    "{:<8} {:<6} | {:>9.0} {:>14.0} {:>9.1} | {}",
                    streams,
                    codec.map_or("auto", Codec::name),
                    med(|r| r.0),
                    med(|r| r.1),
                    med(|r| r.2),
                    all[all.len() / 2][pass].3
                );
            }
        }
    }
    Ok(())
}
