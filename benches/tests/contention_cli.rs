//! The contention report end to end: a short run writes its table, CSV and SVG; bad flags exit
//! non-zero with a message naming the flag.

use std::process::Command;

fn report(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_contention"))
        .args(args)
        .output()
        .expect("run the contention binary")
}

#[test]
fn a_short_run_prints_every_table_and_writes_csv_and_svg() {
    let out = std::env::temp_dir().join(format!("contention-cli-{}", std::process::id()));
    let o = report(&[
        "--threads",
        "1,2",
        "--probes",
        "1k",
        "--duration",
        "20ms",
        "--warmup",
        "5ms",
        "--repeats",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for needle in [
        "machine: ",
        "lookup (probe key -> consumers), 1000 probes",
        "resolve (trap address -> mapping -> probe -> consumers), 1000 probes",
        "kprobe 0.6",
        "probe-core (epoch)",
        "seqlock mm + ArcSwap map",
        "lookup 1000: probe-core / ceiling >= 0.85",
        "resolve 1000: scaling efficiency >= 0.9",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in:\n{stdout}");
    }
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    // Header + 7 lookup and 6 resolve implementations (probe-core over two RCU domains) at 2
    // thread counts.
    assert_eq!(csv.lines().count(), 1 + (7 + 6) * 2, "{csv}");
    let svg = std::fs::read_to_string(out.join("report.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    // A run agrees with itself; `--agree` reads what the run wrote.
    let path = out.join("report.csv");
    let path = path.to_str().unwrap();
    let a = report(&["--agree", path, path]);
    let said = String::from_utf8_lossy(&a.stdout);
    assert!(a.status.success(), "{said}");
    assert!(
        said.contains(&format!("medians over the limit: 0 of {}", (7 + 6) * 2)),
        "{said}"
    );
    let bad = report(&["--agree", path]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("takes two report.csv paths"));
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    for (args, says) in [
        (
            &["--threads", "0"][..],
            "--threads 0: thread counts are 1..=1024",
        ),
        (
            &["--duration", "fast"][..],
            "--duration fast: `fast` is not a duration",
        ),
        (&["--nope"][..], "unknown flag --nope"),
        (&["--repeats"][..], "--repeats needs a value"),
        (&["--colour", "x"][..], "unknown flag --colour"),
    ] {
        let o = report(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(err.contains("usage: contention"), "{args:?}: {err}");
    }
    let help = report(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).starts_with("usage: contention"));
}
