//! Any bytes from a client, split anywhere: `http1::Conn` must not panic, must report the same
//! events however the bytes are split, and must respect its limits. The first byte picks the
//! split size and whether bodies are streamed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_api::http1::{BodyMode, Conn, Event, Limits};

const STREAM_BYTES_MAX: u64 = 1024;

fn run(input: &[u8], step: usize, stream: bool, limits: Limits) -> Vec<Result<Event, u16>> {
    let mut conn = Conn::new(limits);
    let mut events = Vec::new();
    let pieces: Vec<&[u8]> = input.chunks(step).collect();
    let count = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        conn.feed(piece);
        if i + 1 == count {
            conn.feed_eof();
        }
        loop {
            match conn.poll() {
                Ok(None) => break,
                Ok(Some(ev)) => {
                    match &ev {
                        Event::Head(h) => {
                            assert!(h.target.len() <= limits.request_target_bytes_max);
                            if stream {
                                conn.set_body_mode(BodyMode::Stream {
                                    bytes_max: STREAM_BYTES_MAX,
                                });
                            }
                        }
                        Event::BodyEnd { body } => {
                            assert!(body.len() <= limits.request_body_bytes_max)
                        }
                        _ => {}
                    }
                    // Merge stream chunks so the comparison does not depend on the split.
                    if let (Event::BodyChunk(c), Some(Ok(Event::BodyChunk(prev)))) =
                        (&ev, events.last_mut())
                    {
                        prev.extend_from_slice(c);
                        continue;
                    }
                    events.push(Ok(ev));
                }
                Err(e) => {
                    assert!(conn.is_closed());
                    events.push(Err(e.status()));
                    return events;
                }
            }
        }
    }
    events
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, input)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        request_head_bytes_max: 2048,
        request_target_bytes_max: 512,
        request_body_bytes_max: 4096,
        ..Limits::default()
    };
    let stream = control & 0x80 != 0;
    let step = usize::from(control & 0x7f).max(1);
    let whole = run(input, input.len().max(1), stream, limits);
    let split = run(input, step, stream, limits);
    assert_eq!(whole, split, "split at {step}");
});
