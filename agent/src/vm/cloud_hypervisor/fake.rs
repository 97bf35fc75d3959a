//! Stand-ins for cloud-hypervisor and virtiofsd: this test binary run
//! again, running only the ignored test [`stand_in`] in the role that
//! [`ROLE`] names.
//!
//! As cloud-hypervisor it serves the REST API on its `--api-socket path=`
//! socket. Every request is checked against the vendored OpenAPI document
//! (an unknown endpoint is 404, a wrong method 405, a body the schema does
//! not accept 400), and calls out of order are refused with the codes that
//! document gives (404: no VM yet, 405: not in a state for that); errors it
//! does not list are 500, as cloud-hypervisor answers them. Each request
//! and its status are appended to `requests.log` beside the socket. As
//! virtiofsd it opens its `--socket-path` and waits.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::vm::openapi::OpenApi;

const ROLE: &str = "PROCURATOR_CLOUD_HYPERVISOR_STAND_IN";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Vmm,
    /// Answers `vm.create` with 500.
    RefusingCreate,
    /// A guest that does not act on the power button.
    IgnoringPowerButton,
    Virtiofsd,
}

impl Role {
    const ALL: [Self; 4] = [
        Self::Vmm,
        Self::RefusingCreate,
        Self::IgnoringPowerButton,
        Self::Virtiofsd,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Vmm => "cloud-hypervisor",
            Self::RefusingCreate => "cloud-hypervisor-refusing-create",
            Self::IgnoringPowerButton => "cloud-hypervisor-ignoring-power-button",
            Self::Virtiofsd => "virtiofsd",
        }
    }
}

/// An executable in `dir` that runs this binary as `role` with the
/// arguments it is given: libtest takes what follows `--` as more name
/// filters, which match no test, so they reach [`stand_in`] unchanged and
/// stay on its command line.
pub(super) fn script(dir: &Path, role: Role) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let module = module_path!();
    let test = module.split_once("::").map_or(module, |(_, m)| m);
    let path = dir.join(role.name());
    let text = format!(
        "#!/bin/sh\nexport {ROLE}={}\nexec '{}' --exact --ignored --nocapture {test}::stand_in -- \"$@\"\n",
        role.name(),
        exe.display()
    );
    std::fs::write(&path, text).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[test]
#[ignore = "not a test: the stand-in process that the cloud-hypervisor tests start"]
fn stand_in() {
    let Some(role) = std::env::var(ROLE)
        .ok()
        .and_then(|name| Role::ALL.into_iter().find(|r| r.name() == name))
    else {
        return;
    };
    let args: Vec<String> = std::env::args().skip_while(|a| a != "--").collect();
    if role == Role::Virtiofsd {
        let socket = args.iter().find_map(|a| a.strip_prefix("--socket-path="));
        let _listener = UnixListener::bind(socket.expect("--socket-path=")).unwrap();
        loop {
            std::thread::park();
        }
    }
    let socket = args.iter().find_map(|a| a.strip_prefix("path="));
    serve(role, Path::new(socket.expect("--api-socket path=")));
}

/// The VM, once created: its configuration and state.
type Vm = Option<(Value, &'static str)>;

fn serve(role: Role, socket: &Path) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../specs/cloud-hypervisor-openapi.yaml"
    );
    let document: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let api = OpenApi::load();
    let log_path = socket.with_file_name("requests.log");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let listener = UnixListener::bind(socket).unwrap();
    let mut vm: Vm = None;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Connections that only probe whether the socket is open send nothing.
        let Some((method, target, body)) = read_request(&stream) else {
            continue;
        };
        let endpoint = target.strip_prefix("/api/v1/").unwrap_or(&target);
        let (status, reply) = match check(&document, &api, &method, endpoint, &body) {
            Ok(body) => answer(role, &mut vm, endpoint, body),
            Err(refusal) => refusal,
        };
        writeln!(log, "{method} {target} {status}").unwrap();
        let (kind, reply) = match reply {
            Value::Null => ("application/json", String::new()),
            Value::String(text) => ("text/plain", text),
            json => ("application/json", json.to_string()),
        };
        let reason = match status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Internal Server Error",
        };
        let _ = write!(
            stream,
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if endpoint == "vmm.shutdown" && status == 204 {
            std::process::exit(0);
        }
    }
}

