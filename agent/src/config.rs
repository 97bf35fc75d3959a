//! The agent's command line (flags and environment as docs/interfaces.md
//! says), checked once at startup: a bad local configuration stops the agent
//! with a clear message instead of retrying forever.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use procurator_core::control_planes::ControlPlanes;
use procurator_core::intent::PublicKey;
use procurator_core::telemetry::LogFormat;
use procurator_core::tls::{TlsError, TlsFiles, TlsMaterial, enrollment_endpoint};
use procurator_core::{MachineName, Role};
use procurator_proto::v1::VmHostCapacity;

use crate::credentials::{JoinToken, finish_interrupted_install};
use crate::desired::check_substituter;

/// Procurator's agent: dials out to the control plane, pulls the closure this
/// machine should run from a binary cache, activates it behind health checks
/// and rolls back on failure.
#[derive(Debug, Parser)]
#[command(name = "procurator-agent", version)]
pub struct Cli {
    /// The control plane, `https://HOST:PORT`: once per replica (or one
    /// load balancer's), tried in turn. In the environment, space separated.
    #[arg(
        long,
        env = "PROCURATOR_CONTROL_PLANE",
        value_name = "URL",
        value_delimiter = ' ',
        required = true
    )]
    pub control_plane: Vec<String>,
    /// The fleet CA certificate: how the agent knows its control plane.
    #[arg(long, env = "PROCURATOR_TLS_CA", value_name = "FILE")]
    pub tls_ca: PathBuf,
    /// This agent's certificate (role `agent`, named after the machine);
    /// renewed in place [default: STATE_DIR/tls/agent.crt].
    #[arg(long, env = "PROCURATOR_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This agent's private key [default: STATE_DIR/tls/agent.key].
    #[arg(long, env = "PROCURATOR_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// A one-time join token (`procurator-ctl enroll-token`) to enroll
    /// with when there is no certificate yet, or only an expired one: the
    /// agent makes its key here and gets it signed for --name.
    #[arg(long, env = "PROCURATOR_JOIN_TOKEN_FILE", value_name = "FILE")]
    pub join_token: Option<PathBuf>,
    /// The machine name to enroll as; a certificate already in place must
    /// be for it [default: the host name].
    #[arg(long, env = "PROCURATOR_MACHINE_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Where the crash journal and undelivered results live.
    #[arg(
        long,
        env = "PROCURATOR_STATE_DIR",
        value_name = "DIR",
        default_value = "/var/lib/procurator-agent"
    )]
    pub state_dir: PathBuf,
    /// A binary cache to pull closures from, tried in order (repeatable; the
    /// environment variable is space separated). Caches are the agent's own
    /// configuration: the control plane cannot add one.
    #[arg(
        long = "substituter",
        env = "PROCURATOR_SUBSTITUTERS",
        value_name = "URI",
        value_delimiter = ' '
    )]
    pub substituters: Vec<String>,
    /// A key closures must be signed with, `name:base64` (repeatable; the
    /// environment variable is space separated). Without one nothing can be copied.
    #[arg(
        long = "trusted-public-key",
        env = "PROCURATOR_TRUSTED_PUBLIC_KEYS",
        value_name = "KEY",
        value_delimiter = ' '
    )]
    pub trusted_public_keys: Vec<String>,
    /// The public half of a key deployments must be signed with, `name:base64`
    /// as `nix key convert-secret-to-public` prints it (repeatable; the
    /// environment variable is space separated). With one, the agent acts
    /// only on statements signed by these keys, for this machine, newer than
    /// the last it accepted; without, it trusts the control plane.
    #[arg(
        long = "intent-public-key",
        env = "PROCURATOR_INTENT_PUBLIC_KEYS",
        value_name = "KEY",
        value_delimiter = ' '
    )]
    pub intent_public_keys: Vec<String>,
    /// The system profile that holds the boot generations.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/nix/var/nix/profiles/system"
    )]
    pub system_profile: PathBuf,
    /// HTTP/2 keepalive interval, seconds.
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    pub keepalive: u64,
    /// The longest wait between reconnection attempts, seconds.
    #[arg(long, value_name = "SECS", default_value_t = procurator_core::backoff::DEFAULT_CAP.as_secs())]
    pub max_backoff: u64,
    /// Host VMs: offer this machine's CPUs and memory to the VM instances
    /// the control plane places here (QEMU or cloud-hypervisor runs them).
    #[arg(long, env = "PROCURATOR_VM_HOST")]
    pub vm_host: bool,
    /// vCPUs offered to VMs, fractions allowed [default: every online CPU].
    #[arg(long, value_name = "N", requires = "vm_host")]
    pub vm_cpus: Option<f64>,
    /// Memory offered to VMs, MiB [default: all but 1 GiB of the machine's].
    #[arg(long, value_name = "MIB", requires = "vm_host")]
    pub vm_memory_mib: Option<u64>,
    /// A label of this VM host, shown with it (repeatable).
    #[arg(long = "vm-label", value_name = "LABEL", requires = "vm_host")]
    pub vm_labels: Vec<String>,
    /// The bridge every VM's tap joins [default: none; the taps stay alone].
    #[arg(long, value_name = "NAME", requires = "vm_host")]
    pub vm_bridge: Option<String>,
    /// The VMM that runs this host's VMs; only machines whose
    /// `deployment.backend` names it are placed here [default: cloud-hypervisor].
    #[arg(long, value_name = "VMM", requires = "vm_host")]
    pub vmm: Option<VmmKind>,
    /// How long a VM may take from its start to reporting that it is up
    /// and healthy, seconds; past it, the VM counts as broken.
    #[arg(long, value_name = "SECS", requires = "vm_host", default_value_t = 300)]
    pub vm_ready_timeout: u64,
    /// `text` or `json` logs on stderr.
    #[arg(
        long,
        env = "PROCURATOR_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

