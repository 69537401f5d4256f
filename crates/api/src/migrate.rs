//! Live and quick migration between vireods (docs/migration.md): the REST request that starts
//! a `migrate` job, the progress a job shows, and the small JSON-lines protocol the two
//! vireods speak on the migration listener's mutual-TLS connection.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::spec::VmSpec;
use crate::worker::{CompressMode, MigrateProgress, PostcopyMode};

/// Default `max_downtime_ms`.
pub const DEFAULT_MAX_DOWNTIME_MS: u32 = 300;
/// Streams at most (the wire format's limit).
pub const MAX_STREAMS: u16 = 16;

/// `POST /v1/vms/{vm}/migrate`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The destination vireod's migration listener, `ADDR:PORT` (a literal IP).
    pub to: String,
    /// Live: switch over once the final copy is estimated to fit this (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u32>,
    /// Live: cap on the link, bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<u64>,
    #[serde(default)]
    pub compress: CompressMode,
    /// Live: parallel TLS streams, 1-16 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<u16>,
    #[serde(default)]
    pub postcopy: PostcopyMode,
    /// Quick migration: save, send the saved state, restore on the destination.
    #[serde(default)]
    pub quick: bool,
    /// Shared-nothing migration: the disks are copied to the destination over the same
    /// authenticated channel (docs/migration.md, "Shared-nothing migration"). Live only.
    #[serde(default)]
    pub with_storage: bool,
    /// With `with_storage`: the folder on the destination the copies are created in (inside
    /// its storage roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dest_dir: Option<PathBuf>,
    /// With `with_storage`: keep the source's disk files once the VM runs on the destination
    /// (by default they are deleted then, as Hyper-V does; docs/migration.md). Sent only when
    /// set, so a vireod that predates it still takes the requests that leave it out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_source: bool,
}

/// A disk a shared-nothing migration copies, as the offer describes it: enough for the
/// destination to check its space and create the empty copy before any data moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopiedDisk {
    /// The copy's file name in `dest_dir` (the source's top file name).
    pub file_name: String,
    /// The virtual size the guest sees.
    pub size: u64,
    /// `raw` stays raw; any VHDX chain (or VHD) becomes one dynamic VHDX.
    pub format: crate::spec::DiskFormat,
    /// VHDX block size of the copy (0 for raw).
    #[serde(default)]
    pub block_size: u32,
    pub logical_sector: u32,
    pub physical_sector: u32,
    /// Bytes the source's files take on disk: the space the destination asks for.
    pub allocated: u64,
}

/// Which boot file of the spec a [`BootFile`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootRole {
    Kernel,
    Initrd,
}

impl BootRole {
    /// The `File` message's name when the file travels.
    pub fn file_message_name(self) -> &'static str {
        match self {
            BootRole::Kernel => "boot-kernel",
            BootRole::Initrd => "boot-initrd",
        }
    }
}

impl std::fmt::Display for BootRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootRole::Kernel => "kernel",
            BootRole::Initrd => "initrd",
        })
    }
}

/// Shared-nothing: the VM's kernel or initrd as the source has it, so the destination can
/// find the same file among its own (same length and SHA-256) or ask for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootFile {
    pub role: BootRole,
    /// The source's file name (no folder): the name it gets in `dest_dir` if it travels.
    pub file_name: String,
    pub len: u64,
    /// Lower-case hex.
    pub sha256: String,
}

/// A VM's checkpoint tree as a migration carries it: the records, the files vireod made for it
/// (sent, named `name`) and the user's own files the tree also uses (`shared`: not sent, they
/// must be at the same path on the destination; in a shared-nothing migration they are sent
/// instead, as `files` named `tree-user-*`, into `dest_dir`). Paths are the source's; the
/// destination maps each one onto its own folder for the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointTree {
    /// Oldest first, `current` set on the one the VM runs from.
    pub checkpoints: Vec<crate::Checkpoint>,
    /// The differencing child the VM writes for each checkpointed disk.
    pub tops: Vec<TreeTop>,
    pub files: Vec<TreeFile>,
    pub shared: Vec<PathBuf>,
}

