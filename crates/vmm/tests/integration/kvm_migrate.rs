//! Live migration between two VMs of this process over loopback TCP (docs/migration.md): the
//! probe rewrites a hot set while its memory moves; at the switch-over the destination's RAM is
//! byte-identical to the paused source's, the workload's pass counter is the same, and the
//! destination runs on from there. A cancel leaves the source running.
//! (TLS, the disk handoff and the worker processes are `crates/worker/tests/integration/kvm_migrate.rs`.)

use crate::common;

use common::{read, wait_above};

use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vireo_migration::preamble::Preamble;
use vireo_migration::record::Transport;
use vireo_migration::sender::{Compression, Sender};
use vireo_migration::{Codec, Receiver};
use vireo_probe_image::{probe_elf, ProbeConsole};
use vireo_vmm::dirty::LogMode;
use vireo_vmm::state::Identity;
use vireo_vmm::{
    ConsoleConfig, MigrateError, MigrateOutOptions, MigrateShared, Vm, VmConfig, VmExit, VmHandle,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(60);
const PASSES: u64 = 0x80000 + 8;

/// FNV-1a over all guest RAM as the host reads it.
fn host_sum(h: &VmHandle, len: u64) -> u64 {
    let mut buf = vec![0u8; MIB as usize];
    let mut sum = 0xcbf2_9ce4_8422_2325u64;
    let mut at = 0;
    while at < len {
        h.memory().read_slice(&mut buf, GuestAddress(at)).unwrap();
        for &b in &buf {
            sum = (sum ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        at += MIB;
    }
    sum
}

fn build(mem: u64) -> (Vm, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut config = VmConfig::new(probe_elf(), mem, 1);
    config.console = ConsoleConfig::Stream(theirs);
    (Vm::new(config).unwrap(), ours)
}

struct Running {
    h: VmHandle,
    console: ProbeConsole,
    run: std::thread::JoinHandle<vireo_vmm::error::Result<VmExit>>,
}

impl Running {
    fn start(vm: Vm, ours: UnixStream) -> Running {
        let h = vm.handle();
        let console = ProbeConsole::new(ours.try_clone().unwrap(), ours);
        let run = std::thread::spawn(move || vm.run());
        Running { h, console, run }
    }
    fn stop(self) {
        self.h.request_stop();
        assert_eq!(self.run.join().unwrap().unwrap(), VmExit::Stopped);
    }
}

/// `n` connected loopback stream pairs: (source ends, destination ends).
/// The destination's end of a plain link: `receive_migration` reads through a buffer (as
/// rustls' stream is one), its answers go straight to the socket.
struct Buffered(std::io::BufReader<TcpStream>);

impl std::io::Read for Buffered {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::BufRead for Buffered {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.0.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.0.consume(n)
    }
}

impl std::io::Write for Buffered {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.get_mut().flush()
    }
}

fn links(n: u16) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut src = Vec::new();
    let mut dst = Vec::new();
    for _ in 0..n {
        let s = TcpStream::connect(addr).unwrap();
        let (d, _) = l.accept().unwrap();
        for t in [&s, &d] {
            t.set_read_timeout(Some(T)).unwrap();
            t.set_write_timeout(Some(T)).unwrap();
            t.set_nodelay(true).unwrap();
        }
        src.push(s);
        dst.push(d);
    }
    (src, dst)
}

fn senders(src: Vec<TcpStream>, session: uuid::Uuid, codec: Codec) -> Vec<Sender<TcpStream>> {
    let n = src.len() as u16;
    src.into_iter()
        .enumerate()
        .map(|(i, s)| {
            Sender::start(
                s,
                Preamble::new(session, i as u16, n),
                Compression::Fixed(codec),
                Transport::Plain,
            )
            .unwrap()
        })
        .collect()
}

#[test]
fn kvm_migrate_under_dirty_workload_is_exact_at_the_switch_over() {
    exact_at_the_switch_over(LogMode::ClearOnFetch);
}

/// The same with KVM's manual dirty-log protection (each region re-protected right before
/// its copy): a write the clear could have dropped would show as differing RAM.
#[test]
fn kvm_migrate_with_manual_dirty_protection_is_exact_at_the_switch_over() {
    exact_at_the_switch_over(LogMode::ClearAsCopied);
}

fn exact_at_the_switch_over(dirty_log: LogMode) {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let mem = 256 * MIB;
    let (vm, ours) = build(mem);
    let mut a = Running::start(vm, ours);
    a.console.wait_ready(T).unwrap();
    a.console.command("MEM FILL 100 16 7", T).unwrap();
    a.console.command("DIRTY START 16 64 0", T).unwrap();
    let p = wait_above(&a.h, PASSES, 0);
    wait_above(&a.h, PASSES, p);

    // The destination is built before a page moves.
    let (b_vm, b_ours) = build(mem);
    let session = uuid::Uuid::new_v4();
    {
        let (streams, codec) = (2u16, Codec::Zstd);
        let started = Instant::now();
        let (src, dst) = links(streams);
        let shared = MigrateShared::default();
        let recv = std::thread::scope(|scope| {
            let recv = scope.spawn(|| {
                let mut rx = Vec::new();
                for d in dst {
                    let mut d = Buffered(std::io::BufReader::new(d));
                    let r = Receiver::start(&mut d, Some(session), Transport::Plain).unwrap();
                    rx.push((r, d));
                }
                b_vm.receive_migration(rx, &MigrateShared::default())
            });
            let opts = MigrateOutOptions {
                max_downtime: Duration::from_millis(30),
                dirty_log,
                ..Default::default()
            };
            let out = a.h.migrate_out(
                senders(src, session, codec),
                &opts,
                &shared,
                Identity::default(),
                None,
            );
            (out, recv.join().unwrap())
        });
        let (out, recv) = recv;
        let out = out.unwrap();
        let sent_in = out.paused_at.elapsed();
        let (_streams, state) = recv.unwrap();
        let applied = Instant::now();
        b_vm.apply_state(&state).unwrap();
        let apply = applied.elapsed();
        assert!(a.h.is_paused(), "the source stays paused for the handoff");
        assert!(
            a.h.dirty_logging(),
            "the log is not stopped in the pause (a slot re-registration per slot)"
        );
        let total = started.elapsed();
        let sent_sum = host_sum(&a.h, mem);
        let passes = read(&a.h, PASSES);
        eprintln!(
            "256 MiB probe, 64 MiB hot set, {streams} stream(s), {codec:?}, {dirty_log:?}: {} rounds, {} MiB \
             on the wire, {} pages while paused; downtime without the disk handoff (pause -> \
             last Done {:.1} ms + apply {:.1} ms) = {:.1} ms; total {} ms; throttle {}%",
            out.stats.round,
            out.stats.transferred_bytes >> 20,
            out.final_pages,
            sent_in.as_secs_f64() * 1e3,
            apply.as_secs_f64() * 1e3,
            (sent_in + apply).as_secs_f64() * 1e3,
            (total - sent_in).as_millis() + (sent_in + apply).as_millis(),
            out.stats.throttle_percent
        );
        assert!(out.stats.transferred_bytes > 0);
        {
            let bh = b_vm.handle();
            assert_eq!(host_sum(&bh, mem), sent_sum, "destination RAM differs");
            assert_eq!(read(&bh, PASSES), passes, "pass counter differs");
            let mut b = Running::start(b_vm, b_ours);
            b.h.resume().unwrap();
            wait_above(&b.h, PASSES, passes);
            let stop = b.console.command("DIRTY STOP", T).unwrap();
            assert!(stop.starts_with("OK passes="), "{stop}");
            b.console.command("MEM VERIFY 100 16 7", T).unwrap();
            b.stop();
            // As after a failed handoff: the source runs on, its log stopped first.
            a.h.resume().unwrap();
            assert!(
                !a.h.dirty_logging(),
                "a resume stops the log the migration left on"
            );
            wait_above(&a.h, PASSES, passes);
            a.stop();
        }
    }
}

#[test]
fn kvm_migrate_cancelled_leaves_the_source_running() {
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let mem = 64 * MIB;
    let (vm, ours) = build(mem);
    let mut a = Running::start(vm, ours);
    a.console.wait_ready(T).unwrap();
    a.console.command("DIRTY START 16 32 0", T).unwrap();
    wait_above(&a.h, PASSES, 0);
    let session = uuid::Uuid::new_v4();
    let (src, dst) = links(1);
    let shared = MigrateShared::default();
    let out = std::thread::scope(|scope| {
        // A destination that reads slowly, so the source is still copying when cancelled.
        let sink = scope.spawn(move || {
            let mut d = dst.into_iter().next().unwrap();
            let mut buf = [0u8; 4096];
            let deadline = Instant::now() + T;
            while Instant::now() < deadline {
                match std::io::Read::read(&mut d, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        });
        let canceller = scope.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            shared.cancel();
        });
        let opts = MigrateOutOptions {
            max_downtime: Duration::from_millis(1),
            ..Default::default()
        };
        let out = a.h.migrate_out(
            senders(src, session, Codec::None),
            &opts,
            &shared,
            Identity::default(),
            None,
        );
        canceller.join().unwrap();
        sink.join().unwrap();
        out
    });
    assert!(
        matches!(out, Err(MigrateError::Cancelled)),
        "{:?}",
        out.err()
    );
    assert!(!a.h.is_paused());
    let now = read(&a.h, PASSES);
    wait_above(&a.h, PASSES, now);
    assert_eq!(a.console.command("PING", T).unwrap(), "OK PONG");
    a.stop();
}

/// On the hugetlb pool the source skips, unread, the pages not mapped in its own process — but
/// only when every page the RAM file holds is mapped there. A page that only another mapping
/// wrote (a vhost-user back end's, here this test's own) must still arrive.
#[test]
fn kvm_migrate_on_the_pool_carries_a_page_only_another_mapping_wrote() {
    use std::os::fd::AsRawFd;
    use vireo_vmm::memory::{hugetlb, RamBacking, RamKind};
    if !vireo_testkit::require(vireo_testkit::Need::Kvm) {
        return;
    }
    let mem = 64 * MIB;
    // The pool is shared with other tests' VMs: wait for room rather than fail.
    let on_pool = || {
        let deadline = Instant::now() + T;
        loop {
            let (ours, theirs) = UnixStream::pair().unwrap();
            let mut config = VmConfig::new(probe_elf(), mem, 1);
            config.console = ConsoleConfig::Stream(theirs);
            config.ram_backing = RamBacking::HugeTlb;
            match Vm::new(config) {
                Ok(vm) => return Some((vm, ours)),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(_) => return None,
            }
        }
    };
    let Some((vm, ours)) = on_pool() else {
        vireo_testkit::skip("64 MiB free in the 2 MiB hugetlb pool (/proc/sys/vm/nr_hugepages)");
        return;
    };
    let mut a = Running::start(vm, ours);
    a.console.wait_ready(T).unwrap();
    assert_eq!(a.h.ram_kind(), RamKind::HugeTlb);
    a.console.command("DIRTY START 16 8 0", T).unwrap();
    wait_above(&a.h, PASSES, 0);

    // A page at 48 MiB, far from anything the probe touches, written through a second mapping.
    let at = 48 * MIB;
    // SAFETY: a fresh shared mapping of the whole RAM file, unmapped below.
    let other = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            a.h.ram_file().as_raw_fd(),
            0,
        )
    };
    assert_ne!(other, libc::MAP_FAILED);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    // SAFETY: `at + 4096` lies inside the mapping.
    unsafe {
        std::ptr::copy_nonoverlapping(pattern.as_ptr(), (other as *mut u8).add(at as usize), 4096)
    };
    let vmm_view = a.h.memory().get_host_address(GuestAddress(at)).unwrap();
    assert_eq!(
        hugetlb::mapped_here(vmm_view, hugetlb::HUGE_PAGE as usize).unwrap(),
        0,
        "the VMM's own mapping must not show the page (else this test proves nothing)"
    );

    let (b_vm, _b_ours) = build(mem);
    let session = uuid::Uuid::new_v4();
    let (src, dst) = links(1);
    let (out, recv) = std::thread::scope(|scope| {
        let recv = scope.spawn(|| {
            let mut d = Buffered(std::io::BufReader::new(dst.into_iter().next().unwrap()));
            let r = Receiver::start(&mut d, Some(session), Transport::Plain).unwrap();
            b_vm.receive_migration(vec![(r, d)], &MigrateShared::default())
        });
        let out = a.h.migrate_out(
            senders(src, session, Codec::None),
            &MigrateOutOptions::default(),
            &MigrateShared::default(),
            Identity::default(),
            None,
        );
        (out, recv.join().unwrap())
    });
    out.unwrap();
    let (_streams, state) = recv.unwrap();
    b_vm.apply_state(&state).unwrap();
    let mut got = vec![0u8; 4096];
    b_vm.handle()
        .memory()
        .read_slice(&mut got, GuestAddress(at))
        .unwrap();
    assert!(
        got == pattern,
        "the page only another mapping wrote did not arrive"
    );
    assert_eq!(
        host_sum(&b_vm.handle(), mem),
        host_sum(&a.h, mem),
        "destination RAM differs"
    );
    // SAFETY: the mapping made above, no longer used.
    unsafe { libc::munmap(other, mem as usize) };
    a.h.resume().unwrap();
    a.stop();
}
