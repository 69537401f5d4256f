//! Moves frames between [`FramePort`]s and the pipeline: one thread, epoll over every port's
//! `rx_fd`, frames read in batches and run through the switch under one lock per batch (so
//! policy changes and meter reads from other threads land between batches). Uplink ports get a
//! weighted fair queue that engages when the port pushes back (send reports `Full`), so the
//! minimum-bandwidth weights decide who gets a congested uplink. With
//! `SwitchConfig::fast_path`, TCP flows the pipeline approved between AF_PACKET ports are
//! handed to the kernel ([`crate::fastpath`]); this thread only offers the candidates.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

use vireo_netport::{FramePort, PortError, MAX_FRAME};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{PortRole, RateLimit};
use crate::fastpath::{Candidates, FastPath};
use crate::frame::{Mac, ETH_P_IPV4, ETH_P_IPV6, IPPROTO_TCP};
use crate::meter::DropReason;
use crate::rate::TokenBucket;
use crate::switch::{render, Bytes, Delivery, Switch};
use crate::uplink::gro::coalesce_batch;
use crate::uplink::offload::{
    accepted_by, finish_checksum, fits, resolve, segment, wire_len, VnetHdr, GSO_ECN, GSO_NONE,
};
use crate::uplink::PacketPort;
use crate::wfq::WeightedFairQueue;
use crate::PortId;

/// Frames read from one port before the next port gets a turn.
const BATCH: usize = 64;
/// Frames per source waiting for a congested uplink.
const UPLINK_QUEUE: usize = 1024;
const WAKE_TOKEN: u64 = u64::MAX;
/// Receive buffer: a 64 KiB TCP super-frame from an offload port, plus headers.
const RX_BUF: usize = 65536 + 64;

/// A frame port as the runtime holds it; AF_PACKET ports are read a batch per system call,
/// and offload ones also move 64 KiB super-frames.
#[derive(Clone)]
struct Attached {
    port: Arc<dyn FramePort>,
    packet: Option<Arc<PacketPort>>,
    offload: Option<Arc<PacketPort>>,
}

enum Control {
    Attach(PortId, Attached),
    Detach(PortId),
    /// Frames to run through the pipeline as if port `PortId` had sent them.
    Inject(PortId, Vec<Vec<u8>>),
}

/// A running switch: the pipeline plus the thread that feeds it.
pub struct SwitchRuntime {
    switch: Arc<Mutex<Switch>>,
    ctl: mpsc::Sender<Control>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// The kernel fast path (when `SwitchConfig::fast_path` is on).
    fast: Option<FastPath>,
}

/// Gives a receive buffer back its full length without zeroing 64 KiB again for every frame.
fn restore_len(buf: &mut Vec<u8>) {
    if buf.capacity() >= RX_BUF {
        // SAFETY: every receive buffer is allocated by `vec![0u8; RX_BUF]` and afterwards only
        // truncated and written in place by this module and the pipeline (no filter extension
        // is registered, so no other code had the Vec): all RX_BUF bytes of the allocation are
        // still initialised.
        unsafe { buf.set_len(RX_BUF) }
    } else {
        buf.resize(RX_BUF, 0);
    }
}

/// Locks the switch, surviving a panicked holder (the switch state stays usable).
pub fn lock(sw: &Mutex<Switch>) -> MutexGuard<'_, Switch> {
    sw.lock().unwrap_or_else(|p| p.into_inner())
}

impl SwitchRuntime {
    pub fn start(switch: Arc<Mutex<Switch>>) -> io::Result<Self> {
        let (ctl, rx) = mpsc::channel();
        let wake = EventFd::new(EFD_NONBLOCK)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut worker = Worker::new(switch.clone(), rx, wake.try_clone()?, stop.clone())?;
        let fast = if lock(&switch).fast_path_enabled() {
            Some(FastPath::start(switch.clone(), worker.start)?)
        } else {
            None
        };
        worker.offload = fast.as_ref().map(|f| Offload {
            candidates: f.candidates(),
            seen: HashSet::new(),
            generation: u64::MAX,
        });
        let thread = std::thread::Builder::new()
            .name("vswitch".into())
            .spawn(move || {
                // Ahead of spinning vCPU threads when a kick wakes it (`priority.rs`); without
                // the privilege it runs at the nice it inherited.
                let _ = crate::priority::prioritize_current_thread();
                worker.run()
            })?;
        Ok(SwitchRuntime {
            switch,
            ctl,
            wake,
            stop,
            thread: Some(thread),
            fast,
        })
    }

