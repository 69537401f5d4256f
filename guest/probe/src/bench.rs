//! Workload commands for benchmarks (docs/probe-protocol.md): `DISK i BENCH`, `NET i BLAST`,
//! `NET i SINK`. The device work lives in virtio/blk_bench.rs and virtio/net_bench.rs; this file
//! parses the arguments, sizes the buffers, and turns TSC ticks into the answer's units.

use core::fmt::Write;

use crate::commands::Probe;
use crate::memory;
use crate::parse;
use crate::reply::Reply;
use crate::virtio::blk::bench::{Pattern, Spec, MAX_QD};
use crate::virtio::blk::Error as BlkError;
use crate::virtio::net::bench::{Limit, Stop, Window, ACK_TIMEOUT_MS};

/// How often a timed blast looks at the console for a byte that ends it.
const STOP_POLL_MS: u64 = 10;

const MIB: u64 = 1 << 20;
/// A sink that has seen frames ends after this long without one.
const SINK_IDLE_MS: u64 = 1000;

/// Latencies in TSC ticks, log-linear buckets (HDR-histogram style): exact below 64 ticks, then
/// 32 buckets per power of two, so a percentile is within ~3 % of the true value.
pub struct Histogram {
    counts: [u32; BUCKETS],
    total: u64,
}

const SUB_BITS: u32 = 5;
const LINEAR: u64 = 2 << SUB_BITS;
const BUCKETS: usize = LINEAR as usize + (64 - SUB_BITS as usize - 1) * (1 << SUB_BITS);

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            total: 0,
        }
    }

    pub fn record(&mut self, v: u64) {
        self.counts[bucket(v)] += 1;
        self.total += 1;
    }

    /// The value (bucket midpoint) at or below which `per_mille`/1000 of the samples lie; for
    /// 99.9 % pass 999.
    pub fn percentile(&self, per_mille: u64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = (self.total * per_mille).div_ceil(1000).max(1);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c as u64;
            if seen >= rank {
                let (lo, width) = bucket_range(i);
                return lo + width / 2;
            }
        }
        0
    }
}

fn bucket(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= SUB_BITS + 1
    let sub = (v >> (e - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    LINEAR as usize + ((e - SUB_BITS - 1) as usize) * (1 << SUB_BITS) + sub as usize
}

/// (lowest value, width) of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if (i as u64) < LINEAR {
        return (i as u64, 1);
    }
    let j = i - LINEAR as usize;
    let e = (j >> SUB_BITS) as u32 + SUB_BITS + 1;
    let sub = (j & ((1 << SUB_BITS) - 1)) as u64;
    let width = 1u64 << (e - SUB_BITS);
    ((1u64 << e) + sub * width, width)
}

