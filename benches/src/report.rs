//! The contention report's output: the text table, the goals, CSV and SVG.

use crate::config::Table;
use crate::run::Sample;
use std::fmt::Write as _;

/// The name probe-core's rows carry.
pub const PROBE_CORE: &str = "probe-core";
/// Goal: probe-core's hits/s at least this fraction of the ceiling's, at every thread count up
/// to the core count, with up to 1 000 probes (the table is cache-resident).
pub const GOAL_CEILING: f64 = 0.85;
/// Goal: the same with 100 000 probes (the tree's lower levels miss in the cache).
pub const GOAL_CEILING_LARGE: f64 = 0.75;

/// The ceiling goal for a table of `probes` probes.
pub fn goal_ceiling(probes: usize) -> f64 {
    if probes >= 100_000 {
        GOAL_CEILING_LARGE
    } else {
        GOAL_CEILING
    }
}
/// Goal: scaling efficiency at least this at every core count of the machine.
pub const GOAL_EFFICIENCY: f64 = 0.9;

/// Every window of one implementation at one point.
#[derive(Clone, Debug)]
pub struct Row {
    /// Which table.
    pub table: Table,
    /// Probe count.
    pub probes: usize,
    /// Hitting threads.
    pub threads: usize,
    /// Implementation.
    pub name: &'static str,
    /// One sample per repeat.
    pub samples: Vec<Sample>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Row {
    /// Median hits/s over the repeats.
    pub fn hits(&self) -> f64 {
        median(self.samples.iter().map(|s| s.hits_per_s).collect())
    }
    /// Slowest and fastest repeat.
    pub fn spread(&self) -> (f64, f64) {
        let h = self.samples.iter().map(|s| s.hits_per_s);
        (
            h.clone().fold(f64::INFINITY, f64::min),
            h.fold(0.0, f64::max),
        )
    }
    /// The spread of the rounds: half the interquartile range of hits/s over the median, as a
    /// fraction (0.05: the middle half of the rounds lies within about ±5% of the median).
    pub fn spread_iqr(&self) -> f64 {
        let mut v: Vec<f64> = self.samples.iter().map(|s| s.hits_per_s).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n < 2 {
            return 0.0;
        }
        let q = |p: f64| {
            let x = p * (n - 1) as f64;
            let (i, f) = (x.floor() as usize, x - x.floor());
            v[i] + (v[(i + 1).min(n - 1)] - v[i]) * f
        };
        let m = self.hits();
        if m > 0.0 {
            (q(0.75) - q(0.25)) / 2.0 / m
        } else {
            0.0
        }
    }
    /// Median CPU the writer threads used, in vCPUs (1.0: one whole vCPU).
    pub fn writer_cpu(&self) -> f64 {
        median(self.samples.iter().map(|s| s.writer_cpu).collect())
    }
    /// Median CPU the hitting threads got, in vCPUs.
    pub fn hitter_cpu(&self) -> f64 {
        median(self.samples.iter().map(|s| s.hitter_cpu).collect())
    }
    /// Median achieved churn (registrations + unregistrations per second).
    pub fn churn(&self) -> f64 {
        median(self.samples.iter().map(|s| s.churn_per_s).collect())
    }
    /// Median achieved address-space churn.
    pub fn mm_churn(&self) -> f64 {
        median(self.samples.iter().map(|s| s.mm_churn_per_s).collect())
    }
    /// Median grace periods per second the grace-period thread completed.
    pub fn grace_periods(&self) -> f64 {
        median(self.samples.iter().map(|s| s.grace_periods_per_s).collect())
    }
}

/// `a`'s hits/s over `b`'s, *paired by round*: the median over rounds of the ratio of the two
/// windows of one round (which ran within a second of each other), not the ratio of the two
/// medians. On a VM whose speed drifts by tens of percent from one minute to the next, the
/// drift divides out of each round's ratio; the medians' ratio keeps it. Rows of different
/// lengths (a hand-built report) fall back to the ratio of medians.
pub fn paired_ratio(a: &Row, b: &Row) -> f64 {
    if a.samples.len() != b.samples.len() || a.samples.is_empty() {
        return a.hits() / b.hits();
    }
    median(
        a.samples
            .iter()
            .zip(&b.samples)
            .map(|(x, y)| x.hits_per_s / y.hits_per_s)
            .collect(),
    )
}

/// All rows of a run, with the machine they ran on.
#[derive(Debug, Default)]
pub struct Results {
    /// Every row.
    pub rows: Vec<Row>,
    /// Cores the machine offers.
    pub cores: usize,
}

/// Hits/s divided by the parallelism available to `threads` threads on `cores` cores, relative
/// to one thread: 1.0 is perfect scaling. Oversubscribed points divide by `cores`.
pub fn efficiency(at_n: f64, at_1: f64, threads: usize, cores: usize) -> f64 {
    at_n / (threads.min(cores.max(1)) as f64 * at_1)
}

impl Results {
    fn find(&self, t: Table, probes: usize, threads: usize, name: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.table == t && r.probes == probes && r.threads == threads && r.name == name)
    }

