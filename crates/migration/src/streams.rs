//! Which stream carries which page. A page dirtied in several pre-copy rounds is sent several
//! times; if its versions could travel on different streams, an old version arriving late
//! would overwrite the newer one. So each page has one home stream, fixed by its address:
//! 2 MiB regions are dealt out to the streams in turn (large enough that a batch of
//! neighbouring pages stays on one stream, small enough that a hot region does not pin the
//! whole dirty set to one link).

pub const REGION_SHIFT: u32 = 21;

pub fn stream_of(gpa: u64, streams: u16) -> u16 {
    ((gpa >> REGION_SHIFT) % u64::from(streams.max(1))) as u16
}

/// Splits page addresses into one list per stream, keeping their order.
pub fn split(gpas: &[u64], streams: u16) -> Vec<Vec<u64>> {
    let mut out = vec![Vec::new(); usize::from(streams.max(1))];
    for &g in gpas {
        out[usize::from(stream_of(g, streams))].push(g);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_always_has_the_same_stream_and_all_streams_get_work() {
        let gpas: Vec<u64> = (0..4096u64).map(|i| i * 4096).collect();
        let parts = split(&gpas, 3);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), gpas.len());
        assert!(parts.iter().all(|p| !p.is_empty()));
        for (s, part) in parts.iter().enumerate() {
            assert!(part.iter().all(|&g| stream_of(g, 3) as usize == s));
        }
        assert_eq!(split(&gpas, 0).len(), 1);
    }
}