/// `DISK <i> BENCH read|write|randread|randwrite <bs> <qd> <seconds> [seed]`.
pub fn disk(p: &mut Probe, index: &[u8], t: &[&[u8]]) -> Result<(), &'static str> {
    const USAGE: &str =
        "usage: DISK i BENCH read|write|randread|randwrite bs qd seconds [seed] [queues=N]";
    let [op, bs, qd, secs, extra @ ..] = t else {
        return Err(USAGE);
    };
    let (op, bs, qd, secs) = (*op, size(bs)?, num(qd)?, num(secs)?);
    // Optional, in any order: a pattern seed and `queues=N` (the queue depth is spread over
    // the disk's first N request queues).
    let (mut seed, mut queues) = (None, 1u64);
    for arg in extra {
        match arg.strip_prefix(b"queues=") {
            Some(n) => queues = num(n)?,
            None if seed.is_none() => seed = Some(num(arg)?),
            None => return Err(USAGE),
        }
    }
    let (write, pattern) = match op {
        b"read" => (false, Pattern::Sequential),
        b"write" => (true, Pattern::Sequential),
        b"randread" => (false, Pattern::Random),
        b"randwrite" => (true, Pattern::Random),
        _ => return Err("bad BENCH operation"),
    };
    if qd == 0
        || qd > MAX_QD as u64
        || bs == 0
        || bs > 64 * MIB
        || secs == 0
        || secs > 3600
        || queues == 0
        || queues > qd
    {
        return Err("range");
    }
    let i = parse::number(index).ok_or("bad disk index")? as usize;
    if p.disks.get(i).is_none_or(|d| d.is_none()) {
        return Err("no such disk");
    }
    // The buffers go at the start of the test RAM (8 MiB on), checked like MEM's ranges.
    let mib = (qd * bs).div_ceil(MIB);
    let (buffers, _) =
        memory::range(&p.info, memory::PROBE_OWNED_END / MIB, mib).map_err(|e| match e {
            memory::Error::NoMemmap => "no memory map",
            memory::Error::Range => "range",
        })?;
    let khz = p.clock().khz();
    let spec = Spec {
        write,
        pattern,
        bs,
        qd: qd as usize,
        ticks: secs * 1000 * khz,
        buffers,
        seed,
        queues: queues as usize,
    };
    let disk = p.disks[i].as_mut().ok_or("no such disk")?;
    let out = match disk.bench(&spec) {
        Ok(o) => o,
        Err(e) => {
            let _ = match e {
                BlkError::Status(s) => write!(p.reply, "ERR status={s}"),
                BlkError::Mismatch(off) => write!(p.reply, "ERR mismatch offset={off}"),
                BlkError::Range => write!(p.reply, "ERR range"),
                BlkError::Timeout => write!(p.reply, "ERR timeout"),
            };
            return Ok(());
        }
    };
    let per_s = |n: u64| (n as u128 * khz as u128 * 1000 / out.ticks as u128) as u64;
    let iops = per_s(out.ios);
    // MiB/s with two decimals: bytes/s * 100 / MiB.
    let mib_s_x100 = per_s(out.bytes) as u128 * 100 / MIB as u128;
    let r = &mut p.reply;
    let _ = write!(
        r,
        "OK iops={iops} mib_s={}.{:02}",
        mib_s_x100 / 100,
        mib_s_x100 % 100
    );
    for (name, pm) in [("p50_us", 500), ("p99_us", 990), ("p999_us", 999)] {
        let _ = write!(r, " {name}=");
        push_us(r, out.hist.percentile(pm), khz);
    }
    let _ = write!(r, " ios={} kicks={}", out.ios, out.kicks);
    Ok(())
}

