//! `vireo vm create`: the arguments become a `VmSpec`, POSTed to `/v1/vms`; the daemon answers
//! with the VM and its identity (id, MACs, disk serials), which is printed.

use std::path::PathBuf;

use clap::Args;
use vireo_api::{AutoStart, VmSpec, SPEC_VERSION};

use super::auto_checkpoint::{self, OnOff};
use super::disk_arg::{self, DiskArg};
use crate::exit::CliError;
use crate::output::OutputFormat;

/// The console ring when `--console-ring` is not given: `VmSpec`'s own default.
const DEFAULT_CONSOLE_RING: u32 = 64 << 10;

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// The VM's name: 1-64 letters, digits, '.', '_' or '-' (not starting with '.').
    pub name: String,
    /// Guest kernel (PVH ELF or bzImage); a relative path is taken from the current directory.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Guest memory: bytes or with a K, M, G suffix (powers of 1024), a multiple of 4 KiB.
    #[arg(long, default_value = "256M", value_parser = crate::disk::parse_size)]
    pub memory: u64,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// A virtio-blk disk; repeat for more (disk i is the i-th --disk). Without format= the
    /// daemon detects the format from the file.
    #[arg(long = "disk", value_name = disk_arg::FORM, value_parser = disk_arg::parse)]
    pub disks: Vec<DiskArg>,
    /// Bytes of recent console output kept for `vireo vm console --log` [default: 64K].
    #[arg(long, value_name = "SIZE", value_parser = crate::disk::parse_size)]
    pub console_ring: Option<u64>,
    /// Line written to the guest's console to ask it to power off on `vireo vm stop`
    /// (`POWEROFF` for the probe guest, `poweroff` for a root shell on ttyS0).
    #[arg(long, value_name = "LINE")]
    pub shutdown_line: Option<String>,
    /// Start the VM when vireod starts, after DELAY_SECS (default 0).
    #[arg(
        long,
        value_name = "DELAY_SECS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "0"
    )]
    pub auto_start: Option<u32>,
    /// Checkpoint the VM automatically before risky operations (applying a checkpoint,
    /// `vm set` of memory/vCPUs/disks/NICs, disk add/rm/resize) [default: off]. Needs VHDX
    /// disks (docs/checkpoints.md).
    #[arg(long, value_name = "on|off", value_enum)]
    pub auto_checkpoint: Option<OnOff>,
    /// How many automatic checkpoints to keep (1-64; older ones are deleted, yours never)
    /// [default: 3].
    #[arg(long, value_name = "N")]
    pub auto_checkpoint_keep: Option<u32>,
    /// The resource pool (name or id) the VM joins as it is created (`vireo pool create`).
    #[arg(long)]
    pub pool: Option<String>,
    /// text (for people) or json (the API's VM object).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

impl CreateArgs {
    /// The spec to send. Values the daemon judges against the host (memory, vCPUs, paths
    /// under the storage root) are left to it; only what cannot travel is refused here.
    pub fn to_spec(&self) -> Result<VmSpec, CliError> {
        vireo_api::validate_name("name", &self.name)
            .map_err(|e| CliError::bad_input(format!("VM {e}")))?;
        let console_ring_bytes = match self.console_ring {
            None => DEFAULT_CONSOLE_RING,
            Some(n) => u32::try_from(n).map_err(|_| {
                CliError::bad_input(format!("--console-ring {n}: at most 16M (16777216 bytes)"))
            })?,
        };
        let disks = self
            .disks
            .iter()
            .map(DiskArg::to_spec)
            .collect::<Result<Vec<_>, _>>()
            .map_err(CliError::bad_input)?;
        Ok(VmSpec {
            version: SPEC_VERSION,
            name: self.name.clone(),
            vcpus: self.vcpus,
            memory_bytes: self.memory,
            kernel: disk_arg::absolute(&self.kernel).map_err(CliError::bad_input)?,
            cmdline: self.cmdline.clone(),
            initrd: match &self.initrd {
                Some(p) => Some(disk_arg::absolute(p).map_err(CliError::bad_input)?),
                None => None,
            },
            disks,
            nics: vec![],
            console_ring_bytes,
            auto_start: auto_start(self.auto_start),
            auto_checkpoint: auto_checkpoint::apply(
                Default::default(),
                self.auto_checkpoint,
                self.auto_checkpoint_keep,
            ),
            shutdown_line: self.shutdown_line.clone(),
        })
    }
}

