//! # probe-arch-x86_64
//!
//! The x86_64 half of probe-core's arch boundary. probe-core's protocols are arch-free; this crate
//! will supply what differs between instruction sets:
//!
//! * the breakpoint (`INT3`, `0xCC`) and the optimized jump (`JMP rel32`, `E9` + 4 bytes);
//! * instruction length and analysis with a real decoder — whether an instruction can run out of
//!   line, needs RIP-relative relocation, must be emulated, or must be refused;
//! * the int3-first live-patch protocol for multi-byte code, batched, with the cross-core
//!   serialization supplied by the embedder;
//! * cache maintenance, which on x86 is the cross-modifying-code serialization only (the
//!   instruction cache is coherent with stores).
//!
//! This is a documented skeleton: the foundation issue lays out the workspace, and the arch issue
//! fills it. It deliberately exports nothing yet, so nothing can depend on a half-built interface.

#![no_std]
