//! Any bytes as a chat event (a `Message` payload, or a record replayed from the log):
//! `decode_event` must not panic, and whatever it accepts must survive encode → decode unchanged
//! (events are not normalised, so this is an exact round trip).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use switchboard_wire::{decode_event, encode_event, Encoder};

thread_local! {
    static ENCODER: RefCell<Encoder> = RefCell::new(Encoder::new());
}

fuzz_target!(|data: &[u8]| {
    let Ok(event) = decode_event(data) else {
        return;
    };
    ENCODER.with_borrow_mut(|enc| {
        let bytes = enc.encode_event(&event);
        assert_eq!(
            decode_event(bytes).as_ref(),
            Ok(&event),
            "round trip of {data:02x?}"
        );
        // The free function builds the same buffer with a fresh builder.
        assert_eq!(encode_event(&event), bytes, "encode_event differs from Encoder");
    });
});
