//! The COM1 line protocol (docs/probe-protocol.md): one command per line, one `OK`/`ERR` line back.

use core::fmt::Write;

use crate::bootinfo::BootInfo;
use crate::dirty::Dirty;
use crate::reply::Reply;
use crate::serial::Com1;
use crate::time::Clock;
use crate::virtio::blk::{self, Blk};
use crate::virtio::net::{self, Net};
use crate::{arch, memory, parse, status};

pub const MAX_DISKS: usize = 16;
pub const MAX_NICS: usize = 4;
const MAX_TOKENS: usize = 10;

pub struct Probe {
    pub com: Com1,
    pub info: BootInfo,
    pub disks: [Option<Blk>; MAX_DISKS],
    pub disk_count: usize,
    /// The virtio-mmio windows found at start-up; `RESCAN` looks at them again.
    pub slots: crate::rescan::Slots,
    pub nics: [Option<Net>; MAX_NICS],
    pub nic_count: usize,
    pub clock: Option<Clock>,
    pub dirty: Option<Dirty>,
    pub reply: Reply,
    frame: [u8; net::FRAME_MAX],
}

/// What the main loop should do after an answer was sent.
pub enum After {
    Continue,
    PowerOff(u8),
}

impl Probe {
    pub fn new(com: Com1, info: BootInfo) -> Self {
        Probe {
            com,
            info,
            disks: [const { None }; MAX_DISKS],
            disk_count: 0,
            slots: crate::rescan::Slots::new(),
            nics: [const { None }; MAX_NICS],
            nic_count: 0,
            clock: None,
            dirty: None,
            reply: Reply::new(),
            frame: [0; net::FRAME_MAX],
        }
    }

    pub fn clock(&mut self) -> &Clock {
        self.clock.get_or_insert_with(Clock::calibrate)
    }

    /// Runs one command line and sends exactly one answer line.
    pub fn handle(&mut self, line: &[u8]) -> After {
        self.reply.clear();
        let mut tokens: [&[u8]; MAX_TOKENS] = [&[]; MAX_TOKENS];
        let mut n = 0;
        let mut too_many = false;
        for t in line
            .split(|b| b.is_ascii_whitespace())
            .filter(|t| !t.is_empty())
        {
            if n == MAX_TOKENS {
                too_many = true;
                break;
            }
            tokens[n] = t;
            n += 1;
        }
        if n == 0 && !too_many {
            return After::Continue; // blank lines (e.g. to resynchronise) get no answer
        }
        let after = if too_many {
            self.reply.push(b"ERR too many arguments");
            After::Continue
        } else {
            self.dispatch(&tokens[..n])
        };
        self.reply.push(b"\n");
        let Probe { com, reply, .. } = self;
        com.write(reply.as_bytes());
        after
    }

    fn dispatch(&mut self, t: &[&[u8]]) -> After {
        let r = match t {
            [] => unreachable!("empty lines are skipped by handle"),
            [b"PING"] => self.ok("OK PONG"),
            [b"INFO"] => self.info(),
            [b"RESCAN"] => self.rescan(),
            [b"TSC"] => self.tsc(),
            [b"DISK", i, b"BENCH", rest @ ..] => crate::bench::disk(self, i, rest),
            [b"DISK", i, rest @ ..] => self.disk(i, rest),
            [b"MEM", rest @ ..] => self.mem(rest),
            [b"NET", i, b"BLAST" | b"SINK", ..] => crate::bench::net(self, i, &t[2..]),
            [b"NET", i, rest @ ..] => self.net(i, rest),
            [b"DIRTY", rest @ ..] => self.dirty(rest),
            [b"CPUS"] => self.cpus(),
            [b"POWEROFF"] => return self.poweroff(0),
            [b"POWEROFF", s] => match parse::number(s) {
                Some(s) if s <= 255 => return self.poweroff(s as u8),
                _ => Err("bad status"),
            },
            _ => Err("unknown command"),
        };
        if let Err(what) = r {
            self.reply.clear();
            self.reply.push(b"ERR ");
            self.reply.push(what.as_bytes());
        }
        After::Continue
    }

