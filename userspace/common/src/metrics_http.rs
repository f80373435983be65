//! The `/metrics` endpoint every running role serves (`--metrics ADDR`): a
//! small synchronous HTTP/1.x server in a thread of its own, answering one
//! request per connection.
//!
//! - `GET /metrics` (or `HEAD`): the role's metrics. A scraper that asks for
//!   OpenMetrics (`Accept: application/openmetrics-text`, as Prometheus
//!   does) gets OpenMetrics 1.0 text; any other gets the Prometheus text
//!   format 0.0.4 (what `promtool check metrics` and older tools read).
//! - Another path: 404; another method on `/metrics`: 405; a request that
//!   cannot be read (too long, not HTTP, too slow): 400, or the connection
//!   is closed.
//! - Every answer says `Connection: close`. At most [`Limits::connections`]
//!   connections are served at once (more are answered 503 and closed);
//!   reads and writes time out after [`Limits::timeout`] (5 s).
//!
//! Why hand-written: docs/decisions.md ("The metrics endpoint").

use crate::report::{Format, RoleReport};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What makes the text of a scrape, in the format asked for.
pub type Render = Arc<dyn Fn(Format) -> String + Send + Sync>;

/// A role's report, rendered at each scrape.
pub fn from_report(f: impl Fn() -> RoleReport + Send + Sync + 'static) -> Render {
    Arc::new(move |format| f().metrics(format))
}

/// The endpoint's limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// Longest a read of the request, or the write of the answer, may take.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { connections: 8, timeout: Duration::from_secs(5) }
    }
}

/// Longest request head read (request line and headers).
const MAX_HEAD: usize = 8 << 10;

/// The address `--metrics ADDR` may listen on: the listening policy of
/// every `--listen` ([`crate::net`]): loopback only, unless the role runs
/// with an identity (`authenticated`).
pub fn listen_addr(addr: &str, authenticated: bool) -> Result<SocketAddr, crate::net::AddrError> {
    if authenticated {
        Ok(crate::net::resolve("metrics", addr, true)?[0])
    } else {
        crate::net::listen_addr("metrics", addr)
    }
}

/// Bind `addr` and serve `/metrics` from a thread; returns the address
/// bound (the port the system chose for port 0).
pub fn serve(addr: SocketAddr, render: Render) -> io::Result<SocketAddr> {
    serve_with(addr, render, Limits::default())
}

/// [`serve`] with other limits.
pub fn serve_with(addr: SocketAddr, render: Render, limits: Limits) -> io::Result<SocketAddr> {
    let l = TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("--metrics: cannot listen on {addr}: {e}")))?;
    let bound = l.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || accept_loop(l, render, limits))?;
    Ok(bound)
}

/// Counts a connection being served; released on drop (even by a panic).
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(l: TcpListener, render: Render, limits: Limits) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in l.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: do not spin.
                log::debug!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = conn.set_read_timeout(Some(limits.timeout));
        let _ = conn.set_write_timeout(Some(limits.timeout));
        if active.fetch_add(1, Ordering::SeqCst) >= limits.connections {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(&mut conn, "503 Service Unavailable", "text/plain; charset=utf-8", b"busy\n", false);
            continue;
        }
        let slot = Slot(Arc::clone(&active));
        let render = Arc::clone(&render);
        let spawned = std::thread::Builder::new().name("metrics-conn".into()).spawn(move || {
            let _slot = slot;
            handle(conn, &render, limits.timeout);
        });
        if let Err(e) = spawned {
            log::debug!("metrics: cannot start a thread: {e}");
        }
    }
}

/// The request head: what came before the blank line, or why not.
fn read_head(conn: &mut TcpStream, timeout: Duration) -> Result<String, &'static str> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_end(&buf) {
            buf.truncate(end);
            return String::from_utf8(buf).map_err(|_| "not text");
        }
        if buf.len() > MAX_HEAD {
            return Err("request too long");
        }
        if Instant::now() >= deadline {
            return Err("too slow");
        }
        match conn.read(&mut chunk) {
            Ok(0) => return Err("closed"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err("read failed"),
        }
    }
}

/// Where the head ends (`\r\n\r\n`, or `\n\n` from a lenient client).
fn find_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = buf.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What to answer a request head: (status, content type, body, with body).
fn answer(head: &str, render: &Render) -> (&'static str, &'static str, Vec<u8>, bool) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let mut lines = head.lines();
    let request = lines.next().unwrap_or("");
    let mut parts = request.split_whitespace();
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return ("400 Bad Request", TEXT, b"bad request\n".to_vec(), true);
    };
    if !version.starts_with("HTTP/1.") {
        return ("400 Bad Request", TEXT, b"HTTP/1.x only\n".to_vec(), true);
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    if path != "/metrics" {
        return ("404 Not Found", TEXT, b"not found: ferry serves /metrics\n".to_vec(), true);
    }
    let body = match method {
        "GET" => true,
        "HEAD" => false,
        _ => return ("405 Method Not Allowed", TEXT, b"GET /metrics only\n".to_vec(), true),
    };
    let openmetrics = lines.any(|l| {
        l.split_once(':').is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text"))
    });
    let format = if openmetrics { Format::OpenMetrics } else { Format::Prometheus };
    // A role's report that fails on a bug answers 500; the endpoint lives on.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| render(format))) {
        Ok(text) => ("200 OK", format.content_type(), text.into_bytes(), body),
        Err(_) => ("500 Internal Server Error", TEXT, b"the report failed\n".to_vec(), true),
    }
}

