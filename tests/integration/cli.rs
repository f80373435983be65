//! The command-line contract: exit codes and one-line errors.

use ferry_tests::*;

fn one_line_error(o: &std::process::Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(code), "stderr: {err}");
    let lines: Vec<_> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(code == 2 || lines.len() == 1, "expected one line, got: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_usage_exits_2() {
    one_line_error(&run(&["agent", "--disk"]), 2, "--disk");
    one_line_error(&run(&["frobnicate"]), 2, "frobnicate");
    one_line_error(&run(&["agent", "--disk", "/x", "--name", "n", "--target", "t", "--tracker", "magic"]), 2, "magic");
}

#[test]
fn failures_exit_1_with_one_line() {
    let t = TempDir::new("cli");
    one_line_error(&run(&["points", "--data", &t.s("nothing"), "--name", "vm"]), 1, "no disk named vm");
    one_line_error(&run(&["recover", "--data", &t.s("d"), "--name", "vm", "--point", "yesterday", "--out", &t.s("o")]), 1, "bad point");
    one_line_error(
        &run(&["agent", "--disk", &t.s("missing.img"), "--name", "vm", "--target", "127.0.0.1:1", "--state", &t.s("st"), "--once"]),
        1,
        "cannot open disk",
    );
    std::fs::write(t.path("odd.img"), vec![1u8; 1000]).unwrap();
    one_line_error(
        &run(&["agent", "--disk", &t.s("odd.img"), "--name", "vm", "--target", "127.0.0.1:1", "--state", &t.s("st"), "--once"]),
        1,
        "multiple of 512",
    );
    one_line_error(
        &run(&["agent", "--disk", &t.s("odd.img"), "--name", "../etc", "--target", "127.0.0.1:1", "--state", &t.s("st"), "--once"]),
        1,
        "--name",
    );
    one_line_error(&run(&["status", "--state", &t.s("none")]), 1, "no agent state");
}

#[test]
fn agent_gives_up_cleanly_when_no_master_target_answers() {
    let t = TempDir::new("nomt");
    std::fs::write(t.path("a.img"), vec![0u8; 1 << 20]).unwrap();
    let port = free_port().to_string();
    let o = run(&[
        "agent",
        "--disk",
        &t.s("a.img"),
        "--name",
        "vm",
        "--target",
        &format!("127.0.0.1:{port}"),
        "--state",
        &t.s("st"),
        "--once",
        "--connect-timeout",
        "1",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.lines().last().unwrap().starts_with("ferry: cannot reach the master target"), "{err}");
}

#[test]
fn status_reports_the_agent_view() {
    let t = TempDir::new("status");
    std::fs::write(t.path("a.img"), vec![7u8; 1 << 20]).unwrap();
    let mt = MasterTarget::start(&t.path("data"));
    run_ok(&["agent", "--disk", &t.s("a.img"), "--name", "vm", "--target", &mt.addr, "--tracker", "scan", "--state", &t.s("st"), "--once"]);
    let v: serde_json::Value = serde_json::from_str(&run_ok(&["status", "--state", &t.s("st"), "--json"])).unwrap();
    assert_eq!(v["tracker"], "scan");
    assert_eq!(v["running"], false);
    assert_eq!(v["last_point"]["id"], 1);
    assert!(v["initial_sync_cursor"].is_null());
    let human = run_ok(&["status", "--state", &t.s("st")]);
    assert!(human.contains("last point 1 (crash)"), "{human}");
}

/// Item 8 of issue 10: every option of every command says what it is for,
/// failover's usage says what it requires, and `--help` documents RUST_LOG.
#[test]
fn every_option_has_help_and_usage_says_what_is_required() {
    let cmds = [
        "master-target",
        "agent",
        "unprotect",
        "points",
        "recover",
        "export",
        "failover",
        "retention",
        "group-tag",
        "group-points",
        "status",
        "repair",
        "verify",
    ];
    for c in cmds {
        let help = run_ok(&[c, "--help"]);
        let lines: Vec<&str> = help.lines().skip_while(|l| !l.starts_with("Options:")).skip(1).collect();
        let is_entry = |l: &str| {
            let t = l.trim_start();
            t.starts_with('-') && l.len() - t.len() <= 6
        };
        let mut seen = 0;
        for (i, l) in lines.iter().enumerate() {
            if !is_entry(l) {
                continue;
            }
            seen += 1;
            let inline = l.trim_start().split_once("  ").map_or("", |(_, d)| d.trim());
            let below = lines[i + 1..].iter().take_while(|n| !is_entry(n)).map(|n| n.trim()).find(|n| !n.is_empty()).unwrap_or("");
            assert!(!inline.is_empty() || !below.is_empty(), "ferry {c}: {} has no help text:\n{help}", l.trim());
        }
        assert!(seen >= 2, "ferry {c} --help lists no options:\n{help}");
    }
    let fo = run_ok(&["failover", "--help"]);
    assert!(fo.contains("ferry failover --data DIR --name NAME --point ID|latest|TIME --out PATH"), "{fo}");
    assert!(fo.contains("ferry failover --data DIR --name NAME --commit"), "{fo}");
    let o = run(&["failover", "--data", "/nonexistent", "--name", "vm"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--point"), "{}", String::from_utf8_lossy(&o.stderr));
    let top = run_ok(&["--help"]);
    assert!(top.contains("RUST_LOG") && top.contains("debug"), "{top}");
    // The master target listens on 127.0.0.1:7700 unless told otherwise.
    let mt = run_ok(&["master-target", "--help"]);
    assert!(mt.contains("default: 127.0.0.1:7700"), "{mt}");
}

/// Item 8 of issue 10: the retention display is a sentence, and says when
/// it is the default.
#[test]
fn retention_reads_as_a_sentence() {
    let t = TempDir::new("ret-text");
    std::fs::write(t.path("a.img"), vec![7u8; 1 << 20]).unwrap();
    let mt = MasterTarget::start(&t.path("data"));
    run_ok(&["agent", "--disk", &t.s("a.img"), "--name", "vm", "--target", &mt.addr, "--tracker", "scan", "--state", &t.s("st"), "--once"]);
    let d = t.s("data");
    let s = run_ok(&["retention", "--data", &d, "--name", "vm"]);
    assert_eq!(
        s.trim(),
        "vm: keep points for 3days: every point for 1h, then one an hour up to 1day, then one a day; \
         journal at most 1.0 MiB after the oldest kept point; the newest point is always kept \
         (the default for a disk with no policy set)"
    );
    let s = run_ok(&[
        "retention",
        "--data",
        &d,
        "--name",
        "vm",
        "--keep",
        "7d",
        "--keep-all",
        "2h",
        "--keep-hourly",
        "24h",
        "--journal-cap",
        "none",
    ]);
    assert_eq!(
        s.trim(),
        "vm: keep points for 7days: every point for 2h, then one an hour up to 1day, then one a day; \
         no journal cap; the newest point is always kept"
    );
    let s = run_ok(&["retention", "--data", &d, "--name", "vm", "--keep", "none", "--keep-all", "none"]);
    assert_eq!(s.trim(), "vm: keep points forever: every point; no journal cap; the newest point is always kept");
}
