use base64::Engine as _;
use rcgen::{CertificateParams, IsCa, KeyPair};
use time::OffsetDateTime;

use super::*;
use crate::identity::Role;
use crate::pki::{init, is_ca};

fn fleet() -> (tempfile::TempDir, IssuingCa, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let files = init(dir.path(), &[], "alice").unwrap();
    let ca = IssuingCa::load(&files.ca_cert, &files.ca_key).unwrap();
    let ca_pem = std::fs::read(&files.ca_cert).unwrap();
    (dir, ca, ca_pem)
}

fn agent(name: &str) -> Identity {
    crate::pki::identity(Role::Agent, name, false).unwrap()
}

fn sign_now(ca: &IssuingCa, request_pem: &str, identity: &Identity) -> Signed {
    let request = CertificateRequest::parse(request_pem).unwrap();
    ca.sign(
        &request,
        identity,
        OffsetDateTime::now_utc(),
        std::time::Duration::from_secs(3600),
    )
    .unwrap()
}

#[test]
fn only_the_requests_key_is_signed_for_the_identity_given() {
    let (_dir, ca, ca_pem) = fleet();
    // A request that asks for a CA certificate with another name and role.
    let key = KeyPair::generate().unwrap();
    let mut asked = CertificateParams::new(vec!["operator.alice".to_owned()]).unwrap();
    asked.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let request = asked.serialize_request(&key).unwrap().pem().unwrap();

    let signed = sign_now(&ca, &request, &agent("web-1"));
    assert_eq!(signed.info.identity.to_string(), "agent/web-1");
    let leaf = crate::tls::first_certificate_der(signed.chain_pem.as_bytes()).unwrap();
    assert!(!is_ca(&leaf), "a request must not make a CA");
    assert!(certificate_is_for_key(
        signed.chain_pem.as_bytes(),
        &key.serialize_pem()
    ));
    let other = KeyPair::generate().unwrap();
    assert!(!certificate_is_for_key(
        signed.chain_pem.as_bytes(),
        &other.serialize_pem()
    ));
    crate::tls::verify_client_chain(&ca_pem, signed.chain_pem.as_bytes()).unwrap();
}

#[test]
fn a_machines_own_request_names_it_and_gets_a_fresh_serial() {
    let (_dir, ca, _) = fleet();
    let (key, request) = certificate_request("web-1").unwrap();
    let first = sign_now(&ca, &request, &agent("web-1"));
    let second = sign_now(&ca, &request, &agent("web-1"));
    assert!(certificate_is_for_key(first.chain_pem.as_bytes(), &key));
    assert_ne!(first.info.serial, second.info.serial);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!((first.info.not_after - (now + 3600)).abs() <= 2);
    // Asked to start now, it is not set back.
    assert_eq!(first.info.lifetime_secs(), 3600);
}

#[test]
fn a_short_lived_certificate_is_set_back_by_a_tenth_of_its_life() {
    let (_dir, ca, _) = fleet();
    let (_, request) = certificate_request("web-1").unwrap();
    let request = CertificateRequest::parse(&request).unwrap();
    let signed = ca
        .sign(
            &request,
            &agent("web-1"),
            OffsetDateTime::UNIX_EPOCH,
            std::time::Duration::from_secs(90),
        )
        .unwrap();
    assert_eq!(signed.info.lifetime_secs(), 99);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!(signed.info.renew_at() > now + 50, "renews too early");
}

#[test]
fn a_start_in_the_past_is_moved_up_to_the_clock_skew() {
    let (_dir, ca, _) = fleet();
    let (_, request) = certificate_request("web-1").unwrap();
    let request = CertificateRequest::parse(&request).unwrap();
    let now = OffsetDateTime::now_utc();
    let signed = ca
        .sign(
            &request,
            &agent("web-1"),
            now - time::Duration::days(30),
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let earliest = (now - CLOCK_SKEW).unix_timestamp() - 1;
    assert!(
        signed.info.not_before >= earliest,
        "{} < {earliest}",
        signed.info.not_before
    );
}

#[test]
fn oversized_and_tampered_requests_are_refused() {
    let big = "A".repeat(MAX_REQUEST_BYTES + 1);
    assert!(matches!(
        CertificateRequest::parse(&big),
        Err(SigningError::TooLarge)
    ));
    assert!(matches!(
        CertificateRequest::parse("not a request"),
        Err(SigningError::BadRequest(_))
    ));

    // A request whose signature does not match its content: someone else's
    // public key in it, without its private key.
    let (_, request) = certificate_request("web-1").unwrap();
    let body: String = request
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let mut der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = format!(
        "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
        base64::engine::general_purpose::STANDARD.encode(der)
    );
    assert!(matches!(
        CertificateRequest::parse(&tampered),
        Err(SigningError::BadRequest(_))
    ));
}

#[test]
fn an_intermediate_signs_what_the_fleet_ca_accepts() {
    let (dir, _, ca_pem) = fleet();
    let files = intermediate(dir.path(), false).unwrap();
    assert!(matches!(
        intermediate(dir.path(), false),
        Err(PkiError::Exists(_))
    ));
    let issuing = IssuingCa::load(&files.cert, &files.key).unwrap();
    let (_, request) = certificate_request("web-1").unwrap();
    let signed = sign_now(&issuing, &request, &agent("web-1"));
    // The chain carries the intermediate: the fleet CA alone verifies it.
    crate::tls::verify_client_chain(&ca_pem, signed.chain_pem.as_bytes()).unwrap();
}

#[test]
fn a_leaf_certificate_is_not_an_issuing_ca() {
    let (dir, _, _) = fleet();
    let agent_files = crate::pki::issue(dir.path(), Role::Agent, "web-1", &[], false).unwrap();
    assert!(matches!(
        IssuingCa::load(&agent_files.cert, &agent_files.key),
        Err(PkiError::NotACa(..))
    ));
}
