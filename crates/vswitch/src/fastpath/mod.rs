//! The kernel fast path, like Open vSwitch's datapath: the user-space pipeline decides, the
//! kernel forwards the flows it approved. When the pipeline delivers an untagged TCP frame
//! from one AF_PACKET port to exactly one other AF_PACKET port and nothing about the decision
//! could differ for later frames with the same (ingress port, EtherType, source MAC,
//! destination MAC) — see [`crate::Switch::offload_verdict`] — the runtime hands the flow to
//! an offload thread, which installs on the ingress netdev a `clsact` ingress `cls_bpf`
//! classifier for exactly those frames with a `mirred egress redirect` to the destination
//! netdev, then a socket filter on the switch's AF_PACKET socket that hides them from the
//! switch (taps see frames before tc ingress, so it would forward them a second time).
//! Overlay switches offload bridged VXLAN/IPv4 TCP connections the same way, with classifiers
//! that push or strip the tunnel headers (`tunnel.rs`, judged by
//! [`crate::Switch::tunnel_offload_verdict`]).
//!
//! Correctness rests on one generation counter in the [`crate::Switch`]: every change that
//! could change a verdict bumps it. Policy changes (port config, ports, extensions, meter
//! reset) remove all kernel flows synchronously before they apply; MAC moves and aging (found
//! on the data path, which must not wait on netlink) make the offload thread remove them
//! right after. The offload thread also polls the filters' counters every
//! [`REVALIDATE_EVERY`] and adds them to the ports' meters, and refreshes the source MAC's
//! age for flows that carried traffic.

pub mod checks;
pub mod ebpf;
pub mod flows;
pub mod netlink;
pub mod sockfilter;
#[cfg(test)]
mod tests;
pub mod tunnel;

use std::io;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frame::Mac;
use crate::runtime::lock;
use crate::switch::Switch;
use crate::uplink::PacketPort;
use crate::PortId;

pub use checks::L4Match;
pub use ebpf::TagAction;
pub use flows::Engine;

/// How often the offload thread folds kernel counters into the meters and drops stale flows.
pub const REVALIDATE_EVERY: Duration = Duration::from_millis(500);

/// The inode of the calling thread's network namespace (0 when it cannot be read): ifindexes
/// and netlink requests only mean something within one namespace.
pub fn current_netns() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino())
}

/// One offloaded flow: frames entering `ingress` with this tag (or none), EtherType (IPv4 or
/// IPv6, TCP), MAC pair (and, when ACLs decided, connection) go straight to `egress`, their
/// tag changed by `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub ingress: PortId,
    pub egress: PortId,
    /// The VLAN the frames belong to inside the switch (for refreshing the MAC table).
    pub vid: u16,
    pub ethertype: u16,
    pub src: Mac,
    pub dst: Mac,
    /// The VID of the tag the frames arrive with; `None`: untagged.
    pub tag: Option<u16>,
    pub action: TagAction,
    /// The TCP connection, for flows an ACL decided (its verdict holds per connection).
    pub l4: Option<L4Match>,
    /// The egress port's rate limit, applied by a `tbf` root qdisc on its netdev.
    pub shape: Option<Shape>,
    /// Overlay flows: the encapsulation the kernel adds or removes (`tunnel.rs`); the MACs
    /// and `l4` above are the customer frame's.
    pub tunnel: Option<tunnel::Tunnel>,
}

/// A rate limit the kernel applies to what leaves a port: a token-bucket shaper (`tbf`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub bytes_per_sec: u64,
    pub burst: u32,
}

/// Traffic the kernel forwarded for a flow since it was last accounted. `bytes` are whole
/// Ethernet frames as on the wire (a GSO super-frame counts each of its segments).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowUse {
    pub key: FlowKey,
    pub packets: u64,
    pub bytes: u64,
}

/// Why the pipeline's decision for a frame cannot be handed to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotOffloadable {
    #[error("the fast path is turned off for this switch")]
    Disabled,
    #[error("extensions are registered (they must see every frame)")]
    Extensions,
    #[error("not delivered to exactly one port")]
    NotOneDestination,
    #[error("not TCP over IPv4/IPv6 (guards must see ARP, ND, DHCP, ICMP...)")]
    NotTcp,
    #[error("the frame carries a priority tag or more than one VLAN tag")]
    Tagged,
    #[error("multicast or broadcast destination")]
    NotUnicast,
    #[error("the frame's tag would be rewritten to another VLAN")]
    TagChange,
    #[error("a port is gone")]
    NoSuchPort,
    #[error("a port is a mirror source or destination")]
    Mirror,
    #[error("an ingress rate limit or uplink weights apply")]
    Qos,
    #[error("ACL rules apply to a frame without TCP ports (a fragment)")]
    Acl,
    #[error("source or destination MAC not learned where the frame went")]
    NotLearned,
    #[error("the IP source guard is on (the kernel match has no source address)")]
    SourceGuard,
    #[error("a port has its own MTU (the kernel match has no length)")]
    Mtu,
    #[error("the switch carries an overlay (frames are rewritten, not forwarded as they are)")]
    Overlay,
    #[error(
        "not a bridged TCP/IPv4 connection over VXLAN/IPv4 the policy table vouches for \
         (routed, gateway, NVGRE, IPv6 provider or customer traffic stays in user space)"
    )]
    OverlayFlow,
}

