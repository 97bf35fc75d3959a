//! cloud-hypervisor: one `cloud-hypervisor --api-socket path=…` process per
//! VM, configured and driven through its REST API (`vm.create`, `vm.boot`,
//! `vm.info`, `vm.power-button`, `vm.shutdown`, `vm.delete`), and one
//! `virtiofsd` per VM sharing the host's `/nix/store` read-only.
//!
//! The request bodies are checked against cloud-hypervisor's own OpenAPI
//! document (`specs/cloud-hypervisor-openapi.yaml`) in the tests.
//!
//! Its process lifecycle (the `Vmm` implementation) is not written yet, so
//! only the tests use this module for now.
#![cfg_attr(not(test), allow(dead_code))]

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;

use super::{STORE_TAG, VmError, VmSpec};

/// The store the guest mounts.
const HOST_STORE: &str = "/nix/store";
/// Responses are small JSON documents; a VMM sending more is broken.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

pub fn api_socket(spec: &VmSpec) -> PathBuf {
    spec.state_dir.join("api.sock")
}

pub fn virtiofs_socket(spec: &VmSpec) -> PathBuf {
    spec.state_dir.join("virtiofs.sock")
}

/// The VMM process: everything else arrives through the API.
pub fn vmm_argv(spec: &VmSpec) -> Vec<String> {
    vec![
        "cloud-hypervisor".into(),
        "--api-socket".into(),
        format!("path={}", api_socket(spec).display()),
    ]
}

/// The Rust virtiofsd sharing the host store with this VM only.
pub fn virtiofsd_argv(spec: &VmSpec) -> Vec<String> {
    vec![
        "virtiofsd".into(),
        format!("--socket-path={}", virtiofs_socket(spec).display()),
        format!("--shared-dir={HOST_STORE}"),
        "--readonly".into(),
        "--cache=auto".into(),
    ]
}

/// `PUT /api/v1/vm.create`: direct kernel boot of the closure, the store
/// over virtiofs (which needs shared guest memory), a tap, the serial
/// console to a file.
pub fn create_body(spec: &VmSpec) -> Value {
    let mut body = json!({
        "payload": {
            "kernel": spec.kernel.display().to_string(),
            "initramfs": spec.initrd.display().to_string(),
            "cmdline": spec.cmdline,
        },
        "cpus": { "boot_vcpus": spec.vcpus, "max_vcpus": spec.vcpus },
        "memory": { "size": spec.memory_bytes, "shared": true },
        "fs": [{
            "tag": STORE_TAG,
            "socket": virtiofs_socket(spec).display().to_string(),
            "num_queues": 1,
            "queue_size": 1024,
        }],
        "serial": { "mode": "File", "file": spec.serial_log().display().to_string() },
        "console": { "mode": "Off" },
    });
    if let Some(nic) = &spec.nic {
        body["net"] = json!([{ "tap": nic.tap, "mac": nic.mac }]);
    }
    body
}

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
fn parse_response(bytes: &[u8]) -> Result<Option<Response>, String> {
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

#[cfg(test)]
mod tests {
    use super::super::tests::spec;
    use super::*;
    use crate::vm::openapi::OpenApi;

    #[test]
    fn the_create_body_is_a_valid_vm_config() {
        let api = OpenApi::load();
        let body = create_body(&spec());
        api.validate("VmConfig", &body).unwrap();
        // The checker is strict: it would have caught a misspelt field.
        let mut typo = body.clone();
        typo["memory"]["shraed"] = json!(true);
        let error = api.validate("VmConfig", &typo).unwrap_err();
        assert!(error.contains("memory.shraed"), "{error}");
        let mut wrong = body;
        wrong["serial"]["mode"] = json!("file");
        assert!(api.validate("VmConfig", &wrong).is_err());
    }

    #[test]
    fn the_argument_vectors_are_the_documented_ones() {
        let s = spec();
        assert_eq!(
            vmm_argv(&s),
            [
                "cloud-hypervisor",
                "--api-socket",
                "path=/var/lib/procurator/vms/web-0/api.sock"
            ]
        );
        assert_eq!(
            virtiofsd_argv(&s),
            [
                "virtiofsd",
                "--socket-path=/var/lib/procurator/vms/web-0/virtiofs.sock",
                "--shared-dir=/nix/store",
                "--readonly",
                "--cache=auto"
            ]
        );
    }

    #[tokio::test]
    async fn a_request_is_framed_and_its_response_read_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"}") {
                let n = stream.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
            }
            // The response in two writes, the body split.
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 19\r\n\r\n{\"state\":")
                .await
                .unwrap();
            stream.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            stream.write_all(b"\"Running\"}").await.unwrap();
            String::from_utf8(got).unwrap()
        });
        let body = json!({ "destination_url": "unix:/tmp/x" });
        let response = request(&socket, "PUT", "vm.info", Some(&body))
            .await
            .unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.json().unwrap()["state"], "Running");
        let sent = server.await.unwrap();
        assert!(
            sent.starts_with("PUT /api/v1/vm.info HTTP/1.1\r\n"),
            "{sent}"
        );
        assert!(
            sent.contains("Content-Type: application/json\r\n"),
            "{sent}"
        );
        assert!(sent.ends_with(&format!("\r\n\r\n{body}")), "{sent}");

        drop(dir);
        let gone = request(&socket, "GET", "vmm.ping", None).await.unwrap_err();
        assert!(gone.to_string().contains("cannot connect"), "{gone}");
    }

    #[test]
    fn responses_are_read_to_their_length() {
        assert_eq!(parse_response(b"HTTP/1.1 204 No Content\r\n"), Ok(None));
        let done = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap();
        assert_eq!(done.map(|r| r.status), Some(204));
        let partial = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{\"state\":";
        assert_eq!(parse_response(partial), Ok(None));
        let full = b"HTTP/1.1 200 OK\r\ncontent-length: 19\r\n\r\n{\"state\":\"Running\"}";
        let r = parse_response(full).unwrap().unwrap();
        assert_eq!(r.json().unwrap()["state"], "Running");
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
