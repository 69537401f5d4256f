//! Stale senders on a real provider network: three Vireo "hosts" (switch instances whose
//! uplinks meet on a Linux bridge). VM X (a namespace) moves from A to B; host C, whose
//! VM P pings X, is not told. C's first packets go to A, which relays them to B and
//! redirects C; C's later packets go to B directly (A's relay counter stops); after the
//! relay's expiry A relays nothing. Needs root, `ip netns` and ping: a recorded skip
//! otherwise, a failure under CI. Every namespace and link goes on drop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vireo_vswitch::runtime::{lock, SwitchRuntime};
use vireo_vswitch::uplink::PacketPort;
use vireo_vswitch::*;

use crate::common;
use common::host::*;
use common::netns::*;

const PA: [&str; 3] = ["192.168.81.1", "192.168.81.2", "192.168.81.3"];
const PMAC: [&str; 3] = [
    "02:aa:00:00:00:03",
    "02:bb:00:00:00:03",
    "02:cc:00:00:00:03",
];
const MX: &str = "02:00:00:00:03:07";
const MP: &str = "02:00:00:00:03:03";
const EXPIRY_SECS: u64 = 2;

fn entry(ca: &str, m: &str, pa: usize) -> PolicyEntry {
    PolicyEntry {
        routing_domain: "red".into(),
        ca: ca.parse().unwrap(),
        mac: m.parse().unwrap(),
        vsid: 300,
        pa: PA[pa].parse().unwrap(),
    }
}

fn host(h: usize, policies: Vec<PolicyEntry>) -> (Switch, PortId) {
    let mut c = SwitchConfig::private(&format!("stale{h}"));
    c.overlay = Some(
        serde_json::from_value(serde_json::json!({
            "provider_addresses": [PA[h]], "provider_mac": PMAC[h],
            // Known neighbours: a relay is not an ARP request for the new host.
            "provider_neighbors": (0..3).filter(|i| *i != h)
                .map(|i| serde_json::json!({"ip": PA[i], "mac": PMAC[i]}))
                .collect::<Vec<_>>(),
            "relay_expiry_secs": EXPIRY_SECS,
            "routing_domains": [{"name": "red", "subnets": [{"vsid": 300}]}],
            "policies": policies,
        }))
        .unwrap(),
    );
    let mut sw = Switch::new(c).unwrap();
    let up = sw
        .add_port(PortConfig {
            role: PortRole::Uplink,
            ..PortConfig::access("up", 1)
        })
        .unwrap();
    (sw, up)
}

fn vm_port(m: &str, ca: &str) -> PortConfig {
    PortConfig {
        overlay: Some(PortOverlay {
            routing_domain: "red".into(),
            vsid: 300,
            mac: m.parse().unwrap(),
            cas: vec![ca.parse().unwrap()],
        }),
        ..PortConfig::access("vm", 1)
    }
}

/// A namespace VM on veth `k` with `ca`/24 and MAC `m`, IPv6 off; its switch-side port.
fn vm(lab: &mut Lab, k: usize, ca: &str, m: &str) -> PacketPort {
    let host = lab.veth_ns(k, false, &[]);
    let (ns, g) = (lab.ns(k), lab.guest(k));
    must(&["ip", "-n", &ns, "link", "set", &g, "address", m]);
    configure(&ns, &g, &[ca]);
    must(&["ip", "netns", "exec", &ns, "ethtool", "-K", &g, "tx", "off"]);
    PacketPort::bind(&host).unwrap()
}

/// The provider network: a bridge with one veth per host; the hosts' uplink ends.
fn provider(lab: &mut Lab) -> [String; 3] {
    let br = format!("{}br", lab.prefix);
    must(&["ip", "link", "add", &br, "type", "bridge"]);
    lab.own_link(br.clone());
    let ends = ["a", "b", "c"].map(|h| {
        let (up, side) = (format!("{}u{h}", lab.prefix), format!("{}p{h}", lab.prefix));
        must(&[
            "ip", "link", "add", &up, "type", "veth", "peer", "name", &side,
        ]);
        lab.own_link(up.clone());
        must(&["ip", "link", "set", &side, "master", &br]);
        for w in [&up, &side] {
            let _ = run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{w}.disable_ipv6=1"),
            ]);
            must(&["ip", "link", "set", w, "up"]);
        }
        up
    });
    let _ = run(&[
        "sysctl",
        "-qw",
        &format!("net.ipv6.conf.{br}.disable_ipv6=1"),
    ]);
    must(&["ip", "link", "set", &br, "up"]);
    ends
}

