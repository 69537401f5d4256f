//! The control protocol between vireod and a VM's worker process (`vireo-vm`).
//!
//! Transport: the worker listens on `<vm-dir>/worker.sock` (0600). One JSON object per line
//! each way; a connection carries any number of request/response pairs, strictly in turn.
//! Every request carries `version` ([`WORKER_PROTOCOL_VERSION`]); a worker answers a version
//! it does not speak with `Error`, so a vireod and a worker from different builds fail loudly
//! instead of misreading each other.
//!
//! The worker's files in its VM folder (written by whom):
//! - `worker.json` (vireod, after spawning): [`WorkerRecord`], how a restarted vireod finds
//!   and verifies the process.
//! - `spec.json` (vireod, before spawning): the [`WorkerLaunch`] the worker builds the VM from.
//! - `worker.sock`, `console.sock` (the worker): control and console sockets.
//! - `control.sock` (the worker): the text disk-control protocol of `vireo run --control`
//!   (list disks, live merge, online resize), for `vireo control <vm-dir>/control.sock`.
//! - `exit.json` (the worker, last thing before a normal exit): [`WorkerExit`]. A worker
//!   that is gone without one for its pid was killed (or crashed).
//! - `worker.log` (the worker's stderr).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::{DiskSpec, VmSpec};

pub const WORKER_PROTOCOL_VERSION: u32 = 1;

/// Disk slots a worker's VM has in all (at least as many as its spec has disks): the ones the
/// boot disks leave free are reserved empty at boot for `AddDisk`.
pub const WORKER_DISK_SLOTS: usize = 8;

/// What the worker is started with (`<vm-dir>/spec.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerLaunch {
    pub vm_id: Uuid,
    /// Normalized: every disk has its serial, every NIC its MAC and name.
    pub spec: VmSpec,
    /// One vhost-user-net socket per `spec.nics` entry, in the same order: the NIC's port on
    /// its switch (`crate::switch`). The worker connects its virtio-net frontend there.
    #[serde(default)]
    pub nic_sockets: Vec<PathBuf>,
    /// Continue a saved VM instead of booting: the save directory (`Save`'s), whose
    /// `vm.state` and `memory.bin` the VM is restored from before it runs. `spec` must be the
    /// spec it was saved with (its disks are the ones in the VM at save time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_from: Option<PathBuf>,
    /// Receive this VM by live migration instead of booting (docs/migration.md): build the
    /// VM's skeleton (RAM, vCPUs, devices; disks **not** opened yet, the source still holds
    /// them), listen for the source worker's streams, apply pages as they come, and at the
    /// handoff open the disks and run. Exclusive with `restore_from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incoming: Option<IncomingMigration>,
    /// Disks whose open, locked file the worker inherits as a descriptor instead of opening
    /// the path (a restore of a VM whose disks vireod kept locked while it was saved,
    /// docs/vm-state.md). The worker checks each is the file its path names now and opens the
    /// disk from it, so the lock is never let go. Disks not named here are opened by path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inherited_disks: Vec<InheritedDisk>,
}

/// A disk's file handed to the worker as an inherited descriptor (`WorkerLaunch`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InheritedDisk {
    /// The spec disk's path (`spec.disks[..].path`) this descriptor is the file of.
    pub path: PathBuf,
    /// The descriptor number in the worker process.
    pub fd: i32,
}

/// A disk whose locked file a saving worker sent along with its `DisksHandedOver` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandedOverDisk {
    pub path: PathBuf,
    pub read_only: bool,
}

/// This host's migration identity, as files (vireod's `<state-dir>/host/`): the worker that
/// sends or receives a VM authenticates with them (`vireo_migration::hostauth`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The trust store (`sha256:<hex> name` per line): the only peers accepted.
    pub trusted: PathBuf,
}

/// `WorkerLaunch::incoming`: where and what to receive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IncomingMigration {
    /// The migration's session: streams of another session are refused.
    pub session: Uuid,
    /// How many streams the source opens (1–16).
    pub streams: u16,
    /// Where to listen (port 0: any free port). The bound address is in `MigrateStatus`'s
    /// `listen_addr` once the skeleton is built.
    pub listen: std::net::SocketAddr,
    pub tls: MigrationTls,
    /// The source's `--postcopy`: unless `never`, this VM's RAM must take page-by-page fills,
    /// so it stays off the hugetlb pool (`RamBacking::for_userfaultfd`). Absent: `auto`.
    #[serde(default)]
    pub postcopy: PostcopyMode,
    /// The source's disk slots (`true`: holds a disk), when they have a gap: the skeleton
    /// puts the spec's disks (slot order) into the same slots, so the device state fits.
    /// Empty: the disks fill the first slots.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_slots: Vec<bool>,
}

