//! A stand-in for cloud-hypervisor: this test binary run again, running
//! only the ignored test [`stand_in`] in the role that [`ROLE`] names. The
//! tests pair it with the real virtiofsd.
//!
//! It answers as cloud-hypervisor v54 was seen to (see the notes of the
//! issue that checked it against the real binary): an unknown endpoint is
//! 404, a wrong method 400, a malformed body 400; `vm.boot` and `vm.info`
//! before `vm.create` 404; what the VM is not in a state for 500, the
//! error chain as a JSON array; `vmm.shutdown` 200. Like the real binary it
//! takes a body the schema does not allow (a misspelt field is ignored),
//! but writes what the vendored OpenAPI document refuses to
//! `schema-violations.log` beside its socket, the tests' only guard
//! against a misspelt field. At `vm.boot` it connects to each virtio-fs
//! socket, as the real VMM does, and holds the connection while the VM
//! runs, so virtiofsd exits when the VM goes. It writes its events to
//! `--event-monitor path=` as cloud-hypervisor does (pretty JSON objects,
//! a blank line after each), and each request and its status to
//! `requests.log` beside its socket.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::vm::openapi::OpenApi;

const ROLE: &str = "PROCURATOR_CLOUD_HYPERVISOR_STAND_IN";
/// How long `vm.boot` waits for a vhost-user socket to accept (the real
/// binary: 60 s); the environment may shorten it.
const VHOST_WAIT: &str = "PROCURATOR_STAND_IN_VHOST_WAIT_MS";
/// The real binary's huge-page size, to which guest memory must be aligned.
const HUGE_PAGE: u64 = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Vmm,
    /// Answers `vm.create` with 500.
    RefusingCreate,
    /// A guest that does not act on the power button.
    IgnoringPowerButton,
    /// A guest that resets soon after it boots (a panic with `panic=N`).
    RebootingGuest,
    /// Takes 3 s to answer `vm.boot`.
    SlowBoot,
    /// Says it is v48.
    Old,
}

impl Role {
    const ALL: [Self; 6] = [
        Self::Vmm,
        Self::RefusingCreate,
        Self::IgnoringPowerButton,
        Self::RebootingGuest,
        Self::SlowBoot,
        Self::Old,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Vmm => "cloud-hypervisor",
            Self::RefusingCreate => "cloud-hypervisor-refusing-create",
            Self::IgnoringPowerButton => "cloud-hypervisor-ignoring-power-button",
            Self::RebootingGuest => "cloud-hypervisor-rebooting-guest",
            Self::SlowBoot => "cloud-hypervisor-slow-boot",
            Self::Old => "cloud-hypervisor-v48",
        }
    }
}

/// An executable in `dir` that runs this binary as `role` with the
/// arguments it is given: libtest takes what follows `--` as more name
/// filters, which match no test, so they reach [`stand_in`] unchanged and
/// stay on its command line. `env` is exported first.
pub(super) fn script_with(dir: &Path, role: Role, env: &[(&str, &str)]) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let module = module_path!();
    let test = module.split_once("::").map_or(module, |(_, m)| m);
    let path = dir.join(role.name());
    let exports: String = env
        .iter()
        .map(|(k, v)| format!("export {k}='{v}'\n"))
        .collect();
    let text = format!(
        "#!/bin/sh\nexport {ROLE}={}\n{exports}exec '{}' --exact --ignored --nocapture {test}::stand_in -- \"$@\"\n",
        role.name(),
        exe.display()
    );
    std::fs::write(&path, text).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The real virtiofsd, as `scripts/setup.sh` installs it.
pub(super) fn virtiofsd() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("virtiofsd"))
        .find(|p| p.is_file());
    found.expect("virtiofsd is not installed: run scripts/setup.sh, which builds it from crates.io")
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
    let after = |flag: &str| {
        args.iter()
            .skip_while(|a| *a != flag)
            .nth(1)
            .and_then(|a| a.strip_prefix("path="))
            .map(PathBuf::from)
    };
    let socket = after("--api-socket").expect("--api-socket path=");
    let events = Events(after("--event-monitor"));
    events.say("vmm", "starting");
    serve(role, &socket, &events);
}

/// cloud-hypervisor's event monitor, if it was given one.
struct Events(Option<PathBuf>);

