//! Networking shared by every ferry role: the socket settings every
//! connection uses, addresses given on the command line (one parser for
//! every `--target`) and one listening policy for every `--listen`.
//!
//! An address is `HOST:PORT`: an IPv4 address, a bracketed IPv6 address
//! (`[::1]:7700`) or a host name, and a port from 1 to 65535. A host name is
//! resolved at once, so that a typo is refused before anything is started.
//!
//! Listening policy: until ferry authenticates its peers (TLS, a later
//! issue), a listener serves whoever connects, so every listener (the master
//! target, `ferry export`) accepts only loopback addresses, 127.0.0.0/8 and
//! ::1. A host name must resolve to loopback addresses only.

use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
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

/// The master target's port when `--listen` is not given.
pub const DEFAULT_PORT: u16 = 7700;

/// An address given on the command line that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("--{opt} {addr:?}: no port; give HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")]
    NoPort { opt: &'static str, addr: String },
    #[error("--{opt} {addr:?}: bad port {port:?}; give a port from 1 to 65535, e.g. 127.0.0.1:{DEFAULT_PORT}")]
    BadPort { opt: &'static str, addr: String, port: String },
    #[error("--{opt} {addr:?}: cannot resolve {host:?} ({why})")]
    Unresolved { opt: &'static str, addr: String, host: String, why: String },
    #[error(
        "--{opt} {addr:?}: {ip} is not a loopback address; listening elsewhere needs authentication: \
         give --identity DIR (enroll this machine first: `ferry enroll --server ADDR --token TOKEN --identity DIR`), \
         or listen on 127.0.0.1 or ::1"
    )]
    NotLoopback { opt: &'static str, addr: String, ip: std::net::IpAddr },
}

/// Split `HOST:PORT` (IPv6 hosts in brackets) and resolve it: every address
/// the host has, in the resolver's order. Port 0 is refused unless
/// `any_port` (a listener: the system picks one, which ferry prints).
pub fn resolve(opt: &'static str, addr: &str, any_port: bool) -> Result<Vec<SocketAddr>, AddrError> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        if a.port() == 0 && !any_port {
            return Err(AddrError::BadPort { opt, addr: addr.into(), port: "0".into() });
        }
        return Ok(vec![a]);
    }
    let (host, port) = match addr.rsplit_once(':') {
        // A bare IPv6 address (several colons, no brackets) has no port.
        Some((h, _)) if h.contains(':') && !h.starts_with('[') => return Err(AddrError::NoPort { opt, addr: addr.into() }),
        Some((h, p)) => (h.trim_start_matches('[').trim_end_matches(']'), p),
        None => return Err(AddrError::NoPort { opt, addr: addr.into() }),
    };
    if host.is_empty() {
        return Err(AddrError::Unresolved { opt, addr: addr.into(), host: host.into(), why: "no host".into() });
    }
    let port: u16 = match port.parse() {
        Ok(p) if p > 0 || any_port => p,
        _ => return Err(AddrError::BadPort { opt, addr: addr.into(), port: port.into() }),
    };
    let unresolved = |why: String| AddrError::Unresolved { opt, addr: addr.into(), host: host.into(), why };
    let v: Vec<SocketAddr> = (host, port).to_socket_addrs().map_err(|e| unresolved(e.to_string()))?.collect();
    if v.is_empty() {
        return Err(unresolved("no address".into()));
    }
    Ok(v)
}

/// Check an address a client connects to (`--target`): syntax, port, and
/// that the host resolves.
pub fn check_target(addr: &str) -> Result<(), AddrError> {
    resolve("target", addr, false).map(|_| ())
}

/// The listening policy: an address a listener may bind.
pub fn check_listen(opt: &'static str, a: SocketAddr) -> Result<SocketAddr, AddrError> {
    if a.ip().is_loopback() {
        Ok(a)
    } else {
        Err(AddrError::NotLoopback { opt, addr: a.to_string(), ip: a.ip() })
    }
}

/// The address to listen on for `--{opt} ADDR` (a name resolves to its
/// first address): refused unless every address the host has is loopback.
pub fn listen_addr(opt: &'static str, addr: &str) -> Result<SocketAddr, AddrError> {
    let v = resolve(opt, addr, true)?;
    for a in &v {
        check_listen(opt, *a).map_err(|_| AddrError::NotLoopback { opt, addr: addr.into(), ip: a.ip() })?;
    }
    Ok(v[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_take_loopback_only_and_names_resolve() {
        assert_eq!(listen_addr("listen", "127.0.0.1:7700").unwrap(), "127.0.0.1:7700".parse().unwrap());
        assert_eq!(listen_addr("listen", "127.3.2.1:9").unwrap().port(), 9);
        assert!(listen_addr("listen", "[::1]:7700").is_ok());
        assert!(listen_addr("listen", "localhost:7700").unwrap().ip().is_loopback());
        assert_eq!(listen_addr("listen", "127.0.0.1:0").unwrap().port(), 0);
        for bad in ["0.0.0.0:7700", "0.0.0.0:0", "[::]:7700", "10.1.2.3:7700", "8.8.8.8:53"] {
            assert!(matches!(listen_addr("listen", bad), Err(AddrError::NotLoopback { .. })), "{bad}");
        }
    }

    #[test]
    fn a_missing_or_zero_port_is_refused_with_the_form_to_use() {
        for bad in ["127.0.0.1", "localhost", "::1", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:x"] {
            let e = check_target(bad).unwrap_err();
            assert!(matches!(e, AddrError::NoPort { .. } | AddrError::BadPort { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("127.0.0.1:7700"), "{e}");
        }
        assert!(check_target("localhost:7700").is_ok());
        assert!(check_target("[::1]:7700").is_ok());
        assert!(matches!(check_target("no-such-host.invalid:7700"), Err(AddrError::Unresolved { .. })));
        assert!(matches!(check_target(":7700"), Err(AddrError::Unresolved { .. })));
    }
}
