//! `POST /v1/vms/{vm}/move-storage`: move every disk of a VM into another folder
//! (docs/storage-migration.md). Answered 202 with a `move_storage` job.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveStorageRequest {
    /// The destination folder (absolute, inside a storage root). Created if missing; none
    /// of the disks' file names may exist in it.
    pub to: PathBuf,
    /// Copy each VHDX chain into one standalone VHDX instead of file by file.
    #[serde(default)]
    pub flatten: bool,
}
