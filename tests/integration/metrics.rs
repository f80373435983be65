//! `--metrics ADDR`: a master target, a process server and an agent each
//! serve /metrics; the numbers an operator relies on are there and true,
//! and the text passes `promtool check metrics` (Prometheus text format by
//! default, OpenMetrics when asked for).

use ferry_ring::Ring;
use ferry_tests::versioned::Workload;
use ferry_tests::*;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::time::Duration;

/// `GET path` from `addr`: (status line, headers, body).
fn get(addr: &str, path: &str, accept: Option<&str>) -> (String, String, String) {
    let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(c, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}\r\n").unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head from {addr}: {out:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// The Prometheus text of `addr`'s /metrics.
fn scrape(addr: &str) -> String {
    let (status, headers, body) = get(addr, "/metrics", None);
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"), "{headers}");
    assert!(headers.contains("Connection: close"), "{headers}");
    body
}

/// The value of the sample `series` (name and labels, exactly as written).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' '))).and_then(|v| v.trim().parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

fn promtool(what: &str, text: &str) {
    promtool_check(what, text);
}

/// The OpenMetrics text (asked for as Prometheus asks) has the same
/// numbers, its own types, and ends in `# EOF`.
fn check_openmetrics(addr: &str, series: &str, plain: &str) {
    let (status, headers, body) = get(addr, "/metrics", Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8"), "{headers}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    assert!(body.contains("# TYPE ferry_disk_state stateset\n") && body.contains("# TYPE ferry_build info\n"), "{body}");
    // Counters only grow: the later scrape reads at least as much.
    assert!(must(&body, series) >= must(plain, series), "{series}");
}

#[test]
fn every_role_serves_its_metrics() {
    let t = TempDir::new("metrics");
    let blocks = 1024u64;
    std::fs::File::create(t.path("src.img")).unwrap().set_len(blocks * 4096).unwrap();
    std::fs::create_dir_all(t.path("st")).unwrap();
    let ring = Ring::create(&t.path("st").join("ring"), 1 << 16).unwrap();
    let (mt_m, ps_m, ag_m) =
        (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let mt = MasterTarget::start_args(&t.path("data"), &format!("127.0.0.1:{}", free_port()), &["--metrics", &mt_m]);
    let ps = ProcessServer::start_args(&t.path("spool"), &format!("127.0.0.1:{}", free_port()), &mt.addr, "1G", &["--metrics", &ps_m]);
    let log = OpenOptions::new().create(true).append(true).open(t.path("agent.log")).unwrap();
    let _agent = Proc(
        ferry()
            .args(["agent", "--disk", &t.s("src.img"), "--name", "vm", "--target", &ps.addr, "--tracker", "ring"])
            .args(["--state", &t.s("st"), "--point-every", "0.2", "--metrics", &ag_m])
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let disk = OpenOptions::new().write(true).open(t.path("src.img")).unwrap();
    let mut w = Workload::new(blocks, 7);
    let writes = 600u64;
    for _ in 0..writes {
        w.write(&disk, Some(&ring));
    }
    let written = writes * 4096;
    wait_for("the ring to drain", 60, || ring.consumer() == ring.producer());
    wait_for("a point at the master target", 60, || !point_ids(&t.s("data"), "vm").is_empty());
    // Counters are saved by the agent twice a second: its churn gets there.
    let d = "{disk=\"vm\"}";
    wait_for("the agent's churn to count every write", 30, || {
        sample(&scrape(&ag_m), &format!("ferry_disk_churn_bytes_total{d}")).is_some_and(|v| v >= written as f64)
    });
    wait_for("the master target to count its points", 30, || {
        sample(&scrape(&mt_m), &format!("ferry_disk_points{d}")).is_some_and(|v| v >= 1.0)
    });

    // The agent: what it tracked, sent, cut, and how far behind it is.
    let a = scrape(&ag_m);
    assert!(a.contains("ferry_up{role=\"agent\",name=\""), "{a}");
    assert!(must(&a, &format!("ferry_disk_churn_bytes_total{d}")) >= written as f64, "{a}");
    assert!(must(&a, &format!("ferry_disk_sent_bytes_total{d}")) > 0.0, "{a}");
    assert!(must(&a, &format!("ferry_disk_points{d}")) >= 1.0, "{a}");
    let lag = must(&a, &format!("ferry_disk_lag_seconds{d}"));
    assert!((0.0..60.0).contains(&lag), "{a}");
    let last = must(&a, &format!("ferry_disk_last_point_timestamp_seconds{d}"));
    let now = ferry_common::now_ns() as f64 / 1e9;
    assert!(last > now - 120.0 && last <= now + 1.0, "{last} vs {now}\n{a}");
    assert!(a.contains("ferry_disk_tracker_info{disk=\"vm\",tracker=\"ring\",mode=\"ring\"} 1\n"), "{a}");
    assert_eq!(must(&a, &format!("ferry_disk_resync_required{d}")), 0.0, "{a}");
    assert!(a.contains("ferry_disk_state{disk=\"vm\",ferry_disk_state=\""), "{a}");
    promtool("agent", &a);
    check_openmetrics(&ag_m, &format!("ferry_disk_churn_bytes_total{d}"), &a);

    // The process server: its spool and what it forwarded.
    let p = scrape(&ps_m);
    assert_eq!(must(&p, "ferry_spool_max_bytes"), (1u64 << 30) as f64, "{p}");
    assert!(sample(&p, "ferry_spool_bytes").is_some(), "{p}");
    assert!(must(&p, &format!("ferry_disk_sent_bytes_total{d}")) > 0.0, "{p}");
    assert!(must(&p, &format!("ferry_disk_churn_bytes_total{d}")) >= written as f64, "{p}");
    assert!(sample(&p, &format!("ferry_disk_lag_seconds{d}")).is_some(), "{p}");
    assert!(sample(&p, &format!("ferry_disk_backlog_bytes{d}")).is_some(), "{p}");
    assert!(p.contains("ferry_up{role=\"process-server\""), "{p}");
    promtool("process server", &p);
    check_openmetrics(&ps_m, &format!("ferry_disk_sent_bytes_total{d}"), &p);

    // The master target: points, journal, what it applied.
    let m = scrape(&mt_m);
    let points = must(&m, &format!("ferry_disk_points{d}"));
    assert!(points >= 1.0 && points <= point_ids(&t.s("data"), "vm").len() as f64, "{m}");
    assert!(must(&m, &format!("ferry_disk_last_point_timestamp_seconds{d}")) > now - 120.0, "{m}");
    assert!(must(&m, &format!("ferry_disk_journal_bytes{d}")) > 0.0, "{m}");
    assert!(sample(&m, &format!("ferry_disk_journal_max_bytes{d}")).is_some(), "{m}");
    assert!(must(&m, &format!("ferry_disk_churn_bytes_total{d}")) >= written as f64, "{m}");
    assert!(m.contains("ferry_up{role=\"master-target\""), "{m}");
    promtool("master target", &m);
    check_openmetrics(&mt_m, &format!("ferry_disk_churn_bytes_total{d}"), &m);

    // Only /metrics is served.
    for addr in [&ag_m, &ps_m, &mt_m] {
        assert!(get(addr, "/", None).0.starts_with("HTTP/1.1 404 "), "{addr}");
    }
    assert!(mt.log().contains(&format!("metrics at http://{mt_m}/metrics")), "{}", mt.log());
}

/// A bad or non-loopback --metrics is bad usage (exit 2) before anything starts.
#[test]
fn metrics_listens_on_loopback_only_without_an_identity() {
    let t = TempDir::new("metrics-usage");
    let o = run(&["master-target", "--data", &t.s("data"), "--listen", "127.0.0.1:1", "--metrics", "0.0.0.0:9100"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("--metrics \"0.0.0.0:9100\""), "{o:?}");
    assert!(!t.path("data").exists(), "nothing started");
    let o = run(&["process-server", "--spool", &t.s("spool"), "--spool-max", "1G", "--upstream", "127.0.0.1:1", "--metrics", "127.0.0.1"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}
