//! Link the kernel freestanding: our linker script, no C runtime, static, not PIE (the 32-bit
//! boot code uses absolute addresses).
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rerun-if-changed={dir}/linker.ld");
    for a in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
    ] {
        println!("cargo:rustc-link-arg-bins={a}");
    }
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
}
