//! The store's errors. Each names the value at fault; `vireod` maps them onto `ApiError`
//! (NameTaken/MacTaken/IllegalTransition → 409, NotFound → 404, Spec → 422).

use std::path::PathBuf;

use uuid::Uuid;
use vireo_api::{IllegalTransition, JobState, MacAddr, SpecError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a VM named {name:?} already exists; choose another name or rename that VM")]
    NameTaken { name: String },
    #[error(
        "MAC address {mac} is already used by another VM's NIC; leave it out to get a fresh one"
    )]
    MacTaken { mac: MacAddr },
    #[error("a VM with id {id} already exists; import with a new id (--new-id)")]
    IdTaken { id: Uuid },
    #[error("no VM {key:?} (neither a VM id nor a VM name)")]
    NotFound { key: String },
    #[error(
        "no pool {key:?} (neither a pool id nor a pool name); `vireo pool list` shows the pools"
    )]
    PoolNotFound { key: String },
    #[error("a pool named {name:?} already exists; choose another name")]
    PoolNameTaken { name: String },
    #[error(
        "pool {name:?} still has {members} VM(s); remove them first, or delete with force=true \
         (the VMs stay, outside any pool)"
    )]
    PoolNotEmpty { name: String, members: usize },
    #[error("VM {vm:?} is already in pool {pool:?}; remove it from that pool first")]
    InAnotherPool { vm: String, pool: String },
    #[error("VM {vm:?} is not in pool {pool:?}")]
    NotAMember { vm: String, pool: String },
    #[error("job {id} has already ended ({state:?})")]
    JobEnded { id: Uuid, state: JobState },
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    IllegalTransition(#[from] IllegalTransition),
    #[error(
        "{} has schema version {found}, newer than this vireod knows ({supported}); \
         run the vireod that wrote it, or a newer one",
        path.display()
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{} is in use by another vireod (lock held on {}); stop it first", dir.display(), lock.display())]
    Locked { dir: PathBuf, lock: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stored VM {id} is unreadable ({detail}); the database was changed outside vireod")]
    Corrupt { id: String, detail: String },
    #[error("inventory database: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.into();
    move |source| StoreError::Io { path, source }
}
