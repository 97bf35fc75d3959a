//! cloud-hypervisor's REST API speaks HTTP/1.1 on a unix socket: one
//! request per connection, small JSON bodies. This is just enough of a
//! client for it, without an HTTP stack.

use std::path::Path;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use crate::vm::VmError;

/// Responses are small JSON documents; a VMM sending more is broken.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// A cloud-hypervisor API response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

/// One HTTP/1.1 request on the VMM's API socket. `path` is the endpoint
/// without the `/api/v1/` prefix, e.g. `vm.boot`.
pub async fn request(
    socket: &Path,
    method: &str,
    endpoint: &str,
    body: Option<&Value>,
) -> Result<Response, VmError> {
    let api_error = |message: String| VmError::Api {
        vmm: "cloud-hypervisor",
        request: format!("{method} {endpoint}"),
        message,
    };
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| api_error(format!("cannot connect to {}: {e}", socket.display())))?;
    let payload = body.map(Value::to_string).unwrap_or_default();
    let mut head = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
    );
    if body.is_some() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", payload.len()));
    stream
        .write_all(head.as_bytes())
        .await
        .and(stream.write_all(payload.as_bytes()).await)
        .map_err(|e| api_error(format!("cannot send: {e}")))?;

    let mut received = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(response) = parse_response(&received).map_err(&api_error)? {
            return Ok(response);
        }
        if received.len() > MAX_RESPONSE_BYTES {
            return Err(api_error("the response is larger than 1 MiB".into()));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| api_error(format!("cannot read the response: {e}")))?;
        if n == 0 {
            return Err(api_error(
                "the VMM closed the connection mid-response".into(),
            ));
        }
        received.extend_from_slice(&chunk[..n]);
    }
}

/// A complete response in `bytes`, `None` while more is needed.
pub(super) fn parse_response(bytes: &[u8]) -> Result<Option<Response>, String> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "a non-UTF-8 header".to_owned())?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("a malformed status line {status_line:?}"))?;
    let mut length = 0usize;
    for line in lines {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value
                .trim()
                .parse()
                .map_err(|_| format!("a malformed Content-Length {value:?}"))?;
        }
    }
    let body_start = end + 4;
    if bytes.len() < body_start + length {
        return Ok(None);
    }
    Ok(Some(Response {
        status,
        body: bytes[body_start..body_start + length].to_vec(),
    }))
}