/// `--auto-start[=DELAY]` as the spec's automatic start action.
pub fn auto_start(delay: Option<u32>) -> AutoStart {
    AutoStart {
        enabled: delay.is_some(),
        delay_secs: delay.unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use vireo_api::DiskFormat;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: CreateArgs,
    }

    fn parse(args: &[&str]) -> Result<CreateArgs, clap::Error> {
        T::try_parse_from(std::iter::once("create").chain(args.iter().copied())).map(|t| t.args)
    }

    #[test]
    fn defaults_and_absolute_paths() {
        let spec = parse(&["web", "--kernel", "k.elf"])
            .unwrap()
            .to_spec()
            .unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(spec.version, SPEC_VERSION);
        assert_eq!(spec.name, "web");
        assert_eq!(spec.kernel, cwd.join("k.elf"));
        assert_eq!(spec.memory_bytes, 256 << 20);
        assert_eq!(spec.vcpus, 1);
        assert_eq!(spec.console_ring_bytes, 64 << 10);
        assert!(!spec.auto_start.enabled && spec.disks.is_empty() && spec.initrd.is_none());
        assert_eq!(spec.shutdown_line, None);
        // The same default as the API's own when the field is left out of the JSON.
        let json = r#"{"version":1,"name":"a","vcpus":1,"memory_bytes":4096,"kernel":"/k"}"#;
        let api: VmSpec = serde_json::from_str(json).unwrap();
        assert_eq!(api.console_ring_bytes, DEFAULT_CONSOLE_RING);
    }

    #[test]
    fn every_option_lands_in_the_spec() {
        let args = parse(&[
            "db",
            "--kernel",
            "/k",
            "--memory",
            "1.5G",
            "--vcpus",
            "2",
            "--cmdline",
            "console=ttyS0",
            "--initrd",
            "/i",
            "--disk",
            "/d/a.vhdx",
            "--disk",
            "b.img,ro,format=raw",
            "--console-ring",
            "1M",
            "--shutdown-line",
            "POWEROFF",
            "--auto-start=30",
        ])
        .unwrap();
        let spec = args.to_spec().unwrap();
        assert_eq!(spec.memory_bytes, 3 << 29);
        assert_eq!(spec.vcpus, 2);
        assert_eq!(spec.cmdline, "console=ttyS0");
        assert_eq!(spec.initrd, Some(PathBuf::from("/i")));
        assert_eq!(spec.disks.len(), 2);
        assert_eq!(spec.disks[0].path, PathBuf::from("/d/a.vhdx"));
        assert!(spec.disks[1].read_only && spec.disks[1].path.is_absolute());
        assert_eq!(spec.disks[1].format, Some(DiskFormat::Raw));
        assert_eq!(spec.console_ring_bytes, 1 << 20);
        assert_eq!(spec.shutdown_line.as_deref(), Some("POWEROFF"));
        assert_eq!(
            spec.auto_start,
            AutoStart {
                enabled: true,
                delay_secs: 30
            }
        );
    }

    #[test]
    fn auto_start_without_a_delay_does_not_eat_the_next_argument() {
        let args = parse(&["--auto-start", "web", "--kernel", "/k"]).unwrap();
        assert_eq!(args.name, "web");
        assert_eq!(args.to_spec().unwrap().auto_start.delay_secs, 0);
        assert!(args.to_spec().unwrap().auto_start.enabled);
    }

    #[test]
    fn bad_input_is_refused_before_anything_is_sent() {
        let e = parse(&["a/b", "--kernel", "/k"])
            .unwrap()
            .to_spec()
            .unwrap_err();
        assert_eq!(e.status, crate::exit::BAD_INPUT);
        assert!(e.message.contains("\"a/b\""), "{e}");
        let e = parse(&["a", "--kernel", "/k", "--console-ring", "5G"])
            .unwrap()
            .to_spec()
            .unwrap_err();
        assert!(e.message.contains("--console-ring"), "{e}");
        // Parse errors are clap's (exit 2): a size, a disk option.
        assert!(parse(&["a", "--kernel", "/k", "--memory", "lots"]).is_err());
        assert!(parse(&["a", "--kernel", "/k", "--disk", "x,zip"]).is_err());
        assert!(parse(&["a"]).is_err(), "--kernel is required");
    }
}
