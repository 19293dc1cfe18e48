//! Trampolines: their code comes from the arch crate (`probe_arch_x86_64::trampoline`); here is
//! `trampoline_entry`, the vector-free Rust every trampoline calls (with `run_full`, which saves and restores the extended state around
//! closure consumers).

use super::*;

pub(super) use probe_arch_x86_64::trampoline::{RED_ZONE, TRAMPOLINE};

/// The trampoline's code at `at` for the probe whose context is `ctx` (the arch crate's
/// builder, calling [`trampoline_entry`]): its bytes and its displaced-instructions entry.
pub(super) fn trampoline(
    at: u64,
    ctx: &'static ProbeCtx,
    xsave_size: u32,
    range: &probe_arch_x86_64::detour::JumpRange,
) -> Result<(Vec<u8>, u64), Refusal> {
    let t = probe_arch_x86_64::trampoline::build(
        at,
        trampoline_entry as *const () as u64,
        ctx as *const ProbeCtx as u64,
        xsave_size,
        range,
    )?;
    Ok((t.bytes().to_vec(), t.displaced))
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
