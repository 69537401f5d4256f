//! Vectored reads and writes between a VHDX and guest memory (the virtio-blk path): requests
//! inside one fully present block go straight to the file, the rest (absent blocks, block
//! boundaries, a differencing child's inherited data) through the staged path. Random requests
//! split over scattered guest buffers are checked byte for byte against a model, then again
//! after reopening.
mod common;
use common::*;

use vireo_block::{BlockBackend, GuestBuf};
use vireo_vhdx::{CreateOptions, DiskType, Vhdx};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory as _, GuestMemoryMmap, Permissions};

type Mem = GuestMemoryMmap<AtomicBitmap>;

const MIB: u64 = 1 << 20;
const DISK: u64 = 8 * MIB;
const SECTOR: u64 = 512;

/// xorshift64*: seedable test-case picker.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Guest buffers for `len` bytes: 1–3 pieces, each placed after a gap.
fn pieces(rng: &mut Rng, len: u64) -> Vec<(u64, u64)> {
    let n = 1 + rng.below(3).min(len / SECTOR - 1);
    let mut cuts: Vec<u64> = (1..n)
        .map(|_| (1 + rng.below(len / SECTOR - 1)) * SECTOR)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Vec::new();
    let (mut start, mut addr) = (0, 4096 * (1 + rng.below(4)));
    for end in cuts.into_iter().chain([len]) {
        out.push((addr, end - start));
        addr += end - start + 4096 * (1 + rng.below(3));
        start = end;
    }
    out
}

fn slices<'m>(mem: &'m Mem, ps: &[(u64, u64)]) -> Vec<GuestBuf<'m>> {
    ps.iter()
        .flat_map(|&(a, n)| {
            mem.get_slices(GuestAddress(a), n as usize, Permissions::ReadWrite)
                .unwrap()
                .map(|s| s.unwrap())
        })
        .collect()
}

fn run_random(d: &Vhdx, model: &mut [u8], mem: &Mem, seed: u64) {
    let mut rng = Rng(seed);
    for i in 0..300 {
        // Mostly small requests, some up to 2 MiB (across a 1 MiB block boundary).
        let max = if i % 4 == 0 { 4096 } else { 16 };
        let len = (1 + rng.below(max)) * SECTOR;
        let offset = rng.below((DISK - len) / SECTOR + 1) * SECTOR;
        let ps = pieces(&mut rng, len);
        let bufs = slices(mem, &ps);
        if rng.below(2) == 0 {
            let data: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
            let mut at = 0;
            for &(a, n) in &ps {
                mem.write_slice(&data[at..at + n as usize], GuestAddress(a))
                    .unwrap();
                at += n as usize;
            }
            d.write_vectored_at(&bufs, offset).unwrap();
            model[offset as usize..(offset + len) as usize].copy_from_slice(&data);
        } else {
            for &(a, n) in &ps {
                mem.write_slice(&vec![0xee; n as usize], GuestAddress(a))
                    .unwrap();
            }
            d.read_vectored_at(&bufs, offset).unwrap();
            let mut got = Vec::new();
            for &(a, n) in &ps {
                let mut b = vec![0; n as usize];
                mem.read_slice(&mut b, GuestAddress(a)).unwrap();
                got.extend(b);
            }
            assert!(
                got == model[offset as usize..(offset + len) as usize],
                "seed {seed}, request {i}: read of {len} bytes at {offset} differs"
            );
        }
    }
}

#[test]
fn vectored_requests_match_a_model_in_dynamic_and_differencing_disks() {
    let dir = tmpdir();
    let mem = Mem::from_ranges(&[(GuestAddress(0), 16 * MIB as usize)]).unwrap();
    let (p, d) = create(
        dir.path(),
        "base.vhdx",
        &opts(DISK, MIB as u32, DiskType::Dynamic),
    );
    let mut model = vec![0u8; DISK as usize];
    // Half the blocks present before the vectored requests start, so both paths are taken.
    for b in (0..DISK / MIB).step_by(2) {
        let data = pattern(MIB as usize, b as u8);
        d.write(&data, b * MIB).unwrap();
        model[(b * MIB) as usize..((b + 1) * MIB) as usize].copy_from_slice(&data);
    }
    run_random(&d, &mut model, &mem, 0x5eed_0001);
    d.flush().unwrap();
    drop(d);
    let d = reopen(&p);
    assert!(read(&d, 0, DISK as usize) == model, "base after reopen");
    drop(d);

    let child = dir.path().join("child.avhdx");
    let c = Vhdx::create(
        &child,
        &CreateOptions {
            parent: Some(p.clone()),
            disk_type: DiskType::Differencing,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    run_random(&c, &mut model, &mem, 0x5eed_0002);
    drop(c);
    assert!(
        read(&reopen(&child), 0, DISK as usize) == model,
        "child after reopen"
    );
}
