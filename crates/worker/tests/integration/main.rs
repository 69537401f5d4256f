//! vireo-vm's integration tests, in one binary: each module was its own binary once, and building them
//! one by one compiled the shared helpers and the dependencies' generic code again for each.
//! Modules keep their own story at the top. One file's tests: `cargo test --release -p vireo-worker
//! --test integration -- MODULE::`.

mod common;

mod kvm_console_poweroff;
mod kvm_hotplug;
mod kvm_lifecycle;
mod kvm_metrics;
mod kvm_migrate;
mod kvm_migrate_vhdx;
mod kvm_postcopy;
mod kvm_save;
mod kvm_worker;
