//! The lifecycle runs against a stand-in cloud-hypervisor (`fake.rs`),
//! which answers as the real one does, and the real virtiofsd: real
//! cloud-hypervisor needs hardware virtualisation.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::fake::{Role, script_with, virtiofsd};
use super::http::parse_response;
use super::*;
use crate::vm::openapi::OpenApi;
use crate::vm::tests::spec;

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
            "path=/var/lib/procurator/vms/web-0/api.sock",
            "--event-monitor",
            "path=/var/lib/procurator/vms/web-0/events.json"
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
    // cloud-hypervisor's own framing: an empty reason, no Content-Length.
    let bare = parse_response(b"HTTP/1.1 204 \r\n\r\n").unwrap().unwrap();
    assert_eq!((bare.status, bare.body.len()), (204, 0));
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

/// A VM of a stand-in cloud-hypervisor in `role` and the real virtiofsd,
/// in a temporary folder.
fn stand_ins(vmm: Role) -> (TempDir, VmSpec, CloudHypervisor) {
    stand_ins_with(vmm, &[])
}

fn stand_ins_with(vmm: Role, env: &[(&str, &str)]) -> (TempDir, VmSpec, CloudHypervisor) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let ch = CloudHypervisor {
        program: script_with(&bin, vmm, env),
        virtiofsd: virtiofsd(),
        start_timeout: Duration::from_secs(30),
        request_timeout: Duration::from_secs(10),
        exit_timeout: Duration::from_secs(10),
        ..CloudHypervisor::new()
    };
    let mut s = spec();
    s.state_dir = dir.path().join("vms/web-0");
    (dir, s, ch)
}

/// Live processes with `dir` on their command line (a zombie has none).
fn processes_under(dir: &Path) -> Vec<Pid> {
    let dir = dir.display().to_string();
    let ours = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let pid = name.parse::<i32>().ok().filter(|_| name != ours)?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let pid = Pid::from_raw(pid);
            (String::from_utf8_lossy(&cmdline).contains(&dir) && alive(pid)).then_some(pid)
        })
        .collect()
}

/// Kills whatever a test started in its folder, however it ends.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in processes_under(&self.0) {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

fn pid_in(file: PathBuf) -> Pid {
    Pid::from_raw(
        std::fs::read_to_string(file)
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
    )
}

/// The requests the stand-in VMM answered, with their statuses.
fn requests(spec: &VmSpec) -> Vec<String> {
    let log = spec.state_dir.join("requests.log");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines().map(str::to_owned).collect()
}

/// What the OpenAPI document refused of what was sent: nothing, or a
/// field is misspelt (which the real binary would silently ignore).
fn assert_schema_kept(spec: &VmSpec) {
    let log = spec.state_dir.join("schema-violations.log");
    let text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(text.is_empty(), "bodies the schema refuses: {text}");
}

const STARTED: [&str; 4] = [
    "GET /api/v1/vmm.ping 200",
    "PUT /api/v1/vm.create 204",
    "PUT /api/v1/vm.boot 204",
    "GET /api/v1/vm.info 200",
];

/// Nothing of the VM runs and its state folder holds no socket, pid or
/// lock file.
fn assert_gone(dir: &TempDir, spec: &VmSpec) {
    // A process killed a moment ago may still be on its way out.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !processes_under(dir.path()).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_under(dir.path()), []);
    let left: Vec<String> = std::fs::read_dir(&spec.state_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| {
                    name.ends_with(".sock") || name.ends_with(".pid") || name.ends_with(".lock")
                })
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "left in the state folder: {left:?}");
}

/// Polls until `pid` has exited, for at most 10 s.
async fn gone_soon(pid: Pid) -> bool {
    exited(pid, Duration::from_secs(10)).await
}

