//! `Announce` over the switch's socket (docs/switchd.md): the announced port's frames run
//! through the pipeline as if it had sent them — its ingress meter counts them and the switch
//! learns its MAC — and an unknown port is an `Error` naming it. What the frames look like and
//! where they go is checked without a process in `crates/vswitch/tests/integration/announce.rs`.

use crate::common;

use std::net::Ipv4Addr;
use std::time::Duration;

use common::*;
use vireo_api::switch::SwitchOp;
use vireo_vswitch::{MacAddr, SwitchConfig};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x66, 0, 1];

#[test]
fn announce_sends_through_the_port_and_refuses_an_unknown_one() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut vm = vhost("vm", "vm.sock", 10);
    vm.config.macs = vec![MacAddr(MAC)];
    vm.config.guard.allowed_ipv4 = vec![Ipv4Addr::new(10, 1, 0, 5)];
    write_launch(
        dir,
        SwitchConfig::private("ann"),
        vec![vm, vhost("a", "a.sock", 10), vhost("b", "b.sock", 10)],
    );
    let mut s = Switchd::start(dir);
    let mut c = s.client();

    let e = c.error(SwitchOp::Announce {
        name: "nope".into(),
    });
    assert!(e.contains("\"nope\"") && e.contains("no port"), "{e}");

    c.ok(SwitchOp::Announce { name: "vm".into() });
    // A RARP for the MAC and a gratuitous ARP for the address, taken in from the port.
    let report = |s: &Switchd| s.port("vm");
    assert!(
        wait_until(Duration::from_secs(10), || report(&s).meters.packets_in
            == 2),
        "{:?}",
        report(&s).meters
    );
    assert_eq!(report(&s).learned_macs, vec![MacAddr(MAC)]);
    // A port with no MAC has nothing to announce: Ok, and nothing sent.
    c.ok(SwitchOp::Announce { name: "a".into() });
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(s.port("a").meters.packets_in, 0);
    c.ok(SwitchOp::Shutdown);
    assert!(s
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|st| st.success()));
}