/// `NET <i> BLAST <size> <count|Ns> <dst mac> [window=<w>]` and
/// `NET <i> SINK <seconds> [<idle ms>] [ack=<k>]`.
pub fn net(p: &mut Probe, index: &[u8], t: &[&[u8]]) -> Result<(), &'static str> {
    let i = parse::number(index).ok_or("bad nic index")? as usize;
    if p.nics.get(i).is_none_or(|n| n.is_none()) {
        return Err("no such nic");
    }
    let khz = p.clock().khz();
    let per_s = |n: u64, ticks: u64| (n as u128 * khz as u128 * 1000 / ticks.max(1) as u128) as u64;
    let (pair, t) = crate::commands::take_pair(t)?;
    let pair = pair.unwrap_or(0);
    match t {
        [b"BLAST", frame_size, limit, mac, rest @ ..] if rest.len() <= 1 => {
            let window = match rest {
                [w] => {
                    let w = num(w
                        .strip_prefix(b"window=")
                        .ok_or("expected window=<frames>")?)?;
                    if w == 0 {
                        return Err("window must be at least 1");
                    }
                    Some(Window {
                        frames: w,
                        timeout: ACK_TIMEOUT_MS * khz,
                    })
                }
                _ => None,
            };
            let size = num(frame_size)? as usize;
            let limit = match limit.strip_suffix(b"s") {
                Some(secs) => Limit::Ticks(num(secs)?.min(3600) * 1000 * khz),
                None => Limit::Frames(num(limit)?),
            };
            let dst = parse_mac(mac).ok_or("bad mac")?;
            // A timed blast ends early on any byte from the console (a test's blast through a
            // migration ends once the move is checked, not after its worst-case length).
            let com = &mut p.com;
            let mut input = || com.try_read().is_some();
            let stop = matches!(limit, Limit::Ticks(_)).then_some(Stop {
                every: STOP_POLL_MS * khz,
                asked: &mut input,
            });
            let nic = p.nics[i].as_mut().ok_or("no such nic")?;
            let nic = nic.tx_pair(pair).map_err(crate::commands::net_error)?;
            let out = nic
                .blast(size, dst, limit, window, stop)
                .map_err(|e| match e {
                    crate::virtio::net::Error::TooLong => "bad frame size",
                    e => crate::commands::net_error(e),
                })?;
            let _ = write!(
                p.reply,
                "OK sent={} frames_s={} bytes_s={} kicks={} acks={} timeouts={}",
                out.sent,
                per_s(out.sent, out.ticks),
                per_s(out.sent * size as u64, out.ticks),
                out.kicks,
                out.acks,
                out.timeouts
            );
        }
        [b"SINK", secs, rest @ ..] if rest.len() <= 2 => {
            let secs = num(secs)?.min(3600);
            let (ack, rest) = match rest.split_last() {
                Some((a, r)) if a.starts_with(b"ack=") => {
                    let k = num(&a[4..])?;
                    if k == 0 {
                        return Err("ack must be at least 1");
                    }
                    (Some(k), r)
                }
                _ => (None, rest),
            };
            // A longer idle lets a sink outlast a pause of the sender (a save and restore).
            let idle_ms = match rest {
                [ms] => num(ms)?.clamp(1, 3_600_000),
                [] => SINK_IDLE_MS,
                _ => return Err("expected SINK <seconds> [<idle ms>] [ack=<k>]"),
            };
            let deadline = p.clock().deadline_ms(secs * 1000);
            let nic = p.nics[i].as_mut().ok_or("no such nic")?;
            // Acks go out on the same pair, so it must be in use.
            let nic = nic.tx_pair(pair).map_err(crate::commands::net_error)?;
            let o = nic.sink(deadline, idle_ms * khz, ack, khz);
            let _ = write!(
                p.reply,
                "OK frames={} bytes={} frames_s={} bytes_s={} lost={} reordered={} other={} kicks={} acks={}",
                o.frames,
                o.bytes,
                per_s(o.frames, o.ticks),
                per_s(o.bytes, o.ticks),
                o.lost,
                o.reordered,
                o.other,
                o.kicks,
                o.acks
            );
        }
        _ => return Err("unknown NET command"),
    }
    Ok(())
}

fn push_us(r: &mut Reply, ticks: u64, khz: u64) {
    let ns = (ticks as u128 * 1_000_000 / khz.max(1) as u128) as u64;
    let _ = write!(r, "{}.{:02}", ns / 1000, (ns % 1000) / 10);
}

fn num(t: &[u8]) -> Result<u64, &'static str> {
    parse::number(t).ok_or("bad number")
}

/// A byte count with an optional K or M suffix (powers of 1024).
fn size(t: &[u8]) -> Result<u64, &'static str> {
    let (digits, unit) = match t.split_last() {
        Some((b'K' | b'k', d)) => (d, 1 << 10),
        Some((b'M' | b'm', d)) => (d, MIB),
        _ => (t, 1),
    };
    num(digits)?.checked_mul(unit).ok_or("bad number")
}

fn parse_mac(t: &[u8]) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in t.split(|&b| b == b':') {
        if n == 6 || part.len() != 2 {
            return None;
        }
        let mut byte = [0u8; 1];
        parse::hex_decode(part, &mut byte)?;
        mac[n] = byte[0];
        n += 1;
    }
    (n == 6).then_some(mac)
}