#[tokio::test]
async fn a_vm_starts_is_found_by_its_pid_file_and_stops_cleanly() {
    let (dir, spec, ch) = stand_ins(Role::Vmm);
    let _guard = KillOnDrop(dir.path().to_owned());

    let pid = ch.start(&spec).await.unwrap();
    assert_ne!(pid.as_raw(), std::process::id() as i32);
    assert_eq!(ch.pid(&spec.state_dir).await, Some(pid));
    let virtiofsd = pid_in(Daemon::Virtiofsd.pid_file(&spec.state_dir));
    assert!(alive(virtiofsd));
    assert_eq!(requests(&spec), STARTED);
    assert_eq!(
        ch.resets(&spec.state_dir).await,
        crate::vm::Resets::default()
    );

    ch.stop(&spec.state_dir, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ch.pid(&spec.state_dir).await, None);
    assert!(!alive(pid) && !alive(virtiofsd));
    assert_gone(&dir, &spec);
    // The guest obeyed the power button and powered off, which ends the
    // VMM: nothing more was needed.
    assert_eq!(
        requests(&spec)[STARTED.len()..],
        ["PUT /api/v1/vm.power-button 204"]
    );
    assert_schema_kept(&spec);
    // Stopping it again is no error.
    ch.stop(&spec.state_dir, Duration::from_secs(1))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_guest_that_ignores_the_power_button_is_shut_down_after_the_grace() {
    let (dir, spec, ch) = stand_ins(Role::IgnoringPowerButton);
    let _guard = KillOnDrop(dir.path().to_owned());
    let pid = ch.start(&spec).await.unwrap();
    let virtiofsd = pid_in(Daemon::Virtiofsd.pid_file(&spec.state_dir));

    let grace = Duration::from_millis(300);
    let began = std::time::Instant::now();
    ch.stop(&spec.state_dir, grace).await.unwrap();
    assert!(began.elapsed() >= grace, "it did not wait for the guest");
    assert!(!alive(pid) && !alive(virtiofsd));
    assert_gone(&dir, &spec);
    let stopping = &requests(&spec)[STARTED.len()..];
    assert_eq!(stopping[0], "PUT /api/v1/vm.power-button 204");
    assert!(
        stopping[1..stopping.len() - 3]
            .iter()
            .all(|r| r == "GET /api/v1/vm.info 200")
    );
    assert_eq!(
        stopping[stopping.len() - 3..],
        [
            "PUT /api/v1/vm.shutdown 204",
            "PUT /api/v1/vm.delete 204",
            "PUT /api/v1/vmm.shutdown 200",
        ]
    );
}

#[tokio::test]
async fn a_vm_starts_again_after_its_vmm_crashed() {
    let (dir, spec, ch) = stand_ins(Role::Vmm);
    let _guard = KillOnDrop(dir.path().to_owned());
    let crashed = ch.start(&spec).await.unwrap();
    let old_virtiofsd = pid_in(Daemon::Virtiofsd.pid_file(&spec.state_dir));
    kill(crashed, Signal::SIGKILL).unwrap();
    assert!(gone_soon(crashed).await);
    assert_eq!(ch.pid(&spec.state_dir).await, None);
    // Its socket is left; its virtiofsd saw its VMM go and exited.
    assert!(api_socket(&spec.state_dir).exists());
    assert!(gone_soon(old_virtiofsd).await, "virtiofsd outlived its VMM");

    let pid = ch.start(&spec).await.unwrap();
    assert_ne!(pid, crashed);
    let virtiofsd = pid_in(Daemon::Virtiofsd.pid_file(&spec.state_dir));
    assert!(alive(virtiofsd));
    assert_eq!(requests(&spec)[STARTED.len()..], STARTED);

    ch.stop(&spec.state_dir, Duration::from_secs(10))
        .await
        .unwrap();
    assert_gone(&dir, &spec);
}

#[tokio::test]
async fn a_refused_create_fails_the_start_and_leaves_nothing_running() {
    let (dir, spec, ch) = stand_ins(Role::RefusingCreate);
    let _guard = KillOnDrop(dir.path().to_owned());
    let error = ch.start(&spec).await.unwrap_err().to_string();
    // cloud-hypervisor's chain of errors, as one sentence.
    assert!(
        error.contains(
            "PUT vm.create: HTTP 500: The VM could not be created: the stand-in refuses to create VMs"
        ),
        "{error}"
    );
    let log = Daemon::Vmm.log(&spec.state_dir);
    assert!(error.contains(&log.display().to_string()), "{error}");
    assert_gone(&dir, &spec);
    assert_eq!(
        requests(&spec),
        ["GET /api/v1/vmm.ping 200", "PUT /api/v1/vm.create 500"]
    );
}

#[tokio::test]
async fn memory_that_is_not_whole_huge_pages_fails_at_boot_with_cloud_hypervisors_reason() {
    let (dir, mut spec, ch) = stand_ins(Role::Vmm);
    let _guard = KillOnDrop(dir.path().to_owned());
    // "2 GB", as a spec built some other way than VmSpec::new would have it.
    spec.memory_bytes = 2_000_000_000;
    let error = ch.start(&spec).await.unwrap_err().to_string();
    assert!(
        error.contains(
            "PUT vm.boot: HTTP 500: The VM could not boot: Memory manager error: Memory size is misaligned"
        ),
        "{error}"
    );
    assert_gone(&dir, &spec);
    // VmSpec::new rounds it: the same "2 GB" boots.
    spec.memory_bytes = procurator_core::artifact::vm_memory_bytes(2_000_000_000);
    ch.start(&spec).await.unwrap();
    ch.stop(&spec.state_dir, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_boot_slower_than_a_request_is_waited_for() {
    let (dir, spec, mut ch) = stand_ins(Role::SlowBoot);
    let _guard = KillOnDrop(dir.path().to_owned());
    // vm.boot takes 3 s: longer than any other request may, as long as
    // cloud-hypervisor may wait for virtiofsd.
    ch.request_timeout = Duration::from_secs(1);
    ch.boot_timeout = Duration::from_secs(20);
    ch.start(&spec).await.unwrap();
    assert_eq!(requests(&spec), STARTED);
    ch.stop(&spec.state_dir, Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn vm_boot_is_not_sent_before_virtiofsd_listens() {
    let (dir, spec, mut ch) = stand_ins(Role::Vmm);
    let _guard = KillOnDrop(dir.path().to_owned());
    // A "virtiofsd" that never opens its socket.
    ch.virtiofsd = PathBuf::from("/bin/true");
    let error = ch.start(&spec).await.unwrap_err().to_string();
    assert!(error.contains("virtiofsd start: it exited"), "{error}");
    assert!(error.contains("virtiofs.sock"), "{error}");
    assert_eq!(
        requests(&spec),
        Vec::<String>::new(),
        "the VMM was asked nothing"
    );
    assert_gone(&dir, &spec);
}

#[tokio::test]
async fn an_old_cloud_hypervisor_is_refused() {
    let (dir, spec, ch) = stand_ins(Role::Old);
    let _guard = KillOnDrop(dir.path().to_owned());
    let error = ch.start(&spec).await.unwrap_err().to_string();
    assert!(
        error.contains("this is cloud-hypervisor \"48.0.0\"; Procurator needs v49 or later"),
        "{error}"
    );
    assert_gone(&dir, &spec);
    assert_eq!(requests(&spec), ["GET /api/v1/vmm.ping 200"]);
}

#[tokio::test]
async fn a_guest_that_resets_is_seen_on_the_event_monitor() {
    let (dir, spec, ch) = stand_ins(Role::RebootingGuest);
    let _guard = KillOnDrop(dir.path().to_owned());
    let pid = ch.start(&spec).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let resets = loop {
        let resets = ch.resets(&spec.state_dir).await;
        if resets.count > 0 || Instant::now() >= deadline {
            break resets;
        }
        tokio::time::sleep(POLL).await;
    };
    assert_eq!(resets.count, 1, "{resets:?}");
    assert!(
        resets
            .last
            .as_deref()
            .unwrap_or_default()
            .contains("was rebooting"),
        "{resets:?}"
    );
    // The same process runs it: a reset does not end cloud-hypervisor.
    assert_eq!(ch.pid(&spec.state_dir).await, Some(pid));
    ch.stop(&spec.state_dir, Duration::from_secs(10))
        .await
        .unwrap();
    // The next start does not count the last one's resets.
    std::fs::create_dir_all(&spec.state_dir).unwrap();
}

#[tokio::test]
async fn a_guest_that_resets_before_it_is_ready_fails_at_once_and_is_not_left_running() {
    use crate::vm::host::{Assignment, Outcome, VmHost};
    let (dir, _, ch) = stand_ins(Role::RebootingGuest);
    let _guard = KillOnDrop(dir.path().to_owned());
    // A system closure under the test's store root (the stand-in boots no
    // kernel: its files need only exist).
    let closure = format!("/nix/store/{}-nixos-system-web-0", "a".repeat(32));
    let root = dir
        .path()
        .join("root")
        .join(closure.trim_start_matches('/'));
    std::fs::create_dir_all(&root).unwrap();
    for file in ["kernel", "initrd", "init"] {
        std::fs::write(root.join(file), b"").unwrap();
    }
    let mut host = VmHost::new(ch, dir.path().join("vms"), dir.path().join("root"));
    host.ready_timeout = Duration::from_secs(120);
    host.shutdown_grace = Duration::from_secs(5);
    let wanted = Assignment {
        instance: procurator_core::MachineName::parse("web-0").unwrap(),
        closure: procurator_core::StorePath::parse(&closure).unwrap(),
        demand: procurator_core::artifact::Demand {
            milli_cpus: 1000,
            memory_bytes: 256 << 20,
        },
        deployment_id: String::new(),
        guest_agent_connected: false,
        auto_rollback: true,
    };
    let began = std::time::Instant::now();
    let outcomes = host.reconcile(std::slice::from_ref(&wanted)).await.unwrap();
    let took = began.elapsed();
    let Some(Outcome::Failed { reason }) = outcomes.get(&wanted.instance) else {
        panic!("{outcomes:?}");
    };
    assert!(
        reason.contains("reset before it reported ready"),
        "{reason}"
    );
    assert!(
        took < host.ready_timeout / 4,
        "it waited {took:?}, as for the ready timeout, not for the reset"
    );
    assert_eq!(processes_under(dir.path()), [], "it was left running");
}

#[tokio::test]
async fn stopping_a_vm_that_is_not_running_is_ok() {
    let (dir, spec, ch) = stand_ins(Role::Vmm);
    ch.stop(&spec.state_dir, Duration::ZERO).await.unwrap();
    std::fs::create_dir_all(&spec.state_dir).unwrap();
    for junk in ["", "garbage", "0", "-1"] {
        std::fs::write(Daemon::Vmm.pid_file(&spec.state_dir), junk).unwrap();
        std::fs::write(Daemon::Virtiofsd.pid_file(&spec.state_dir), junk).unwrap();
        assert_eq!(ch.pid(&spec.state_dir).await, None);
        ch.stop(&spec.state_dir, Duration::ZERO).await.unwrap();
        assert_gone(&dir, &spec);
    }
}

#[tokio::test]
async fn a_pid_file_naming_an_unrelated_process_is_ignored() {
    let (dir, spec, ch) = stand_ins(Role::Vmm);
    std::fs::create_dir_all(&spec.state_dir).unwrap();
    // A pid reused after a reboot: a live process, but not this VM's.
    let mut unrelated = tokio::process::Command::new("sleep")
        .arg("60")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = unrelated.id().unwrap().to_string();
    std::fs::write(Daemon::Vmm.pid_file(&spec.state_dir), &pid).unwrap();
    std::fs::write(Daemon::Virtiofsd.pid_file(&spec.state_dir), &pid).unwrap();
    assert_eq!(ch.pid(&spec.state_dir).await, None);
    ch.stop(&spec.state_dir, Duration::ZERO).await.unwrap();
    assert!(unrelated.try_wait().unwrap().is_none(), "stop killed it");
    assert_gone(&dir, &spec);
}

#[tokio::test]
async fn the_stand_in_answers_as_cloud_hypervisor_does() {
    let dir = tempfile::tempdir().unwrap();
    let _guard = KillOnDrop(dir.path().to_owned());
    let socket = api_socket(dir.path());
    let script = script_with(
        dir.path(),
        Role::Vmm,
        &[("PROCURATOR_STAND_IN_VHOST_WAIT_MS", "200")],
    );
    let mut vmm = tokio::process::Command::new(script)
        .args(["--api-socket", &format!("path={}", socket.display())])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while UnixStream::connect(&socket).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the stand-in did not open {socket:?}"
        );
        tokio::time::sleep(POLL).await;
    }
    let status = async |method, endpoint, body: Option<&Value>| {
        let response = request(&socket, method, endpoint, body).await.unwrap();
        (
            response.status,
            String::from_utf8_lossy(&response.body).into_owned(),
        )
    };
    let mut s = spec();
    s.state_dir = dir.path().to_owned();
    let config = create_body(&s);
    let mut typo = config.clone();
    typo["memory"]["shraed"] = json!(true);

    // Before vm.create.
    assert_eq!(status("PUT", "vm.boot", None).await.0, 404, "not created");
    assert_eq!(status("GET", "vm.info", None).await.0, 404);
    // A wrong method is 400, an unknown endpoint 404.
    let bad = (400, r#"["Bad Request"]"#.to_owned());
    assert_eq!(status("GET", "vm.boot", None).await, bad);
    let missing = (404, r#"["Not Found"]"#.to_owned());
    assert_eq!(status("PUT", "vm.nothing", None).await, missing);
    assert_eq!(status("PUT", "vm.create", None).await.0, 400, "no body");
    // A misspelt field is taken, and ignored (the schema check notes it).
    assert_eq!(status("PUT", "vm.create", Some(&typo)).await.0, 204);
    let noted = std::fs::read_to_string(dir.path().join("schema-violations.log")).unwrap();
    assert!(noted.contains("memory.shraed"), "{noted}");
    assert_eq!(status("PUT", "vm.create", Some(&config)).await.0, 500);
    assert_eq!(status("PUT", "vm.delete", None).await.0, 204);
    assert_eq!(status("PUT", "vm.create", Some(&config)).await.0, 204);
    assert_eq!(status("PUT", "vm.boot", Some(&json!({}))).await.0, 400);
    // Not running: 500, and why, as the real one says it.
    let (code, text) = status("PUT", "vm.power-button", None).await;
    assert_eq!(code, 500);
    assert_eq!(
        text,
        r#"["Error from API","Error triggering power button","VM is not running"]"#
    );
    let (code, text) = status("PUT", "vm.shutdown", None).await;
    assert_eq!(
        (code, text.contains("The VM could not shutdown")),
        (500, true),
        "{text}"
    );
    // No virtiofsd listens on the configured socket.
    let (code, text) = status("PUT", "vm.boot", None).await;
    assert_eq!(
        (code, text.contains("virtiofs.sock")),
        (500, true),
        "{text}"
    );
    let (code, info) = status("GET", "vm.info", None).await;
    assert_eq!(code, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    OpenApi::load().validate("VmInfo", &info).unwrap();
    assert_eq!(info["state"], "Created");

    assert_eq!(status("PUT", "vmm.shutdown", None).await.0, 200);
    let ended = tokio::time::timeout(Duration::from_secs(10), vmm.wait()).await;
    assert!(ended.unwrap().unwrap().success());
    let log = std::fs::read_to_string(dir.path().join("requests.log")).unwrap();
    let logged: Vec<&str> = log.lines().collect();
    assert_eq!(logged.len(), 15, "{log}");
    assert_eq!(logged[0], "PUT /api/v1/vm.boot 404");
    assert_eq!(logged[14], "PUT /api/v1/vmm.shutdown 200");
}
