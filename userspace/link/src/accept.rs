//! One accept loop for every listener (the master target's replication
//! port, `ferry export`'s NBD port): a connection limit, a thread per
//! connection, and every socket set up alike before its service sees it —
//! no Nagle, TCP keepalive, a handshake read deadline and a write deadline.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A listener's limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; one more is refused at once
    /// ([`Service::busy`]) and closed.
    pub max_connections: usize,
    /// The read deadline a connection starts with: its handshake must come
    /// within it. The service moves it on afterwards (an idle deadline, or
    /// none).
    pub handshake: Duration,
    /// A write that cannot go out for this long fails.
    pub write: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { max_connections: 1024, handshake: Duration::from_secs(30), write: Duration::from_secs(60) }
    }
}

/// What a listener serves.
pub trait Service: Send + Sync + 'static {
    /// Serve one connection to its end, in the connection's own thread. The
    /// socket already has the listener's deadlines and keepalive.
    fn serve(&self, conn: TcpStream);
    /// Tell a connection past the limit that it is refused (the socket has
    /// a 1 s write deadline); it is closed afterwards. Default: say nothing.
    fn busy(&self, _conn: &mut TcpStream) {}
}

/// Serve `service` on `listener` until accepting fails for good (never, in
/// practice): at most `limits.max_connections` connections at once, each in
/// its own thread.
pub fn serve<V: Service>(listener: TcpListener, limits: Limits, service: Arc<V>) -> io::Result<()> {
    let open = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                log::warn!("accept: {e}");
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    // Out of descriptors: give finishing connections a moment.
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
        };
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        if open.fetch_add(1, Ordering::SeqCst) >= limits.max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            log::warn!("{peer}: refused: {} connections already open (the limit)", limits.max_connections);
            let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
            service.busy(&mut conn);
            continue;
        }
        if let Err(e) = setup(&conn, &limits) {
            log::warn!("{peer}: {e}");
            open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let (service, open2) = (Arc::clone(&service), Arc::clone(&open));
        let spawned = std::thread::Builder::new().name("conn".into()).spawn(move || {
            // Counted down even if the service panics.
            struct Slot(Arc<AtomicUsize>);
            impl Drop for Slot {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, Ordering::SeqCst);
                }
            }
            let _slot = Slot(open2);
            service.serve(conn);
        });
        if let Err(e) = spawned {
            log::warn!("{peer}: cannot start a thread for the connection: {e}");
            open.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Ok(())
}

/// The settings every accepted socket gets.
fn setup(conn: &TcpStream, limits: &Limits) -> io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(limits.handshake))?;
    conn.set_write_timeout(Some(limits.write))?;
    ferry_common::net::keepalive(conn);
    Ok(())
}