/// `--compress`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressMode {
    #[default]
    Auto,
    Zstd,
    Lz4,
    None,
}

/// `--postcopy`: switch to post-copy when pre-copy does not converge (`auto`), always after
/// the first round (`always`), or never (auto-converge throttling instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostcopyMode {
    #[default]
    Auto,
    Always,
    Never,
}

impl PostcopyMode {
    /// The default (for `skip_serializing_if`).
    pub fn is_auto(&self) -> bool {
        *self == PostcopyMode::Auto
    }
}

/// `MigrateOut`'s knobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateOptions {
    /// Switch over once the estimated final copy fits this.
    pub max_downtime_ms: u32,
    /// Cap on the link, bytes per second (`None`: as fast as it goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
    #[serde(default)]
    pub compress: CompressMode,
    /// Parallel TLS streams, 1–16.
    pub streams: u16,
    #[serde(default)]
    pub postcopy: PostcopyMode,
    /// Shared-nothing migration: copy every disk to this destination first (and its last
    /// writes at the switch-over). Additive: absent means shared storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<DiskTransfer>,
}

/// Where a shared-nothing migration's disk data goes: the destination vireod's migration
/// listener, which takes it for `session` (mutual TLS with this host's identity, as the
/// memory streams).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskTransfer {
    pub to: std::net::SocketAddr,
    pub session: Uuid,
    /// `None`: every disk, flattened (shared-nothing). `Some(serials)`: a live migration
    /// carrying the checkpoint tree: only these disks, in this order, each as its own top
    /// layer (what the running differencing child holds, plus the guest's writes), into an
    /// empty child of its arrived parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tops: Option<Vec<String>>,
    /// With `tops`, a shared-nothing migration: the disks in none of the checkpoints (added
    /// since the last one), after the tops in record order, each flattened whole into its own
    /// copy as a disk of a VM without checkpoints travels. Additive: absent means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flattened: Vec<String>,
}

/// Where a migration stands, on either side (`MigrateStatus`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrateState {
    /// No migration in this worker.
    #[default]
    Idle,
    /// Destination: skeleton built, waiting for the source's streams.
    Listening,
    /// Memory copy rounds while the guest runs on the source.
    Precopy,
    /// The guest is paused: last pages, device state, disk handoff.
    Switching,
    /// The guest runs on the destination; missing pages are fetched on fault.
    Postcopy,
    /// Source: the VM runs on the destination (the worker exits `MigratedAway`).
    /// Destination: the VM runs here.
    Completed,
    /// Post-copy failed after the switch-over: the VM is whole nowhere, its vCPUs are
    /// stopped and the worker exits `migration_lost` with the reason (`message`).
    Lost,
    /// Source: the VM runs on here as before. Destination: nothing runs; the worker exits.
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateProgress {
    pub state: MigrateState,
    /// Destination: the address the source's streams connect to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_addr: Option<std::net::SocketAddr>,
    /// Pre-copy rounds done (0 = the first full pass is running).
    pub round: u32,
    /// Guest RAM bytes in all.
    pub memory_bytes: u64,
    /// Bytes put on (source) or taken off (destination) the wire so far.
    pub transferred_bytes: u64,
    /// Dirty bytes still to send (source).
    pub remaining_bytes: u64,
    /// The guest's dirty rate over the last round, bytes per second (source).
    pub dirty_rate: u64,
    /// The link rate over the last round, bytes per second.
    pub link_rate: u64,
    /// What the pause would last if the switch-over began now (source).
    pub estimated_downtime_ms: u64,
    /// The pause the guest saw, once switched over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Why it failed or was cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Shared-nothing: disk bytes known to send so far (grows as the guest writes) and sent.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_bytes_total: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub disk_bytes_copied: u64,
    /// The set-up and end of the migration as they happened on this side (connections,
    /// skeleton, first page, ...), in order; vireod puts its own (offer, destination worker)
    /// in front in a job's progress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<MigratePhase>,
}

