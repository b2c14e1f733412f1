//! Method + path routing with `{name}` path parameters.
//!
//! ```text
//!  (Method, "/v1/keys/42/3") ─► Router::route ─► Ok(Match { handler, params: user=42, device=3 })
//!                                             └► Err(NotFound) → 404 | Err(MethodNotAllowed{allow}) → 405 + Allow
//! ```
//!
//! Patterns are `/`-separated literal segments and `{param}` segments; a parameter matches one
//! non-empty segment (not percent-decoded: our parameters are ids and tokens). When several
//! patterns match a path, the most specific wins: at the first segment where they differ, a
//! literal beats a parameter (`/v1/users/me` before `/v1/users/{id}`). Paths match exactly:
//! no trailing-slash or empty-segment normalisation. `HEAD` is served by a `GET` route unless
//! a `HEAD` route exists (RFC 9110 §9.3.2).

use crate::http1::{write_json_error, Method};

/// Most routes in one router; the table is scanned linearly per request, which at this size is
/// cheaper than a trie.
pub const ROUTER_ROUTES_MAX: usize = 128;
/// Most segments in a pattern (and so in a path that can match one).
pub const ROUTE_SEGMENTS_MAX: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Param(String),
}

#[derive(Clone, Debug)]
struct Route<H> {
    method: Method,
    pattern: String,
    segments: Vec<Segment>,
    handler: H,
}

/// A routing table from (method, path pattern) to a handler value `H` (an enum of endpoints,
/// typically).
#[derive(Clone, Debug)]
pub struct Router<H> {
    routes: Vec<Route<H>>,
}

impl<H> Default for Router<H> {
    fn default() -> Self {
        Router { routes: Vec::new() }
    }
}

/// The path parameters of a match, in pattern order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params<'r, 'p> {
    items: Vec<(&'r str, &'p str)>,
}

impl<'p> Params<'_, 'p> {
    pub fn get(&self, name: &str) -> Option<&'p str> {
        self.items.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }

    /// The parameter as a decimal u64 (ids); `None` when absent or not a number. Callers answer
    /// `None` with 404 (no such resource) or 400.
    pub fn get_u64(&self, name: &str) -> Option<u64> {
        let v = self.get(name)?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        v.parse().ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &'p str)> {
        self.items.iter().map(|(n, v)| (*n, *v))
    }
}

/// A successful route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Match<'r, 'p, H> {
    pub handler: &'r H,
    /// The pattern that matched, e.g. `/v1/keys/{user}/{device}` (for metrics labels).
    pub pattern: &'r str,
    pub params: Params<'r, 'p>,
}

/// Why no route matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteError {
    /// No pattern matches the path. 404.
    NotFound,
    /// A pattern matches the path, but not with this method. 405 with `Allow: allow`.
    MethodNotAllowed { allow: String },
}

impl RouteError {
    pub fn status(&self) -> u16 {
        match self {
            RouteError::NotFound => 404,
            RouteError::MethodNotAllowed { .. } => 405,
        }
    }

    /// Writes the JSON error response (with `Allow` for 405).
    pub fn write_response(&self, out: &mut Vec<u8>, keep_alive: bool) {
        match self {
            RouteError::NotFound => {
                write_json_error(out, 404, "not_found", "no such endpoint", keep_alive, &[])
            }
            RouteError::MethodNotAllowed { allow } => write_json_error(
                out,
                405,
                "method_not_allowed",
                "method not allowed on this endpoint",
                keep_alive,
                &[("allow", allow)],
            ),
        }
    }
}

fn parse_pattern(pattern: &str) -> Vec<Segment> {
    assert!(
        pattern.starts_with('/'),
        "pattern {pattern:?} must start with '/'"
    );
    if pattern == "/" {
        return Vec::new();
    }
    let segments: Vec<Segment> = pattern[1..]
        .split('/')
        .map(|s| {
            assert!(!s.is_empty(), "empty segment in pattern {pattern:?}");
            match s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                Some(name) => {
                    assert!(
                        !name.is_empty()
                            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                        "bad parameter name in {pattern:?}"
                    );
                    Segment::Param(name.to_owned())
                }
                None => {
                    assert!(!s.contains(['{', '}']), "bad segment {s:?} in {pattern:?}");
                    Segment::Literal(s.to_owned())
                }
            }
        })
        .collect();
    assert!(
        segments.len() <= ROUTE_SEGMENTS_MAX,
        "pattern {pattern:?} too long"
    );
    let mut names: Vec<&str> = segments
        .iter()
        .filter_map(|s| match s {
            Segment::Param(n) => Some(n.as_str()),
            Segment::Literal(_) => None,
        })
        .collect();
    names.sort_unstable();
    assert!(
        names.windows(2).all(|w| w[0] != w[1]),
        "repeated parameter in {pattern:?}"
    );
    segments
}

