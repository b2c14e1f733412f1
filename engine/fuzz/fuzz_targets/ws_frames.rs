//! Any bytes from a client after the upgrade: `WsReader::feed` must not panic, must give the
//! same events and error however the bytes are split across reads, must never hand out a
//! message longer than the limit, and must keep at most one frame plus one read of input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::ws::{WsEvent, WsReader, FRAME_HEADER_BYTES_MAX};

const MAX: usize = 4096;

fn run(data: &[u8], split: usize) -> (Vec<WsEvent>, Result<(), switchboard::ws::WsError>) {
    let mut r = WsReader::new();
    let mut out = Vec::new();
    let mut res = Ok(());
    for chunk in data.chunks(split.max(1)) {
        let mut chunk = chunk.to_vec();
        res = r.feed(&mut chunk, MAX, &mut out);
        assert!(r.buffered_bytes() <= (2 * (FRAME_HEADER_BYTES_MAX + MAX)).saturating_add(split));
        if res.is_err() {
            break;
        }
    }
    (out, res)
}

fuzz_target!(|data: &[u8]| {
    let Some((&s, data)) = data.split_first() else {
        return;
    };
    let whole = run(data, usize::MAX);
    for e in &whole.0 {
        if let WsEvent::Message { payload, .. } = e {
            assert!(payload.len() <= MAX);
        }
        if let WsEvent::Ping(p) = e {
            assert!(p.len() <= 125);
        }
    }
    assert_eq!(run(data, 1 + s as usize % 32), whole);
});