    /// Flows the kernel currently forwards for this switch.
    pub fn offloaded_flows(&self) -> Vec<crate::fastpath::FlowKey> {
        self.fast.as_ref().map(|f| f.flows()).unwrap_or_default()
    }

    pub fn switch(&self) -> &Arc<Mutex<Switch>> {
        &self.switch
    }

    /// Connects a frame port to switch port `id` (which must exist in the switch).
    pub fn attach(&self, id: PortId, port: Arc<dyn FramePort>) {
        if let Some(f) = &self.fast {
            f.unregister(id);
        }
        let _ = self.ctl.send(Control::Attach(
            id,
            Attached {
                port,
                packet: None,
                offload: None,
            },
        ));
        let _ = self.wake.write(1);
    }

    /// Connects an AF_PACKET port; when it was bound with offload, TCP super-frames cross the
    /// switch whole between offload ports and are segmented in software for the others.
    pub fn attach_packet(&self, id: PortId, port: Arc<PacketPort>) {
        let offload = port.offload().then(|| port.clone());
        if let Some(f) = &self.fast {
            f.register(id, port.clone());
        }
        let _ = self.ctl.send(Control::Attach(
            id,
            Attached {
                port: port.clone(),
                packet: Some(port),
                offload,
            },
        ));
        let _ = self.wake.write(1);
    }

    /// Runs `frames` through the pipeline as if port `id` had sent them (ingress policies,
    /// learning, VLANs, ACLs all apply) and delivers them, on the switch thread. Used to
    /// announce a port whose VM just arrived (`SwitchOp::Announce`). Frames longer than the
    /// receive buffer are dropped.
    pub fn inject(&self, id: PortId, frames: Vec<Vec<u8>>) {
        let _ = self.ctl.send(Control::Inject(id, frames));
        let _ = self.wake.write(1);
    }

    pub fn detach(&self, id: PortId) {
        // The kernel stops forwarding for the port before the switch lets go of it.
        if let Some(f) = &self.fast {
            f.unregister(id);
        }
        let _ = self.ctl.send(Control::Detach(id));
        let _ = self.wake.write(1);
    }

    /// Stops the thread and returns its result.
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.wake.write(1);
        let r = match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("switch thread panicked"))),
            None => Ok(()),
        };
        if let Some(mut f) = self.fast.take() {
            f.stop();
        }
        r
    }
}