impl Events {
    fn say(&self, source: &str, event: &str) {
        let Some(path) = &self.0 else { return };
        let elapsed = START.elapsed();
        let event = json!({
            "timestamp": { "secs": elapsed.as_secs(), "nanos": elapsed.subsec_nanos() },
            "source": source,
            "event": event,
            "properties": null,
        });
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        write!(
            file,
            "{}\n\n",
            serde_json::to_string_pretty(&event).unwrap()
        )
        .unwrap();
    }
}

static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// The VM, once created.
struct Vm {
    config: Value,
    state: &'static str,
    /// Its connections to its vhost-user devices, while it runs.
    devices: Vec<UnixStream>,
}

fn serve(role: Role, socket: &Path, events: &Events) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../specs/cloud-hypervisor-openapi.yaml"
    );
    let document: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let api = OpenApi::load();
    let append = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(socket.with_file_name(name))
            .unwrap()
    };
    let mut log = append("requests.log");
    let mut violations = append("schema-violations.log");
    let listener = UnixListener::bind(socket).unwrap();
    let mut vm: Option<Vm> = None;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // Connections that only probe whether the socket is open send nothing.
        let Some((method, target, body)) = read_request(&stream) else {
            continue;
        };
        let endpoint = target.strip_prefix("/api/v1/").unwrap_or(&target);
        let (status, reply) = match check(&document, &method, endpoint, &body) {
            Ok(Checked { body, schema }) => {
                if let (Some(name), Some(value)) = (schema, &body)
                    && let Err(e) = api.validate(name, value)
                {
                    writeln!(violations, "{method} {endpoint}: {e}").unwrap();
                }
                answer(role, &mut vm, endpoint, body, events)
            }
            Err(refusal) => refusal,
        };
        writeln!(log, "{method} {target} {status}").unwrap();
        // As cloud-hypervisor frames them: an empty reason phrase, no
        // Content-Length on 204.
        let head = match &reply {
            Value::Null => format!("HTTP/1.1 {status} \r\n\r\n"),
            reply => format!(
                "HTTP/1.1 {status} \r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{reply}",
                reply.to_string().len()
            ),
        };
        let _ = stream.write_all(head.as_bytes());
        if endpoint == "vmm.shutdown" && status == 200 {
            events.say("vmm", "shutdown");
            std::process::exit(0);
        }
        if vm.as_ref().is_some_and(|vm| vm.state == "PoweredOff") {
            // The guest powered off: the VMM ends, as the real one does.
            events.say("vm", "shutdown");
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

/// A request the VMM takes: its parsed body, and the schema the document
/// gives for it.
struct Checked<'d> {
    body: Option<Value>,
    schema: Option<&'d str>,
}

/// The request as the document describes the endpoint, or the refusal.
fn check<'d>(
    document: &'d Value,
    method: &str,
    endpoint: &str,
    body: &[u8],
) -> Result<Checked<'d>, (u16, Value)> {
    let refuse = |status, message: String| (status, chain(&[&message]));
    // As the real one says them: the status's name only.
    let operations = document["paths"]
        .get(format!("/{endpoint}"))
        .ok_or((404, json!(["Not Found"])))?;
    let operation = operations
        .get(method.to_ascii_lowercase())
        .ok_or((400, json!(["Bad Request"])))?;
    let request_body = &operation["requestBody"];
    let schema = request_body["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/components/schemas/"));
    match (schema, body.is_empty()) {
        (None, true) => Ok(Checked { body: None, schema }),
        (None, false) => Err(refuse(400, format!("{endpoint} takes no body"))),
        (Some(_), true) if request_body["required"] == true => {
            Err(refuse(400, format!("{endpoint} needs a body")))
        }
        (Some(_), true) => Ok(Checked { body: None, schema }),
        (Some(_), false) => {
            let value: Value = serde_json::from_slice(body)
                .map_err(|e| refuse(400, format!("a malformed body: {e}")))?;
            Ok(Checked {
                body: Some(value),
                schema,
            })
        }
    }
}

/// cloud-hypervisor's error body: the chain of errors, outermost first.
fn chain(errors: &[&str]) -> Value {
    let mut all = vec!["Error from API"];
    all.extend_from_slice(errors);
    json!(all)
}

