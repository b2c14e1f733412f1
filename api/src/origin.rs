//! The `Origin` allow-list for browser requests and WebSocket upgrades (checked before `101`).
//!
//! ```text
//!  RequestHead ─► OriginPolicy::check ─► Ok (no Origin: not a browser; or listed) | 403 origin_not_allowed
//! ```
//!
//! Browsers send `Origin` on cross-origin requests and on every WebSocket upgrade; other
//! clients usually send none, and are not subject to the check (an attacker's own client can
//! send any `Origin`, so this protects users' browsers, not the server). Origins compare as
//! ASCII-case-insensitive `scheme://host[:port]`, with default ports (`:443` for https, `:80`
//! for http) dropped.

use crate::http1::RequestHead;

/// Most origins on the allow-list (a linear scan per request).
pub const ALLOWED_ORIGINS_MAX: usize = 64;
/// Longest `Origin` value considered; longer is refused.
pub const ORIGIN_BYTES_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginPolicy {
    /// Normalised origins; empty refuses every browser origin.
    allowed: Vec<String>,
    /// `*` on the list: any origin (development only).
    any: bool,
}

/// Lower-cases and drops a default port; `None` if not `http(s)://host[:port]`.
fn normalise(origin: &str) -> Option<String> {
    if origin.len() > ORIGIN_BYTES_MAX || !origin.is_ascii() {
        return None;
    }
    let lower = origin.to_ascii_lowercase();
    let (scheme, rest) = lower.split_once("://")?;
    let default_port = match scheme {
        "https" => ":443",
        "http" => ":80",
        _ => return None,
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
        return None;
    }
    let host = rest.strip_suffix(default_port).unwrap_or(rest);
    Some(format!("{scheme}://{host}"))
}

impl OriginPolicy {
    /// From the configured list (`"https://web.example.com"`, or `"*"` for any). Errors name
    /// the first entry that is not an origin.
    pub fn new(origins: &[&str]) -> Result<Self, String> {
        if origins.len() > ALLOWED_ORIGINS_MAX {
            return Err(format!("more than {ALLOWED_ORIGINS_MAX} allowed origins"));
        }
        let mut policy = OriginPolicy {
            allowed: Vec::new(),
            any: false,
        };
        for o in origins {
            if *o == "*" {
                policy.any = true;
                continue;
            }
            policy.allowed.push(
                normalise(o)
                    .ok_or_else(|| format!("not an origin (scheme://host[:port]): {o:?}"))?,
            );
        }
        Ok(policy)
    }

    /// Whether a request may proceed: no `Origin` header, or one on the list. `Origin: null`
    /// (sandboxed frames, `file:` pages) is refused unless the list has `*`.
    pub fn allows(&self, head: &RequestHead) -> bool {
        let mut origins = head.headers.iter().filter(|h| h.name == "origin");
        let Some(origin) = origins.next() else {
            return true;
        };
        if origins.next().is_some() {
            return false;
        }
        let Ok(value) = std::str::from_utf8(&origin.value) else {
            return self.any;
        };
        self.allows_value(value)
    }

    /// Whether one `Origin` header value is allowed (for callers that parsed the head
    /// themselves, like the engine's WebSocket upgrade).
    pub fn allows_value(&self, value: &str) -> bool {
        if self.any {
            return true;
        }
        normalise(value.trim()).is_some_and(|o| self.allowed.contains(&o))
    }

    /// The `403` body code for a refused origin.
    pub const REFUSED_CODE: &'static str = "origin_not_allowed";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::{Conn, Event};

    fn head(origin_lines: &str) -> RequestHead {
        let mut conn = Conn::default();
        conn.feed(format!("GET /v1/ws HTTP/1.1\r\nHost: h\r\n{origin_lines}\r\n").as_bytes());
        match conn.poll() {
            Ok(Some(Event::Head(h))) => h,
            other => panic!("no head: {other:?}"),
        }
    }

    #[test]
    fn allow_list() {
        let policy = OriginPolicy::new(&["https://web.example.com", "http://localhost:3000"])
            .expect("policy");
        for (lines, allowed) in [
            ("", true),
            ("Origin: https://web.example.com\r\n", true),
            ("Origin: HTTPS://Web.Example.COM\r\n", true),
            ("Origin: https://web.example.com:443\r\n", true),
            ("Origin: http://localhost:3000\r\n", true),
            ("Origin: http://localhost\r\n", false),
            ("Origin: https://web.example.com.evil.com\r\n", false),
            ("Origin: http://web.example.com\r\n", false),
            ("Origin: https://web.example.com/\r\n", false),
            ("Origin: null\r\n", false),
            ("Origin: \r\n", false),
            (
                "Origin: https://web.example.com\r\nOrigin: https://web.example.com\r\n",
                false,
            ),
            ("Origin: https://w\u{e9}b.example.com\r\n", false),
        ] {
            assert_eq!(policy.allows(&head(lines)), allowed, "{lines:?}");
        }
        let any = OriginPolicy::new(&["*"]).expect("policy");
        assert!(any.allows(&head("Origin: null\r\n")));
        let none = OriginPolicy::new(&[]).expect("policy");
        assert!(none.allows(&head("")));
        assert!(!none.allows(&head("Origin: https://web.example.com\r\n")));
    }

    #[test]
    fn bad_configuration() {
        for bad in [
            "web.example.com",
            "ftp://x",
            "https://x/path",
            "https://",
            "https://u@x",
        ] {
            assert!(OriginPolicy::new(&[bad]).is_err(), "{bad}");
        }
        let many: Vec<&str> = std::iter::repeat_n("https://a", ALLOWED_ORIGINS_MAX + 1).collect();
        assert!(OriginPolicy::new(&many).is_err());
    }
}
