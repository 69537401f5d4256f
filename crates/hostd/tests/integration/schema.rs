//! Migrations: from an empty database, idempotent reopen, a newer database refused, a failing
//! step applied not at all.

use crate::common;

use rusqlite::Connection;
use vireo_hostd::schema::{self, current_version};
use vireo_hostd::{Store, StoreError};

fn user_version(conn: &Connection) -> i64 {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap()
}

#[test]
fn empty_db_is_migrated_and_reopen_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("vireo.db");
    let id = Store::open(dir.path())
        .unwrap()
        .create_vm(&common::spec("a"))
        .unwrap()
        .id();
    assert_eq!(
        user_version(&Connection::open(&db).unwrap()),
        current_version()
    );
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.get_by_id(id).unwrap().spec.name, "a");
    drop(store);
    let conn = Connection::open(&db).unwrap();
    assert_eq!(user_version(&conn), current_version());
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_newer_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let id = Store::open(dir.path())
        .unwrap()
        .create_vm(&common::spec("a"))
        .unwrap()
        .id();
    let db = dir.path().join("vireo.db");
    let newer = current_version() + 1;
    Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();
    let err = Store::open(dir.path()).err().expect("must be refused");
    match &err {
        StoreError::SchemaTooNew {
            found, supported, ..
        } => {
            assert_eq!((*found, *supported), (newer, current_version()))
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("vireo.db"), "{err}");
    // Its VM folder was not taken for an orphan.
    assert!(dir.path().join("vms").join(id.to_string()).is_dir());
}

#[test]
fn a_failing_step_is_applied_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let mut conn = Connection::open(&db).unwrap();
    let steps = [
        "CREATE TABLE one (x INTEGER);",
        "CREATE TABLE two (x INTEGER); SELECT * FROM missing;",
    ];
    let err = schema::apply(&mut conn, &db, &steps).unwrap_err();
    assert!(matches!(err, StoreError::Sqlite(_)), "{err}");
    assert_eq!(user_version(&conn), 1);
    let two: i64 = conn
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'two'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(two, 0, "the failed step's table must be rolled back");
    schema::apply(&mut conn, &db, &steps[..1]).unwrap();
    assert_eq!(user_version(&conn), 1);
}

#[test]
fn a_version_1_database_gains_the_metering_table_and_keeps_its_vms() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("vireo.db");
    let id = Store::open(dir.path())
        .unwrap()
        .create_vm(&common::spec("old"))
        .unwrap()
        .id();
    // Back to what version 1 wrote (step 1 is unchanged): no metering, pool, switch or checkpoint tables.
    {
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(
            "DROP TABLE checkpoint_intents; DROP TABLE checkpoint_heads; DROP TABLE checkpoints;
             DROP TABLE switch_ports; DROP TABLE switches; DROP TABLE pool_members;
             DROP TABLE pools; DROP TABLE vm_metering;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        user_version(&Connection::open(&db).unwrap()),
        current_version()
    );
    assert!(store.list_switches().unwrap().is_empty());
    assert_eq!(store.get_by_id(id).unwrap().spec.name, "old");
    assert_eq!(store.load_metering(id).unwrap(), None);
    store.save_metering(id, "{\"enabled\":true}", 1).unwrap();
    store.save_metering(id, "{\"enabled\":false}", 2).unwrap();
    assert_eq!(
        store.load_metering(id).unwrap().as_deref(),
        Some("{\"enabled\":false}")
    );
    // A VM that is gone gets no row; removing a VM removes its row.
    let ghost = uuid::Uuid::new_v4();
    store.save_metering(ghost, "{}", 3).unwrap();
    assert_eq!(store.load_metering(ghost).unwrap(), None);
    store.remove(id).unwrap();
    assert_eq!(store.load_metering(id).unwrap(), None);
}

#[test]
fn a_version_2_database_gains_pools_and_keeps_its_vms_and_metering() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("vireo.db");
    let id = {
        let store = Store::open(dir.path()).unwrap();
        let id = store.create_vm(&common::spec("old")).unwrap().id();
        store.save_metering(id, "{}", 1).unwrap();
        id
    };
    // Back to what version 2 wrote (steps 1 and 2 are unchanged): no pool, switch or checkpoint tables.
    Connection::open(&db)
        .unwrap()
        .execute_batch("DROP TABLE checkpoint_intents; DROP TABLE checkpoint_heads; DROP TABLE checkpoints;
             DROP TABLE switch_ports; DROP TABLE switches; DROP TABLE pool_members; DROP TABLE pools;
             PRAGMA user_version = 2;")
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        user_version(&Connection::open(&db).unwrap()),
        current_version()
    );
    assert_eq!(store.get_by_id(id).unwrap().spec.name, "old");
    assert_eq!(store.load_metering(id).unwrap().as_deref(), Some("{}"));
    assert!(store.list_switches().unwrap().is_empty());
    assert!(store.list_pools().unwrap().is_empty());
    let pool = store.create_pool("p").unwrap();
    assert_eq!(store.add_to_pool("p", id).unwrap().vms.len(), 1);
    assert_eq!(store.pool_of(id).unwrap().map(|p| p.id), Some(pool.id));
    // Removing the VM removes its membership (the foreign key cascades).
    store.remove(id).unwrap();
    assert!(store.find_pool("p").unwrap().vms.is_empty());
}
