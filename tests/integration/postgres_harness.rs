//! The private PostgreSQL harness (`ferry_tests::Postgres`) that the config
//! server's tests use: two at once, reachable by URL with the password only,
//! crash and restart, and nothing left after drop — also after a panic.

use ferry_tests::Postgres;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

/// `psql URL -c SQL`, stdout trimmed; Err(stderr) on failure.
fn psql(url: &str, sql: &str) -> Result<String, String> {
    let o = Command::new("psql").args(["-X", "-A", "-t", "-d", url, "-c", sql]).stdin(Stdio::null()).output().expect("run psql");
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).trim().to_string())
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn postgres_two_at_once_then_gone() {
    let t0 = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| (Postgres::start(), t0.elapsed()));
        let b = s.spawn(|| (Postgres::start(), t0.elapsed()));
        (a.join().expect("thread a"), b.join().expect("thread b"))
    });
    let (a, ta) = a;
    let (b, tb) = b;
    let a = a.expect("start PostgreSQL a");
    let b = b.expect("start PostgreSQL b");
    eprintln!("two PostgreSQL servers started in parallel: {ta:?} and {tb:?}");
    assert_ne!(a.port(), b.port());
    assert_ne!(a.dir(), b.dir());
    assert!(a.url().starts_with("postgres://ferry:") && a.url().ends_with(&format!("@127.0.0.1:{}/ferry", a.port())), "{}", a.url());

    for pg in [&a, &b] {
        assert_eq!(psql(&pg.url(), "select 1").as_deref(), Ok("1"), "{}", pg.log());
        assert_eq!(psql(&pg.url(), "select current_user || ' ' || current_database()").as_deref(), Ok("ferry ferry"));
        // The role owns its database: it can make tables in it.
        pg.psql("create table t (id int primary key, v text); insert into t values (1, 'x')").expect("create table");
    }
    // Separate servers: b has its own table, a's row is not there.
    b.psql("delete from t").expect("delete in b");
    assert_eq!(a.psql("select count(*) from t").expect("count a").trim(), "1");
    assert_eq!(b.psql("select count(*) from t").expect("count b").trim(), "0");

    // TCP takes the password: a wrong one is refused.
    let wrong = a.url().replace(a.password(), "wrong");
    let e = psql(&wrong, "select 1").expect_err("wrong password accepted");
    assert!(e.contains("password authentication failed"), "{e}");

    let (pa, da) = (a.port(), a.dir().to_path_buf());
    let (pb, db) = (b.port(), b.dir().to_path_buf());
    assert!(port_open(pa) && port_open(pb) && da.exists() && db.exists());
    drop(a);
    assert!(!port_open(pa), "port {pa} still open after drop");
    assert!(!da.exists(), "{} left after drop", da.display());
    // b is untouched by a's end.
    assert_eq!(psql(&b.url(), "select 1").as_deref(), Ok("1"));
    drop(b);
    assert!(!port_open(pb), "port {pb} still open after drop");
    assert!(!db.exists(), "{} left after drop", db.display());
}

#[test]
fn postgres_kill_and_restart() {
    let t0 = Instant::now();
    let mut pg = Postgres::start().expect("start PostgreSQL");
    eprintln!("one PostgreSQL server started in {:?}", t0.elapsed());
    pg.psql("create table t (v int); insert into t values (42)").expect("create");
    // synchronous_commit=off: a commit may be lost by a crash, so make it
    // durable before killing (a checkpoint flushes the WAL).
    let _ = Command::new("psql")
        .args(["-X", "-q", "-U", "postgres", "-d", "ferry", "-h"])
        .arg(pg.dir().join("sock"))
        .args(["-p", &pg.port().to_string(), "-c", "checkpoint"])
        .stdout(Stdio::null())
        .status();
    let url = pg.url();
    pg.kill();
    assert!(!pg.running());
    assert!(!port_open(pg.port()), "port open after kill");
    assert!(psql(&url, "select 1").is_err());
    let t0 = Instant::now();
    pg.restart().expect("restart");
    eprintln!("PostgreSQL restarted after kill in {:?}", t0.elapsed());
    assert_eq!(pg.url(), url);
    assert_eq!(psql(&url, "select v from t").as_deref(), Ok("42"), "{}", pg.log());
}

#[test]
fn postgres_gone_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel::<(u16, PathBuf)>();
    let r = std::thread::spawn(move || {
        let pg = Postgres::start().expect("start PostgreSQL");
        tx.send((pg.port(), pg.dir().to_path_buf())).expect("send");
        panic!("a test failing with its PostgreSQL running");
    })
    .join();
    assert!(r.is_err(), "the thread should have panicked");
    let (port, dir) = rx.recv().expect("port and folder");
    assert!(!port_open(port), "port {port} still open after the panic");
    // FERRY_TEST_KEEP keeps a panicking test's folder on purpose.
    if std::env::var_os("FERRY_TEST_KEEP").is_none() {
        assert!(!dir.exists(), "{} left after the panic", dir.display());
    }
}
