//! A `#![no_std]` staticlib that links probe-core with its own panic handler and allocator.
//!
//! If `std` reaches probe-core's dependency graph, std's `panic_impl` lang item collides with
//! the `#[panic_handler]` below and this crate fails to build ("duplicate lang item").

#![no_std]

use core::alloc::{GlobalAlloc, Layout};
use probe_core::prelude::*;

struct NoAlloc;

// SAFETY: never hands out memory; returning null is the allocator's way to report failure.
unsafe impl GlobalAlloc for NoAlloc {
    unsafe fn alloc(&self, _: Layout) -> *mut u8 {
        core::ptr::null_mut()
    }
    unsafe fn dealloc(&self, _: *mut u8, _: Layout) {}
}

#[global_allocator]
static ALLOC: NoAlloc = NoAlloc;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// Exercises both RCU flavours, the registry and the lock table so they are linked in.
#[unsafe(no_mangle)]
pub extern "C" fn probe_core_no_std_smoke() -> usize {
    let reg: Registry<u8, SlotRcu> = Registry::new(SlotRcu::new());
    #[cfg(feature = "epoch")]
    let epoch_len = Registry::<u8, EpochRcu>::new(EpochRcu::new()).len();
    #[cfg(not(feature = "epoch"))]
    let epoch_len = 0;
    let key = ProbeKey::new(ObjectId(1), 2);
    let table: LockTable<SpinLock, 8> = LockTable::new();
    // With an allocator that always fails, registration must report it, not abort.
    let r = reg.register(key, alloc_arc());
    usize::from(r == Err(Error::NoMemory)) + epoch_len + usize::from(table.slot_of(ObjectId(3)) < 8)
}

extern crate alloc;
fn alloc_arc() -> alloc::sync::Arc<u8> {
    // Never reached in practice (the allocator fails first); only here to name the type.
    alloc::sync::Arc::new(0)
}