/// One step of a migration's set-up or end: its name and when it happened, in microseconds
/// since the migration began on that side (the job's start in a job's progress).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigratePhase {
    pub name: String,
    pub at_us: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// vireod's record of a worker it spawned (`<vm-dir>/worker.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerRecord {
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot): a pid reused by another process
    /// after the worker died has a different start time.
    pub start_time_ticks: u64,
    pub vm_id: Uuid,
}

/// (No `deny_unknown_fields`: serde does not support it beside `flatten`; the `op` enum
/// still refuses an unknown operation.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRequest {
    pub version: u32,
    #[serde(flatten)]
    pub op: WorkerOp,
}

impl WorkerRequest {
    pub fn new(op: WorkerOp) -> Self {
        WorkerRequest {
            version: WORKER_PROTOCOL_VERSION,
            op,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum WorkerOp {
    /// Who are you: answered with `Hello`.
    Hello,
    /// Answered with `Status`.
    Status,
    /// Ask the guest to power off: writes the spec's `shutdown_line` to COM1 (`Ok`, or `Error`
    /// when the spec has none). The worker exits once the guest powers off.
    Shutdown,
    /// Stop the vCPUs now, flush the disks, exit (`Ok`, then the worker exits).
    TurnOff,
    /// The last `max_bytes` (at most the ring's size) of COM1 output: `ConsoleLog`.
    ConsoleLog { max_bytes: u32 },
    /// What the worker has counted since it started: `Metrics`.
    Metrics,
    /// Pause the VM: `Ok` once every vCPU is parked and every disk has finished the request
    /// it was executing (its used-ring entry published); `Error` when that did not happen in
    /// time (the VM then runs on) or the VM has stopped. Pausing a paused VM is `Ok`.
    Pause,
    /// Let a paused VM run again (`Ok`; also for a VM that is not paused).
    Resume,
    /// Hard reset, like a power cycle inside the same worker: the guest starts again from its
    /// boot state (RAM wiped, kernel loaded again, devices and vCPUs reset) and runs, whether
    /// it was paused or not. `Ok` once it has been restarted; `Error` when the kernel cannot
    /// be opened (the VM is untouched) or a later step failed (the VM then ends, `VcpuFailed`).
    Reset,
    /// Hot add: open `disk` (normalized: it has its serial) and put it into the first free
    /// disk slot: `DiskAdded`, or `Error` (file missing or unusable, already attached to this
    /// VM, serial taken, no free slot, VM not running) with nothing changed. The guest sees
    /// the disk when it probes the slots again (the probe's `RESCAN`).
    AddDisk { disk: DiskSpec },
    /// Hot remove the disk with this serial: its last request finishes, it is flushed and
    /// closed, its slot is empty again (`Ok`); `Error` when no disk has that serial.
    RemoveDisk { serial: String },
    /// Save the VM and end: pause it, write its memory and complete state into `dir`
    /// (default `<vm-dir>/saved`; `memory.bin` then `vm.state`, docs/vm-state.md), then the
    /// worker exits with `Saved`. `Ok` once the state is complete on disk; the disks stay
    /// open (locked) until the process exits. `Error` with the VM as it was before (running,
    /// or paused if it was) when the save failed.
    ///
    /// With `hand_over_disks` the answer is `DisksHandedOver` instead of `Ok`, and its line
    /// carries, as SCM_RIGHTS descriptors in the same order, the open locked file of every
    /// disk: the caller keeps the locks from there on, so the worker's exit frees nothing.
    Save {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dir: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        hand_over_disks: bool,
    },
    /// Storage live migration (docs/storage-migration.md): copy every disk into folder `to`
    /// while the VM runs, mirror the guest's writes, switch each disk to its copy in one step,
    /// then delete the old files (except those in `keep`, and those another process has open).
    /// Answered `Ok` at once (the copy runs in the background: `MoveStorageStatus`), or
    /// `Error` (a move already runs, a live merge runs, a disk's format cannot be moved) with
    /// nothing started.
    MoveStorage {
        to: PathBuf,
        #[serde(default)]
        flatten: bool,
        /// Files not to delete after the switch (parents other VMs' chains use).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        keep: Vec<PathBuf>,
        /// Each disk's destination chosen by vireod (a VM with checkpoints: its frozen
        /// parents are copied by vireod, and deleted by vireod after its commit). A disk
        /// named here is moved onto its target and none of its old files is deleted.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        targets: Vec<MoveTarget>,
    },
    /// Where the current (or last) move stands: `MoveStorage`.
    MoveStorageStatus,
    /// Stop the running move: disks not yet switched stay on their old files and the
    /// destination files of those disks are deleted (`Ok`; also when no move runs).
    MoveStorageCancel,
    /// Live migration, source side (docs/migration.md): connect `streams` mutual-TLS streams to
    /// the destination worker at `to` (its `listen_addr`), pre-copy memory from the dirty log,
    /// pause, send the last pages and the device state, hand the disks over, and once the
    /// destination runs the VM, exit with `MigratedAway`. Answered `Ok` at once (progress:
    /// `MigrateStatus`), or `Error` (a migration or storage move already runs, the VM is not
    /// running) with nothing started. Any failure before the destination runs the VM leaves
    /// it running here, untouched.
    MigrateOut {
        to: std::net::SocketAddr,
        session: Uuid,
        options: MigrateOptions,
        tls: MigrationTls,
    },
    /// Either side: `Migrate`.
    MigrateStatus,
    /// Stop a migration before the switch-over: the VM runs on here (source) / the worker
    /// exits (destination). `Ok`; `Error` once the switch-over has begun (too late).
    MigrateCancel,
    /// Destination: the source is still sending this migration's disks (shared-nothing), so
    /// the worker's wait for its memory streams starts again from now. `Ok`; `Error` when the
    /// worker is not waiting for a source.
    MigrateSourceAlive,
    /// A checkpoint of the running or paused VM, the worker kept (docs/checkpoints.md, "Live
    /// capture"): memory goes into `dir` while the guest runs (a live save); the VM is paused
    /// for the last pages and its state; `memory.bin` and `vm.state` are made durable; every
    /// disk is flushed, and each disk named in `children` (by serial) gets the new
    /// differencing VHDX `path` on top of its current file and goes on in it; then a VM that
    /// was running resumes (a paused one stays paused). Answered `Checkpointed` with the
    /// guest-visible pause, or `Error` with everything as before: no child file, every disk
    /// on its old file, no `vm.state` in `dir`, the VM running (or paused) as before. Refused
    /// while a storage move, a live merge or a migration runs.
    Checkpoint {
        dir: PathBuf,
        children: Vec<CheckpointChild>,
    },
    /// Reverts the running or paused VM to the checkpoint whose state is in `dir`, the worker
    /// kept (docs/checkpoints.md, "Apply, keeping the worker"): checked first (the state must
    /// fit the VM: memory, vCPUs, devices, each device's saved state such as a NIC's MAC;
    /// every disk of the VM named in `children`); then, in one pause, every disk is flushed, closed and reopened as its new
    /// differencing child of the checkpoint's frozen file, guest memory and the vCPU and
    /// device state become the checkpoint's, and a VM that was running resumes (a paused one
    /// stays paused). Answered `Applied`, or `Error`: refused before the pause (nothing
    /// changed), a disk swap that failed (every disk back on its old file, the children
    /// deleted, the VM as before), or a failure after the swap, which ends the VM (its
    /// memory is then no one guest's); the disks are then on the children.
    ApplyCheckpoint {
        dir: PathBuf,
        children: Vec<ApplyChild>,
    },
}

/// `ApplyCheckpoint`: the disk with this serial goes on in the new differencing VHDX `path`
/// whose parent is the checkpoint's frozen file `parent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyChild {
    pub serial: String,
    /// Created by the worker (it must not exist).
    pub path: PathBuf,
    pub parent: PathBuf,
}

/// What an `ApplyCheckpoint` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyReport {
    /// The pause the guest saw, microseconds.
    pub pause_us: u64,
    /// Pages of the checkpoint's memory written into guest RAM.
    pub pages_copied: u64,
    /// Pages compared with the checkpoint's memory (0 when the changes were tracked).
    pub pages_compared: u64,
}

/// `Checkpoint`: the new top file of the disk with this serial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointChild {
    pub serial: String,
    /// Created by the worker (it must not exist), a differencing VHDX whose parent is the
    /// file the disk uses now.
    pub path: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum WorkerReply {
    Hello {
        version: u32,
        vm_id: Uuid,
        pid: u32,
    },
    Status(WorkerStatus),
    Ok,
    ConsoleLog {
        /// Base64 (standard alphabet, padded) of the bytes, oldest first.
        data_base64: String,
        /// Bytes the guest has written since the worker started (the ring keeps the last ones).
        total_bytes: u64,
    },
    Error {
        message: String,
    },
    Metrics(WorkerMetrics),
    /// `AddDisk` done: the disk's position among the VM's disks in slot order, which is the
    /// guest's disk index after a rescan and where the disk goes in the spec's `disks`.
    DiskAdded {
        index: u32,
    },
    /// Answer to `MoveStorageStatus`.
    MoveStorage(MoveProgress),
    /// Answer to `MigrateStatus`.
    Migrate(MigrateProgress),
    /// `Checkpoint` done: the state is in its `dir`, the disks run on their children.
    Checkpointed(CheckpointReport),
    /// `ApplyCheckpoint` done: the VM runs (or stays paused) as at the checkpoint, on the
    /// children.
    Applied(ApplyReport),
    /// `Save` with `hand_over_disks` done: the state is complete on disk, and the line came
    /// with one descriptor per entry here, in this order (disks that are not one locked file
    /// are left out and locked again by path).
    DisksHandedOver {
        disks: Vec<HandedOverDisk>,
    },
}

/// What a `Checkpoint` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointReport {
    /// The pause the guest saw, microseconds (0 for a VM that was paused already).
    pub pause_us: u64,
    /// The whole operation, milliseconds.
    pub total_ms: u64,
    /// Memory copy rounds while the guest ran (the first full pass not counted).
    pub rounds: u32,
    /// Bytes of memory written, all passes together.
    pub memory_written_bytes: u64,
}

