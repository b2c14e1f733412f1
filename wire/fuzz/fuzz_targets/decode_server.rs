//! Any bytes from a server: `decode_server` must not panic, and whatever it accepts must survive
//! encode → decode unchanged (decoding normalises, and normalising twice changes nothing).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use switchboard_wire::{decode_server, Encoder};

thread_local! {
    static ENCODER: RefCell<Encoder> = RefCell::new(Encoder::new());
}

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode_server(data) else {
        return;
    };
    ENCODER.with_borrow_mut(|enc| {
        let bytes = enc.encode_server(&frame);
        assert_eq!(
            decode_server(bytes).as_ref(),
            Ok(&frame),
            "round trip of {data:02x?}"
        );
    });
});
