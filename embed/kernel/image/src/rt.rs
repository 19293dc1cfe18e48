//! What a freestanding binary must supply to the host target's precompiled `core` and `alloc`:
//! the memory functions (there is no libc) and two unwinding symbols `core` references even with
//! `panic = "abort"`.
//!
//! The memory functions are `rep movsb` / `rep stosb` and volatile loops, so LLVM cannot
//! recognise them as the idioms they implement and turn them back into calls to themselves.

/// # Safety
///
/// C's `memcpy`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract; DF is clear (the ABI's rule).
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _, options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
///
/// C's `memmove`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is right when dst is below src or past its end.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backwards, from the last byte; DF restored.
    unsafe {
        core::arch::asm!(
            "std", "rep movsb", "cld",
            inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, inout("rcx") n => _,
            options(nostack)
        )
    };
    dst
}

/// # Safety
///
/// C's `memset`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller's contract.
    unsafe {
        core::arch::asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dst
}

/// # Safety
///
/// C's `memcmp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller's contract; volatile so the loop stays a loop.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
///
/// C's `bcmp` (LLVM emits it for equality tests).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the same contract.
    unsafe { memcmp(a, b, n) }
}

/// Never called (`panic = "abort"`), but `core` references it.
#[unsafe(no_mangle)]
pub extern "C" fn _Unwind_Resume() -> ! {
    crate::port::exit_qemu(0x7F)
}

/// Never called (`panic = "abort"`), but `core` references it.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}
