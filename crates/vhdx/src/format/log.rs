//! Log entries (MS-VHDX §2.3): building them for our writes and finding/parsing the active
//! sequence for replay. Pure functions over the in-memory log region.

use super::*;

pub const SECTOR: usize = 4096;
const ENTRY_SIG: &[u8; 4] = b"loge";
const DATA_DESC_SIG: &[u8; 4] = b"desc";
const ZERO_DESC_SIG: &[u8; 4] = b"zero";
const DATA_SECTOR_SIG: &[u8; 4] = b"data";
/// Logs larger than this are refused rather than read into memory.
pub const MAX_LOG: u64 = 256 * MIB;

/// One change recorded in a log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Write these 4096 bytes at this (4 KiB-aligned) file offset.
    Data { offset: u64, data: Vec<u8> },
    /// Write zeroes over `len` bytes at `offset`.
    Zero { offset: u64, len: u64 },
}

#[derive(Clone, Debug)]
pub struct Entry {
    pub position: u64,
    pub length: u64,
    pub tail: u64,
    pub sequence: u64,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
    pub changes: Vec<Change>,
}

/// How many sectors an entry with `pages` data descriptors occupies.
pub fn entry_sectors(pages: usize) -> usize {
    (64 + 32 * pages).div_ceil(SECTOR) + pages
}

/// The most data pages one entry may carry in a log of `log_len` bytes (leaving a sector free).
pub fn max_pages(log_len: u64) -> usize {
    let sectors = (log_len as usize / SECTOR).saturating_sub(1);
    let mut n = sectors;
    while n > 0 && entry_sectors(n) > sectors {
        n -= 1;
    }
    n
}

pub struct EntryFields {
    pub sequence: u64,
    pub tail: u64,
    pub log_guid: Guid,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
}

/// Serialises one entry carrying whole 4 KiB pages `(file offset, bytes)`.
pub fn build_entry(f: &EntryFields, pages: &[(u64, &[u8])]) -> Vec<u8> {
    let desc_sectors = (64 + 32 * pages.len()).div_ceil(SECTOR);
    let total = (desc_sectors + pages.len()) * SECTOR;
    let mut b = vec![0u8; total];
    b[..4].copy_from_slice(ENTRY_SIG);
    put32(&mut b, 8, total as u32);
    put32(&mut b, 12, f.tail as u32);
    put64(&mut b, 16, f.sequence);
    put32(&mut b, 24, pages.len() as u32);
    b[32..48].copy_from_slice(&f.log_guid.0);
    put64(&mut b, 48, f.flushed_file_offset);
    put64(&mut b, 56, f.last_file_offset);
    for (i, (off, data)) in pages.iter().enumerate() {
        debug_assert_eq!(data.len(), SECTOR);
        let d = 64 + 32 * i;
        b[d..d + 4].copy_from_slice(DATA_DESC_SIG);
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[..8]);
        put64(&mut b, d + 16, *off);
        put64(&mut b, d + 24, f.sequence);
        let s = (desc_sectors + i) * SECTOR;
        b[s..s + 4].copy_from_slice(DATA_SECTOR_SIG);
        put32(&mut b, s + 4, (f.sequence >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put32(&mut b, s + 4092, f.sequence as u32);
    }
    let c = checksum(&b, 4);
    put32(&mut b, 4, c);
    b
}

/// Reads `len` bytes of the circular log starting at `pos`, wrapping at the end.
fn circular(log: &[u8], pos: u64, len: u64) -> Vec<u8> {
    let n = log.len() as u64;
    let mut out = Vec::with_capacity(len as usize);
    let mut p = pos % n;
    let mut left = len;
    while left > 0 {
        let take = left.min(n - p);
        out.extend_from_slice(&log[p as usize..(p + take) as usize]);
        left -= take;
        p = (p + take) % n;
    }
    out
}

/// Parses and fully validates the entry at `pos`; `None` if there is no valid entry there.
pub fn parse_entry(log: &[u8], pos: u64, log_guid: Guid) -> Option<Entry> {
    let n = log.len() as u64;
    let hdr = log.get(pos as usize..pos as usize + SECTOR)?;
    if &hdr[..4] != ENTRY_SIG {
        return None;
    }
    let length = le32(hdr, 8) as u64;
    let tail = le32(hdr, 12) as u64;
    let sequence = le64(hdr, 16);
    let count = le32(hdr, 24) as u64;
    if length == 0
        || !length.is_multiple_of(SECTOR as u64)
        || length > n
        || !tail.is_multiple_of(SECTOR as u64)
        || tail >= n
        || sequence == 0
    {
        return None;
    }
    if Guid::from_slice(&hdr[32..]) != log_guid {
        return None;
    }
    let desc_bytes = 64 + 32 * count;
    if desc_bytes > length {
        return None;
    }
    let b = circular(log, pos, length);
    if !checksum_ok(&b, 4) {
        return None;
    }
    let desc_sectors = desc_bytes.div_ceil(SECTOR as u64);
    let mut data_sector = desc_sectors;
    let mut changes = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let d = &b[64 + 32 * i..96 + 32 * i];
        if le64(d, 24) != sequence {
            return None;
        }
        let offset = le64(d, 16);
        if !offset.is_multiple_of(SECTOR as u64) {
            return None;
        }
        if &d[..4] == ZERO_DESC_SIG {
            let len = le64(d, 8);
            if !len.is_multiple_of(SECTOR as u64) || offset.checked_add(len).is_none() {
                return None;
            }
            changes.push(Change::Zero { offset, len });
        } else if &d[..4] == DATA_DESC_SIG {
            let s = (data_sector * SECTOR as u64) as usize;
            let sec = b.get(s..s + SECTOR)?;
            if &sec[..4] != DATA_SECTOR_SIG
                || ((le32(sec, 4) as u64) << 32 | le32(sec, 4092) as u64) != sequence
            {
                return None;
            }
            let mut data = vec![0u8; SECTOR];
            data[..8].copy_from_slice(&d[8..16]);
            data[8..4092].copy_from_slice(&sec[8..4092]);
            data[4092..].copy_from_slice(&d[4..8]);
            changes.push(Change::Data { offset, data });
            data_sector += 1;
        } else {
            return None;
        }
    }
    Some(Entry {
        position: pos,
        length,
        tail,
        sequence,
        flushed_file_offset: le64(hdr, 48),
        last_file_offset: le64(hdr, 56),
        changes,
    })
}

