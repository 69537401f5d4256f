//! vireod's integration tests, in one binary: each module was its own binary once, and building them
//! one by one compiled the shared helpers and the dependencies' generic code again for each.
//! Modules keep their own story at the top. One file's tests: `cargo test --release -p vireo-hostd
//! --test integration -- MODULE::`.

mod common;

mod api;
mod chaos;
mod checkpoints;
mod crash;
mod export;
mod export_crash;
mod fuzz_api;
mod jobs;
mod kvm_checkpoints;
mod metering;
mod migrate;
mod migrate_faults;
mod move_storage;
mod netvirt_migrate;
mod openapi;
mod pools;
mod probe;
mod readopt;
mod save;
mod schema;
mod storage_roots;
mod store;
mod supervise;
mod switch_netvirt;
mod switch_store;
mod switches;
