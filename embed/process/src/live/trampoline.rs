//! Trampolines: their machine code, and `trampoline_entry`, the vector-free Rust every
//! trampoline calls (with `run_full`, which saves and restores the extended state around
//! closure consumers).

use super::*;

/// Bytes reserved per trampoline.
pub(super) const TRAMPOLINE: usize = 512;

/// The red zone below RSP that leaf code may use at any instruction boundary (SysV x86-64).
pub(super) const RED_ZONE: u64 = 128;

/// A trampoline at `at` for the probe whose context is `ctx` (its jump range `range`): returns
/// its code and the address of its displaced-instructions entry.
///
/// ```text
/// at:        lea rsp, [rsp-128]                 ; step over the red zone (no flags change)
///            pushfq ; lea rsp, [rsp-8]          ; rflags, the rip slot
///            push r15 … r8 ; lea rsp, [rsp-8]   ; the rsp slot
///            push rbp, rdi, rsi, rdx, rcx, rbx, rax   ; RSP now points at a `Regs`
///            cld ; mov rbx, rsp
///            sub rsp, xsave_size ; and rsp, -64 ; the extended-state area (touched only if used)
///            mov rdi, rbx ; movabs rsi, ctx ; mov rdx, rsp ; movabs rcx, at
///            movabs rax, trampoline_entry ; call rax
///            mov rsp, rbx
///            test byte [rsp+rflags+1], 4 ; jz 1f ; std ; 1:   ; DF (clear since the cld)
///            mov eax, [rsp+rflags] ; and eax, 0x800 ; shl eax, 20 ; sub eax, 1   ; OF
///            mov ah, [rsp+rflags] ; sahf                      ; SF ZF AF PF CF
///            pop rax … rbp ; lea rsp, [rsp+8] ; pop r8 … r15
///            lea rsp, [rsp+8+8+128]             ; the rip and rflags slots, the red zone
/// displaced: the covered instructions, relocated ; jmp addr + len
/// ```
///
/// The trampoline saves only what every hit needs (general registers and flags, as the
/// consumers' `Regs`); `trampoline_entry` saves the extended state when, and only when, a
/// consumer of the probe may change it.
///
/// # Implementation details
///
/// The flags are restored without `popfq`, which costs about 8 ns a pair with `pushfq` here (it
/// is microcoded: it may change IF, TF, AC, ID), a third of the register-only path. The flags
/// that code between the `pushfq` and the return can change are the six arithmetic ones and DF
/// (the `cld`): SF, ZF, AF, PF and CF come back through `sahf` from the saved low byte, OF
/// through a subtraction that overflows exactly when the saved OF was set (`0x8000_0000 - 1`),
/// DF through an `std` taken only when it was set. TF, AC and ID are never changed by compiled
/// code, so they still hold the interrupted values. A CPU without `lahf`/`sahf` in 64-bit mode
/// (CPUID 8000_0001h ECX bit 0, absent only on the first x86-64 parts) gets `popfq`.
pub(super) fn trampoline(
    at: u64,
    ctx: &'static ProbeCtx,
    xsave_size: u32,
    range: &probe_arch_x86_64::detour::JumpRange,
) -> Result<(Vec<u8>, u64), Refusal> {
    let mut c: Vec<u8> = Vec::with_capacity(TRAMPOLINE);
    let lea_rsp = |c: &mut Vec<u8>, d: i8| c.extend_from_slice(&[0x48, 0x8D, 0x64, 0x24, d as u8]);
    lea_rsp(&mut c, -128); // lea rsp, [rsp-128]
    c.push(0x9C); // pushfq
    lea_rsp(&mut c, -8); // the rip slot
    for r in (0..8u8).rev() {
        c.extend_from_slice(&[0x41, 0x50 + r]); // push r15 … r8
    }
    lea_rsp(&mut c, -8); // the rsp slot
    c.extend_from_slice(&[0x55, 0x57, 0x56, 0x52, 0x51, 0x53, 0x50]); // rbp rdi rsi rdx rcx rbx rax
    c.push(0xFC); // cld
    c.extend_from_slice(&[0x48, 0x89, 0xE3]); // mov rbx, rsp
    c.extend_from_slice(&[0x48, 0x81, 0xEC]); // sub rsp, imm32
    c.extend_from_slice(&xsave_size.to_le_bytes());
    c.extend_from_slice(&[0x48, 0x83, 0xE4, 0xC0]); // and rsp, -64
    c.extend_from_slice(&[0x48, 0x89, 0xDF]); // mov rdi, rbx
    c.extend_from_slice(&[0x48, 0xBE]); // movabs rsi, ctx
    c.extend_from_slice(&(ctx as *const ProbeCtx as u64).to_le_bytes());
    c.extend_from_slice(&[0x48, 0x89, 0xE2]); // mov rdx, rsp
    c.extend_from_slice(&[0x48, 0xB9]); // movabs rcx, at
    c.extend_from_slice(&at.to_le_bytes());
    c.extend_from_slice(&[0x48, 0xB8]); // movabs rax, trampoline_entry
    c.extend_from_slice(&(trampoline_entry as *const () as u64).to_le_bytes());
    c.extend_from_slice(&[0xFF, 0xD0]); // call rax
    c.extend_from_slice(&[0x48, 0x89, 0xDC]); // mov rsp, rbx
    let sahf = sahf_in_long_mode();
    if sahf {
        // The flags, from the frame's rflags slot, with RAX (restored below) as scratch.
        let fl = (core::mem::offset_of!(Regs, rflags) as u32).to_le_bytes();
        let fl1 = (core::mem::offset_of!(Regs, rflags) as u32 + 1).to_le_bytes();
        c.extend_from_slice(&[0xF6, 0x84, 0x24]); // test byte [rsp+rflags+1], 4 (DF)
        c.extend_from_slice(&fl1);
        c.push(0x04);
        c.extend_from_slice(&[0x74, 0x01, 0xFD]); // jz +1 ; std
        c.extend_from_slice(&[0x8B, 0x84, 0x24]); // mov eax, [rsp+rflags]
        c.extend_from_slice(&fl);
        c.extend_from_slice(&[0x25, 0x00, 0x08, 0x00, 0x00]); // and eax, 0x800 (OF)
        c.extend_from_slice(&[0xC1, 0xE0, 0x14]); // shl eax, 20
        c.extend_from_slice(&[0x83, 0xE8, 0x01]); // sub eax, 1: OF = the saved OF
        c.extend_from_slice(&[0x8A, 0xA4, 0x24]); // mov ah, [rsp+rflags]
        c.extend_from_slice(&fl);
        c.push(0x9E); // sahf: SF ZF AF PF CF
    }
    c.extend_from_slice(&[0x58, 0x5B, 0x59, 0x5A, 0x5E, 0x5F, 0x5D]); // rax rbx rcx rdx rsi rdi rbp
    lea_rsp(&mut c, 8);
    for r in 0..8u8 {
        c.extend_from_slice(&[0x41, 0x58 + r]); // pop r8 … r15
    }
    if sahf {
        // lea rsp, [rsp+8+8+128]: the rip and rflags slots, the red zone
        c.extend_from_slice(&[0x48, 0x8D, 0xA4, 0x24, 0x90, 0, 0, 0]);
    } else {
        lea_rsp(&mut c, 8);
        c.push(0x9D); // popfq
        c.extend_from_slice(&[0x48, 0x8D, 0xA4, 0x24, 0x80, 0, 0, 0]); // lea rsp, [rsp+128]
    }
    let displaced = at + c.len() as u64;
    c.extend_from_slice(range.displaced(displaced)?.bytes());
    if c.len() > TRAMPOLINE {
        return Err(Refusal::TooLong);
    }
    Ok((c, displaced))
}

