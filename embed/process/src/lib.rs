//! # probe-process
//!
//! probe-core embedded in a running Linux process: probes on the process's own code, with the
//! process itself as the "kernel" — a SIGTRAP handler as the trap path, `/proc/self/mem` and
//! `membarrier` as the live patch and its cross-core sync, a signal round as the quiescence wait,
//! an address-space model filled from `/proc/self/maps`. x86_64 Linux; the instruction set comes
//! from `probe-arch-x86_64`, the protocols from `probe-core`.
//!
//! Layers: `probe-core` ← `probe-arch-x86_64` (instruction set only: no libc, no `object`) ←
//! this crate (the embedding) ← `probe-benches`.
//!
//! The embedding is [`live`], one idea per file: the executable's image and the maps lines,
//! the near-code area, the optimizer's code space, the reader pool, trampolines, quiescence,
//! the SIGTRAP handler; its module docs walk through a hit.

#![deny(rustdoc::broken_intra_doc_links)]

#[cfg(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_os = "linux"
))]
pub mod live;
