//! Fuzz the wire decoder: arbitrary bytes, and arbitrary bodies behind a
//! valid header and checksum (so the body validation is reached), must never
//! panic, and whatever decodes must re-encode to the same frame.
#![no_main]

use ferry_proto::{decode_frame, Msg, MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((m, used)) = decode_frame(data) {
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(&again[..], &data[..used]);
    }
    if let Some((&t, body)) = data.split_first() {
        let mut f = MAGIC.to_le_bytes().to_vec();
        f.extend_from_slice(&[t, 0, 0, 0]);
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(body);
        let s = xxh(&f);
        f.extend_from_slice(&s);
        if let Ok((m, _)) = decode_frame(&f) {
            let _: Msg = m;
        }
    }
});

fn xxh(b: &[u8]) -> [u8; 16] {
    ferry_proto::frame_checksum(b)
}
