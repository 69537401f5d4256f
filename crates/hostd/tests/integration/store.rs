//! The inventory store: CRUD, identity, names, states, files and permissions.

use crate::common;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Barrier};

use common::spec;
use vireo_api::{Action, ApiError, MacAddr, NicSpec, VmState};
use vireo_hostd::{Store, StoreError};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn crud_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let store = Store::open(&state).unwrap();
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("vireo.db")), 0o600);
    assert_eq!(mode(&state.join("vireo.db-wal")), 0o600);

    let a = store.create_vm(&spec("alpha")).unwrap();
    let b = store.create_vm(&spec("beta")).unwrap();
    assert_eq!(a.state, VmState::Off);
    assert!(store.vm_dir(a.id()).is_dir());
    assert_eq!(mode(&store.vm_dir(a.id())), 0o700);
    assert_eq!(store.get_by_id(a.id()).unwrap(), a);
    assert_eq!(store.get_by_name("beta").unwrap(), b);
    assert_eq!(store.find(&b.id().to_string()).unwrap(), b);
    assert_eq!(store.find("alpha").unwrap(), a);
    let names: Vec<_> = store
        .list()
        .unwrap()
        .into_iter()
        .map(|v| v.spec.name)
        .collect();
    assert_eq!(names, ["alpha", "beta"]);

    let mut changed = a.spec.clone();
    changed.vcpus = 2;
    changed.nics.remove(0);
    changed.nics.push(NicSpec {
        name: None,
        policy: Default::default(),
        virtual_subnet: None,
        queues: None,
        switch: "lan".into(),
        mac: None,
        vlan: None,
    });
    let upd = store.update_spec(a.id(), &changed).unwrap();
    assert_eq!(upd.spec.vcpus, 2);
    // The kept NIC keeps its MAC; the new one gets a fresh one.
    assert_eq!(upd.identity.macs[0], a.identity.macs[1]);
    assert!(!a.identity.macs.contains(&upd.identity.macs[1]));
    assert_eq!(store.get_by_id(a.id()).unwrap(), upd);

    let renamed = store.rename(a.id(), "gamma").unwrap();
    assert_eq!(renamed.spec.name, "gamma");
    assert!(matches!(
        store.get_by_name("alpha"),
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.find("gamma").unwrap().id(), a.id());

    store.remove(a.id()).unwrap();
    assert!(!store.vm_dir(a.id()).exists());
    assert!(matches!(
        store.get_by_id(a.id()),
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.remove(a.id()),
        Err(StoreError::NotFound { .. })
    ));
    let err = store.find("nope").unwrap_err();
    assert_eq!(ApiError::from(&err).code.http_status(), 404);
    assert_eq!(
        err.to_string(),
        r#"no VM "nope" (neither a VM id nor a VM name)"#
    );
}

#[test]
fn bad_specs_and_clashes_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = store.create_vm(&spec("a")).unwrap();
    store.create_vm(&spec("b")).unwrap();

    let err = store.create_vm(&spec("a")).unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken { name } if name == "a"),
        "{err}"
    );
    let err = store.rename(a.id(), "b").unwrap_err();
    assert!(
        matches!(&err, StoreError::NameTaken { name } if name == "b"),
        "{err}"
    );
    let err = store.create_vm(&spec("../x")).unwrap_err();
    assert!(
        matches!(&err, StoreError::Spec(e) if e.field == "name"),
        "{err}"
    );
    let err = store.rename(a.id(), "x/y").unwrap_err();
    assert!(matches!(err, StoreError::Spec(_)));

    let mut taken = spec("c");
    taken.nics[1].mac = Some(a.identity.macs[0]);
    let err = store.create_vm(&taken).unwrap_err();
    assert!(matches!(err, StoreError::MacTaken { mac } if mac == a.identity.macs[0]));

    assert_eq!(store.list().unwrap().len(), 2);
    assert_eq!(
        std::fs::read_dir(dir.path().join("vms")).unwrap().count(),
        2
    );
    assert_eq!(store.get_by_id(a.id()).unwrap(), a);
}

