use std::os::unix::fs::PermissionsExt as _;

use procurator_core::pki::{CertificateRequest, IssuingCa, certificate_request};
use time::OffsetDateTime;

use super::*;

struct Fleet {
    dir: tempfile::TempDir,
    ca: IssuingCa,
    ca_pem: Vec<u8>,
}

impl Fleet {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = pki::init(dir.path(), &[], "alice").unwrap();
        Self {
            ca: IssuingCa::load(&files.ca_cert, &files.ca_key).unwrap(),
            ca_pem: std::fs::read(&files.ca_cert).unwrap(),
            dir,
        }
    }

    /// A key, and the answer a control plane would give for it.
    fn issued(&self, role: Role, name: &str) -> (String, IssuedCertificate) {
        let (key, request) = certificate_request(name).unwrap();
        let identity = pki::identity(role, name, false).unwrap();
        let signed = self
            .ca
            .sign(
                &CertificateRequest::parse(&request).unwrap(),
                &identity,
                OffsetDateTime::now_utc(),
                Duration::from_secs(3600),
            )
            .unwrap();
        let issued = IssuedCertificate {
            certificate_pem: signed.chain_pem,
            serial: signed.info.serial,
            not_after_ms: signed.info.not_after * 1000,
        };
        (key, issued)
    }

    fn files(&self) -> TlsFiles {
        let tls = self.dir.path().join("state/tls");
        TlsFiles {
            ca: self.dir.path().join("ca.crt"),
            cert: tls.join("agent.crt"),
            key: tls.join("agent.key"),
        }
    }
}

fn is_web_1(identity: &Identity) -> bool {
    identity.name.as_str() == "web-1"
}

#[test]
fn only_a_fleet_certificate_for_this_machine_and_key_is_taken() {
    let fleet = Fleet::new();
    let (key, issued) = fleet.issued(Role::Agent, "web-1");
    let info = check_issued(&fleet.ca_pem, &issued, &key, is_web_1).unwrap();
    assert_eq!(info.identity.to_string(), "agent/web-1");

    let (other_key, _) = fleet.issued(Role::Agent, "web-1");
    let err = check_issued(&fleet.ca_pem, &issued, &other_key, is_web_1).unwrap_err();
    assert!(err.contains("not for the key"), "{err}");

    let (key, other_machine) = fleet.issued(Role::Agent, "web-2");
    let err = check_issued(&fleet.ca_pem, &other_machine, &key, is_web_1).unwrap_err();
    assert!(err.contains("agent/web-2's"), "{err}");

    let (key, operator) = fleet.issued(Role::Operator, "web-1");
    let err = check_issued(&fleet.ca_pem, &operator, &key, is_web_1).unwrap_err();
    assert!(err.contains("operator/web-1's"), "{err}");

    let elsewhere = Fleet::new();
    let (key, foreign) = elsewhere.issued(Role::Agent, "web-1");
    let err = check_issued(&fleet.ca_pem, &foreign, &key, is_web_1).unwrap_err();
    assert!(err.contains("the fleet CA does not accept it"), "{err}");

    let huge = IssuedCertificate {
        certificate_pem: "x".repeat(MAX_CHAIN_BYTES + 1),
        ..IssuedCertificate::default()
    };
    assert!(check_issued(&fleet.ca_pem, &huge, &key, is_web_1).is_err());
}

#[test]
fn an_installed_pair_loads_with_a_private_key() {
    let fleet = Fleet::new();
    let files = fleet.files();
    let (key, issued) = fleet.issued(Role::Agent, "web-1");
    install(&files, &key, issued.certificate_pem.as_bytes()).unwrap();
    let material = files.load().unwrap();
    assert_eq!(material.identity.to_string(), "agent/web-1");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&files.key), 0o600);
    assert_eq!(mode(files.key.parent().unwrap()), 0o700);
    assert!(!next_of(&files.key).exists() && !next_of(&files.cert).exists());

    // A second install replaces both.
    let (key2, issued2) = fleet.issued(Role::Agent, "web-1");
    install(&files, &key2, issued2.certificate_pem.as_bytes()).unwrap();
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), key2);
}

#[test]
fn a_crash_between_the_renames_is_finished_and_half_a_pair_dropped() {
    let fleet = Fleet::new();
    let files = fleet.files();
    let (old_key, old) = fleet.issued(Role::Agent, "web-1");
    install(&files, &old_key, old.certificate_pem.as_bytes()).unwrap();

    // Both `.next` written, nothing renamed yet, or the key renamed only:
    // either way the new pair is whole and is put in place.
    let (new_key, new) = fleet.issued(Role::Agent, "web-1");
    std::fs::write(next_of(&files.key), &new_key).unwrap();
    std::fs::write(next_of(&files.cert), &new.certificate_pem).unwrap();
    finish_interrupted_install(&files).unwrap();
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), new_key);
    assert_eq!(
        std::fs::read_to_string(&files.cert).unwrap(),
        new.certificate_pem
    );

    let (newer_key, newer) = fleet.issued(Role::Agent, "web-1");
    std::fs::write(&files.key, &newer_key).unwrap();
    std::fs::write(next_of(&files.cert), &newer.certificate_pem).unwrap();
    finish_interrupted_install(&files).unwrap();
    files.load().unwrap();
    assert_eq!(
        std::fs::read_to_string(&files.cert).unwrap(),
        newer.certificate_pem
    );

    // A key without its certificate: the crash came while writing; the
    // pair in place stays.
    std::fs::write(next_of(&files.key), "half").unwrap();
    finish_interrupted_install(&files).unwrap();
    assert!(!next_of(&files.key).exists());
    assert_eq!(std::fs::read_to_string(&files.key).unwrap(), newer_key);
}

#[test]
fn a_join_token_file_holds_one_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    let token = format!("pjt_{}", "a-B_9".repeat(8));
    std::fs::write(&path, format!("{token}\n")).unwrap();
    let read = JoinToken::read(&path).unwrap();
    assert_eq!(read.token, token);
    assert!(
        !format!("{read:?}").contains(&token),
        "a token is never printed"
    );

    for (content, expected) in [
        ("", "does not hold a join token"),
        ("pjt_", "does not hold a join token"),
        ("pjt_abc def", "does not hold a join token"),
        ("ghp_0123456789", "does not hold a join token"),
    ] {
        std::fs::write(&path, content).unwrap();
        let err = JoinToken::read(&path).unwrap_err().to_string();
        assert!(err.contains(expected), "{content:?}: {err}");
    }
    std::fs::write(&path, "x".repeat(4096)).unwrap();
    let err = JoinToken::read(&path).unwrap_err().to_string();
    assert!(err.contains("longer than 256 bytes"), "{err}");
    let err = JoinToken::read(&dir.path().join("missing"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot open it"), "{err}");
}