/// Finds the active sequence (MS-VHDX §2.3.3): the valid sequence with the highest sequence
/// number whose entries run contiguously from its tail to its head. Returns its entries in
/// order, or an empty vector when there is nothing to replay.
pub fn active_sequence(log: &[u8], log_guid: Guid) -> Vec<Entry> {
    let n = log.len() as u64;
    let mut heads: Vec<Entry> = (0..n / SECTOR as u64)
        .filter_map(|s| parse_entry(log, s * SECTOR as u64, log_guid))
        .collect();
    heads.sort_by_key(|e| std::cmp::Reverse(e.sequence));
    'candidates: for head in heads {
        let mut seq = vec![];
        let mut pos = head.tail;
        // A sequence can hold at most one entry per sector; bounds the walk on hostile input.
        for _ in 0..=n / SECTOR as u64 {
            let Some(e) = parse_entry(log, pos, log_guid) else {
                continue 'candidates;
            };
            if let Some(prev) = seq.last() {
                let prev: &Entry = prev;
                if e.sequence != prev.sequence + 1 {
                    continue 'candidates;
                }
            }
            let done = e.position == head.position && e.sequence == head.sequence;
            pos = (e.position + e.length) % n;
            seq.push(e);
            if done {
                return seq;
            }
            if seq.last().unwrap().sequence >= head.sequence {
                continue 'candidates;
            }
        }
    }
    vec![]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(seq: u64, tail: u64, g: Guid) -> EntryFields {
        EntryFields {
            sequence: seq,
            tail,
            log_guid: g,
            flushed_file_offset: 8 * MIB,
            last_file_offset: 9 * MIB,
        }
    }

    #[test]
    fn build_parse_and_pick_newest() {
        let g = Guid::random();
        let mut log = vec![0u8; MIB as usize];
        let p1: Vec<u8> = (0..4096).map(|i| i as u8).collect();
        let p2 = vec![0xabu8; 4096];
        let e1 = build_entry(&fields(10, 0, g), &[(3 * MIB, &p1)]);
        log[..e1.len()].copy_from_slice(&e1);
        let e2 = build_entry(
            &fields(11, e1.len() as u64, g),
            &[(3 * MIB + 4096, &p2), (3 * MIB, &p2)],
        );
        log[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
        let seq = active_sequence(&log, g);
        assert_eq!(seq.len(), 1);
        assert_eq!(seq[0].sequence, 11);
        assert_eq!(
            seq[0].changes[0],
            Change::Data {
                offset: 3 * MIB + 4096,
                data: p2.clone()
            }
        );
        // A different log GUID sees nothing; a torn newest entry falls back to the older one.
        assert!(active_sequence(&log, Guid::random()).is_empty());
        log[e1.len() + 5000] ^= 1;
        let seq = active_sequence(&log, g);
        assert_eq!(seq[0].sequence, 10);
        assert_eq!(
            seq[0].changes,
            vec![Change::Data {
                offset: 3 * MIB,
                data: p1
            }]
        );
    }

    #[test]
    fn multi_entry_sequence_from_tail() {
        let g = Guid::random();
        let mut log = vec![0u8; MIB as usize];
        let p = vec![1u8; 4096];
        let e1 = build_entry(&fields(5, 0, g), &[(2 * MIB, &p)]);
        let e2 = build_entry(&fields(6, 0, g), &[(2 * MIB + 4096, &p)]);
        log[..e1.len()].copy_from_slice(&e1);
        log[e1.len()..e1.len() + e2.len()].copy_from_slice(&e2);
        let seq = active_sequence(&log, g);
        assert_eq!(
            seq.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            vec![5, 6]
        );
        assert!(max_pages(MIB) > 200);
    }
}
