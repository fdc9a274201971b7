//! HTTP/1.1 framing for the server: request-head parsing, URL query decoding and response
//! writing. The parsing functions are pure (bytes in, a value or an `HttpError` out, never a
//! panic) so that they can be fuzzed and property-tested on their own.
//!
//! The request line and header fields are tokenized by `httparse` (the parser hyper uses); the
//! semantics on top (limits, `Content-Length`, `Transfer-Encoding`, `Connection`, `Expect`) are
//! ours. Bodies are delimited by `Content-Length` only: a chunked request body is refused with
//! 501 and a POST without a length with 411.

use std::io::Write;

/// Limits on one request. Exceeding one is an `HttpError` with the matching status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus header fields, in bytes (431 past it).
    pub max_header_bytes: usize,
    /// Header fields (431 past it).
    pub max_headers: usize,
    /// Request body, in bytes (413 past it).
    pub max_body_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_body_bytes: 32 << 20,
        }
    }
}

/// A request that cannot be served, with the status to answer and a one-line reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    pub fn new(status: u16, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.message)
    }
}

/// The parsed head of one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// As sent (methods are case-sensitive).
    pub method: String,
    /// The path part of the target, still percent-encoded; starts with `/`.
    pub path: String,
    /// The query part of the target (after `?`, without it), still percent-encoded.
    pub query: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Header fields in order, names lower-cased, values as text (invalid UTF-8 replaced).
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, final empty line included: the body starts there.
    pub head_len: usize,
    /// `Content-Length`, when given (already checked against `Limits::max_body_bytes`).
    pub content_length: Option<u64>,
    /// Whether the connection may serve another request after this one.
    pub keep_alive: bool,
    /// The client sent `Expect: 100-continue` and waits for a go-ahead before the body.
    pub expect_continue: bool,
}

impl RequestHead {
    /// The first value of a header field (`name` in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the head of a request at the start of `buf`.
///
/// `Ok(None)`: the head is not complete yet (read more bytes and call again). `Ok(Some)`: the
/// head, whose `head_len` says where the body starts. `Err`: the request is malformed (400),
/// its head too large (431), its body too large (413), or it uses something this server does
/// not support (chunked bodies: 501; an unknown expectation: 417). After an error the
/// connection cannot be trusted to be in sync and should be closed.
pub fn parse_request_head(buf: &[u8], limits: &Limits) -> Result<Option<RequestHead>, HttpError> {
    let mut slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut req = httparse::Request::new(&mut slots);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_header_bytes {
                return Err(head_too_large(limits));
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(
                431,
                format!(
                    "too many header fields (at most {} are accepted)",
                    limits.max_headers
                ),
            ))
        }
        Err(e) => {
            // A partial head past the size limit is too large whatever follows.
            if buf.len() > limits.max_header_bytes {
                return Err(head_too_large(limits));
            }
            return Err(HttpError::new(400, format!("malformed request head: {e}")));
        }
    };
    if head_len > limits.max_header_bytes {
        return Err(head_too_large(limits));
    }
    // Complete, so httparse filled all three.
    let (Some(method), Some(target), Some(minor_version)) = (req.method, req.path, req.version)
    else {
        return Err(HttpError::new(400, "malformed request line"));
    };
    if !target.starts_with('/') {
        return Err(HttpError::new(
            400,
            "request target must be a path starting with `/`",
        ));
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };
    let path = path.split('#').next().unwrap_or(path);
    let query = query.split('#').next().unwrap_or(query);

    let mut headers = Vec::with_capacity(req.headers.len());
    let mut content_length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        let value = String::from_utf8_lossy(h.value).trim().to_string();
        match name.as_str() {
            "content-length" => {
                let n = parse_content_length(&value, limits)?;
                if content_length.is_some_and(|prev| prev != n) {
                    return Err(HttpError::new(400, "conflicting Content-Length headers"));
                }
                content_length = Some(n);
            }
            "transfer-encoding" => transfer_encoding = true,
            "connection" => {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive_token = true;
                    }
                }
            }
            "expect" => {
                if value.eq_ignore_ascii_case("100-continue") {
                    expect_continue = true;
                } else {
                    return Err(HttpError::new(
                        417,
                        format!("unsupported expectation `{}`", printable(&value)),
                    ));
                }
            }
            _ => {}
        }
        headers.push((name, value));
    }
    if transfer_encoding {
        return Err(HttpError::new(
            501,
            "Transfer-Encoding (chunked bodies) is not supported: send the body with Content-Length",
        ));
    }
    let keep_alive = !close && (minor_version == 1 || keep_alive_token);
    Ok(Some(RequestHead {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        minor_version,
        headers,
        head_len,
        content_length,
        keep_alive,
        expect_continue,
    }))
}

