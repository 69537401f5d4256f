//! Host-side frame ports the switch owns itself: AF_PACKET sockets bound to a host interface
//! (an external switch's NIC, or the host end of a veth). TAPs come from `vireo_netport`.

pub mod gro;
pub mod offload;
mod packet;

pub use packet::PacketPort;
