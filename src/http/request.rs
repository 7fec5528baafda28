//! Reading one HTTP/1.1 request head off a blocking socket, with limits,
//! parsed by `httparse`.

use std::io::{ErrorKind, Read};
use std::net::TcpStream;
use std::time::Instant;

use percent_encoding::percent_decode_str;

/// Largest request head accepted (request line plus headers).
pub const MAX_HEAD: usize = 16 * 1024;
/// Most headers accepted.
pub const MAX_HEADERS: usize = 64;
/// Largest body accepted (no endpoint needs one; small bodies are tolerated).
pub const MAX_BODY: u64 = 64 * 1024;

/// A parsed request head.
#[derive(Debug, Clone)]
pub struct Request {
    /// `GET`, `POST`, …
    pub method: String,
    /// Path without the query, still percent-encoded.
    pub path: String,
    /// Raw query string (after `?`), if any.
    pub query: Option<String>,
    /// Headers in order (names as sent).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes read past the head (the start of a body or of WebSocket frames).
    pub leftover: Vec<u8>,
}

/// Why no request could be read; `status` is what to answer, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// HTTP status to answer with; `None` means just close (peer went away).
    pub status: Option<u16>,
    /// Text for the response body and the log.
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError {
            status: Some(status),
            message: message.into(),
        }
    }
    fn closed(message: impl Into<String>) -> Self {
        HttpError {
            status: None,
            message: message.into(),
        }
    }
}

impl Request {
    /// The first header named `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// True if header `name` holds `token` in its comma-separated list.
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }

    /// A query parameter, percent-decoded (`+` is not a space here).
    pub fn query_param(&self, key: &str) -> Option<String> {
        self.query.as_deref()?.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == key).then(|| percent_decode_str(v).decode_utf8_lossy().into_owned())
        })
    }
}

/// Reads and parses one request head, which must be complete by
/// `deadline`: a client trickling bytes cannot hold the thread longer
/// (every read is given only what is left of the time).
pub fn read_request(stream: &mut TcpStream, deadline: Instant) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(if buf.is_empty() {
                HttpError::closed("idle connection timed out")
            } else {
                HttpError::new(408, "request head not received in time")
            });
        }
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HttpError::closed("connection closed before a request")),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(if buf.is_empty() {
                    HttpError::closed("idle connection timed out")
                } else {
                    HttpError::new(408, "request head not received in time")
                });
            }
            Err(e) => return Err(HttpError::closed(format!("read error: {e}"))),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(request) = parse_head(&buf)? {
            return Ok(request);
        }
    }
}

/// Parses a request head from the bytes read so far: `Ok(None)` while it is
/// incomplete (and still under [`MAX_HEAD`]), the request once complete (with
/// whatever followed it), or the error to answer with. Pure, so it can be
/// fuzzed on its own.
pub fn parse_head(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let method = req.method.unwrap_or("").to_string();
            let target = req.path.unwrap_or("");
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_string(), Some(q.to_string())),
                None => (target.to_string(), None),
            };
            let headers = req
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect();
            let request = Request {
                method,
                path,
                query,
                headers,
                leftover: buf[len..].to_vec(),
            };
            check_body(&request)?;
            Ok(Some(request))
        }
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            Err(HttpError::new(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HttpError::new(431, "too many headers")),
        Err(e) => Err(HttpError::new(400, format!("malformed request: {e}"))),
    }
}

fn check_body(req: &Request) -> Result<(), HttpError> {
    if let Some(len) = req.header("content-length") {
        let len: u64 = len
            .trim()
            .parse()
            .map_err(|_| HttpError::new(400, "invalid Content-Length"))?;
        if len > MAX_BODY {
            return Err(HttpError::new(413, "request body too large"));
        }
    }
    if req.header("transfer-encoding").is_some() {
        return Err(HttpError::new(
            400,
            "chunked request bodies are not accepted",
        ));
    }
    Ok(())
}
