//! The local APIC (xAPIC, memory-mapped at 0xFEE0_0000, identity-mapped by `boot`): IDs, EOI,
//! IPIs. QEMU 7.2's TCG has no x2APIC.

const BASE: usize = 0xFEE0_0000;

fn read(off: usize) -> u32 {
    // SAFETY: the LAPIC's MMIO page is identity-mapped; 32-bit aligned register reads.
    unsafe { ((BASE + off) as *const u32).read_volatile() }
}

fn write(off: usize, v: u32) {
    // SAFETY: as in `read`.
    unsafe { ((BASE + off) as *mut u32).write_volatile(v) }
}

/// This CPU's APIC ID.
pub fn id() -> u32 {
    read(0x20) >> 24
}

/// Software-enables this CPU's LAPIC (spurious vector 0xFF), accepting every priority.
pub fn enable() {
    write(0x80, 0);
    write(0xF0, 0x100 | u32::from(crate::cpu::SPURIOUS));
}

/// Ends the current interrupt.
pub fn eoi() {
    write(0xB0, 0);
}

fn wait_idle() {
    while read(0x300) & (1 << 12) != 0 {
        core::hint::spin_loop();
    }
}

/// Sends `low` (vector and delivery mode) to the CPU with APIC ID `dest`.
pub fn send(dest: u32, low: u32) {
    write(0x310, dest << 24);
    write(0x300, low);
    wait_idle();
}

/// A fixed-delivery IPI with `vector` to every CPU but this one.
pub fn send_all_others(vector: u8) {
    write(0x310, 0);
    write(0x300, u32::from(vector) | (0b11 << 18) | (1 << 14));
    wait_idle();
}
