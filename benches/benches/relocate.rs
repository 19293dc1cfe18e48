//! What preparing an out-of-line copy costs, against the alternative in the same run.
//!
//! probe-arch-x86_64 relocates by hand: decode once (iced's decoder, no allocation), then patch
//! the `disp32` or emit a fixed branch sequence into a stack buffer. The alternative is iced's
//! general `BlockEncoder`, which re-encodes the decoded instruction at the new address (it
//! allocates its output). Both produce a copy that addresses the same memory / branches to the
//! same target; ours also appends the jump back. Measured per instruction, for a RIP-relative
//! load, a RIP-relative compare-with-immediate and a conditional branch.
//!
//! `cargo bench -p probe-benches --bench relocate -- --warm-up-time 1 --measurement-time 2`

use criterion::{Criterion, criterion_group, criterion_main};
use iced_x86::{BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, InstructionBlock};
use probe_arch_x86_64::insn::Insn;
use probe_arch_x86_64::xol;
use std::hint::black_box;

const AT: u64 = 0x40_0000;
const SLOT: u64 = 0x40_8000;

fn cases() -> [(&'static str, Vec<u8>); 3] {
    [
        ("mov rax, [rip+d]", vec![0x48, 0x8B, 0x05, 0x10, 0x20, 0, 0]),
        (
            "cmp dword [rip+d], imm32",
            vec![0x81, 0x3D, 0x10, 0x20, 0, 0, 0x78, 0x56, 0x34, 0x12],
        ),
        ("jne rel32", vec![0x0F, 0x85, 0x00, 0x01, 0, 0]),
    ]
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("relocate");
    for (name, bytes) in cases() {
        g.bench_function(format!("probe-arch-x86_64 decode+prepare: {name}"), |b| {
            b.iter(|| {
                let i = Insn::decode(black_box(&bytes), AT).unwrap();
                xol::prepare(&i, black_box(SLOT)).unwrap()
            })
        });
        g.bench_function(format!("iced decode+BlockEncoder: {name}"), |b| {
            b.iter(|| {
                let mut d = Decoder::with_ip(64, black_box(&bytes), AT, DecoderOptions::NONE);
                let insn = d.decode();
                let block = InstructionBlock::new(core::slice::from_ref(&insn), black_box(SLOT));
                BlockEncoder::encode(64, block, BlockEncoderOptions::NONE).unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
