//! Prints where the build put the probe guest's ELF, for `vireo run --kernel "$(probe-path)"`.

fn main() {
    println!("{}", vireo_probe_image::PROBE_ELF);
}
