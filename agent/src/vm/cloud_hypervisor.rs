//! cloud-hypervisor: one `cloud-hypervisor --api-socket path=…` process per
//! VM, configured and driven through its REST API (`vm.create`, `vm.boot`,
//! `vm.info`, `vm.power-button`, `vm.shutdown`, `vm.delete`), and one
//! `virtiofsd` per VM sharing the host's `/nix/store` read-only. Both run
//! in sessions of their own with a pid file, a socket and a log in the VM's
//! state folder, so a restarted agent finds them again.
//!
//! A guest that resets (reboots, or panics with `panic=N`) does not end
//! cloud-hypervisor: it boots the VM again under the same process. It says
//! so on its event monitor (`--event-monitor path=…/events.json`, the
//! events `vm rebooting` and `vm rebooted`), which [`Vmm::resets`] reads:
//! the file is cloud-hypervisor's own account, unlike the console, which
//! the guest writes.
//!
//! The request bodies are checked against cloud-hypervisor's own OpenAPI
//! document (`specs/cloud-hypervisor-openapi.yaml`) in the tests, which run
//! the lifecycle against a stand-in VMM (`fake.rs`) that answers as
//! cloud-hypervisor v54 does, and the real virtiofsd: cloud-hypervisor
//! itself needs hardware virtualisation. The real binary ignores a field it
//! does not know, so that check is the only guard against a misspelt one.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio::time::Instant;

use self::http::{Response, request};
use super::{STORE_TAG, VmError, VmSpec, Vmm};

#[cfg(test)]
mod fake;
mod http;
#[cfg(test)]
mod tests;

const VMM: &str = "cloud-hypervisor";
/// The store the guest mounts.
const HOST_STORE: &str = "/nix/store";
const POLL: Duration = Duration::from_millis(20);
/// `sh` writes its own pid, which `exec` hands on to the program: the
/// program's pid, whether or not the prefix forks.
const WRITE_PID_AND_EXEC: &str = r#"echo $$ > "$0" && exec "$@""#;

pub fn api_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("api.sock")
}

pub fn virtiofs_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("virtiofs.sock")
}

/// Where cloud-hypervisor reports what happens to the VM.
pub fn event_monitor(state_dir: &Path) -> PathBuf {
    state_dir.join("events.json")
}

/// The oldest cloud-hypervisor this backend drives: before v49, a net
/// device without an address gave every VM's host tap the same one
/// (192.168.249.1/24).
pub const MIN_VERSION: u32 = 49;
/// How long `vm.boot` may take: cloud-hypervisor waits up to 60 s for each
/// vhost-user device (virtiofsd) to connect before it gives up.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// Read of the event monitor: a guest in a reset loop makes it grow.
const MAX_EVENT_BYTES: u64 = 1 << 20;

/// The two processes of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    Vmm,
    Virtiofsd,
}

impl Daemon {
    fn name(self) -> &'static str {
        match self {
            Self::Vmm => VMM,
            Self::Virtiofsd => "virtiofsd",
        }
    }

    fn socket(self, state_dir: &Path) -> PathBuf {
        match self {
            Self::Vmm => api_socket(state_dir),
            Self::Virtiofsd => virtiofs_socket(state_dir),
        }
    }

    /// The argument naming its socket: only this VM's process has it.
    fn socket_arg(self, state_dir: &Path) -> String {
        let socket = self.socket(state_dir);
        match self {
            Self::Vmm => format!("path={}", socket.display()),
            Self::Virtiofsd => format!("--socket-path={}", socket.display()),
        }
    }

    fn pid_file(self, state_dir: &Path) -> PathBuf {
        state_dir.join(format!("{}.pid", self.name()))
    }

    fn log(self, state_dir: &Path) -> PathBuf {
        state_dir.join(format!("{}.log", self.name()))
    }
}

/// The VMM process: everything else arrives through the API.
pub fn vmm_argv(spec: &VmSpec) -> Vec<String> {
    vec![
        "cloud-hypervisor".into(),
        "--api-socket".into(),
        Daemon::Vmm.socket_arg(&spec.state_dir),
        "--event-monitor".into(),
        format!("path={}", event_monitor(&spec.state_dir).display()),
    ]
}

