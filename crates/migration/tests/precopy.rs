//! A pre-copy migration of a simulated guest over two real socket streams: rounds of dirty
//! pages while the "guest" keeps writing, then a final stop-and-copy with the device state.
//! The destination must end byte-identical, whatever the codec.

use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;

use uuid::Uuid;
use vireo_migration::auto::AutoCompress;
use vireo_migration::preamble::Preamble;
use vireo_migration::receiver::{GuestRam, Receiver};
use vireo_migration::record::Transport;
use vireo_migration::sender::{Compression, Sender};
use vireo_migration::streams::split;
use vireo_migration::{Codec, PAGE_SIZE};

const RAM: usize = 16 << 20;
const STREAMS: u16 = 2;

/// Both receiving streams write into one RAM, as the destination VM's streams do.
struct SharedRam(Arc<Mutex<Vec<u8>>>);

impl GuestRam for SharedRam {
    fn size(&self) -> u64 {
        RAM as u64
    }
    fn write_page(&mut self, gpa: u64, data: &[u8]) {
        self.0.lock().unwrap().write_page(gpa, data)
    }
    fn zero_page(&mut self, gpa: u64) {
        self.0.lock().unwrap().zero_page(gpa)
    }
    fn write_part(&mut self, gpa: u64, data: &[u8]) {
        self.0.lock().unwrap().write_part(gpa, data)
    }
}

/// xorshift: the test's guest writes the same pages on every run.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// The guest runs for a while: dirties `n` pages with text-like (compressible) data, some of
/// them back to zero. Returns the dirty set.
fn guest_runs(ram: &mut [u8], seed: &mut u64, n: usize) -> BTreeSet<u64> {
    let mut dirty = BTreeSet::new();
    for _ in 0..n {
        let page = (next(seed) as usize % (RAM / PAGE_SIZE)) * PAGE_SIZE;
        let v = next(seed);
        let p = &mut ram[page..page + PAGE_SIZE];
        if v.is_multiple_of(5) {
            p.fill(0);
        } else {
            for (i, b) in p.iter_mut().enumerate() {
                *b = b"migrate the guest "[(i + v as usize) % 18];
            }
            p[..8].copy_from_slice(&v.to_le_bytes());
        }
        dirty.insert(page as u64);
    }
    dirty
}