fn handle(mut conn: TcpStream, render: &Render, timeout: Duration) {
    let (status, ctype, body, with_body) = match read_head(&mut conn, timeout) {
        Ok(head) => answer(&head, render),
        Err("closed" | "read failed" | "too slow") => return,
        Err(why) => ("400 Bad Request", "text/plain; charset=utf-8", format!("{why}\n").into_bytes(), true),
    };
    let _ = respond(&mut conn, status, ctype, &body, with_body);
}

fn respond(conn: &mut TcpStream, status: &str, ctype: &str, body: &[u8], with_body: bool) -> io::Result<()> {
    let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
    conn.write_all(head.as_bytes())?;
    if with_body {
        conn.write_all(body)?;
    }
    conn.flush()?;
    let _ = conn.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::DiskReport;

    fn report() -> RoleReport {
        RoleReport {
            role: "agent".into(),
            name: "db1".into(),
            version: "0.1.0".into(),
            disks: vec![DiskReport { name: "vm".into(), state: "streaming".into(), churn_bytes_total: 4096, ..Default::default() }],
            ..Default::default()
        }
    }

    fn start(limits: Limits) -> SocketAddr {
        serve_with("127.0.0.1:0".parse().unwrap(), from_report(report), limits).unwrap()
    }

    /// Send `req` as it is, then read the whole answer.
    fn ask(addr: SocketAddr, req: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(req).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn get_metrics_answers_the_format_asked_for() {
        let a = start(Limits::default());
        let r = ask(a, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"), "{r}");
        assert!(r.contains("Connection: close\r\n"), "{r}");
        assert!(r.contains("# TYPE ferry_disk_churn_bytes_total counter\nferry_disk_churn_bytes_total{disk=\"vm\"} 4096\n"), "{r}");
        assert!(!r.contains("# EOF"), "{r}");
        let body = r.split_once("\r\n\r\n").unwrap().1;
        assert!(r.contains(&format!("Content-Length: {}\r\n", body.len())), "{r}");

        let r = ask(a, b"GET /metrics?x=1 HTTP/1.1\r\naccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n");
        assert!(r.contains("Content-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"), "{r}");
        assert!(r.contains("# TYPE ferry_disk_state stateset\n"), "{r}");
        assert!(r.ends_with("# EOF\n"), "{r}");

        let r = ask(a, b"HEAD /metrics HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\n"), "{r}");
    }

    #[test]
    fn anything_else_is_refused_and_the_endpoint_lives_on() {
        let a = start(Limits::default());
        assert!(ask(a, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(ask(a, b"GET /metricsx HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(ask(a, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        for bad in [
            &b"\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET /metrics SMTP/1\r\n\r\n",
            b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        ] {
            let r = ask(a, bad);
            assert!(r.starts_with("HTTP/1.1 400 "), "{bad:?}: {r}");
        }
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 64 << 10));
        // The server may close before it read everything: a reset is an answer too.
        let mut c = TcpStream::connect(a).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(&huge);
        let mut r = String::new();
        let _ = c.read_to_string(&mut r);
        assert!(r.is_empty() || r.starts_with("HTTP/1.1 400 "), "{r}");
        // A client that connects and goes away.
        drop(TcpStream::connect(a).unwrap());
        assert!(ask(a, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 OK"));
    }

    #[test]
    fn a_render_that_panics_answers_500() {
        let render: Render = Arc::new(|_| panic!("a bug"));
        let a = serve("127.0.0.1:0".parse().unwrap(), render).unwrap();
        assert!(ask(a, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 500 "));
        assert!(ask(a, b"GET /nope HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    }

    /// Silent clients hold at most `connections` slots, each for at most
    /// the timeout: past that, 503 at once; after the timeout, served again.
    #[test]
    fn connections_are_bounded_and_silent_ones_time_out() {
        let a = start(Limits { connections: 2, timeout: Duration::from_millis(500) });
        let silent: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(a).unwrap()).collect();
        std::thread::sleep(Duration::from_millis(100));
        assert!(ask(a, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 503 "));
        std::thread::sleep(Duration::from_millis(1000));
        assert!(ask(a, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 OK"));
        // A client that dribbles bytes is cut at the deadline, not per read.
        let mut c = TcpStream::connect(a).unwrap();
        let t = Instant::now();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut closed = false;
        for _ in 0..40 {
            if c.write_all(b"G").is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
            let mut b = [0u8; 16];
            c.set_nonblocking(true).unwrap();
            let r = c.read(&mut b);
            c.set_nonblocking(false).unwrap();
            if matches!(r, Ok(0)) {
                closed = true;
                break;
            }
        }
        assert!(closed && t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        drop(silent);
    }

    #[test]
    fn listening_follows_the_policy_of_listen() {
        assert!(listen_addr("127.0.0.1:9100", false).is_ok());
        assert!(matches!(listen_addr("0.0.0.0:9100", false), Err(crate::net::AddrError::NotLoopback { .. })));
        assert!(listen_addr("0.0.0.0:9100", true).is_ok());
        assert!(listen_addr("127.0.0.1", false).is_err());
    }
}