    fn ceiling_name(&self, t: Table, probes: usize) -> Option<&'static str> {
        self.rows
            .iter()
            .find(|r| r.table == t && r.probes == probes && r.name.starts_with("ceiling"))
            .map(|r| r.name)
    }

    /// (table, probes) groups in run order.
    fn groups(&self) -> Vec<(Table, usize)> {
        let mut g: Vec<(Table, usize)> = Vec::new();
        for r in &self.rows {
            if !g.contains(&(r.table, r.probes)) {
                g.push((r.table, r.probes));
            }
        }
        g
    }

    fn names(&self, t: Table, probes: usize) -> Vec<&'static str> {
        let mut n: Vec<&'static str> = Vec::new();
        for r in self
            .rows
            .iter()
            .filter(|r| r.table == t && r.probes == probes)
        {
            if !n.contains(&r.name) {
                n.push(r.name);
            }
        }
        n
    }

    fn threads(&self, t: Table, probes: usize) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .rows
            .iter()
            .filter(|r| r.table == t && r.probes == probes)
            .map(|r| r.threads)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Ratio of `row` to the ceiling at the same point.
    pub fn to_ceiling(&self, row: &Row) -> Option<f64> {
        let c = self.find(
            row.table,
            row.probes,
            row.threads,
            self.ceiling_name(row.table, row.probes)?,
        )?;
        Some(paired_ratio(row, c))
    }

    /// Scaling efficiency of `row` (see [`efficiency`]); `None` at one thread.
    pub fn efficiency(&self, row: &Row) -> Option<f64> {
        if row.threads == 1 {
            return None;
        }
        let one = self.find(row.table, row.probes, 1, row.name)?;
        // Paired by round, as `to_ceiling`.
        Some(efficiency(
            paired_ratio(row, one),
            1.0,
            row.threads,
            self.cores,
        ))
    }

    /// The text tables.
    pub fn text(&self) -> String {
        let mut s = String::new();
        for (t, probes) in self.groups() {
            let threads = self.threads(t, probes);
            let what = match t {
                Table::Lookup => "probe key -> consumers",
                Table::Resolve => "trap address -> mapping -> probe -> consumers",
            };
            let _ = writeln!(s, "\n{} ({what}), {probes} probes", t.name());
            let _ = write!(s, "{:<30}", "implementation");
            for &n in &threads {
                let over = if n > self.cores { "*" } else { "" };
                let _ = write!(s, "| {:>25} ", format!("{n}{over} thr: Mhit/s ±IQR ×ceil"));
            }
            let _ = write!(s, "| {:>10} ", "efficiency");
            let _ = write!(s, "| {:>10} ", "writer CPU");
            let _ = writeln!(s, "| churn/s achieved");
            for name in self.names(t, probes) {
                let _ = write!(s, "{name:<30}");
                let mut effs = Vec::new();
                // The slowest writer over the thread counts: one that cannot keep up shows.
                let (mut reg_min, mut mm_min, mut gp_min) =
                    (f64::INFINITY, f64::INFINITY, f64::INFINITY);
                let mut wcpu: f64 = 0.0;
                for &n in &threads {
                    match self.find(t, probes, n, name) {
                        Some(r) => {
                            let ratio = self
                                .to_ceiling(r)
                                .map_or("-".into(), |x| format!("{x:.2}×"));
                            let _ = write!(
                                s,
                                "| {:>10.2} {:>6} {:>7} ",
                                r.hits() / 1e6,
                                format!("±{:.0}%", r.spread_iqr() * 100.0),
                                ratio
                            );
                            wcpu = wcpu.max(r.writer_cpu());
                            if let Some(e) = self.efficiency(r).filter(|_| n <= self.cores) {
                                effs.push(format!("{e:.2}"));
                            }
                            reg_min = reg_min.min(r.churn());
                            mm_min = mm_min.min(r.mm_churn());
                            gp_min = gp_min.min(r.grace_periods());
                        }
                        None => {
                            let _ = write!(s, "| {:>25} ", "-");
                        }
                    }
                }
                let _ = write!(
                    s,
                    "| {:>10} ",
                    if effs.is_empty() {
                        "-".into()
                    } else {
                        effs.join(" ")
                    }
                );
                let _ = write!(s, "| {:>10} ", format!("{:.0}%", wcpu * 100.0));
                let mut churn = match t {
                    Table::Lookup => format!("{reg_min:.0}"),
                    Table::Resolve => format!("{reg_min:.0} reg, {mm_min:.0} mm"),
                };
                if gp_min.is_finite() && gp_min > 0.0 {
                    let _ = write!(churn, ", {gp_min:.0} gp");
                }
                let _ = writeln!(s, "| {churn}");
            }
        }
        let _ = writeln!(
            s,
            "\n* oversubscribed: more hitting threads than cores ({}).\n\
             efficiency: hits/s at N / (N x hits/s at 1), for each N from 2 to the core count.\n\
             ±IQR: half the interquartile range of the rounds over the median (every implementation\n\
             runs once per round, in an order rotated each round).\n\
             ×ceil, efficiency and the goals' ratios are paired by round: the median over rounds\n\
             of the ratio of two windows of the same round.\n\
             writer CPU: the churn writers' CPU time per second of window, in % of one vCPU, the\n\
             most over the thread counts: time the hitters lose where there is no spare core (the\n\
             CSV has the hitters' own, hitter_cpu).\n\
             churn/s achieved: (un)registrations and maps+unmaps per second the writers managed in\n\
             the measured windows, the lowest over the thread counts (a writer that cannot keep up\n\
             shows here); gp: grace periods per second of a domain that does not run its own\n\
             callbacks, run every 20 ms by a thread of their own (its CPU is in writer CPU).",
            self.cores
        );
        s
    }

    /// probe-core against the goals and each alternative, one line each.
    pub fn goals(&self) -> String {
        let mut s = String::from("\ngoals\n");
        for (t, probes) in self.groups() {
            let threads = self.threads(t, probes);
            let mut ceil = Vec::new();
            let mut eff = Vec::new();
            let ceiling = self.ceiling_name(t, probes);
            let mut ceil_eff = Vec::new();
            for &n in threads.iter().filter(|&&n| n <= self.cores) {
                if let Some(r) = self.find(t, probes, n, PROBE_CORE) {
                    if let Some(x) = self.to_ceiling(r) {
                        ceil.push((n, x));
                    }
                    // Only where the machine itself scales: the ceiling's own efficiency.
                    let ceiling_eff = ceiling
                        .and_then(|c| self.find(t, probes, n, c))
                        .and_then(|c| self.efficiency(c));
                    if let Some(e) = ceiling_eff {
                        ceil_eff.push((n, e));
                    }
                    let ceiling_scales = ceiling_eff.is_some_and(|e| e >= GOAL_EFFICIENCY);
                    if let Some(e) = self.efficiency(r).filter(|_| ceiling_scales) {
                        eff.push((n, e));
                    }
                }
            }
            let goal = goal_ceiling(probes);
            let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
            let fmt = |v: &[(usize, f64)]| {
                v.iter()
                    .map(|(n, x)| format!("{x:.2} at {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                s,
                "{} {probes}: probe-core / ceiling >= {goal}: {} ({})",
                t.name(),
                verdict(ceil.iter().all(|&(_, x)| x >= goal)),
                fmt(&ceil)
            );
            if !eff.is_empty() {
                let _ = writeln!(
                    s,
                    "{} {probes}: scaling efficiency >= {GOAL_EFFICIENCY} where the ceiling's is: {} ({})",
                    t.name(),
                    verdict(eff.iter().all(|&(_, x)| x >= GOAL_EFFICIENCY)),
                    fmt(&eff)
                );
            } else if !ceil_eff.is_empty() {
                let _ = writeln!(
                    s,
                    "{} {probes}: scaling efficiency >= {GOAL_EFFICIENCY} where the ceiling's is: \
                     not applicable (the ceiling's own: {})",
                    t.name(),
                    fmt(&ceil_eff)
                );
            }
            let top = threads.iter().copied().filter(|&n| n <= self.cores).max();
            if let (Some(n), Some(pc)) =
                (top, top.and_then(|n| self.find(t, probes, n, PROBE_CORE)))
            {
                let ratios: Vec<(f64, &str)> = self
                    .names(t, probes)
                    .into_iter()
                    // probe-core over another RCU domain is not an alternative.
                    .filter(|&name| !name.starts_with(PROBE_CORE) && !name.starts_with("ceiling"))
                    .filter_map(|name| self.find(t, probes, n, name))
                    .map(|r| (paired_ratio(pc, r), r.name))
                    .collect();
                let others: Vec<String> = ratios
                    .iter()
                    .map(|(x, name)| format!("{x:.2}× {name}"))
                    .collect();
                let _ = writeln!(
                    s,
                    "{} {probes}: ahead of every alternative at {n} threads: {} ({})",
                    t.name(),
                    verdict(ratios.iter().all(|&(x, _)| x > 1.0)),
                    others.join(", ")
                );
            }
        }
        s
    }

    /// The CSV.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "table,probes,threads,cores,implementation,hits_per_s_median,hits_per_s_min,hits_per_s_max,\
             spread_iqr,ratio_to_ceiling,scaling_efficiency,churn_per_s,mm_churn_per_s,writer_cpu,\
             hitter_cpu,grace_periods_per_s,rounds\n",
        );
        for r in &self.rows {
            let (lo, hi) = r.spread();
            let opt = |x: Option<f64>| x.map_or(String::new(), |x| format!("{x:.4}"));
            let _ = writeln!(
                s,
                "{},{},{},{},{},{:.0},{:.0},{:.0},{:.4},{},{},{:.0},{:.0},{:.3},{:.3},{:.1},{}",
                r.table.name(),
                r.probes,
                r.threads,
                self.cores,
                r.name,
                r.hits(),
                lo,
                hi,
                r.spread_iqr(),
                opt(self.to_ceiling(r)),
                opt(self.efficiency(r)),
                r.churn(),
                r.mm_churn(),
                r.writer_cpu(),
                r.hitter_cpu(),
                r.grace_periods(),
                r.samples.len()
            );
        }
        s
    }

    /// An SVG chart: one panel per (table, probe count), hits/s against threads, one line per
    /// implementation.
    pub fn svg(&self) -> String {
        const W: f64 = 620.0;
        const H: f64 = 300.0;
        const COLORS: [&str; 8] = [
            "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f", "#17becf",
        ];
        let groups = self.groups();
        let cols = 2usize;
        let rows = groups.len().div_ceil(cols).max(1);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="sans-serif" font-size="11">"#,
            W * cols as f64,
            H * rows as f64
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        for (gi, &(t, probes)) in groups.iter().enumerate() {
            let (ox, oy) = ((gi % cols) as f64 * W, (gi / cols) as f64 * H);
            let (l, r, top, bottom) = (ox + 55.0, ox + W - 215.0, oy + 30.0, oy + H - 40.0);
            let threads = self.threads(t, probes);
            let max = self
                .rows
                .iter()
                .filter(|x| x.table == t && x.probes == probes)
                .map(Row::hits)
                .fold(1.0, f64::max)
                * 1.1;
            let xs = |i: usize| {
                if threads.len() <= 1 {
                    (l + r) / 2.0
                } else {
                    l + (r - l) * i as f64 / (threads.len() - 1) as f64
                }
            };
            let ys = |v: f64| bottom - (bottom - top) * v / max;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" font-size="13" font-weight="bold">{}, {} probes</text>"#,
                l,
                oy + 18.0,
                t.name(),
                probes
            );
            let _ = writeln!(
                s,
                r#"<line x1="{l}" y1="{bottom}" x2="{r}" y2="{bottom}" stroke="black"/><line x1="{l}" y1="{top}" x2="{l}" y2="{bottom}" stroke="black"/>"#
            );
            for k in 0..=4 {
                let v = max * k as f64 / 4.0;
                let _ = writeln!(
                    s,
                    r##"<text x="{}" y="{}" text-anchor="end">{:.0}M</text><line x1="{l}" y1="{y}" x2="{r}" y2="{y}" stroke="#eee"/>"##,
                    l - 4.0,
                    ys(v) + 4.0,
                    v / 1e6,
                    y = ys(v)
                );
            }
            for (i, n) in threads.iter().enumerate() {
                let over = if *n > self.cores { "*" } else { "" };
                let _ = writeln!(
                    s,
                    r#"<text x="{}" y="{}" text-anchor="middle">{n}{over}</text>"#,
                    xs(i),
                    bottom + 14.0
                );
            }
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">hitting threads (* oversubscribed)</text><text x="{}" y="{}" transform="rotate(-90 {} {})" text-anchor="middle">hits/s</text>"#,
                (l + r) / 2.0,
                bottom + 30.0,
                ox + 12.0,
                (top + bottom) / 2.0,
                ox + 12.0,
                (top + bottom) / 2.0
            );
            for (ni, name) in self.names(t, probes).into_iter().enumerate() {
                let color = COLORS[ni % COLORS.len()];
                let pts: Vec<String> = threads
                    .iter()
                    .enumerate()
                    .filter_map(|(i, &n)| {
                        self.find(t, probes, n, name)
                            .map(|row| format!("{:.1},{:.1}", xs(i), ys(row.hits())))
                    })
                    .collect();
                let width = if name == PROBE_CORE { 3 } else { 1 };
                let dash = if name.starts_with("ceiling") {
                    r#" stroke-dasharray="4 3""#
                } else {
                    ""
                };
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="{width}"{dash} points="{}"/>"#,
                    pts.join(" ")
                );
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{}" width="10" height="3" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
                    r + 10.0,
                    top + ni as f64 * 16.0,
                    r + 24.0,
                    top + ni as f64 * 16.0 + 5.0,
                    escape(name)
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(table: Table, threads: usize, name: &'static str, hits: f64) -> Row {
        Row {
            table,
            probes: 1000,
            threads,
            name,
            samples: vec![
                Sample {
                    hits_per_s: hits * 0.9,
                    ..Default::default()
                },
                Sample {
                    hits_per_s: hits,
                    ..Default::default()
                },
                Sample {
                    hits_per_s: hits * 1.5,
                    ..Default::default()
                },
            ],
        }
    }

    fn results() -> Results {
        Results {
            cores: 2,
            rows: vec![
                row(Table::Lookup, 1, PROBE_CORE, 10e6),
                row(Table::Lookup, 1, "ceiling (x)", 11e6),
                row(Table::Lookup, 1, "RwLock<BTreeMap>", 8e6),
                row(Table::Lookup, 2, PROBE_CORE, 19e6),
                row(Table::Lookup, 2, "ceiling (x)", 22e6),
                row(Table::Lookup, 2, "RwLock<BTreeMap>", 4e6),
            ],
        }
    }

    #[test]
    fn medians_ratios_and_efficiency() {
        let r = results();
        let pc2 = &r.rows[3];
        assert_eq!(pc2.hits(), 19e6);
        assert!((r.to_ceiling(pc2).unwrap() - 19.0 / 22.0).abs() < 1e-9);
        assert!((r.efficiency(pc2).unwrap() - 0.95).abs() < 1e-9);
        assert_eq!(r.efficiency(&r.rows[0]), None);
        assert_eq!(efficiency(30.0, 10.0, 4, 2), 1.5);
        assert_eq!(median(vec![3.0, 1.0, 2.0, 10.0]), 2.5);
    }

    #[test]
    fn goals_say_met_and_not_met() {
        let g = results().goals();
        // 10/11 = 0.91 and 19/22 = 0.86: met; efficiency 0.95: met; 19/4 over RwLock.
        assert!(
            g.contains("probe-core / ceiling >= 0.85: met (0.91 at 1, 0.86 at 2)"),
            "{g}"
        );
        assert!(
            g.contains("scaling efficiency >= 0.9 where the ceiling's is: met (0.95 at 2)"),
            "{g}"
        );
        assert!(
            g.contains("ahead of every alternative at 2 threads: met (4.75× RwLock<BTreeMap>)"),
            "{g}"
        );
        let mut bad = results();
        bad.rows[3] = row(Table::Lookup, 2, PROBE_CORE, 12e6);
        assert!(bad.goals().contains("NOT met"));
        // Behind an alternative: its own verdict.
        let mut behind = results();
        behind.rows[5] = row(Table::Lookup, 2, "RwLock<BTreeMap>", 20e6);
        assert!(
            behind
                .goals()
                .contains("ahead of every alternative at 2 threads: NOT met (0.95×"),
            "{}",
            behind.goals()
        );
        // A ceiling that does not scale lifts the efficiency goal.
        let mut flat = results();
        flat.rows[4] = row(Table::Lookup, 2, "ceiling (x)", 12e6);
        assert!(
            flat.goals().contains(
                "scaling efficiency >= 0.9 where the ceiling's is: not applicable (the ceiling's own: 0.55 at 2)"
            ),
            "{}",
            flat.goals()
        );
        // 100 000 probes: the lower ceiling goal.
        assert_eq!(goal_ceiling(100_000), 0.75);
        assert_eq!(goal_ceiling(1_000), 0.85);
    }

    fn rounds(table: Table, threads: usize, name: &'static str, hits: &[f64]) -> Row {
        Row {
            samples: hits
                .iter()
                .map(|&h| Sample {
                    hits_per_s: h,
                    ..Default::default()
                })
                .collect(),
            ..row(table, threads, name, 0.0)
        }
    }

    #[test]
    fn ratios_are_paired_by_round() {
        // The machine runs at 1x, 2x and 0.5x speed in three rounds; probe-core is 0.9x the
        // ceiling in every round.
        let pc = rounds(Table::Lookup, 1, PROBE_CORE, &[9.0, 18.0, 4.5]);
        let ceiling = rounds(Table::Lookup, 1, "ceiling (x)", &[10.0, 20.0, 5.0]);
        assert!((paired_ratio(&pc, &ceiling) - 0.9).abs() < 1e-9);
        // Where the two differ: medians 16 / 20 = 0.8; the rounds say 1.0, 0.8 and 0.93.
        let pc = rounds(Table::Lookup, 1, PROBE_CORE, &[10.0, 16.0, 28.0]);
        let ceiling = rounds(Table::Lookup, 1, "ceiling (x)", &[10.0, 20.0, 30.0]);
        assert!((pc.hits() / ceiling.hits() - 0.8).abs() < 1e-9);
        assert!((paired_ratio(&pc, &ceiling) - 28.0 / 30.0).abs() < 1e-9);
        // Rows of different lengths fall back to the ratio of medians.
        let short = rounds(Table::Lookup, 1, "ceiling (x)", &[20.0]);
        assert!((paired_ratio(&pc, &short) - 0.8).abs() < 1e-9);
    }

    #[test]
    fn probe_core_over_another_domain_is_not_an_alternative() {
        let mut r = results();
        r.rows
            .push(row(Table::Lookup, 2, "probe-core (epoch)", 30e6));
        let g = r.goals();
        assert!(
            g.contains("ahead of every alternative at 2 threads: met (4.75× RwLock<BTreeMap>)"),
            "{g}"
        );
    }

    #[test]
    fn spread_is_half_the_interquartile_range_over_the_median() {
        let mut r = row(Table::Lookup, 1, PROBE_CORE, 10.0);
        r.samples = [8.0, 9.0, 10.0, 11.0, 12.0]
            .iter()
            .map(|&h| Sample {
                hits_per_s: h,
                ..Default::default()
            })
            .collect();
        // Quartiles 9 and 11, median 10: ±10%.
        assert!((r.spread_iqr() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn csv_has_a_line_per_row_and_svg_is_well_formed() {
        let r = results();
        let csv = r.csv();
        assert_eq!(csv.lines().count(), 1 + r.rows.len());
        assert!(
            csv.lines()
                .nth(4)
                .unwrap()
                .starts_with("lookup,1000,2,2,probe-core,19000000,")
        );
        let svg = r.svg();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 3);
        assert!(svg.contains("RwLock&lt;BTreeMap&gt;"));
    }
}