fn head_too_large(limits: &Limits) -> HttpError {
    HttpError::new(
        431,
        format!("request head larger than {} bytes", limits.max_header_bytes),
    )
}

fn parse_content_length(value: &str, limits: &Limits) -> Result<u64, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::new(
            400,
            format!("invalid Content-Length `{}`", printable(value)),
        ));
    }
    let too_large = || {
        HttpError::new(
            413,
            format!(
                "request body of {} bytes is larger than the limit of {} bytes",
                printable(value),
                limits.max_body_bytes
            ),
        )
    };
    let n: u64 = value.parse().map_err(|_| too_large())?;
    if n > limits.max_body_bytes {
        return Err(too_large());
    }
    Ok(n)
}

/// At most 64 characters of `s`, control characters replaced, for error messages.
pub fn printable(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if s.chars().count() > 64 {
        out.push_str("...");
    }
    out
}

/// Decodes `%XX` escapes (and `+` as a space when `plus_is_space`, as in query strings).
/// The result must be UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Result<String, HttpError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| {
                    let hi = (h[0] as char).to_digit(16)?;
                    let lo = (h[1] as char).to_digit(16)?;
                    Some((hi * 16 + lo) as u8)
                });
                match hex {
                    Some(b) => out.push(b),
                    None => {
                        return Err(HttpError::new(
                            400,
                            format!("bad percent-escape in `{}`", printable(s)),
                        ))
                    }
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| HttpError::new(400, format!("`{}` is not UTF-8", printable(s))))
}

