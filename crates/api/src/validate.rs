//! Semantic validation of a `VmSpec` against the host's limits (HTTP 422). Malformed JSON and
//! unknown fields are serde's job (HTTP 400); this is about values.
//!
//! Names (VMs, switches) are 1–64 bytes of `[A-Za-z0-9._-]`, not starting with '.', without
//! "..": safe as a path component and in a shell, and equal to what `ls` shows. So no '/', NUL,
//! spaces or control characters, by construction. A VM may not be named `import`: that is
//! the path of the import endpoint under `/v1/vms/`.

use std::path::Path;

use crate::identity::MAX_SERIAL_BYTES;
use crate::spec::{VmSpec, MAX_AUTO_CHECKPOINT_KEEP, SPEC_VERSION};

pub const MAX_NAME_BYTES: usize = 64;
pub const MIN_MEMORY_BYTES: u64 = 1 << 20;
pub const MEMORY_ALIGN: u64 = 4096;
pub const MAX_DISKS: usize = 64;
pub const MAX_NICS: usize = 64;
pub const MAX_CMDLINE_BYTES: usize = 4096;
pub const MAX_CONSOLE_RING_BYTES: u32 = 16 << 20;
pub const MAX_AUTO_START_DELAY_SECS: u32 = 24 * 3600;
pub const MAX_SHUTDOWN_LINE_BYTES: usize = 256;
/// Largest `max_iops`/`min_iops`: ten million 8 KiB IOs a second (80 GB/s) is beyond any disk a
/// VM gets; a larger number is a typo, not a policy.
pub const MAX_IOPS: u32 = 10_000_000;

/// What this host allows; the daemon derives it from the machine (CPUs, RAM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory_bytes: u64,
}

/// A field with a value this host cannot accept, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field} = {value:?}: {problem}")]
pub struct SpecError {
    /// JSON path of the field, e.g. `disks[1].path`.
    pub field: String,
    pub value: String,
    pub problem: String,
}

fn err(field: impl Into<String>, value: impl ToString, problem: impl Into<String>) -> SpecError {
    SpecError {
        field: field.into(),
        value: value.to_string(),
        problem: problem.into(),
    }
}

/// Checks a VM or switch name (see the module doc); `field` names it in the error.
pub fn validate_name(field: &str, name: &str) -> Result<(), SpecError> {
    let problem = if name.is_empty() || name.len() > MAX_NAME_BYTES {
        "a name is 1 to 64 bytes"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        "a name may contain only letters, digits, '.', '_' and '-'"
    } else if name.starts_with('.') {
        "a name may not start with '.'"
    } else if name.contains("..") {
        "a name may not contain '..'"
    } else {
        return Ok(());
    };
    Err(err(field, name, problem))
}

/// Names that are path segments of the API under `/v1/vms/`: a VM so named could not be
/// addressed (`GET /v1/vms/import` is the import endpoint's path).
pub const RESERVED_VM_NAMES: &[&str] = &["import"];

/// Checks a VM's name: [`validate_name`]'s rules, and not one of [`RESERVED_VM_NAMES`].
pub fn validate_vm_name(field: &str, name: &str) -> Result<(), SpecError> {
    validate_name(field, name)?;
    if RESERVED_VM_NAMES.contains(&name) {
        return Err(err(
            field,
            name,
            "this name is reserved (an API path under /v1/vms/); choose another",
        ));
    }
    Ok(())
}

fn absolute(field: String, path: &Path) -> Result<(), SpecError> {
    if path.is_absolute() {
        Ok(())
    } else {
        Err(err(field, path.display(), "the path must be absolute"))
    }
}

