//! Connecting to the control plane over mutual TLS, and turning gRPC statuses
//! into messages that say what to do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use procurator_core::certificate::format_utc;
use procurator_core::control_planes::ControlPlanes;
use procurator_core::tls::{TlsFiles, TlsMaterial};
use procurator_proto::v1::deployment_service_client::DeploymentServiceClient;
use procurator_proto::v1::trust_service_client::TrustServiceClient;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Where the control plane is and who we are to it (docs/interfaces.md,
/// "Connection settings"). Global, so they may follow the subcommand.
/// Global, and hidden from every command's options: `procurator-ctl
/// --help` lists them once ([`CONNECTION_HELP`]).
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// A context of the config file (`config show` says which file).
    #[arg(
        long,
        env = "PROCURATOR_CONTEXT",
        global = true,
        hide = true,
        value_name = "NAME"
    )]
    pub context: Option<String>,

    /// The control plane's address, e.g. https://cp.example:7700: once per
    /// replica (in the environment, space separated), tried in turn.
    #[arg(
        long,
        env = "PROCURATOR_CONTROL_PLANE",
        global = true,
        hide = true,
        value_name = "URL",
        value_delimiter = ' '
    )]
    pub control_plane: Vec<String>,

    /// The fleet CA certificate (ca.crt from `pki init`).
    #[arg(
        long,
        env = "PROCURATOR_TLS_CA",
        global = true,
        hide = true,
        value_name = "FILE"
    )]
    pub tls_ca: Option<PathBuf>,

    /// This client's certificate (an operator or ci certificate).
    #[arg(
        long,
        env = "PROCURATOR_TLS_CERT",
        global = true,
        hide = true,
        value_name = "FILE"
    )]
    pub tls_cert: Option<PathBuf>,

    /// This client's private key.
    #[arg(
        long,
        env = "PROCURATOR_TLS_KEY",
        global = true,
        hide = true,
        value_name = "FILE"
    )]
    pub tls_key: Option<PathBuf>,
}

/// The connection settings, as `procurator-ctl --help` lists them.
pub const CONNECTION_HELP: &str = "\
Connection settings (before or after any command; a flag wins over its
variable, which wins over the context):
  --control-plane URL   $PROCURATOR_CONTROL_PLANE  the control plane (once per
                        replica; space separated in the variable)
  --tls-ca FILE         $PROCURATOR_TLS_CA         the fleet CA certificate
  --tls-cert FILE       $PROCURATOR_TLS_CERT       this client's certificate
  --tls-key FILE        $PROCURATOR_TLS_KEY        this client's private key
  --context NAME        $PROCURATOR_CONTEXT        a context of the config file
                        ($PROCURATOR_CONFIG, else
                        $XDG_CONFIG_HOME/procurator/config.toml): its
                        control-plane, tls-ca, tls-cert, tls-key and
                        intent-key; its current-context when not given
`procurator-ctl config show` says what is in use and where it came from.";

/// A client for `DeploymentService`, and the address it talks to (for messages).
pub struct Connection {
    pub url: String,
    pub client: DeploymentServiceClient<Channel>,
    /// The channel `client` uses, for the other services.
    channel: Channel,
    /// Every control plane given, tried in turn (see [`Connection::move_on`]).
    planes: ControlPlanes,
    /// Each one's endpoint, by URL.
    endpoints: HashMap<String, Endpoint>,
}