/// What the switch calls when offloaded flows must go (implemented by the runtime's fast path).
pub trait OffloadHook: Send + Sync {
    /// Removes every offloaded flow from the kernel now and returns the traffic they carried
    /// since last accounted.
    fn purge(&self) -> Vec<FlowUse>;
    /// Asks for stale flows to be removed soon (from the data path, which cannot wait).
    fn purge_soon(&self);
}

enum Msg {
    Install(FlowKey, u64),
    PurgeStale,
    Stop,
}

struct Hook {
    engine: Arc<Mutex<Engine>>,
    tx: mpsc::Sender<Msg>,
}

fn lock_engine(e: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    e.lock().unwrap_or_else(|p| p.into_inner())
}

impl OffloadHook for Hook {
    fn purge(&self) -> Vec<FlowUse> {
        lock_engine(&self.engine).purge_all()
    }
    fn purge_soon(&self) {
        let _ = self.tx.send(Msg::PurgeStale);
    }
}

/// The runtime's fast path: the flow engine and the offload thread that feeds it.
///
/// Lock order everywhere: the switch, then the engine (the switch calls [`OffloadHook::purge`]
/// with its lock held).
pub struct FastPath {
    switch: Arc<Mutex<Switch>>,
    engine: Arc<Mutex<Engine>>,
    tx: mpsc::Sender<Msg>,
    thread: Option<JoinHandle<()>>,
}

/// The data-path side: where the switch thread sends candidate flows.
#[derive(Clone)]
pub struct Candidates {
    tx: mpsc::Sender<Msg>,
}

impl Candidates {
    pub fn offer(&self, key: FlowKey, generation: u64) {
        let _ = self.tx.send(Msg::Install(key, generation));
    }
}

impl FastPath {
    /// Starts the offload thread and connects it to the switch. `epoch` is the runtime's
    /// clock origin (MAC table times are nanoseconds since it).
    pub fn start(switch: Arc<Mutex<Switch>>, epoch: Instant) -> io::Result<FastPath> {
        let generation = lock(&switch).generation_counter();
        let engine = Arc::new(Mutex::new(Engine::new(generation)));
        let (tx, rx) = mpsc::channel();
        let hook = Arc::new(Hook {
            engine: engine.clone(),
            tx: tx.clone(),
        });
        let (sw, en) = (switch.clone(), engine.clone());
        let thread = std::thread::Builder::new()
            .name("vswitch-offload".into())
            .spawn(move || offload_thread(sw, en, rx, epoch))?;
        lock(&switch).set_offload_hook(Some(hook));
        Ok(FastPath {
            switch,
            engine,
            tx,
            thread: Some(thread),
        })
    }

    pub fn candidates(&self) -> Candidates {
        Candidates {
            tx: self.tx.clone(),
        }
    }

    /// An AF_PACKET port the kernel may forward from and to.
    pub fn register(&self, id: PortId, port: Arc<PacketPort>) {
        let mut sw = lock(&self.switch);
        let mut en = lock_engine(&self.engine);
        for u in en.unregister(id) {
            sw.account_offloaded(&u, None);
        }
        if let Err(e) = en.register(id, port) {
            eprintln!("vswitch fast path: port {}: {e}", id.0);
        }
    }

    /// Removes the port's flows (both directions) and our tc state on its netdev, now.
    pub fn unregister(&self, id: PortId) {
        let mut sw = lock(&self.switch);
        let mut en = lock_engine(&self.engine);
        for u in en.unregister(id) {
            sw.account_offloaded(&u, None);
        }
    }

    /// Installed flows (for status and tests).
    pub fn flows(&self) -> Vec<FlowKey> {
        lock_engine(&self.engine).flows()
    }

    /// Stops the offload thread and removes everything it installed.
    pub fn stop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut sw = lock(&self.switch);
        sw.set_offload_hook(None);
        let mut en = lock_engine(&self.engine);
        for u in en.shutdown() {
            sw.account_offloaded(&u, None);
        }
    }
}

impl Drop for FastPath {
    fn drop(&mut self) {
        self.stop();
    }
}

fn offload_thread(
    switch: Arc<Mutex<Switch>>,
    engine: Arc<Mutex<Engine>>,
    rx: mpsc::Receiver<Msg>,
    epoch: Instant,
) {
    let mut next = Instant::now() + REVALIDATE_EVERY;
    let mut reported = 0u32;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        let mut stale = false;
        match rx.recv_timeout(wait) {
            Ok(Msg::Install(key, generation)) => {
                if let Err(e) = lock_engine(&engine).install(key, generation) {
                    // Not fatal: the flow stays on the user-space path.
                    if reported < 10 {
                        reported += 1;
                        eprintln!("vswitch fast path: not offloading {key:?}: {e}");
                    }
                }
            }
            Ok(Msg::PurgeStale) => stale = true,
            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let due = Instant::now() >= next;
        if stale || due {
            let now = epoch.elapsed().as_nanos() as u64;
            let mut sw = lock(&switch);
            let mut en = lock_engine(&engine);
            let mut uses = en.purge_stale();
            if due {
                uses.extend(en.poll());
                next = Instant::now() + REVALIDATE_EVERY;
            }
            for u in uses {
                sw.account_offloaded(&u, due.then_some(now));
            }
        }
    }
}
