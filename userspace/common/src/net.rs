//! Socket settings every ferry connection uses.

use std::net::TcpStream;
use std::os::unix::io::AsRawFd;

/// Turn on TCP keepalive: probes after 30 s of silence, every 10 s, and the
/// connection fails after 3 unanswered ones, so a peer whose machine or
/// network is gone is noticed in about a minute even on an idle stream.
pub fn keepalive(s: &TcpStream) {
    let fd = s.as_raw_fd();
    for (level, opt, val) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3),
    ] {
        let v: libc::c_int = val;
        // SAFETY: `fd` is an open socket owned by `s` for this call; the
        // option value is a c_int that lives across the call, and its size
        // is passed with it.
        unsafe {
            libc::setsockopt(fd, level, opt, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t);
        }
    }
}

/// Whether an I/O error is a socket timeout (`SO_RCVTIMEO`/`SO_SNDTIMEO`).
pub fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}