impl ConnectionArgs {
    /// Load the TLS files and prepare a channel. With one control plane
    /// nothing is dialled yet: the first RPC connects, and its failure is
    /// reported by [`Connection::error`]. With several, each is dialled in
    /// turn until one answers.
    pub async fn connect(&self) -> anyhow::Result<Connection> {
        let planes =
            ControlPlanes::new(self.control_plane.iter().cloned()).map_err(|e| anyhow!(e))?;
        let files = TlsFiles {
            ca: required(
                &self.tls_ca,
                "--tls-ca",
                "PROCURATOR_TLS_CA",
                "the fleet CA certificate (ca.crt)",
            )?,
            cert: required(
                &self.tls_cert,
                "--tls-cert",
                "PROCURATOR_TLS_CERT",
                "this client's certificate (e.g. operator-admin.crt)",
            )?,
            key: required(
                &self.tls_key,
                "--tls-key",
                "PROCURATOR_TLS_KEY",
                "this client's private key (e.g. operator-admin.key)",
            )?,
        };
        let material = files
            .load()
            .context("cannot load the TLS files; check --tls-ca, --tls-cert and --tls-key")?;
        check_own_certificate(&material, &files.cert)?;
        // The error names the URL and the expected shape; say which setting it came from.
        let endpoints = planes
            .all()
            .iter()
            .map(|url| {
                material
                    .endpoint(url, KEEPALIVE)
                    .map(|endpoint| (url.clone(), endpoint))
                    .map_err(|e| anyhow!("{e}; check --control-plane (PROCURATOR_CONTROL_PLANE)"))
            })
            .collect::<anyhow::Result<HashMap<_, _>>>()?;
        if let [url] = planes.all() {
            let channel = endpoints[url].connect_lazy();
            return Ok(Connection {
                url: url.clone(),
                client: deployment_client(channel.clone()),
                channel,
                planes,
                endpoints,
            });
        }
        let (url, channel) = dial_in_turn(&planes, &endpoints).await?;
        Ok(Connection {
            url,
            client: deployment_client(channel.clone()),
            channel,
            planes,
            endpoints,
        })
    }
}

/// The first of `planes` to answer a dial, in their turn.
async fn dial_in_turn(
    planes: &ControlPlanes,
    endpoints: &HashMap<String, Endpoint>,
) -> anyhow::Result<(String, Channel)> {
    let mut unanswered = Vec::new();
    for url in planes.in_turn() {
        match tokio::time::timeout(DIAL_TIMEOUT, endpoints[url].connect()).await {
            Ok(Ok(channel)) => {
                planes.answered(url);
                return Ok((url.to_owned(), channel));
            }
            Ok(Err(e)) => unanswered.push(format!("{url}: {}", procurator_core::error_chain(&e))),
            Err(_) => unanswered.push(format!(
                "{url}: no answer within {} s",
                DIAL_TIMEOUT.as_secs()
            )),
        }
    }
    bail!(
        "none of the control planes answered ({}); check --control-plane (PROCURATOR_CONTROL_PLANE) and that one of them is running",
        unanswered.join("; ")
    )
}

/// A page holds at most 2 MiB of rows plus one that may be large (a
/// blueprint entry with many health checks): above tonic's 4 MiB default.
fn deployment_client(channel: Channel) -> DeploymentServiceClient<Channel> {
    DeploymentServiceClient::new(channel)
        .max_decoding_message_size(procurator_core::limits::MAX_CLIENT_MESSAGE_BYTES)
}

/// HTTP/2 keepalive of the connection, as the agent's.
const KEEPALIVE: Duration = Duration::from_secs(20);
/// How long one of several control planes may take to answer a dial.
const DIAL_TIMEOUT: Duration = Duration::from_secs(5);

/// An expired certificate is refused at the handshake, which the client
/// sees only as a closed connection: say so before dialling. One that
/// expires soon is warned about on stderr.
fn check_own_certificate(material: &TlsMaterial, cert: &Path) -> anyhow::Result<()> {
    let Some(info) = material.certificate_info() else {
        return Ok(());
    };
    let now = procurator_core::now_ms().div_euclid(1000);
    let renew = format!(
        "procurator-ctl pki issue --dir DIR --role {} --name {} --force",
        info.identity.role, info.identity.name
    );
    if info.expired_at(now) {
        bail!(
            "your certificate {} ({}) expired on {}; renew it with `{renew}` on the fleet CA's machine",
            cert.display(),
            info.identity,
            format_utc(info.not_after)
        );
    }
    if let Some(warning) = info.expiry_warning(now) {
        eprintln!("warning: {warning}; renew it with `{renew}`");
    }
    Ok(())
}

/// A TLS file that must be given and must exist; the error names the flag.
fn required(value: &Option<PathBuf>, flag: &str, env: &str, what: &str) -> anyhow::Result<PathBuf> {
    let Some(path) = value else {
        bail!("no {what} given: pass {flag} FILE or set {env}");
    };
    if !Path::new(path).exists() {
        bail!(
            "{flag} {}: no such file; point {flag} (or {env}) at {what}",
            path.display()
        );
    }
    Ok(path.clone())
}

