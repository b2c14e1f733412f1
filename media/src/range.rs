//! `Range` request math (RFC 9110 §14): one byte range per request.
//!
//! A syntactically invalid `Range`, a non-`bytes` unit or several ranges are ignored and the
//! whole object is served with `200` (the RFC lets a server ignore `Range`); a valid range that
//! does not overlap the object is `416` with `Content-Range: bytes */len`.

/// What to serve for a `GET` of an object of `len` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeOutcome {
    /// `200`, the whole object.
    Full,
    /// `206`, bytes `start..start + len` (never empty).
    Partial { start: u64, len: u64 },
    /// `416`.
    Unsatisfiable,
}

/// Longest `Range` header value considered; longer is ignored (a single range fits easily).
pub const RANGE_HEADER_BYTES_MAX: usize = 128;

fn decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // More than u64 digits: treat as "very large", which is beyond any object.
    Some(s.parse().unwrap_or(u64::MAX))
}

/// Decides what to serve given the request's `Range` header (if any) for an object of `len`
/// bytes.
pub fn parse(header: Option<&str>, len: u64) -> RangeOutcome {
    let Some(h) = header else {
        return RangeOutcome::Full;
    };
    if h.len() > RANGE_HEADER_BYTES_MAX {
        return RangeOutcome::Full;
    }
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return RangeOutcome::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeOutcome::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeOutcome::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => {
            let Some(n) = decimal(last) else {
                return RangeOutcome::Full;
            };
            if n == 0 || len == 0 {
                return RangeOutcome::Unsatisfiable;
            }
            let n = n.min(len);
            RangeOutcome::Partial {
                start: len - n,
                len: n,
            }
        }
        // bytes=A- or bytes=A-B.
        (false, _) => {
            let Some(start) = decimal(first) else {
                return RangeOutcome::Full;
            };
            let end_incl = if last.is_empty() {
                u64::MAX
            } else {
                match decimal(last) {
                    Some(e) if e >= start => e,
                    _ => return RangeOutcome::Full,
                }
            };
            if start >= len {
                return RangeOutcome::Unsatisfiable;
            }
            let end_incl = end_incl.min(len - 1);
            RangeOutcome::Partial {
                start,
                len: end_incl - start + 1,
            }
        }
        (true, true) => RangeOutcome::Full,
    }
}

/// `Content-Range` of a `206`.
pub fn content_range(start: u64, len: u64, total: u64) -> String {
    debug_assert!(len > 0 && start + len <= total);
    format!("bytes {start}-{}/{total}", start + len - 1)
}

/// `Content-Range` of a `416`.
pub fn unsatisfied_range(total: u64) -> String {
    format!("bytes */{total}")
}

#[cfg(test)]
mod tests {
    use super::RangeOutcome::*;
    use super::*;

    #[test]
    fn table() {
        let p = |start, len| Partial { start, len };
        let cases: &[(Option<&str>, u64, RangeOutcome)] = &[
            (None, 10, Full),
            (Some("bytes=0-0"), 10, p(0, 1)),
            (Some("bytes=0-9"), 10, p(0, 10)),
            (Some("bytes=2-5"), 10, p(2, 4)),
            (Some("bytes=2-500"), 10, p(2, 8)),
            (Some("bytes=9-"), 10, p(9, 1)),
            (Some("bytes=-3"), 10, p(7, 3)),
            (Some("bytes=-30"), 10, p(0, 10)),
            (Some(" bytes=1-2 "), 10, p(1, 2)),
            (Some("bytes=99999999999999999999999-"), 10, Unsatisfiable),
            (Some("bytes=10-"), 10, Unsatisfiable),
            (Some("bytes=10-20"), 10, Unsatisfiable),
            (Some("bytes=-0"), 10, Unsatisfiable),
            (Some("bytes=0-"), 0, Unsatisfiable),
            // Ignored: served whole.
            (Some("bytes=5-2"), 10, Full),
            (Some("bytes=0-1,3-4"), 10, Full),
            (Some("items=0-1"), 10, Full),
            (Some("bytes=a-1"), 10, Full),
            (Some("bytes=-"), 10, Full),
            (Some("bytes=1"), 10, Full),
            (Some("bytes=+1-2"), 10, Full),
        ];
        for (h, len, want) in cases {
            assert_eq!(parse(*h, *len), *want, "{h:?} of {len}");
        }
        let long = format!("bytes=0-{}", "1".repeat(RANGE_HEADER_BYTES_MAX));
        assert_eq!(parse(Some(&long), 10), Full);
    }

    #[test]
    fn headers() {
        assert_eq!(content_range(2, 4, 10), "bytes 2-5/10");
        assert_eq!(unsatisfied_range(10), "bytes */10");
    }
}
