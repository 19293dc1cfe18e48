//! Probes in a shared library nobody here wrote: zlib (`libz.so.1`), loaded with `dlopen`.
//!
//! * Every instruction boundary of several of its exported functions (`crc32_z`, `adler32_z`,
//!   `deflate`, `inflate`, …; their static helpers are not in the stripped library's symbols,
//!   but `deflate` and `inflate` run them), in both paths: all at once as breakpoints, then one
//!   at a time with the optimizer run (a jump wherever the analysis allows). The oracle:
//!   every output equals the unprobed run's, and each boundary's hit count is the same in both
//!   passes (the workload is deterministic: same buffers, same input), with a function's entry
//!   hit exactly once per call.
//! * `dlclose`/`dlopen` churn: a probe attached by the library's name follows it — gone with
//!   the mapping, armed again at the next `dlopen`, wherever the library lands — and a probe
//!   attached by path while the library is unmapped is armed when it is mapped.

use probe_process::live::{Consumer, Live, Optimization, Regs};
use std::collections::BTreeMap;
use std::ffi::{CStr, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

static SERIAL: Mutex<()> = Mutex::new(());

fn live() -> &'static Live {
    static L: OnceLock<&'static Live> = OnceLock::new();
    L.get_or_init(|| Live::install().expect("install"))
}

const LIBZ: &CStr = c"libz.so.1";

/// zlib loaded with `dlopen` (a handle; `Drop` closes it).
struct Zlib {
    handle: *mut c_void,
}

type Checksum = unsafe extern "C" fn(u64, *const u8, usize) -> u64;
type Compress2 = unsafe extern "C" fn(*mut u8, *mut u64, *const u8, u64, i32) -> i32;
type Uncompress = unsafe extern "C" fn(*mut u8, *mut u64, *const u8, u64) -> i32;

impl Zlib {
    fn open() -> Self {
        // SAFETY: a valid C string; libz has no constructors with preconditions.
        let handle = unsafe { libc::dlopen(LIBZ.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        assert!(
            !handle.is_null(),
            "dlopen libz.so.1 (apt-get install zlib1g)"
        );
        Self { handle }
    }
    fn sym<T: Copy>(&self, name: &CStr) -> T {
        // SAFETY: a live handle and a C string.
        let p = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!p.is_null(), "{name:?}");
        assert_eq!(size_of::<T>(), size_of::<*mut c_void>());
        // SAFETY: `T` is the function pointer type of this zlib symbol (zlib.h).
        unsafe { core::mem::transmute_copy(&p) }
    }
}

impl Drop for Zlib {
    fn drop(&mut self) {
        // SAFETY: our handle, closed once; no pointer into it outlives `self` (the workload
        // takes `&Zlib`).
        unsafe { libc::dlclose(self.handle) };
    }
}

/// What the workload computes, to compare with the unprobed run.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Outputs {
    crc: u64,
    adler: u64,
    compressed: Vec<u8>,
    roundtrip_ok: bool,
}

/// Deterministic input: text-like bytes with repeats (so deflate finds matches).
fn input() -> &'static [u8] {
    static I: OnceLock<Vec<u8>> = OnceLock::new();
    I.get_or_init(|| {
        let mut v = Vec::with_capacity(8 << 10);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        while v.len() < 8 << 10 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let word = b"probe core zlib inflate deflate crc adler window match ";
            let at = (x % 40) as usize;
            v.extend_from_slice(&word[at..at + 1 + (x >> 8) as usize % 12]);
        }
        v
    })
}

/// Calls of each entry point per workload run.
/// (`adler32_z` is called by deflate and inflate too, so it is not here.)
const CALLS: &[(&str, u64)] = &[("crc32_z", 3), ("compress2", 1), ("uncompress", 1)];

/// Buffers reused by every run, so the code takes the same paths (alignment included).
struct Buffers {
    out: Vec<u8>,
    back: Vec<u8>,
}

