//! The contention report's flags.

use std::path::PathBuf;
use std::time::Duration;

/// Which question a table answers (see [`crate::contenders`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Probe key → consumers, under registration churn.
    Lookup,
    /// Trap address → probe → consumers, under registration and address-space churn.
    Resolve,
}

impl Table {
    /// Its name in the report and the CSV.
    pub fn name(self) -> &'static str {
        match self {
            Table::Lookup => "lookup",
            Table::Resolve => "resolve",
        }
    }
}

/// Everything the report can be told.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Hitting-thread counts, ascending.
    pub threads: Vec<usize>,
    /// Probe counts.
    pub probes: Vec<usize>,
    /// Measured window per point.
    pub duration: Duration,
    /// Unmeasured run before each window.
    pub warmup: Duration,
    /// Windows per point (the median is reported).
    pub repeats: usize,
    /// Registrations + unregistrations per second by the writer thread.
    pub churn: u64,
    /// Maps + unmaps per second (resolve table).
    pub mm_churn: u64,
    /// Tables to run.
    pub tables: Vec<Table>,
    /// Where the CSV and SVG go (default: `target/contention/`).
    pub out: Option<PathBuf>,
    /// Whether the heap should be on transparent huge pages (`--pages huge`, the default).
    pub huge_pages: bool,
}

/// The usage text.
pub const USAGE: &str = "\
usage: contention [flags]
       contention --instructions [PROBES,...]   instructions per hit, by callgrind (valgrind)
       contention --shared-stores               stores per hit to shared cache lines, by lackey
       contention --agree A.csv B.csv           do two runs' report.csv agree (10% / 20% per row)?

Hit throughput of probe-core against the alternatives, per thread count, while a writer thread
registers/unregisters probes and maps/unmaps code. Prints a table; writes CSV and SVG.

flags (each takes a value, as `--flag value` or `--flag=value`):
  --threads LIST    hitting-thread counts, e.g. 1,2,4   (default: 1..=cores, then 2 x cores)
  --probes LIST     probe counts, e.g. 1k,100k          (default: 1k,100k)
  --duration TIME   measured window per point and round, e.g. 100ms or 1s   (default: 100ms)
  --warmup TIME     unmeasured run before each window   (default: 30ms)
  --repeats N       rounds: windows per point, every implementation once per round in a
                    rotated order; the median and spread are reported   (default: 45: with
                    fewer, two runs' paired ratios disagree by more than 10% on more rows)
  --churn N         probe registrations+unregistrations per second, 0 for none   (default: 1000)
  --mm-churn N      maps+unmaps per second (resolve table), 0 for none   (default: 1000)
  --only TABLE      lookup or resolve   (default: both)
  --out DIR         where report.csv and report.svg go   (default: target/contention)
  --pages SIZE      huge: the heap on transparent huge pages (glibc.malloc.hugetlb=1; the
                    binary re-runs itself with it), as a kernel's direct map is; small: 4 KiB
                    pages, as a process's heap is by default   (default: huge)
  --help            this text
";

/// Largest accepted thread count.
pub const MAX_THREADS: usize = 1024;
/// Largest accepted probe count.
pub const MAX_PROBES: usize = 10_000_000;

impl Config {
    /// The defaults for a machine with `cores` cores.
    pub fn defaults(cores: usize) -> Self {
        let cores = cores.max(1);
        let mut threads: Vec<usize> = (1..=cores).collect();
        threads.push(2 * cores);
        Self {
            threads,
            probes: vec![1_000, 100_000],
            duration: Duration::from_millis(100),
            warmup: Duration::from_millis(30),
            repeats: 45,
            churn: 1000,
            mm_churn: 1000,
            tables: vec![Table::Lookup, Table::Resolve],
            out: None,
            huge_pages: true,
        }
    }

    /// Parses `args` (without the program name). `Ok(None)` means `--help`.
    ///
    /// # Errors
    ///
    /// A message naming the flag and what is wrong with it.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        cores: usize,
    ) -> Result<Option<Self>, String> {
        let mut c = Self::defaults(cores);
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            if arg == "--help" || arg == "-h" {
                return Ok(None);
            }
            let Some(flag) = arg.strip_prefix("--") else {
                return Err(format!("unexpected argument `{arg}` (flags start with --)"));
            };
            const FLAGS: [&str; 10] = [
                "threads", "probes", "duration", "warmup", "repeats", "churn", "mm-churn", "only",
                "out", "pages",
            ];
            let name = flag.split_once('=').map_or(flag, |(f, _)| f);
            if !FLAGS.contains(&name) {
                return Err(format!("unknown flag --{name} (see --help)"));
            }
            let (flag, value) = match flag.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None => {
                    let v = args
                        .next()
                        .ok_or_else(|| format!("--{flag} needs a value"))?;
                    (flag.to_string(), v)
                }
            };
            let bad = |why: &str| format!("--{flag} {value}: {why}");
            match flag.as_str() {
                "threads" => {
                    let mut t = list(&value).map_err(|e| bad(&e))?;
                    if t.iter().any(|&n| n == 0 || n > MAX_THREADS) {
                        return Err(bad(&format!("thread counts are 1..={MAX_THREADS}")));
                    }
                    t.sort_unstable();
                    t.dedup();
                    c.threads = t;
                }
                "probes" => {
                    let mut p = list(&value).map_err(|e| bad(&e))?;
                    if p.iter().any(|&n| n == 0 || n > MAX_PROBES) {
                        return Err(bad(&format!("probe counts are 1..={MAX_PROBES}")));
                    }
                    p.dedup();
                    c.probes = p;
                }
                "duration" => {
                    c.duration = time(&value).map_err(|e| bad(&e))?;
                    if c.duration.is_zero() {
                        return Err(bad("the measured window must be longer than 0"));
                    }
                }
                "warmup" => c.warmup = time(&value).map_err(|e| bad(&e))?,
                "repeats" => {
                    c.repeats = number(&value).map_err(|e| bad(&e))? as usize;
                    if c.repeats == 0 || c.repeats > 101 {
                        return Err(bad("repeats are 1..=101"));
                    }
                }
                "churn" => c.churn = number(&value).map_err(|e| bad(&e))?,
                "mm-churn" => c.mm_churn = number(&value).map_err(|e| bad(&e))?,
                "only" => {
                    c.tables = match value.as_str() {
                        "lookup" => vec![Table::Lookup],
                        "resolve" => vec![Table::Resolve],
                        _ => return Err(bad("expected `lookup` or `resolve`")),
                    }
                }
                "out" => c.out = Some(PathBuf::from(value)),
                "pages" => {
                    c.huge_pages = match value.as_str() {
                        "huge" => true,
                        "small" => false,
                        _ => return Err(bad("expected `huge` or `small`")),
                    }
                }
                _ => return Err(format!("unknown flag --{flag} (see --help)")),
            }
        }
        Ok(Some(c))
    }
}

