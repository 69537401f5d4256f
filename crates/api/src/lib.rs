//! API types shared by `vireod` (crates/hostd) and the `vireo` CLI.
//!
//! Everything here is data and pure functions: the VM configuration (`spec`), the identity a VM
//! gets once at creation (`identity`), the lifecycle state machine (`state`), the validation of a
//! spec against host limits (`validate`) and the one error shape of the API (`error`). No I/O, so
//! the daemon, the CLI and tests share exactly the same rules.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod error;
pub mod export;
pub mod host_trust;
pub mod identity;
pub mod job;
pub mod mac;
pub mod metering;
pub mod migrate;
pub mod pool;
pub mod rest;
pub mod spec;
pub mod state;
pub mod storage_move;
pub mod switch;
pub mod switch_rest;
pub mod validate;
pub mod vm;
pub mod worker;

pub use checkpoint::{
    ApplyCheckpointRequest, Checkpoint, CheckpointCapture, CheckpointDisk, CreateCheckpointRequest,
    UpdateCheckpointRequest,
};
pub use error::{ApiError, ApiErrorCode};
pub use export::{CloneRequest, ExportRequest, ImportReply, ImportRequest};
pub use host_trust::{HostIdentityInfo, TrustedHost};
pub use identity::VmIdentity;
pub use job::{Job, JobKind, JobState};
pub use mac::MacAddr;
pub use metering::{CpuUsage, DiskUsage, MemoryUsage, NicUsage, VmMetrics};
pub use pool::{
    AddPoolMemberRequest, CreatePoolRequest, Pool, PoolMember, PoolMemberMetrics, PoolMetrics,
};
pub use rest::{HostInfo, RenameRequest, ResizeDiskReply, ResizeDiskRequest, StopRequest};
pub use spec::{
    normalized_ios, AutoCheckpoint, AutoStart, DiskFormat, DiskSpec, NicPolicy, NicSpec,
    NicVirtualSubnet, VmSpec, DEFAULT_AUTO_CHECKPOINT_KEEP, MAX_AUTO_CHECKPOINT_KEEP,
    NORMALIZED_IO_BYTES, SPEC_VERSION,
};
pub use state::{transition, Action, IllegalTransition, VmState};
pub use validate::{validate_name, validate_spec, validate_vm_name, Limits, SpecError};
pub use vm::Vm;
