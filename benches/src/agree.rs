//! Do two runs of the report agree? `contention --agree A.csv B.csv` compares two reports' CSVs
//! row by row, against the limits the project holds the report to: within 10% per row at up
//! to 1 000 probes, within 20% above.
//!
//! Two quantities are compared per row: the median hits/s, and the paired ratio to the ceiling
//! (the goals' quantity). "Within 10%" means the larger of the two runs' values is at most 10%
//! above the smaller. The medians carry the machine's drift between the runs — on a shared VM,
//! tens of percent from one minute to the next, which the ceiling's own rows show — while a
//! paired ratio divides it out of each round; so the ratios are the agreement that says whether
//! the method holds, and the medians the one that says whether the machine did.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The agreement limit for a table of `probes` probes.
pub fn limit(probes: u64) -> f64 {
    if probes <= 1_000 { 0.10 } else { 0.20 }
}

/// One row's key: table, probes, threads, implementation.
type Key = (String, u64, u64, String);

/// One row's compared values: median hits/s, and the ratio to the ceiling (empty for the
/// ceiling itself).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Values {
    median: f64,
    ratio: Option<f64>,
}

fn parse(name: &str, csv: &str) -> Result<BTreeMap<Key, Values>, String> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| format!("{name}: empty"))?
        .split(',')
        .collect();
    let col = |c: &str| {
        header
            .iter()
            .position(|h| *h == c)
            .ok_or_else(|| format!("{name}: no `{c}` column (not a contention report.csv?)"))
    };
    let (t, p, n, i) = (
        col("table")?,
        col("probes")?,
        col("threads")?,
        col("implementation")?,
    );
    let (m, r) = (col("hits_per_s_median")?, col("ratio_to_ceiling")?);
    let mut rows = BTreeMap::new();
    for (at, line) in lines.enumerate().filter(|(_, l)| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        let bad = |what: &str| format!("{name}: line {}: {what}", at + 2);
        if f.len() != header.len() {
            return Err(bad("wrong number of fields"));
        }
        let num = |j: usize| f[j].parse::<f64>().map_err(|_| bad("not a number"));
        let int = |j: usize| f[j].parse::<u64>().map_err(|_| bad("not a count"));
        let key = (f[t].to_owned(), int(p)?, int(n)?, f[i].to_owned());
        let ratio = if f[r].is_empty() { None } else { Some(num(r)?) };
        if rows
            .insert(
                key,
                Values {
                    median: num(m)?,
                    ratio,
                },
            )
            .is_some()
        {
            return Err(bad("a row twice"));
        }
    }
    Ok(rows)
}

/// How far apart two positive values are: the larger over the smaller, minus one (`None` if
/// either is not positive).
fn apart(a: f64, b: f64) -> Option<f64> {
    (a > 0.0 && b > 0.0).then(|| a.max(b) / a.min(b) - 1.0)
}