#[test]
fn netns_a_stale_sender_is_relayed_then_redirected_and_the_relay_expires() {
    if !netns_available("ovs") {
        return;
    }
    let mut lab = Lab::new("ov", "s");
    let ups = provider(&mut lab);
    // X (10.0.0.7) starts on A; P (10.0.0.3) is on C. B had talked to X on A.
    let (a, a_up) = host(0, vec![entry("10.0.0.3", MP, 2)]);
    let (b, b_up) = host(1, vec![entry("10.0.0.3", MP, 2), entry("10.0.0.7", MX, 0)]);
    let (c, c_up) = host(2, vec![entry("10.0.0.7", MX, 0)]);
    let (a, b, c) = (
        Arc::new(Mutex::new(a)),
        Arc::new(Mutex::new(b)),
        Arc::new(Mutex::new(c)),
    );
    let x_a = lock(&a).add_port(vm_port(MX, "10.0.0.7")).unwrap();
    let p_c = lock(&c).add_port(vm_port(MP, "10.0.0.3")).unwrap();
    let rts: Vec<SwitchRuntime> = [&a, &b, &c]
        .iter()
        .map(|s| SwitchRuntime::start((*s).clone()).unwrap())
        .collect();
    for (rt, (id, dev)) in rts
        .iter()
        .zip([(a_up, &ups[0]), (b_up, &ups[1]), (c_up, &ups[2])])
    {
        rt.attach(id, Arc::new(PacketPort::bind(dev).unwrap()));
    }
    rts[0].attach(x_a, Arc::new(vm(&mut lab, 1, "10.0.0.7", MX)));
    rts[2].attach(p_c, Arc::new(vm(&mut lab, 2, "10.0.0.3", MP)));
    std::thread::sleep(Duration::from_millis(100));
    let p_ns = lab.ns(2);
    assert!(ping(&p_ns, 2, 10, &["10.0.0.7"]), "P → X before the move");

    // The move: A lets X go and points it at B; B takes X's port. C hears nothing.
    rts[0].detach(x_a);
    {
        let mut a = lock(&a);
        a.remove_port(x_a).unwrap();
        a.set_policy(&entry("10.0.0.7", MX, 1)).unwrap();
    }
    let x_b = lock(&b).add_port(vm_port(MX, "10.0.0.7")).unwrap();
    rts[1].attach(x_b, Arc::new(PacketPort::bind(&lab.host(1)).unwrap()));
    std::thread::sleep(Duration::from_millis(100));

    // C's first echo goes to A, which relays it to B and redirects C.
    assert!(ping(&p_ns, 3, 10, &["10.0.0.7"]), "P → X after the move");
    let after_move = lock(&a).relay_counters();
    assert!(after_move.relayed >= 1, "{after_move:?}");
    assert!(after_move.redirects_sent >= 1, "{after_move:?}");
    let c_counters = lock(&c).relay_counters();
    assert_eq!(c_counters.redirects_accepted, 1, "{c_counters:?}");
    let x_ca = "10.0.0.7".parse::<std::net::IpAddr>().unwrap();
    let pa_of_x = |sw: &Arc<Mutex<Switch>>| {
        lock(sw)
            .overlay()
            .unwrap()
            .policies()
            .into_iter()
            .find(|(e, _)| e.ca == x_ca)
            .map(|(e, _)| e.pa.to_string())
    };
    assert_eq!(pa_of_x(&c).as_deref(), Some(PA[1]), "C was redirected to B");

    // From then on C sends to B directly: A relays nothing more, B's X port gets them.
    let x_before = lock(&b).status(x_b).unwrap().meters.egress.packets;
    assert!(ping(&p_ns, 5, 10, &["10.0.0.7"]), "P → X at B directly");
    assert_eq!(lock(&a).relay_counters().relayed, after_move.relayed);
    assert!(lock(&b).status(x_b).unwrap().meters.egress.packets >= x_before + 5);

    // After the expiry, a sender that goes back to the stale entry (its host restored an
    // old table) gets nothing relayed by A: dropped and counted.
    std::thread::sleep(Duration::from_secs(EXPIRY_SECS + 1));
    lock(&c).set_policy(&entry("10.0.0.7", MX, 0)).unwrap();
    assert!(
        !ping(&p_ns, 2, 3, &["10.0.0.7"]),
        "A relayed after the expiry"
    );
    let end = lock(&a).relay_counters();
    eprintln!("A after the move: {after_move:?}; C: {c_counters:?}; A at the end: {end:?}");
    assert_eq!(end.relayed, after_move.relayed, "{end:?}");
    assert!(end.relay_expired >= 1, "{end:?}");
    assert_eq!(end.redirects_sent, after_move.redirects_sent, "{end:?}");
    for rt in rts {
        rt.stop().unwrap();
    }
}