/// `transport` is what both ends are told their stream is (a socket pair either way: the
/// format, not the cipher, is under test).
fn migrate(compression: impl Fn() -> Compression, transport: Transport) {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut src = vec![0u8; RAM];
    guest_runs(&mut src, &mut seed, 2000);
    let dst = Arc::new(Mutex::new(vec![0xAAu8; RAM])); // garbage: every page must be sent
    let session = Uuid::new_v4();

    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for s in 0..STREAMS {
        let (a, b) = UnixStream::pair().unwrap();
        senders.push(
            Sender::start(
                a,
                Preamble::new(session, s, STREAMS),
                compression(),
                transport,
            )
            .unwrap(),
        );
        let ram = SharedRam(dst.clone());
        receivers.push(thread::spawn(move || {
            let mut ram = ram;
            // An authenticated stream is read as the destination reads TLS: buffered, page
            // data copied from the buffer into RAM. 5000 bytes: chunks that end mid-page.
            let mut b = std::io::BufReader::with_capacity(5000, b);
            let mut rx = Receiver::start(&mut b, Some(session), transport).unwrap();
            let stats = match transport {
                Transport::Authenticated => rx.run_buffered(&mut b, &mut ram),
                Transport::Plain => rx.run(&mut b, &mut ram),
            }
            .unwrap();
            (stats, rx.take_device_state())
        }));
    }

    // Round 0: everything; then rounds of what the guest dirtied meanwhile; then stop-and-copy.
    let mut to_send: Vec<u64> = (0..RAM as u64).step_by(PAGE_SIZE).collect();
    for round in 0..4u32 {
        for (s, part) in split(&to_send, STREAMS).into_iter().enumerate() {
            if round == 0 {
                // The full pass as the VMM sends it: runs of consecutive pages read straight
                // into the record (`send_run_with`), here from `src`.
                let mut runs: Vec<(u64, usize)> = Vec::new();
                for &g in &part {
                    match runs.last_mut() {
                        Some((start, len)) if *start + *len as u64 == g => *len += PAGE_SIZE,
                        _ => runs.push((g, PAGE_SIZE)),
                    }
                }
                for (gpa, len) in runs {
                    senders[s]
                        .send_run_with(gpa, len, |g, buf| {
                            buf.copy_from_slice(&src[g as usize..g as usize + buf.len()]);
                            Ok(())
                        })
                        .unwrap();
                }
            } else {
                let pages = part
                    .iter()
                    .map(|&g| (g, &src[g as usize..g as usize + PAGE_SIZE]))
                    .collect::<Vec<_>>();
                senders[s].send_pages(pages).unwrap();
            }
            senders[s].round_end(round, part.len() as u64, 0).unwrap();
        }
        let shrinking = 1500 >> round;
        to_send = guest_runs(&mut src, &mut seed, shrinking)
            .into_iter()
            .collect();
    }
    // Paused: the last dirty pages, then the device state on stream 0.
    for (s, part) in split(&to_send, STREAMS).into_iter().enumerate() {
        let pages = part
            .iter()
            .map(|&g| (g, &src[g as usize..g as usize + PAGE_SIZE]))
            .collect::<Vec<_>>();
        senders[s].send_pages(pages).unwrap();
    }
    // As the VMM ends: the other streams first, then the state and `Done` on stream 0.
    let mut senders = senders.into_iter();
    let first = senders.next().unwrap();
    let mut wire = 0;
    for s in senders {
        wire += s.done().unwrap().1.wire_bytes;
    }
    wire += first
        .state_and_done(br#"{"vcpus":[]}"#, &[])
        .unwrap()
        .1
        .wire_bytes;
    let mut state = None;
    for r in receivers {
        let (stats, st) = r.join().unwrap();
        assert_eq!(stats.rounds, 4);
        state = state.or(st);
    }
    assert_eq!(state.as_deref(), Some(&br#"{"vcpus":[]}"#[..]));
    let dst = dst.lock().unwrap();
    let first_diff = src.iter().zip(dst.iter()).position(|(a, b)| a != b);
    assert_eq!(
        first_diff, None,
        "destination differs at byte {first_diff:?}"
    );
    assert!(wire > 0);
}

#[test]
fn precopy_over_two_streams_leaves_an_identical_copy_uncompressed() {
    migrate(|| Compression::Fixed(Codec::None), Transport::Plain);
}

#[test]
fn precopy_without_page_crcs_on_an_authenticated_stream_leaves_an_identical_copy() {
    migrate(|| Compression::Fixed(Codec::None), Transport::Authenticated);
    migrate(
        || Compression::Auto(AutoCompress::default()),
        Transport::Authenticated,
    );
}

#[test]
fn a_plain_receiver_refuses_page_records_without_a_crc() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let mut tx = Sender::start(
        a,
        Preamble::new(Uuid::new_v4(), 0, 1),
        Compression::Fixed(Codec::None),
        Transport::Authenticated,
    )
    .unwrap();
    tx.send_pages([(0u64, &[1u8; PAGE_SIZE][..])]).unwrap();
    tx.done().unwrap();
    let mut rx = Receiver::start(&mut b, None, Transport::Plain).unwrap();
    let mut ram = vec![0u8; 1 << 16];
    let e = rx.run(&mut b, &mut ram).unwrap_err();
    assert!(e.to_string().contains("without a CRC"), "{e}");
    assert_eq!(ram[0], 0, "nothing of the refused record was applied");
}

#[test]
fn precopy_with_lz4_zstd_and_auto() {
    migrate(|| Compression::Fixed(Codec::Lz4), Transport::Plain);
    migrate(|| Compression::Fixed(Codec::Zstd), Transport::Plain);
    migrate(
        || Compression::Auto(AutoCompress::default()),
        Transport::Plain,
    );
}

#[test]
fn an_abort_and_a_cut_stream_are_errors_for_the_receiver() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let tx = Sender::start(
        a,
        Preamble::new(Uuid::new_v4(), 0, 1),
        Compression::Fixed(Codec::None),
        Transport::Plain,
    )
    .unwrap();
    tx.abort("destination refused").unwrap();
    let mut rx = Receiver::start(&mut b, None, Transport::Plain).unwrap();
    let mut ram = vec![0u8; 1 << 16];
    let e = rx.run(&mut b, &mut ram).unwrap_err();
    assert!(e.to_string().contains("destination refused"), "{e}");

    let (a, mut b) = UnixStream::pair().unwrap();
    let mut tx = Sender::start(
        a,
        Preamble::new(Uuid::new_v4(), 0, 1),
        Compression::Fixed(Codec::None),
        Transport::Plain,
    )
    .unwrap();
    tx.send_pages([(0u64, &[1u8; PAGE_SIZE][..])]).unwrap();
    drop(tx);
    let mut rx = Receiver::start(&mut b, None, Transport::Plain).unwrap();
    assert!(
        rx.run(&mut b, &mut ram).is_err(),
        "a stream without Done is not complete"
    );
    assert_eq!(ram[0], 1, "what arrived was applied");

    let (a, mut b) = UnixStream::pair().unwrap();
    Sender::start(
        a,
        Preamble::new(Uuid::new_v4(), 0, 1),
        Compression::Fixed(Codec::None),
        Transport::Plain,
    )
    .unwrap();
    assert!(
        Receiver::start(&mut b, Some(Uuid::new_v4()), Transport::Plain).is_err(),
        "other session"
    );
}

/// Counts the writes that reach it (the syscalls a socket would take).
struct CountedWrites {
    bytes: Vec<u8>,
    writes: usize,
}

impl std::io::Write for CountedWrites {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.writes += 1;
        self.bytes.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_state_done_and_the_callers_next_line_go_in_one_write_and_stay_readable() {
    let w = CountedWrites {
        bytes: Vec::new(),
        writes: 0,
    };
    let session = Uuid::new_v4();
    let mut tx = Sender::start(
        w,
        Preamble::new(session, 0, 1),
        Compression::Fixed(Codec::None),
        Transport::Authenticated,
    )
    .unwrap();
    tx.send_pages([(0u64, &[7u8; PAGE_SIZE][..])]).unwrap();
    let (before, on_wire) = (tx.get_mut().writes, tx.get_mut().bytes.len() as u64);
    let counted = tx.stats.wire_bytes;
    let state = br#"{"vcpus":[1]}"#;
    let (w, stats) = tx.state_and_done(state, b"DISKS []\nRELEASED\n").unwrap();
    assert_eq!(
        w.writes,
        before + 1,
        "one write for the state, Done and the lines"
    );
    let lines = b"DISKS []\nRELEASED\n".len() as u64;
    assert_eq!(
        stats.wire_bytes - counted + lines,
        w.bytes.len() as u64 - on_wire,
        "the lines are not counted"
    );
    // The receiver reads through a buffer larger than all of it: what follows `Done` stays
    // in that buffer for the caller, as the destination reads its handoff.
    let mut r = std::io::BufReader::with_capacity(1 << 20, &w.bytes[..]);
    let mut rx = Receiver::start(&mut r, Some(session), Transport::Authenticated).unwrap();
    let mut ram = vec![0u8; 1 << 16];
    rx.run_buffered(&mut r, &mut ram).unwrap();
    assert_eq!(ram[..PAGE_SIZE], [7u8; PAGE_SIZE]);
    assert_eq!(rx.take_device_state().as_deref(), Some(&state[..]));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut r, &mut rest).unwrap();
    assert_eq!(rest, "DISKS []\nRELEASED\n");
}
