//! x86 port I/O.

/// # Safety
///
/// The port is one this kernel drives.
#[inline]
pub unsafe fn outb(port: u16, v: u8) {
    // SAFETY: the caller's contract.
    unsafe { core::arch::asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

/// # Safety
///
/// As for [`outb`].
#[inline]
pub unsafe fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: the caller's contract.
    unsafe { core::arch::asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack)) };
    v
}

/// # Safety
///
/// As for [`outb`].
#[inline]
pub unsafe fn outl(port: u16, v: u32) {
    // SAFETY: the caller's contract.
    unsafe { core::arch::asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack)) };
}

/// Ends the QEMU run through `isa-debug-exit` (iobase 0xf4): QEMU exits with `(code << 1) | 1`.
pub fn exit_qemu(code: u32) -> ! {
    // SAFETY: the debug-exit device's port; writing it ends the VM.
    unsafe { outl(0xF4, code) };
    loop {
        // SAFETY: halting with interrupts off is the end.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}