impl Drop for SwitchRuntime {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

struct Worker {
    switch: Arc<Mutex<Switch>>,
    ctl: mpsc::Receiver<Control>,
    wake: EventFd,
    stop: Arc<AtomicBool>,
    epoll: Epoll,
    ports: Vec<Option<Attached>>,
    hdrs: Vec<VnetHdr>,
    delivery: Delivery,
    scratch: (Vec<u8>, Vec<u8>),
    uplink_queues: HashMap<PortId, WeightedFairQueue>,
    /// Pacers of uplinks with a configured link rate.
    shapers: HashMap<PortId, (RateLimit, TokenBucket)>,
    rx: Vec<Vec<u8>>,
    tx: Vec<u8>,
    start: Instant,
    offload: Option<Offload>,
    /// The head of the frame being processed, as it arrived (overlay switches only).
    arrived: Vec<u8>,
}

/// Bytes of an arriving overlay frame kept for the tunnel offload verdict: the outer headers
/// and the inner ones it reads.
const ARRIVED_KEPT: usize = 160;

/// The switch thread's side of the fast path: flows already offered (or refused) under the
/// current generation, so each is judged once rather than per frame.
struct Offload {
    candidates: Candidates,
    seen: HashSet<(PortId, PortId, Shape, Mac, Mac)>,
    generation: u64,
}

/// Flows judged per generation before the memory starts over (bounds the set).
const SEEN_LIMIT: usize = 4096;

/// The EtherType of an untagged TCP/IPv4 or TCP/IPv6 frame (the only kind the kernel may
/// forward), checked on the bytes the kernel classifier tests.
/// A frame the fast path might take (TCP over IPv4/IPv6, untagged or with one tag in-band,
/// as AF_PACKET hands it over): its EtherType and connection (addresses, ports), the part of
/// the offload candidate's identity beyond ports and MACs. Flows an ACL decides are single
/// connections, so each new connection is judged once.
type Shape = (u16, u128, u128, u32);

fn offload_shape(frame: &[u8]) -> Option<Shape> {
    let mut at = 12;
    let mut et = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    if et == 0x8100 || et == 0x88a8 {
        at += 4;
        et = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]);
    }
    let l3 = at + 2;
    let word = |o: usize, n: usize| -> Option<u128> {
        let b = frame.get(o..o + n)?;
        Some(b.iter().fold(0u128, |v, x| v << 8 | *x as u128))
    };
    let (src, dst, l4) = match et {
        ETH_P_IPV4 if *frame.get(l3 + 9)? == IPPROTO_TCP => (
            word(l3 + 12, 4)?,
            word(l3 + 16, 4)?,
            l3 + 4 * (*frame.get(l3)? as usize & 0xf),
        ),
        ETH_P_IPV6 if *frame.get(l3 + 6)? == IPPROTO_TCP => {
            (word(l3 + 8, 16)?, word(l3 + 24, 16)?, l3 + 40)
        }
        _ => return None,
    };
    Some((et, src, dst, word(l4, 4).unwrap_or(0) as u32))
}

