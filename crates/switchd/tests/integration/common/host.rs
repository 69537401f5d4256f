//! Host commands (`ip`, `ping`) for the namespace test.

// Each test binary uses a part of these.
#[allow(unused_imports)]
pub use vireo_testkit::cmd::{must, run};

/// Namespaces `<prefix>n<k>`, each on a veth pair whose host end `<prefix>h<k>` stays here;
/// all removed on drop, even when an assert failed.
pub struct Lab {
    pub prefix: String,
    namespaces: Vec<String>,
    links: Vec<String>,
}

impl Lab {
    pub fn new(tag: &str) -> Lab {
        Lab {
            prefix: format!("sd{}{tag}", std::process::id()),
            namespaces: Vec::new(),
            links: Vec::new(),
        }
    }

    pub fn ns(&self, k: usize) -> String {
        format!("{}n{k}", self.prefix)
    }

    pub fn host(&self, k: usize) -> String {
        format!("{}h{k}", self.prefix)
    }

    /// Namespace `k` (IPv6 off, so the kernel sends nothing on its own) on a veth whose
    /// inside end has `ip`/24; the host end's name.
    pub fn veth_ns(&mut self, k: usize, ip: &str) -> String {
        let (ns, host, guest) = (self.ns(k), self.host(k), format!("{}g{k}", self.prefix));
        must(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let _ = run(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
        ]);
        must(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", &guest,
        ]);
        self.links.push(host.clone());
        let _ = run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{host}.disable_ipv6=1"),
        ]);
        must(&["ip", "link", "set", &guest, "netns", &ns]);
        must(&["ip", "link", "set", &host, "up"]);
        let addr = format!("{ip}/24");
        must(&["ip", "-n", &ns, "addr", "add", &addr, "dev", &guest]);
        must(&["ip", "-n", &ns, "link", "set", &guest, "up"]);
        host
    }

    /// `count` echoes 0.2 s apart from namespace `k`, each answered within 1 s, all within
    /// `deadline` s: whether all came back.
    pub fn ping(&self, k: usize, ip: &str, count: u32, deadline: u32) -> bool {
        let (count, deadline) = (count.to_string(), deadline.to_string());
        run(&[
            "ip",
            "netns",
            "exec",
            &self.ns(k),
            "ping",
            "-c",
            &count,
            "-i",
            "0.2",
            "-W",
            "1",
            "-w",
            &deadline,
            ip,
        ])
    }

    /// One echo, no retry: whether it came back within `wait` seconds.
    pub fn ping_once(&self, k: usize, ip: &str, wait: u32) -> bool {
        let wait = wait.to_string();
        run(&[
            "ip",
            "netns",
            "exec",
            &self.ns(k),
            "ping",
            "-c",
            "1",
            "-W",
            &wait,
            ip,
        ])
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
