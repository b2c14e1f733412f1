//! Any bytes as the server's answer to the WebSocket upgrade (`worker::read_upgrade`, `idle`):
//! `check_upgrade_response` must not panic, and accepts only a complete 101 head that carries the
//! accept key of the request's key. Half the inputs are raw bytes; the other half build a
//! well-formed head from the input (status, extra headers, right or wrong accept key), so the
//! accepting path is exercised too and its verdict is known exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_loadgen::ws_raw::{
    accept_key, check_upgrade_response, sec_websocket_key, OpenError,
};

fuzz_target!(|data: &[u8]| {
    let Some((&seed, rest)) = data.split_first() else {
        return;
    };
    let key = sec_websocket_key(u64::from(seed));
    let accept = accept_key(&key);
    if seed & 1 == 0 {
        if check_upgrade_response(rest, &key).is_ok() {
            assert!(rest.windows(accept.len()).any(|w| w == accept.as_bytes()));
            assert!(rest.windows(3).any(|w| w == b"101"));
        }
        return;
    }
    // Built: byte 0 picks the status, byte 1 whether the accept key is right, the rest become up
    // to 12 extra header lines of letters and digits.
    let [s, a, extra @ ..] = rest else {
        return;
    };
    let status: u16 = if s % 4 == 0 { 401 + u16::from(*s % 100) } else { 101 };
    let right = a % 4 != 0;
    let mut head = format!("HTTP/1.1 {status} X\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n");
    for (i, chunk) in extra.chunks(8).take(12).enumerate() {
        let value: String = chunk
            .iter()
            .map(|b| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[usize::from(*b) % 36]))
            .collect();
        head.push_str(&format!("X-F{i}: {value}\r\n"));
    }
    let sent = if right { accept.clone() } else { format!("{accept}x") };
    head.push_str(&format!("Sec-WebSocket-Accept: {sent}\r\n\r\n"));
    match check_upgrade_response(head.as_bytes(), &key) {
        Ok(()) => assert!(status == 101 && right, "{head}"),
        Err(OpenError::Status(got)) => assert_eq!(got, status),
        Err(OpenError::BadResponse(_)) => assert!(status == 101 && !right, "{head}"),
        Err(e) => panic!("unexpected {e:?} for {head}"),
    }
    // A head cut anywhere before its end is never accepted.
    let bytes = head.as_bytes();
    let cut = usize::from(*s) % bytes.len();
    assert!(check_upgrade_response(&bytes[..cut], &key).is_err());
});
