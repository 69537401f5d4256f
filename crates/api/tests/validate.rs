//! Bad values are refused with the field and the value; good ones pass.

use vireo_api::{
    validate_name, validate_spec, DiskSpec, Limits, NicSpec, SpecError, VmSpec, SPEC_VERSION,
};

const LIMITS: Limits = Limits {
    max_vcpus: 8,
    max_memory_bytes: 1 << 30,
};

fn good() -> VmSpec {
    VmSpec {
        version: SPEC_VERSION,
        name: "web-01.prod_a".into(),
        vcpus: 2,
        memory_bytes: 32 << 20,
        kernel: "/boot/vmlinuz".into(),
        cmdline: "console=ttyS0".into(),
        initrd: Some("/boot/initrd".into()),
        disks: vec![DiskSpec {
            path: "/var/d.vhdx".into(),
            read_only: false,
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
            switch: "lan".into(),
            mac: None,
            vlan: Some(10),
        }],
        console_ring_bytes: 65536,
        auto_start: Default::default(),
        auto_checkpoint: Default::default(),
        shutdown_line: None,
    }
}

fn refused(edit: impl FnOnce(&mut VmSpec)) -> SpecError {
    let mut s = good();
    edit(&mut s);
    validate_spec(&s, &LIMITS).expect_err("must be refused")
}

#[test]
fn a_good_spec_passes() {
    validate_spec(&good(), &LIMITS).unwrap();
}

#[test]
fn names() {
    for ok in ["a", "A-b_c.d", &"x".repeat(64), "0f8fa3b2"] {
        validate_name("name", ok).unwrap();
    }
    for bad in [
        "",
        &"x".repeat(65),
        "a/b",
        "..",
        "a..b",
        ".hidden",
        "a\0b",
        "a b",
        "é",
        "a\nb",
        "-ok?",
    ] {
        let e = validate_name("name", bad).expect_err(bad);
        assert_eq!((e.field.as_str(), e.value.as_str()), ("name", bad));
    }
}

#[test]
fn each_bad_field_is_named() {
    let cases: Vec<(SpecError, &str, &str)> = vec![
        (refused(|s| s.version = 2), "version", "2"),
        (refused(|s| s.name = "../etc".into()), "name", "../etc"),
        // `/v1/vms/import` is the import endpoint: a VM so named could not be addressed.
        (refused(|s| s.name = "import".into()), "name", "import"),
        (refused(|s| s.vcpus = 0), "vcpus", "0"),
        (refused(|s| s.vcpus = 9), "vcpus", "9"),
        (
            refused(|s| s.memory_bytes = (32 << 20) + 512),
            "memory_bytes",
            "33554944",
        ),
        (
            refused(|s| s.memory_bytes = 512 << 10),
            "memory_bytes",
            "524288",
        ),
        (
            refused(|s| s.memory_bytes = 2 << 30),
            "memory_bytes",
            "2147483648",
        ),
        (
            refused(|s| s.kernel = "vmlinuz".into()),
            "kernel",
            "vmlinuz",
        ),
        (
            refused(|s| s.initrd = Some("rel/initrd".into())),
            "initrd",
            "rel/initrd",
        ),
        (
            refused(|s| s.disks[0].path = "d.vhdx".into()),
            "disks[0].path",
            "d.vhdx",
        ),
        (
            refused(|s| s.disks[0].serial = Some("x".repeat(21))),
            "disks[0].serial",
            "xxxxxxxxxxxxxxxxxxxxx",
        ),
        (
            refused(|s| s.nics[0].switch = "a/b".into()),
            "nics[0].switch",
            "a/b",
        ),
        (
            refused(|s| s.nics[0].vlan = Some(4095)),
            "nics[0].vlan",
            "4095",
        ),
        (
            refused(|s| s.nics[0].mac = Some("01:00:5e:00:00:01".parse().unwrap())),
            "nics[0].mac",
            "01:00:5e:00:00:01",
        ),
        (
            refused(|s| s.console_ring_bytes = u32::MAX),
            "console_ring_bytes",
            "4294967295",
        ),
    ];
    for (e, field, value) in cases {
        assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{e}");
    }
}

#[test]
fn duplicates_within_a_spec() {
    let e = refused(|s| {
        let nic = s.nics[0].clone();
        s.nics[0].mac = Some("02:00:00:00:00:01".parse().unwrap());
        s.nics.push(NicSpec {
            name: None,
            policy: Default::default(),
            virtual_subnet: None,
            queues: None,
            mac: s.nics[0].mac,
            ..nic
        });
    });
    assert_eq!(e.field, "nics[1].mac");
    let e = refused(|s| {
        s.disks[0].serial = Some("s1".into());
        s.disks.push(s.disks[0].clone());
    });
    assert_eq!(e.field, "disks[1].serial");
}

