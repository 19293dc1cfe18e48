//! The kernel's own locks and atomics: `IrqSpinLock`, a ticket spinlock that keeps interrupts
//! off while held (the `RawLock` probe-core's writers take). Atomics come from `core`.

use core::cell::UnsafeCell;
pub use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use probe_core::lock::RawLock;

/// A ticket spinlock; interrupts are off from `lock` to `unlock` on the holding CPU (an interrupt
/// handler could otherwise spin on a lock its own CPU holds).
pub struct IrqSpinLock {
    next: AtomicU32,
    serving: AtomicU32,
    /// RFLAGS.IF of the holder before `lock` (written only by the holder).
    was_on: UnsafeCell<bool>,
}

// SAFETY: `was_on` is touched only by the CPU holding the lock.
unsafe impl Sync for IrqSpinLock {}
// SAFETY: as above.
unsafe impl Send for IrqSpinLock {}

impl Default for IrqSpinLock {
    fn default() -> Self {
        Self::new()
    }
}

impl IrqSpinLock {
    /// Unlocked.
    pub const fn new() -> Self {
        Self {
            next: AtomicU32::new(0),
            serving: AtomicU32::new(0),
            was_on: UnsafeCell::new(false),
        }
    }
}

/// Interrupts off; were they on?
fn irq_save() -> bool {
    let f: u64;
    // SAFETY: reads RFLAGS and clears IF.
    unsafe { core::arch::asm!("pushfq", "pop {}", "cli", out(reg) f, options(nomem)) };
    f & (1 << 9) != 0
}

fn irq_restore(on: bool) {
    if on {
        // SAFETY: re-enables interrupts the caller had on.
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    }
}

// SAFETY: a ticket lock: one holder at a time; Acquire on taking pairs with the Release in
// `unlock`, so the holder sees everything the previous holder did.
unsafe impl RawLock for IrqSpinLock {
    fn lock(&self) {
        let on = irq_save();
        // Relaxed: the ticket only orders waiters; the Acquire load below synchronizes.
        let me = self.next.fetch_add(1, Ordering::Relaxed);
        // Acquire pairs with the Release store in `unlock`.
        while self.serving.load(Ordering::Acquire) != me {
            core::hint::spin_loop();
        }
        // SAFETY: we hold the lock.
        unsafe { *self.was_on.get() = on };
    }
    fn try_lock(&self) -> bool {
        let on = irq_save();
        // Relaxed: read again by the compare-exchange.
        let s = self.serving.load(Ordering::Relaxed);
        // Acquire pairs with the Release store in `unlock`.
        if self
            .next
            .compare_exchange(s, s + 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            // SAFETY: we hold the lock.
            unsafe { *self.was_on.get() = on };
            true
        } else {
            irq_restore(on);
            false
        }
    }
    unsafe fn unlock(&self) {
        // SAFETY: we hold the lock (the caller's contract).
        let on = unsafe { *self.was_on.get() };
        // Relaxed: only the holder writes `serving`.
        let s = self.serving.load(Ordering::Relaxed);
        // Release pairs with the Acquire loads in `lock` / `try_lock`.
        self.serving.store(s + 1, Ordering::Release);
        irq_restore(on);
    }
}
