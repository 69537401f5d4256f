//! The guarded guest of the fragment-guard tests: its MAC and addresses, a peer, the IPv6
//! all-nodes group, and its switch port with the ARP/ND guard on for exactly its addresses.

use vireo_vswitch::PortConfig;

use super::Mac;

pub const VM: Mac = [2, 0, 0, 0, 0, 1];
pub const BCAST: Mac = [0xff; 6];
pub const VM4: [u8; 4] = [10, 0, 0, 1];
pub const PEER4: [u8; 4] = [10, 0, 0, 2];
pub const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];

/// fd00::1
pub fn vm6() -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[15] = 1;
    a
}

/// ff02::1
pub fn all_nodes() -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xff;
    a[1] = 2;
    a[15] = 1;
    a
}

/// Access port `name` on VLAN 1 for the guest: ARP/ND guard on, its addresses allowed.
pub fn guarded_vm(name: &str) -> PortConfig {
    let mut vm = PortConfig::access(name, 1);
    vm.guard.arp_nd_guard = true;
    vm.guard.allowed_ipv4 = vec![VM4.into()];
    vm.guard.allowed_ipv6 = vec![vm6().into()];
    vm
}
