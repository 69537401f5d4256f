//! The switch's integration tests, in one binary: each module was its own binary once, and building them
//! one by one compiled the shared helpers and the dependencies' generic code again for each.
//! Modules keep their own story at the top. One file's tests: `cargo test --release -p vireo-vswitch
//! --test integration -- MODULE::`.

mod common;
mod fragbuild;

mod announce;
mod extensions;
mod fastpath;
mod fastpath_policies;
mod fragments;
mod fragments_prop;
mod hardening;
mod isolation_prop;
mod netns;
mod netns_fragments;
mod overlay;
mod overlay_fastpath_netns;
mod overlay_gateway;
mod overlay_gateway_netns;
mod overlay_mirror;
mod overlay_netns;
mod overlay_stale_senders;
mod overlay_stale_senders_netns;
mod policies;
mod runtime;
mod source_guard_netns;
mod team_netns;
mod vhost_user;
mod vhost_user_mq;
mod vhost_user_offload;
