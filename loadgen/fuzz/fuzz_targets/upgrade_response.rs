//! Any bytes as the server's answer to the WebSocket upgrade (`worker::read_upgrade`, `idle`):
//! `check_upgrade_response` must not panic, and accepts only a complete 101 head that carries the
//! accept key of the request's key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_loadgen::ws_raw::{accept_key, check_upgrade_response, sec_websocket_key};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, head)) = data.split_first() else {
        return;
    };
    let key = sec_websocket_key(u64::from(seed));
    if check_upgrade_response(head, &key).is_ok() {
        let accept = accept_key(&key);
        assert!(head.windows(accept.len()).any(|w| w == accept.as_bytes()));
        assert!(head.windows(3).any(|w| w == b"101"));
    }
});