pub fn validate_spec(spec: &VmSpec, limits: &Limits) -> Result<(), SpecError> {
    if spec.version != SPEC_VERSION {
        return Err(err(
            "version",
            spec.version,
            format!("only spec version {SPEC_VERSION} is known"),
        ));
    }
    validate_vm_name("name", &spec.name)?;
    if !(1..=limits.max_vcpus).contains(&spec.vcpus) {
        return Err(err(
            "vcpus",
            spec.vcpus,
            format!("must be 1 to {}", limits.max_vcpus),
        ));
    }
    let mem = spec.memory_bytes;
    if !mem.is_multiple_of(MEMORY_ALIGN) {
        return Err(err("memory_bytes", mem, "must be a multiple of 4 KiB"));
    }
    if !(MIN_MEMORY_BYTES..=limits.max_memory_bytes).contains(&mem) {
        let max = limits.max_memory_bytes;
        return Err(err(
            "memory_bytes",
            mem,
            format!("must be 1 MiB to {max} bytes (this host)"),
        ));
    }
    absolute("kernel".into(), &spec.kernel)?;
    if let Some(initrd) = &spec.initrd {
        absolute("initrd".into(), initrd)?;
    }
    if spec.cmdline.len() > MAX_CMDLINE_BYTES || spec.cmdline.contains('\0') {
        return Err(err("cmdline", &spec.cmdline, "at most 4096 bytes, no NUL"));
    }
    let keep = spec.auto_checkpoint.keep;
    if !(1..=MAX_AUTO_CHECKPOINT_KEEP).contains(&keep) {
        return Err(err(
            "auto_checkpoint.keep",
            keep,
            format!("must be 1 to {MAX_AUTO_CHECKPOINT_KEEP}"),
        ));
    }
    if spec.console_ring_bytes > MAX_CONSOLE_RING_BYTES {
        return Err(err(
            "console_ring_bytes",
            spec.console_ring_bytes,
            "at most 16 MiB",
        ));
    }
    if let Some(line) = &spec.shutdown_line {
        let printable = line.chars().all(|c| !c.is_control());
        if line.is_empty() || line.len() > MAX_SHUTDOWN_LINE_BYTES || !printable {
            return Err(err(
                "shutdown_line",
                line,
                "1 to 256 bytes, no control characters (the newline is added)",
            ));
        }
    }
    if spec.auto_start.delay_secs > MAX_AUTO_START_DELAY_SECS {
        return Err(err(
            "auto_start.delay_secs",
            spec.auto_start.delay_secs,
            "at most one day",
        ));
    }
    if spec.disks.len() > MAX_DISKS {
        return Err(err(
            "disks",
            spec.disks.len(),
            format!("at most {MAX_DISKS} disks"),
        ));
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        absolute(format!("disks[{i}].path"), &disk.path)?;
        if let Some(serial) = &disk.serial {
            let printable = serial.bytes().all(|b| b.is_ascii_graphic());
            if serial.is_empty() || serial.len() > MAX_SERIAL_BYTES || !printable {
                let field = format!("disks[{i}].serial");
                return Err(err(field, serial, "1 to 20 printable ASCII characters"));
            }
            if spec.disks[..i]
                .iter()
                .any(|d| d.serial.as_ref() == Some(serial))
            {
                return Err(err(
                    format!("disks[{i}].serial"),
                    serial,
                    "two disks share it",
                ));
            }
        }
    }
    for (i, disk) in spec.disks.iter().enumerate() {
        validate_qos(i, disk.max_iops, disk.min_iops)?;
        if let Some(q) = disk.queues {
            if !(1..=MAX_DISK_QUEUES).contains(&q) {
                return Err(err(
                    format!("disks[{i}].queues"),
                    q,
                    format!(
                        "a disk has 1 to {MAX_DISK_QUEUES} request queues; leave the field \
                         out for one per vCPU"
                    ),
                ));
            }
        }
    }
    if spec.nics.len() > MAX_NICS {
        return Err(err(
            "nics",
            spec.nics.len(),
            format!("at most {MAX_NICS} NICs"),
        ));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        validate_name(&format!("nics[{i}].switch"), &nic.switch)?;
        if let Some(name) = &nic.name {
            validate_name(&format!("nics[{i}].name"), name)?;
            if spec.nics[..i].iter().any(|n| n.name == nic.name) {
                return Err(err(format!("nics[{i}].name"), name, "two NICs share it"));
            }
        }
        if nic.vlan.is_some() && nic.policy.vlan.is_some() {
            return Err(err(
                format!("nics[{i}].vlan"),
                nic.vlan.unwrap_or_default(),
                "give either vlan (an access port) or policy.vlan, not both",
            ));
        }
        if let Some(mac) = nic.mac {
            if !mac.is_unicast() || mac.0 == [0; 6] {
                return Err(err(
                    format!("nics[{i}].mac"),
                    mac,
                    "must be a non-zero unicast address",
                ));
            }
            if spec.nics[..i].iter().any(|n| n.mac == Some(mac)) {
                return Err(err(format!("nics[{i}].mac"), mac, "two NICs share it"));
            }
        }
        if let Some(vlan) = nic.vlan {
            if !(1..=4094).contains(&vlan) {
                return Err(err(
                    format!("nics[{i}].vlan"),
                    vlan,
                    "a VLAN id is 1 to 4094",
                ));
            }
        }
        if let Some(q) = nic.queues {
            if !(1..=MAX_NIC_QUEUE_PAIRS).contains(&q) {
                return Err(err(
                    format!("nics[{i}].queues"),
                    q,
                    format!(
                        "a NIC has 1 to {MAX_NIC_QUEUE_PAIRS} queue pairs (the switch's \
                         vhost-user port serves that many); leave the field out for one"
                    ),
                ));
            }
        }
        if let Some(v) = &nic.virtual_subnet {
            validate_virtual_subnet(i, v)?;
        }
    }
    Ok(())
}