/// `CheckpointTree::tops`: disk `serial` runs on `file`, a child of `parent`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeTop {
    pub serial: String,
    pub file: PathBuf,
    pub parent: PathBuf,
}

/// One file of a checkpoint tree that travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeFile {
    /// The `File` message's name (plain, unique in the migration).
    pub name: String,
    /// Every path the source's records and parent locators use for it.
    pub spellings: Vec<PathBuf>,
    /// `None`: a disk file; `Some(id)`: a file of that checkpoint's saved state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_of: Option<Uuid>,
}

/// How the destination reaches the VM's disks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageMode {
    /// Both hosts see the same disk files at the same paths.
    Shared,
    /// The disks are copied with the VM (shared-nothing).
    Copied,
}

/// The version of the vireod-to-vireod protocol below.
/// 2: shared-nothing migration (`Offer.dest_dir`/`disks`, `DiskData`).
/// 3: network virtualization follows a move (`Accepted.provider_addresses`, `PolicyMoved`);
///    `WhereIs`/`Whereabouts` (a quick migration's source asks after a lost commit answer).
/// 4: a quick migration carries the VM's checkpoint tree (`Offer.checkpoints`).
/// 5: so does a live one on shared storage (`TreeSent`; the running tops travel as the disk
///    copy of `DiskData` into empty children made here, `DiskTransfer::tops`).
/// 6: so does a shared-nothing one: the user's files the tree uses travel too (`File`s named
///    `tree-user-*`, landing in `dest_dir`; `Offer.disks` describes them, not the slots). The
///    offer's shape is unchanged, so a version-5 host reads it and names both versions.
/// 7: the offer carries the source's `--postcopy` (`Offer.postcopy`, only when it is not
///    `auto`), so a destination told `never` can put the VM's RAM on the hugetlb pool.
/// 8: a VM with a vhost-user NIC may move in post-copy (the destination's switch joins it with
///    its own userfaultfd); a version-7 destination would fail such a move at its switch-over.
/// 9: a live offer carries the source's disk slot layout when it has a gap
///    (`Offer.disk_slots`); a version-8 destination would fail such a move at its switch-over.
/// 10: a shared-nothing offer describes the kernel and initrd (`Offer.boot_files`); the
///    destination asks for those it lacks (`Accepted.send_files`, with no address yet), which
///    come as `File`s before `TreeSent`.
/// 11: a shared-nothing offer carrying a checkpoint tree may have disks in none of the
///    checkpoints: `Offer.disks` describes them after the user's files (slot order), and each
///    is copied flattened into `dest_dir` beside the tree (`DiskTransfer::flattened`); a
///    version-10 host would refuse the extra descriptions with a misleading reason.
/// 12: `Whereabouts` may answer `lost {reason}` (the record here is `lost`: its post-copy lost
///    it); a version-11 source cannot read it. `WhereIs` carries no version (it is asked after
///    a restart, perhaps of an upgraded host), so an older source reads the answer as a bad
///    message, which it treats as no answer: the VM stays where it is there, never run twice.
pub const PEER_PROTOCOL_VERSION: u32 = 12;

/// Policy entries a host pushes at most in one `PolicyMoved` (a VM's CAs: a handful).
pub const MAX_MOVED_ENTRIES: usize = 1024;

/// The destination's provider addresses on one of its overlay switches (the switch the
/// VM's NIC names, which has the same name on both hosts).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchProviderAddresses {
    pub switch: String,
    pub provider_addresses: Vec<IpAddr>,
}

/// Where a VM stands on a destination, as `Whereabouts` tells a source that lost the answer to
/// its quick migration's `Commit`, or a live one's `running` (docs/migration.md, "Quick
/// migration after a lost answer"). On the wire: `"here"`, `"arriving"`, `"absent"`, or
/// `{"lost": {"reason": ...}}` (version 12).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmWhereabouts {
    /// It arrived: it runs (or ran) here, so its disks are this host's now; the source must
    /// not run it again.
    Here,
    /// Its arrival is under way (files in, restore not finished): ask again.
    Arriving,
    /// No record of it: it never arrived, or its arrival was undone; the source keeps it.
    Absent,
    /// It arrived and ran here, then its post-copy lost it: the record here is `lost` with
    /// `reason`. Its disks were this host's last, so the source must not run it either.
    Lost { reason: String },
}