impl Connection {
    /// After the control plane in use stopped answering: go to the next
    /// that answers, the one in use last. With a single control plane there
    /// is nowhere else to go; its channel dials again by itself.
    pub async fn move_on(&mut self) -> anyhow::Result<()> {
        if self.planes.all().len() < 2 {
            return Ok(());
        }
        self.planes.failed(&self.url);
        let (url, channel) = dial_in_turn(&self.planes, &self.endpoints).await?;
        self.url = url;
        self.client = deployment_client(channel.clone());
        self.channel = channel;
        Ok(())
    }

    /// `TrustService` on the same connection.
    pub fn trust(&self) -> TrustServiceClient<Channel> {
        TrustServiceClient::new(self.channel.clone())
    }

    /// Turn a failed RPC into a message that says what went wrong and what to do.
    /// `doing` says what we were trying, e.g. "submitting the deployment".
    pub fn error(&self, status: &Status, doing: &str) -> anyhow::Error {
        anyhow!(describe_status(status, &self.url, doing))
    }
}

pub fn describe_status(status: &Status, url: &str, doing: &str) -> String {
    let detail = status_detail(status);
    // TLS failures surface as UNAVAILABLE, UNKNOWN or CANCELLED depending on
    // when the handshake broke; what to do about them is the same.
    // A refusal may mention "certificate" too ("it needs a certificate with
    // role ci"): that is the server's answer, not a failed handshake.
    let refused = matches!(
        status.code(),
        Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument
    );
    if detail.contains("certificate") && !refused {
        return format!(
            "the TLS handshake with the control plane at {url} failed: {detail} — check that --tls-ca is the fleet CA that signed its certificate, and that the host in --control-plane is one of its names (pki init --san)"
        );
    }
    if detail.contains("CertificateRevoked") {
        return format!(
            "the control plane at {url} refused this client's certificate: it is revoked (`procurator-ctl revocations` says by whom and why); get a new one from an operator"
        );
    }
    if detail.contains("CertificateExpired") {
        return format!(
            "the control plane at {url} refused this client's certificate: it has expired; renew it with `procurator-ctl pki issue --role … --name … --force`"
        );
    }
    if detail.contains("received fatal alert")
        || (detail.contains("connection closed") && status.code() != Code::Unavailable)
    {
        return format!(
            "the control plane at {url} closed the connection while {doing}: {detail} — if it is running, it refused this client's certificate (revoked, or not issued by its fleet CA: its log says which); check --tls-cert and --tls-key"
        );
    }
    match status.code() {
        Code::Unavailable if detail.contains("cannot write its store") => {
            format!("the control plane at {url} is running but refused {doing}: {detail}")
        }
        Code::Unavailable => format!(
            "cannot reach the control plane at {url}: {detail} — is it running? check --control-plane"
        ),
        Code::PermissionDenied => format!(
            "the control plane refused {doing}: {detail} (use --tls-cert and --tls-key of a certificate with that role: procurator-ctl pki issue --role …)"
        ),
        Code::Unauthenticated => format!(
            "the control plane did not accept this client's certificate while {doing}: {detail}; check --tls-cert and --tls-key"
        ),
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists => {
            format!("{doing} failed: {detail}")
        }
        Code::DeadlineExceeded => {
            format!("the control plane at {url} did not answer in time while {doing}: {detail}")
        }
        Code::Unimplemented => format!(
            "the control plane at {url} does not support {doing}: {detail}; is it the same version as procurator-ctl?"
        ),
        // Transport failures (refused TLS handshake, reset connection) arrive
        // as UNKNOWN with the cause in the source chain.
        Code::Unknown if detail.contains("transport") || detail.contains("connect") => format!(
            "cannot talk to the control plane at {url}: {detail} — check --control-plane and that --tls-ca is the fleet CA"
        ),
        code => format!("{doing} failed: the control plane answered {code:?}: {detail}"),
    }
}

