//! Switches in the inventory: unique valid names, interface ports, and a switch in use by a
//! VM's NIC that cannot be removed (checked in the same transaction).

use crate::common;

use vireo_api::switch::SwitchSpec;
use vireo_api::{ApiError, ApiErrorCode, NicSpec};
use vireo_hostd::switch_store::SwitchStoreError;
use vireo_hostd::Store;
use vireo_netconfig::{PortConfig, SwitchKind};

fn sw(name: &str) -> SwitchSpec {
    SwitchSpec {
        name: name.into(),
        kind: SwitchKind::Private,
        pvlan_domains: vec![],
        mac_aging_secs: None,
        mac_table_limit: None,
        port_mac_limit: None,
        fast_path: None,
        team: None,
        overlay: None,
        uplink_mirror: None,
    }
}

#[test]
fn names_ports_and_removal_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let lan = store.create_switch(&sw("lan")).unwrap();
    let e = store.create_switch(&sw("lan")).unwrap_err();
    assert!(matches!(e, SwitchStoreError::NameTaken(_)), "{e}");
    assert_eq!(ApiError::from(&e).code, ApiErrorCode::Conflict);
    for bad in ["", "a/b", "..", ".x", &"x".repeat(65)] {
        let e = store.create_switch(&sw(bad)).unwrap_err();
        assert_eq!(ApiError::from(&e).code, ApiErrorCode::Invalid, "{bad:?}");
    }
    assert_eq!(store.list_switches().unwrap().len(), 1);
    assert_eq!(store.find_switch(&lan.id.to_string()).unwrap(), lan);
    assert_eq!(store.find_switch("lan").unwrap(), lan);
    let e = store.find_switch("none").unwrap_err();
    assert_eq!(ApiError::from(&e).code, ApiErrorCode::NotFound);

    let p = PortConfig::access("veth0", 3);
    store.add_interface_port(&lan, &p).unwrap();
    let e = store.add_interface_port(&lan, &p).unwrap_err();
    assert!(matches!(e, SwitchStoreError::PortTaken { .. }), "{e}");
    let mut p2 = p.clone();
    p2.vlan = vireo_netconfig::VlanConfig::Access { vid: 4 };
    store.set_interface_port(&lan, &p2).unwrap();
    assert_eq!(store.interface_ports(lan.id).unwrap(), vec![p2]);
    let e = store
        .set_interface_port(&lan, &PortConfig::access("veth9", 1))
        .unwrap_err();
    assert!(matches!(e, SwitchStoreError::PortNotFound { .. }), "{e}");

    let mut spec = common::spec("web");
    spec.nics = vec![NicSpec {
        switch: "lan".into(),
        name: None,
        mac: None,
        vlan: None,
        policy: Default::default(),
        virtual_subnet: None,
        queues: None,
    }];
    let vm = store.create_vm(&spec).unwrap();
    let e = store.remove_switch(lan.id).unwrap_err();
    assert!(e.to_string().contains("web"), "{e}");
    assert_eq!(ApiError::from(&e).code, ApiErrorCode::Conflict);
    assert_eq!(store.list_switches().unwrap().len(), 1);
    store.remove(vm.id()).unwrap();
    store.remove_switch(lan.id).unwrap();
    assert!(store.list_switches().unwrap().is_empty());
    // Its interface ports went with it.
    assert!(store.interface_ports(lan.id).unwrap().is_empty());
}
