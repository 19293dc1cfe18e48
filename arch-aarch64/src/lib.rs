//! # probe-arch-aarch64
//!
//! The aarch64 half of probe-core's arch boundary. probe-core's protocols are arch-free; this crate
//! will supply what differs between instruction sets:
//!
//! * the breakpoint (`BRK #imm`) and the optimized branch (`B imm26`, ±128 MiB);
//! * instruction classes for execute-out-of-line: PC-relative instructions simulated in software,
//!   exclusives and unsteppable system instructions refused with the reason, the rest stepped;
//! * the single-word live patch the Arm ARM permits for concurrent modification and execution;
//! * cache maintenance: `DC CVAU`, `DSB ISH`, `IC IVAU`, `DSB ISH`, `ISB`, built only under
//!   `cfg(target_arch = "aarch64")`, encodings checked against GNU binutils.
//!
//! This is a documented skeleton: the foundation issue lays out the workspace, and the arch issue
//! fills it. It deliberately exports nothing yet, so nothing can depend on a half-built interface.

#![no_std]
