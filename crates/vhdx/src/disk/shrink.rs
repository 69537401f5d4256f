//! What a shrink would discard: the first offset past the new end where the disk shows data,
//! looking down the whole chain (an empty child over a parent with data there still shows it).

use crate::disk::Chain;
use crate::format::bat;
use crate::format::MIB;
use crate::layer::Layer;
use crate::VhdxError;

impl Chain {
    /// The first virtual offset in `from..to` where some layer holds data that the top shows
    /// there; `None` when the whole range reads as zero without looking at payload. A layer's
    /// allocated sectors count as data, except in fixed layers (every block allocated), whose
    /// payload is read instead. A layer hides the layers below wherever it holds data or says
    /// zero, and past its own virtual size.
    pub(crate) fn first_data_in(&self, from: u64, to: u64) -> Result<Option<u64>, VhdxError> {
        let mut open = vec![(from, to)];
        for l in self.layers.iter() {
            let mut through = vec![];
            for &(s, e) in &open {
                if let Some(at) = self.layer_data(l, s, e.min(l.vsize()), &mut through)? {
                    return Ok(Some(at));
                }
            }
            if through.is_empty() {
                break;
            }
            open = through;
        }
        Ok(None)
    }

    /// [`Chain::first_data_in`] for one layer over `s..e`; pushes the ranges that read through
    /// to the layer below onto `through`.
    fn layer_data(
        &self,
        l: &Layer,
        s: u64,
        e: u64,
        through: &mut Vec<(u64, u64)>,
    ) -> Result<Option<u64>, VhdxError> {
        let bs = l.geo.block_size;
        let mut pos = s;
        while pos < e {
            let b = pos / bs;
            let end = ((b + 1) * bs).min(e);
            let entry = l.bat.read().entries[l.geo.payload_index(b) as usize];
            match bat::state(entry) {
                bat::FULLY_PRESENT if l.params.leave_blocks_allocated => {
                    if let Some(at) = first_nonzero(l, bat::offset(entry) + pos % bs, end - pos)? {
                        return Ok(Some(pos + at));
                    }
                }
                bat::FULLY_PRESENT => return Ok(Some(pos)),
                bat::PARTIALLY_PRESENT => {
                    let sb = bat::offset(l.bat.read().entries[l.geo.bitmap_index(b) as usize]);
                    let ls = l.geo.logical_sector;
                    let (mut sector, last) = (pos / ls, end.div_ceil(ls));
                    while sector < last {
                        let (bit, n) = self.bitmap_run(l, sb, sector, last)?;
                        if bit {
                            return Ok(Some((sector * ls).max(pos)));
                        }
                        sector += n;
                    }
                    through.push((pos, end));
                }
                bat::NOT_PRESENT | bat::UNDEFINED if l.geo.differencing => through.push((pos, end)),
                _ => {}
            }
            pos = end;
        }
        Ok(None)
    }
}

/// Offset (from `off`) of the first non-zero byte of the file range `off..off+len`.
fn first_nonzero(l: &Layer, off: u64, len: u64) -> Result<Option<u64>, VhdxError> {
    let mut buf = vec![0u8; len.min(MIB) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        let _io = l.space.io_gate(); // until the read is done
        l.io.read_at(&mut buf[..n], off + done)?;
        if let Some(i) = buf[..n].iter().position(|&x| x != 0) {
            return Ok(Some(done + i as u64));
        }
        done += n as u64;
    }
    Ok(None)
}