/// The VMMs a VM host can run its VMs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum VmmKind {
    /// One `cloud-hypervisor` and one `virtiofsd` process per VM.
    #[default]
    CloudHypervisor,
    /// `qemu-system-x86_64`, with KVM where the CPU has it, else TCG.
    Qemu,
}

impl VmmKind {
    /// As a blueprint's `deployment.backend` names it.
    pub fn backend(self) -> &'static str {
        match self {
            Self::CloudHypervisor => "cloud-hypervisor",
            Self::Qemu => "qemu",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0}")]
    ControlPlane(String),
    #[error(
        "{path} holds the identity {identity}, but an agent needs role agent: procurator-ctl pki issue --role agent --name MACHINE"
    )]
    NotAnAgent { path: PathBuf, identity: String },
    #[error(
        "there is no certificate at {0}: give --join-token FILE with a token from `procurator-ctl enroll-token --name MACHINE` to enroll, or --tls-cert and --tls-key from `procurator-ctl pki issue --role agent`"
    )]
    NoCertificate(PathBuf),
    #[error("{path} is the certificate of {identity}, but --name says {name}")]
    OtherName {
        path: PathBuf,
        identity: String,
        name: String,
    },
    #[error("--name: {0}")]
    Name(String),
    #[error(transparent)]
    Credentials(#[from] crate::credentials::CredentialError),
    #[error("cannot finish installing the certificate {path} a crash interrupted: {source}")]
    Install {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the state directory {path} is not usable: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--substituter: {0}")]
    Substituter(String),
    #[error(
        "--trusted-public-key {0:?} is not a Nix public key: expected NAME:BASE64, as `nix key convert-secret-to-public` prints"
    )]
    Key(String),
    #[error("--intent-public-key {key:?}: {why}")]
    IntentKey { key: String, why: String },
    #[error("--{0} must be at least 1 second")]
    TooShort(&'static str),
    #[error("--vm-cpus {0} is not a positive number of CPUs")]
    VmCpus(f64),
    #[error("--vm-memory-mib: {0}")]
    VmMemory(String),
}

/// Memory a VM host keeps for itself when `--vm-memory-mib` is not given.
const HOST_RESERVED_BYTES: u64 = 1 << 30;

