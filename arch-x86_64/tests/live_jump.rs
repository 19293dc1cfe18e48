//! The int3-first protocol on real hardware: a thread calls a function in a tight loop while the
//! test patches a 5-byte `jmp rel32` over its first instruction and back again, thousands of
//! times, with `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE)` as the cross-core sync.
//!
//! The code lives in a memfd mapped twice: read+execute where the thread runs it, read+write
//! where the patcher writes (so no page is ever writable and executable). A thread that arrives
//! while the first byte is `INT3` takes SIGTRAP; the handler answers with what the site is
//! *becoming* — the jump's target, or an XOL copy of the original instruction — as the
//! optimizer's hit path does.
//!
//! Checked: every call returns 1 (original) or 2 (jumped); once a batch returns, every call that
//! starts afterwards sees the new code; the loop never crashes; the bytes end as they began.
//! Linux x86_64 only; skipped with a printed reason if membarrier's SYNC_CORE is unavailable.

#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

use probe_arch_x86_64::insn::Insn;
use probe_arch_x86_64::live_patch::{CodeWriter, patch_batch};
use probe_arch_x86_64::{jmp_rel32, xol};
use probe_core::arch::Patch;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

const PAGE: usize = 4096;
const F: usize = 0x100; // mov eax, 1 ; ret
const G: usize = 0x200; // mov eax, 2 ; ret
const SLOT: usize = 0x300; // XOL copy of `mov eax, 1`, jumping back to F + 5
const ORIGINAL: [u8; 5] = [0xB8, 1, 0, 0, 0];

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_int = 1 << 6;

