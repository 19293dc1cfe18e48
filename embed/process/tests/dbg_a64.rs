use probe_process::live::{Consumer, Live, Regs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
#[test]
fn dbg() {
    let live = Live::install().unwrap();
    eprintln!("installed");
    let h = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW) };
    assert!(!h.is_null());
    eprintln!("opened; objects {:?}", live.objects());
    let f = live.function("libz.so.1", "crc32_z");
    eprintln!("fn {f:?}");
    let n = Arc::new(AtomicU64::new(0));
    let m = n.clone();
    let c: Arc<Consumer> = Arc::new(move |_: &Regs| {
        m.fetch_add(1, Ordering::Relaxed);
    });
    let p = live.attach_symbol("libz.so.1", "crc32_z", 0, c);
    eprintln!("attached {p:?}");
    let crc: unsafe extern "C" fn(u64, *const u8, usize) -> u64 =
        unsafe { core::mem::transmute(libc::dlsym(h, c"crc32_z".as_ptr())) };
    eprintln!("crc {}", unsafe { crc(0, b"abc".as_ptr(), 3) });
    eprintln!("hits {}", n.load(Ordering::Relaxed));
    let t = std::time::Instant::now();
    unsafe { libc::dlclose(h) };
    live.refresh_mappings().unwrap();
    eprintln!(
        "closed+refresh {:?} objects {:?}",
        t.elapsed(),
        live.objects().unwrap().len()
    );
    let t = std::time::Instant::now();
    let h = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW) };
    eprintln!("reopened {:?}", t.elapsed());
    live.refresh_mappings().unwrap();
    eprintln!("refreshed {:?}", t.elapsed());
    let crc: unsafe extern "C" fn(u64, *const u8, usize) -> u64 =
        unsafe { core::mem::transmute(libc::dlsym(h, c"crc32_z".as_ptr())) };
    eprintln!("crc {}", unsafe { crc(0, b"abc".as_ptr(), 3) });
    eprintln!("hits {}", n.load(Ordering::Relaxed));
    live.detach(p.unwrap()).unwrap();
    eprintln!("detached");
}
