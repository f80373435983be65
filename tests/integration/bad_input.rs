//! Bad input never corrupts: each malformed stream gets a clear ERROR and a
//! closed connection, the master target keeps serving, and the replica,
//! journal and catalog are untouched.

use ferry_proto::{read_frame, write_msg, ErrorCode, Msg, MAGIC, VERSION_MAX};
use ferry_tests::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

struct Client {
    s: TcpStream,
}

impl Client {
    fn connect(addr: &str) -> Client {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client { s }
    }
    fn send(&mut self, m: &Msg) {
        write_msg(&mut self.s, m).unwrap();
    }
    fn raw(&mut self, b: &[u8]) {
        // The peer may close before reading everything; that is fine.
        let _ = self.s.write_all(b);
    }
    fn recv(&mut self) -> Option<Msg> {
        read_frame(&mut self.s).unwrap_or(None)
    }
    fn hello(addr: &str) -> Client {
        let mut c = Client::connect(addr);
        c.send(&Msg::Hello { min: 1, max: VERSION_MAX, peer: "test".into() });
        assert!(matches!(c.recv(), Some(Msg::HelloAck { version: VERSION_MAX, .. })));
        c
    }
    fn open(addr: &str, name: &str, size: u64) -> (Client, u64) {
        // A stream just closed by the previous case may still hold the disk
        // for a moment: busy is retried, anything else is a failure.
        for _ in 0..100 {
            let mut c = Client::hello(addr);
            c.send(&Msg::Open { name: name.into(), size, generation: [1; 16] });
            match c.recv() {
                Some(Msg::OpenAck { durable_seq, .. }) => return (c, durable_seq),
                Some(Msg::Error { code: ErrorCode::Busy, .. }) => std::thread::sleep(Duration::from_millis(20)),
                other => panic!("open failed: {other:?}"),
            }
        }
        panic!("disk {name} stayed busy");
    }
    /// Expect an ERROR with `code`, then the connection closed.
    fn expect_error(&mut self, code: ErrorCode, needle: &str) {
        loop {
            match self.recv() {
                Some(Msg::Ack { .. }) | Some(Msg::Point { .. }) => continue,
                Some(Msg::Error { code: c, msg }) => {
                    assert_eq!(c, code, "{msg}");
                    assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
                    break;
                }
                other => panic!("expected ERROR {code:?}, got {other:?}"),
            }
        }
        assert!(self.recv().is_none(), "connection stays open after an ERROR");
    }
}

fn folder_digest(dir: &Path) -> Vec<(String, u128)> {
    ["replica.img", "journal.fj", "points.log", "disk.meta"].iter().map(|f| (f.to_string(), file_digest(&dir.join(f)))).collect()
}