/// One line of the vireod-to-vireod protocol (one JSON object per line).
///
/// Source → destination: `Offer`; then (quick) `File`s and `Commit`, (live with a checkpoint
/// tree, after a first `Accepted`) `File`s and `TreeSent`, or (either) `Abort`.
/// Destination → source: `Accepted` or `Refused`; then `Running` (the VM runs here) or
/// `Failed` (it does not; the source keeps it), or `Aborted` (after an `Abort`). A quick
/// migration's source that lost the answer to `Commit` asks on a new connection (`WhereIs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "msg", rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerMsg {
    Offer {
        version: u32,
        vm_id: Uuid,
        /// Normalized (MACs, NIC names and disk serials filled in): the VM's identity moves
        /// with it.
        spec: Box<VmSpec>,
        storage: StorageMode,
        session: Uuid,
        streams: u16,
        quick: bool,
        /// `Copied`: where the copies go on the destination, and the disks (slot order). With
        /// a checkpoint tree, `disks` describes instead the user's files the tree uses (the
        /// base disks the first checkpoint froze), in the order of their `tree-user-*` files:
        /// they arrive whole in `dest_dir` (`allocated` is the file's length); then the disks
        /// in none of the checkpoints (slot order), copied flattened as without a tree.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dest_dir: Option<PathBuf>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        disks: Vec<CopiedDisk>,
        /// The VM's checkpoint tree, whose files follow as `File`s named as in
        /// [`CheckpointTree::files`] (docs/migration.md, "Checkpoints travel with the VM").
        /// Live: every file but the running tops, then `TreeSent`; shared-nothing
        /// (`Copied`) too, with the user's files as `tree-user-*` files.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        checkpoints: Option<Box<CheckpointTree>>,
        /// Live: the source's `--postcopy`. Unless `never`, the destination's RAM must take
        /// page-by-page fills (userfaultfd), so it stays off the hugetlb pool. Left out when
        /// `auto`, so an older host still reads the offer and names both versions.
        #[serde(default, skip_serializing_if = "PostcopyMode::is_auto")]
        postcopy: PostcopyMode,
        /// Live: the source's disk slots (`true`: holds a disk) when a hot removal left a gap
        /// in them, so the destination's skeleton puts each disk in the same slot. Left out
        /// when the disks fill the first slots.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        disk_slots: Vec<bool>,
        /// Shared-nothing: the kernel and (if any) initrd, which the destination may lack.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        boot_files: Vec<BootFile>,
    },
    /// The first line of a second connection a shared-nothing migration's source worker
    /// opens to the destination vireod: the disk data of `session` follows
    /// (`vireo_migration::disk` records). Answered `Accepted` or `Refused`.
    DiskData {
        session: Uuid,
    },
    /// Live: `listen_addr` is the destination worker's address for `MigrateOut`.
    /// `provider_addresses`: the destination's PAs on each overlay switch of the VM's NICs,
    /// so the source can point the VM's CAs there once it moved (docs/netvirt.md).
    Accepted {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        listen_addr: Option<SocketAddr>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        provider_addresses: Vec<SwitchProviderAddresses>,
        /// Shared-nothing, with no `listen_addr` yet: the boot files (`BootRole::
        /// file_message_name`) this host lacks; they come as `File`s before `TreeSent`.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        send_files: Vec<String>,
    },
    /// The first line of a connection from a host a VM just moved to (`vireod
    /// --netvirt-peer`): where the VM's CAs are now. The receiver moves the entries it holds
    /// for those CAs (same routing domain and MAC) and answers `PolicyUpdated` or `Refused`.
    PolicyMoved {
        version: u32,
        entries: Vec<vireo_netconfig::PolicyEntry>,
    },
    /// How many stored entries the receiver of `PolicyMoved` changed.
    PolicyUpdated {
        updated: u32,
    },
    Refused {
        reason: String,
    },
    /// Quick: a file of the saved state; exactly `len` raw bytes follow the line.
    File {
        name: PathBuf,
        len: u64,
    },
    /// Quick: every file was sent; restore and run.
    Commit,
    /// Live, after an `Accepted` with no address: every file the destination needs before its
    /// worker was sent — the checkpoint tree's but the running tops, and the boot files it
    /// asked for (`Accepted.send_files`). The destination relinks the tree, makes an empty
    /// child of each top's arrived parent for the disk copy, puts the boot files in place, and
    /// answers `Accepted` with its worker's address (or `Failed`).
    TreeSent,
    Abort {
        reason: String,
    },
    Aborted,
    Running,
    Failed {
        reason: String,
    },
    /// The answer to `Abort` (version 8) when the worker here had resumed the VM in post-copy
    /// and lost it: the record here is `lost` with `reason`; the source forgets the VM.
    LostHere {
        reason: String,
    },
    /// The first line of a connection from a quick migration's source whose connection
    /// ended after it sent `Commit` without an answer: where is `vm_id`? Answered
    /// `Whereabouts`.
    WhereIs {
        vm_id: Uuid,
    },
    /// The answer to `WhereIs`. A source that cannot read it (a newer destination's answer)
    /// treats it as no answer.
    Whereabouts {
        here: VmWhereabouts,
    },
}

