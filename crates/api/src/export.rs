//! Export, import and clone (docs/export.md): the request and reply bodies of
//! `POST /v1/vms/{vm}/export`, `POST /v1/vms/import` and `POST /v1/vms/{vm}/clone`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::job::Job;

/// `POST /v1/vms/{vm}/export`: the VM goes to `dir/<vm-name>/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// An existing directory inside vireod's storage roots.
    pub dir: PathBuf,
    /// Export this checkpoint (id or name) instead of the VM as it is now. Without it a
    /// running or paused VM is exported from a temporary live checkpoint.
    #[serde(default)]
    pub checkpoint: Option<String>,
}

/// `POST /v1/vms/import`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// The exported VM's folder (the one holding `vm.json`).
    pub dir: PathBuf,
    /// Copy the files (to `to`, or the default location) instead of using them where they are.
    #[serde(default)]
    pub copy: bool,
    /// Where the copy goes (`to/<name>/`); only with `copy`.
    #[serde(default)]
    pub to: Option<PathBuf>,
    /// A new VM id, new MACs and new disk serials (a saved state is then dropped).
    #[serde(default)]
    pub new_id: bool,
    /// Another name than the exported one.
    #[serde(default)]
    pub name: Option<String>,
    /// Switch renames: a NIC on switch `old` goes on `new`.
    #[serde(default)]
    pub switches: BTreeMap<String, String>,
    /// Another memory size than the exported one.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// `POST /v1/vms/{vm}/clone`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The clone's name.
    pub name: String,
    /// Where the clone's files go (`to/<name>/`); default: the default location.
    #[serde(default)]
    pub to: Option<PathBuf>,
}

/// The 202 answer of import and clone: the job, and what the new VM will be called and where
/// its files go, with any warning (a saved state dropped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportReply {
    pub job: Job,
    pub name: String,
    pub dir: PathBuf,
    #[serde(default)]
    pub warnings: Vec<String>,
}
