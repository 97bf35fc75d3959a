//! The control plane's own TLS material, reloaded without a restart: on
//! SIGHUP and when its files change (checked every few seconds, so a
//! renewal by a timer or a secrets agent needs no signal). New handshakes
//! use the new certificate, key and CA bundle; connections already open,
//! agents' streams among them, keep theirs. Material that does not load
//! (a half-written file, a client certificate) is refused with a log line
//! and the current material stays.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use procurator_core::certificate::{CertificateInfo, format_utc};
use procurator_core::tls::{ClientPolicy, TlsError, TlsFiles, TlsMaterial};
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

/// How often the files are looked at for a change.
const FILE_CHECK: Duration = Duration::from_secs(5);

/// The server configuration new handshakes use.
pub struct ServerTls {
    files: TlsFiles,
    clients: ClientPolicy,
    current: RwLock<Arc<ServerConfig>>,
    /// The certificate `current` serves with.
    certificate: RwLock<Option<CertificateInfo>>,
    /// What the files looked like when last loaded.
    stamp: RwLock<Vec<Option<(SystemTime, u64)>>>,
}

impl ServerTls {
    /// Loads `files`: a control plane's certificate or an error. Clients
    /// are held to `clients` (now and after every reload).
    pub fn load(files: TlsFiles, clients: ClientPolicy) -> Result<Self, TlsError> {
        let stamp = stamp_of(&files);
        let material = files.load_server()?;
        let config = material.rustls_server_config(&clients)?;
        log_loaded(&material, "serving with this certificate");
        Ok(Self {
            files,
            clients,
            current: RwLock::new(config),
            certificate: RwLock::new(material.certificate_info()),
            stamp: RwLock::new(stamp),
        })
    }

    /// The material the files hold now, checked as at start (for what
    /// else needs the CA bundle before serving).
    pub fn material(&self) -> Result<TlsMaterial, TlsError> {
        self.files.load_server()
    }

    /// The certificate new handshakes present.
    pub fn certificate(&self) -> Option<CertificateInfo> {
        self.certificate
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The configuration for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        // Only a whole Arc is ever stored: a poisoned lock holds a good one.
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads the files again; on success new handshakes use them. The
    /// session ticket keys are kept, so clients resume across a reload.
    /// Files that fail are not tried again until they change once more.
    fn reload(&self, why: &str) -> Result<(), TlsError> {
        *self.stamp.write().unwrap_or_else(|p| p.into_inner()) = stamp_of(&self.files);
        let material = self.files.load_server()?;
        let mut config = Arc::unwrap_or_clone(material.rustls_server_config(&self.clients)?);
        let old = self.current();
        config.ticketer = old.ticketer.clone();
        config.session_storage = old.session_storage.clone();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
        *self.certificate.write().unwrap_or_else(|p| p.into_inner()) = material.certificate_info();
        log_loaded(&material, why);
        Ok(())
    }

    /// Whether a file changed since it was last loaded.
    fn changed(&self) -> bool {
        *self.stamp.read().unwrap_or_else(|p| p.into_inner()) != stamp_of(&self.files)
    }

    /// Reload on SIGHUP and on a change of the files, until `stop`.
    pub async fn keep_current(self: Arc<Self>, stop: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangup = match signal(SignalKind::hangup()) {
            Ok(hangup) => Some(hangup),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files are still reloaded when they change");
                None
            }
        };
        let mut check = tokio::time::interval(FILE_CHECK);
        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                () = stop.cancelled() => return,
                Some(()) = async { hangup.as_mut()?.recv().await } => "reloaded on SIGHUP",
                _ = expiry.tick() => {
                    warn_if_expiring(self.certificate().as_ref());
                    continue;
                }
                _ = check.tick() => {
                    if !self.changed() {
                        continue;
                    }
                    "reloaded: its files changed"
                }
            };
            if let Err(e) = self.reload(why) {
                tracing::error!(error = %e, "cannot reload the TLS material; new connections keep the current one");
            }
        }
    }
}

fn stamp_of(files: &TlsFiles) -> Vec<Option<(SystemTime, u64)>> {
    [&files.ca, &files.cert, &files.key]
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

fn log_loaded(material: &TlsMaterial, what: &str) {
    let certificate = material.certificate_info();
    match &certificate {
        Some(c) => {
            let not_after = format_utc(c.not_after);
            tracing::info!(identity = %c.identity, serial = c.serial, not_after, "{what}");
        }
        None => tracing::info!(identity = %material.identity, "{what}"),
    }
    warn_if_expiring(certificate.as_ref());
}

/// How often the certificate's end is looked at, for the warning.
const EXPIRY_CHECK: Duration = Duration::from_secs(6 * 3600);

fn warn_if_expiring(certificate: Option<&CertificateInfo>) {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if let Some(warning) = certificate.and_then(|c| c.expiry_warning(now)) {
        tracing::warn!(
            "{warning}; renew it: procurator-ctl pki issue --dir DIR --role control-plane --san NAME --force, then SIGHUP"
        );
    }
}
