//! The COM1 UART (16550 at I/O port 0x3F8): the console and the test's verdict channel.

use crate::port::{inb, outb};
use core::fmt;

const COM1: u16 = 0x3F8;

/// 115 200 baud, 8N1, FIFO on.
pub fn init() {
    // SAFETY: the standard COM1 programming sequence; nothing else drives these ports.
    unsafe {
        outb(COM1 + 1, 0x00); // interrupts off
        outb(COM1 + 3, 0x80); // DLAB
        outb(COM1, 0x01); // divisor 1: 115 200
        outb(COM1 + 1, 0x00);
        outb(COM1 + 3, 0x03); // 8N1
        outb(COM1 + 2, 0xC7); // FIFO
        outb(COM1 + 4, 0x03);
    }
}

fn put(b: u8) {
    // SAFETY: polling the line status register, then writing the data register.
    unsafe {
        while inb(COM1 + 5) & 0x20 == 0 {
            core::hint::spin_loop();
        }
        outb(COM1, b);
    }
}

/// Writes to the UART (callers serialize through `crate::console`).
pub struct Serial;

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                put(b'\r');
            }
            put(b);
        }
        Ok(())
    }
}

static CONSOLE: crate::sync::IrqSpinLock = crate::sync::IrqSpinLock::new();

/// Prints one line, whole (CPUs take turns).
pub fn print(args: fmt::Arguments<'_>) {
    use fmt::Write;
    use probe_core::lock::RawLock;
    CONSOLE.lock();
    let _ = Serial.write_fmt(args);
    let _ = Serial.write_str("\n");
    // SAFETY: locked just above, by this CPU.
    unsafe { CONSOLE.unlock() };
}
