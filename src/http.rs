//! HTTP/1.1 request heads and responses, sans-IO.
//!
//! Every connection starts as HTTP. Its request head is parsed here (httparse);
//! `server::routes` decides what it gets. The upgrade response itself comes from
//! tungstenite's handshake code.

use bytes::Bytes;

/// Longest request head accepted; a longer one gets 431.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most header lines accepted; more gets 431.
pub const MAX_HEADERS: usize = 100;

/// A parsed request head (owned: the read buffer is reused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// Path without the query string.
    pub path: String,
    pub query: Option<String>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Vec<(String, String)>,
    /// Bytes the head took in the buffer.
    pub len: usize,
}

/// Why a request head could not be used: answered with this status, then closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    BadRequest,
    TooLarge,
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::BadRequest => 400,
            HeadError::TooLarge => 431,
        }
    }
}

/// Parses a request head from the front of `buf`; `Ok(None)` means "need more bytes".
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD_BYTES => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(len)) => {
            let target = req.path.unwrap_or("/");
            if !target.starts_with('/') {
                return Err(HeadError::BadRequest);
            }
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (target.to_string(), None),
            };
            let mut hs = Vec::with_capacity(req.headers.len());
            for h in req.headers.iter() {
                let v = std::str::from_utf8(h.value).map_err(|_| HeadError::BadRequest)?;
                hs.push((h.name.to_ascii_lowercase(), v.trim().to_string()));
            }
            Ok(Some(Head {
                method: req.method.unwrap_or("").to_string(),
                path,
                query,
                version: req.version.unwrap_or(1),
                headers: hs,
                len,
            }))
        }
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(_) => Err(HeadError::BadRequest),
    }
}

impl Head {
    /// First value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether a header holds `token` in its comma-separated list (case-insensitive).
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// A WebSocket upgrade request (the rest is checked by tungstenite).
    pub fn is_upgrade(&self) -> bool {
        self.has_token("upgrade", "websocket")
    }

    /// Whether the connection stays open after the response.
    pub fn keep_alive(&self) -> bool {
        if self.has_token("connection", "close") {
            return false;
        }
        self.version >= 1 || self.has_token("connection", "keep-alive")
    }

    /// Declared body length: `Ok(0)` when absent; chunked bodies are not supported.
    pub fn content_length(&self) -> Result<usize, HeadError> {
        if self.header("transfer-encoding").is_some() {
            return Err(HeadError::BadRequest);
        }
        let mut values = self.headers.iter().filter(|(n, _)| n == "content-length");
        let Some((_, first)) = values.next() else {
            return Ok(0);
        };
        if values.any(|(_, v)| v != first) || !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HeadError::BadRequest);
        }
        first.parse().map_err(|_| HeadError::BadRequest)
    }

    /// Value of query parameter `name` (percent-decoding not needed for our parameters,
    /// which are base64url tokens).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .as_deref()?
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The 101 response for a valid upgrade request, from tungstenite's handshake code;
    /// `None` when the request is not a valid WebSocket handshake.
    pub fn upgrade_response(&self) -> Option<Bytes> {
        let mut req = tungstenite::handshake::server::Request::new(());
        *req.method_mut() = tungstenite::http::Method::GET;
        *req.uri_mut() = self.path.parse().ok()?;
        for (n, v) in &self.headers {
            let name = tungstenite::http::HeaderName::from_bytes(n.as_bytes()).ok()?;
            let value = tungstenite::http::HeaderValue::from_str(v).ok()?;
            req.headers_mut().append(name, value);
        }
        if self.method != "GET" || self.version < 1 {
            return None;
        }
        let resp = tungstenite::handshake::server::create_response(&req).ok()?;
        let mut out = Vec::with_capacity(160);
        tungstenite::handshake::server::write_response(&mut out, &resp).ok()?;
        Some(Bytes::from(out))
    }
}

/// Standard reason phrase.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete response. `body` is omitted (but still counted) for HEAD.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
    pub extra_headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
            extra_headers: Vec::new(),
        }
    }

    /// A short plain-text response (`"<reason>\n"` unless a body is given).
    pub fn text(status: u16, body: &str) -> Response {
        let body = if body.is_empty() {
            format!("{}\n", reason(status))
        } else {
            format!("{body}\n")
        };
        Response::new(status, "text/plain; charset=utf-8", body)
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.extra_headers.push((name, value.into()));
        self
    }

    /// Serializes the response (head and body) into one buffer.
    pub fn encode(&self, keep_alive: bool, head_only: bool) -> Bytes {
        let mut s = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        for (n, v) in &self.extra_headers {
            s.push_str(&format!("{n}: {v}\r\n"));
        }
        s.push_str("\r\n");
        let mut out = s.into_bytes();
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_waits_for_more() {
        let req = b"GET /ws/room?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\r\nrest";
        assert_eq!(parse_head(&req[..20]), Ok(None));
        let h = parse_head(req).unwrap().unwrap();
        assert_eq!(h.path, "/ws/room");
        assert_eq!(h.query_param("token"), Some("abc"));
        assert_eq!(h.len, req.len() - 4);
        assert!(h.is_upgrade());
        assert!(h.keep_alive());
        assert_eq!(h.content_length(), Ok(0));
    }

    #[test]
    fn limits_and_garbage() {
        assert_eq!(parse_head(b"\x16\x03\x01 tls"), Err(HeadError::BadRequest));
        assert_eq!(
            parse_head(b"GET http://x/ HTTP/1.1\r\n\r\n"),
            Err(HeadError::BadRequest)
        );
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_head(&many), Err(HeadError::TooLarge));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_BYTES + 1, b'a');
        assert_eq!(parse_head(&big), Err(HeadError::TooLarge));
        let h = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.content_length(), Err(HeadError::BadRequest));
    }

    #[test]
    fn keep_alive_rules() {
        let h = |s: &str| parse_head(s.as_bytes()).unwrap().unwrap();
        assert!(!h("GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(h("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
        assert!(!h("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive());
    }

    #[test]
    fn upgrade_response_from_tungstenite() {
        let h = parse_head(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let r = h.upgrade_response().unwrap();
        let s = std::str::from_utf8(&r).unwrap();
        assert!(s.starts_with("HTTP/1.1 101"), "{s}");
        assert!(s.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{s}");
        let bad = parse_head(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(bad.upgrade_response().is_none());
    }

    #[test]
    fn responses_have_length_and_head_has_no_body() {
        let r = Response::text(404, "");
        let full = r.encode(true, false);
        let s = std::str::from_utf8(&full).unwrap();
        assert!(s.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(s.contains("Content-Length: 10\r\n"));
        assert!(s.ends_with("\r\n\r\nNot Found\n"));
        let head = r.encode(false, true);
        assert!(std::str::from_utf8(&head)
            .unwrap()
            .ends_with("Connection: close\r\n\r\n"));
    }
}