    fn ok(&mut self, text: &str) -> Result<(), &'static str> {
        self.reply.push(text.as_bytes());
        Ok(())
    }

    fn info(&mut self) -> Result<(), &'static str> {
        let (mem, disks, nics, cpus) = (
            self.info.mem_mib(),
            self.disk_count,
            self.nic_count,
            status::online(),
        );
        let _ = write!(
            self.reply,
            "OK mem_mib={mem} disks={disks} nics={nics} cpus={cpus}"
        );
        Ok(())
    }

    fn tsc(&mut self) -> Result<(), &'static str> {
        let (khz, source) = {
            let c = self.clock();
            (c.khz(), c.source().name())
        };
        let _ = write!(self.reply, "OK khz={khz} source={source}");
        Ok(())
    }

    fn disk(&mut self, index: &[u8], rest: &[&[u8]]) -> Result<(), &'static str> {
        let i = parse::number(index).ok_or("bad disk index")? as usize;
        let disk = self
            .disks
            .get_mut(i)
            .and_then(|d| d.as_mut())
            .ok_or("no such disk")?;
        let reply = &mut self.reply;
        let result = match rest {
            [b"INFO"] => {
                let _ = write!(
                    reply,
                    "OK sectors={} ro={} blk_size={}",
                    disk.sectors(),
                    disk.ro as u8,
                    disk.blk_size
                );
                return Ok(());
            }
            [b"WRITE" | b"VERIFY", lba, count, seed] => {
                let (lba, count, seed) = (num(lba)?, num(count)?, num(seed)?);
                let op = if rest[0] == b"WRITE" {
                    blk::Op::Write
                } else {
                    blk::Op::Verify
                };
                disk.pattern_io(op, lba, count, seed)
            }
            [b"FLUSH"] => disk.flush(),
            [b"ID"] => {
                let mut id = [0u8; 20];
                let len = match disk.id(&mut id) {
                    Ok(len) => len,
                    Err(e) => return disk_error(reply, e),
                };
                reply.push(b"OK id=");
                for b in &mut id[..len] {
                    if !b.is_ascii_graphic() {
                        *b = b'?';
                    }
                }
                reply.push(&id[..len]);
                return Ok(());
            }
            _ => return Err("unknown DISK command"),
        };
        match result {
            Ok(()) => {
                reply.push(b"OK");
                Ok(())
            }
            Err(e) => disk_error(reply, e),
        }
    }

    fn mem(&mut self, t: &[&[u8]]) -> Result<(), &'static str> {
        let (op, start, len, seed) = match t {
            [op @ (b"FILL" | b"VERIFY"), s, l, seed] => (*op, num(s)?, num(l)?, Some(num(seed)?)),
            [op @ b"SUM", s, l] => (*op, num(s)?, num(l)?, None),
            _ => return Err("unknown MEM command"),
        };
        let (start, end) = memory::range(&self.info, start, len).map_err(|e| match e {
            memory::Error::NoMemmap => "no memory map",
            memory::Error::Range => "range",
        })?;
        match (op, seed) {
            (b"FILL", Some(seed)) => {
                memory::fill(start, end, seed);
                self.reply.push(b"OK");
            }
            (b"VERIFY", Some(seed)) => match memory::verify(start, end, seed) {
                None => self.reply.push(b"OK"),
                Some(at) => {
                    let _ = write!(self.reply, "ERR mismatch offset={at}");
                }
            },
            _ => {
                let _ = write!(self.reply, "OK sum={:016x}", memory::fnv1a(start, end));
            }
        }
        Ok(())
    }

    fn net(&mut self, index: &[u8], rest: &[&[u8]]) -> Result<(), &'static str> {
        let i = parse::number(index).ok_or("bad nic index")? as usize;
        if self.nics.get(i).is_none_or(|n| n.is_none()) {
            return Err("no such nic");
        }
        let (pair, rest) = take_pair(rest)?;
        let p = pair.unwrap_or(0);
        match rest {
            [b"MAC"] if pair.is_none() => {
                let m = self.nics[i].as_ref().map(|n| n.mac).unwrap_or_default();
                let _ = write!(
                    self.reply,
                    "OK mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                );
            }
            [b"PAIRS", count @ ..] if pair.is_none() && count.len() <= 1 => {
                let nic = self.nics[i].as_mut().ok_or("no such nic")?;
                if let [n] = count {
                    nic.set_pairs(num(n)? as usize).map_err(net_error)?;
                }
                let (active, set_up) = nic.pair_counts();
                let _ = write!(self.reply, "OK pairs={active} max={set_up}");
            }
            [b"SEND", hex] => {
                let len = parse::hex_decode(hex, &mut self.frame).ok_or("bad frame")?;
                let nic = self.nics[i].as_mut().ok_or("no such nic")?;
                let pair = nic.tx_pair(p).map_err(net_error)?;
                pair.send(&self.frame[..len]).map_err(net_error)?;
                self.reply.push(b"OK");
            }
            [b"RECV", timeout_ms] => {
                let deadline = self.clock().deadline_ms(num(timeout_ms)?);
                let Probe { nics, reply, .. } = self;
                let nic = nics[i].as_mut().ok_or("no such nic")?;
                let pair = nic.rx_pair(p).map_err(net_error)?;
                let got = pair.recv(deadline, |frame| {
                    reply.push(b"OK ");
                    reply.push_hex(frame);
                });
                if got.is_none() {
                    reply.push(b"ERR timeout");
                }
            }
            [b"ECHO", count, timeout_ms] => {
                let (count, timeout_ms) = (num(count)?, num(timeout_ms)?);
                let deadline = self.clock().deadline_ms(timeout_ms);
                let Probe { nics, frame, .. } = self;
                let nic = nics[i].as_mut().ok_or("no such nic")?;
                let pair = nic.tx_pair(p).map_err(net_error)?;
                let mut echoed = 0u64;
                while echoed < count {
                    let Some(len) = pair.recv(deadline, |f| {
                        frame[..f.len()].copy_from_slice(f);
                        f.len()
                    }) else {
                        break;
                    };
                    if len >= 12 {
                        let mut macs = [0u8; 12];
                        macs.copy_from_slice(&frame[..12]);
                        frame[..6].copy_from_slice(&macs[6..]);
                        frame[6..12].copy_from_slice(&macs[..6]);
                    }
                    pair.send(&frame[..len]).map_err(net_error)?;
                    echoed += 1;
                }
                let _ = write!(self.reply, "OK echoed={echoed}");
            }
            _ => return Err("unknown NET command"),
        }
        Ok(())
    }

    fn dirty(&mut self, t: &[&[u8]]) -> Result<(), &'static str> {
        match t {
            [b"START", s, l, rate] => {
                let (s, l, rate) = (num(s)?, num(l)?, num(rate)?);
                let (start, end) = memory::range(&self.info, s, l).map_err(|e| match e {
                    memory::Error::NoMemmap => "no memory map",
                    memory::Error::Range => "range",
                })?;
                let khz = self.clock().khz();
                self.dirty = Some(Dirty::new(start, end, rate, khz));
                self.reply.push(b"OK");
            }
            [b"STOP"] => {
                let d = self.dirty.take().ok_or("not running")?;
                let _ = write!(self.reply, "OK passes={} pages={}", d.passes, d.written);
            }
            _ => return Err("unknown DIRTY command"),
        }
        Ok(())
    }

    /// Counts the boot vCPU plus every AP whose heartbeat moves within ~50 ms.
    fn cpus(&mut self) -> Result<(), &'static str> {
        let registered = status::online();
        let mut before = [0u64; status::MAX_CPUS];
        for (i, b) in before.iter_mut().enumerate().skip(1) {
            *b = status::heartbeat(i);
        }
        let deadline = self.clock().deadline_ms(50);
        let mut alive = 1u64;
        let mut stalled: Option<usize> = None;
        for (i, &b) in before.iter().enumerate().skip(1) {
            let mut moved = status::heartbeat(i) != b;
            while !moved && b != 0 && arch::rdtsc() < deadline {
                moved = status::heartbeat(i) != b;
                core::hint::spin_loop();
            }
            if moved {
                alive += 1;
            } else if b != 0 {
                stalled.get_or_insert(i);
            }
        }
        match stalled {
            Some(cpu) => {
                let _ = write!(
                    self.reply,
                    "ERR stalled cpu={cpu} online={alive} registered={registered}"
                );
            }
            None => {
                let _ = write!(self.reply, "OK online={alive}");
            }
        }
        Ok(())
    }

    fn poweroff(&mut self, status: u8) -> After {
        self.reply.push(b"OK");
        After::PowerOff(status)
    }
}