/// The live view of a `migrate` job (`Job::migration`): where the worker's copy stands, plus
/// what the daemons add.
pub type MigrationStatus = MigrateProgress;

#[cfg(test)]
mod tests {
    use super::*;

    /// The three answers a version-11 peer knows keep their spelling (a new source still
    /// reads an older destination's answer); `lost` carries its reason.
    #[test]
    fn whereabouts_keep_their_old_spelling_and_lost_carries_the_reason() {
        for (here, line) in [
            (
                VmWhereabouts::Here,
                r#"{"msg":"whereabouts","here":"here"}"#,
            ),
            (
                VmWhereabouts::Arriving,
                r#"{"msg":"whereabouts","here":"arriving"}"#,
            ),
            (
                VmWhereabouts::Absent,
                r#"{"msg":"whereabouts","here":"absent"}"#,
            ),
            (
                VmWhereabouts::Lost {
                    reason: "12 pages still there".into(),
                },
                r#"{"msg":"whereabouts","here":{"lost":{"reason":"12 pages still there"}}}"#,
            ),
        ] {
            let msg = PeerMsg::Whereabouts { here };
            assert_eq!(serde_json::to_string(&msg).unwrap(), line);
            assert_eq!(serde_json::from_str::<PeerMsg>(line).unwrap(), msg);
        }
    }

    /// An answer this host does not know (a newer peer's) is an error to handle, not a panic
    /// and not one of the known answers.
    #[test]
    fn an_unknown_whereabouts_is_an_error() {
        for line in [
            r#"{"msg":"whereabouts","here":"elsewhere"}"#,
            r#"{"msg":"whereabouts","here":{"moved":{"to":"192.0.2.9:7070"}}}"#,
            r#"{"msg":"whereabouts","here":{"lost":{}}}"#,
        ] {
            assert!(serde_json::from_str::<PeerMsg>(line).is_err(), "{line}");
        }
    }

    #[test]
    fn keep_source_is_sent_only_when_set_and_defaults_to_off() {
        let plain = MigrateRequest {
            to: "192.0.2.7:7070".into(),
            with_storage: true,
            dest_dir: Some("/srv/vms".into()),
            ..Default::default()
        };
        // A vireod that predates the field refuses unknown fields: leave it out unless set.
        let json = serde_json::to_value(&plain).unwrap();
        assert!(json.get("keep_source").is_none(), "{json}");
        let kept = MigrateRequest {
            keep_source: true,
            ..plain.clone()
        };
        assert_eq!(serde_json::to_value(&kept).unwrap()["keep_source"], true);
        // An older client's request (no field) deletes, as the default says.
        let old: MigrateRequest = serde_json::from_str(
            r#"{"to": "192.0.2.7:7070", "with_storage": true, "dest_dir": "/srv/vms"}"#,
        )
        .unwrap();
        assert_eq!(old, plain);
        assert!(!old.keep_source);
    }
}
