//! `vireo vm set`: read the VM's spec, change what the options say, write it back
//! (GET `/v1/vms/{vm}`, then PUT `/v1/vms/{vm}/spec`). The daemon refuses it while the VM runs
//! (409), except a change of the automatic checkpoint options alone. Disks that stay keep their serials; removed disks go before added ones are appended,
//! so `--rm-disk` numbers are the ones `vm show` printed.

use clap::Args;
use vireo_api::{Vm, VmSpec};

use super::auto_checkpoint::{self, OnOff};
use super::create::auto_start;
use super::disk_arg::{self, DiskArg};
use crate::api_client::Client;
use crate::exit::CliError;
use crate::output::{emit, OutputFormat};

#[derive(Args, Debug)]
pub struct SetArgs {
    /// The VM's name or id.
    pub vm: String,
    /// Guest memory: bytes or with a K, M, G suffix (powers of 1024).
    #[arg(long, value_parser = crate::disk::parse_size)]
    pub memory: Option<u64>,
    /// Virtual CPUs.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Kernel command line ("" clears it).
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Line written to the console to ask the guest to power off ("" removes it).
    #[arg(long, value_name = "LINE")]
    pub shutdown_line: Option<String>,
    /// Start the VM when vireod starts, after DELAY_SECS (default 0).
    #[arg(
        long,
        value_name = "DELAY_SECS",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "0",
        conflicts_with = "no_auto_start"
    )]
    pub auto_start: Option<u32>,
    /// Do not start the VM when vireod starts.
    #[arg(long)]
    pub no_auto_start: bool,
    /// Checkpoint the VM automatically before risky operations (also while it runs; a
    /// change of this alone is allowed in any state).
    #[arg(long, value_name = "on|off", value_enum)]
    pub auto_checkpoint: Option<OnOff>,
    /// How many automatic checkpoints to keep (1-64; older ones are deleted, yours never).
    #[arg(long, value_name = "N")]
    pub auto_checkpoint_keep: Option<u32>,
    /// Add a disk (after the existing ones); repeat for more.
    #[arg(long, value_name = disk_arg::FORM, value_parser = disk_arg::parse)]
    pub add_disk: Vec<DiskArg>,
    /// Remove disk N (as `vm show` numbers them, from 0); repeat for more.
    #[arg(long, value_name = "N")]
    pub rm_disk: Vec<usize>,
    /// text or json (the API's VM object, as changed).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

impl SetArgs {
    fn changes_nothing(&self) -> bool {
        self.memory.is_none()
            && self.vcpus.is_none()
            && self.cmdline.is_none()
            && self.shutdown_line.is_none()
            && self.auto_start.is_none()
            && !self.no_auto_start
            && self.auto_checkpoint.is_none()
            && self.auto_checkpoint_keep.is_none()
            && self.add_disk.is_empty()
            && self.rm_disk.is_empty()
    }

    /// `spec` with the options applied; a disk number the VM lacks is bad input.
    pub fn apply(&self, mut spec: VmSpec) -> Result<VmSpec, CliError> {
        if let Some(m) = self.memory {
            spec.memory_bytes = m;
        }
        if let Some(n) = self.vcpus {
            spec.vcpus = n;
        }
        if let Some(c) = &self.cmdline {
            spec.cmdline = c.clone();
        }
        if let Some(line) = &self.shutdown_line {
            spec.shutdown_line = (!line.is_empty()).then(|| line.clone());
        }
        if self.auto_start.is_some() {
            spec.auto_start = auto_start(self.auto_start);
        }
        if self.no_auto_start {
            spec.auto_start = auto_start(None);
        }
        spec.auto_checkpoint = auto_checkpoint::apply(
            spec.auto_checkpoint,
            self.auto_checkpoint,
            self.auto_checkpoint_keep,
        );
        let mut remove = self.rm_disk.clone();
        remove.sort_unstable();
        remove.dedup();
        if let Some(&n) = remove.iter().find(|&&n| n >= spec.disks.len()) {
            return Err(CliError::bad_input(format!(
                "--rm-disk {n}: VM {} has {} disk(s){}; `vireo vm show {}` numbers them",
                spec.name,
                spec.disks.len(),
                match spec.disks.len() {
                    0 => String::new(),
                    len => format!(", 0 to {}", len - 1),
                },
                spec.name
            )));
        }
        for n in remove.into_iter().rev() {
            spec.disks.remove(n);
        }
        for disk in &self.add_disk {
            spec.disks
                .push(disk.to_spec().map_err(CliError::bad_input)?);
        }
        Ok(spec)
    }
}