/// The request line, and the body by its Content-Length.
fn read_request(stream: &UnixStream) -> Option<(String, String, Vec<u8>)> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut words = line.split_whitespace();
    let (method, target) = (words.next()?.to_owned(), words.next()?.to_owned());
    let mut length = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().ok().filter(|n| *n <= 1 << 20)?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some((method, target, body))
}

/// The request as the document describes the endpoint: its parsed body,
/// or the refusal.
fn check(
    document: &Value,
    api: &OpenApi,
    method: &str,
    endpoint: &str,
    body: &[u8],
) -> Result<Option<Value>, (u16, Value)> {
    let refuse = |status, message: String| (status, Value::String(message));
    let operations = document["paths"]
        .get(format!("/{endpoint}"))
        .ok_or_else(|| refuse(404, format!("no endpoint {endpoint}")))?;
    let operation = operations
        .get(method.to_ascii_lowercase())
        .ok_or_else(|| refuse(405, format!("{endpoint} does not take {method}")))?;
    let request_body = &operation["requestBody"];
    let schema = request_body["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"));
    match (schema, body.is_empty()) {
        (None, true) => Ok(None),
        (None, false) => Err(refuse(400, format!("{endpoint} takes no body"))),
        (Some(_), true) if request_body["required"] == true => {
            Err(refuse(400, format!("{endpoint} needs a body")))
        }
        (Some(_), true) => Ok(None),
        (Some(name), false) => {
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| refuse(400, format!("a malformed body: {e}")))?;
            api.validate(name, &value).map_err(|e| refuse(400, e))?;
            Ok(Some(value))
        }
    }
}

/// A valid request's answer, by the VM's state.
fn answer(role: Role, vm: &mut Vm, endpoint: &str, body: Option<Value>) -> (u16, Value) {
    let text = |status, message: &str| (status, Value::String(message.to_owned()));
    let state = vm.as_ref().map(|(_, state)| *state);
    match (endpoint, state) {
        ("vmm.ping", _) => (
            200,
            json!({ "version": "stand-in", "pid": std::process::id() }),
        ),
        ("vmm.shutdown", _) => (204, Value::Null),
        ("vm.create", Some(_)) => text(500, "the VM is already created"),
        ("vm.create", None) if role == Role::RefusingCreate => {
            text(500, "the stand-in refuses to create VMs")
        }
        ("vm.create", None) => {
            *vm = Some((body.unwrap_or_default(), "Created"));
            (204, Value::Null)
        }
        ("vm.delete", _) => {
            *vm = None;
            (204, Value::Null)
        }
        (_, None) => text(404, "the VM is not created"),
        ("vm.info", Some(state)) => {
            let config = vm.as_ref().map(|(config, _)| config.clone());
            (200, json!({ "config": config, "state": state }))
        }
        ("vm.boot", Some("Created")) => {
            // Its devices connect at boot: virtiofsd must be there by then.
            let config = vm.as_ref().map(|(config, _)| config.clone());
            let sockets = config.unwrap_or_default()["fs"].as_array().cloned();
            for fs in sockets.unwrap_or_default() {
                let socket = fs["socket"].as_str().unwrap_or_default();
                if let Err(e) = UnixStream::connect(socket) {
                    return text(500, &format!("cannot connect to {socket}: {e}"));
                }
            }
            set(vm, "Running")
        }
        ("vm.power-button", Some("Running")) if role == Role::IgnoringPowerButton => {
            (204, Value::Null)
        }
        ("vm.power-button" | "vm.shutdown", Some("Running")) => set(vm, "Shutdown"),
        (_, Some(_)) => text(405, "the VM is not in a state for that"),
    }
}

fn set(vm: &mut Vm, state: &'static str) -> (u16, Value) {
    if let Some((_, current)) = vm {
        *current = state;
    }
    (204, Value::Null)
}
