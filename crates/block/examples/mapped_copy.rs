//! Measures what a copy through the image mapping costs with the populate system call in front
//! of it (`MADV_POPULATE_READ`/`_WRITE` on the range, then memcpy: the mapped path before
//! guarded copies) and as `FileMap` does it now (a guarded copy, no system call), on 4 KiB
//! random and 1 MiB sequential requests into a page-cached file.
//!
//! `cargo run --release -p vireo-block --example mapped_copy -- [DIR] [MiB]` (default
//! /var/tmp, 256 MiB); docs/datapath.md "Mapped I/O" quotes its figures.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use vireo_block::{FileMap, GuestBuf};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, Permissions};

const SMALL: usize = 200_000;
const LARGE: usize = 2_000;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| "/var/tmp".into());
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    let path = std::path::Path::new(&dir).join(format!("mapped-copy-{}.img", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let _ = std::fs::remove_file(&path);
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..mib {
        file.write_all_at(&chunk, (i << 20) as u64)?;
    }
    let len = mib << 20;
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 21)]).expect("guest memory");
    let bufs = |n: usize| -> Vec<GuestBuf<'_>> {
        GuestMemory::get_slices(&mem, GuestAddress(0x1000), n, Permissions::Write)
            .expect("guest slices")
            .map(|s| s.expect("guest slice"))
            .collect()
    };
    let small = bufs(4096);
    let large = bufs(1 << 20);
    // SAFETY: a new shared mapping of our own descriptor, of the file's length.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let map = map.cast::<u8>();
    let guest = mem
        .get_host_address(GuestAddress(0x1000))
        .expect("guest address");
    let fm = FileMap::new(&file);

    let blocks = (len / 4096) as u64;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) as usize * 4096
    };
    // Warm both mappings' page tables the same way.
    populated_copy(map, guest, 0, len, libc::MADV_POPULATE_WRITE, true);
    assert!(fm.read(&file, &large, 0));

    for round in 1..=3 {
        println!("round {round}");
        let t = Instant::now();
        for _ in 0..SMALL {
            populated_copy(map, guest, next(), 4096, libc::MADV_POPULATE_READ, false);
        }
        report("4K random read, populate + memcpy", SMALL, t.elapsed());
        let t = Instant::now();
        for _ in 0..SMALL {
            assert!(fm.read(&file, &small, next() as u64));
        }
        report("4K random read, FileMap (guarded copy)", SMALL, t.elapsed());
        // Write-back makes pages clean and write-protected, so writes take write faults
        // (page_mkwrite) as they do between a guest's flushes.
        file.sync_data()?;
        let t = Instant::now();
        for _ in 0..SMALL {
            populated_copy(map, guest, next(), 4096, libc::MADV_POPULATE_WRITE, true);
        }
        report("4K random write, populate + memcpy", SMALL, t.elapsed());
        file.sync_data()?;
        let t = Instant::now();
        for _ in 0..SMALL {
            assert!(fm.write(&file, &small, next() as u64));
        }
        report(
            "4K random write, FileMap (guarded copy)",
            SMALL,
            t.elapsed(),
        );
        let t = Instant::now();
        for i in 0..LARGE {
            let at = (i % mib) << 20;
            populated_copy(map, guest, at, 1 << 20, libc::MADV_POPULATE_READ, false);
        }
        report("1M read, populate + memcpy", LARGE, t.elapsed());
        let t = Instant::now();
        for i in 0..LARGE {
            assert!(fm.read(&file, &large, ((i % mib) << 20) as u64));
        }
        report("1M read, FileMap (guarded copy)", LARGE, t.elapsed());
        file.sync_data()?;
        let t = Instant::now();
        for i in 0..LARGE {
            let at = (i % mib) << 20;
            populated_copy(map, guest, at, 1 << 20, libc::MADV_POPULATE_WRITE, true);
        }
        report("1M write, populate + memcpy", LARGE, t.elapsed());
        file.sync_data()?;
        let t = Instant::now();
        for i in 0..LARGE {
            assert!(fm.write(&file, &large, ((i % mib) << 20) as u64));
        }
        report("1M write, FileMap (guarded copy)", LARGE, t.elapsed());
    }
    drop(fm);
    // SAFETY: our own mapping of `len` bytes.
    unsafe { libc::munmap(map.cast(), len) };
    drop::<File>(file);
    Ok(())
}

/// The old mapped path: populate `at..at+n` of the mapping, then copy.
fn populated_copy(map: *mut u8, guest: *mut u8, at: usize, n: usize, advice: i32, write: bool) {
    let n_copy = n.min(1 << 20);
    // SAFETY: `at..at+n` lies inside the mapping; madvise only faults pages in.
    let rc = unsafe { libc::madvise(map.add(at).cast(), n, advice) };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: both ranges are mapped and populated (the guest side is 2 MiB from 0x1000).
    unsafe {
        if write {
            std::ptr::copy_nonoverlapping(guest, map.add(at), n_copy);
        } else {
            std::ptr::copy_nonoverlapping(map.add(at), guest, n_copy);
        }
    }
}

fn report(what: &str, n: usize, took: Duration) {
    println!(
        "  {what:<42} {:>8.2} us each",
        took.as_secs_f64() * 1e6 / n as f64
    );
}