/// Orders two matching patterns: the one with a literal at the first segment where they
/// differ in kind is more specific.
fn more_specific(a: &[Segment], b: &[Segment]) -> bool {
    for (x, y) in a.iter().zip(b) {
        match (x, y) {
            (Segment::Literal(_), Segment::Param(_)) => return true,
            (Segment::Param(_), Segment::Literal(_)) => return false,
            _ => {}
        }
    }
    false
}

impl<H> Router<H> {
    pub fn new() -> Self {
        Router::default()
    }

    /// Adds a route. Panics (a programming error, at start-up) on a malformed pattern, a
    /// duplicate (method, pattern) or more than [`ROUTER_ROUTES_MAX`] routes.
    pub fn add(&mut self, method: Method, pattern: &str, handler: H) -> &mut Self {
        let segments = parse_pattern(pattern);
        assert!(self.routes.len() < ROUTER_ROUTES_MAX, "too many routes");
        assert!(
            !self
                .routes
                .iter()
                .any(|r| r.method == method && same_shape(&r.segments, &segments)),
            "duplicate route {method} {pattern}"
        );
        self.routes.push(Route {
            method,
            pattern: pattern.to_owned(),
            segments,
            handler,
        });
        self
    }

    /// Finds the handler for `method` and `path` (the request's path, without the query).
    pub fn route<'r, 'p>(
        &'r self,
        method: Method,
        path: &'p str,
    ) -> Result<Match<'r, 'p, H>, RouteError> {
        let Some(rest) = path.strip_prefix('/') else {
            return Err(RouteError::NotFound);
        };
        let mut parts: Vec<&'p str> = Vec::with_capacity(ROUTE_SEGMENTS_MAX);
        if !rest.is_empty() {
            for part in rest.split('/') {
                if parts.len() == ROUTE_SEGMENTS_MAX {
                    return Err(RouteError::NotFound);
                }
                parts.push(part);
            }
        }
        // The most specific pattern matching the path.
        let mut best: Option<&'r [Segment]> = None;
        for r in &self.routes {
            if segments_match(&r.segments, &parts)
                && best.is_none_or(|b| more_specific(&r.segments, b))
            {
                best = Some(&r.segments);
            }
        }
        let Some(best) = best else {
            return Err(RouteError::NotFound);
        };
        let same_pattern = || {
            self.routes
                .iter()
                .filter(move |r| same_shape(&r.segments, best))
        };
        let found = same_pattern().find(|r| r.method == method).or_else(|| {
            (method == Method::Head)
                .then(|| same_pattern().find(|r| r.method == Method::Get))
                .flatten()
        });
        let Some(route) = found else {
            let mut allow: Vec<Method> = same_pattern().map(|r| r.method).collect();
            if allow.contains(&Method::Get) && !allow.contains(&Method::Head) {
                allow.push(Method::Head);
            }
            allow.sort_by_key(|m| Method::ALL.iter().position(|x| x == m));
            let allow = allow
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(RouteError::MethodNotAllowed { allow });
        };
        let items = route
            .segments
            .iter()
            .zip(&parts)
            .filter_map(|(s, v)| match s {
                Segment::Param(name) => Some((name.as_str(), *v)),
                Segment::Literal(_) => None,
            })
            .collect();
        Ok(Match {
            handler: &route.handler,
            pattern: &route.pattern,
            params: Params { items },
        })
    }
}

/// Whether two patterns match the same paths (parameter names aside).
fn same_shape(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Segment::Literal(x), Segment::Literal(y)) => x == y,
            (Segment::Param(_), Segment::Param(_)) => true,
            _ => false,
        })
}