/// The status message and its source chain (where tonic keeps the transport's
/// reason, e.g. "Connection refused" or "invalid peer certificate").
pub fn status_detail(status: &Status) -> String {
    let mut detail = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let text = err.to_string();
        if !detail.contains(&text) {
            if !detail.is_empty() {
                detail.push_str(": ");
            }
            detail.push_str(&text);
        }
        source = err.source();
    }
    if detail.is_empty() {
        format!("{:?}", status.code())
    } else {
        detail
    }
}

/// Whether a broken `Watch` stream is worth re-opening: the control plane is
/// restarting or the network hiccupped, not a refusal.
pub fn is_retryable(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_says_where_and_what_to_check() {
        let msg = describe_status(
            &Status::unavailable("tcp connect error"),
            "https://cp:7700",
            "listing agents",
        );
        assert!(
            msg.contains("cannot reach the control plane at https://cp:7700"),
            "{msg}"
        );
        assert!(msg.contains("tcp connect error"), "{msg}");
        assert!(msg.contains("--control-plane"), "{msg}");
    }

    #[test]
    fn tls_failures_point_at_the_tls_flags() {
        let msg = describe_status(
            &Status::unavailable("invalid peer certificate: UnknownIssuer"),
            "https://cp:7700",
            "listing agents",
        );
        assert!(msg.contains("TLS handshake"), "{msg}");
        assert!(msg.contains("--tls-ca"), "{msg}");
        let msg = describe_status(
            &Status::cancelled("operation was canceled: transport error: connection closed"),
            "https://cp:7700",
            "listing agents",
        );
        assert!(msg.contains("--tls-cert"), "{msg}");
    }

    #[test]
    fn a_revoked_or_expired_certificate_is_named() {
        let msg = describe_status(
            &Status::unavailable("transport error: received fatal alert: CertificateRevoked"),
            "https://cp:7700",
            "listing agents",
        );
        assert!(msg.contains("it is revoked"), "{msg}");
        let msg = describe_status(
            &Status::unavailable("transport error: received fatal alert: CertificateExpired"),
            "https://cp:7700",
            "listing agents",
        );
        assert!(msg.contains("it has expired"), "{msg}");
    }

    #[test]
    fn refusals_show_the_servers_message() {
        let msg = describe_status(
            &Status::permission_denied("agent/worker-1 may not do this"),
            "https://cp:7700",
            "submitting the deployment",
        );
        assert!(msg.contains("agent/worker-1 may not do this"), "{msg}");
        let msg = describe_status(
            &Status::invalid_argument("closures.worker-1: not a store path"),
            "https://cp:7700",
            "submitting the deployment",
        );
        assert_eq!(
            msg,
            "submitting the deployment failed: closures.worker-1: not a store path"
        );
    }

    #[test]
    fn a_refusal_that_mentions_certificates_is_still_a_refusal() {
        let msg = describe_status(
            &Status::permission_denied(
                "agent/worker-1 may not do this; it needs a certificate with role ci or operator",
            ),
            "https://cp:7700",
            "submitting the deployment",
        );
        assert!(
            msg.starts_with("the control plane refused submitting the deployment"),
            "{msg}"
        );
        assert!(!msg.contains("TLS handshake"), "{msg}");
    }

    #[tokio::test]
    async fn missing_settings_name_the_flag_and_variable() {
        let args = ConnectionArgs {
            context: None,
            control_plane: Vec::new(),
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
        };
        let err = args
            .connect()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--control-plane") && err.contains("PROCURATOR_CONTROL_PLANE"),
            "{err}"
        );

        let args = ConnectionArgs {
            context: None,
            control_plane: vec!["https://localhost:7700".into()],
            tls_ca: Some("/nonexistent/ca.crt".into()),
            tls_cert: None,
            tls_key: None,
        };
        let err = args
            .connect()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("--tls-ca /nonexistent/ca.crt: no such file"),
            "{err}"
        );
        assert!(err.contains("PROCURATOR_TLS_CA"), "{err}");
    }

    #[test]
    fn refusals_are_not_retried() {
        assert!(is_retryable(&Status::unavailable("shutting down")));
        assert!(!is_retryable(&Status::permission_denied("no")));
        assert!(!is_retryable(&Status::not_found("no such deployment")));
    }
}