/// One disk's destination in a move of a VM with checkpoints (`MoveStorage::targets`): the
/// disk whose file is `from` becomes `to`, a new differencing file on `parent` (a copy of its
/// frozen parent that vireod made) when it is a differencing VHDX, else a plain copy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveTarget {
    pub from: PathBuf,
    pub to: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
}

/// How a storage move stands (`MoveStorageStatus`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveProgress {
    pub state: MoveState,
    /// One entry per disk, in slot order.
    #[serde(default)]
    pub disks: Vec<MoveDiskProgress>,
    /// Why it failed (or what was left behind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MoveState {
    /// No move has run in this worker.
    #[default]
    Idle,
    Running,
    Completed,
    Failed,
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveDiskProgress {
    pub serial: Option<String>,
    /// The file the disk was on when the move started.
    pub from: PathBuf,
    /// Its copy (the top file of the copied chain).
    pub to: PathBuf,
    /// The file the VM uses for this disk now: `to` once switched, else `from`.
    pub current: PathBuf,
    pub bytes_total: u64,
    pub bytes_copied: u64,
    /// 0 = the first full copy; then one per round of copying what the guest wrote meanwhile.
    pub pass: u32,
    pub switched: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerStatus {
    /// The vCPUs have been started.
    pub running: bool,
    /// Unix time (ms) the vCPUs started.
    pub started_at: Option<i64>,
    /// The console socket clients attach to.
    pub console_socket: PathBuf,
    /// Paused by `Pause` and not resumed since (`running` stays true while paused).
    #[serde(default)]
    pub paused: bool,
    /// A `Checkpoint` is in progress (a restarted vireod waits for it to end before it
    /// recovers the checkpoint's intent).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub checkpointing: bool,
    /// Each disk slot, in order: whether it holds a disk (hot removal leaves gaps).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_slots: Vec<bool>,
}

/// What a worker has counted since it started (Hyper-V's Measure-VM, the worker's part).
/// Counters only grow; averages, resets and billing periods are vireod's (it subtracts two
/// readings). CPU times have the kernel's clock-tick resolution (10 ms on usual kernels).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerMetrics {
    /// Nanoseconds since the vCPUs started; 0 before.
    pub uptime_ns: u64,
    /// CPU time (user + system) of the vCPU threads, nanoseconds.
    pub vcpu_cpu_ns: u64,
    /// CPU time of the whole worker process (every thread, vCPUs included), nanoseconds.
    pub worker_cpu_ns: u64,
    /// Guest RAM as configured.
    pub memory_bytes: u64,
    /// Guest RAM the host really holds: the resident part of the guest-memory mapping (pages
    /// the guest never touched take no host memory).
    pub memory_resident_bytes: u64,
    /// The worker's own private memory, guest RAM excluded (`Private_*` of its mappings).
    pub worker_private_bytes: u64,
    /// One entry per disk, in the spec's order.
    pub disks: Vec<DiskMetrics>,
}