fn segments_match(segments: &[Segment], parts: &[&str]) -> bool {
    segments.len() == parts.len()
        && segments.iter().zip(parts).all(|(s, p)| match s {
            Segment::Literal(l) => l == p,
            Segment::Param(_) => !p.is_empty(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_router() -> Router<&'static str> {
        let mut r = Router::new();
        r.add(Method::Post, "/v1/auth/register", "register")
            .add(Method::Post, "/v1/auth/verify", "verify")
            .add(Method::Get, "/v1/users/me", "me")
            .add(Method::Put, "/v1/users/me", "put_me")
            .add(Method::Get, "/v1/users/{id}", "user")
            .add(Method::Post, "/v1/media", "media_create")
            .add(Method::Post, "/v1/media/{id}/url", "media_url")
            .add(Method::Put, "/v1/keys", "keys_put")
            .add(Method::Get, "/v1/keys/{user}/{device}", "keys_get")
            .add(Method::Delete, "/v1/devices/{device}", "device_delete")
            .add(Method::Get, "/", "root");
        r
    }

    fn render(r: &Router<&'static str>, method: Method, path: &str) -> String {
        match r.route(method, path) {
            Ok(m) => {
                let mut s = m.handler.to_string();
                for (k, v) in m.params.iter() {
                    s.push_str(&format!(" {k}={v}"));
                }
                s
            }
            Err(RouteError::NotFound) => "404".to_owned(),
            Err(RouteError::MethodNotAllowed { allow }) => format!("405 {allow}"),
        }
    }

    #[test]
    fn routes() {
        let r = api_router();
        let cases: &[(Method, &str, &str)] = &[
            (Method::Post, "/v1/auth/register", "register"),
            (Method::Get, "/v1/auth/register", "405 POST"),
            (Method::Get, "/v1/users/me", "me"),
            (Method::Head, "/v1/users/me", "me"),
            (Method::Put, "/v1/users/me", "put_me"),
            (Method::Delete, "/v1/users/me", "405 GET, HEAD, PUT"),
            (Method::Get, "/v1/users/42", "user id=42"),
            (Method::Put, "/v1/users/42", "405 GET, HEAD"),
            (Method::Post, "/v1/media", "media_create"),
            (
                Method::Post,
                "/v1/media/abc-123/url",
                "media_url id=abc-123",
            ),
            (Method::Get, "/v1/media/abc-123/url", "405 POST"),
            (Method::Get, "/v1/keys/7/2", "keys_get user=7 device=2"),
            (Method::Put, "/v1/keys", "keys_put"),
            (Method::Delete, "/v1/devices/3", "device_delete device=3"),
            (Method::Get, "/", "root"),
            (Method::Options, "/", "405 GET, HEAD"),
            // Exact matching: no trailing slash, no empty segments, no prefix matches.
            (Method::Get, "/v1/users/", "404"),
            (Method::Get, "/v1/users", "404"),
            (Method::Get, "/v1//users/me", "404"),
            (Method::Get, "/v1/users/me/", "404"),
            (Method::Get, "/v1/keys/7", "404"),
            (Method::Get, "/v1/keys/7/2/1", "404"),
            (Method::Get, "/v1/media//url", "404"),
            (Method::Get, "", "404"),
            (Method::Get, "v1/users/me", "404"),
            (Method::Get, "/a/b/c/d/e/f/g/h/i/j/k", "404"),
        ];
        for (method, path, expect) in cases {
            assert_eq!(render(&r, *method, path), *expect, "{method} {path}");
        }
    }

    #[test]
    fn literal_beats_parameter_whatever_the_order() {
        let mut r = Router::new();
        r.add(Method::Get, "/a/{x}/c", "param_first")
            .add(Method::Get, "/a/b/{y}", "literal_first");
        assert_eq!(render(&r, Method::Get, "/a/b/c"), "literal_first y=c");
        assert_eq!(render(&r, Method::Get, "/a/z/c"), "param_first x=z");
        // The most specific pattern decides the 405 too.
        assert_eq!(render(&r, Method::Post, "/a/b/c"), "405 GET, HEAD");
    }

    #[test]
    fn params_and_errors() {
        let r = api_router();
        let m = r
            .route(Method::Get, "/v1/keys/18446744073709551615/x")
            .expect("route");
        assert_eq!(m.pattern, "/v1/keys/{user}/{device}");
        assert_eq!(m.params.get_u64("user"), Some(u64::MAX));
        assert_eq!(m.params.get_u64("device"), None);
        assert_eq!(m.params.get("device"), Some("x"));
        assert_eq!(m.params.get("nope"), None);
        let m = r
            .route(Method::Get, "/v1/users/18446744073709551616")
            .expect("route");
        assert_eq!(m.params.get_u64("id"), None);
        let m = r.route(Method::Get, "/v1/users/+1").expect("route");
        assert_eq!(m.params.get_u64("id"), None);

        let mut out = Vec::new();
        let err = r.route(Method::Patch, "/v1/users/me").expect_err("405");
        assert_eq!(err.status(), 405);
        err.write_response(&mut out, true);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nallow: GET, HEAD, PUT\r\n"), "{text}");
        assert!(text.ends_with("\"code\":\"method_not_allowed\"}"), "{text}");
        out.clear();
        RouteError::NotFound.write_response(&mut out, false);
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"), "{text}");
        assert!(text.contains("connection: close"), "{text}");
    }

    #[test]
    #[should_panic(expected = "duplicate route")]
    fn duplicate_routes_are_a_programming_error() {
        let mut r = Router::new();
        r.add(Method::Get, "/v1/users/{id}", 1)
            .add(Method::Get, "/v1/users/{other}", 2);
    }

    #[test]
    #[should_panic(expected = "repeated parameter")]
    fn repeated_parameters_are_a_programming_error() {
        Router::new().add(Method::Get, "/v1/{a}/{a}", 1);
    }
}