#[test]
fn every_bad_input_is_refused_and_changes_nothing() {
    let t = TempDir::new("bad");
    let img = t.path("good.img");
    mixed_image(&img, 8 << 20, 21);
    let mut mt = MasterTarget::start(&t.path("data"));
    scan_once(&t.s("good.img"), "good", &mt.addr, &t.s("st"));
    let dir = t.path("data").join("good");
    let before = folder_digest(&dir);
    let size = 8u64 << 20;

    // Unknown protocol version.
    let mut c = Client::connect(&mt.addr);
    c.send(&Msg::Hello { min: 7, max: 9, peer: "future".into() });
    c.expect_error(ErrorCode::UnsupportedVersion, "upgrade");

    // Wrong magic (not a ferry peer).
    let mut c = Client::connect(&mt.addr);
    c.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_error(ErrorCode::BadFrame, "magic");

    // Oversize frame: a length far past the limit, rejected before reading.
    let (mut c, _) = Client::open(&mt.addr, "good", size);
    let mut h = MAGIC.to_le_bytes().to_vec();
    h.extend_from_slice(&[0x10, 0, 0, 0]);
    h.extend_from_slice(&(1u32 << 30).to_le_bytes());
    c.raw(&h);
    c.expect_error(ErrorCode::BadFrame, "exceeds");

    // Checksum mismatch: a valid DATA frame with one payload bit flipped.
    let (mut c, d) = Client::open(&mt.addr, "good", size);
    let mut f = Vec::new();
    Msg::Data { seq: d + 1, offset: 0, len: 4096, codec: ferry_proto::Codec::Raw, payload: vec![0x55; 4096] }.encode(&mut f);
    f[100] ^= 4;
    c.raw(&f);
    c.expect_error(ErrorCode::Checksum, "checksum");

    // An extent past the end of the disk.
    let (mut c, d) = Client::open(&mt.addr, "good", size);
    c.send(&Msg::Data { seq: d + 1, offset: size - 4096, len: 8192, codec: ferry_proto::Codec::Raw, payload: vec![0x55; 8192] });
    c.expect_error(ErrorCode::OutOfRange, "past the end");
    let (mut c, d) = Client::open(&mt.addr, "good", size);
    c.send(&Msg::Zero { seq: d + 1, offset: size, len: 512 });
    c.expect_error(ErrorCode::OutOfRange, "past the end");

    // A disk whose size changed.
    let mut c = Client::hello(&mt.addr);
    c.send(&Msg::Open { name: "good".into(), size: size * 2, generation: [1; 16] });
    c.expect_error(ErrorCode::SizeChanged, "bytes");

    // A malformed body (zstd payload that does not decode to the length).
    let (mut c, d) = Client::open(&mt.addr, "good", size);
    c.send(&Msg::Data { seq: d + 1, offset: 0, len: 4096, codec: ferry_proto::Codec::Zstd, payload: b"garbage".to_vec() });
    c.expect_error(ErrorCode::BadFrame, "zstd");

    // Sequence numbers must move forward.
    let (mut c, d) = Client::open(&mt.addr, "good", size);
    c.send(&Msg::Tag { seq: d, time_ns: 0, kind: ferry_proto::PointKind::Crash });
    c.expect_error(ErrorCode::BadSequence, "does not follow");

    // A second stream for a disk that is open is refused as busy.
    let (_holder, _) = Client::open(&mt.addr, "good", size);
    let mut c = Client::hello(&mt.addr);
    c.send(&Msg::Open { name: "good".into(), size, generation: [1; 16] });
    c.expect_error(ErrorCode::Busy, "another stream");
    drop(_holder);

    // A REF to content the master target does not hold.
    let (mut c, d) = Client::open(&mt.addr, "good", size);
    c.send(&Msg::Ref { seq: d + 1, offset: 0, len: 4096, src: 8192, digest: [3; 32] });
    c.expect_error(ErrorCode::RefMiss, "resend");

    // OPEN with a name that would escape the data folder.
    let mut c = Client::hello(&mt.addr);
    let mut f = Vec::new();
    Msg::Open { name: "ok".into(), size, generation: [1; 16] }.encode(&mut f);
    // Re-encode by hand with a hostile name (the encoder has no validation).
    let mut body = size.to_le_bytes().to_vec();
    body.extend_from_slice(&[1; 16]);
    body.extend_from_slice(&5u16.to_le_bytes());
    body.extend_from_slice(b"../xx");
    let mut fr = MAGIC.to_le_bytes().to_vec();
    fr.extend_from_slice(&[0x03, 0, 0, 0]);
    fr.extend_from_slice(&(body.len() as u32).to_le_bytes());
    fr.extend_from_slice(&body);
    let s = xxhash_rust::xxh3::xxh3_128(&fr).to_le_bytes();
    fr.extend_from_slice(&s);
    c.raw(&fr);
    c.expect_error(ErrorCode::BadFrame, "disk name");
    assert!(!t.path("xx").exists());

    assert!(mt.proc.alive(), "the master target survives bad input");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(folder_digest(&dir), before, "bad input changed the disk folder");
    let log = mt.log();
    assert!(log.contains("past the end") && log.contains("checksum"), "the master target logs what it refused:\n{log}");

    // And it keeps serving: the same disk and another one replicate.
    mixed_image(&t.path("other.img"), 4 << 20, 22);
    scan_once(&t.s("other.img"), "other", &mt.addr, &t.s("st2"));
    recover_to(&t.s("data"), "other", "latest", &t.s("o.img"));
    assert_same(&t.path("other.img"), &t.path("o.img"));
    change_blocks(&img, 0.05, 23);
    scan_once(&t.s("good.img"), "good", &mt.addr, &t.s("st"));
    recover_to(&t.s("data"), "good", "latest", &t.s("g.img"));
    assert_same(&img, &t.path("g.img"));
}

#[test]
fn listening_outside_loopback_is_refused() {
    let t = TempDir::new("listen");
    let o = run(&["master-target", "--listen", "0.0.0.0:0", "--data", &t.s("d")]);
    assert_eq!(o.status.code(), Some(2), "a listening address is checked as usage");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("needs authentication"), "{err}");
}