/// Whether `lahf`/`sahf` work in 64-bit mode (CPUID 8000_0001h ECX bit 0).
pub(super) fn sahf_in_long_mode() -> bool {
    // SAFETY: CPUID is unprivileged and present on every x86-64 CPU; leaf 8000_0001h exists on
    // all of them (the extended maximum is checked first anyway).
    {
        core::arch::x86_64::__cpuid(0x8000_0000).eax >= 0x8000_0001
            && core::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
    }
}

/// Called by every trampoline (sysv64: the pushed `Regs` frame in RDI, the probe's context in
/// RSI, the extended-state area in RDX, the trampoline's own address in RCX), on the probed
/// thread's stack with its general registers and flags saved.
///
/// # Implementation details
///
/// This function, and everything it runs before [`run_full`] saves the extended state and after
/// it restores it, must touch no vector, x87 or MXCSR state: the interrupted code's values are
/// still in those registers. It is integer code by construction (no floats, no copies of large
/// values — the consumers get a reference to the pushed frame, never a copy), and a test
/// (`tests/state_preservation.rs`) disassembles it and everything it calls directly to prove it.
/// Per hit: one thread-local read, the pool claim (a swap on this thread's own line), one
/// registry read section, one load of the probe's list — no tree lookup and no address-space
/// resolve: the trampoline *is* the probe's, as a kernel optprobe's is.
#[inline(never)]
pub(super) extern "sysv64" fn trampoline_entry(
    frame: *mut Regs,
    ctx: &'static ProbeCtx,
    area: *mut u8,
    tramp: u64,
) {
    let Some(live) = LIVE.get().copied() else {
        return;
    };
    let outer = IN_TRAMPOLINE.with(|t| t.replace((tramp, t.get().1 + 1)));
    // SAFETY: the trampoline passes the frame it just pushed, laid out as `Regs`; the two slots
    // it left for RSP and RIP are filled here, once, before anyone reads the frame.
    let regs = unsafe {
        (*frame).rsp = frame as u64 + core::mem::size_of::<Regs>() as u64 + RED_ZONE;
        (*frame).rip = ctx.addr;
        &*frame
    };
    let pooled = live.claim();
    {
        let _guard = live.reg.rcu().read_lock(&pooled.reader);
        // Acquire pairs with the AcqRel swap in `Live::publish`.
        let list = ctx.list.load(Ordering::Acquire);
        if !list.is_null() {
            // SAFETY: a published list stays allocated until a grace period after it is swapped
            // out, and we are inside a read section of that domain (INVARIANT of ProbeCtx).
            let list = unsafe { &*list };
            if list.full {
                // SAFETY: `area` is the trampoline's `xsave_size` bytes, 64-byte aligned, below
                // the frame, sized for `live`'s XState.
                unsafe { run_full(&live.opt.space().xstate, list, regs, area) };
            } else {
                for h in list.hooks.iter() {
                    h.call(regs);
                }
            }
        }
    }
    Live::release(pooled);
    IN_TRAMPOLINE.with(|t| t.set(outer));
}

/// The full-state hit: save the extended state, give the consumers the ABI's clean state, run
/// them, restore.
///
/// # Safety
///
/// `area` is `xs.size` writable bytes, 64-byte aligned, on this thread's stack below the frame.
#[inline(never)]
pub(super) unsafe fn run_full(xs: &XState, list: &HitList, regs: &Regs, area: *mut u8) {
    // Touch the area from its top byte down, one byte per 4 KiB and the bottom byte last, as a
    // stack probe does: no two touches (nor the frame above and the first) are a page apart, so
    // a thread near the end of its stack faults on its guard page here instead of the save
    // writing past it.
    let mut off = (xs.size as usize).saturating_sub(1);
    loop {
        // SAFETY: inside `area` (the caller's contract).
        unsafe { core::ptr::read_volatile(area.add(off)) };
        if off == 0 {
            break;
        }
        off = off.saturating_sub(4096);
    }
    // SAFETY: the caller's contract; `xs` is this CPU's (or forced for a test).
    unsafe {
        xs.save(area);
        xs.reset_for_abi(area);
    }
    for h in list.hooks.iter() {
        h.call(regs);
    }
    // SAFETY: `area` holds what `save` just wrote, on this thread.
    unsafe { xs.restore(area) };
}
