//! Page batches, the body of a [`Kind::Pages`](crate::record::Kind) record:
//!
//! ```text
//! count u32 | count × entry u64 | data of every non-zero page, in entry order (4 KiB each)
//! entry = guest-physical address | 1 if the page is all zeroes
//! ```
//! Addresses are page-aligned, so bit 0 is free for the zero marker: a zero page costs 8
//! bytes on the wire instead of 4 KiB (a freshly booted guest is mostly zeroes, and so is
//! memory a balloon gave back).

use crate::{MigrationError, PAGE_SIZE};

/// At most this many pages per batch: 8 MiB of data, well inside a record's limit, and small
/// enough that one batch never holds a stream up for long.
pub const MAX_PAGES: usize = 2048;
const ZERO: u64 = 1;

/// A batch entry: the page's guest-physical address, marked if the page is all zeroes.
pub fn entry(gpa: u64, zero: bool) -> u64 {
    if zero {
        gpa | ZERO
    } else {
        gpa
    }
}

pub fn is_zero_page(page: &[u8]) -> bool {
    // This runs over every page of the VM, so it must be cheap both ways: a page with data
    // usually shows it in its first bytes (early exit after 64 bytes), and an all-zero page
    // is scanned in 64-byte blocks whose words are ORed together (the compiler vectorises
    // the OR; a word-by-word `all` with an exit per word does not).
    let mut blocks = page.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Turns `n` pages read into `buf[data_at..data_at + n * 4 KiB]` into a batch body in place:
/// the caller reserved `4 + 8 * n` bytes before `data_at` (at `data_at - 4 - 8 * n`) for the
/// count and the entries; zero pages are dropped from the data (later pages move down). The
/// pages are consecutive guest pages starting at `gpa`. Returns the body's length (it starts
/// at `data_at - 4 - 8 * n`) and the number of zero pages.
///
/// This is how the sender avoids copying page data: it reads guest RAM straight into the
/// record buffer and frames it where it lies.
pub fn frame_in_place(buf: &mut [u8], data_at: usize, gpa: u64, n: usize) -> (usize, usize) {
    assert!(n <= MAX_PAGES && gpa.is_multiple_of(PAGE_SIZE as u64));
    let body_at = data_at - 4 - 8 * n;
    let mut kept = 0;
    for i in 0..n {
        let from = data_at + i * PAGE_SIZE;
        let zero = is_zero_page(&buf[from..from + PAGE_SIZE]);
        let entry = gpa + (i * PAGE_SIZE) as u64;
        let entry = if zero {
            entry | ZERO
        } else {
            if kept != i {
                buf.copy_within(from..from + PAGE_SIZE, data_at + kept * PAGE_SIZE);
            }
            kept += 1;
            entry
        };
        let e = body_at + 4 + 8 * i;
        buf[e..e + 8].copy_from_slice(&entry.to_le_bytes());
    }
    buf[body_at..body_at + 4].copy_from_slice(&(n as u32).to_le_bytes());
    (4 + 8 * n + kept * PAGE_SIZE, n - kept)
}

/// Frames the `data.len() / 4 KiB` consecutive guest pages at `gpa` without moving their data:
/// writes the count and the entries into `head` (exactly `4 + 8 * n` bytes) and the byte
/// ranges of `data` that hold the non-zero pages, runs of neighbours merged, into `runs`
/// (cleared first). The body is then `head` followed by those ranges. Returns the number of
/// zero pages. For a sender that hands `data` to the cipher as it lies ([`crate::sender`]).
pub fn frame_entries(
    head: &mut [u8],
    gpa: u64,
    data: &[u8],
    runs: &mut Vec<std::ops::Range<usize>>,
) -> usize {
    let n = data.len() / PAGE_SIZE;
    assert!(n <= MAX_PAGES && gpa.is_multiple_of(PAGE_SIZE as u64));
    assert_eq!(head.len(), 4 + 8 * n);
    runs.clear();
    let mut zeros = 0;
    head[..4].copy_from_slice(&(n as u32).to_le_bytes());
    for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
        let mut entry = gpa + (i * PAGE_SIZE) as u64;
        let at = i * PAGE_SIZE;
        if is_zero_page(page) {
            entry |= ZERO;
            zeros += 1;
        } else {
            match runs.last_mut() {
                Some(r) if r.end == at => r.end += PAGE_SIZE,
                _ => runs.push(at..at + PAGE_SIZE),
            }
        }
        head[4 + 8 * i..12 + 8 * i].copy_from_slice(&entry.to_le_bytes());
    }
    zeros
}

