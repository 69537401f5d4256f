//! Network namespaces on veth pairs for the namespace tests. One test's names share a prefix
//! (process id and test tag, so tests run in parallel), and everything a `Lab` made is removed
//! on drop, even when an assert fails.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_vswitch::runtime::SwitchRuntime;
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::{PortId, Switch};

use super::host::{must, run};

/// Namespaces `<prefix>n<k>` and host interfaces created by one test.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Lab {
    /// Names start with `base` (one per test file), this process id, then `tag` (one per test).
    pub fn new(base: &str, tag: &str) -> Lab {
        Lab {
            prefix: format!("{base}{}{tag}", std::process::id()),
            namespaces: Vec::new(),
            links: Vec::new(),
        }
    }

    pub fn ns(&self, k: usize) -> String {
        format!("{}n{k}", self.prefix)
    }

    /// The veth end that stays in our namespace, for the switch to bind.
    pub fn host(&self, k: usize) -> String {
        format!("{}h{k}", self.prefix)
    }

    /// The veth end inside namespace `k`.
    pub fn guest(&self, k: usize) -> String {
        format!("{}g{k}", self.prefix)
    }

    /// Namespace `k` with loopback up; its name.
    pub fn add_ns(&mut self, k: usize) -> String {
        let ns = self.ns(k);
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        must(&["ip", "-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// Deletes host interface `name` on drop (one that may still be in our namespace then).
    pub fn own_link(&mut self, name: String) {
        self.links.push(name);
    }

    /// A veth pair whose guest end moves into namespace `k` (which must exist) and whose host
    /// end comes up here with IPv6 off (no ND or MLD of its own next to the switch's frames).
    pub fn veth(&mut self, k: usize) -> (String, String) {
        let (ns, host, guest) = (self.ns(k), self.host(k), self.guest(k));
        must(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", &guest,
        ]);
        self.own_link(host.clone());
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{host}.disable_ipv6=1"),
        ]);
        must(&["ip", "link", "set", &guest, "netns", &ns]);
        must(&["ip", "link", "set", &host, "up"]);
        (host, guest)
    }

    /// Namespace `k` (IPv6 on or off) on a veth whose guest end has `addrs` and is up; the
    /// host end's name.
    pub fn veth_ns(&mut self, k: usize, ipv6: bool, addrs: &[&str]) -> String {
        let ns = self.add_ns(k);
        set_ipv6(&ns, ipv6);
        let (host, guest) = self.veth(k);
        configure(&ns, &guest, addrs);
        host
    }

    /// Turns transmit checksum offload off on namespace `k`'s veth end, so the frames it
    /// sends carry their checksums (the tests decode and check them on the way).
    pub fn tx_checksums_in_software(&self, k: usize) {
        must(&[
            "ip",
            "netns",
            "exec",
            &self.ns(k),
            "ethtool",
            "-K",
            &self.guest(k),
            "tx",
            "off",
        ]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            run(&["ip", "netns", "del", ns]);
        }
        for l in &self.links {
            run(&["ip", "link", "del", l]);
        }
    }
}

/// Turns IPv6 on or off for every interface of namespace `ns` (best effort).
pub fn set_ipv6(ns: &str, on: bool) {
    let setting = format!("net.ipv6.conf.all.disable_ipv6={}", u8::from(!on));
    let _ = run(&["ip", "netns", "exec", ns, "sysctl", "-qw", &setting]);
}

/// Gives `dev` in namespace `ns` the addresses `addrs` (IPv4 as /24; IPv6 as /64 without
/// duplicate address detection, usable at once) and brings it up.
pub fn configure(ns: &str, dev: &str, addrs: &[&str]) {
    for a in addrs {
        if a.contains(':') {
            let a = format!("{a}/64");
            must(&["ip", "-n", ns, "addr", "add", &a, "dev", dev, "nodad"]);
        } else {
            let a = format!("{a}/24");
            must(&["ip", "-n", ns, "addr", "add", &a, "dev", dev]);
        }
    }
    must(&["ip", "-n", ns, "link", "set", dev, "up"]);
}

/// Pings from namespace `ns`: `count` echoes 0.2 s apart, each answer awaited 1 s, all done
/// within `deadline` seconds; `target` is the address (after options such as `-I <source>`).
pub fn ping(ns: &str, count: u32, deadline: u32, target: &[&str]) -> bool {
    let (count, deadline) = (count.to_string(), deadline.to_string());
    let mut args = vec![
        "ip", "netns", "exec", ns, "ping", "-c", &count, "-i", "0.2", "-W", "1", "-w", &deadline,
    ];
    args.extend_from_slice(target);
    run(&args)
}

/// Starts `sw` with each `(port, k)` on host end `k` of `lab` as an offloading AF_PACKET port,
/// then gives the workers a moment to start reading.
pub fn start_offloaded(lab: &Lab, sw: Switch, ports: &[(PortId, usize)]) -> SwitchRuntime {
    let rt = SwitchRuntime::start(Arc::new(Mutex::new(sw))).unwrap();
    for &(id, k) in ports {
        let port = PacketPort::bind_offload(&lab.host(k)).unwrap();
        rt.attach_packet(id, Arc::new(port));
    }
    std::thread::sleep(Duration::from_millis(100));
    rt
}