/// Splits and decodes a query string (`a=1&b=x%20y&flag`) into pairs, in order. A key without
/// `=` gets an empty value; empty segments (`a=1&&b=2`) are skipped.
pub fn parse_query(query: &str) -> Result<Vec<(String, String)>, HttpError> {
    query
        .split('&')
        .filter(|seg| !seg.is_empty())
        .map(|seg| {
            let (k, v) = seg.split_once('=').unwrap_or((seg, ""));
            Ok((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// An HTTP response, written whole by `write_response`.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Further header fields (e.g. `Allow`).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = value.to_string().into_bytes();
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
            headers: Vec::new(),
        }
    }

    /// `{"error": message}` with `status`.
    pub fn error(status: u16, message: impl std::fmt::Display) -> Response {
        Response::json(status, &serde_json::json!({ "error": message.to_string() }))
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
            headers: Vec::new(),
        }
    }
}

impl From<HttpError> for Response {
    fn from(e: HttpError) -> Response {
        Response::error(e.status, e.message)
    }
}

/// The reason phrase of the statuses this server uses.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// The bytes of a response: status line, headers, body. `keep_alive` chooses the
/// `Connection` header.
pub fn response_bytes(resp: &Response, keep_alive: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(resp.body.len() + 256);
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len(),
        if keep_alive { "keep-alive" } else { "close" }
    );
    for (name, value) in &resp.headers {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&resp.body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<Option<RequestHead>, HttpError> {
        parse_request_head(s.as_bytes(), &Limits::default())
    }

    #[test]
    fn complete_head_with_body_length() {
        let h = parse("POST /v1/segment?prompt=p1&map=npy HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\nBODY")
            .unwrap()
            .unwrap();
        assert_eq!(h.method, "POST");
        assert_eq!(h.path, "/v1/segment");
        assert_eq!(h.query, "prompt=p1&map=npy");
        assert_eq!(h.content_length, Some(12));
        assert!(h.keep_alive);
        assert!(!h.expect_continue);
        assert_eq!(h.header("host"), Some("x"));
        assert_eq!(
            h.head_len,
            "POST /v1/segment?prompt=p1&map=npy HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"
                .len()
        );
    }

    #[test]
    fn partial_heads_ask_for_more() {
        let full = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(full).unwrap().is_some());
    }

    #[test]
    fn connection_semantics() {
        let h = parse("GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = parse("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = parse("POST / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.expect_continue);
    }

    #[test]
    fn errors_have_the_right_status() {
        let status = |s: &str| parse(s).unwrap_err().status;
        assert_eq!(status("GARBAGE\r\n\r\n"), 400);
        assert_eq!(status("GET / HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(status("GET http://x/ HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            501
        );
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), 400);
        assert_eq!(status("POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n"), 400);
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            400
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status("POST / HTTP/1.1\r\nContent-Length: 33554433\r\n\r\n"),
            413
        );
        assert_eq!(status("POST / HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
        let many: String = (0..65).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(status(&format!("GET / HTTP/1.1\r\n{many}\r\n")), 431);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(20_000));
        assert_eq!(status(&long), 431);
        let long_complete = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        assert_eq!(status(&long_complete), 431);
    }

    #[test]
    fn same_content_length_twice_is_fine() {
        let h = parse("POST / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.content_length, Some(5));
    }

    #[test]
    fn query_decoding() {
        assert_eq!(
            parse_query("prompt=p%31&name=a+b%2Fc&&flag").unwrap(),
            vec![
                ("prompt".to_string(), "p1".to_string()),
                ("name".to_string(), "a b/c".to_string()),
                ("flag".to_string(), String::new()),
            ]
        );
        assert_eq!(parse_query("").unwrap(), vec![]);
        assert_eq!(parse_query("a=%zz").unwrap_err().status, 400);
        assert_eq!(parse_query("a=%4").unwrap_err().status, 400);
        assert_eq!(parse_query("a=%ff").unwrap_err().status, 400);
        assert_eq!(
            percent_decode("caf%C3%A9+x", false).unwrap(),
            "café+x".to_string()
        );
    }

    #[test]
    fn response_framing() {
        let r = Response::error(404, "no such route");
        let bytes = String::from_utf8(response_bytes(&r, false)).unwrap();
        assert!(bytes.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(bytes.contains("Connection: close\r\n"));
        assert!(bytes.ends_with("\r\n\r\n{\"error\":\"no such route\"}\n"));
        assert!(bytes.contains(&format!("Content-Length: {}\r\n", r.body.len())));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn head_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let limits = Limits { max_header_bytes: 300, max_headers: 4, max_body_bytes: 1000 };
            if let Ok(Some(h)) = parse_request_head(&bytes, &limits) {
                prop_assert!(h.head_len <= bytes.len());
                prop_assert!(h.head_len <= limits.max_header_bytes);
                prop_assert!(h.content_length.is_none_or(|n| n <= 1000));
                prop_assert!(h.path.starts_with('/'));
            }
        }

        #[test]
        fn head_parser_handles_near_valid_heads(
            method in "[A-Z]{1,7}",
            path in "/[ -~]{0,40}",
            headers in proptest::collection::vec(("[!-~]{1,12}", "[ -~]{0,20}"), 0..6),
            cut in 0usize..400,
        ) {
            let mut s = format!("{method} {path} HTTP/1.1\r\n");
            for (n, v) in &headers {
                s.push_str(&format!("{n}: {v}\r\n"));
            }
            s.push_str("\r\n");
            let bytes = s.as_bytes();
            let cut = cut.min(bytes.len());
            let _ = parse_request_head(&bytes[..cut], &Limits::default());
            let _ = parse_request_head(bytes, &Limits::default());
        }

        #[test]
        fn query_parser_never_panics(s in "\\PC{0,80}") {
            let _ = parse_query(&s);
        }

        #[test]
        fn percent_encoding_round_trips(s in "\\PC{0,40}") {
            let encoded: String = s
                .bytes()
                .map(|b| format!("%{b:02X}"))
                .collect();
            prop_assert_eq!(percent_decode(&encoded, true).unwrap(), s);
        }
    }
}