impl Worker {
    fn new(
        switch: Arc<Mutex<Switch>>,
        ctl: mpsc::Receiver<Control>,
        wake: EventFd,
        stop: Arc<AtomicBool>,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, WAKE_TOKEN),
        )?;
        Ok(Worker {
            switch,
            ctl,
            wake,
            stop,
            epoll,
            ports: Vec::new(),
            uplink_queues: HashMap::new(),
            shapers: HashMap::new(),
            rx: (0..BATCH).map(|_| vec![0u8; RX_BUF]).collect(),
            hdrs: vec![VnetHdr::default(); BATCH],
            delivery: Delivery::default(),
            scratch: (Vec::with_capacity(RX_BUF), Vec::with_capacity(MAX_FRAME)),
            tx: Vec::with_capacity(MAX_FRAME),
            start: Instant::now(),
            offload: None,
            arrived: Vec::with_capacity(ARRIVED_KEPT),
        })
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn control(&mut self) -> io::Result<()> {
        let _ = self.wake.read();
        while let Ok(c) = self.ctl.try_recv() {
            match c {
                Control::Attach(id, port) => {
                    let i = id.0 as usize;
                    if self.ports.len() <= i {
                        self.ports.resize_with(i + 1, || None);
                    }
                    if let Some(old) = self.ports[i].take() {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            old.port.rx_fd(),
                            EpollEvent::default(),
                        );
                    }
                    self.epoll.ctl(
                        ControlOperation::Add,
                        port.port.rx_fd(),
                        EpollEvent::new(EventSet::IN, id.0 as u64),
                    )?;
                    self.ports[i] = Some(port);
                }
                Control::Detach(id) => {
                    if let Some(old) = self.ports.get_mut(id.0 as usize).and_then(|p| p.take()) {
                        let _ = self.epoll.ctl(
                            ControlOperation::Delete,
                            old.port.rx_fd(),
                            EpollEvent::default(),
                        );
                    }
                    self.uplink_queues.remove(&id);
                }
                Control::Inject(id, frames) => self.inject(id, &frames),
            }
        }
        Ok(())
    }

    /// Delivers `frames` as if `ingress` had sent them, a batch at a time.
    fn inject(&mut self, ingress: PortId, frames: &[Vec<u8>]) {
        self.inject_from(ingress, frames, false)
    }

    /// [`Worker::inject`]; `from_packet` as for [`Worker::deliver`].
    fn inject_from(&mut self, ingress: PortId, frames: &[Vec<u8>], from_packet: bool) {
        for chunk in frames.chunks(BATCH) {
            let mut lens = [0usize; BATCH];
            let mut count = 0;
            for f in chunk.iter().filter(|f| !f.is_empty() && f.len() <= RX_BUF) {
                let buf = &mut self.rx[count];
                restore_len(buf);
                buf[..f.len()].copy_from_slice(f);
                lens[count] = f.len();
                self.hdrs[count] = VnetHdr::default();
                count += 1;
            }
            if count > 0 {
                self.deliver(ingress, from_packet, count, &lens, 0);
            }
        }
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::default(); 64];
        let mut last_age = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            let timeout = if self.uplink_queues.values().any(|q| !q.is_empty()) {
                1
            } else {
                100
            };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                if ev.data() == WAKE_TOKEN {
                    self.control()?;
                } else {
                    self.serve(PortId(ev.data() as u16));
                }
            }
            self.drain_uplinks();
            let now = self.now();
            if now - last_age > 1_000_000_000 {
                lock(&self.switch).age(now);
                last_age = now;
            }
        }
        Ok(())
    }

    /// Reads a batch from one port and delivers it.
    fn serve(&mut self, ingress: PortId) {
        let Some(port) = self.ports.get(ingress.0 as usize).and_then(|p| p.clone()) else {
            return;
        };
        let mut lens = [0usize; BATCH];
        let mut count = 0;
        // Frames longer than the receive buffer: consumed whole by the port and dropped, never
        // truncated and forwarded.
        let mut too_long = 0u64;
        if let Some(p) = &port.packet {
            for buf in &mut self.rx {
                if buf.len() != RX_BUF {
                    buf.resize(RX_BUF, 0);
                }
            }
            count = p
                .recv_batch(&mut self.hdrs, &mut self.rx, &mut lens)
                .unwrap_or(0);
            if port.offload.is_some() && count > 1 {
                // Offload ports take super-frames; MTU-sized TCP becomes one (GRO).
                coalesce_batch(&mut self.rx, &mut lens, &mut self.hdrs, count, RX_BUF);
            }
        }
        while port.packet.is_none() && count < BATCH {
            let buf = &mut self.rx[count];
            if buf.len() != RX_BUF {
                buf.resize(RX_BUF, 0);
            }
            let got = match &port.offload {
                Some(p) => p.recv_offload(&mut self.hdrs[count], buf),
                None => {
                    // A VM's NIC (or a TAP with vnet headers) hands over its guest's offload
                    // request; plain ports give an all-zero header.
                    let mut raw = [0u8; vireo_netport::VNET_HDR_LEN];
                    let got = port.port.recv_vnet(&mut raw, buf);
                    self.hdrs[count] = VnetHdr::from_bytes(&raw);
                    got
                }
            };
            match got {
                Ok(Some(n)) => {
                    lens[count] = n;
                    count += 1;
                }
                Ok(None) => break,
                // An oversized frame was consumed and dropped; keep reading.
                Err(PortError::TooLong { .. }) => {
                    too_long += 1;
                    continue;
                }
                Err(_) => break,
            }
        }
        too_long += lens[..count].iter().filter(|n| **n == 0).count() as u64;
        if count == 0 && too_long == 0 {
            return;
        }
        self.deliver(ingress, port.packet.is_some(), count, &lens, too_long);
    }

    /// Runs the `count` frames in `self.rx` (lengths in `lens`; 0 = consumed and dropped as
    /// too long) through the pipeline as sent by `ingress` and delivers them. `from_packet`:
    /// the ingress is an AF_PACKET port (its TCP flows may go to the kernel fast path).
    fn deliver(
        &mut self,
        ingress: PortId,
        from_packet: bool,
        count: usize,
        lens: &[usize; BATCH],
        too_long: u64,
    ) {
        let now = self.now();
        let mut sw = lock(&self.switch);
        for _ in 0..too_long {
            sw.count_drop(ingress, DropReason::Oversize);
        }
        let d = &mut self.delivery;
        // Only filter extensions can touch a frame's Vec beyond its bytes (e.g. reallocate it).
        let untouched = !sw.has_filters();
        let has_overlay = sw.overlay().is_some();
        let mut segments: Vec<Vec<u8>> = Vec::new();
        for (i, len) in lens.iter().enumerate().take(count) {
            if *len == 0 {
                // Too long for the buffer: the port consumed and dropped it.
                continue;
            }
            let frame = &mut self.rx[i];
            frame.truncate(*len);
            let mut hdr = self.hdrs[i];
            if !fits(frame, &hdr) {
                // Offsets outside the frame: no receiver may be handed it, no segmenter can cut it.
                sw.count_drop(ingress, DropReason::Malformed);
                continue;
            }
            if has_overlay && hdr.needs_work() {
                // The overlay rewrites frames in place (50 bytes more or less in front), which
                // the header's offsets would not follow: it gets finished frames. Super-frames
                // (a connection's first data, before the kernel carries it) go as segments.
                if hdr.gso_type & !GSO_ECN != GSO_NONE {
                    let (_, seg) = &mut self.scratch;
                    if !segment(frame, &hdr, seg, |f| segments.push(f.to_vec())) {
                        sw.count_drop(ingress, DropReason::Malformed);
                    }
                    continue;
                }
                if !finish_checksum(frame, &hdr) {
                    sw.count_drop(ingress, DropReason::Malformed);
                    continue;
                }
                hdr = VnetHdr::default();
            }
            let wire = wire_len(frame, &hdr);
            // Overlay frames are rewritten in place: the tunnel verdict needs the outer
            // headers a decapsulated frame arrived with.
            let overlay = self.offload.is_some() && from_packet && sw.overlay().is_some();
            if overlay {
                let n = frame.len().min(ARRIVED_KEPT);
                self.arrived.clear();
                self.arrived.extend_from_slice(&frame[..n]);
            }
            sw.process_sized(ingress, frame, wire, now, d);
            if let (Some(off), true, [e]) = (&mut self.offload, from_packet, &d.egress[..]) {
                let to_packet = self
                    .ports
                    .get(e.port.0 as usize)
                    .and_then(|p| p.as_ref())
                    .is_some_and(|p| p.packet.is_some());
                // An encapsulated frame's connection is the inner one.
                let shape = offload_shape(frame).or_else(|| {
                    overlay
                        .then(|| frame.get(crate::fastpath::tunnel::VXLAN_OVERHEAD..))
                        .flatten()
                        .and_then(offload_shape)
                });
                if let (true, Some(shape)) = (to_packet, shape) {
                    let g = sw.generation();
                    if g != off.generation || off.seen.len() >= SEEN_LIMIT {
                        off.seen.clear();
                        off.generation = g;
                    }
                    let mac = |at: usize| {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(&frame[at..at + 6]);
                        m
                    };
                    let id = (ingress, e.port, shape, mac(6), mac(0));
                    if !off.seen.contains(&id) {
                        let verdict = if overlay {
                            sw.tunnel_offload_verdict(ingress, &self.arrived, frame, d)
                        } else {
                            sw.offload_verdict(ingress, frame, d, now)
                        };
                        match verdict {
                            Ok(key) => {
                                off.seen.insert(id);
                                off.candidates.offer(key, g);
                            }
                            // Learning may still complete: judge again on a later frame.
                            Err(crate::fastpath::NotOffloadable::NotLearned) => {}
                            Err(_) => {
                                off.seen.insert(id);
                            }
                        }
                    }
                }
            }
            for e in &d.egress {
                let Some(out) = self.ports.get(e.port.0 as usize).and_then(|p| p.as_ref()) else {
                    continue;
                };
                let bytes = render(d.bytes(frame, e), e.tag, &mut self.tx);
                // Mirror copies of other bytes than the frame's are complete frames.
                let hdr = match e.bytes {
                    Bytes::Frame => hdr.shifted(bytes.len() as i32 - frame.len() as i32),
                    _ => VnetHdr::default(),
                };
                let uplink = sw.role(e.port) == Some(PortRole::Uplink);
                // A shaped uplink always queues; the drain paces it to its link rate.
                let shaped = uplink && sw.uplink_rate(e.port).is_some();
                let backlogged = shaped
                    || self
                        .uplink_queues
                        .get(&e.port)
                        .is_some_and(|q| !q.is_empty());
                if let (Some(p), false) = (&out.offload, backlogged) {
                    // Offload to offload: the super-frame goes out whole.
                    match p.send_offload(&hdr, bytes) {
                        Ok(()) => continue,
                        Err(PortError::Full) if uplink => {}
                        Err(_) => {
                            sw.count_drop(e.port, DropReason::TxFull);
                            continue;
                        }
                    }
                }
                if hdr.needs_work()
                    && !backlogged
                    && out.offload.is_none()
                    && accepted_by(out.port.offloads(), &hdr)
                {
                    // The receiver (a VM that negotiated the offloads, a TAP with vnet headers)
                    // takes the frame as the sender made it: not segmented, not checksummed.
                    match out.port.send_vnet(&hdr.to_bytes(), bytes) {
                        Ok(()) => continue,
                        Err(PortError::Full) if uplink => {}
                        Err(_) => {
                            sw.count_drop(e.port, DropReason::TxFull);
                            continue;
                        }
                    }
                }
                let (a, b) = &mut self.scratch;
                let queues = &mut self.uplink_queues;
                let sw = &mut *sw;
                let mut enqueue = |f: &[u8], sw: &mut Switch| {
                    let q = queues
                        .entry(e.port)
                        .or_insert_with(|| WeightedFairQueue::new(UPLINK_QUEUE));
                    q.set_weight(ingress, sw.min_weight(ingress));
                    if !q.enqueue(ingress, f.to_vec()) {
                        sw.count_drop(e.port, DropReason::TxFull);
                    }
                };
                // Once an uplink has a backlog, new frames queue behind it so the weights,
                // not arrival order, decide what goes next.
                let mut queued = backlogged;
                let ok = resolve(bytes, &hdr, a, b, |f| {
                    if queued {
                        return enqueue(f, sw);
                    }
                    match out.port.send(f) {
                        Ok(()) => {}
                        Err(PortError::Full) if uplink => {
                            queued = true;
                            enqueue(f, sw);
                        }
                        Err(_) => sw.count_drop(e.port, DropReason::TxFull),
                    }
                });
                if !ok {
                    sw.count_drop(e.port, DropReason::Malformed);
                }
            }
        }
        if untouched {
            for buf in &mut self.rx[..count] {
                restore_len(buf);
            }
        }
        // Redirects to stale senders: small and rare, straight onto the uplink.
        if let Some((up, frames)) = sw.take_overlay_frames() {
            if let Some(out) = self.ports.get(up.0 as usize).and_then(|p| p.as_ref()) {
                for f in &frames {
                    if out.port.send(f).is_err() {
                        sw.count_drop(up, DropReason::TxFull);
                    }
                }
            }
        }
        drop(sw);
        if !segments.is_empty() {
            self.inject_from(ingress, &segments, from_packet);
        }
    }

    /// Sends what congested uplinks can take now, in weighted fair order.
    fn drain_uplinks(&mut self) {
        if self.uplink_queues.values().all(|q| q.is_empty()) {
            return;
        }
        let now = self.now();
        let rates: Vec<(PortId, Option<RateLimit>)> = {
            let sw = lock(&self.switch);
            self.uplink_queues
                .keys()
                .map(|id| (*id, sw.uplink_rate(*id)))
                .collect()
        };
        for (id, rate) in rates {
            let Some(out) = self.ports.get(id.0 as usize).and_then(|p| p.as_ref()) else {
                continue;
            };
            let Some(q) = self.uplink_queues.get_mut(&id) else {
                continue;
            };
            let mut shaper = match rate {
                Some(r) => {
                    let s = self.shapers.entry(id).or_insert_with(|| {
                        (
                            r,
                            TokenBucket::for_bits(r.bits_per_sec, r.burst_bytes.max(RX_BUF as u64)),
                        )
                    });
                    if s.0 != r {
                        *s = (
                            r,
                            TokenBucket::for_bits(r.bits_per_sec, r.burst_bytes.max(RX_BUF as u64)),
                        );
                    }
                    Some(&mut s.1)
                }
                None => None,
            };
            while let Some((src, frame)) = q.dequeue() {
                if let Some(b) = shaper.as_mut() {
                    if !b.take(frame.len() as u64, now) {
                        q.push_front(src, frame);
                        break;
                    }
                }
                if let Err(PortError::Full) = out.port.send(&frame) {
                    q.push_front(src, frame);
                    break;
                }
            }
        }
    }
}
