//! ferry link layer: the wire protocol (`ferry-proto`, docs/protocol.md)
//! spoken over a connection, written once for every hop.
//!
//! ```text
//!  agent / process server                          master target / process server
//!  ┌──────────────────────┐   any byte stream      ┌──────────────────────────────┐
//!  │ client::Client<S>    │ ─── TCP (TLS next) ──► │ accept::serve (limit, thread │
//!  │  HELLO/OPEN, window, │                        │  per conn, keepalive)        │
//!  │  ACK/POINT/SUMS,     │ ◄── ACK POINT SUMS ─── │ server::serve<S, K: Sinks>   │
//!  │  PING, deadlines     │        PONG ERROR      │  batches → Sink (disk/spool) │
//!  └──────────────────────┘                        └──────────────────────────────┘
//! ```
//!
//! - [`Stream`]: what the link needs of a byte stream (a second handle,
//!   timeouts, shutdown, "is input waiting"); TCP and Unix sockets have it,
//!   a TLS stream will.
//! - [`client`]: the client state machine; [`Backoff`] paces reconnects.
//! - [`server`]: the server state machine and the [`Sink`] / [`Sinks`]
//!   traits for what receives a stream.
//! - [`accept`]: one accept loop for every listener, with a connection
//!   limit and the same deadlines and keepalive on every socket.
//!
//! Threads: a client is used from one thread (the shipper's) and runs a
//! receiver thread and, with v2, a pinger; a server connection is one thread
//! from the accept loop. Deadlines: docs/protocol.md, "Deadlines", and
//! docs/architecture.md, "The link layer".

pub mod accept;
pub mod backoff;
pub mod client;
pub mod server;
pub mod stream;
pub mod tls;

pub use backoff::Backoff;
pub use client::{Client, ClientConfig, Opened};
pub use server::{Op, OpenInfo, ServerConfig, Sink, Sinks};
pub use stream::{connect_tcp, Stream};
pub use tls::{AnyStream, TlsStream, Watch};

use ferry_proto::{ErrorCode, ProtoError};

/// Why a client's connection attempt or stream failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The next hop cannot be reached (resolve or TCP connect).
    #[error("{target}: {source}")]
    Connect { target: String, source: std::io::Error },
    /// HELLO or OPEN did not get its answer (a dead or foreign peer).
    #[error("{why}")]
    Handshake { why: String, source: Option<ProtoError> },
    /// The peer refused, with an ERROR frame (or chose a version this side
    /// does not speak).
    #[error("{msg}")]
    Refused { code: ErrorCode, msg: String },
    /// The connection ended, or a deadline passed.
    #[error("{why}")]
    Lost { why: String, source: Option<std::io::Error> },
    /// The interrupt hook asked every wait to end (a stop signal).
    #[error("interrupted")]
    Interrupted,
}

/// Why a served connection ends badly: sent to the peer as ERROR, then
/// logged. Sinks return it too, with the code the client should see.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct Fail {
    pub code: ErrorCode,
    pub msg: String,
}

impl Fail {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Fail {
        Fail { code, msg: msg.into() }
    }
}

impl From<ProtoError> for Fail {
    fn from(e: ProtoError) -> Fail {
        Fail::new(e.code(), e.to_string())
    }
}

impl From<std::io::Error> for Fail {
    fn from(e: std::io::Error) -> Fail {
        Fail::new(ErrorCode::Internal, format!("connection: {e}"))
    }
}

#[cfg(test)]
mod tests;