fn workload(z: &Zlib, b: &mut Buffers) -> Outputs {
    let crc32_z: Checksum = z.sym(c"crc32_z");
    let adler32_z: Checksum = z.sym(c"adler32_z");
    let compress2: Compress2 = z.sym(c"compress2");
    let uncompress: Uncompress = z.sym(c"uncompress");
    let data = input();
    // SAFETY: zlib's documented signatures, valid buffers and lengths.
    unsafe {
        let mut crc = 0;
        let mut adler = 1;
        for part in [&data[..1], &data[1..4097], &data[4097..]] {
            crc = crc32_z(crc, part.as_ptr(), part.len());
            adler = adler32_z(adler, part.as_ptr(), part.len());
        }
        let mut out_len = b.out.len() as u64;
        assert_eq!(
            compress2(
                b.out.as_mut_ptr(),
                &mut out_len,
                data.as_ptr(),
                data.len() as u64,
                6
            ),
            0
        );
        let mut back_len = b.back.len() as u64;
        assert_eq!(
            uncompress(b.back.as_mut_ptr(), &mut back_len, b.out.as_ptr(), out_len),
            0
        );
        Outputs {
            crc,
            adler,
            compressed: b.out[..out_len as usize].to_vec(),
            roundtrip_ok: back_len as usize == data.len() && &b.back[..data.len()] == data,
        }
    }
}

/// A register-only consumer: counts into the `AtomicU64` its context points to.
unsafe extern "C" fn raw_count(_regs: &Regs, ctx: *mut c_void) {
    // SAFETY: `ctx` is the test's `AtomicU64`, alive until after its detach.
    unsafe { &*ctx.cast::<AtomicU64>() }.fetch_add(1, Ordering::Relaxed);
}

fn counter(n: &Arc<AtomicU64>) -> Arc<Consumer> {
    let n = n.clone();
    Arc::new(move |_: &Regs| {
        n.fetch_add(1, Ordering::Relaxed);
    })
}

/// The functions probed at every boundary (what `compress2` and `uncompress` call: they
/// run deflate's and inflate's static helpers too).
const FUNCTIONS: &[&str] = &[
    "crc32_z",
    "adler32_z",
    "compress2",
    "deflate",
    "deflateInit2_",
    "deflateEnd",
    "uncompress",
    "inflate",
    "inflateInit2_",
    "inflateEnd",
];

#[test]
fn every_boundary_of_zlib_functions_in_both_paths_leaves_outputs_unchanged() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let z = Zlib::open();
    let mut b = Buffers {
        out: vec![0; 64 << 10],
        back: vec![0; 64 << 10],
    };
    let reference = workload(&z, &mut b);
    assert!(reference.roundtrip_ok);
    let mut total_boundaries = 0;
    let mut total_jumps = 0;
    let mut total_hits = 0u64;
    for &f in FUNCTIONS {
        let bounds = live
            .instruction_boundaries("libz.so.1", f)
            .unwrap_or_else(|e| panic!("{f}: {e}"));
        // Pass 1: every boundary at once, breakpoints (the optimizer does not run).
        let mut counts: BTreeMap<u64, u64> = BTreeMap::new();
        let mut probes = Vec::new();
        let mut refused = 0;
        for &off in &bounds {
            let n = Arc::new(AtomicU64::new(0));
            match live.attach_symbol("libz.so.1", f, off, counter(&n)) {
                Ok(p) => probes.push((off, n, p)),
                // An instruction the arch refuses (none expected in zlib, but say so).
                Err(e) => {
                    refused += 1;
                    eprintln!("{f}+{off:#x}: {e}");
                }
            }
        }
        assert_eq!(refused, 0, "{f}: refused boundaries");
        assert_eq!(
            workload(&z, &mut b),
            reference,
            "{f}: all boundaries as breakpoints"
        );
        for (off, n, p) in probes {
            counts.insert(off, n.load(Ordering::Relaxed));
            live.detach(p).unwrap();
        }
        if let Some(&(_, calls)) = CALLS.iter().find(|c| c.0 == f) {
            assert_eq!(counts[&0], calls, "{f}: entry hits");
        }
        // Pass 2: one boundary at a time, optimized where it can be, with a register-only
        // consumer (on an SVE CPU a closure consumer keeps its probe a breakpoint).
        let fn_addr = live.symbol("libz.so.1", f).unwrap();
        for &off in &bounds {
            let n = Arc::new(AtomicU64::new(0));
            // SAFETY: `raw_count` is integer code and async-signal-safe; `n` outlives the
            // detach below.
            let p = unsafe {
                live.attach_raw(
                    fn_addr + off,
                    Some(raw_count),
                    Arc::as_ptr(&n).cast_mut().cast(),
                )
            }
            .unwrap();
            live.run_optimizer();
            if live.optimization(fn_addr + off) == Optimization::Jump {
                total_jumps += 1;
            }
            assert_eq!(workload(&z, &mut b), reference, "{f}+{off:#x}: alone");
            let hits = n.load(Ordering::Relaxed);
            assert_eq!(
                hits, counts[&off],
                "{f}+{off:#x}: hits alone vs all at once"
            );
            total_hits += hits;
            live.detach(p).unwrap();
        }
        total_boundaries += bounds.len();
    }
    // The bytes are back: the unprobed run again.
    assert_eq!(workload(&z, &mut b), reference);
    eprintln!(
        "zlib: {} functions, {total_boundaries} boundaries probed in both paths, {total_jumps} of them as jumps, {total_hits} hits",
        FUNCTIONS.len()
    );
    assert!(total_jumps > 0, "some zlib probes must become jumps");
}