/// A valid request's answer, by the VM's state.
fn answer(
    role: Role,
    vm: &mut Option<Vm>,
    endpoint: &str,
    body: Option<Value>,
    events: &Events,
) -> (u16, Value) {
    let not_running = |what: &str| (500, chain(&[what, "VM is not running"]));
    match (endpoint, vm.as_mut()) {
        ("vmm.ping", _) => {
            let version = if role == Role::Old {
                "48.0.0"
            } else {
                "54.0.0"
            };
            (
                200,
                json!({ "build_version": format!("v{version}"), "version": version,
                        "pid": std::process::id(), "features": ["kvm"] }),
            )
        }
        ("vmm.shutdown", _) => {
            *vm = None;
            (200, Value::Null)
        }
        ("vm.create", Some(_)) => (
            500,
            chain(&["The VM could not be created", "VM is already created"]),
        ),
        ("vm.create", None) if role == Role::RefusingCreate => (
            500,
            chain(&[
                "The VM could not be created",
                "the stand-in refuses to create VMs",
            ]),
        ),
        ("vm.create", None) => {
            *vm = Some(Vm {
                config: body.unwrap_or_default(),
                state: "Created",
                devices: Vec::new(),
            });
            (204, Value::Null)
        }
        ("vm.delete", _) => {
            if vm.take().is_some() {
                events.say("vm", "deleted");
            }
            (204, Value::Null)
        }
        ("vm.info", None) => (
            404,
            chain(&["The VM info is not available", "VM is not created"]),
        ),
        ("vm.boot", None) => (
            404,
            chain(&["The VM could not boot", "VM config is missing"]),
        ),
        (_, None) => (500, chain(&["VM is not created"])),
        ("vm.info", Some(vm)) => (
            200,
            json!({ "config": vm.config, "state": vm.state,
                    "memory_actual_size": vm.config["memory"]["size"] }),
        ),
        ("vm.boot", Some(vm)) if vm.state == "Created" => boot(role, vm, events),
        ("vm.boot", Some(_)) => (
            500,
            chain(&["The VM could not boot", "VM is already running"]),
        ),
        ("vm.power-button", Some(vm)) if vm.state == "Running" => {
            if role != Role::IgnoringPowerButton {
                vm.state = "PoweredOff";
            }
            (204, Value::Null)
        }
        ("vm.power-button", Some(_)) => not_running("Error triggering power button"),
        ("vm.shutdown", Some(vm)) if vm.state == "Running" => {
            // Its devices go; the VM is as just created (never `Shutdown`).
            vm.devices.clear();
            vm.state = "Created";
            events.say("vm", "shutdown");
            (204, Value::Null)
        }
        ("vm.shutdown", Some(_)) => not_running("The VM could not shutdown"),
        (_, Some(_)) => (500, chain(&["the stand-in does not serve this endpoint"])),
    }
}

fn boot(role: Role, vm: &mut Vm, events: &Events) -> (u16, Value) {
    events.say("vm", "booting");
    let size = vm.config["memory"]["size"].as_u64().unwrap_or_default();
    if !size.is_multiple_of(HUGE_PAGE) {
        return (
            500,
            chain(&[
                "The VM could not boot",
                "Memory manager error",
                "Memory size is misaligned with default page size or its hugepage size",
            ]),
        );
    }
    // Its vhost-user devices connect at boot, waiting for each socket.
    let wait = std::env::var(VHOST_WAIT)
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_millis);
    let sockets = vm.config["fs"].as_array().cloned().unwrap_or_default();
    for fs in sockets {
        let socket = fs["socket"].as_str().unwrap_or_default().to_owned();
        let deadline = Instant::now() + wait;
        let connected = loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => break Ok(stream),
                Err(e) if Instant::now() >= deadline => break Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        match connected {
            Ok(stream) => vm.devices.push(stream),
            Err(e) => {
                vm.devices.clear();
                // The real one says only the first part; the socket helps a test.
                let why = format!("Timed out waiting for vhost-user connection ({socket}: {e})");
                return (
                    500,
                    chain(&[
                        "The VM could not boot",
                        "Error from device manager",
                        "Cannot create virtio-fs device",
                        &why,
                    ]),
                );
            }
        }
    }
    if role == Role::SlowBoot {
        std::thread::sleep(Duration::from_secs(3));
    }
    vm.state = "Running";
    events.say("vm", "booted");
    if role == Role::RebootingGuest {
        // The guest panics and cloud-hypervisor boots it again, under the
        // same process.
        let monitor = Events(events.0.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            monitor.say("vm", "rebooting");
            monitor.say("vm", "rebooted");
        });
    }
    (204, Value::Null)
}
