//! What the link needs of a byte stream ([`Stream`]), its implementations
//! for TCP and Unix sockets, and the client's TCP connect.
//!
//! The state machines in [`crate::client`] and [`crate::server`] only ever
//! see a [`Stream`]: a TLS stream (next issue) implements the same trait
//! over its TCP socket and plugs in with no change to them.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// A bidirectional byte stream the link runs over.
///
/// `try_clone` gives a second handle on the same connection: the client
/// reads in one thread and writes in another (and a pinger), the server
/// reads through one handle and writes through another. Timeouts set on
/// one handle apply to the connection (as with sockets).
pub trait Stream: Read + Write + Send + Sized + 'static {
    /// Another handle on the same connection.
    fn try_clone(&self) -> io::Result<Self>;
    /// A read that waits longer than this fails with `WouldBlock`/`TimedOut`.
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// A write that cannot go out for this long fails.
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    /// End the connection both ways; blocked reads and writes on other
    /// handles return.
    fn shutdown(&self) -> io::Result<()>;
    /// Wait up to `t` for input that a read would return without blocking
    /// (a TLS stream also counts decrypted bytes it holds); whether there is.
    fn wait_input(&self, t: Duration) -> bool;
    /// Whether such input is waiting now.
    fn input_waiting(&self) -> bool {
        self.wait_input(Duration::ZERO)
    }
    /// The peer, for logs.
    fn peer(&self) -> String;
    /// Who the peer proved to be (a TLS client certificate); `None` on a
    /// plain socket.
    fn identity(&self) -> Option<ferry_identity::Identity> {
        None
    }
}

/// Whether `fd` is readable (or at its end) within `t` (poll).
pub(crate) fn readable(fd: RawFd, t: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    let ms = t.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid, initialized pollfd on the stack, count 1; poll
    // only writes `revents` of that struct.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    n > 0
}

impl Stream for TcpStream {
    fn try_clone(&self) -> io::Result<Self> {
        TcpStream::try_clone(self)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
    fn shutdown(&self) -> io::Result<()> {
        TcpStream::shutdown(self, Shutdown::Both)
    }
    fn wait_input(&self, t: Duration) -> bool {
        readable(self.as_raw_fd(), t)
    }
    fn peer(&self) -> String {
        self.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into())
    }
}

/// Unix sockets (a socketpair in tests, a local hop later).
impl Stream for UnixStream {
    fn try_clone(&self) -> io::Result<Self> {
        UnixStream::try_clone(self)
    }
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
    fn shutdown(&self) -> io::Result<()> {
        UnixStream::shutdown(self, Shutdown::Both)
    }
    fn wait_input(&self, t: Duration) -> bool {
        readable(self.as_raw_fd(), t)
    }
    fn peer(&self) -> String {
        "unix socket".into()
    }
}

/// Connect to `target` (`HOST:PORT`): every address it resolves to in turn,
/// each within `timeout`; the socket sends at once (no Nagle) and has TCP
/// keepalive on (`ferry_common::net::keepalive`).
pub fn connect_tcp(target: &str, timeout: Duration) -> Result<TcpStream, crate::LinkError> {
    let fail = |source: io::Error| crate::LinkError::Connect { target: target.to_string(), source };
    let addrs: Vec<_> = target.to_socket_addrs().map_err(fail)?.collect();
    let mut last = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                s.set_nodelay(true).ok();
                ferry_common::net::keepalive(&s);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(fail(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))))
}
