//! Gives `vireo` and `vireo-run` one build id (both binaries of this package are compiled from
//! the same build-script run), so `vireo run` can tell a `vireo-run` left from another build
//! (`run_exec.rs`).

fn main() {
    // Only the binaries' own sources make a new build: without this, editing a test reran the
    // script and rebuilt both binaries (~45 s) for nothing.
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=build.rs");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    println!(
        "cargo:rustc-env=VIREO_BUILD_ID={}-{nanos:x}",
        std::env::var("CARGO_PKG_VERSION").unwrap_or_default()
    );
}
