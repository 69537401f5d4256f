//! A VM's identity: what the guest and the network see and must never change behind their back
//! — the VM id, each NIC's MAC, each disk's serial. Generated once (at create, or when an
//! update adds a NIC or disk), stored, never derived from a process.
//!
//! The MACs and serials are written into the normalized spec entries (so an entry keeps its
//! address when a sibling is removed); `VmIdentity` is the same facts as one record.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::mac::MacAddr;
use crate::spec::VmSpec;

/// virtio-blk's serial field (VIRTIO_BLK_ID_BYTES).
pub const MAX_SERIAL_BYTES: usize = 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmIdentity {
    pub id: Uuid,
    /// One per NIC, in spec order.
    pub macs: Vec<MacAddr>,
    /// One per disk, in spec order.
    pub disk_serials: Vec<String>,
}

impl VmIdentity {
    /// Fills in every NIC MAC and disk serial `spec` leaves out, and returns the identity.
    /// Entries that already have one keep it. `random_mac` is asked for a fresh address per
    /// missing MAC (the store retries on a clash with another VM).
    pub fn assign(id: Uuid, spec: &mut VmSpec, mut random_mac: impl FnMut() -> MacAddr) -> Self {
        for nic in &mut spec.nics {
            if nic.mac.is_none() {
                nic.mac = Some(random_mac());
            }
        }
        for i in 0..spec.nics.len() {
            if spec.nics[i].name.is_none() {
                let name = (0u32..)
                    .map(|n| format!("nic{n}"))
                    .find(|s| !spec.nics.iter().any(|n| n.name.as_deref() == Some(s)))
                    .expect("a u32 range holds more names than a VM has NICs");
                spec.nics[i].name = Some(name);
            }
        }
        for i in 0..spec.disks.len() {
            if spec.disks[i].serial.is_none() {
                let serial = (0u32..)
                    .map(|n| disk_serial(id, n))
                    .find(|s| !spec.disks.iter().any(|d| d.serial.as_deref() == Some(s)))
                    .expect("a u32 range holds more serials than a VM has disks");
                spec.disks[i].serial = Some(serial);
            }
        }
        Self::of(id, spec)
    }

    /// The identity recorded in a normalized spec.
    pub fn of(id: Uuid, spec: &VmSpec) -> Self {
        VmIdentity {
            id,
            macs: spec.nics.iter().filter_map(|n| n.mac).collect(),
            disk_serials: spec.disks.iter().filter_map(|d| d.serial.clone()).collect(),
        }
    }
}

/// `<first 12 hex digits of the id>-<n>`: stable, readable in the guest (`/sys/block/vdX/serial`),
/// and ≤ 20 bytes for any n < 10^7.
pub fn disk_serial(id: Uuid, n: u32) -> String {
    let hex = id.simple().to_string();
    format!("{}-{n}", &hex[..12])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicSpec, SPEC_VERSION};

    fn spec() -> VmSpec {
        VmSpec {
            version: SPEC_VERSION,
            name: "a".into(),
            vcpus: 1,
            memory_bytes: 1 << 25,
            kernel: "/k".into(),
            cmdline: String::new(),
            initrd: None,
            disks: vec![],
            nics: vec![],
            console_ring_bytes: 4096,
            auto_start: Default::default(),
            auto_checkpoint: Default::default(),
            shutdown_line: None,
        }
    }

    fn disk(serial: Option<&str>) -> DiskSpec {
        DiskSpec {
            path: "/d".into(),
            read_only: false,
            format: None,
            serial: serial.map(Into::into),
            max_iops: None,
            min_iops: None,
            queues: None,
        }
    }

    #[test]
    fn fills_missing_and_keeps_given() {
        let id = Uuid::new_v4();
        let mut s = spec();
        let given: MacAddr = "02:00:00:00:00:09".parse().unwrap();
        s.nics = vec![
            NicSpec {
                switch: "sw".into(),
                name: None,
                mac: None,
                vlan: None,
                policy: Default::default(),
                virtual_subnet: None,
                queues: None,
            },
            NicSpec {
                switch: "sw".into(),
                name: Some("nic0".into()),
                mac: Some(given),
                vlan: Some(5),
                policy: Default::default(),
                virtual_subnet: None,
                queues: None,
            },
        ];
        s.disks = vec![
            disk(None),
            disk(Some(&disk_serial(id, 0))),
            disk(Some("mine")),
        ];
        let mut n = 0u8;
        let ident = VmIdentity::assign(id, &mut s, || {
            n += 1;
            MacAddr::generate([n; 5])
        });
        assert_eq!(ident.macs, vec![MacAddr::generate([1; 5]), given]);
        // NIC 0 must not take the name nic0, which NIC 1 already has.
        assert_eq!(s.nics[0].name.as_deref(), Some("nic1"));
        assert_eq!(s.nics[1].name.as_deref(), Some("nic0"));
        // Disk 0 must not take serial -0, which disk 1 already has.
        assert_eq!(
            ident.disk_serials,
            vec![disk_serial(id, 1), disk_serial(id, 0), "mine".into()]
        );
        // Assigning again changes nothing: identity is assigned once.
        let again = VmIdentity::assign(id, &mut s, || unreachable!("no MAC is missing"));
        assert_eq!(again, ident);
    }

    #[test]
    fn serials_fit_virtio_blk() {
        let id = Uuid::new_v4();
        assert!(disk_serial(id, 9_999_999).len() <= MAX_SERIAL_BYTES);
    }
}