/// The agent's certificate as it starts: in place, or to be enrolled for.
#[derive(Debug)]
pub enum Credentials {
    Ready(TlsMaterial),
    Enroll {
        machine: MachineName,
        token: JoinToken,
    },
}

/// The checked configuration.
#[derive(Debug)]
pub struct Config {
    pub control_planes: Arc<ControlPlanes>,
    pub tls: TlsFiles,
    pub credentials: Credentials,
    pub state_dir: PathBuf,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    /// Empty: the control plane is trusted for what runs.
    pub intent_public_keys: Vec<PublicKey>,
    pub system_profile: PathBuf,
    pub keepalive: Duration,
    pub max_backoff: Duration,
    /// What this machine offers VMs, when it is a VM host.
    pub vm_host: Option<VmHostCapacity>,
    /// The bridge its VMs' taps join.
    pub vm_bridge: Option<String>,
    /// What runs its VMs.
    pub vmm: VmmKind,
    /// How long a VM may take to report that it is up.
    pub vm_ready_timeout: Duration,
}

impl Config {
    pub fn from_cli(cli: Cli) -> Result<Self, ConfigError> {
        let non_empty = |values: Vec<String>| {
            values
                .into_iter()
                .filter(|v| !v.is_empty())
                .collect::<Vec<_>>()
        };
        let substituters = non_empty(cli.substituters);
        for s in &substituters {
            check_substituter(s).map_err(ConfigError::Substituter)?;
        }
        let trusted_public_keys = non_empty(cli.trusted_public_keys);
        if let Some(bad) = trusted_public_keys
            .iter()
            .find(|k| k.parse::<PublicKey>().is_err())
        {
            return Err(ConfigError::Key(bad.clone()));
        }
        let intent_public_keys = non_empty(cli.intent_public_keys)
            .into_iter()
            .map(|key| {
                key.parse::<PublicKey>()
                    .map_err(|why| ConfigError::IntentKey { key, why })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if cli.keepalive == 0 {
            return Err(ConfigError::TooShort("keepalive"));
        }
        if cli.max_backoff == 0 {
            return Err(ConfigError::TooShort("max-backoff"));
        }
        let keepalive = Duration::from_secs(cli.keepalive);
        check_state_dir(&cli.state_dir)?;
        let tls_dir = cli.state_dir.join("tls");
        let tls = TlsFiles {
            ca: cli.tls_ca,
            cert: cli.tls_cert.unwrap_or_else(|| tls_dir.join("agent.crt")),
            key: cli.tls_key.unwrap_or_else(|| tls_dir.join("agent.key")),
        };
        let ca_pem = std::fs::read(&tls.ca).map_err(|source| TlsError::Read {
            what: "CA certificate",
            path: tls.ca.clone(),
            source,
        })?;
        let credentials = credentials(&tls, cli.name, cli.join_token)?;
        // Checks the URLs now rather than at every reconnection.
        let control_planes =
            ControlPlanes::new(cli.control_plane).map_err(ConfigError::ControlPlane)?;
        for url in control_planes.all() {
            enrollment_endpoint(&ca_pem, url)?;
        }
        let vmm = cli.vmm.unwrap_or_default();
        let vm_host = if cli.vm_host {
            Some(VmHostCapacity {
                vmm: vmm.backend().to_owned(),
                ..vm_capacity(cli.vm_cpus, cli.vm_memory_mib, cli.vm_labels)?
            })
        } else {
            None
        };
        Ok(Self {
            control_planes: Arc::new(control_planes),
            tls,
            credentials,
            state_dir: cli.state_dir,
            substituters,
            trusted_public_keys,
            intent_public_keys,
            system_profile: cli.system_profile,
            keepalive,
            max_backoff: Duration::from_secs(cli.max_backoff),
            vm_host,
            vm_bridge: cli.vm_bridge.filter(|b| !b.is_empty()),
            vmm,
            vm_ready_timeout: Duration::from_secs(cli.vm_ready_timeout.max(1)),
        })
    }
}

/// The certificate in place, after finishing an install a crash
/// interrupted; or, with a join token and no certificate (or an expired
/// one), the machine to enroll.
fn credentials(
    tls: &TlsFiles,
    name: Option<String>,
    join_token: Option<PathBuf>,
) -> Result<Credentials, ConfigError> {
    finish_interrupted_install(tls).map_err(|source| ConfigError::Install {
        path: tls.cert.clone(),
        source,
    })?;
    let name = name
        .filter(|n| !n.is_empty())
        .map(|n| MachineName::parse(&n).map_err(|e| ConfigError::Name(e.to_string())))
        .transpose()?;
    let token = join_token.map(|path| JoinToken::read(&path)).transpose()?;
    if !tls.cert.exists() {
        let token = token.ok_or_else(|| ConfigError::NoCertificate(tls.cert.clone()))?;
        let machine = match name {
            Some(name) => name,
            None => host_name()?,
        };
        return Ok(Credentials::Enroll { machine, token });
    }
    let material = tls.load()?;
    let identity = &material.identity;
    if identity.role != Role::Agent {
        return Err(ConfigError::NotAnAgent {
            path: tls.cert.clone(),
            identity: identity.to_string(),
        });
    }
    if let Some(name) = name.filter(|n| *n != identity.name) {
        return Err(ConfigError::OtherName {
            path: tls.cert.clone(),
            identity: identity.to_string(),
            name: name.to_string(),
        });
    }
    let expired = material
        .certificate_info()
        .is_some_and(|info| info.expired_at(procurator_core::now_ms().div_euclid(1000)));
    match token {
        Some(token) if expired => Ok(Credentials::Enroll {
            machine: identity.name.clone(),
            token,
        }),
        _ => Ok(Credentials::Ready(material)),
    }
}

/// This machine's name, the default for --name.
fn host_name() -> Result<MachineName, ConfigError> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_err(|e| ConfigError::Name(format!("cannot read the host name ({e}); give --name")))?;
    MachineName::parse(name.trim()).map_err(|e| {
        ConfigError::Name(format!(
            "the host name {:?} is not a machine name ({e}); give --name",
            name.trim()
        ))
    })
}

/// What a VM host offers: the flags, or this machine's CPUs and its memory
/// less [`HOST_RESERVED_BYTES`].
fn vm_capacity(
    cpus: Option<f64>,
    memory_mib: Option<u64>,
    labels: Vec<String>,
) -> Result<VmHostCapacity, ConfigError> {
    let cpus = match cpus {
        Some(n) if n.is_finite() && n > 0.0 => n,
        Some(n) => return Err(ConfigError::VmCpus(n)),
        None => std::thread::available_parallelism().map_or(1, usize::from) as f64,
    };
    let memory_bytes = match memory_mib {
        Some(0) => return Err(ConfigError::VmMemory("must be at least 1".into())),
        Some(mib) => mib.saturating_mul(1 << 20),
        None => {
            let total = mem_total_bytes().map_err(ConfigError::VmMemory)?;
            total.checked_sub(HOST_RESERVED_BYTES).filter(|b| *b > 0).ok_or_else(|| {
                ConfigError::VmMemory(format!(
                    "the machine has {} MiB, no more than the 1 GiB the host keeps; give --vm-memory-mib",
                    total >> 20
                ))
            })?
        }
    };
    Ok(VmHostCapacity {
        milli_cpus: (cpus * 1000.0).round() as u64,
        memory_bytes,
        labels: labels.into_iter().filter(|l| !l.is_empty()).collect(),
        vmm: String::new(),
    })
}

/// `MemTotal` from /proc/meminfo.
fn mem_total_bytes() -> Result<u64, String> {
    let info = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| format!("cannot read /proc/meminfo ({e}); give --vm-memory-mib"))?;
    info.lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| "/proc/meminfo has no MemTotal; give --vm-memory-mib".into())
}

/// The journal must be writable before the first deployment, not during it.
fn check_state_dir(dir: &std::path::Path) -> Result<(), ConfigError> {
    let err = |source| ConfigError::StateDir {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = dir.join(".write-test");
    crate::journal::write_atomically(&probe, b"ok").map_err(err)?;
    std::fs::remove_file(&probe).map_err(err)
}

#[cfg(test)]
mod tests;
