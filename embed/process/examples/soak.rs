//! A soak of the process embedding: hits on every thread while the main thread churns probes
//! (attach, optimize, detach), `dlopen`/`dlclose`s zlib with a probe that follows it, and
//! samples the resident set. The exact-hit oracle: one probe on `soak_target` stays attached
//! for the whole run while probes inside and right after its jump range are attached,
//! optimized and detached beside it — its hit count must equal the calls the threads made,
//! exactly; the zlib probe must see exactly the calls made while zlib was mapped and it was
//! armed.
//!
//! The churned probe takes three places in turn: inside the permanent probe's jump range
//! (offset 4: a collision, which forces the permanent probe back to its breakpoint until the
//! churned one is gone, then has it optimized again) and just after it (offsets 7 and 8).
//! `SOAK_OFFS` takes another comma-separated list of offsets.
//!
//! ```sh
//! cargo run --release -p probe-process --example soak -- 600   # seconds (CI runs 5)
//! ```
//! Prints calls, hits, churn counts and the resident set after warm-up and at the end; exits
//! non-zero if an oracle fails or the resident set grew by more than 8 MiB after warm-up.

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn main() {
    println!(
        "soak: x86_64 Linux (the aarch64 suite runs under qemu-user, where a soak's times mean nothing)"
    );
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn main() {
    imp::main();
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use probe_process::live::{Consumer, EXE, Live, Regs};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    core::arch::global_asm!(
        ".text",
        ".p2align 4",
        ".globl soak_target",
        ".type soak_target, @function",
        "soak_target:",
        "lea rax, [rdi + rsi]",
        "nop dword ptr [rax]",
        "nop",
        "ret",
        ".size soak_target, .-soak_target",
    );

    unsafe extern "C" {
        fn soak_target(a: u64, b: u64) -> u64;
    }

    fn rss_kib() -> u64 {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * 4)
    }

    type Crc = unsafe extern "C" fn(u64, *const u8, usize) -> u64;

    pub fn main() {
        let secs: u64 = std::env::args()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(10);
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let live = Live::install().expect("install");
        live.start_optimizer(Duration::from_millis(2));
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let main_probe: Arc<Consumer> = Arc::new(move |_: &Regs| {
            h.fetch_add(1, Ordering::Relaxed);
        });
        let at = live.symbol(EXE, "soak_target").expect("symbol");
        let permanent = live.attach(at, main_probe).expect("attach");
        let stop = AtomicBool::new(false);
        let calls = AtomicU64::new(0);
        let churn_hits = Arc::new(AtomicU64::new(0));
        let (mut attaches, mut dl_rounds, mut zlib_calls) = (0u64, 0u64, 0u64);
        let zlib_hits = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut warm_rss = 0;
        let mut peak_after_warm = 0;
        std::thread::scope(|sc| {
            for t in 0..threads as u64 {
                let (stop, calls) = (&stop, &calls);
                sc.spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for i in 0..1024u64 {
                            // SAFETY: lea/nop/ret: a plain sysv64 function.
                            let r = unsafe { soak_target(i, t) };
                            assert_eq!(r, i + t);
                        }
                        n += 1024;
                    }
                    calls.fetch_add(n, Ordering::Relaxed);
                });
            }
            let mut round = 0u64;
            while start.elapsed() < Duration::from_secs(secs) {
                round += 1;
                // A probe beside the permanent one, attached, optimized by the delayed
                // optimizer, detached.
                let ch = churn_hits.clone();
                let c: Arc<Consumer> = Arc::new(move |_: &Regs| {
                    ch.fetch_add(1, Ordering::Relaxed);
                });
                // Offsets of the churned probe: inside the permanent one's jump range (0..7),
                // and after it.
                let offs: Vec<u64> = std::env::var("SOAK_OFFS")
                    .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
                    .unwrap_or(vec![4, 7, 8]);
                let off = offs[round as usize % offs.len()];
                let p = live.attach(at + off, c).expect("churn attach");
                attaches += 1;
                std::thread::sleep(Duration::from_millis(3));
                live.detach(p).expect("churn detach");
                // zlib every tenth round: dlopen, a probe by name, calls, detach, dlclose.
                if round.is_multiple_of(10) {
                    // SAFETY: a valid C string; zlib has no constructors with preconditions.
                    let z = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW) };
                    assert!(!z.is_null(), "dlopen libz.so.1");
                    let zh = zlib_hits.clone();
                    let zc: Arc<Consumer> = Arc::new(move |_: &Regs| {
                        zh.fetch_add(1, Ordering::Relaxed);
                    });
                    let zp = live
                        .attach_symbol("libz.so.1", "crc32_z", 0, zc)
                        .expect("attach crc32_z");
                    // SAFETY: zlib's crc32_z signature; the handle is open.
                    let crc: Crc =
                        unsafe { core::mem::transmute(libc::dlsym(z, c"crc32_z".as_ptr())) };
                    let buf = [0x5Au8; 256];
                    for _ in 0..100 {
                        // SAFETY: a valid buffer and length.
                        std::hint::black_box(unsafe { crc(0, buf.as_ptr(), buf.len()) });
                        zlib_calls += 1;
                    }
                    live.detach(zp).expect("detach crc32_z");
                    // SAFETY: our handle; nothing of zlib is used after this.
                    unsafe { libc::dlclose(z) };
                    live.refresh_mappings().expect("refresh");
                    dl_rounds += 1;
                }
                let e = start.elapsed();
                if warm_rss == 0 && e > Duration::from_secs(secs.min(60) / 5 + 1) {
                    warm_rss = rss_kib();
                }
                if warm_rss != 0 {
                    peak_after_warm = peak_after_warm.max(rss_kib());
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
        live.detach(permanent).expect("detach");
        let calls = calls.load(Ordering::Relaxed);
        let hits = hits.load(Ordering::Relaxed);
        let end_rss = rss_kib();
        let (made, reused, freed) = live.trampoline_stats();
        println!(
            "soak: {secs} s, {threads} threads: {calls} calls, {hits} hits on the permanent probe; \
             {attaches} churn attach/detach rounds ({} churn hits), {dl_rounds} dlopen/dlclose rounds, \
             {zlib_calls} zlib calls, {} zlib hits; trampolines made/reused/freed {made}/{reused}/{freed}; \
             resident set {warm_rss} KiB after warm-up, peak {peak_after_warm} KiB after it, {end_rss} KiB at the end",
            churn_hits.load(Ordering::Relaxed),
            zlib_hits.load(Ordering::Relaxed),
        );
        let mut ok = true;
        if hits != calls {
            println!("FAIL: hits {hits} != calls {calls}");
            ok = false;
        }
        if zlib_hits.load(Ordering::Relaxed) != zlib_calls {
            println!("FAIL: zlib hits != zlib calls");
            ok = false;
        }
        if warm_rss != 0 && peak_after_warm > warm_rss + 8 * 1024 {
            println!(
                "FAIL: the resident set grew {} KiB after warm-up",
                peak_after_warm - warm_rss
            );
            ok = false;
        }
        if !ok {
            std::process::exit(1);
        }
        println!("soak: every oracle held");
    }
}
