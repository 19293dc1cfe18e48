//! # probe-kernel
//!
//! probe-core as the kprobes of the smallest honest SMP kernel: a freestanding x86_64 kernel
//! (`embed/kernel/image`, its own crate so that the workspace's feature unification — probe-core's
//! `std` for the other members — cannot reach it) booted by `qemu-system-x86_64 -kernel`. This
//! crate builds the image and boots it: `cargo test -p probe-kernel` runs the kernel's self-test
//! on 2 and on 4 CPUs under multi-threaded TCG and fails on any mismatch, panic, fault or timeout.
//!
//! # The kernel, file by file (`image/src`)
//!
//! | file | what it is |
//! |---|---|
//! | `boot.rs` | PVH entry (a Xen ELF note), page tables (4 GiB identity, 2 MiB pages, the first GiB aliased at 4 GiB for code writes), long mode, SSE |
//! | `cpu.rs` | per-CPU GDT and TSS, one IDT; every vector on an IST stack (the host `core` uses the red zone); the entry stub saves GPRs and `fxsave64` state |
//! | `apic.rs`, `smp.rs` | xAPIC, fw_cfg's CPU count, INIT-SIPI-SIPI through a real-mode trampoline at 0x8000; the sync IPI every other CPU answers after a serializing `iretq` |
//! | `sync.rs` | `IrqSpinLock`: the kernel's `RawLock`, a ticket lock that keeps interrupts off while held |
//! | `rcu.rs` | `KernelRcu`: the kernel's `Rcu`, quiescent-state based (a CPU reports one per worker-loop iteration; `synchronize` waits for every other online CPU; deferred frees queue on a `DeferredStack`) |
//! | `kprobes.rs` | the kernel text as probe-core's `CodeSpace` (original bytes, the x86 crate's analysis, trampolines, the int3-first live patch through the alias, quiescence from the CPUs' reported RIPs), the `#BP` handler and the trampoline entry over `probe_core::kprobes::Kprobes`, `register` refusing what cannot run out of line |
//! | `selftest.rs` | workers hit probed functions while the bootstrap CPU registers, unregisters, disables, enables, optimizes and unoptimizes; the exact-hit oracle; the figures |
//! | `rt.rs`, `serial.rs`, `port.rs` | `memcpy` & co., the unwinding stubs the precompiled `core` references, COM1, `isa-debug-exit` |
//!
//! # Found while building it
//!
//! QEMU 7.2's multi-threaded TCG does not reliably invalidate one CPU's translations of code
//! that *another* CPU stores to (a CPU's own stores always invalidate its translations): the
//! kernel measures it at boot (`smc cross: worker saw 3, then …`; on 2 CPUs the worker kept the
//! old code for 20 million calls, on 4 it picked the change up after about 2 000) and works
//! around it in the sync IPI — each CPU stores back the bytes the writer changed before it answers
//! (`smp::retouch`), which makes the change its own. Without that the self-test saw breakpoints
//! missed for whole windows and a CPU looping on an int3 that memory no longer held.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The kernel crate's folder.
pub fn image_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("image")
}

/// Builds the kernel image (release) into `target_dir` and returns its path.
///
/// # Errors
///
/// The build's own output when it fails.
pub fn build_image(target_dir: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(image_dir())
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(target_dir)
        // The outer build's flags (`--cfg loom`, coverage) are not the kernel's.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .map_err(|e| format!("running cargo: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/probe-kernel-image"))
}

/// What a boot ended with.
#[derive(Debug)]
pub struct Boot {
    /// QEMU's exit code: `(code << 1) | 1` for the kernel's `isa-debug-exit` write; 0x10 is a pass.
    pub exit: Option<i32>,
    /// The serial console, ANSI codes stripped.
    pub log: String,
    /// Killed after the timeout.
    pub timed_out: bool,
    /// Wall time.
    pub took: Duration,
}

impl Boot {
    /// The self-test passed: exit code 0x10 and its verdict line.
    pub fn passed(&self) -> bool {
        self.exit == Some((0x10 << 1) | 1) && self.log.contains("selftest: PASS")
    }
}

/// Boots `image` on `cpus` CPUs (multi-threaded TCG), reading the serial console until QEMU
/// exits or `timeout` passes.
///
/// # Errors
///
/// When QEMU cannot be started (not installed: `apt-get install qemu-system-x86`).
pub fn boot(image: &Path, cpus: usize, timeout: Duration) -> Result<Boot, String> {
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .arg("-kernel")
        .arg(image)
        .args(["-smp", &cpus.to_string()])
        .args([
            "-accel",
            "tcg,thread=multi",
            "-m",
            "256",
            "-nographic",
            "-monitor",
            "none",
        ])
        .args(["-serial", "stdio", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            format!("qemu-system-x86_64: {e} (install it: apt-get install qemu-system-x86)")
        })?;
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break Some(s);
        }
        if start.elapsed() > timeout {
            timed_out = true;
            let _ = child.kill();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut raw = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        use std::io::Read;
        let _ = out.read_to_end(&mut raw);
    }
    let text = String::from_utf8_lossy(&raw);
    Ok(Boot {
        exit: status.and_then(|s| s.code()),
        log: strip_ansi(&text),
        timed_out,
        took: start.elapsed(),
    })
}

/// Drops ANSI escape sequences and carriage returns (the firmware's screen control).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn ansi_codes_are_stripped() {
        assert_eq!(super::strip_ansi("\u{1b}[2J\u{1b}[0mok\r\n"), "ok\n");
    }
}
