//! `vireo vm disk add|rm|resize|list`: a VM's disks through `/v1/vms/{vm}/disks` (docs/api.md). On a
//! running or paused VM vireod hot-adds or hot-removes the disk (the guest must probe its disk
//! slots again to see the change); on a VM that is off only its configuration changes.

use clap::Subcommand;
use vireo_api::{DiskFormat, DiskSpec, ResizeDiskReply, ResizeDiskRequest, Vm};

use super::disk_arg::{self, DiskArg};
use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};
use crate::table::render;

#[derive(Subcommand)]
pub enum DiskCommand {
    /// Add a disk (hot add while the VM runs)
    ///
    /// The file must exist inside vireod's storage roots. Running VMs have 8 disk slots in
    /// all; the guest sees a hot-added disk once it probes them again (the probe's RESCAN).
    ///   vireo vm disk add web /srv/vm/data.vhdx
    ///   vireo vm disk add web /srv/vm/scratch.img,format=raw,max-iops=500
    #[command(verbatim_doc_comment)]
    Add {
        /// The VM's name or id.
        vm: String,
        /// PATH[,ro][,format=raw|vhd|vhdx][,max-iops=N][,min-iops=N][,queues=N]
        #[arg(value_parser = disk_arg::parse, value_name = "DISK")]
        disk: DiskArg,
        /// text, or json (the VM object with the disk in its spec).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Remove a disk by serial or index (hot remove while the VM runs); the file stays
    ///
    /// The guest should stop using the disk first: requests it queued but the disk had not
    /// started are dropped.
    #[command(verbatim_doc_comment)]
    Rm {
        /// The VM's name or id.
        vm: String,
        /// The disk's serial, or its index as `vireo vm disk list` shows it.
        disk: String,
        /// text, or json (the VM object without the disk).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// Resize a disk by serial or index (online while the VM runs: the guest is told)
    ///
    /// With automatic checkpoints on (`vm set --auto-checkpoint on`) the VM is checkpointed
    /// first, so `vireo checkpoint apply` brings the old size and data back.
    ///   vireo vm disk resize web 0 --size 20G
    ///   vireo vm disk resize web 0 --size 1G --force   # VM off: shrink over data
    #[command(verbatim_doc_comment)]
    Resize {
        /// The VM's name or id.
        vm: String,
        /// The disk's serial, or its index as `vireo vm disk list` shows it.
        disk: String,
        /// New virtual size, e.g. 20G (a multiple of 512 bytes).
        #[arg(long, value_parser = crate::disk::parse_size)]
        size: u64,
        /// Shrink even over data, which is lost (only while the VM is off).
        #[arg(long)]
        force: bool,
        /// text, or json (the API's answer).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
    /// List a VM's disks: index (the guest's disk order), serial, path, format, QoS.
    List {
        /// The VM's name or id.
        vm: String,
        /// text (a table) or json (the API's disk objects, in index order).
        #[arg(long, value_enum, default_value = "text")]
        output: OutputFormat,
    },
}

pub fn execute(client: &Client, command: DiskCommand) -> Result<(), CliError> {
    match command {
        DiskCommand::Add { vm, disk, output } => add(client, &vm, &disk, output),
        DiskCommand::Rm { vm, disk, output } => remove(client, &vm, &disk, output),
        DiskCommand::Resize {
            vm,
            disk,
            size,
            force,
            output,
        } => resize(client, &vm, &disk, size, force, output),
        DiskCommand::List { vm, output } => {
            let disks: Vec<DiskSpec> = client.get(&format!("{}/disks", super::path(&vm)?))?;
            emit(list(&disks, output))
        }
    }
}

fn add(client: &Client, vm: &str, disk: &DiskArg, output: OutputFormat) -> Result<(), CliError> {
    let path = super::path(vm)?;
    let spec = disk.to_spec().map_err(CliError::bad_input)?;
    let shown = spec.path.display().to_string();
    let after: Vm = client.post(&format!("{path}/disks"), Some(&spec))?;
    if output == OutputFormat::Json {
        return emit(super::view::json(&after));
    }
    // vireod stores resolved paths; the new disk is the one its previous list lacked.
    let (index, added) = after
        .spec
        .disks
        .iter()
        .enumerate()
        .find(|(_, d)| same_file(&d.path, &spec.path))
        .ok_or_else(|| CliError::failed(format!("vireod added {shown} but does not list it")))?;
    let live = if after.state.has_worker() {
        "; hot-added: the guest sees it after it probes its disks again"
    } else {
        ""
    };
    emit(format!(
        "added disk {shown} to VM {} as disk {index} (serial {}){live}\n",
        after.spec.name,
        added.serial.as_deref().unwrap_or("-")
    ))
}

fn remove(client: &Client, vm: &str, which: &str, output: OutputFormat) -> Result<(), CliError> {
    let path = super::path(vm)?;
    if which.is_empty() {
        return Err(CliError::bad_input(
            "no disk given; name it by serial or index (`vireo vm disk list VM`)",
        ));
    }
    client.delete(&format!("{path}/disks/{}", encode(which)))?;
    let after: Vm = client.get(&path)?;
    if output == OutputFormat::Json {
        return emit(super::view::json(&after));
    }
    emit(format!(
        "removed disk {which} from VM {} (the file stays); {} disk(s) left\n",
        after.spec.name,
        after.spec.disks.len()
    ))
}

fn resize(
    client: &Client,
    vm: &str,
    which: &str,
    size_bytes: u64,
    force: bool,
    output: OutputFormat,
) -> Result<(), CliError> {
    let path = super::path(vm)?;
    if which.is_empty() {
        return Err(CliError::bad_input(
            "no disk given; name it by serial or index (`vireo vm disk list VM`)",
        ));
    }
    let reply: ResizeDiskReply = client.post(
        &format!("{path}/disks/{}/resize", encode(which)),
        Some(&ResizeDiskRequest { size_bytes, force }),
    )?;
    if output == OutputFormat::Json {
        return emit(super::view::json(&reply));
    }
    let before = reply
        .automatic_checkpoint
        .map(|c| format!(" (automatic checkpoint {c} taken first)"))
        .unwrap_or_default();
    emit(format!(
        "resized disk {} of VM {vm} to {} bytes{before}\n",
        reply.index, reply.size_bytes
    ))
}

/// `vm disk list`: INDEX SERIAL PATH FORMAT RO MAX-IOPS MIN-IOPS.
fn list(disks: &[DiskSpec], output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return super::view::json(&disks);
    }
    let opt = |n: Option<u32>| n.map_or("-".into(), |n| n.to_string());
    let rows: Vec<Vec<String>> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            vec![
                i.to_string(),
                d.serial.clone().unwrap_or_else(|| "-".into()),
                d.path.display().to_string(),
                match d.format {
                    None => "auto",
                    Some(DiskFormat::Raw) => "raw",
                    Some(DiskFormat::Vhd) => "vhd",
                    Some(DiskFormat::Vhdx) => "vhdx",
                }
                .into(),
                if d.read_only { "yes" } else { "no" }.into(),
                opt(d.max_iops),
                opt(d.min_iops),
            ]
        })
        .collect();
    render(
        &[
            "INDEX", "SERIAL", "PATH", "FORMAT", "RO", "MAX-IOPS", "MIN-IOPS",
        ],
        &rows,
    )
}

/// The same file, however named (vireod stores the resolved path).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    let real = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    real(a) == real(b)
}

/// A path segment: everything but unreserved characters percent-encoded.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded_and_lists_render() {
        assert_eq!(encode("0a1b-2"), "0a1b-2");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        let d = DiskSpec {
            path: "/vm/a.img".into(),
            read_only: true,
            format: Some(DiskFormat::Raw),
            serial: Some("S1".into()),
            max_iops: Some(500),
            min_iops: None,
            queues: None,
        };
        let text = list(std::slice::from_ref(&d), OutputFormat::Text);
        assert!(text.starts_with("INDEX"), "{text}");
        let row = text.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells, ["0", "S1", "/vm/a.img", "raw", "yes", "500", "-"]);
        let json: Vec<DiskSpec> =
            serde_json::from_str(&list(std::slice::from_ref(&d), OutputFormat::Json)).unwrap();
        assert_eq!(json, [d]);
    }
}
