//! Any bytes from the server under test where a WebSocket frame is expected (`worker::on_bytes`,
//! `IdleConn::sweep`): `parse_frame_limit` must not panic; a complete frame must lie inside the
//! buffer with its payload within the limit; and the answer must not depend on how much of the
//! stream has arrived: a prefix shorter than the frame is incomplete, a longer one gives the same
//! frame, and an error, once a prefix shows it, stays the same error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_loadgen::ws_raw::parse_frame_limit;
use switchboard_wire::limits::SERVER_FRAME_BYTES_MAX;

fuzz_target!(|data: &[u8]| {
    let Some((&l, data)) = data.split_first() else {
        return;
    };
    // Small limits too, so short inputs reach the limit check.
    let limit = match l % 4 {
        0 => 0,
        1 => 125,
        2 => 65_536,
        _ => SERVER_FRAME_BYTES_MAX,
    };
    let whole = parse_frame_limit(data, limit);
    match &whole {
        Ok(Some(f)) => {
            assert!(f.len <= data.len());
            assert!(f.payload.start <= f.payload.end);
            assert_eq!(f.payload.end, f.len);
            assert!(f.payload.len() <= limit);
            assert!(f.opcode <= 0x0f);
            for k in 0..f.len {
                assert_eq!(parse_frame_limit(&data[..k], limit), Ok(None), "prefix {k}");
            }
            for k in f.len..=data.len() {
                assert_eq!(parse_frame_limit(&data[..k], limit), whole, "prefix {k}");
            }
        }
        Ok(None) => {
            for k in 0..data.len() {
                assert_eq!(parse_frame_limit(&data[..k], limit), Ok(None), "prefix {k}");
            }
        }
        Err(_) => {
            let mut failed = false;
            for k in 0..=data.len() {
                let p = parse_frame_limit(&data[..k], limit);
                if failed {
                    assert_eq!(p, whole, "prefix {k}");
                } else {
                    assert!(p == Ok(None) || p == whole, "prefix {k}: {p:?}");
                    failed = p.is_err();
                }
            }
            assert!(failed);
        }
    }
});