/// `1000`, `1k`, `100k`, `2m`.
pub fn number(s: &str) -> Result<u64, String> {
    let (digits, scale) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 1_000),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("`{s}` is not a number (like 1000 or 100k)"))
}

fn list(s: &str) -> Result<Vec<usize>, String> {
    s.split(',')
        .map(|x| number(x.trim()).map(|n| n as usize))
        .collect()
}

/// `200ms`, `1s`, `1.5s`.
fn time(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (like 200ms or 1s)");
    let (n, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(bad());
    };
    let v: f64 = n.parse().map_err(|_| bad())?;
    if !(0.0..=3600.0).contains(&(v * scale)) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Option<Config>, String> {
        Config::parse(s.split_whitespace().map(String::from), 2)
    }

    #[test]
    fn defaults_cover_every_core_and_an_oversubscribed_point() {
        let c = parse("").unwrap().unwrap();
        assert_eq!(c.threads, vec![1, 2, 4]);
        assert_eq!(c.probes, vec![1_000, 100_000]);
        assert_eq!(Config::defaults(4).threads, vec![1, 2, 3, 4, 8]);
    }

    #[test]
    fn flags_in_both_spellings() {
        let c = parse("--threads=4,1 --probes 1k,2m --duration 1.5s --warmup=10ms --repeats 5 --churn 0 --mm-churn 10k --only resolve --out /tmp/x")
            .unwrap()
            .unwrap();
        assert_eq!(c.threads, vec![1, 4]);
        assert_eq!(c.probes, vec![1_000, 2_000_000]);
        assert_eq!(c.duration, Duration::from_millis(1500));
        assert_eq!(c.warmup, Duration::from_millis(10));
        assert_eq!((c.repeats, c.churn, c.mm_churn), (5, 0, 10_000));
        assert_eq!(c.tables, vec![Table::Resolve]);
        assert_eq!(c.out, Some(PathBuf::from("/tmp/x")));
        assert_eq!(parse("--help").unwrap(), None);
        assert!(parse("").unwrap().unwrap().huge_pages);
        assert!(!parse("--pages small").unwrap().unwrap().huge_pages);
        assert!(parse("--pages=huge").unwrap().unwrap().huge_pages);
        assert!(
            parse("--pages 2m")
                .unwrap_err()
                .contains("expected `huge` or `small`")
        );
    }

    #[test]
    fn bad_flags_are_errors_that_name_the_flag() {
        for (args, says) in [
            ("--threads 0", "--threads 0: thread counts"),
            ("--threads 2,x", "--threads 2,x: `x` is not a number"),
            ("--threads 5000", "thread counts are 1..=1024"),
            ("--probes 0", "probe counts"),
            ("--probes 99999999999999999999", "is not a number"),
            ("--duration 5", "is not a duration"),
            ("--duration 0ms", "longer than 0"),
            ("--duration -1s", "is not a duration"),
            ("--repeats 0", "repeats are"),
            ("--only both", "expected `lookup` or `resolve`"),
            ("--churn", "--churn needs a value"),
            ("--fast 1", "unknown flag --fast"),
            ("--fast", "unknown flag --fast"),
            ("threads", "unexpected argument `threads`"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(says), "{args}: got {e:?}, wanted {says:?}");
        }
    }
}
