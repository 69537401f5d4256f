//! How VMs print: a table for `vm list`, aligned `key: value` lines for `vm show` (and after
//! create, set, rename), the API's JSON for `--output json`.

use vireo_api::Vm;

use crate::disk::human;
use crate::output::OutputFormat;
use crate::table::{render, utc};

/// `vm list`: NAME STATE VCPUS MEMORY ID (and REASON when a VM is critical or lost).
pub fn list(vms: &[Vm], output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return json(&vms);
    }
    let with_reason = vms.iter().any(|vm| vm.state.reason().is_some());
    let mut header = vec!["NAME", "STATE", "VCPUS", "MEMORY", "ID"];
    if with_reason {
        header.push("REASON");
    }
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|vm| {
            let mut row = vec![
                vm.spec.name.clone(),
                vm.state.name().to_string(),
                vm.spec.vcpus.to_string(),
                human(vm.spec.memory_bytes),
                vm.id().to_string(),
            ];
            if with_reason {
                row.push(vm.state.reason().unwrap_or("-").to_string());
            }
            row
        })
        .collect();
    render(&header, &rows)
}

/// `vm show`: every field of the spec and the identity a person needs.
pub fn show(vm: &Vm, output: OutputFormat) -> String {
    if output == OutputFormat::Json {
        return json(vm);
    }
    let spec = &vm.spec;
    let mut lines: Vec<(&str, String)> = vec![
        ("name", spec.name.clone()),
        ("id", vm.id().to_string()),
        ("state", vm.state.to_string()),
        ("vcpus", spec.vcpus.to_string()),
        ("memory", human(spec.memory_bytes)),
        ("kernel", spec.kernel.display().to_string()),
        ("cmdline", or_dash(&spec.cmdline)),
        (
            "initrd",
            spec.initrd
                .as_ref()
                .map_or("-".into(), |p| p.display().to_string()),
        ),
    ];
    for (i, disk) in spec.disks.iter().enumerate() {
        let format = disk
            .format
            .map_or("detect".to_string(), |f| format!("{f:?}").to_lowercase());
        let mut qos = String::new();
        if let Some(n) = disk.max_iops {
            qos.push_str(&format!(", max {n} IOPS"));
        }
        if let Some(n) = disk.min_iops {
            qos.push_str(&format!(", min {n} IOPS"));
        }
        lines.push((
            "disk",
            format!(
                "{i}: {} ({}, {format}, serial {}{qos})",
                disk.path.display(),
                if disk.read_only { "ro" } else { "rw" },
                disk.serial.as_deref().unwrap_or("-"),
            ),
        ));
    }
    for (i, nic) in spec.nics.iter().enumerate() {
        let mac = nic.mac.map_or("-".to_string(), |m| m.to_string());
        let name = nic.name.clone().unwrap_or_else(|| i.to_string());
        lines.push((
            "nic",
            format!(
                "{name}: mac {mac} on switch {} ({}{})",
                nic.switch,
                super::nic::vlan_text(nic),
                super::nic::pairs_text(nic)
            ),
        ));
    }
    lines.push(("console ring", human(spec.console_ring_bytes.into())));
    lines.push((
        "auto start",
        if spec.auto_start.enabled {
            format!("yes, after {} s", spec.auto_start.delay_secs)
        } else {
            "no".to_string()
        },
    ));
    lines.push((
        // Not "auto checkpoint": a label longer than the others would shift every line.
        "checkpoints",
        super::auto_checkpoint::text(&spec.auto_checkpoint),
    ));
    lines.push((
        "shutdown line",
        spec.shutdown_line.clone().unwrap_or_else(|| "-".into()),
    ));
    lines.push(("created", utc(vm.created_at)));
    lines.push(("updated", utc(vm.updated_at)));
    let width = lines.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    lines
        .iter()
        .map(|(k, v)| format!("{:width$} {v}\n", format!("{k}:")))
        .collect()
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

/// The API objects as they are, one document, pretty for a person who pipes it to a pager.
pub fn json(value: &impl serde::Serialize) -> String {
    let mut text = serde_json::to_string_pretty(value).expect("API types serialize");
    text.push('\n');
    text
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use uuid::Uuid;
    use vireo_api::{DiskSpec, NicSpec, VmIdentity, VmSpec, VmState};

    /// A VM as the daemon would answer it (normalized: serials and MACs filled in).
    pub fn sample(name: &str, state: VmState) -> Vm {
        let mut spec = VmSpec {
            version: 1,
            name: name.into(),
            vcpus: 2,
            memory_bytes: 256 << 20,
            kernel: "/k/probe.elf".into(),
            cmdline: String::new(),
            initrd: None,
            disks: vec![DiskSpec {
                path: "/d/a.vhdx".into(),
                read_only: true,
                format: None,
                serial: None,
                max_iops: None,
                min_iops: None,
                queues: None,
            }],
            nics: vec![NicSpec {
                name: None,
                policy: Default::default(),
                virtual_subnet: None,
                queues: None,
                switch: "sw0".into(),
                mac: None,
                vlan: Some(7),
            }],
            console_ring_bytes: 64 << 10,
            auto_start: Default::default(),
            auto_checkpoint: Default::default(),
            shutdown_line: Some("POWEROFF".into()),
        };
        let id = Uuid::from_u128(0x1234_5678_9abc_4def_8123_4567_89ab_cdef);
        let identity = VmIdentity::assign(id, &mut spec, || "02:00:00:00:00:07".parse().unwrap());
        Vm {
            spec,
            identity,
            state,
            created_at: 1_796_398_971_000,
            updated_at: 1_796_398_972_000,
        }
    }

    #[test]
    fn list_table() {
        let vms = [sample("web", VmState::Running), sample("db", VmState::Off)];
        let text = list(&vms, OutputFormat::Text);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME  STATE    VCPUS  MEMORY   ID");
        assert_eq!(
            lines[1],
            "web   running  2      256 MiB  12345678-9abc-4def-8123-456789abcdef"
        );
        assert!(lines[2].starts_with("db    off      2"));
        let crit = [sample(
            "x",
            VmState::Critical {
                reason: "killed by signal 9".into(),
            },
        )];
        let text = list(&crit, OutputFormat::Text);
        assert!(text.lines().next().unwrap().ends_with("  REASON"), "{text}");
        assert!(text.contains("critical  2"), "{text}");
        assert!(text.ends_with("killed by signal 9\n"), "{text}");
    }

    #[test]
    fn a_vm_lost_in_post_copy_shows_the_state_and_why() {
        let why = "the VM was lost in a post-copy migration: stream 0 ended";
        let lost = [sample("p", VmState::Lost { reason: why.into() })];
        let text = list(&lost, OutputFormat::Text);
        assert!(text.lines().next().unwrap().ends_with("  REASON"), "{text}");
        assert!(text.contains("lost   2"), "{text}");
        assert!(text.ends_with(&format!("{why}\n")), "{text}");
        let shown = show(&lost[0], OutputFormat::Text);
        assert!(
            shown.contains(&format!("state:         lost ({why})\n")),
            "{shown}"
        );
        let v: serde_json::Value =
            serde_json::from_str(&show(&lost[0], OutputFormat::Json)).unwrap();
        assert_eq!(v["state"], "lost");
        assert_eq!(v["reason"], why);
    }

    #[test]
    fn show_lines_carry_identity() {
        let text = show(&sample("web", VmState::Off), OutputFormat::Text);
        assert!(
            text.contains("id:            12345678-9abc-4def-8123-456789abcdef\n"),
            "{text}"
        );
        assert!(
            text.contains("disk:          0: /d/a.vhdx (ro, detect, serial 123456789abc-0)\n"),
            "{text}"
        );
        let mut qos = sample("q", VmState::Off);
        qos.spec.disks[0].max_iops = Some(500);
        qos.spec.disks[0].min_iops = Some(100);
        let text = show(&qos, OutputFormat::Text);
        assert!(
            text.contains("serial 123456789abc-0, max 500 IOPS, min 100 IOPS)\n"),
            "{text}"
        );
        assert!(
            text.contains("nic:           nic0: mac 02:00:00:00:00:07 on switch sw0 (access 7)\n"),
            "{text}"
        );
        let mut mq = sample("m", VmState::Off);
        mq.spec.nics[0].queues = Some(2);
        let text = show(&mq, OutputFormat::Text);
        assert!(
            text.contains("nic0: mac 02:00:00:00:00:07 on switch sw0 (access 7, 2 queue pairs)\n"),
            "{text}"
        );
        assert!(
            show(&mq, OutputFormat::Json).contains("\"queues\": 2"),
            "the JSON carries the pair count"
        );
        assert!(text.contains("shutdown line: POWEROFF\n"), "{text}");
        assert!(
            text.contains("created:       2026-12-04 15:42:51 UTC\n"),
            "{text}"
        );
    }

    #[test]
    fn json_is_the_api_object() {
        let vm = sample(
            "web",
            VmState::Critical {
                reason: "boom".into(),
            },
        );
        let text = show(&vm, OutputFormat::Json);
        let back: Vm = serde_json::from_str(&text).unwrap();
        assert_eq!(back, vm);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["state"], "critical");
        assert_eq!(v["reason"], "boom");
        let all: Vec<Vm> =
            serde_json::from_str(&list(std::slice::from_ref(&vm), OutputFormat::Json)).unwrap();
        assert_eq!(all, [vm]);
    }
}