/// The Rust virtiofsd sharing the host store with this VM only.
pub fn virtiofsd_argv(spec: &VmSpec) -> Vec<String> {
    vec![
        "virtiofsd".into(),
        Daemon::Virtiofsd.socket_arg(&spec.state_dir),
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
        // VmSpec's size is whole 2 MiB pages (vm_memory_bytes): any other
        // size is accepted here and refused at vm.boot.
        "memory": { "size": spec.memory_bytes, "shared": true },
        "fs": [{
            "tag": STORE_TAG,
            "socket": virtiofs_socket(&spec.state_dir).display().to_string(),
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

/// Runs each VM as a cloud-hypervisor process and a virtiofsd process.
#[derive(Debug, Clone)]
pub struct CloudHypervisor {
    pub program: PathBuf,
    pub virtiofsd: PathBuf,
    /// A command both processes run under, e.g. `ip netns exec NS`; it
    /// must exec or wait for its command, not daemonize.
    pub prefix: Vec<String>,
    /// How long each process may take to open its socket.
    pub start_timeout: Duration,
    /// How long the VMM may take to answer one API request.
    pub request_timeout: Duration,
    /// How long it may take to answer `vm.boot`.
    pub boot_timeout: Duration,
    /// How long a process may take to exit after `vmm.shutdown`, SIGTERM
    /// or SIGKILL.
    pub exit_timeout: Duration,
    /// The bridge every VM's tap joins, brought up, when set.
    pub bridge: Option<String>,
}

impl Default for CloudHypervisor {
    fn default() -> Self {
        Self {
            program: PathBuf::from("cloud-hypervisor"),
            virtiofsd: PathBuf::from("virtiofsd"),
            prefix: Vec::new(),
            start_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
            boot_timeout: BOOT_TIMEOUT,
            exit_timeout: Duration::from_secs(10),
            bridge: None,
        }
    }
}

impl CloudHypervisor {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Vmm for CloudHypervisor {
    /// virtiofsd, then the VMM, then the VM through the API; on any
    /// failure both processes are ended again.
    async fn start(&self, spec: &VmSpec) -> Result<Pid, VmError> {
        let dir = &spec.state_dir;
        if let Some(pid) = self.pid(dir).await {
            return Err(api_error(
                dir,
                "start",
                format!("this VM already runs as pid {pid}; stop it first"),
            ));
        }
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| VmError::State {
                path: dir.clone(),
                source,
            })?;
        // A crashed run leaves its virtiofsd, its sockets (binding over
        // them fails) and its console log (whose readiness line would pass
        // for this boot's).
        self.clean_up(dir).await?;
        remove(&spec.serial_log()).await?;
        // And its events, whose resets would pass for this boot's.
        remove(&event_monitor(dir)).await?;
        match self.boot(spec).await {
            Ok(pid) => Ok(pid),
            Err(error) => {
                if let Err(cleanup) = self.clean_up(dir).await {
                    tracing::warn!(%cleanup, "cannot clean up after a failed start");
                }
                Err(error)
            }
        }
    }

    async fn pid(&self, state_dir: &Path) -> Option<Pid> {
        running(Daemon::Vmm, state_dir).await
    }

    async fn resets(&self, state_dir: &Path) -> super::Resets {
        use tokio::io::AsyncReadExt as _;
        let Ok(file) = tokio::fs::File::open(event_monitor(state_dir)).await else {
            return super::Resets::default();
        };
        let mut events = Vec::new();
        if file
            .take(MAX_EVENT_BYTES)
            .read_to_end(&mut events)
            .await
            .is_err()
        {
            return super::Resets::default();
        }
        resets_in(&events)
    }

    /// The power button, then after `grace` `vm.shutdown`; `vm.delete` and
    /// `vmm.shutdown`; then signals, to both processes.
    async fn stop(&self, state_dir: &Path, grace: Duration) -> Result<(), VmError> {
        let put = |endpoint| self.send(state_dir, "PUT", endpoint, None);
        // Each step is more forceful than the last, so a refusal only moves
        // on to the next; a VMM that does not answer at all gets signals.
        if let Some(pid) = self.pid(state_dir).await
            && put("vm.power-button").await.is_ok()
        {
            let off = self.powered_off(state_dir, pid, grace).await;
            if alive(pid) {
                if !off {
                    let _ = put("vm.shutdown").await;
                }
                let _ = put("vm.delete").await;
                let _ = put("vmm.shutdown").await;
                exited(pid, self.exit_timeout).await;
            }
        }
        self.clean_up(state_dir).await
    }
}

impl CloudHypervisor {
    async fn boot(&self, spec: &VmSpec) -> Result<Pid, VmError> {
        let dir = &spec.state_dir;
        let mut argv = virtiofsd_argv(spec);
        argv[0] = self.virtiofsd.display().to_string();
        self.launch(Daemon::Virtiofsd, dir, argv).await?;
        let mut argv = vmm_argv(spec);
        argv[0] = self.program.display().to_string();
        self.launch(Daemon::Vmm, dir, argv).await?;

        let ping = self.call(dir, "GET", "vmm.ping", None).await?;
        check_version(dir, &ping)?;
        self.call(dir, "PUT", "vm.create", Some(&create_body(spec)))
            .await?;
        self.call_within(self.boot_timeout, dir, "PUT", "vm.boot", None)
            .await?;
        let info = self.call(dir, "GET", "vm.info", None).await?;
        let state = info
            .json()
            .and_then(|i| i["state"].as_str().map(str::to_owned));
        if state.as_deref() != Some("Running") {
            let state = state.unwrap_or_else(|| "in no state it names".into());
            return Err(api_error(
                dir,
                "GET vm.info",
                format!("the VM is {state} after vm.boot, not Running"),
            ));
        }
        let pid = self.pid(dir).await.ok_or_else(|| {
            let file = Daemon::Vmm.pid_file(dir);
            let message = format!("{} names no VMM of this VM", file.display());
            api_error(dir, "start", message)
        })?;
        // cloud-hypervisor made the tap, and brought it up, at vm.boot.
        if let Some(bridge) = &self.bridge {
            super::join_bridge(VMM, &self.prefix, spec, bridge).await?;
        }
        Ok(pid)
    }

    /// Starts `argv` under the prefix in a session of its own (so that it
    /// outlives the agent), output appended to its log, and waits until it
    /// opens its socket.
    async fn launch(&self, daemon: Daemon, dir: &Path, argv: Vec<String>) -> Result<(), VmError> {
        let log_path = daemon.log(dir);
        let state = |source| VmError::State {
            path: log_path.clone(),
            source,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(state)?;
        let log_too = log.try_clone().map_err(state)?;
        let mut words = self.prefix.iter().cloned().chain(
            [
                "setsid".into(),
                "/bin/sh".into(),
                "-c".into(),
                WRITE_PID_AND_EXEC.into(),
                daemon.pid_file(dir).display().to_string(),
            ]
            .into_iter()
            .chain(argv),
        );
        let program = words.next().unwrap_or_default();
        let mut child = tokio::process::Command::new(&program)
            .args(words)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_too)
            .spawn()
            .map_err(|source| VmError::Spawn { program, source })?;
        let opened = self.wait_open(daemon, dir, &mut child).await;
        if opened.is_err() {
            let _ = child.start_kill();
        }
        // It is our child until it exits: reap it then, or it lingers as
        // a zombie.
        tokio::spawn(async move { child.wait().await });
        opened
    }

    async fn wait_open(
        &self,
        daemon: Daemon,
        dir: &Path,
        child: &mut tokio::process::Child,
    ) -> Result<(), VmError> {
        let socket = daemon.socket(dir);
        let deadline = Instant::now() + self.start_timeout;
        loop {
            let open = match daemon {
                Daemon::Vmm => UnixStream::connect(&socket).await.is_ok(),
                // Not connected to: virtiofsd serves a single connection,
                // and exits when it ends. It listens once the table of
                // unix sockets says so: ours, since it binds before it
                // moves into namespaces of its own (`--sandbox`). Under a
                // prefix, which may have its own network namespace, the
                // socket's file has to do.
                Daemon::Virtiofsd if self.prefix.is_empty() => {
                    listening(Path::new("/proc/self/net/unix"), &socket).await
                }
                Daemon::Virtiofsd => tokio::fs::metadata(&socket)
                    .await
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())),
            };
            if open {
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(VmError::Api {
                    vmm: daemon.name(),
                    request: "start".into(),
                    message: format!(
                        "it exited ({status}) before opening {}; see {}",
                        socket.display(),
                        daemon.log(dir).display()
                    ),
                });
            }
            if Instant::now() >= deadline {
                return Err(VmError::Timeout {
                    vmm: daemon.name(),
                    what: "open its socket",
                    secs: self.start_timeout.as_secs(),
                    log: daemon.log(dir),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls until the VM is shut down or its VMM gone, for at most `grace`.
    async fn powered_off(&self, dir: &Path, pid: Pid, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        loop {
            if !alive(pid) {
                return true;
            }
            let info = tokio::time::timeout_at(deadline, self.send(dir, "GET", "vm.info", None));
            if let Ok(Ok(info)) = info.await {
                let state = info
                    .json()
                    .and_then(|i| i["state"].as_str().map(str::to_owned));
                // 404: there is no VM any more. After vm.shutdown the VM is
                // `Created` again (cloud-hypervisor never says `Shutdown`
                // there); a guest that powers off ends the VMM.
                if info.status == 404 || matches!(state.as_deref(), Some("Created" | "Shutdown")) {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL * 5).await;
        }
    }

    /// Ends both processes of the VM in `dir` and removes their sockets
    /// and pid files.
    async fn clean_up(&self, dir: &Path) -> Result<(), VmError> {
        for daemon in [Daemon::Vmm, Daemon::Virtiofsd] {
            if let Some(pid) = running(daemon, dir).await {
                self.terminate(daemon, dir, pid).await?;
            }
        }
        for daemon in [Daemon::Vmm, Daemon::Virtiofsd] {
            let socket = daemon.socket(dir);
            remove(&socket).await?;
            remove(&daemon.pid_file(dir)).await?;
            // cloud-hypervisor locks its API socket (`api.sock.lock`),
            // virtiofsd writes its pid beside its own (`virtiofs.sock.pid`);
            // neither removes the file.
            for suffix in [".lock", ".pid"] {
                let mut beside = socket.clone().into_os_string();
                beside.push(suffix);
                remove(Path::new(&beside)).await?;
            }
        }
        Ok(())
    }

    async fn terminate(&self, daemon: Daemon, dir: &Path, pid: Pid) -> Result<(), VmError> {
        for signal in [Signal::SIGTERM, Signal::SIGKILL] {
            let _ = kill(pid, signal);
            if exited(pid, self.exit_timeout).await {
                return Ok(());
            }
        }
        Err(VmError::Timeout {
            vmm: daemon.name(),
            what: "exit after SIGKILL",
            secs: self.exit_timeout.as_secs(),
            log: daemon.log(dir),
        })
    }

    /// An API request; a non-2xx answer is an error.
    async fn call(
        &self,
        dir: &Path,
        method: &str,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<Response, VmError> {
        self.call_within(self.request_timeout, dir, method, endpoint, body)
            .await
    }

    /// [`Self::call`] with its own timeout.
    async fn call_within(
        &self,
        timeout: Duration,
        dir: &Path,
        method: &str,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<Response, VmError> {
        let response = self
            .send_within(timeout, dir, method, endpoint, body)
            .await?;
        if (200..300).contains(&response.status) {
            return Ok(response);
        }
        let message = format!("HTTP {}: {}", response.status, reason(&response));
        Err(api_error(dir, &format!("{method} {endpoint}"), message))
    }

    /// An API request, whatever its answer, within the request timeout.
    async fn send(
        &self,
        dir: &Path,
        method: &str,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<Response, VmError> {
        self.send_within(self.request_timeout, dir, method, endpoint, body)
            .await
    }

    async fn send_within(
        &self,
        timeout: Duration,
        dir: &Path,
        method: &str,
        endpoint: &str,
        body: Option<&Value>,
    ) -> Result<Response, VmError> {
        let name = format!("{method} {endpoint}");
        let socket = api_socket(dir);
        let sent = request(&socket, method, endpoint, body);
        match tokio::time::timeout(timeout, sent).await {
            Ok(Err(VmError::Api { message, .. })) => Err(api_error(dir, &name, message)),
            Ok(answer) => answer,
            Err(_) => {
                let secs = timeout.as_secs();
                Err(api_error(dir, &name, format!("no answer within {secs} s")))
            }
        }
    }
}

/// Why cloud-hypervisor refused a request: its body is the chain of
/// errors as a JSON array (`["Error from API","The VM could not boot",
/// "Memory manager error",…]`), said here as one sentence.
fn reason(response: &Response) -> String {
    if let Some(Value::Array(chain)) = response.json() {
        let words: Vec<&str> = chain
            .iter()
            .filter_map(Value::as_str)
            .filter(|w| *w != "Error from API")
            .collect();
        if !words.is_empty() {
            return words.join(": ");
        }
    }
    String::from_utf8_lossy(&response.body).trim().to_owned()
}

/// Refuses a cloud-hypervisor older than [`MIN_VERSION`], by `vmm.ping`'s
/// `version` (`v54.0` or `54.0.0`).
fn check_version(dir: &Path, ping: &Response) -> Result<(), VmError> {
    let version = ping
        .json()
        .and_then(|p| p["version"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let major = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major >= MIN_VERSION => Ok(()),
        _ => Err(api_error(
            dir,
            "GET vmm.ping",
            format!(
                "this is cloud-hypervisor {version:?}; Procurator needs v{MIN_VERSION} or later \
                 (older ones give every VM's host tap the same address)"
            ),
        )),
    }
}

/// Whether `table` (a network namespace's `/proc/…/net/unix`) lists a unix
/// socket bound at `path` that accepts connections (`__SO_ACCEPTCON`).
async fn listening(table: &Path, path: &Path) -> bool {
    const ACCEPTING: u32 = 0x0001_0000;
    let Ok(table) = tokio::fs::read_to_string(table).await else {
        return false;
    };
    let path = path.as_os_str().to_string_lossy();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() >= 8
            && fields[7] == path
            && u32::from_str_radix(fields[3], 16).is_ok_and(|flags| flags & ACCEPTING != 0)
    })
}

/// The guest's resets on cloud-hypervisor's event monitor: pretty-printed
/// JSON objects, one after another.
fn resets_in(events: &[u8]) -> super::Resets {
    let mut resets = super::Resets::default();
    for event in serde_json::Deserializer::from_slice(events).into_iter::<Value>() {
        // A half-written last event ends the read.
        let Ok(event) = event else { break };
        if event["source"] == "vm" && event["event"] == "rebooting" {
            resets.count += 1;
            let secs = event["timestamp"]["secs"].as_u64().unwrap_or_default();
            resets.last = Some(format!(
                "cloud-hypervisor's event monitor says the VM was rebooting {secs} s after its VMM started"
            ));
        }
    }
    resets
}

/// An API error pointing at the VMM's log.
fn api_error(dir: &Path, request: &str, message: String) -> VmError {
    VmError::Api {
        vmm: VMM,
        request: request.to_owned(),
        message: format!("{message}; see {}", Daemon::Vmm.log(dir).display()),
    }
}

/// `daemon`'s process for the VM in `dir`: its pid file names a live
/// process with this VM's socket on its command line (a reused pid has
/// not).
async fn running(daemon: Daemon, dir: &Path) -> Option<Pid> {
    let text = tokio::fs::read_to_string(daemon.pid_file(dir)).await.ok()?;
    // 0 and negative pids would signal process groups.
    let pid = text.trim().parse::<i32>().ok().filter(|pid| *pid > 0)?;
    let cmdline = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    let ours = daemon.socket_arg(dir);
    let pid = Pid::from_raw(pid);
    let named = cmdline.split(|b| *b == 0).any(|arg| arg == ours.as_bytes());
    (named && alive(pid)).then_some(pid)
}

/// Whether `pid` runs. A zombie does not: the processes are our children
/// until reaped.
fn alive(pid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which may hold anything but ends
    // at the last `)`.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
}

/// Polls until `pid` is gone, for at most `timeout`.
async fn exited(pid: Pid, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn remove(path: &Path) -> Result<(), VmError> {
    match tokio::fs::remove_file(path).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(VmError::State {
            path: path.to_owned(),
            source,
        }),
    }
}
