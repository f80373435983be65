//! The link's state machines over a socketpair: a real client against a
//! real server with an in-memory sink, and each against a scripted peer
//! for the cases a well-behaved peer never produces.

use crate::accept::{self, Limits, Service};
use crate::server::{self, Op, OpenInfo, ServerConfig, Sink, Sinks};
use crate::{Client, ClientConfig, Fail, LinkError};
use ferry_proto::{read_frame, write_msg, Codec, ErrorCode, Msg, PointKind, VERSION_MAX};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One disk held in memory: its bytes, durable sequence and points.
#[derive(Default)]
struct MemDisk {
    bytes: Vec<u8>,
    durable: u64,
    points: Vec<(u64, u64)>,
    generation: [u8; 16],
    open: bool,
}

/// Disks by name; a disk open on one connection is busy for others, and
/// released when its sink is dropped.
#[derive(Default)]
struct MemSinks {
    disks: Mutex<HashMap<String, Arc<Mutex<MemDisk>>>>,
}

struct MemSink {
    d: Arc<Mutex<MemDisk>>,
    size: u64,
}

impl Drop for MemSink {
    fn drop(&mut self) {
        self.d.lock().unwrap().open = false;
    }
}

impl Sinks for MemSinks {
    type Sink = MemSink;
    fn open(
        &self,
        _peer: &str,
        _who: Option<&ferry_identity::Identity>,
        name: &str,
        size: u64,
        generation: [u8; 16],
    ) -> Result<(MemSink, OpenInfo), Fail> {
        let mut all = self.disks.lock().unwrap();
        let existed = all.contains_key(name);
        let d = Arc::clone(
            all.entry(name.to_string())
                .or_insert_with(|| Arc::new(Mutex::new(MemDisk { bytes: vec![0; size as usize], generation, ..Default::default() }))),
        );
        let mut g = d.lock().unwrap();
        if g.open {
            return Err(Fail::new(ErrorCode::Busy, format!("disk {name} is being written by another stream")));
        }
        g.open = true;
        let info = OpenInfo { existed, same_generation: existed && g.generation == generation };
        drop(g);
        Ok((MemSink { d, size }, info))
    }
}

