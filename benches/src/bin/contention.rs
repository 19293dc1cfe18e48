//! The contention-scaling report: probe hits per second against the alternatives, per thread
//! count, while a writer registers/unregisters probes and maps/unmaps code. See `--help` and the
//! `probe_benches` crate docs.
//!
//! ```text
//! cargo run --release -p probe-benches --bin contention
//! ```

use probe_benches::config::{Config, Table, USAGE};
use probe_benches::contenders::*;
use probe_benches::report::{Results, Row};
use probe_benches::run::{Measure, Window};
use probe_benches::workload::Workload;
use probe_core::rcu::{EpochRcu, SlotRcu};
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

/// Every implementation of `table`, in report order.
fn contenders(table: Table, w: &Workload, p: &Probes) -> Vec<Box<dyn Measure + Sync>> {
    (0..table_size(table))
        .filter_map(|i| contender(table, i, w, p))
        .collect()
}

fn table_size(table: Table) -> usize {
    match table {
        Table::Lookup => 7,
        Table::Resolve => 6,
    }
}

/// Implementation `i` of `table` (`None` past the last).
fn contender(table: Table, i: usize, w: &Workload, p: &Probes) -> Option<Box<dyn Measure + Sync>> {
    Some(match (table, i) {
        (Table::Lookup, 0) => Box::new(CoreLookup::<SlotRcu>::new(p)),
        (Table::Lookup, 1) => Box::new(CoreLookup::<EpochRcu>::new(p)),
        (Table::Lookup, 2) => Box::new(KprobeLookup::new(w)),
        (Table::Lookup, 3) => Box::new(Seed000Lookup::new(p)),
        (Table::Lookup, 4) => Box::new(RwLockLookup::new(p)),
        (Table::Lookup, 5) => Box::new(ArcSwapLookup::new(p)),
        (Table::Lookup, 6) => Box::new(CeilingLookup::new(p)),
        (Table::Resolve, 0) => Box::new(CoreResolve::<SlotRcu>::new(w, p)),
        (Table::Resolve, 1) => Box::new(CoreResolve::<EpochRcu>::new(w, p)),
        (Table::Resolve, 2) => Box::new(Seed000Resolve::new(w, p)),
        (Table::Resolve, 3) => Box::new(RwLockResolve::new(w, p)),
        (Table::Resolve, 4) => Box::new(SeqLockResolve::new(w, p)),
        (Table::Resolve, 5) => Box::new(CeilingResolve::new(w, p)),
        _ => return None,
    })
}

/// A child's arguments, `TABLE PROBES INDEX`: the workload for `PROBES` probes and which
/// implementation of which table to build.
fn one(args: &[String], flag: &str) -> Result<(Workload, Probes, Table, usize), String> {
    let [table, probes, index] = args else {
        return Err(format!("{flag} TABLE PROBES INDEX"));
    };
    let table = match table.as_str() {
        "lookup" => Table::Lookup,
        "resolve" => Table::Resolve,
        t => return Err(format!("no table `{t}`")),
    };
    let probes: usize = probes.parse().map_err(|e| format!("{e}"))?;
    let index: usize = index.parse().map_err(|e| format!("{e}"))?;
    let w = Workload::new(probes, 1);
    let p = Probes::new(&w);
    Ok((w, p, table, index))
}

/// Hits counted per pass of the stream in `--instructions` mode (three passes).
const PASSES: usize = 3;

/// `--count-one TABLE PROBES INDEX`: the child callgrind runs — builds one implementation and
/// makes `PASSES` passes of thread 0's stream inside `counted_hits`.
fn count_one(args: &[String]) -> Result<(), String> {
    let (w, p, table, index) = one(args, "--count-one")?;
    let c = contender(table, index, &w, &p).ok_or("no such implementation")?;
    let regs = c.counted(&w, PASSES);
    let full = Workload::expected(w.stream(0));
    if regs.hits != full.hits * PASSES as u64 {
        return Err(format!("{}: wrong hits {regs:?}", c.name()));
    }
    Ok(())
}

