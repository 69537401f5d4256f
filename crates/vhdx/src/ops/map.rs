//! `map`: which parts of a disk hold data, and which file of the differencing chain holds them
//! (what `qemu-img map` shows).
//!
//! Block granularity: a partially present block of a child is attributed to the child, though
//! some of its sectors may still read from the parent (the sector bitmap is not consulted).

use std::path::PathBuf;

use crate::format::bat;
use crate::Vhdx;

/// One run of the virtual disk that reads the same way.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Extent {
    /// Virtual offset and length in bytes.
    pub start: u64,
    pub length: u64,
    /// False: the run reads as zeroes and no file stores it.
    pub data: bool,
    /// Which file of the chain holds the data: 0 is the disk itself, 1 its parent, ...
    pub depth: Option<usize>,
    pub file: Option<PathBuf>,
}

impl Vhdx {
    /// The whole virtual disk as runs of data (with the file holding them) and zeroes, in
    /// order, adjacent runs of the same kind merged.
    pub fn map(&self) -> Vec<Extent> {
        let chain = self.chain();
        let size = chain.virtual_size();
        // Every block size is a power of two, so the smallest one divides all the others.
        let unit = chain.iter().map(|l| l.geo.block_size).min().unwrap_or(size);
        let bats: Vec<_> = chain.iter().map(|l| l.bat.read().unwrap()).collect();
        let holder = |pos: u64| -> Option<usize> {
            for (depth, l) in chain.iter().enumerate() {
                if pos >= l.vsize() {
                    return None; // past a parent's end reads as zeroes
                }
                let b = pos / l.geo.block_size;
                let e = bats[depth].entries[l.geo.payload_index(b) as usize];
                match bat::state(e) {
                    bat::FULLY_PRESENT | bat::PARTIALLY_PRESENT => return Some(depth),
                    bat::NOT_PRESENT | bat::UNDEFINED if l.geo.differencing => continue,
                    _ => return None,
                }
            }
            None
        };
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = 0;
        while pos < size {
            let length = unit.min(size - pos);
            let depth = holder(pos);
            match out.last_mut() {
                Some(last) if last.depth == depth => last.length += length,
                _ => out.push(Extent {
                    start: pos,
                    length,
                    data: depth.is_some(),
                    depth,
                    file: depth.map(|d| chain[d].path.clone()),
                }),
            }
            pos += length;
        }
        out
    }
}
