//! What the live-migration tests between two workers share: two host identities trusting
//! each other, the 256 MiB probe spec with one disk, the destination's `incoming` launch,
//! `MigrateOut` and `MigrateStatus` polling.

use std::path::Path;
use std::time::{Duration, Instant};

use vireo_api::worker::{
    CompressMode, IncomingMigration, MigrateOptions, MigrateProgress, MigrationTls, PostcopyMode,
    WorkerLaunch, WorkerOp, WorkerReply,
};
use vireo_api::{DiskSpec, VmSpec};
use vireo_migration::hostauth::{HostIdentity, TrustStore};
use vireo_probe_image::ProbeConsole;

use super::{probe_spec, Worker, T};

/// A host identity in its own temp dir, trusting the given fingerprints.
pub struct Host {
    pub dir: tempfile::TempDir,
    pub id: HostIdentity,
}

impl Host {
    pub fn new(name: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let id = HostIdentity::load_or_create(dir.path(), name).unwrap();
        Host { dir, id }
    }

    pub fn trust(&self, others: &[&Host]) {
        let mut t = TrustStore::new();
        for (i, o) in others.iter().enumerate() {
            t.trust(o.id.fingerprint(), &format!("peer{i}"));
        }
        t.save(&self.dir.path().join("trusted")).unwrap();
    }

    pub fn tls(&self) -> MigrationTls {
        MigrationTls {
            cert: self.dir.path().join("host.crt"),
            key: self.dir.path().join("host.key"),
            trusted: self.dir.path().join("trusted"),
        }
    }
}

/// A source and a destination host that trust each other.
pub fn pair() -> (Host, Host) {
    let (a, b) = (Host::new("source.test"), Host::new("destination.test"));
    a.trust(&[&b]);
    b.trust(&[&a]);
    (a, b)
}

/// The probe with 256 MiB and `disk` as its only disk, serial `serial`.
pub fn spec(disk: &Path, serial: &str) -> VmSpec {
    VmSpec {
        memory_bytes: 256 << 20,
        disks: vec![DiskSpec {
            path: disk.to_path_buf(),
            read_only: false,
            format: None,
            serial: Some(serial.into()),
            max_iops: None,
            min_iops: None,
            queues: None,
        }],
        ..probe_spec()
    }
}

pub fn status(w: &Worker) -> MigrateProgress {
    match w.ask(WorkerOp::MigrateStatus) {
        WorkerReply::Migrate(p) => p,
        other => panic!("MigrateStatus answered {other:?}"),
    }
}

/// Polls `MigrateStatus` until `done` holds (bounded).
pub fn wait_status(
    w: &Worker,
    what: &str,
    done: impl Fn(&MigrateProgress) -> bool,
) -> MigrateProgress {
    let deadline = Instant::now() + T;
    loop {
        let p = status(w);
        if done(&p) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: migration status stuck at {p:?}; log:\n{}",
            w.log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A probe command that must answer `OK`.
pub fn ok(c: &mut ProbeConsole, cmd: &str) -> String {
    let a = c.command(cmd, T).unwrap();
    assert!(a.starts_with("OK"), "{cmd}: {a}");
    a
}

/// A destination worker for `spec`, listening on 127.0.0.1 port 0 for session `session`.
pub fn incoming(spec: VmSpec, host: &Host, session: uuid::Uuid, streams: u16) -> Worker {
    Worker::launch_with(WorkerLaunch {
        vm_id: uuid::Uuid::new_v4(),
        spec,
        nic_sockets: vec![],
        restore_from: None,
        inherited_disks: Vec::new(),
        incoming: Some(IncomingMigration {
            session,
            streams,
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: host.tls(),
            // As `migrate_out` migrates: so the destination may take the hugetlb pool.
            postcopy: PostcopyMode::Never,
            disk_slots: Vec::new(),
        }),
    })
}

/// Where the destination listens, once it does.
pub fn listening(dst: &Worker) -> std::net::SocketAddr {
    wait_status(dst, "destination listening", |p| p.listen_addr.is_some())
        .listen_addr
        .unwrap()
}

/// Starts a pre-copy migration of `src` to `to` (50 ms target downtime).
pub fn migrate_out(
    src: &Worker,
    to: std::net::SocketAddr,
    session: uuid::Uuid,
    host: &Host,
    streams: u16,
    compress: CompressMode,
    bandwidth: Option<u64>,
) {
    let r = src.ask(WorkerOp::MigrateOut {
        to,
        session,
        options: MigrateOptions {
            max_downtime_ms: 50,
            bandwidth,
            compress,
            streams,
            postcopy: PostcopyMode::Never,
            storage: None,
        },
        tls: host.tls(),
    });
    assert_eq!(
        r,
        WorkerReply::Ok,
        "MigrateOut refused; log:\n{}",
        src.log()
    );
}