/// One disk's counters, since the worker started. Bytes and operations count requests that
/// completed successfully.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskMetrics {
    pub path: PathBuf,
    pub serial: Option<String>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    /// IOs normalized to 8 KiB (`crate::spec::normalized_ios` per read or write; 1 per flush,
    /// discard or write-zeroes; 0 per GET_ID): what `max_iops`/`min_iops` count.
    pub normalized_ios: u64,
    /// Time requests were held back by `max_iops`, nanoseconds.
    pub throttled_ns: u64,
    /// Episodes of "minimum IOPS not met" (`min_iops`): a measurement window in which requests
    /// were waiting most of the time yet fewer than `min_iops` normalized IOs a second
    /// completed starts one; a window that meets the minimum (or has no demand) ends it.
    pub min_iops_alerts: u64,
    /// An episode is going on now.
    pub min_iops_alert_active: bool,
}

/// `<vm-dir>/exit.json`: why the worker ended, written just before it exits on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerExit {
    pub pid: u32,
    pub reason: WorkerExitReason,
    /// Unix time, milliseconds.
    pub at: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum WorkerExitReason {
    /// The guest wrote `status` to the power-off port.
    PoweredOff { status: u8 },
    /// The guest reset the machine (the VM stops; a restart is vireod's decision).
    Reset,
    /// `TurnOff` or SIGTERM/SIGINT: vCPUs stopped, disks flushed.
    TurnedOff,
    /// The VM could not be built (bad disk, KVM failure): nothing ran.
    StartFailed { message: String },
    /// A vCPU failed (triple fault, KVM internal error).
    VcpuFailed { message: String },
    /// `Save` wrote the VM's state and memory into `dir`; the VM continues from there.
    Saved { dir: PathBuf },
    /// Live migration completed: the VM runs on the destination (`to`, the destination
    /// worker's address); the guest was paused `downtime_ms`. `progress` is the migration's
    /// last `MigrateStatus` (rounds, bytes moved, downtime), so vireod can show the final
    /// figures even when the worker finished between two of its polls.
    MigratedAway {
        to: String,
        downtime_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Box<MigrateProgress>>,
    },
    /// Post-copy failed after the switch-over (the other side or the link died while pages
    /// were still missing here, or the destination died while this source still served
    /// them): the VM cannot continue anywhere; `message` says why (docs/migration.md).
    MigrationLost { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shapes() {
        let r = WorkerRequest::new(WorkerOp::ConsoleLog { max_bytes: 10 });
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"console_log","max_bytes":10}"#);
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), r);
        let hello = serde_json::to_string(&WorkerRequest::new(WorkerOp::Hello)).unwrap();
        assert_eq!(hello, r#"{"version":1,"op":"hello"}"#);
        let bad = serde_json::from_str::<WorkerRequest>(r#"{"version":1,"op":"reboot"}"#);
        assert!(bad.is_err());
        let exit = WorkerExitReason::PoweredOff { status: 3 };
        assert_eq!(
            serde_json::to_string(&exit).unwrap(),
            r#"{"kind":"powered_off","status":3}"#
        );
        let reply = serde_json::to_string(&WorkerReply::Ok).unwrap();
        assert_eq!(reply, r#"{"reply":"ok"}"#);
    }

    #[test]
    fn metrics_round_trip() {
        let line = serde_json::to_string(&WorkerRequest::new(WorkerOp::Metrics)).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"metrics"}"#);
        assert_eq!(
            serde_json::from_str::<WorkerRequest>(&line).unwrap().op,
            WorkerOp::Metrics
        );
        let reply = WorkerReply::Metrics(WorkerMetrics {
            uptime_ns: 5,
            vcpu_cpu_ns: 10_000_000,
            worker_cpu_ns: 30_000_000,
            memory_bytes: 32 << 20,
            memory_resident_bytes: 8 << 20,
            worker_private_bytes: 400 << 10,
            disks: vec![DiskMetrics {
                path: "/vm/d.vhdx".into(),
                serial: Some("VIREO0001".into()),
                read_bytes: 1,
                write_bytes: 2,
                read_ops: 3,
                write_ops: 4,
                flush_ops: 5,
                normalized_ios: 6,
                throttled_ns: 7,
                min_iops_alerts: 8,
                min_iops_alert_active: true,
            }],
        });
        let text = serde_json::to_string(&reply).unwrap();
        assert!(
            text.starts_with(r#"{"reply":"metrics","uptime_ns":5,"vcpu_cpu_ns":10000000,"#),
            "{text}"
        );
        assert!(text.contains(r#""disks":[{"path":"/vm/d.vhdx","serial":"VIREO0001","#));
        assert_eq!(serde_json::from_str::<WorkerReply>(&text).unwrap(), reply);
        // The replies that were there before keep their shapes.
        let status = WorkerReply::Status(WorkerStatus {
            running: true,
            started_at: Some(1),
            console_socket: "/vm/console.sock".into(),
            paused: false,
            checkpointing: false,
            disk_slots: vec![],
        });
        assert_eq!(
            serde_json::to_string(&status).unwrap(),
            r#"{"reply":"status","running":true,"started_at":1,"console_socket":"/vm/console.sock","paused":false}"#
        );
    }

    #[test]
    fn disk_hotplug_wire_shapes() {
        let add = WorkerRequest::new(WorkerOp::AddDisk {
            disk: DiskSpec {
                path: "/vm/d.img".into(),
                read_only: false,
                format: None,
                serial: Some("S1".into()),
                max_iops: Some(100),
                min_iops: None,
                queues: None,
            },
        });
        let line = serde_json::to_string(&add).unwrap();
        assert!(
            line.starts_with(r#"{"version":1,"op":"add_disk","disk":{"path":"/vm/d.img","#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), add);
        let rm = WorkerRequest::new(WorkerOp::RemoveDisk {
            serial: "S1".into(),
        });
        let line = serde_json::to_string(&rm).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"remove_disk","serial":"S1"}"#);
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), rm);
        let added = serde_json::to_string(&WorkerReply::DiskAdded { index: 2 }).unwrap();
        assert_eq!(added, r#"{"reply":"disk_added","index":2}"#);
    }

    #[test]
    fn save_and_restore_wire_shapes() {
        let save = WorkerRequest::new(WorkerOp::Save {
            dir: None,
            hand_over_disks: false,
        });
        let line = serde_json::to_string(&save).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"save"}"#);
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), save);
        let to = WorkerRequest::new(WorkerOp::Save {
            dir: Some("/vm/s".into()),
            hand_over_disks: false,
        });
        let line = serde_json::to_string(&to).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"save","dir":"/vm/s"}"#);
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), to);
        let handing = WorkerRequest::new(WorkerOp::Save {
            dir: None,
            hand_over_disks: true,
        });
        let line = serde_json::to_string(&handing).unwrap();
        assert_eq!(line, r#"{"version":1,"op":"save","hand_over_disks":true}"#);
        assert_eq!(
            serde_json::from_str::<WorkerRequest>(&line).unwrap(),
            handing
        );
        let reply = WorkerReply::DisksHandedOver {
            disks: vec![HandedOverDisk {
                path: "/d.vhdx".into(),
                read_only: false,
            }],
        };
        assert_eq!(
            serde_json::to_string(&reply).unwrap(),
            r#"{"reply":"disks_handed_over","disks":[{"path":"/d.vhdx","read_only":false}]}"#
        );
        let exit = WorkerExitReason::Saved {
            dir: "/vm/s".into(),
        };
        assert_eq!(
            serde_json::to_string(&exit).unwrap(),
            r#"{"kind":"saved","dir":"/vm/s"}"#
        );
        // A launch written before `restore_from` existed still reads, as a boot.
        let old = r#"{"vm_id":"00000000-0000-0000-0000-000000000001","spec":SPEC}"#;
        let spec = r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":33554432,"kernel":"/k"}"#;
        let launch: WorkerLaunch = serde_json::from_str(&old.replace("SPEC", spec)).unwrap();
        assert_eq!(launch.restore_from, None);
        assert!(!serde_json::to_string(&launch)
            .unwrap()
            .contains("restore_from"));
    }

    #[test]
    fn move_storage_wire_shapes() {
        let mv = WorkerRequest::new(WorkerOp::MoveStorage {
            to: "/new".into(),
            flatten: true,
            keep: vec![],
            targets: vec![],
        });
        let line = serde_json::to_string(&mv).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"op":"move_storage","to":"/new","flatten":true}"#
        );
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), mv);
        let targeted = WorkerRequest::new(WorkerOp::MoveStorage {
            to: "/new".into(),
            flatten: false,
            keep: vec![],
            targets: vec![MoveTarget {
                from: "/vm/top.avhdx".into(),
                to: "/new/c/top.avhdx".into(),
                parent: Some("/new/base.vhdx".into()),
            }],
        });
        let line = serde_json::to_string(&targeted).unwrap();
        assert!(line.contains(r#""targets":[{"from":"/vm/top.avhdx","to":"/new/c/top.avhdx","parent":"/new/base.vhdx"}]"#), "{line}");
        assert_eq!(
            serde_json::from_str::<WorkerRequest>(&line).unwrap(),
            targeted
        );
        let plain = r#"{"version":1,"op":"move_storage","to":"/n"}"#;
        let WorkerOp::MoveStorage { flatten, keep, .. } =
            serde_json::from_str::<WorkerRequest>(plain).unwrap().op
        else {
            panic!("not a move");
        };
        assert!(!flatten && keep.is_empty());
        let reply = WorkerReply::MoveStorage(MoveProgress {
            state: MoveState::Running,
            disks: vec![],
            message: None,
        });
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            text,
            r#"{"reply":"move_storage","state":"running","disks":[]}"#
        );
        assert_eq!(serde_json::from_str::<WorkerReply>(&text).unwrap(), reply);
    }

    #[test]
    fn checkpoint_wire_shapes() {
        let op = WorkerRequest::new(WorkerOp::Checkpoint {
            dir: "/vm/cp".into(),
            children: vec![CheckpointChild {
                serial: "S1".into(),
                path: "/vm/c.avhdx".into(),
            }],
        });
        let line = serde_json::to_string(&op).unwrap();
        assert_eq!(
            line,
            r#"{"version":1,"op":"checkpoint","dir":"/vm/cp","children":[{"serial":"S1","path":"/vm/c.avhdx"}]}"#
        );
        assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap(), op);
        let reply = WorkerReply::Checkpointed(CheckpointReport {
            pause_us: 1500,
            total_ms: 40,
            rounds: 2,
            memory_written_bytes: 4096,
        });
        let text = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            text,
            r#"{"reply":"checkpointed","pause_us":1500,"total_ms":40,"rounds":2,"memory_written_bytes":4096}"#
        );
        assert_eq!(serde_json::from_str::<WorkerReply>(&text).unwrap(), reply);
    }

    #[test]
    fn lifecycle_ops_and_paused_status() {
        for (op, name) in [
            (WorkerOp::Pause, "pause"),
            (WorkerOp::Resume, "resume"),
            (WorkerOp::Reset, "reset"),
        ] {
            let line = serde_json::to_string(&WorkerRequest::new(op.clone())).unwrap();
            assert_eq!(line, format!(r#"{{"version":1,"op":"{name}"}}"#));
            assert_eq!(serde_json::from_str::<WorkerRequest>(&line).unwrap().op, op);
        }
        // A status from a worker that predates `paused` still reads, as not paused.
        let old = r#"{"reply":"status","running":true,"started_at":1,"console_socket":"/c"}"#;
        let WorkerReply::Status(st) = serde_json::from_str(old).unwrap() else {
            panic!("not a status");
        };
        assert!(!st.paused);
        let paused = WorkerReply::Status(WorkerStatus { paused: true, ..st });
        let text = serde_json::to_string(&paused).unwrap();
        assert!(text.ends_with(r#","paused":true}"#), "{text}");
        assert_eq!(serde_json::from_str::<WorkerReply>(&text).unwrap(), paused);
    }
}