pub fn execute(client: &Client, args: SetArgs) -> Result<(), CliError> {
    let path = super::path(&args.vm)?;
    if args.changes_nothing() {
        return Err(CliError::bad_input(format!(
            "vm set {}: nothing to change; give an option (see `vireo vm set --help`)",
            args.vm
        )));
    }
    let vm: Vm = client.get(&path)?;
    let spec = args.apply(vm.spec)?;
    let vm: Vm = client.put(&format!("{path}/spec"), &spec)?;
    emit(super::view::show(&vm, args.output))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::view::tests::sample;
    use clap::Parser;
    use vireo_api::VmState;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        args: SetArgs,
    }

    fn parse(args: &[&str]) -> Result<SetArgs, clap::Error> {
        T::try_parse_from(std::iter::once("set").chain(args.iter().copied())).map(|t| t.args)
    }

    fn two_disks() -> VmSpec {
        let mut spec = sample("web", VmState::Off).spec;
        let mut second = spec.disks[0].clone();
        second.path = "/d/b.vhdx".into();
        second.serial = Some("s-b".into());
        spec.disks.push(second);
        spec
    }

    #[test]
    fn removed_disks_go_first_and_the_rest_keep_their_serials() {
        let spec = two_disks();
        let args = parse(&[
            "web",
            "--rm-disk",
            "0",
            "--add-disk",
            "/d/c.img,ro",
            "--memory",
            "1G",
        ])
        .unwrap();
        let new = args.apply(spec.clone()).unwrap();
        assert_eq!(new.memory_bytes, 1 << 30);
        assert_eq!(new.disks.len(), 2);
        assert_eq!(new.disks[0], spec.disks[1], "disk b keeps its serial");
        assert_eq!(new.disks[1].path, std::path::PathBuf::from("/d/c.img"));
        assert_eq!(new.disks[1].serial, None, "the daemon assigns it");
        // Untouched fields stay.
        assert_eq!(new.vcpus, spec.vcpus);
        assert_eq!(new.nics, spec.nics);
    }

    #[test]
    fn flags_clear_and_set() {
        let spec = two_disks();
        let new = parse(&[
            "web",
            "--shutdown-line",
            "",
            "--auto-start=5",
            "--cmdline",
            "",
        ])
        .unwrap()
        .apply(spec.clone())
        .unwrap();
        assert_eq!(new.shutdown_line, None);
        assert!(new.auto_start.enabled && new.auto_start.delay_secs == 5);
        let off = parse(&["web", "--no-auto-start"])
            .unwrap()
            .apply(new)
            .unwrap();
        assert!(!off.auto_start.enabled);
        assert!(parse(&["web", "--auto-start", "--no-auto-start"]).is_err());
    }

    #[test]
    fn a_missing_disk_or_no_change_is_bad_input() {
        let e = parse(&["web", "--rm-disk", "2"])
            .unwrap()
            .apply(two_disks())
            .unwrap_err();
        assert_eq!(e.status, crate::exit::BAD_INPUT);
        assert!(
            e.message
                .contains("--rm-disk 2: VM web has 2 disk(s), 0 to 1"),
            "{e}"
        );
        assert!(parse(&["web"]).unwrap().changes_nothing());
        assert!(!parse(&["web", "--vcpus", "2"]).unwrap().changes_nothing());
        let on = parse(&[
            "web",
            "--auto-checkpoint",
            "on",
            "--auto-checkpoint-keep",
            "5",
        ])
        .unwrap();
        assert!(!on.changes_nothing());
        let spec = on.apply(two_disks()).unwrap();
        assert!(spec.auto_checkpoint.enabled && spec.auto_checkpoint.keep == 5);
        assert!(parse(&["web", "--auto-checkpoint", "maybe"]).is_err());
    }
}
