//! Any bytes from a client before the upgrade: `parse_request` must not panic, a complete head
//! must fit in the input and in `REQUEST_HEAD_BYTES_MAX`, and the answer must not depend on how
//! the bytes were split across reads (the connection task re-parses its growing buffer after
//! every read and answers the first error at once).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::http::{parse_request, REQUEST_HEAD_BYTES_MAX};

fuzz_target!(|data: &[u8]| {
    let whole = parse_request(data);
    if let Ok(Some((_, len))) = &whole {
        let len = *len;
        assert!(
            len <= data.len(),
            "head of {len} bytes in {} bytes",
            data.len()
        );
        assert!(
            len <= REQUEST_HEAD_BYTES_MAX,
            "head of {len} bytes accepted"
        );
    }
    // The same bytes in two reads: `data[..split]`, then all of `data`.
    let mut splits = [0usize; 3];
    if let [a, b, ..] = data {
        splits[0] = usize::from(u16::from_le_bytes([*a, *b])) % (data.len() + 1);
    }
    splits[1] = data.len() / 2;
    splits[2] = match &whole {
        Ok(Some((_, len))) => len.saturating_sub(1),
        _ => data.len().saturating_sub(1),
    };
    for split in splits {
        let prefix = &data[..split];
        let first = parse_request(prefix);
        match &first {
            // A complete head in the prefix is the head of the whole input too.
            Ok(Some((_, len))) => {
                assert!(*len <= split, "head of {len} bytes in {split} bytes");
                assert_eq!(first, whole, "prefix of {split} bytes of {data:02x?}");
            }
            // Still reading: the whole input may be anything.
            Ok(None) => {}
            // The connection answers this error and closes: a valid head must not get here
            // merely because it arrived in two pieces.
            Err(e) => assert!(
                !matches!(&whole, Ok(Some(_))),
                "prefix of {split} bytes rejected ({e:?}) but the whole is {whole:?}: {data:02x?}"
            ),
        }
        // Once the head is complete, the bytes after it change nothing.
        if let Ok(Some((_, len))) = &whole {
            if split >= *len {
                assert_eq!(first, whole, "prefix of {split} bytes of {data:02x?}");
            }
        }
    }
});
