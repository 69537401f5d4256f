//! vireo-switch's integration tests, in one binary: each module was its own binary once, and building them
//! one by one compiled the shared helpers and the dependencies' generic code again for each.
//! Modules keep their own story at the top. One file's tests: `cargo test --release -p vireo-switchd
//! --test integration -- MODULE::`.

mod common;

mod announce;
mod kvm_probe;
mod netns;
mod protocol;
mod team;
