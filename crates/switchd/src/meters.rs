//! The library's per-port meters as the protocol reports them (`vireo_api::switch::PortMeters`).

use std::collections::BTreeMap;

use vireo_api::switch::{AclMeter, PortMeters};
use vireo_vswitch::meter::MeterSnapshot;
use vireo_vswitch::DropReason;

/// `DropReason`'s snake_case name, as its serde form spells it.
pub fn reason_name(r: DropReason) -> String {
    match serde_json::to_value(r) {
        Ok(serde_json::Value::String(s)) => s,
        _ => format!("{r:?}"),
    }
}

/// "In" is the switch's ingress (frames the port sent into it), "out" its egress; only
/// non-zero drops; ACL meters by rule name (rules sharing a name add up).
pub fn port_meters(m: &MeterSnapshot) -> PortMeters {
    let mut acl: BTreeMap<String, AclMeter> = BTreeMap::new();
    for (name, c) in &m.acl {
        let e = acl.entry(name.clone()).or_default();
        e.packets += c.packets;
        e.bytes += c.bytes;
    }
    PortMeters {
        packets_in: m.ingress.packets,
        bytes_in: m.ingress.bytes,
        packets_out: m.egress.packets,
        bytes_out: m.egress.bytes,
        drops: m
            .drops
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (reason_name(*r), *n))
            .collect(),
        acl,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vireo_vswitch::Counter;

    #[test]
    fn directions_names_and_zeroes() {
        let m = MeterSnapshot {
            ingress: Counter {
                packets: 3,
                bytes: 300,
            },
            egress: Counter {
                packets: 2,
                bytes: 128,
            },
            drops: vec![
                (DropReason::VlanNotAllowed, 4),
                (DropReason::IpSourceGuard, 0),
            ],
            acl: vec![
                (
                    "web".into(),
                    Counter {
                        packets: 1,
                        bytes: 60,
                    },
                ),
                (
                    "web".into(),
                    Counter {
                        packets: 2,
                        bytes: 70,
                    },
                ),
            ],
        };
        let p = port_meters(&m);
        assert_eq!(
            (p.packets_in, p.bytes_in, p.packets_out, p.bytes_out),
            (3, 300, 2, 128)
        );
        assert_eq!(
            p.drops.into_iter().collect::<Vec<_>>(),
            vec![("vlan_not_allowed".to_string(), 4)]
        );
        assert_eq!(
            p.acl["web"],
            AclMeter {
                packets: 3,
                bytes: 130
            }
        );
        assert_eq!(reason_name(DropReason::IpSourceGuard), "ip_source_guard");
    }
}
