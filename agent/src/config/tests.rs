use clap::Parser as _;
use procurator_core::pki;

use super::*;

const KEY: &str = "cache-1:XGZX9+uqvrp5OMNySYCxgI+TKKLNMAa8KBB1/AOI9Fc=";

struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        pki::init(dir.path(), &[], "admin").unwrap();
        pki::issue(dir.path(), Role::Agent, "worker-1", &[], false).unwrap();
        Pki { dir }
    }

    fn args(&self, cert: &str, extra: &[&str]) -> Vec<String> {
        let d = self.dir.path().display();
        let mut args: Vec<String> = [
            "procurator-agent",
            "--control-plane",
            "https://127.0.0.1:7700",
            "--tls-ca",
            &format!("{d}/ca.crt"),
            "--tls-cert",
            &format!("{d}/{cert}.crt"),
            "--tls-key",
            &format!("{d}/{cert}.key"),
            "--state-dir",
            &format!("{d}/state"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// `extra` flags are added, or replace the same flag given by [`Pki::args`].
    fn config(&self, cert: &str, extra: &[&str]) -> Result<Config, ConfigError> {
        let mut args = self.args(cert, &[]);
        for pair in extra.chunks(2) {
            match args.iter().position(|a| a == pair[0]) {
                Some(i) if pair[0] != "--substituter" => args[i + 1] = pair[1].to_string(),
                _ => args.extend(pair.iter().map(|s| s.to_string())),
            }
        }
        Config::from_cli(Cli::try_parse_from(args).unwrap())
    }
}

#[test]
fn a_good_configuration_loads_with_the_documented_defaults() {
    let pki = Pki::new();
    let config = pki
        .config(
            "agent-worker-1",
            &[
                "--substituter",
                "file:///srv/cache",
                "--trusted-public-key",
                KEY,
            ],
        )
        .unwrap();
    assert_eq!(config.substituters, ["file:///srv/cache"]);
    assert_eq!(config.trusted_public_keys, [KEY]);
    assert_eq!(
        config.system_profile,
        PathBuf::from("/nix/var/nix/profiles/system")
    );
    assert_eq!(
        (config.keepalive, config.max_backoff),
        (Duration::from_secs(20), Duration::from_secs(30))
    );
    let Credentials::Ready(material) = &config.credentials else {
        panic!("a certificate in place needs no enrollment");
    };
    assert_eq!(material.identity.name.as_str(), "worker-1");
    assert!(pki.dir.path().join("state").is_dir());
}

#[test]
fn repeated_flags_collect_and_space_separated_values_split() {
    let pki = Pki::new();
    let cli = Cli::try_parse_from(pki.args(
        "agent-worker-1",
        &[
            "--substituter",
            "https://a https://b",
            "--substituter",
            "file:///c",
        ],
    ))
    .unwrap();
    assert_eq!(cli.substituters, ["https://a", "https://b", "file:///c"]);
}

#[test]
fn bad_local_configuration_is_refused_with_a_clear_message() {
    let pki = Pki::new();
    let cases: Vec<(&str, Vec<&str>, &str)> = vec![
        ("agent-missing", vec![], "there is no certificate at"),
        (
            "agent-worker-1",
            vec!["--name", "worker-2"],
            "is the certificate of agent/worker-1, but --name says worker-2",
        ),
        ("operator-admin", vec![], "an agent needs role agent"),
        (
            "agent-worker-1",
            vec!["--trusted-public-key", "nonsense"],
            "is not a Nix public key",
        ),
        (
            "agent-worker-1",
            vec!["--substituter", "cache/dir"],
            "--substituter: \"cache/dir\" is not a store URI",
        ),
        (
            "agent-worker-1",
            vec!["--max-backoff", "0"],
            "--max-backoff must be at least 1 second",
        ),
        (
            "agent-worker-1",
            vec!["--control-plane", "http://cp:1"],
            "is not a control-plane address",
        ),
    ];
    for (cert, extra, expected) in cases {
        let err = pki.config(cert, &extra).unwrap_err().to_string();
        assert!(err.contains(expected), "{cert} {extra:?}: {err}");
    }
    // An unreadable key is a startup error, not a retry loop.
    std::fs::remove_file(pki.dir.path().join("agent-worker-1.key")).unwrap();
    let err = pki.config("agent-worker-1", &[]).unwrap_err().to_string();
    assert!(err.contains("cannot read private key"), "{err}");
}

#[test]
fn an_unwritable_state_directory_is_refused() {
    let pki = Pki::new();
    let file = pki.dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let state = file.join("state");
    let err = pki
        .config("agent-worker-1", &["--state-dir", state.to_str().unwrap()])
        .unwrap_err();
    assert!(err.to_string().starts_with("the state directory"), "{err}");
}

#[test]
fn a_vm_host_offers_the_flags_or_this_machine_less_a_reserve() {
    let pki = Pki::new();
    let load = |extra: &[&str]| {
        Cli::try_parse_from(pki.args("agent-worker-1", extra)).map(Config::from_cli)
    };
    let plain = load(&[]).unwrap().unwrap();
    assert_eq!(plain.vm_host, None);

    let given = load(&[
        "--vm-host",
        "--vm-cpus",
        "1.5",
        "--vm-memory-mib",
        "2048",
        "--vm-label",
        "rack-1",
        "--vm-bridge",
        "br0",
        "--vmm",
        "qemu",
        "--vm-ready-timeout",
        "90",
    ])
    .unwrap()
    .unwrap();
    let offered = given.vm_host.clone().unwrap();
    assert_eq!(offered.milli_cpus, 1500);
    assert_eq!(offered.memory_bytes, 2048 << 20);
    assert_eq!(offered.labels, ["rack-1"]);
    assert_eq!(given.vm_bridge.as_deref(), Some("br0"));
    assert_eq!(given.vmm, VmmKind::Qemu);
    assert_eq!(given.vm_ready_timeout, Duration::from_secs(90));
    assert_eq!(offered.vmm, "qemu", "the Hello says which backend it runs");

    let defaults = load(&["--vm-host"]).unwrap().unwrap().vm_host.unwrap();
    assert_eq!(defaults.vmm, "cloud-hypervisor");
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(defaults.milli_cpus, cpus * 1000);
    let total = mem_total_bytes().unwrap();
    assert_eq!(defaults.memory_bytes, total - HOST_RESERVED_BYTES);

    let zero = load(&["--vm-host", "--vm-cpus", "0"]).unwrap().unwrap_err();
    assert!(zero.to_string().contains("--vm-cpus 0"), "{zero}");
    let no_memory = load(&["--vm-host", "--vm-memory-mib", "0"])
        .unwrap()
        .unwrap_err();
    assert!(no_memory.to_string().contains("at least 1"), "{no_memory}");
    // Capacity flags mean nothing without --vm-host.
    assert!(load(&["--vm-cpus", "2"]).is_err());
    assert!(load(&["--vmm", "qemu"]).is_err());
    let unknown = load(&["--vm-host", "--vmm", "firecracker"]).unwrap_err();
    assert!(
        unknown.to_string().contains("cloud-hypervisor"),
        "{unknown}"
    );
}

#[test]
fn without_a_certificate_a_join_token_enrolls_into_the_state_directory() {
    let pki = Pki::new();
    let d = pki.dir.path();
    let token = d.join("join-token");
    std::fs::write(&token, format!("pjt_{}\n", "x".repeat(43))).unwrap();
    let mut args = pki.args("unused", &[]);
    // No --tls-cert or --tls-key: they live in the state directory.
    let at = args.iter().position(|a| a == "--tls-cert").unwrap();
    args.drain(at..at + 4);
    args.extend(
        ["--join-token", token.to_str().unwrap(), "--name", "web-7"]
            .iter()
            .map(|s| s.to_string()),
    );
    let config = Config::from_cli(Cli::try_parse_from(&args).unwrap()).unwrap();
    assert_eq!(config.tls.cert, d.join("state/tls/agent.crt"));
    assert_eq!(config.tls.key, d.join("state/tls/agent.key"));
    let Credentials::Enroll {
        machine,
        token: enrolling_with,
    } = &config.credentials
    else {
        panic!("no certificate: it must enroll");
    };
    assert_eq!(machine.as_str(), "web-7");
    assert_eq!(enrolling_with.path, d.join("join-token"));

    // A certificate in place, valid: the token is not used again.
    let issued = pki::issue(d, Role::Agent, "web-7", &[], false).unwrap();
    std::fs::create_dir_all(d.join("state/tls")).unwrap();
    std::fs::copy(&issued.cert, d.join("state/tls/agent.crt")).unwrap();
    std::fs::copy(&issued.key, d.join("state/tls/agent.key")).unwrap();
    let config = Config::from_cli(Cli::try_parse_from(&args).unwrap()).unwrap();
    assert!(matches!(config.credentials, Credentials::Ready(_)));

    // A bad token file is a startup error.
    std::fs::write(&token, "not a token").unwrap();
    let err = Config::from_cli(Cli::try_parse_from(&args).unwrap()).unwrap_err();
    assert!(
        err.to_string().contains("does not hold a join token"),
        "{err}"
    );
}
