//! `map`: which parts of a disk hold data, and which file of the differencing chain holds them
//! (what `qemu-img map` shows).
//!
//! Exact to the sector: in a partially present block of a differencing disk the sector bitmap
//! says which sectors are the child's and which fall through to its parent.

use std::path::PathBuf;

use crate::disk::Chain;
use crate::format::bat;
use crate::{Vhdx, VhdxError};

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
    pub fn map(&self) -> Result<Vec<Extent>, VhdxError> {
        let chain = self.chain();
        let size = chain.virtual_size();
        // Every block size is a power of two, so the smallest one divides all the others: a
        // unit lies inside one block of every file of the chain.
        let unit = chain.iter().map(|l| l.geo.block_size).min().unwrap_or(size);
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |start: u64, length: u64, depth: Option<usize>| match out.last_mut() {
            Some(last) if last.depth == depth && last.start + last.length == start => {
                last.length += length
            }
            _ => out.push(Extent {
                start,
                length,
                data: depth.is_some(),
                depth,
                file: depth.map(|d| chain[d].path.clone()),
            }),
        };
        let mut pos = 0;
        while pos < size {
            let length = unit.min(size - pos);
            resolve(&chain, 0, pos, length, &mut push)?;
            pos += length;
        }
        Ok(out)
    }
}

/// Which file of `chain[from..]` holds each part of `start..start+len` (inside one block of
/// every file), in order, as `push(start, len, depth)`; `None` reads as zeroes.
fn resolve(
    chain: &Chain,
    from: usize,
    start: u64,
    len: u64,
    push: &mut dyn FnMut(u64, u64, Option<usize>),
) -> Result<(), VhdxError> {
    let Some(l) = chain.get(from) else {
        push(start, len, None);
        return Ok(());
    };
    let end = start + len;
    // Past a parent's end reads as zeroes.
    let inside = l.vsize().clamp(start, end);
    if inside < end {
        if inside > start {
            resolve(chain, from, start, inside - start, push)?;
        }
        push(inside, end - inside, None);
        return Ok(());
    }
    let block = start / l.geo.block_size;
    let e = l.bat.read().entries[l.geo.payload_index(block) as usize];
    match bat::state(e) {
        bat::FULLY_PRESENT => push(start, len, Some(from)),
        bat::PARTIALLY_PRESENT if l.geo.differencing => {
            // Sector by sector: set bits are this file's, clear ones fall through.
            let sb = l.bat.read().entries[l.geo.bitmap_index(block) as usize];
            let sb = bat::offset(sb);
            let ls = l.geo.logical_sector;
            let (first, last) = (start / ls, end.div_ceil(ls));
            let mut s = first;
            while s < last {
                let here = chain.bitmap_bit(l, sb, s)?;
                let mut t = s + 1;
                while t < last && chain.bitmap_bit(l, sb, t)? == here {
                    t += 1;
                }
                let (a, b) = ((s * ls).max(start), (t * ls).min(end));
                if here {
                    push(a, b - a, Some(from));
                } else {
                    resolve(chain, from + 1, a, b - a, push)?;
                }
                s = t;
            }
        }
        bat::PARTIALLY_PRESENT => push(start, len, Some(from)),
        bat::NOT_PRESENT | bat::UNDEFINED if l.geo.differencing => {
            resolve(chain, from + 1, start, len, push)?
        }
        _ => push(start, len, None),
    }
    Ok(())
}
