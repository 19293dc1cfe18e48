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
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

fn main() {
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
    let started = Instant::now();
    println!("probe-core contention report, {}", probe_benches::today());
    println!(
        "machine: {cores} cores ({}), {}",
        probe_benches::cpu_model(),
        std::env::consts::ARCH
    );
    println!(
        "threads {:?}, probes {:?}, window {:?} after {:?} warm-up, median of {}, churn {}/s (un)registrations, {}/s maps+unmaps (resolve)",
        cfg.threads, cfg.probes, cfg.duration, cfg.warmup, cfg.repeats, cfg.churn, cfg.mm_churn
    );

    let per_table = |t: Table| match t {
        Table::Lookup => 6,
        Table::Resolve => 5,
    };
    let total: usize = cfg
        .tables
        .iter()
        .map(|&t| per_table(t) * cfg.probes.len() * cfg.threads.len() * cfg.repeats)
        .sum();
    let max_threads = *cfg.threads.iter().max().unwrap_or(&1);
    let mut results = Results {
        cores,
        rows: Vec::new(),
    };
    let mut done = 0usize;
    for &table in &cfg.tables {
        for &probes in &cfg.probes {
            progress(&format!(
                "{} {probes} probes: building every implementation",
                table.name()
            ));
            let w = Workload::new(probes, max_threads);
            let p = Probes::new(&w);
            let contenders: Vec<Box<dyn Measure + Sync>> = match table {
                Table::Lookup => vec![
                    Box::new(CoreLookup::new(&p)),
                    Box::new(KprobeLookup::new(&w)),
                    Box::new(Seed000Lookup::new(&p)),
                    Box::new(RwLockLookup::new(&p)),
                    Box::new(ArcSwapLookup::new(&p)),
                    Box::new(CeilingLookup::new(&p)),
                ],
                Table::Resolve => vec![
                    Box::new(CoreResolve::new(&w, &p)),
                    Box::new(Seed000Resolve::new(&w, &p)),
                    Box::new(RwLockResolve::new(&w, &p)),
                    Box::new(SeqLockResolve::new(&w, &p)),
                    Box::new(CeilingResolve::new(&w, &p)),
                ],
            };
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
                let mut rows: Vec<Row> = contenders
                    .iter()
                    .map(|c| Row {
                        table,
                        probes,
                        threads: n,
                        name: c.name(),
                        samples: Vec::new(),
                    })
                    .collect();
                // Repeats interleave the implementations, so a slow spell of the machine
                // lands on all of them rather than on one.
                for rep in 0..cfg.repeats {
                    for (c, row) in contenders.iter().zip(&mut rows) {
                        done += 1;
                        progress(&format!(
                            "[{done:>3}/{total}] {} {probes} probes, {n} threads, {} (repeat {}/{})",
                            table.name(),
                            c.name(),
                            rep + 1,
                            cfg.repeats
                        ));
                        row.samples.push(c.measure(&w, &p, n, win));
                    }
                }
                results.rows.extend(rows);
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
