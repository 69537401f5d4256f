//! The `vireo` CLI end to end, in one test binary: each module was its own binary once, and
//! building 44 of them compiled the shared harnesses and their dependencies' generic code 44
//! times (about a third of a clean build's CPU time). Modules keep their own story at the top.
//!
//! Run one file's tests with its module name as the filter:
//! `cargo test --release -p vireo-cli --test e2e -- migrate_nic::`.

mod common;
mod fake_daemon;
// The fake-worker suite's proxy (it cuts after N bytes, both directions counted); the tests
// here use only its fixed-target mode.
#[allow(dead_code)]
#[path = "../../../hostd/tests/integration/migrate_faults/proxy.rs"]
mod proxy;
mod vireod_harness;

mod auto_checkpoint_vireod;
mod checkpoint_cli_vireod;
mod control_client;
mod kvm_console_socket;
mod kvm_live_merge;
mod kvm_online_resize;
mod kvm_probe;
mod kvm_probe_bench;
mod kvm_probe_net;
mod kvm_probe_switch;
mod kvm_probe_vhd;
mod kvm_probe_vhost_user;
mod kvm_run_slim;
mod kvm_run_tiny;
mod kvm_save_disk_full;
mod kvm_save_disk_locks;
mod kvm_save_restore;
mod migrate_boot_files;
mod migrate_checkpointed;
mod migrate_cli;
mod migrate_disk_full;
mod migrate_faults_postcopy;
mod migrate_faults_real;
mod migrate_faults_real_modes;
mod migrate_kill_destination;
mod migrate_nic;
mod migrate_postcopy_pool;
mod migrate_quick_disk_full;
mod migrate_sharednothing;
mod migrate_slot_gap;
mod migrate_slow_disk_copy;
mod move_storage_checkpointed;
mod move_storage_checkpointed_live;
mod move_storage_worker_gone;
mod netvirt_cli_vireod;
mod nic_queues_vireod;
mod run_bad_input;
mod switch_cli_vireod;
mod vm_cli_export;
mod vm_cli_fake_daemon;
mod vm_cli_save;
mod vm_cli_tls;
mod vm_cli_vireod;
