//! Any bytes read back from a log segment: `decode_one` must not panic, and a record it accepts
//! is exactly what `encode_into` writes for it (the format has one encoding per record, so
//! recovery, the index and the writer agree on every byte).
#![no_main]

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;
use switchboard_storage::decode_one;

thread_local! {
    static BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fuzz_target!(|data: &[u8]| {
    let Ok(Some((record, n))) = decode_one(data) else {
        return;
    };
    assert!(
        n <= data.len(),
        "record of {n} bytes in {} bytes",
        data.len()
    );
    assert_eq!(record.encoded_len(), n, "encoded_len of {record:?}");
    assert_eq!(
        record.validate(),
        Ok(()),
        "decoded an invalid record {record:?}"
    );
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        record.encode_into(buf);
        assert!(
            buf[..] == data[..n],
            "re-encoding {record:?} gives {buf:02x?}, read {:02x?}",
            &data[..n]
        );
    });
});
