//! Links the probe as a freestanding image with `linker.ld` (absolute path, so the build works
//! from any working directory).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rustc-link-arg-bins=-nostdlib");
    println!("cargo:rustc-link-arg-bins=-static");
    println!("cargo:rustc-link-arg-bins=-Wl,--build-id=none");
    println!("cargo:rustc-link-arg-bins=-Wl,-z,noexecstack");
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{dir}/linker.ld");
}