fn num(t: &[u8]) -> Result<u64, &'static str> {
    parse::number(t).ok_or("bad number")
}

pub fn net_error(e: net::Error) -> &'static str {
    match e {
        net::Error::TooLong => "frame too long",
        net::Error::Stalled => "tx stalled",
        net::Error::NoPair => "no such pair",
        net::Error::PairOff => "pair not enabled",
        net::Error::Refused => "refused by device",
    }
}

/// Splits a trailing `pair=<p>` (the queue pair a NET command uses; pair 0 without it) off
/// the arguments.
pub fn take_pair<'a, 'b>(
    t: &'a [&'b [u8]],
) -> Result<(Option<usize>, &'a [&'b [u8]]), &'static str> {
    match t.split_last() {
        Some((last, rest)) if last.starts_with(b"pair=") => {
            let p = parse::number(&last[5..]).ok_or("bad pair")?;
            Ok((Some(p as usize), rest))
        }
        _ => Ok((None, t)),
    }
}

fn disk_error(reply: &mut Reply, e: blk::Error) -> Result<(), &'static str> {
    reply.clear();
    let _ = match e {
        blk::Error::Status(s) => write!(reply, "ERR status={s}"),
        blk::Error::Mismatch(off) => write!(reply, "ERR mismatch offset={off}"),
        blk::Error::Range => write!(reply, "ERR range"),
        blk::Error::Timeout => write!(reply, "ERR timeout"),
    };
    Ok(())
}