/// Writes into `buf[body_at..]` (grown as needed) the body of a batch of `n` consecutive zero
/// pages starting at `gpa`: the count and the entries, no data. Returns the body's length.
pub fn frame_zeros(buf: &mut Vec<u8>, body_at: usize, gpa: u64, n: usize) -> usize {
    assert!(n <= MAX_PAGES && gpa.is_multiple_of(PAGE_SIZE as u64));
    let body_len = 4 + 8 * n;
    if buf.len() < body_at + body_len {
        buf.resize(body_at + body_len, 0);
    }
    buf[body_at..body_at + 4].copy_from_slice(&(n as u32).to_le_bytes());
    for i in 0..n {
        let e = body_at + 4 + 8 * i;
        let entry = (gpa + (i * PAGE_SIZE) as u64) | ZERO;
        buf[e..e + 8].copy_from_slice(&entry.to_le_bytes());
    }
    body_len
}

/// Builds one batch body from `(gpa, page)` pairs (at most [`MAX_PAGES`]).
pub fn encode<'a>(
    pages: impl IntoIterator<Item = (u64, &'a [u8])>,
) -> Result<Vec<u8>, MigrationError> {
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for (gpa, page) in pages {
        if page.len() != PAGE_SIZE || gpa % PAGE_SIZE as u64 != 0 {
            return Err(MigrationError::Malformed(
                "page not 4 KiB or not page-aligned",
            ));
        }
        if entries.len() == MAX_PAGES {
            return Err(MigrationError::Malformed(
                "more pages than a batch may hold",
            ));
        }
        if is_zero_page(page) {
            entries.push(gpa | ZERO);
        } else {
            entries.push(gpa);
            data.extend_from_slice(page);
        }
    }
    let mut body = Vec::with_capacity(4 + entries.len() * 8 + data.len());
    body.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in &entries {
        body.extend_from_slice(&e.to_le_bytes());
    }
    body.extend_from_slice(&data);
    Ok(body)
}

/// One decoded page: its address and its bytes (`None`: all zeroes).
pub type Page<'a> = (u64, Option<&'a [u8]>);

/// Splits a batch body into pages, checking every address against `ram_size` and the data
/// length against the entries before returning anything, so a bad batch applies nothing.
pub fn decode(body: &[u8], ram_size: u64) -> Result<Vec<Page<'_>>, MigrationError> {
    let count_bytes = body
        .get(..4)
        .ok_or(MigrationError::Malformed("batch shorter than its count"))?;
    let count = batch_count(count_bytes.try_into().expect("4 bytes"))?;
    let entries_end = 4 + count * 8;
    let entries = body
        .get(4..entries_end)
        .ok_or(MigrationError::Malformed("batch shorter than its entries"))?;
    let mut checked = Vec::with_capacity(count);
    let data_len = check_entries(entries, ram_size, &mut checked)?;
    check_data_len(body.len() - entries_end, data_len)?;
    let mut data = &body[entries_end..];
    Ok(checked
        .into_iter()
        .map(|(gpa, has_data)| {
            if has_data {
                let (page, rest) = data.split_at(PAGE_SIZE);
                data = rest;
                (gpa, Some(page))
            } else {
                (gpa, None)
            }
        })
        .collect())
}

/// A batch's page count, from its first 4 bytes; more than [`MAX_PAGES`] is refused.
pub(crate) fn batch_count(bytes: [u8; 4]) -> Result<usize, MigrationError> {
    let count = u32::from_le_bytes(bytes) as usize;
    if count > MAX_PAGES {
        return Err(MigrationError::Malformed(
            "more pages than a batch may hold",
        ));
    }
    Ok(count)
}