#[test]
fn a_probe_follows_zlib_across_dlclose_and_dlopen() {
    let _s = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let live = live();
    let mut b = Buffers {
        out: vec![0; 64 << 10],
        back: vec![0; 64 << 10],
    };
    let z = Zlib::open();
    let reference = workload(&z, &mut b);
    let path = live
        .objects()
        .unwrap()
        .into_iter()
        .find(|p| p.contains("libz.so"))
        .expect("libz mapped");
    let by_name = Arc::new(AtomicU64::new(0));
    let p1 = live
        .attach_symbol("libz.so.1", "crc32_z", 0, counter(&by_name))
        .unwrap();
    assert_eq!(workload(&z, &mut b), reference);
    assert_eq!(by_name.load(Ordering::Relaxed), 3);
    drop(z);
    live.refresh_mappings().unwrap();
    assert!(
        live.objects()
            .unwrap()
            .iter()
            .all(|p| !p.contains("libz.so")),
        "dlclose did not unmap libz (another user holds it?)"
    );
    assert_eq!(live.address_of(&p1), None, "disarmed with the mapping");
    // Attached by path while unmapped: kept by the registry, armed at the next dlopen.
    let by_path = Arc::new(AtomicU64::new(0));
    let p2 = live
        .attach_symbol(&path, "adler32_z", 0, counter(&by_path))
        .unwrap();
    assert_eq!(p2.addr(), None);
    let mut expect = 3;
    // adler32_z's calls per workload (deflate and inflate call it too): learnt in round 0.
    let mut per_run = 0;
    for round in 0..20u64 {
        let z = Zlib::open();
        live.refresh_mappings().unwrap();
        assert!(live.address_of(&p1).is_some(), "round {round}: armed again");
        if round % 2 == 1 {
            live.run_optimizer();
        }
        assert_eq!(workload(&z, &mut b), reference, "round {round}");
        expect += 3;
        assert_eq!(by_name.load(Ordering::Relaxed), expect, "round {round}");
        if round == 0 {
            per_run = by_path.load(Ordering::Relaxed);
            assert!(per_run >= 3);
        }
        assert_eq!(
            by_path.load(Ordering::Relaxed),
            per_run * (round + 1),
            "round {round}"
        );
        drop(z);
        if round % 3 == 2 {
            // dlclose and dlopen again with no refresh between: the same range mapped again,
            // fresh pages without our breakpoints — found by checking the code.
            let z = Zlib::open();
            live.refresh_mappings().unwrap();
            assert_eq!(workload(&z, &mut b), reference, "round {round}, remapped");
            expect += 3;
            assert_eq!(
                by_name.load(Ordering::Relaxed),
                expect,
                "round {round}, remapped"
            );
            drop(z);
            assert_eq!(
                by_path.load(Ordering::Relaxed),
                per_run * (round + 2),
                "round {round}"
            );
            by_path.fetch_sub(per_run, Ordering::Relaxed);
        }
        live.refresh_mappings().unwrap();
        assert_eq!(live.address_of(&p1), None, "round {round}: disarmed");
    }
    live.detach(p1).unwrap();
    live.detach(p2).unwrap();
    // Unprobed again.
    let z = Zlib::open();
    live.refresh_mappings().unwrap();
    assert_eq!(workload(&z, &mut b), reference);
    assert_eq!(by_name.load(Ordering::Relaxed), expect);
}