/// The comparison of two report CSVs (`a` and `b` name them in the text): counts of rows over
/// the limit, then every such row with both values.
///
/// # Errors
///
/// A message naming the file and line of a CSV that is not a report's.
pub fn compare(a_name: &str, a: &str, b_name: &str, b: &str) -> Result<String, String> {
    let (a, b) = (parse(a_name, a)?, parse(b_name, b)?);
    let mut out = String::new();
    let (mut rows, mut ratios, mut over_m, mut over_r) = (0, 0, 0, 0);
    let mut detail = String::new();
    for (k, va) in &a {
        let Some(vb) = b.get(k) else { continue };
        let lim = limit(k.1);
        rows += 1;
        let row = format!("{} {} probes, {} thr, {}", k.0, k.1, k.2, k.3);
        if let Some(d) = apart(va.median, vb.median).filter(|d| *d > lim) {
            over_m += 1;
            let _ = writeln!(
                detail,
                "  median  {row}: {:.2} M vs {:.2} M ({:+.0}% apart, limit {:.0}%)",
                va.median / 1e6,
                vb.median / 1e6,
                d * 100.0,
                lim * 100.0
            );
        }
        if let (Some(ra), Some(rb)) = (va.ratio, vb.ratio) {
            ratios += 1;
            if let Some(d) = apart(ra, rb).filter(|d| *d > lim) {
                over_r += 1;
                let _ = writeln!(
                    detail,
                    "  ×ceil   {row}: {ra:.2} vs {rb:.2} ({:+.0}% apart, limit {:.0}%)",
                    d * 100.0,
                    lim * 100.0
                );
            }
        }
    }
    let only = a.keys().filter(|k| !b.contains_key(*k)).count()
        + b.keys().filter(|k| !a.contains_key(*k)).count();
    let _ = writeln!(
        out,
        "{a_name} vs {b_name}: {rows} rows in both ({only} in one only); limits 10% at up to 1 000 probes, 20% above"
    );
    let _ = writeln!(
        out,
        "medians over the limit: {over_m} of {rows}; paired ratios to the ceiling over the limit: {over_r} of {ratios}"
    );
    out.push_str(&detail);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "table,probes,threads,implementation,hits_per_s_median,ratio_to_ceiling\n";

    fn csv(rows: &[(&str, u64, u64, &str, f64, &str)]) -> String {
        let mut s = String::from(HEAD);
        for (t, p, n, i, m, r) in rows {
            let _ = writeln!(s, "{t},{p},{n},{i},{m},{r}");
        }
        s
    }

    #[test]
    fn rows_over_their_limit_are_counted_and_named() {
        let a = csv(&[
            ("lookup", 1000, 1, "probe-core", 100.0, "1.00"),
            ("lookup", 1000, 1, "ceiling", 100.0, ""),
            ("lookup", 100000, 1, "probe-core", 100.0, "0.80"),
        ]);
        // 1 000 probes: 109 is within 10% of 100; the ratio 1.12 is not.
        // 100 000 probes: 125 is not within 20%; 0.95 is within 20% of 0.80.
        let b = csv(&[
            ("lookup", 1000, 1, "probe-core", 109.0, "1.12"),
            ("lookup", 1000, 1, "ceiling", 100.0, ""),
            ("lookup", 100000, 1, "probe-core", 125.0, "0.95"),
        ]);
        let out = compare("a", &a, "b", &b).unwrap();
        assert!(
            out.contains("medians over the limit: 1 of 3; paired ratios to the ceiling over the limit: 1 of 2"),
            "{out}"
        );
        assert!(
            out.contains("median  lookup 100000 probes, 1 thr, probe-core"),
            "{out}"
        );
        assert!(
            out.contains("×ceil   lookup 1000 probes, 1 thr, probe-core"),
            "{out}"
        );
        assert_eq!(out.lines().count(), 4, "{out}");
    }

    #[test]
    fn identical_runs_agree() {
        let a = csv(&[("resolve", 1000, 2, "probe-core", 5e6, "0.90")]);
        let out = compare("a", &a, "a", &a).unwrap();
        assert!(out.contains("over the limit: 0 of 1;"), "{out}");
        assert!(out.contains("over the limit: 0 of 1\n"), "{out}");
    }

    #[test]
    fn a_file_that_is_not_a_report_is_an_error() {
        assert!(
            compare("x", "", "a", HEAD)
                .unwrap_err()
                .contains("x: empty")
        );
        assert!(
            compare("x", "a,b\n1,2\n", "a", HEAD)
                .unwrap_err()
                .contains("no `table` column")
        );
        let short = format!("{HEAD}lookup,1000,1\n");
        assert!(
            compare("x", &short, "a", HEAD)
                .unwrap_err()
                .contains("x: line 2: wrong number of fields")
        );
        let nan = format!("{HEAD}lookup,1000,1,probe-core,fast,1.0\n");
        assert!(
            compare("x", &nan, "a", HEAD)
                .unwrap_err()
                .contains("line 2: not a number")
        );
        let twice = format!("{HEAD}lookup,1000,1,p,1,1\nlookup,1000,1,p,1,1\n");
        assert!(
            compare("x", &twice, "a", HEAD)
                .unwrap_err()
                .contains("line 3: a row twice")
        );
    }
}