#[test]
fn states_follow_the_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let id = store.create_vm(&spec("a")).unwrap().id();
    let err = store.set_state(id, &Action::Pause).unwrap_err();
    assert!(
        matches!(&err, StoreError::IllegalTransition(e) if e.current == VmState::Off),
        "{err}"
    );
    store.set_state(id, &Action::Start).unwrap();
    store.set_state(id, &Action::Started).unwrap();
    let died = Action::WorkerExited {
        reason: "killed by signal 9".into(),
    };
    let rec = store.set_state(id, &died).unwrap();
    assert_eq!(
        rec.state,
        VmState::Critical {
            reason: "killed by signal 9".into()
        }
    );
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.get_by_id(id).unwrap().state,
        rec.state,
        "state and reason persist"
    );
    assert_eq!(
        store.set_state(id, &Action::TurnOff).unwrap().state,
        VmState::Off
    );
}

#[test]
fn identities_are_stable_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let created: Vec<_> = (0..5)
        .map(|i| store.create_vm(&spec(&format!("vm{i}"))).unwrap())
        .collect();
    drop(store);
    let store = Store::open(dir.path()).unwrap();
    for vm in &created {
        let again = store.get_by_id(vm.id()).unwrap();
        assert_eq!(again.identity, vm.identity);
        assert_eq!(again, *vm);
        assert_eq!(vm.identity.disk_serials.len(), 2);
        assert!(vm.identity.disk_serials.iter().all(|s| s.len() <= 20));
    }
}

#[test]
fn macs_are_locally_administered_and_unique_across_1000_vms() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut seen: HashSet<MacAddr> = HashSet::new();
    for i in 0..1000 {
        let vm = store.create_vm(&spec(&format!("vm{i}"))).unwrap();
        for mac in vm.identity.macs {
            assert!(mac.is_locally_administered() && mac.is_unicast(), "{mac}");
            assert!(seen.insert(mac), "{mac} given twice");
        }
    }
    assert_eq!(seen.len(), 2000);
}

#[test]
fn concurrent_creates_of_one_name_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(Store::open(dir.path()).unwrap());
    for round in 0..20 {
        let name = format!("race{round}");
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (store, barrier, name) = (store.clone(), barrier.clone(), name.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.create_vm(&spec(&name))
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let wins = results.iter().filter(|r| r.is_ok()).count();
        let clashes = results
            .iter()
            .filter(|r| matches!(r, Err(StoreError::NameTaken { .. })))
            .count();
        assert_eq!((wins, clashes), (1, 1), "{results:?}");
    }
    assert_eq!(store.list().unwrap().len(), 20);
    assert_eq!(
        std::fs::read_dir(dir.path().join("vms")).unwrap().count(),
        20
    );
}

#[test]
fn a_second_store_on_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let err = Store::open(dir.path()).err().expect("must be refused");
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    drop(store);
    Store::open(dir.path()).unwrap();
}

#[test]
fn a_row_changed_behind_our_back_is_reported_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let id = Store::open(dir.path())
        .unwrap()
        .create_vm(&spec("a"))
        .unwrap()
        .id();
    let conn = rusqlite::Connection::open(dir.path().join("vireo.db")).unwrap();
    conn.execute("UPDATE vms SET state = 'exploded'", [])
        .unwrap();
    drop(conn);
    let store = Store::open(dir.path()).unwrap();
    let err = store.get_by_id(id).unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { detail, .. } if detail.contains("exploded")),
        "{err}"
    );
    assert!(store.list().is_err());
    assert_eq!(ApiError::from(&err).code.http_status(), 500);
}

#[test]
fn host_limits_bound_specs() {
    let dir = tempfile::tempdir().unwrap();
    let limits = vireo_hostd::host_limits();
    let store = Store::open_with(dir.path(), limits).unwrap();
    let mut big = spec("big");
    big.vcpus = limits.max_vcpus + 1;
    assert!(matches!(store.create_vm(&big), Err(StoreError::Spec(e)) if e.field == "vcpus"));
    big.vcpus = 1;
    big.memory_bytes = limits.max_memory_bytes + 4096;
    assert!(matches!(store.create_vm(&big), Err(StoreError::Spec(e)) if e.field == "memory_bytes"));
}
