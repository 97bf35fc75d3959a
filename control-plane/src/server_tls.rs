//! The control plane's own TLS material, reloaded without a restart: on
//! SIGHUP and when its files change (checked every few seconds, so a
//! renewal by a timer or a secrets agent needs no signal). New handshakes
//! use the new certificate, key and CA bundle; connections already open,
//! agents' streams among them, keep theirs. Material that does not load
//! (a half-written file, a client certificate) is refused with a log line
//! and the current material stays.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use procurator_core::tls::{TlsError, TlsFiles, TlsMaterial};
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

/// How often the files are looked at for a change.
const FILE_CHECK: Duration = Duration::from_secs(5);

/// The server configuration new handshakes use.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
    /// What the files looked like when last loaded.
    stamp: RwLock<Vec<Option<(SystemTime, u64)>>>,
}

impl ServerTls {
    /// Loads `files`: a control plane's certificate or an error.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let stamp = stamp_of(&files);
        let material = files.load_server()?;
        let config = material.rustls_server_config()?;
        log_loaded(&material, "serving with this certificate");
        Ok(Self {
            files,
            current: RwLock::new(config),
            stamp: RwLock::new(stamp),
        })
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
        let mut config = Arc::unwrap_or_clone(material.rustls_server_config()?);
        let old = self.current();
        config.ticketer = old.ticketer.clone();
        config.session_storage = old.session_storage.clone();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
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
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let why = tokio::select! {
                () = stop.cancelled() => return,
                Some(()) = async { hangup.as_mut()?.recv().await } => "reloaded on SIGHUP",
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
    match material.certificate_summary() {
        Some((serial, not_after)) => {
            tracing::info!(identity = %material.identity, serial, not_after, "{what}");
        }
        None => tracing::info!(identity = %material.identity, "{what}"),
    }
}