/// `--instructions [PROBES,...]`: per-hit instruction counts of every implementation, one
/// thread, no churn, from callgrind (`valgrind --tool=callgrind --toggle-collect`): counts of
/// instructions executed, so the same on any x86-64 machine for the same binary.
fn instructions(args: &[String]) -> Result<(), String> {
    let probes: Vec<usize> = match args.first() {
        Some(list) => list
            .split(',')
            .map(|x| {
                probe_benches::config::number(x)
                    .map(|n| n as usize)
                    .map_err(|e| e.to_string())
            })
            .collect::<Result<_, _>>()?,
        None => vec![1_000, 100_000],
    };
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("probe-core-callgrind-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    println!(
        "instructions per hit, one thread, no churn (callgrind, {} passes of a {}-hit stream); {}",
        PASSES,
        probe_benches::workload::STREAM,
        probe_benches::cpu_model()
    );
    for table in [Table::Lookup, Table::Resolve] {
        for &n in &probes {
            println!("\n{} {n} probes", table.name());
            let w = Workload::new(n.min(1_000), 1);
            let p = Probes::new(&w);
            for i in 0..table_size(table) {
                let Some(c) = contender(table, i, &w, &p) else {
                    continue;
                };
                let name = c.name();
                drop(c);
                let out = dir.join(format!("{}-{n}-{i}.out", table.name()));
                let status = std::process::Command::new("valgrind")
                    .arg("--tool=callgrind")
                    .arg("--toggle-collect=*counted_hits*")
                    .arg(format!("--callgrind-out-file={}", out.display()))
                    .arg(&exe)
                    .args(["--count-one", table.name(), &n.to_string(), &i.to_string()])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map_err(|e| format!("valgrind: {e} (apt-get install valgrind)"))?;
                if !status.success() {
                    return Err(format!("valgrind on {name} failed: {status}"));
                }
                let text = std::fs::read_to_string(&out).map_err(|e| e.to_string())?;
                let total: u64 = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("totals:")
                            .or_else(|| l.strip_prefix("summary:"))
                    })
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
                    .ok_or("no totals in the callgrind output")?;
                let hits = (PASSES * probe_benches::workload::STREAM) as f64;
                println!("  {name:<30} {:>8.1}", total as f64 / hits);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Window markers for `--stores-one`: thread A's start and end, thread B's start and end, each
/// on its own cache line (the parent finds them in the trace by address).
#[repr(C, align(64))]
struct Marker(std::sync::atomic::AtomicU64, [u64; 7]);
static MARKS: [Marker; 4] = [const { Marker(std::sync::atomic::AtomicU64::new(0), [0; 7]) }; 4];

fn mark(i: usize) {
    // Relaxed: a store the tracer sees; nothing reads it.
    MARKS[i].0.store(1, std::sync::atomic::Ordering::Relaxed);
}

/// `--stores-one TABLE PROBES INDEX`: the child lackey traces — two hitting threads, alive at
/// the same time, one after the other making one pass of the stream between markers.
fn stores_one(args: &[String]) -> Result<(), String> {
    let (w, p, table, index) = one(args, "--stores-one")?;
    let c = contender(table, index, &w, &p).ok_or("no such implementation")?;
    println!("marks {:#x}", &MARKS as *const _ as usize);
    // Both threads make their state (an RCU reader each) before either pass, so both readers
    // are alive at once, as two CPUs' are: a reader dropped before the other thread registers
    // would hand it the same slot, and the trace would show one line both "share".
    let made = std::sync::Barrier::new(2);
    let a_done = std::sync::Barrier::new(2);
    let b_done = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ready = || {
                made.wait();
            };
            let r = c.traced(&w, &ready, &|| mark(0), &|| mark(1));
            std::hint::black_box(r);
            a_done.wait();
            b_done.wait();
        });
        s.spawn(|| {
            let after_a = || {
                made.wait();
                a_done.wait();
            };
            std::hint::black_box(c.traced(&w, &after_a, &|| mark(2), &|| mark(3)));
            b_done.wait();
        });
    });
    Ok(())
}

