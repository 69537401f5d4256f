//! NIC teaming: 1–32 host interfaces acting as the switch's one external port. A [`TeamPort`]
//! is a [`FramePort`], so the runtime attaches it like any uplink: `send` picks a member by the
//! distribution, `recv` takes frames from any collecting member (LACPDUs go to the LACP
//! machines, never to the switch), `rx_fd` is an epoll set over all members. A monitor thread
//! polls carrier, runs the LACP timers and sends LACPDUs. See docs/teaming.md.

pub mod distribute;
pub mod lacp;
pub mod lacpdu;
pub mod mac_rewrite;
mod member;

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vireo_netconfig::{
    LacpPeer, LacpRate, LacpStatus, MacAddr, MemberStatus, TeamConfig, TeamConfigError, TeamMode,
    TeamStatus,
};
use vireo_netport::{FramePort, PortError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::frame::Mac;
use distribute::Distributor;
use lacp::LacpMember;
use lacpdu::{is_slow_protocol, state, LacpInfo, Lacpdu};
use mac_rewrite::{Inbound, MacRewrite};
use member::{bump, get, Member};

/// How often the monitor looks at carrier and LACP timers. Carrier loss is also seen at once
/// by a failing send, so this bounds detection only for an idle team or a far-end failure.
const MONITOR_PERIOD: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum TeamError {
    #[error("invalid team: {0}")]
    Config(#[from] TeamConfigError),
    #[error("team member {name:?}: {source} (does the interface exist here?)")]
    Member { name: String, source: io::Error },
    #[error("team epoll set: {0}")]
    Epoll(io::Error),
}

struct TeamState {
    lacp: Vec<LacpMember>,
    dist: Distributor,
    /// Members that transmit (indexes), and per member whether it collects.
    tx: Vec<usize>,
    collecting: Vec<bool>,
    /// Switch-independent: the one member that takes broadcast/multicast (a physical switch
    /// floods them to every member; taking them once avoids duplicates and loops).
    primary: Option<usize>,
    failovers: u64,
    /// Source MACs the team sent recently (ns): a frame arriving with one of them is our own
    /// frame reflected by a far end that is not an aggregate (a flood of a plain switch or
    /// bridge back through another member) and would make the switch learn the VM's MAC on
    /// the uplink. Bounded by [`SENT_MACS`].
    sent: rustc_hash::FxHashMap<Mac, u64>,
    /// Source-MAC rewrite state; `None` when the team does not rewrite.
    rewrite: Option<MacRewrite>,
}

/// Source MACs remembered for reflection checks; a full table is cleared (a missed reflection
/// at worst makes the switch re-learn, it never drops legitimate traffic).
const SENT_MACS: usize = 4096;
/// How long a sent source MAC counts as ours for the reflection check.
const SENT_MAC_TTL_NS: u64 = 5_000_000_000;

struct Inner {
    cfg: TeamConfig,
    name: String,
    members: Vec<Member>,
    member_macs: Vec<Mac>,
    state: Mutex<TeamState>,
    stop: AtomicBool,
    next_rx: AtomicUsize,
    epoch: Instant,
    tx_frames: AtomicU64,
    rx_frames: AtomicU64,
    tx_no_member: AtomicU64,
}

pub struct TeamPort {
    inner: Arc<Inner>,
    epoll: Epoll,
    monitor: Option<JoinHandle<()>>,
}

impl Inner {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn lock(&self) -> MutexGuard<'_, TeamState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Recomputes who transmits and collects from link state and LACP.
    fn recompute(&self, st: &mut TeamState) {
        let up: Vec<bool> = self.members.iter().map(|m| m.up()).collect();
        let n = self.members.len();
        let (tx, collecting): (Vec<usize>, Vec<bool>) = match self.cfg.mode {
            TeamMode::SwitchIndependent => {
                let standby = self
                    .cfg
                    .standby
                    .as_ref()
                    .and_then(|s| self.members.iter().position(|m| &m.name == s));
                let mut tx: Vec<usize> = (0..n).filter(|i| up[*i] && Some(*i) != standby).collect();
                if tx.is_empty() {
                    tx.extend(standby.filter(|s| up[*s]));
                }
                let col = (0..n).map(|i| tx.contains(&i)).collect();
                (tx, col)
            }
            TeamMode::Static => ((0..n).filter(|i| up[*i]).collect(), up.clone()),
            TeamMode::Lacp => (
                (0..n)
                    .filter(|i| up[*i] && st.lacp[*i].distributing())
                    .collect(),
                (0..n).map(|i| up[i] && st.lacp[i].collecting()).collect(),
            ),
        };
        if tx.len() < st.tx.len() || st.tx.iter().any(|m| !tx.contains(m)) {
            st.failovers += 1;
        }
        st.primary = if self.cfg.mode == TeamMode::SwitchIndependent {
            tx.first().copied()
        } else {
            None
        };
        st.tx = tx;
        st.collecting = collecting;
    }

    fn mark_down(&self, i: usize) {
        if self.members[i].link_up.swap(false, Ordering::AcqRel) {
            bump(&self.members[i].counters.link_downs, 1);
            let mut st = self.lock();
            self.recompute(&mut st);
        }
    }

    /// One monitor round: carrier, LACP timers/selection/mux, LACPDU transmission.
    fn monitor_once(&self) {
        let mut changed = false;
        for m in &self.members {
            let c = member::carrier(&m.name);
            if c != m.up() {
                m.link_up.store(c, Ordering::Release);
                if !c {
                    bump(&m.counters.link_downs, 1);
                }
                changed = true;
            }
        }
        let mut st = self.lock();
        if self.cfg.mode == TeamMode::Lacp {
            let now = self.now();
            let before: Vec<u8> = st.lacp.iter().map(|l| l.actor.state).collect();
            for (i, l) in st.lacp.iter_mut().enumerate() {
                l.tick(now);
                if !self.members[i].up() {
                    // A member without link has no partner (802.1AX: port disabled).
                    l.selected = false;
                }
            }
            let up: Vec<bool> = self.members.iter().map(|m| m.up()).collect();
            let mut refs: Vec<&mut LacpMember> = st
                .lacp
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| up[*i])
                .map(|(_, l)| l)
                .collect();
            lacp::select(&mut refs);
            for l in st.lacp.iter_mut() {
                l.update_mux();
            }
            changed |= st
                .lacp
                .iter()
                .zip(&before)
                .any(|(l, b)| l.actor.state != *b);
            for (i, m) in self.members.iter().enumerate() {
                if !m.up() {
                    continue;
                }
                if let Some(pdu) = st.lacp[i].poll_tx(now) {
                    if m.port.send(&pdu.encode(m.mac)).is_err() {
                        bump(&m.counters.tx_errors, 1);
                    }
                }
            }
        }
        if changed {
            self.recompute(&mut st);
        }
    }

    fn on_slow_frame(&self, i: usize, frame: &[u8]) {
        match Lacpdu::decode(frame) {
            Ok(pdu) if self.cfg.mode == TeamMode::Lacp => {
                let now = self.now();
                let mut st = self.lock();
                st.lacp[i].on_pdu(&pdu, now);
            }
            Ok(_) => {}
            Err(_) => bump(&self.members[i].counters.bad_lacpdus, 1),
        }
    }
}

impl TeamPort {
    /// Binds every member (AF_PACKET, in the calling thread's network namespace) and starts
    /// the monitor. `name` is what the runtime and status show.
    pub fn new(name: &str, cfg: TeamConfig) -> Result<TeamPort, TeamError> {
        cfg.validate()?;
        let members = cfg
            .members
            .iter()
            .map(|n| {
                Member::bind(n).map_err(|source| TeamError::Member {
                    name: n.clone(),
                    source,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let epoll = Epoll::new().map_err(TeamError::Epoll)?;
        for (i, m) in members.iter().enumerate() {
            epoll
                .ctl(
                    ControlOperation::Add,
                    m.port.rx_fd(),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(TeamError::Epoll)?;
        }
        let system = members[0].mac;
        let timeout = if cfg.lacp_rate == LacpRate::Fast {
            state::TIMEOUT
        } else {
            0
        };
        let lacp = (0..members.len())
            .map(|i| {
                LacpMember::new(LacpInfo {
                    system_priority: cfg.system_priority,
                    system,
                    key: 1,
                    port_priority: 255,
                    port: i as u16 + 1,
                    state: state::ACTIVITY | state::AGGREGATION | timeout,
                })
            })
            .collect();
        let st = TeamState {
            lacp,
            dist: Distributor::new(cfg.distribution, members.len(), cfg.flowlet_gap_us),
            tx: Vec::new(),
            collecting: vec![false; members.len()],
            primary: None,
            failovers: 0,
            sent: Default::default(),
            rewrite: cfg.rewrites_source_macs().then(MacRewrite::default),
        };
        let inner = Arc::new(Inner {
            name: name.to_string(),
            cfg,
            member_macs: members.iter().map(|m| m.mac).collect(),
            members,
            state: Mutex::new(st),
            stop: AtomicBool::new(false),
            next_rx: AtomicUsize::new(0),
            epoch: Instant::now(),
            tx_frames: AtomicU64::new(0),
            rx_frames: AtomicU64::new(0),
            tx_no_member: AtomicU64::new(0),
        });
        {
            let mut st = inner.lock();
            inner.recompute(&mut st);
            st.failovers = 0;
        }
        let bg = inner.clone();
        let monitor = std::thread::Builder::new()
            .name(format!("team-{name}"))
            .spawn(move || {
                while !bg.stop.load(Ordering::Acquire) {
                    bg.monitor_once();
                    std::thread::sleep(MONITOR_PERIOD);
                }
            })
            .map_err(|e| TeamError::Member {
                name: name.to_string(),
                source: e,
            })?;
        Ok(TeamPort {
            inner,
            epoll,
            monitor: Some(monitor),
        })
    }

    /// Members, their state and counters, and the team's counters.
    pub fn status(&self) -> TeamStatus {
        let i = &self.inner;
        let st = i.lock();
        let members = i
            .members
            .iter()
            .enumerate()
            .map(|(k, m)| {
                let c = &m.counters;
                let l = &st.lacp[k];
                MemberStatus {
                    name: m.name.clone(),
                    link_up: m.up(),
                    distributing: st.tx.contains(&k),
                    collecting: st.collecting[k],
                    tx_frames: get(&c.tx_frames),
                    tx_bytes: get(&c.tx_bytes),
                    tx_errors: get(&c.tx_errors),
                    rx_frames: get(&c.rx_frames),
                    rx_bytes: get(&c.rx_bytes),
                    rx_not_collecting: get(&c.rx_not_collecting),
                    rx_reflected: get(&c.rx_reflected),
                    tx_mac_rewritten: get(&c.tx_mac_rewritten),
                    rx_mac_restored: get(&c.rx_mac_restored),
                    rx_member_mac: get(&c.rx_member_mac),
                    link_downs: get(&c.link_downs),
                    lacp: (i.cfg.mode == TeamMode::Lacp).then(|| LacpStatus {
                        rx_state: l.rx,
                        actor: peer(&l.actor),
                        partner: peer(&l.partner),
                        selected: l.selected,
                        pdus_rx: l.pdus_rx,
                        pdus_tx: l.pdus_tx,
                        bad_pdus: get(&c.bad_lacpdus),
                        partner_changes: l.partner_changes,
                        timeouts: l.timeouts,
                    }),
                }
            })
            .collect();
        TeamStatus {
            name: i.name.clone(),
            mode: i.cfg.mode,
            distribution: i.cfg.distribution,
            source_mac_rewrite: st.rewrite.is_some(),
            members,
            tx_frames: get(&i.tx_frames),
            rx_frames: get(&i.rx_frames),
            tx_no_member: get(&i.tx_no_member),
            failovers: st.failovers,
            flowlets: st.dist.flowlets_started,
            flowlet_moves: st.dist.flowlet_moves,
        }
    }
}

fn peer(i: &LacpInfo) -> LacpPeer {
    LacpPeer {
        system_priority: i.system_priority,
        system: MacAddr(i.system),
        key: i.key,
        port_priority: i.port_priority,
        port: i.port,
        state: i.state,
    }
}

impl Drop for TeamPort {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        if let Some(h) = self.monitor.take() {
            let _ = h.join();
        }
    }
}

thread_local! {
    /// The rewritten copy of a frame (one per sending thread, so no allocation per frame).
    static REWRITE_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A send error that means the member's link is gone (admin down, or the device went away).
fn link_gone(e: &PortError) -> bool {
    matches!(e, PortError::Io(e) if matches!(e.raw_os_error(), Some(libc::ENETDOWN | libc::ENXIO | libc::ENODEV)))
}

impl FramePort for TeamPort {
    fn send(&self, frame: &[u8]) -> Result<(), PortError> {
        let i = &self.inner;
        // Bounded: each failed attempt removes a member from the eligible set.
        for _ in 0..=i.members.len() {
            let (k, rewritten) = {
                let mut st = i.lock();
                if st.tx.is_empty() {
                    break;
                }
                let now = i.now();
                // Switch-independent: broadcast/multicast leave by the primary only, the one
                // member that takes them in (a plain switch floods them back to the others);
                // with source-MAC rewrite, so does everything peers learn addresses from.
                let to_primary = frame.first().is_some_and(|b| b & 1 == 1)
                    || (st.rewrite.is_some() && mac_rewrite::peers_learn_from(frame));
                let k = match st.primary {
                    Some(p) if to_primary => p,
                    _ => {
                        let tx = std::mem::take(&mut st.tx);
                        let k = st.dist.pick(frame, &tx, now);
                        st.tx = tx;
                        k
                    }
                };
                let primary = st.primary;
                let rewritten = match st.rewrite.as_mut() {
                    Some(r) if Some(k) != primary && frame.len() >= 12 => {
                        r.on_rewritten_send(k, frame);
                        true
                    }
                    _ => false,
                };
                if frame.len() >= 12 {
                    if st.sent.len() >= SENT_MACS {
                        st.sent.clear();
                    }
                    // The source as it goes on the wire: that is what a far end reflects.
                    let src = if rewritten {
                        i.member_macs[k]
                    } else {
                        frame[6..12].try_into().unwrap_or_default()
                    };
                    st.sent.insert(src, now);
                }
                (k, rewritten)
            };
            let m = &i.members[k];
            let sent = if rewritten {
                REWRITE_BUF.with(|b| {
                    let mut b = b.borrow_mut();
                    mac_rewrite::rewrite(frame, &m.mac, &mut b);
                    m.port.send(&b)
                })
            } else {
                m.port.send(frame)
            };
            match sent {
                Ok(()) => {
                    bump(&m.counters.tx_frames, 1);
                    bump(&m.counters.tx_bytes, frame.len() as u64);
                    if rewritten {
                        bump(&m.counters.tx_mac_rewritten, 1);
                    }
                    bump(&i.tx_frames, 1);
                    return Ok(());
                }
                Err(e) if link_gone(&e) => {
                    bump(&m.counters.tx_errors, 1);
                    i.mark_down(k);
                }
                Err(e) => {
                    bump(&m.counters.tx_errors, 1);
                    return Err(e);
                }
            }
        }
        bump(&i.tx_no_member, 1);
        // Like a NIC without link: the frame is lost, the port stays.
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<Option<usize>, PortError> {
        let i = &self.inner;
        let n = i.members.len();
        let start = i.next_rx.fetch_add(1, Ordering::Relaxed) % n;
        // Bounded: at most 64 frames consumed (control frames, drops) per call.
        let mut budget = 64;
        let mut k = start;
        let mut empty = 0;
        while empty < n && budget > 0 {
            let m = &i.members[k];
            match m.port.recv(buf) {
                Ok(Some(len)) => {
                    budget -= 1;
                    let f = &buf[..len];
                    if is_slow_protocol(f) {
                        i.on_slow_frame(k, f);
                        continue;
                    }
                    let (collecting, primary, reflected, inbound) = {
                        let st = i.lock();
                        let reflected = len >= 12
                            && st
                                .sent
                                .get(&f[6..12])
                                .is_some_and(|t| i.now().saturating_sub(*t) < SENT_MAC_TTL_NS);
                        let inbound = match &st.rewrite {
                            Some(r) if !reflected => {
                                r.on_recv(k, &mut buf[..len], &i.member_macs, st.primary)
                            }
                            _ => Inbound::Pass,
                        };
                        (st.collecting[k], st.primary, reflected, inbound)
                    };
                    let group = len >= 6 && buf[0] & 1 == 1;
                    if reflected {
                        bump(&m.counters.rx_reflected, 1);
                        continue;
                    }
                    if !collecting || (group && primary.is_some_and(|p| p != k)) {
                        bump(&m.counters.rx_not_collecting, 1);
                        continue;
                    }
                    match inbound {
                        Inbound::Pass => {}
                        Inbound::Restored => bump(&m.counters.rx_mac_restored, 1),
                        Inbound::NotOurs => {
                            bump(&m.counters.rx_member_mac, 1);
                            continue;
                        }
                    }
                    bump(&m.counters.rx_frames, 1);
                    bump(&m.counters.rx_bytes, len as u64);
                    bump(&i.rx_frames, 1);
                    return Ok(Some(len));
                }
                Ok(None) => {
                    empty += 1;
                    k = (k + 1) % n;
                }
                Err(PortError::TooLong { len, cap }) => {
                    return Err(PortError::TooLong { len, cap })
                }
                Err(e) => {
                    // A member's socket error (its link went down) is the member's, not the
                    // team's: the runtime must keep the port.
                    if link_gone(&e) {
                        i.mark_down(k);
                    }
                    empty += 1;
                    k = (k + 1) % n;
                }
            }
        }
        Ok(None)
    }

    fn rx_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn name(&self) -> &str {
        &self.inner.name
    }
}