fn membarrier(cmd: libc::c_int) -> std::io::Result<()> {
    // SAFETY: membarrier takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What the site is becoming, for the trap handler: where a trapped thread continues.
static TRAP_RESUME: AtomicU64 = AtomicU64::new(0);
/// The site's address (the INT3 is its first byte).
static SITE: AtomicU64 = AtomicU64::new(0);
static TRAPS: AtomicU64 = AtomicU64::new(0);
static FOREIGN: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_sigtrap(_sig: libc::c_int, _info: *mut libc::siginfo_t, uc: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO handler; we touch only its
    // saved RIP, and only atomics otherwise (async-signal-safe).
    let gregs = unsafe { &mut (*uc.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let rip = gregs[libc::REG_RIP as usize] as u64;
    // INT3 leaves RIP after itself. Acquire pairs with the patcher's Release store of
    // TRAP_RESUME, made before the INT3 went in.
    if rip.wrapping_sub(1) == SITE.load(Ordering::Relaxed) {
        gregs[libc::REG_RIP as usize] = TRAP_RESUME.load(Ordering::Acquire) as i64;
        TRAPS.fetch_add(1, Ordering::Relaxed);
    } else {
        FOREIGN.fetch_add(1, Ordering::Relaxed);
    }
}

struct Alias {
    rw: *mut u8,
}

// SAFETY: the alias is only written by the patching thread; the pointer is to a shared mapping
// that lives for the whole test.
unsafe impl Sync for Alias {}

impl CodeWriter for Alias {
    fn write(&self, addr: u64, bytes: &[u8]) -> probe_core::Result<()> {
        // `addr` is an offset into the memfd (exec and alias views share it).
        // SAFETY: in bounds of the 2-page alias mapping.
        unsafe {
            core::ptr::copy_nonoverlapping(bytes.as_ptr(), self.rw.add(addr as usize), bytes.len())
        }
        Ok(())
    }
    fn sync_cores(&self) {
        membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE).expect("membarrier");
    }
}

fn map_twice() -> (*mut u8, *mut u8) {
    // SAFETY: plain syscalls on our own fd and fresh mappings; results checked.
    unsafe {
        let fd = libc::memfd_create(c"probe-live-jump".as_ptr(), 0);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        assert_eq!(libc::ftruncate(fd, (2 * PAGE) as i64), 0);
        let rx = libc::mmap(
            core::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_SHARED,
            fd,
            0,
        );
        let rw = libc::mmap(
            core::ptr::null_mut(),
            2 * PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        assert!(rx != libc::MAP_FAILED && rw != libc::MAP_FAILED);
        libc::close(fd);
        (rx.cast(), rw.cast())
    }
}

#[test]
fn jump_patched_into_a_running_loop() {
    // SAFETY: alarm has no memory-safety preconditions (a hang ends the process loudly).
    unsafe { libc::alarm(240) };
    if let Err(e) = membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE) {
        println!("skipped: membarrier SYNC_CORE unavailable ({e})");
        return;
    }
    let (rx, rw) = map_twice();
    let exec = rx as u64;
    let alias = Alias { rw };
    // The code, written through the alias.
    let mut f = ORIGINAL.to_vec();
    f.push(0xC3);
    alias.write(F as u64, &f).expect("write");
    alias
        .write(G as u64, &[0xB8, 2, 0, 0, 0, 0xC3])
        .expect("write");
    let insn = Insn::decode(&ORIGINAL, exec + F as u64).unwrap();
    let copy = xol::prepare(&insn, exec + SLOT as u64).unwrap();
    alias.write(SLOT as u64, copy.bytes()).expect("write");
    // The jump, computed at the exec address but written at the alias offset.
    let jump = jmp_rel32(exec + F as u64, exec + G as u64).unwrap();

    // SAFETY: installing a handler that only touches atomics and the ucontext.
    unsafe {
        let mut sa: libc::sigaction = core::mem::zeroed();
        sa.sa_sigaction = on_sigtrap as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(
            libc::sigaction(libc::SIGTRAP, &sa, core::ptr::null_mut()),
            0
        );
    }
    SITE.store(exec + F as u64, Ordering::Relaxed);

    // SAFETY: F is `mov eax, imm32; ret` (or a jump to G, the same shape): a valid sysv64
    // function returning u32.
    let func: extern "sysv64" fn() -> u32 = unsafe { core::mem::transmute(exec + F as u64) };
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU32::new(0));
    let looper = {
        let (stop, calls, last) = (stop.clone(), calls.clone(), last.clone());
        std::thread::spawn(move || {
            let mut seen = [0u64; 3];
            while !stop.load(Ordering::Relaxed) {
                let v = func();
                if !(1..=2).contains(&v) {
                    return Err(format!("call returned {v}"));
                }
                seen[v as usize] += 1;
                // Release: the result is visible before the count that announces it.
                last.store(v, Ordering::Release);
                calls.fetch_add(1, Ordering::Release);
            }
            Ok(seen)
        })
    };

    // After a batch returns, a call that starts afterwards must see the new code.
    let settle_and_check = |want: u32| {
        let c0 = calls.load(Ordering::Acquire);
        while calls.load(Ordering::Acquire) < c0 + 2 {
            std::hint::spin_loop();
        }
        assert_eq!(
            last.load(Ordering::Acquire),
            want,
            "a call after the batch saw old code"
        );
    };
    let cycles = 2000;
    let mut syncs = 0;
    for _ in 0..cycles {
        // Becoming the jump: a trapped thread goes where the jump goes.
        TRAP_RESUME.store(exec + G as u64, Ordering::Release);
        let p = Patch::new(F as u64, &ORIGINAL, &jump).unwrap();
        syncs += patch_batch(&alias, &[p]).expect("patch");
        settle_and_check(2);
        // Becoming the original: a trapped thread runs the original out of line.
        TRAP_RESUME.store(copy.slot(), Ordering::Release);
        let p = Patch::new(F as u64, &jump, &ORIGINAL).unwrap();
        syncs += patch_batch(&alias, &[p]).expect("patch");
        settle_and_check(1);
    }
    stop.store(true, Ordering::Relaxed);
    let seen = looper
        .join()
        .expect("looper panicked")
        .expect("looper misbehaved");
    // SAFETY: in bounds of the exec mapping.
    let now = unsafe { core::slice::from_raw_parts(rx.add(F), 6) };
    assert_eq!(now, &f[..], "the bytes end as they began");
    assert_eq!(func(), 1);
    assert_eq!(syncs, cycles * 6, "three syncs per batch");
    assert_eq!(FOREIGN.load(Ordering::Relaxed), 0);
    println!(
        "{cycles} jump/unjump cycles ({syncs} membarrier syncs) under a loop of {} calls \
         (returned 1: {}, 2: {}); {} calls arrived mid-patch and were answered by the trap handler",
        seen[1] + seen[2],
        seen[1],
        seen[2],
        TRAPS.load(Ordering::Relaxed)
    );
}