/// Checks a batch's entries (page-aligned, inside `ram_size`, no unknown bits) into `out` as
/// (address, has data), in entry order. Returns the bytes of page data the entries announce.
pub(crate) fn check_entries(
    entries: &[u8],
    ram_size: u64,
    out: &mut Vec<(u64, bool)>,
) -> Result<usize, MigrationError> {
    out.clear();
    let mut data = 0;
    for e in entries.chunks_exact(8) {
        let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
        let gpa = e & !(PAGE_SIZE as u64 - 1);
        if e & (PAGE_SIZE as u64 - 1) & !ZERO != 0 {
            return Err(MigrationError::Malformed("unknown bits in a page entry"));
        }
        if gpa
            .checked_add(PAGE_SIZE as u64)
            .is_none_or(|end| end > ram_size)
        {
            return Err(MigrationError::PageOutOfRange { gpa, ram_size });
        }
        let has_data = e & ZERO == 0;
        if has_data {
            data += PAGE_SIZE;
        }
        out.push((gpa, has_data));
    }
    Ok(data)
}

/// The data after the entries must be exactly what they announce.
pub(crate) fn check_data_len(have: usize, announced: usize) -> Result<(), MigrationError> {
    if have < announced {
        return Err(MigrationError::Malformed(
            "batch data shorter than its pages",
        ));
    }
    if have > announced {
        return Err(MigrationError::Malformed(
            "batch data longer than its pages",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pages_travel_as_markers() {
        let zero = vec![0u8; PAGE_SIZE];
        let mut full = vec![0u8; PAGE_SIZE];
        full[4095] = 9;
        let body = encode([(0x1000, zero.as_slice()), (0x5000, full.as_slice())]).unwrap();
        assert_eq!(body.len(), 4 + 16 + PAGE_SIZE);
        let pages = decode(&body, 0x10_0000).unwrap();
        assert_eq!(pages, vec![(0x1000, None), (0x5000, Some(full.as_slice()))]);
    }

    #[test]
    fn zero_check_and_in_place_framing_agree_with_encode() {
        let mut pages = vec![vec![0u8; PAGE_SIZE]; 5];
        pages[1][0] = 1;
        pages[3][4095] = 2;
        pages[4][2000] = 3;
        assert!(is_zero_page(&pages[0]) && is_zero_page(&pages[2]));
        assert!(!is_zero_page(&pages[1]) && !is_zero_page(&pages[3]));
        let gpa = 0x20_0000;
        let expected = encode(
            pages
                .iter()
                .enumerate()
                .map(|(i, p)| (gpa + (i * PAGE_SIZE) as u64, p.as_slice())),
        )
        .unwrap();
        let data_at = 100 + 4 + 8 * pages.len();
        let mut buf = vec![0xeeu8; data_at + pages.len() * PAGE_SIZE];
        for (i, p) in pages.iter().enumerate() {
            buf[data_at + i * PAGE_SIZE..][..PAGE_SIZE].copy_from_slice(p);
        }
        let (len, zeros) = frame_in_place(&mut buf, data_at, gpa, pages.len());
        assert_eq!(zeros, 2);
        assert_eq!(&buf[100..100 + len], expected.as_slice());
    }

    #[test]
    fn zero_runs_frame_as_encode_frames_zero_pages() {
        let zero = vec![0u8; PAGE_SIZE];
        let gpa = 0x40_0000;
        let expected =
            encode((0..3).map(|i| (gpa + (i * PAGE_SIZE) as u64, zero.as_slice()))).unwrap();
        let mut buf = vec![0xee; 7];
        let len = frame_zeros(&mut buf, 7, gpa, 3);
        assert_eq!(&buf[7..7 + len], expected.as_slice());
        assert_eq!(decode(&buf[7..7 + len], 1 << 30).unwrap().len(), 3);
    }

    #[test]
    fn out_of_range_unaligned_and_inconsistent_batches_are_refused() {
        let page = vec![1u8; PAGE_SIZE];
        let body = encode([(0x3000, page.as_slice())]).unwrap();
        assert!(matches!(
            decode(&body, 0x3000),
            Err(MigrationError::PageOutOfRange { .. })
        ));
        assert!(decode(&body[..body.len() - 1], 0x10000).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(decode(&longer, 0x10000).is_err());
        let mut odd = body.clone();
        odd[4] |= 0x10; // a bit inside the page offset other than the zero marker
        assert!(decode(&odd, 0x10000).is_err());
        assert!(encode([(0x1001, page.as_slice())]).is_err());
        let mut lying = body.clone();
        lying[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&lying, u64::MAX).is_err());
    }
}
