//! The VMM's integration tests, in one binary: each module was its own binary once, and building them
//! one by one compiled the shared helpers and the dependencies' generic code again for each.
//! Modules keep their own story at the top. One file's tests: `cargo test --release -p vireo-vmm
//! --test integration -- MODULE::`.

mod common;

mod kvm_apply_in_place;
mod kvm_blk_multiqueue;
mod kvm_boot;
mod kvm_dirty_probe;
mod kvm_hotplug;
mod kvm_huge_ram;
mod kvm_hugetlb_ram;
mod kvm_linux;
mod kvm_live_save;
mod kvm_memory_checksums;
mod kvm_migrate;
mod kvm_pause;
mod kvm_state;
mod kvm_vhost_user_live_save;
mod kvm_vhost_user_mq;
mod kvm_vhost_user_state;
mod vhost_user_net;
