//! probe-kernel: the smallest honest SMP kernel that uses probe-core as its kprobes.
//!
//! Booted by `qemu-system-x86_64 -kernel` through the PVH entry; long mode, serial console,
//! `isa-debug-exit` for the verdict. See `embed/kernel/src/lib.rs` for the tour.

#![no_std]
#![no_main]

extern crate alloc;

mod apic;
mod boot;
mod cpu;
mod kprobes;
mod percpu;
mod port;
mod rcu;
mod rt;
mod selftest;
mod serial;
mod smp;
mod sync;

/// Prints to the serial console.
macro_rules! kprintln {
    ($($t:tt)*) => {
        $crate::serial::print(format_args!($($t)*))
    };
}
#[allow(unused_imports)]
pub(crate) use kprintln;

#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// The kernel heap (probe-core's lists, trees and sites; the self-test's kprobes).
const HEAP_SIZE: usize = 16 << 20;
#[repr(C, align(4096))]
struct HeapArea([u8; HEAP_SIZE]);
static mut HEAP_AREA: HeapArea = HeapArea([0; HEAP_SIZE]);

/// Called by `boot` on the bootstrap processor in long mode.
#[unsafe(no_mangle)]
extern "C" fn kmain() -> ! {
    serial::init();
    kprintln!("probe-kernel: long mode, SSE on");
    // SAFETY: the heap area is ours alone and handed over once.
    unsafe {
        HEAP.lock()
            .init((&raw mut HEAP_AREA.0).cast::<u8>(), HEAP_SIZE)
    };
    cpu::init_idt();
    cpu::init_this_cpu();
    apic::enable();
    kprobes::init(&selftest::functions());
    selftest::smc_probe();
    let n = smp::cpu_count();
    let online = smp::start_aps(n);
    kprintln!("probe-kernel: {online} of {n} CPUs online");
    selftest::smc_cross();
    let ok = selftest::run();
    kprintln!(
        "selftest: {}",
        if ok && online == n { "PASS" } else { "FAIL" }
    );
    port::exit_qemu(if ok && online == n { 0x10 } else { 0x11 })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    kprintln!("KERNEL PANIC: {info}");
    port::exit_qemu(0x7E)
}