/// A NIC's virtual subnet: a 24-bit VSID and 1 to [`MAX_NIC_CAS`] distinct unicast CAs. Whether
/// the switch has that subnet, and whether another port holds a CA, the switch decides.
fn validate_virtual_subnet(i: usize, v: &crate::spec::NicVirtualSubnet) -> Result<(), SpecError> {
    let max = vireo_netconfig::MAX_VSID;
    if !(1..=max).contains(&v.vsid) {
        return Err(err(
            format!("nics[{i}].virtual_subnet.vsid"),
            v.vsid,
            format!("a VSID is 1 to {max} (24 bits)"),
        ));
    }
    if v.ca.is_empty() || v.ca.len() > MAX_NIC_CAS {
        return Err(err(
            format!("nics[{i}].virtual_subnet.ca"),
            v.ca.len(),
            format!("give 1 to {MAX_NIC_CAS} customer addresses"),
        ));
    }
    for (j, ca) in v.ca.iter().enumerate() {
        if ca.is_unspecified() || ca.is_multicast() || ca.is_loopback() {
            return Err(err(
                format!("nics[{i}].virtual_subnet.ca[{j}]"),
                ca,
                "a customer address is a unicast address (not unspecified, loopback or multicast)",
            ));
        }
        if v.ca[..j].contains(ca) {
            return Err(err(
                format!("nics[{i}].virtual_subnet.ca[{j}]"),
                ca,
                "listed twice",
            ));
        }
    }
    Ok(())
}

/// Most virtio-blk request queues one disk has (the device's limit, `vireo_virtio`'s
/// `MAX_QUEUES`; this crate sits below it and keeps its own copy).
pub const MAX_DISK_QUEUES: u16 = 16;

/// Most virtio-net queue pairs one NIC has: what a switch's vhost-user port serves
/// (`vireo_vswitch`'s `MAX_QUEUE_PAIRS`, equal to `vireo_vmm::vhost_user_net::MAX_QUEUE_PAIRS`;
/// this crate sits below both and keeps its own copy).
pub const MAX_NIC_QUEUE_PAIRS: u16 = 4;

/// Most customer addresses one NIC has (a VM with a few aliases fits; the policy table holds
/// one entry per CA).
pub const MAX_NIC_CAS: usize = 16;

/// A disk's storage QoS: each value 1 to [`MAX_IOPS`] (leave it out for none), and a minimum no
/// higher than the maximum (the limiter would make every busy moment an alert).
fn validate_qos(i: usize, max: Option<u32>, min: Option<u32>) -> Result<(), SpecError> {
    for (name, value) in [("max_iops", max), ("min_iops", min)] {
        if let Some(v) = value {
            if !(1..=MAX_IOPS).contains(&v) {
                return Err(err(
                    format!("disks[{i}].{name}"),
                    v,
                    format!(
                        "IOPS (normalized to 8 KiB) are 1 to {MAX_IOPS}; leave the field out \
                         for no {}",
                        if name == "max_iops" {
                            "limit"
                        } else {
                            "minimum"
                        }
                    ),
                ));
            }
        }
    }
    if let (Some(max), Some(min)) = (max, min) {
        if min > max {
            return Err(err(
                format!("disks[{i}].min_iops"),
                min,
                format!(
                    "above max_iops ({max}): the limit would keep the disk under its minimum \
                     whenever the guest is busy; lower min_iops or raise max_iops"
                ),
            ));
        }
    }
    Ok(())
}
