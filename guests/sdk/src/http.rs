//! A small blocking HTTP client over `wasi:http/outgoing-handler`.
//!
//! Redirects are not followed automatically: a plugin that wants to follow
//! one issues a new request, which the host checks like any other.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};

/// A received response, body read in full (up to `max_body` bytes).
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header named `name` (case-insensitive), as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends a GET to `url` (`http://` or `https://`) and reads at most
/// `max_body` bytes of the body.
pub fn get(url: &str, max_body: usize) -> Result<Response, String> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err(format!("unsupported URL {url:?}: expected http:// or https://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let request = OutgoingRequest::new(Fields::new());
    request.set_method(&Method::Get).map_err(|()| "invalid method".to_string())?;
    request.set_scheme(Some(&scheme)).map_err(|()| "invalid scheme".to_string())?;
    request.set_authority(Some(authority)).map_err(|()| format!("invalid authority {authority:?}"))?;
    request.set_path_with_query(Some(path)).map_err(|()| format!("invalid path {path:?}"))?;
    let body = request.body().map_err(|()| "request body unavailable".to_string())?;
    OutgoingBody::finish(body, None).map_err(|e| describe(&e))?;

    let future = outgoing_handler::handle(request, None).map_err(|e| describe(&e))?;
    future.subscribe().block();
    let response = future
        .get()
        .ok_or("response not ready")?
        .map_err(|()| "response already taken")?
        .map_err(|e| describe(&e))?;

    let headers = response
        .headers()
        .entries()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
        .collect();
    let status = response.status();
    let incoming = response.consume().map_err(|()| "response body unavailable".to_string())?;
    let stream = incoming.stream().map_err(|()| "response body stream unavailable".to_string())?;
    let mut body = Vec::new();
    while body.len() < max_body {
        match stream.blocking_read((max_body - body.len()).min(64 * 1024) as u64) {
            Ok(chunk) => body.extend_from_slice(&chunk),
            Err(wasip2::io::streams::StreamError::Closed) => break,
            Err(wasip2::io::streams::StreamError::LastOperationFailed(e)) => {
                return Err(format!("reading the body failed: {}", e.to_debug_string()));
            }
        }
    }
    drop(stream);
    Ok(Response { status, headers, body })
}

fn describe(e: &ErrorCode) -> String {
    match e {
        ErrorCode::HttpRequestDenied => "request denied by the sandbox (destination not granted)".into(),
        other => format!("{other:?}"),
    }
}
