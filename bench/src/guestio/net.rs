//! The network half: probe A blasts sequence-numbered frames at probe B, which counts them.
//! Vireo: both NICs are vhost-user ports of a Vireo switch run in this process (as
//! `vireo-switch` runs it). QEMU: both NICs are TAPs on one Linux bridge.
//!
//! Measured under backpressure, identically for both: B acknowledges every [`ACK_EVERY`] frames
//! (an ack frame back to A through the same switch or bridge) and A keeps at most [`WINDOW`]
//! frames beyond the last ack in flight. The window is no larger than the sink's receive ring
//! (64 buffers), so a frame is never dropped for want of a buffer: frames/s is the delivered
//! rate, and loss is reported beside it (it should be 0). Without the window the blaster floods
//! and the figure is whatever the flooded sink happened to catch, which swung 10–100× between
//! runs (docs/SPECIFICATION.md, guestio).

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_probe_image::qemu::{NetBackend, QemuProbeConfig};
use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::vhost_user::VhostUserServer;
use vireo_vswitch::{MacAddr, PortConfig, Switch, SwitchConfig};

use super::vm::{field, Vm};

pub const MACS: [[u8; 6]; 2] = [[0x52, 0x54, 0, 0x67, 0, 1], [0x52, 0x54, 0, 0x67, 0, 2]];
const BRIDGE: &str = "giobr0";
const TAPS: [&str; 2] = ["giotap0", "giotap1"];
/// Frames in flight beyond the last ack: the probe's receive ring holds 64 buffers.
pub const WINDOW: u32 = 64;
/// The sink acks after this many frames (a quarter window: acks overlap with sending).
pub const ACK_EVERY: u32 = 16;

#[derive(Clone, Copy, Default, Debug)]
pub struct NetResult {
    pub sent: f64,
    pub frames: f64,
    pub frames_s: f64,
    pub lost: f64,
    /// Windows the blaster re-opened because no ack came for 200 ms (lost acks or frames).
    pub timeouts: f64,
    /// Sender's and sink's notifications (VM exits) per frame.
    pub tx_kicks: f64,
    pub rx_kicks: f64,
}

/// A blaster and a sink, whichever VMM runs them.
pub struct Pair {
    vms: [Vm; 2],
}

impl Pair {
    pub fn measure(&mut self, size: u32, secs: u32) -> Result<NetResult, String> {
        let [a, b] = &mut self.vms;
        let long = Duration::from_secs(u64::from(secs) + 30);
        for vm in [&mut *a, &mut *b] {
            vm.command("TSC", Duration::from_secs(10))?;
        }
        b.console
            .send_line(&format!("NET 0 SINK {} 1000 ack={ACK_EVERY}", secs + 10))
            .map_err(|e| e.to_string())?;
        std::thread::sleep(Duration::from_millis(200));
        let blast = a.command(
            &format!(
                "NET 0 BLAST {size} {secs}s {} window={WINDOW}",
                MacAddr(MACS[1])
            ),
            long,
        )?;
        let sink = b
            .console
            .answer(long)
            .map_err(|e| format!("NET SINK: {e}"))?;
        let sent = field(&blast, "sent")?;
        let frames = field(&sink, "frames")?;
        // Delivered frames over the blaster's run time (sent / its rate): the sink's own
        // first-to-last span is shorter, and much shorter when the run stalled at its start or
        // end, which overstated the rate. The window keeps the two within 64 frames.
        let blast_secs = sent / field(&blast, "frames_s")?.max(1.0);
        Ok(NetResult {
            sent,
            frames,
            frames_s: frames / blast_secs.max(1e-9),
            lost: field(&sink, "lost")?,
            timeouts: field(&blast, "timeouts")?,
            tx_kicks: field(&blast, "kicks")? / field(&blast, "sent")?.max(1.0),
            rx_kicks: field(&sink, "kicks")? / field(&sink, "frames")?.max(1.0),
        })
    }
}

/// The Vireo side: the switch and its vhost-user servers live as long as this.
pub struct VireoNet {
    pub pair: Option<Pair>,
    servers: Vec<VhostUserServer>,
    rt: Option<SwitchRuntime>,
    _dir: tempfile::TempDir,
}

impl VireoNet {
    pub fn start(vireo: &Path, memory_mib: u32) -> Result<VireoNet, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let sw = Arc::new(Mutex::new(
            Switch::new(SwitchConfig::private("gio")).map_err(|e| e.to_string())?,
        ));
        let rt = SwitchRuntime::start(sw.clone()).map_err(|e| e.to_string())?;
        let mut servers = Vec::new();
        let mut vms = Vec::new();
        for (k, mac) in MACS.iter().enumerate() {
            let cfg = PortConfig {
                macs: vec![MacAddr(*mac)],
                ..PortConfig::access(&format!("vm{k}"), 1)
            };
            let id = lock(&sw).add_port(cfg).map_err(|e| e.to_string())?;
            let socket = dir.path().join(format!("vm{k}.sock"));
            let (port, server) =
                VhostUserServer::listen(&socket, &format!("vm{k}")).map_err(|e| e.to_string())?;
            rt.attach(id, port);
            servers.push(server);
            let net = format!("vhost-user={},mac={}", socket.display(), MacAddr(*mac));
            vms.push(Vm::vireo(vireo, memory_mib, &["--net".into(), net])?);
        }
        let [a, b]: [Vm; 2] = vms.try_into().map_err(|_| "two VMs")?;
        Ok(VireoNet {
            pair: Some(Pair { vms: [a, b] }),
            servers,
            rt: Some(rt),
            _dir: dir,
        })
    }
}

impl Drop for VireoNet {
    fn drop(&mut self) {
        // The VMs go first, so the ports are not pulled from under running guests.
        self.pair = None;
        for s in self.servers.drain(..) {
            let _ = s.stop();
        }
        if let Some(rt) = self.rt.take() {
            let _ = rt.stop();
        }
    }
}

/// The QEMU side: two TAPs on a Linux bridge, removed on drop.
pub struct QemuNet {
    pub pair: Option<Pair>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl QemuNet {
    pub fn start(qemu: &Path, memory_mib: u32) -> Result<QemuNet, String> {
        let mut net = QemuNet { pair: None };
        let _ = ip(&["link", "del", BRIDGE]);
        ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["link", "set", BRIDGE, "up"])?;
        let mut vms = Vec::new();
        for (tap, mac) in TAPS.iter().zip(MACS) {
            let _ = ip(&["link", "del", tap]);
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["link", "set", tap, "master", BRIDGE])?;
            ip(&["link", "set", tap, "up"])?;
            let c = QemuProbeConfig::new(qemu, memory_mib).nic(
                NetBackend::Raw(format!("tap,ifname={tap},script=no,downscript=no")),
                Some(mac),
            );
            vms.push(Vm::qemu(&c)?);
        }
        let [a, b]: [Vm; 2] = vms.try_into().map_err(|_| "two VMs")?;
        net.pair = Some(Pair { vms: [a, b] });
        Ok(net)
    }
}

impl Drop for QemuNet {
    fn drop(&mut self) {
        self.pair = None;
        for tap in TAPS {
            let _ = ip(&["link", "del", tap]);
        }
        let _ = ip(&["link", "del", BRIDGE]);
    }
}
