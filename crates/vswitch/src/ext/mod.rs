//! In-tree sample extensions, one of each kind.

pub mod ethertype_filter;
pub mod pcap;
pub mod static_forward;

pub use ethertype_filter::EtherTypeFilter;
pub use pcap::{PcapCapture, PcapWriter};
pub use static_forward::StaticForwarding;
