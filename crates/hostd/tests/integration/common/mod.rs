//! Shared test helpers.

use vireo_api::{DiskSpec, NicSpec, VmSpec, SPEC_VERSION};

pub fn spec(name: &str) -> VmSpec {
    VmSpec {
        version: SPEC_VERSION,
        name: name.into(),
        vcpus: 1,
        memory_bytes: 32 << 20,
        kernel: "/boot/probe.elf".into(),
        cmdline: String::new(),
        initrd: None,
        disks: vec![
            DiskSpec {
                path: "/srv/a.vhdx".into(),
                read_only: false,
                format: None,
                serial: None,
                max_iops: None,
                min_iops: None,
                queues: None,
            },
            DiskSpec {
                path: "/srv/b.raw".into(),
                read_only: true,
                format: None,
                serial: None,
                max_iops: None,
                min_iops: None,
                queues: None,
            },
        ],
        nics: vec![
            NicSpec {
                name: None,
                policy: Default::default(),
                virtual_subnet: None,
                queues: None,
                switch: "lan".into(),
                mac: None,
                vlan: None,
            },
            NicSpec {
                name: None,
                policy: Default::default(),
                virtual_subnet: None,
                queues: None,
                switch: "dmz".into(),
                mac: None,
                vlan: Some(7),
            },
        ],
        console_ring_bytes: 4096,
        auto_start: Default::default(),
        auto_checkpoint: Default::default(),
        shutdown_line: None,
    }
}

pub mod daemon;
pub mod probe;
