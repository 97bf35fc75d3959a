//! Under systemd (`Type=notify`) the control plane says when it serves and
//! when it stops: the real binary, with `NOTIFY_SOCKET` pointing at a
//! datagram socket of the test's, as systemd would set it.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use procurator_integration_tests::process::{Process, guarded};
use procurator_integration_tests::{self as harness, NixEnv, Pki};

fn next_state(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a state from the control plane within 60 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn the_control_plane_tells_systemd_it_is_ready_then_stopping() {
    let nix = NixEnv::temp().expect("nix env");
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::init(&nix, &dir.path().join("pki")).expect("pki");
    let notify = dir.path().join("notify");
    let systemd = UnixDatagram::bind(&notify).expect("bind the notify socket");
    systemd
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");

    let server = pki.control_plane();
    let ready_file = dir.path().join("ready");
    let mut cmd = guarded(&harness::bin("procurator-control-plane").expect("built"));
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tls-ca")
        .arg(pki.ca())
        .arg("--tls-cert")
        .arg(&server.cert)
        .arg("--tls-key")
        .arg(&server.key)
        .arg("--ready-file")
        .arg(&ready_file)
        .env("NOTIFY_SOCKET", &notify);
    nix.apply(&mut cmd);
    let mut process =
        Process::spawn("procurator-control-plane", cmd, &dir.path().join("cp.log")).expect("start");

    let ready = next_state(&systemd);
    let addr = std::fs::read_to_string(&ready_file).expect("the ready file comes first");
    assert_eq!(
        ready,
        format!("READY=1\nSTATUS=serving on {}", addr.trim()),
        "{}",
        process.log()
    );

    let status = process.stop(Duration::from_secs(30)).expect("stop");
    assert!(status.success(), "{status}\n{}", process.log());
    let stopping = next_state(&systemd);
    assert!(stopping.starts_with("STOPPING=1\n"), "{stopping}");
}
