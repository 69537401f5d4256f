//! A small tmpfs mounted for a test (root only), to run a directory out of space: the one in
//! the testkit, under the name these tests already use.

#[allow(unused_imports)] // not every test binary that includes the harness mounts one
pub use vireo_testkit::tmpfs::Tmpfs;