impl Sink for MemSink {
    fn size(&self) -> u64 {
        self.size
    }
    fn durable_seq(&self) -> u64 {
        self.d.lock().unwrap().durable
    }
    fn apply(&mut self, ops: Vec<Op>) -> Result<Vec<(u64, u64)>, Fail> {
        let mut d = self.d.lock().unwrap();
        let mut made = Vec::new();
        for op in ops {
            match op {
                Op::Write { seq, offset, data } => {
                    d.bytes[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                    d.durable = seq;
                }
                Op::Zero { seq, offset, len } => {
                    d.bytes[offset as usize..(offset + u64::from(len)) as usize].fill(0);
                    d.durable = seq;
                }
                Op::Tag { seq, .. } => {
                    let id = d.points.len() as u64 + 1;
                    d.points.push((seq, id));
                    made.push((seq, id));
                    d.durable = seq;
                }
                Op::Data { seq, .. } | Op::Ref { seq, .. } | Op::XRef { seq, .. } => panic!("seq {seq}: this sink does not keep frames"),
            }
        }
        Ok(made)
    }
    fn resolve_ref(&mut self, src: u64, len: u32, digest: &[u8; 32]) -> Result<Option<Vec<u8>>, Fail> {
        let d = self.d.lock().unwrap();
        let b = d.bytes[src as usize..(src + u64::from(len)) as usize].to_vec();
        Ok((blake3::hash(&b).as_bytes() == digest).then_some(b))
    }
    fn sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<Vec<[u8; 16]>, Fail> {
        let d = self.d.lock().unwrap();
        let end = (offset + u64::from(chunk) * u64::from(count)).min(self.size);
        Ok(d.bytes[offset as usize..end as usize].chunks(chunk as usize).map(|c| xxhash_rust::xxh3::xxh3_128(c).to_le_bytes()).collect())
    }
}

const SIZE: u64 = 1 << 20;

fn server_cfg() -> ServerConfig {
    ServerConfig::new("test-server")
}

fn client_cfg() -> ClientConfig {
    ClientConfig::new("test-client")
}

/// A real server on one end of a socketpair, in its own thread.
fn spawn_server(sinks: &Arc<MemSinks>, cfg: ServerConfig) -> (UnixStream, std::thread::JoinHandle<Result<(), Fail>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let sinks = Arc::clone(sinks);
    (a, std::thread::spawn(move || server::serve(b, &*sinks, &cfg)))
}

fn data(seq: u64, offset: u64, byte: u8, len: u32) -> Msg {
    Msg::Data { seq, offset, len, codec: Codec::Raw, payload: vec![byte; len as usize] }
}

#[test]
fn handshake_both_ways_then_data_points_and_checksums() {
    let sinks = Arc::new(MemSinks::default());
    let (a, srv) = spawn_server(&sinks, server_cfg());
    let mut c = Client::open(a, client_cfg(), "vm", SIZE, [4; 16]).unwrap();
    assert_eq!(c.opened(), crate::Opened { version: VERSION_MAX, durable_seq: 0, flags: 0 });
    c.send(&data(1, 4096, 7, 4096)).unwrap();
    c.send(&Msg::Zero { seq: 2, offset: 0, len: 512 }).unwrap();
    c.send(&Msg::Tag { seq: 3, time_ns: 1, kind: PointKind::Crash }).unwrap();
    assert_eq!(c.wait_point(3).unwrap(), 1);
    assert!(c.acked() >= 3);
    // A checksum answer reflects every frame sent before the request.
    c.send(&data(4, 8192, 9, 4096)).unwrap();
    let req = c.request_sums(4096, 4096, 2).unwrap();
    let sums = c.recv_sums(req, 4096, 2).unwrap();
    assert_eq!(sums, vec![xxhash_rust::xxh3::xxh3_128(&[7; 4096]).to_le_bytes(), xxhash_rust::xxh3::xxh3_128(&[9; 4096]).to_le_bytes()]);
    // A REF to content the server holds is resolved there.
    let digest = *blake3::hash(&[9; 4096]).as_bytes();
    c.send(&Msg::Ref { seq: 5, offset: 65536, len: 4096, src: 8192, digest }).unwrap();
    c.wait_acked(5).unwrap();
    c.close();
    srv.join().unwrap().unwrap();
    let d = Arc::clone(&sinks.disks.lock().unwrap()["vm"]);
    assert_eq!(&d.lock().unwrap().bytes[65536..65536 + 4096], &[9; 4096][..]);
    assert!(!d.lock().unwrap().open, "the disk is released when the stream ends");

    // Again: the server reports what it holds, and numbering resumes above it.
    let (a, srv) = spawn_server(&sinks, server_cfg());
    let mut c = Client::open(a, client_cfg(), "vm", SIZE, [4; 16]).unwrap();
    let o = c.opened();
    assert_eq!((o.durable_seq, o.flags), (5, ferry_proto::OPEN_EXISTS | ferry_proto::OPEN_SAME_GENERATION));
    c.send(&Msg::Tag { seq: 6, time_ns: 2, kind: PointKind::App }).unwrap();
    assert_eq!(c.wait_point(6).unwrap(), 2);
    c.close();
    srv.join().unwrap().unwrap();
}

#[test]
fn a_version_mismatch_is_refused_with_a_clear_error_both_ways() {
    // A client from the future against this server.
    let sinks = Arc::new(MemSinks::default());
    let (a, srv) = spawn_server(&sinks, server_cfg());
    let cfg = ClientConfig { versions: (7, 9), ..client_cfg() };
    match Client::open(a, cfg, "vm", SIZE, [1; 16]) {
        Err(LinkError::Refused { code: ErrorCode::UnsupportedVersion, msg }) => {
            assert!(msg.contains("v7..v9") && msg.contains("upgrade the older side"), "{msg}")
        }
        Err(e) => panic!("expected a version refusal, got {e}"),
        Ok(_) => panic!("expected a version refusal, got a stream"),
    }
    let f = srv.join().unwrap().unwrap_err();
    assert_eq!(f.code, ErrorCode::UnsupportedVersion);
    assert!(sinks.disks.lock().unwrap().is_empty(), "nothing was opened");

    // A server that picks a version this client does not speak.
    let (a, mut b) = UnixStream::pair().unwrap();
    let peer = std::thread::spawn(move || {
        assert!(matches!(read_frame(&mut b).unwrap(), Some(Msg::Hello { .. })));
        write_msg(&mut b, &Msg::HelloAck { version: 9, peer: "future-server".into() }).unwrap();
        b
    });
    match Client::open(a, client_cfg(), "vm", SIZE, [1; 16]) {
        Err(LinkError::Refused { code: ErrorCode::UnsupportedVersion, msg }) => {
            assert!(msg.contains("future-server chose protocol v9") && msg.contains("upgrade"), "{msg}")
        }
        Err(e) => panic!("expected a version refusal, got {e}"),
        Ok(_) => panic!("expected a version refusal, got a stream"),
    }
    drop(peer.join().unwrap());
}

/// A scripted server: answers HELLO with `version` and OPEN with
/// `durable`, then hands the socket to the test.
fn scripted_server(version: u16, durable: u64) -> (UnixStream, std::thread::JoinHandle<UnixStream>) {
    let (a, mut b) = UnixStream::pair().unwrap();
    let h = std::thread::spawn(move || {
        assert!(matches!(read_frame(&mut b).unwrap(), Some(Msg::Hello { .. })));
        write_msg(&mut b, &Msg::HelloAck { version, peer: "scripted".into() }).unwrap();
        assert!(matches!(read_frame(&mut b).unwrap(), Some(Msg::Open { .. })));
        write_msg(&mut b, &Msg::OpenAck { durable_seq: durable, flags: 0, generation: [0; 16] }).unwrap();
        b
    });
    (a, h)
}

#[test]
fn the_window_blocks_sending_until_frames_are_acknowledged() {
    let (a, h) = scripted_server(1, 0);
    const W: u64 = 64 << 10;
    let cfg = ClientConfig { min_window: W, max_window: W, ..client_cfg() };
    let c = Client::open(a, cfg, "vm", SIZE, [1; 16]).unwrap();
    let mut b = h.join().unwrap();
    // Frames of 16 KiB: three fit in 64 KiB, the fourth must wait.
    let sent = Arc::new(AtomicU64::new(0));
    let s2 = Arc::clone(&sent);
    let sender = std::thread::spawn(move || {
        let mut c = c;
        for seq in 1..=10u64 {
            c.send(&data(seq, seq * 16384, seq as u8, 16384)).unwrap();
            s2.store(seq, Ordering::SeqCst);
        }
        c.wait_acked(10).unwrap();
        c
    });
    // The server reads the three frames sent (the client flushes before it
    // waits), and the sender stays blocked while nothing is acknowledged.
    for want in 1..=3u64 {
        assert_eq!(read_frame(&mut b).unwrap().and_then(|m| m.seq()), Some(want));
    }
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(sent.load(Ordering::SeqCst), 3, "a fourth frame went out with the window full and nothing acknowledged");
    // Acknowledging two frames makes room for two more, not more.
    write_msg(&mut b, &Msg::Ack { durable_seq: 2 }).unwrap();
    let t0 = Instant::now();
    while sent.load(Ordering::SeqCst) < 5 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the acknowledgement did not open the window");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sent.load(Ordering::SeqCst), 5, "more went out than the window allows");
    // Everything acknowledged: the rest goes, and wait_acked returns.
    let mut seen = 3;
    while seen < 10 {
        let m = read_frame(&mut b).unwrap().unwrap();
        seen = m.seq().unwrap();
        write_msg(&mut b, &Msg::Ack { durable_seq: seen }).unwrap();
    }
    let c = sender.join().unwrap();
    assert_eq!(c.acked(), 10);
}

#[test]
fn a_server_that_goes_silent_hits_the_client_deadline() {
    // Waiting for an ACK: the deadline counts from the last frame received.
    let (a, h) = scripted_server(1, 0);
    let cfg = ClientConfig { peer_timeout: Duration::from_secs(1), server: "the test server".into(), ..client_cfg() };
    let mut c = Client::open(a, cfg.clone(), "vm", SIZE, [1; 16]).unwrap();
    let _b = h.join().unwrap(); // kept open, never answered
    c.send(&data(1, 0, 1, 4096)).unwrap();
    let t0 = Instant::now();
    match c.wait_acked(1) {
        Err(LinkError::Lost { why, .. }) => assert!(why.contains("no answer from the test server"), "{why}"),
        other => panic!("expected a lost connection, got {other:?}"),
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(10), "{took:?}");

    // Idle with v2: PINGs go out; unanswered, the connection is lost.
    let (a, h) = scripted_server(2, 0);
    let cfg = ClientConfig { ping_every: Duration::from_millis(100), ..cfg };
    let c = Client::open(a, cfg, "vm", SIZE, [1; 16]).unwrap();
    let mut b = h.join().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(matches!(read_frame(&mut b).unwrap(), Some(Msg::Ping { .. })), "an idle v2 client pings");
    let t0 = Instant::now();
    loop {
        match c.check_alive() {
            Ok(()) => assert!(t0.elapsed() < Duration::from_secs(10), "an unanswered PING never failed the connection"),
            Err(LinkError::Lost { why, .. }) => {
                assert!(why.contains("has not answered a PING"), "{why}");
                break;
            }
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_stop_request_ends_a_wait() {
    let (a, h) = scripted_server(1, 0);
    let mut c = Client::open(a, client_cfg(), "vm", SIZE, [1; 16]).unwrap();
    let _b = h.join().unwrap();
    let stop = Arc::new(AtomicU64::new(0));
    let s2 = Arc::clone(&stop);
    c.set_interrupt(Box::new(move || s2.load(Ordering::SeqCst) == 1));
    c.send(&Msg::Tag { seq: 1, time_ns: 0, kind: PointKind::Crash }).unwrap();
    let waiter = std::thread::spawn(move || c.wait_point(1).map(|_| ()));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(1, Ordering::SeqCst);
    assert!(matches!(waiter.join().unwrap(), Err(LinkError::Interrupted)));
}

/// A scripted client: HELLO offering up to `max`, OPEN of disk `name`.
fn raw_open(s: &mut UnixStream, max: u16, name: &str) -> Msg {
    write_msg(s, &Msg::Hello { min: 1, max, peer: "raw".into() }).unwrap();
    assert!(matches!(read_frame(s).unwrap(), Some(Msg::HelloAck { .. })));
    write_msg(s, &Msg::Open { name: name.into(), size: SIZE, generation: [2; 16] }).unwrap();
    read_frame(s).unwrap().unwrap()
}

#[test]
fn a_client_that_goes_silent_loses_the_disk_at_the_idle_deadline() {
    let sinks = Arc::new(MemSinks::default());
    let cfg = ServerConfig { idle: Duration::from_secs(1), ..server_cfg() };
    let (mut a, srv) = spawn_server(&sinks, cfg.clone());
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(matches!(raw_open(&mut a, 2, "vm"), Msg::OpenAck { .. }));
    // While it holds the disk, a second stream is refused as busy.
    let (mut a2, srv2) = spawn_server(&sinks, cfg.clone());
    assert!(matches!(raw_open(&mut a2, 2, "vm"), Msg::Error { code: ErrorCode::Busy, .. }));
    assert_eq!(srv2.join().unwrap().unwrap_err().code, ErrorCode::Busy);
    // Silent (connection open, nothing sent or read): dropped at the deadline.
    let t0 = Instant::now();
    let f = srv.join().unwrap().unwrap_err();
    assert!(f.msg.contains("no frame from the peer for 1s"), "{}", f.msg);
    assert!(t0.elapsed() < Duration::from_secs(10));
    match read_frame(&mut a) {
        Ok(Some(Msg::Error { msg, .. })) => assert!(msg.contains("dead or stuck peer"), "{msg}"),
        other => panic!("expected an ERROR naming the deadline, got {other:?}"),
    }
    // The disk is free again.
    let (mut a3, srv3) = spawn_server(&sinks, cfg.clone());
    assert!(matches!(raw_open(&mut a3, 2, "vm"), Msg::OpenAck { .. }));
    drop(a3);
    srv3.join().unwrap().unwrap();

    // A v1 client never pings: an idle v1 stream is kept.
    let (mut a, srv) = spawn_server(&sinks, cfg);
    assert!(matches!(raw_open(&mut a, 1, "vm"), Msg::OpenAck { .. }));
    std::thread::sleep(Duration::from_millis(1500));
    write_msg(&mut a, &Msg::Tag { seq: 1, time_ns: 0, kind: PointKind::Crash }).unwrap();
    assert!(matches!(read_frame(&mut a).unwrap(), Some(Msg::Ack { durable_seq: 1 })));
    assert!(matches!(read_frame(&mut a).unwrap(), Some(Msg::Point { seq: 1, id: 1 })));
    drop(a);
    srv.join().unwrap().unwrap();
}

#[test]
fn a_client_that_trickles_a_frame_loses_the_disk_at_the_idle_deadline() {
    // A byte every 200 ms never lets a socket read time out, but the frame
    // takes far longer than the 1 s deadline: the stream is dropped and
    // the disk freed, as for a silent peer.
    let sinks = Arc::new(MemSinks::default());
    let cfg = ServerConfig { idle: Duration::from_secs(1), ..server_cfg() };
    let (mut a, srv) = spawn_server(&sinks, cfg.clone());
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(matches!(raw_open(&mut a, 2, "vm"), Msg::OpenAck { .. }));
    let mut frame = Vec::new();
    write_msg(&mut frame, &Msg::Tag { seq: 1, time_ns: 0, kind: PointKind::Crash }).unwrap();
    let t0 = Instant::now();
    let trickler = {
        let mut a = a.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in frame.iter().cycle().take(100) {
                if a.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let f = srv.join().unwrap().unwrap_err();
    let took = t0.elapsed();
    assert!(f.msg.contains("no frame from the peer for 1s"), "{}", f.msg);
    assert!(took < Duration::from_secs(5), "dropped after {took:?}, not at the deadline");
    // The disk is free again.
    let (mut a3, srv3) = spawn_server(&sinks, cfg);
    assert!(matches!(raw_open(&mut a3, 2, "vm"), Msg::OpenAck { .. }));
    drop(a3);
    srv3.join().unwrap().unwrap();
    drop(a);
    trickler.join().unwrap();
}

#[test]
fn pings_keep_an_idle_client_past_the_servers_idle_deadline() {
    let sinks = Arc::new(MemSinks::default());
    let (a, srv) = spawn_server(&sinks, ServerConfig { idle: Duration::from_secs(1), ..server_cfg() });
    let cfg = ClientConfig { ping_every: Duration::from_millis(200), peer_timeout: Duration::from_secs(5), ..client_cfg() };
    let mut c = Client::open(a, cfg, "vm", SIZE, [1; 16]).unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2500) {
        c.check_alive().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    c.send(&Msg::Tag { seq: 1, time_ns: 0, kind: PointKind::Crash }).unwrap();
    assert_eq!(c.wait_point(1).unwrap(), 1);
    c.close();
    srv.join().unwrap().unwrap();
}

#[test]
fn a_bad_frame_is_refused_after_applying_what_came_before() {
    let sinks = Arc::new(MemSinks::default());
    let (mut a, srv) = spawn_server(&sinks, server_cfg());
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(matches!(raw_open(&mut a, 2, "vm"), Msg::OpenAck { .. }));
    let mut b = Vec::new();
    data(1, 0, 5, 4096).encode(&mut b);
    data(2, SIZE - 512, 5, 4096).encode(&mut b);
    a.write_all(&b).unwrap();
    let mut acked = 0;
    loop {
        match read_frame(&mut a).unwrap() {
            Some(Msg::Ack { durable_seq }) => acked = durable_seq,
            Some(Msg::Error { code, msg }) => {
                assert_eq!(code, ErrorCode::OutOfRange, "{msg}");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(acked, 1, "the valid frame before the bad one is applied and acknowledged");
    let mut rest = Vec::new();
    let _ = a.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the connection is closed after ERROR");
    assert_eq!(srv.join().unwrap().unwrap_err().code, ErrorCode::OutOfRange);
    assert_eq!(sinks.disks.lock().unwrap()["vm"].lock().unwrap().bytes[..4096], [5; 4096]);
}

/// Holds each connection until its peer closes; says "busy" past the limit.
struct Hold {
    served: AtomicU64,
    deadline_seen: Mutex<Option<Duration>>,
}

impl Service for Hold {
    fn serve(&self, mut conn: TcpStream) {
        *self.deadline_seen.lock().unwrap() = conn.read_timeout().unwrap();
        self.served.fetch_add(1, Ordering::SeqCst);
        let mut b = [0u8; 16];
        let _ = conn.write_all(b"hi");
        let _ = conn.set_read_timeout(None);
        while matches!(conn.read(&mut b), Ok(n) if n > 0) {}
    }
    fn busy(&self, conn: &mut TcpStream) {
        let _ = conn.write_all(b"busy");
    }
}

#[test]
fn the_accept_loop_limits_connections_and_sets_the_handshake_deadline() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let hold = Arc::new(Hold { served: AtomicU64::new(0), deadline_seen: Mutex::new(None) });
    let limits = Limits { max_connections: 2, handshake: Duration::from_secs(7), write: Duration::from_secs(9) };
    let h2 = Arc::clone(&hold);
    std::thread::spawn(move || accept::serve(l, limits, h2));
    let greet = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
        b
    };
    let first = |s: &mut TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        b
    };
    let mut c1 = TcpStream::connect(addr).unwrap();
    let mut c2 = TcpStream::connect(addr).unwrap();
    assert_eq!(&first(&mut c1), b"hi");
    assert_eq!(&first(&mut c2), b"hi");
    let mut c3 = TcpStream::connect(addr).unwrap();
    assert_eq!(greet(&mut c3), b"busy", "past the limit a connection is refused at once");
    assert_eq!(*hold.deadline_seen.lock().unwrap(), Some(Duration::from_secs(7)));
    // A slot freed is served again.
    drop(c1);
    let t0 = Instant::now();
    loop {
        let mut c4 = TcpStream::connect(addr).unwrap();
        let mut b = [0u8; 2];
        c4.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c4.read_exact(&mut b).unwrap();
        if &b == b"hi" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the closed connection's slot was never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(hold.served.load(Ordering::SeqCst), 3);
    drop(c2);
}

/// A sink that learns of its points late (as a spool does from the next
/// hop): `apply` reports none, `late_points` hands them out 300 ms later.
struct LateSinks(MemSinks);

struct LateSink {
    inner: MemSink,
    held: Vec<((u64, u64), Instant)>,
}

impl Sinks for LateSinks {
    type Sink = LateSink;
    fn open(
        &self,
        peer: &str,
        _who: Option<&ferry_identity::Identity>,
        name: &str,
        size: u64,
        generation: [u8; 16],
    ) -> Result<(LateSink, OpenInfo), Fail> {
        let (inner, info) = self.0.open(peer, None, name, size, generation)?;
        Ok((LateSink { inner, held: Vec::new() }, info))
    }
}

impl Sink for LateSink {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn durable_seq(&self) -> u64 {
        self.inner.durable_seq()
    }
    fn apply(&mut self, ops: Vec<Op>) -> Result<Vec<(u64, u64)>, Fail> {
        let now = Instant::now();
        self.held.extend(self.inner.apply(ops)?.into_iter().map(|p| (p, now)));
        Ok(Vec::new())
    }
    fn resolve_ref(&mut self, src: u64, len: u32, digest: &[u8; 32]) -> Result<Option<Vec<u8>>, Fail> {
        self.inner.resolve_ref(src, len, digest)
    }
    fn sums(&mut self, offset: u64, chunk: u32, count: u32) -> Result<Vec<[u8; 16]>, Fail> {
        self.inner.sums(offset, chunk, count)
    }
    fn tick(&self) -> Option<Duration> {
        Some(Duration::from_millis(20))
    }
    fn late_points(&mut self) -> Result<Vec<(u64, u64)>, Fail> {
        let (ready, wait): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(_, t)| t.elapsed() >= Duration::from_millis(300));
        self.held = wait;
        Ok(ready.into_iter().map(|(p, _)| p).collect())
    }
}

#[test]
fn a_point_a_sink_learns_late_reaches_the_waiting_client() {
    let sinks = Arc::new(LateSinks(MemSinks::default()));
    let (a, b) = UnixStream::pair().unwrap();
    let s2 = Arc::clone(&sinks);
    let cfg = ServerConfig { idle: Duration::from_secs(2), ..server_cfg() };
    let srv = std::thread::spawn(move || server::serve(b, &*s2, &cfg));
    // No pings (v1): nothing but the late point can wake the server.
    let mut c = Client::open(a, ClientConfig { versions: (1, 1), ..client_cfg() }, "vm", SIZE, [1; 16]).unwrap();
    c.send(&Msg::Tag { seq: 1, time_ns: 0, kind: PointKind::Crash }).unwrap();
    c.wait_acked(1).unwrap();
    let t0 = Instant::now();
    assert_eq!(c.wait_point(1).unwrap(), 1);
    assert!(t0.elapsed() < Duration::from_secs(5), "the late point took {:?}", t0.elapsed());
    c.close();
    srv.join().unwrap().unwrap();
}

#[test]
fn a_ticking_server_keeps_the_idle_deadline() {
    let sinks = Arc::new(LateSinks(MemSinks::default()));
    let (mut a, b) = UnixStream::pair().unwrap();
    let s2 = Arc::clone(&sinks);
    let cfg = ServerConfig { idle: Duration::from_secs(1), ..server_cfg() };
    let srv = std::thread::spawn(move || server::serve(b, &*s2, &cfg));
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(matches!(raw_open(&mut a, 2, "vm"), Msg::OpenAck { .. }));
    let t0 = Instant::now();
    let f = srv.join().unwrap().unwrap_err();
    assert!(f.msg.contains("no frame from the peer for 1s"), "{}", f.msg);
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// Two identities of one CA (a master target and an agent) in `d`.
fn identities(d: &std::path::Path) -> (ferry_identity::ca::Ca, ferry_identity::enroll::Held, ferry_identity::enroll::Held) {
    use ferry_identity::{ca::Ca, enroll::Held, Role};
    let ca = Ca::init(&d.join("ca")).unwrap();
    let ttl = ferry_identity::ca::DEFAULT_CERT_TTL;
    ca.issue_to(&d.join("mt"), "mt1", Role::MasterTarget, ttl, &[]).unwrap();
    ca.issue_to(&d.join("ag"), "db1", Role::Agent, ttl, &[]).unwrap();
    (ca, Held::load(&d.join("mt")).unwrap(), Held::load(&d.join("ag")).unwrap())
}

/// A real server over TLS on loopback: accepts one connection.
fn spawn_tls_server(
    sinks: &Arc<MemSinks>,
    held: &ferry_identity::enroll::Held,
    watch: Option<Arc<crate::Watch>>,
) -> (std::net::SocketAddr, std::thread::JoinHandle<Result<String, String>>) {
    use ferry_identity::{tls, Role};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let config = tls::server_config(held.creds.clone(), tls::PeerVerifier::new(held.trust.clone(), &[Role::Agent], true)).unwrap();
    let sinks = Arc::clone(sinks);
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = crate::TlsStream::accept(s, config).map_err(|e| e.to_string())?;
        if let Some(w) = watch {
            w.add(&t);
        }
        let who = crate::Stream::peer(&t);
        server::serve(t, &*sinks, &server_cfg()).map_err(|f| f.msg)?;
        Ok(who)
    });
    (addr, h)
}

fn tls_client(addr: std::net::SocketAddr, held: &ferry_identity::enroll::Held) -> std::io::Result<crate::TlsStream> {
    use ferry_identity::{tls, Role};
    let config =
        tls::client_config(Some(held.creds.clone()), tls::PeerVerifier::new(held.trust.clone(), &[Role::MasterTarget], true)).unwrap();
    crate::TlsStream::connect(TcpStream::connect(addr)?, config, Duration::from_secs(10))
}

#[test]
fn a_stream_over_mutual_tls_arrives_whole_and_names_its_peer() {
    let d = tempfile::tempdir().unwrap();
    let (_ca, mt, ag) = identities(d.path());
    let sinks = Arc::new(MemSinks::default());
    let (addr, srv) = spawn_tls_server(&sinks, &mt, None);
    let t = tls_client(addr, &ag).unwrap();
    assert_eq!(t.identity().map(|i| i.label()), Some("master-target/mt1".into()));
    let mut c = Client::open(t, client_cfg(), "vm", SIZE, [4; 16]).unwrap();
    // 1 MiB in 64 KiB frames of distinct bytes, a point, and sums read back.
    for i in 0..16u64 {
        c.send(&data(i + 1, i * 65536, i as u8 + 1, 65536)).unwrap();
    }
    c.send(&Msg::Tag { seq: 17, time_ns: 1, kind: PointKind::Crash }).unwrap();
    assert_eq!(c.wait_point(17).unwrap(), 1);
    let req = c.request_sums(0, 65536, 16).unwrap();
    let sums = c.recv_sums(req, 0, 16).unwrap();
    for (i, s) in sums.iter().enumerate() {
        assert_eq!(*s, xxhash_rust::xxh3::xxh3_128(&[i as u8 + 1; 65536]).to_le_bytes());
    }
    c.close();
    let who = srv.join().unwrap().unwrap();
    assert!(who.starts_with("agent/db1 ("), "{who}");
}

#[test]
fn a_revoked_peer_is_cut_mid_stream_and_refused_after() {
    let d = tempfile::tempdir().unwrap();
    let (ca, mt, ag) = identities(d.path());
    let sinks = Arc::new(MemSinks::default());
    let watch = crate::Watch::start(mt.trust.clone());
    let (addr, srv) = spawn_tls_server(&sinks, &mt, Some(watch.clone()));
    let mut c = Client::open(tls_client(addr, &ag).unwrap(), client_cfg(), "vm", SIZE, [4; 16]).unwrap();
    c.send(&data(1, 0, 1, 4096)).unwrap();
    c.wait_acked(1).unwrap();
    // Revoked at the CA; the master target's trust takes the new list.
    ca.revoke("agent/db1").unwrap();
    std::fs::copy(d.path().join("ca/crl.pem"), d.path().join("mt/crl.pem")).unwrap();
    mt.maintain();
    let t0 = Instant::now();
    let mut seq = 2;
    let cut = loop {
        if let Err(e) = c.send(&data(seq, 0, 2, 4096)).and_then(|_| c.wait_acked(seq)) {
            break e;
        }
        seq += 1;
        assert!(t0.elapsed() < Duration::from_secs(10), "the stream was not cut");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(matches!(cut, LinkError::Lost { .. }), "{cut}");
    let _ = srv.join().unwrap();
    // A new connection is refused at the handshake.
    let (addr, srv) = spawn_tls_server(&sinks, &mt, None);
    let r = tls_client(addr, &ag)
        .and_then(|t| Client::open(t, client_cfg(), "vm", SIZE, [4; 16]).map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
    assert!(r.is_err());
    assert!(srv.join().unwrap().unwrap_err().contains("revoked"));
}