#[test]
fn storage_qos_values() {
    let with = |max: Option<u32>, min: Option<u32>| {
        let mut s = good();
        s.disks[0].max_iops = max;
        s.disks[0].min_iops = min;
        validate_spec(&s, &LIMITS)
    };
    for (max, min) in [
        (None, None),
        (Some(1), None),
        (None, Some(1)),
        (Some(500), Some(100)),
        (Some(100), Some(100)),
        (Some(vireo_api::validate::MAX_IOPS), None),
    ] {
        with(max, min).unwrap_or_else(|e| panic!("max {max:?} min {min:?}: {e}"));
    }
    let cases = [
        (
            Some(0),
            None,
            "disks[0].max_iops",
            "0",
            "leave the field out for no limit",
        ),
        (None, Some(0), "disks[0].min_iops", "0", "for no minimum"),
        (
            Some(10_000_001),
            None,
            "disks[0].max_iops",
            "10000001",
            "1 to 10000000",
        ),
        (
            None,
            Some(u32::MAX),
            "disks[0].min_iops",
            "4294967295",
            "1 to 10000000",
        ),
        (
            Some(10),
            Some(50),
            "disks[0].min_iops",
            "50",
            "above max_iops (10)",
        ),
    ];
    for (max, min, field, value, why) in cases {
        let e = with(max, min).expect_err(field);
        assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{e}");
        assert!(e.problem.contains(why), "{e}");
    }
    // The disk is named by its index.
    let mut s = good();
    s.disks.push(s.disks[0].clone());
    s.disks[1].path = "/var/e.vhdx".into();
    s.disks[1].max_iops = Some(0);
    let e = validate_spec(&s, &LIMITS).unwrap_err();
    assert_eq!(e.field, "disks[1].max_iops");
}

#[test]
fn vm_names_that_are_api_paths_are_reserved_but_only_for_vms() {
    let e = vireo_api::validate_vm_name("name", "import").unwrap_err();
    assert!(e.problem.contains("reserved"), "{e}");
    vireo_api::validate_vm_name("name", "imports").unwrap();
    vireo_api::validate_vm_name("name", "Import").unwrap();
    // A switch, pool or checkpoint may be called so.
    validate_name("name", "import").unwrap();
}

#[test]
fn virtual_subnet_membership() {
    use vireo_api::NicVirtualSubnet;
    let member = |vsid: u32, ca: &[&str]| {
        Some(NicVirtualSubnet {
            vsid,
            ca: ca.iter().map(|c| c.parse().unwrap()).collect(),
        })
    };
    let mut s = good();
    s.nics[0].virtual_subnet = member(5001, &["10.0.0.2", "fd00::2"]);
    validate_spec(&s, &LIMITS).unwrap();
    let cases: [(u32, &[&str], &str, &str); 6] = [
        (0, &["10.0.0.2"], "nics[0].virtual_subnet.vsid", "0"),
        (
            1 << 24,
            &["10.0.0.2"],
            "nics[0].virtual_subnet.vsid",
            "16777216",
        ),
        (5001, &[], "nics[0].virtual_subnet.ca", "0"),
        (
            5001,
            &["224.0.0.1"],
            "nics[0].virtual_subnet.ca[0]",
            "224.0.0.1",
        ),
        (
            5001,
            &["0.0.0.0"],
            "nics[0].virtual_subnet.ca[0]",
            "0.0.0.0",
        ),
        (
            5001,
            &["10.0.0.2", "10.0.0.2"],
            "nics[0].virtual_subnet.ca[1]",
            "10.0.0.2",
        ),
    ];
    for (vsid, ca, field, value) in cases {
        let e = refused(|s| s.nics[0].virtual_subnet = member(vsid, ca));
        assert_eq!((e.field.as_str(), e.value.as_str()), (field, value), "{e}");
    }
}

#[test]
fn nic_queue_pairs_are_one_to_what_the_switch_port_serves() {
    use vireo_api::validate::MAX_NIC_QUEUE_PAIRS;
    for q in [1, MAX_NIC_QUEUE_PAIRS] {
        let mut s = good();
        s.nics[0].queues = Some(q);
        validate_spec(&s, &LIMITS).unwrap_or_else(|e| panic!("{q} pairs: {e}"));
    }
    for q in [0, MAX_NIC_QUEUE_PAIRS + 1, 9] {
        let e = refused(|s| s.nics[0].queues = Some(q));
        assert_eq!(
            (e.field.as_str(), e.value.as_str()),
            ("nics[0].queues", q.to_string().as_str())
        );
        assert!(e.to_string().contains("1 to 4 queue pairs"), "{e}");
    }
}

#[test]
fn a_spec_stored_before_nic_queues_existed_loads_with_one_pair() {
    let old = r#"{"switch":"lan","name":"nic0","mac":"02:00:00:00:00:01","vlan":null,"policy":{}}"#;
    let nic: NicSpec = serde_json::from_str(old).expect("an old NIC loads");
    assert_eq!(nic.queues, None);
    let json = serde_json::to_string(&nic).unwrap();
    assert!(
        !json.contains("queues"),
        "one pair stays out of the JSON: {json}"
    );
    let mq = NicSpec {
        queues: Some(2),
        ..nic
    };
    let back: NicSpec = serde_json::from_str(&serde_json::to_string(&mq).unwrap()).unwrap();
    assert_eq!(back.queues, Some(2));
}