/// `--shared-stores`: for every implementation at 1 000 probes, the stores a hit makes to cache
/// lines another hitting thread also writes — what decides scaling on many cores — counted from
/// a valgrind `lackey --trace-mem` trace of two threads' windows (see `stores_one`).
fn shared_stores() -> Result<(), String> {
    use std::collections::{HashMap, HashSet};
    use std::io::BufRead as _;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("probe-core-lackey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    println!(
        "stores per hit to cache lines both of two hitting threads write (valgrind lackey, one pass of \
         a {}-hit stream per thread, 1 000 probes, no churn); {}",
        probe_benches::workload::STREAM,
        probe_benches::cpu_model()
    );
    for table in [Table::Lookup, Table::Resolve] {
        println!(
            "\n{} 1000 probes: shared stores per hit, shared lines",
            table.name()
        );
        let w = Workload::new(1_000, 1);
        let p = Probes::new(&w);
        for i in 0..table_size(table) {
            let Some(c) = contender(table, i, &w, &p) else {
                continue;
            };
            let name = c.name();
            drop(c);
            let log = dir.join(format!("{}-{i}.trace", table.name()));
            let out = std::process::Command::new("valgrind")
                .args(["--tool=lackey", "--trace-mem=yes"])
                .arg(format!("--log-file={}", log.display()))
                .arg(&exe)
                .args(["--stores-one", table.name(), "1000", &i.to_string()])
                .output()
                .map_err(|e| format!("valgrind: {e} (apt-get install valgrind)"))?;
            if !out.status.success() {
                return Err(format!("valgrind on {name} failed: {}", out.status));
            }
            let stdout = String::from_utf8_lossy(&out.stdout);
            let marks = stdout
                .lines()
                .find_map(|l| l.strip_prefix("marks 0x"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                .ok_or("the child printed no marker address")?;
            let f = std::fs::File::open(&log).map_err(|e| e.to_string())?;
            // Window 0: thread A's pass, 1: thread B's; u8::MAX outside both.
            let mut window = u8::MAX;
            let mut lines: [HashMap<u64, u64>; 2] = [HashMap::new(), HashMap::new()];
            for l in std::io::BufReader::new(f).lines() {
                let l = l.map_err(|e| e.to_string())?;
                let t = l.trim_start();
                let Some(rest) = t.strip_prefix("S ").or_else(|| t.strip_prefix("M ")) else {
                    continue;
                };
                let Some(addr) = rest
                    .split(',')
                    .next()
                    .and_then(|a| u64::from_str_radix(a.trim(), 16).ok())
                else {
                    continue;
                };
                if addr >= marks && addr < marks + 4 * 64 {
                    window = match (addr - marks) / 64 {
                        0 => 0,
                        2 => 1,
                        _ => u8::MAX,
                    };
                    continue;
                }
                if let Some(m) = lines.get_mut(usize::from(window)) {
                    *m.entry(addr / 64).or_default() += 1;
                }
            }
            let _ = std::fs::remove_file(&log);
            let b: HashSet<u64> = lines[1].keys().copied().collect();
            let shared: Vec<(&u64, &u64)> =
                lines[0].iter().filter(|(k, _)| b.contains(k)).collect();
            let stores: u64 = shared.iter().map(|(_, n)| **n).sum();
            println!(
                "  {name:<30} {:>6.2} {:>4}",
                stores as f64 / probe_benches::workload::STREAM as f64,
                shared.len()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The glibc tunable that makes malloc ask for transparent huge pages (`madvise`) for its heap.
const HUGE_HEAP: &str = "glibc.malloc.hugetlb=1";

/// Puts the heap on the pages `--pages` asked for, and says which it is on.
///
/// Why it matters: at 100 000 probes the hits' working set — tree nodes, consumer lists,
/// consumers — is spread over tens of megabytes of heap, and on 4 KiB pages a random hit misses
/// the TLB on most of its loads; under a hypervisor a miss walks two page tables. A kernel's
/// (and a hypervisor's) heap is its direct map, on 2 MiB or 1 GiB pages, where that cost does
/// not exist. Measured on the 2 vCPU AMD EPYC VM, 2026-12-07, lookup at 100 000 probes, one
/// thread: probe-core 0.67x the ceiling on 4 KiB pages, 0.90x on huge pages (every
/// implementation runs on the same pages in one run).
///
/// glibc reads the tunable only at start-up, so the report re-runs itself with it set; if that
/// fails, or the kernel has transparent huge pages off, the report says so and goes on.
fn heap_pages(huge: bool) -> String {
    let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let (_, rest) = s.split_once('[')?;
            Some(rest.split_once(']')?.0.to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let set = tunables.split(':').any(|t| t == HUGE_HEAP);
    if !huge {
        return if set {
            format!("--pages small, but GLIBC_TUNABLES already holds {HUGE_HEAP}: huge pages")
        } else {
            "4 KiB pages (--pages small)".into()
        };
    }
    if !set {
        use std::os::unix::process::CommandExt;
        let value = if tunables.is_empty() {
            HUGE_HEAP.to_string()
        } else {
            format!("{tunables}:{HUGE_HEAP}")
        };
        let err = match std::env::current_exe() {
            Ok(exe) => std::process::Command::new(exe)
                .args(std::env::args_os().skip(1))
                .env("GLIBC_TUNABLES", value)
                .exec(),
            Err(e) => e,
        };
        return format!("4 KiB pages: could not re-run with {HUGE_HEAP} ({err})");
    }
    match thp.as_str() {
        "always" | "madvise" => {
            format!("transparent huge pages ({HUGE_HEAP}; the kernel's THP mode: {thp})")
        }
        _ => format!("4 KiB pages: {HUGE_HEAP} is set, but the kernel's THP mode is {thp}"),
    }
}

/// `--agree A.csv B.csv`: do two runs' reports agree (see [`probe_benches::agree`])?
fn agree(args: &[String]) -> Result<(), String> {
    let [a, b] = args else {
        return Err("takes two report.csv paths".into());
    };
    let read = |p: &String| std::fs::read_to_string(p).map_err(|e| format!("{p}: {e}"));
    print!(
        "{}",
        probe_benches::agree::compare(a, &read(a)?, b, &read(b)?)?
    );
    Ok(())
}

/// A mode of the binary other than the report: its arguments after the flag.
type Mode = fn(&[String]) -> Result<(), String>;

fn main() {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // The modes that are not the report: the two measurements valgrind runs, and their children.
    let mode: Option<(&str, Mode)> = match argv.first().map(String::as_str) {
        Some("--count-one") => Some(("--count-one", count_one)),
        Some("--stores-one") => Some(("--stores-one", stores_one)),
        Some("--shared-stores") => Some(("--shared-stores", |_| shared_stores())),
        Some("--instructions") => Some(("--instructions", instructions)),
        Some("--agree") => Some(("--agree", agree)),
        _ => None,
    };
    if let Some((flag, run)) = mode {
        if let Err(e) = run(&argv[1..]) {
            eprintln!("contention {flag}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cfg = match Config::parse(std::env::args().skip(1), cores) {
        Ok(Some(c)) => c,
        Ok(None) => {
            print!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("contention: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let pages = heap_pages(cfg.huge_pages);
    let started = Instant::now();
    println!("probe-core contention report, {}", probe_benches::today());
    println!(
        "machine: {cores} cores ({}), {}",
        probe_benches::cpu_model(),
        std::env::consts::ARCH
    );
    println!(
        "threads {:?}, probes {:?}, window {:?} after {:?} warm-up, median of {} rounds (order rotated), churn {}/s (un)registrations, {}/s maps+unmaps (resolve)",
        cfg.threads, cfg.probes, cfg.duration, cfg.warmup, cfg.repeats, cfg.churn, cfg.mm_churn
    );
    println!("heap: {pages}");

    let total: usize = cfg
        .tables
        .iter()
        .map(|&t| table_size(t) * cfg.probes.len() * cfg.threads.len() * cfg.repeats)
        .sum();
    let max_threads = *cfg.threads.iter().max().unwrap_or(&1);
    let mut results = Results {
        cores,
        rows: Vec::new(),
    };
    // Every implementation of every table is built first; then the run is rounds, each of
    // which measures every point once — every (table, probes, threads, implementation), the
    // implementations of a point in an order rotated each round — so a slow spell of the
    // machine, however long, lands on every row of the report alike instead of on one table.
    struct Group {
        table: Table,
        probes: usize,
        w: Workload,
        p: Probes,
        contenders: Vec<Box<dyn Measure + Sync>>,
        win: Window,
    }
    let mut groups: Vec<Group> = Vec::new();
    for &table in &cfg.tables {
        for &probes in &cfg.probes {
            progress(&format!(
                "{} {probes} probes: building every implementation",
                table.name()
            ));
            let w = Workload::new(probes, max_threads);
            let p = Probes::new(&w);
            let contenders = contenders(table, &w, &p);
            // Same work: every implementation answers the same stream identically.
            let expected = Workload::expected(w.stream(0));
            for c in &contenders {
                let got = c.check(&w);
                if got != expected {
                    eprintln!(
                        "\ncontention: {} answered a stream differently ({got:?}, expected {expected:?})",
                        c.name()
                    );
                    std::process::exit(1);
                }
            }
            let win = Window {
                warmup: cfg.warmup,
                measure: cfg.duration,
                churn: cfg.churn,
                mm_churn: if table == Table::Resolve {
                    cfg.mm_churn
                } else {
                    0
                },
            };
            for &n in &cfg.threads {
                for c in &contenders {
                    results.rows.push(Row {
                        table,
                        probes,
                        threads: n,
                        name: c.name(),
                        samples: Vec::new(),
                    });
                }
            }
            groups.push(Group {
                table,
                probes,
                w,
                p,
                contenders,
                win,
            });
        }
    }
    let mut done = 0usize;
    for rep in 0..cfg.repeats {
        let mut row = 0usize;
        for g in &groups {
            for &n in &cfg.threads {
                let k = g.contenders.len();
                for i in (0..k).map(|j| (j + rep) % k) {
                    let c = &g.contenders[i];
                    done += 1;
                    progress(&format!(
                        "[{done:>4}/{total}] round {}/{}: {} {} probes, {n} threads, {}",
                        rep + 1,
                        cfg.repeats,
                        g.table.name(),
                        g.probes,
                        c.name(),
                    ));
                    let sample = c.measure(&g.w, &g.p, n, g.win);
                    results.rows[row + i].samples.push(sample);
                }
                row += k;
            }
        }
    }
    progress("");
    print!("{}", results.text());
    print!("{}", results.goals());

    let dir = cfg.out.clone().unwrap_or_else(default_out);
    let written = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(dir.join("report.csv"), results.csv()))
        .and_then(|()| std::fs::write(dir.join("report.svg"), results.svg()));
    match written {
        Ok(()) => println!(
            "\nwrote {} and {}",
            dir.join("report.csv").display(),
            dir.join("report.svg").display()
        ),
        Err(e) => {
            eprintln!("contention: cannot write under {}: {e}", dir.display());
            std::process::exit(1);
        }
    }
    println!("took {:.0} s", started.elapsed().as_secs_f64());
}

/// `target/contention` beside the running binary (`target/release/contention`).
fn default_out() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("contention")))
        .unwrap_or_else(|| PathBuf::from("target/contention"))
}

/// Overwrites the progress line on stderr.
fn progress(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "\r\x1b[2K{line}");
    let _ = e.flush();
}
