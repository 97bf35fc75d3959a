//! The revocations every handshake and every RPC is checked against: the
//! store's list, held in memory, reloaded when the event log says one was
//! added (on any replica) and every 30 s besides. Streams of a certificate
//! revoked while they are open end through [`Revocations::until_revoked`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use procurator_core::Role;
use procurator_core::certificate::{CertificateInfo, format_utc};
use procurator_core::tls::CertificateCheck;
use procurator_proto::v1::{Revocation, certificate_event::Action, event};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio_rustls::rustls::CertificateError;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// How often the list is read again even when no event said so.
const RELOAD_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Set {
    /// role/name → when the newest revocation of that identity was made (ms).
    identities: HashMap<(Role, String), Revocation>,
    serials: HashMap<String, Revocation>,
}

/// The revocations in force.
#[derive(Debug)]
pub struct Revocations {
    current: RwLock<Arc<Set>>,
    /// Bumped on every change, for streams waiting to learn of theirs.
    changed: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self {
            current: RwLock::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Revocations {
    /// The list in `store` now.
    pub async fn load(store: &Store) -> Result<Arc<Self>, StoreError> {
        let revocations = Arc::new(Self::default());
        revocations.replace(store.list_revocations().await?);
        Ok(revocations)
    }

    fn set(&self) -> Arc<Set> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Take `list` as the revocations in force.
    pub fn replace(&self, list: Vec<Revocation>) {
        let mut set = Set::default();
        for revocation in list {
            if !revocation.serial.is_empty() {
                set.serials
                    .insert(revocation.serial.clone(), revocation.clone());
            }
            if let Some(role) = Role::parse(&revocation.role) {
                let key = (role, revocation.name.clone());
                let newer = set
                    .identities
                    .get(&key)
                    .is_none_or(|old| old.revoked_at_ms < revocation.revoked_at_ms);
                if newer {
                    set.identities.insert(key, revocation);
                }
            }
        }
        let changed = {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            let changed = current.serials.len() != set.serials.len()
                || current.identities.len() != set.identities.len()
                || current.identities.iter().any(|(k, v)| {
                    set.identities.get(k).map(|n| n.revoked_at_ms) != Some(v.revoked_at_ms)
                });
            *current = Arc::new(set);
            changed
        };
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Why `certificate` must be refused, if it must: its serial is revoked,
    /// or its identity was revoked at or after its validity began.
    pub fn refusal(&self, certificate: &CertificateInfo) -> Option<String> {
        let set = self.set();
        let revocation = set.serials.get(&certificate.serial).or_else(|| {
            let key = (
                certificate.identity.role,
                certificate.identity.name.to_string(),
            );
            set.identities
                .get(&key)
                .filter(|r| certificate.not_before.saturating_mul(1000) <= r.revoked_at_ms)
        })?;
        let reason = if revocation.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", revocation.reason)
        };
        Some(format!(
            "the certificate {} (serial {}) was revoked on {} by {}{reason}",
            certificate.identity,
            certificate.serial,
            format_utc(revocation.revoked_at_ms.div_euclid(1000)),
            revocation.revoked_by
        ))
    }

    /// When a new certificate for `role`/`name` may begin to be valid:
    /// after the newest revocation of that identity (ms), if any.
    pub fn revoked_identity_at(&self, role: Role, name: &str) -> Option<i64> {
        self.set()
            .identities
            .get(&(role, name.to_owned()))
            .map(|r| r.revoked_at_ms)
    }

    /// Resolves with the refusal once `certificate` is revoked.
    pub async fn until_revoked(&self, certificate: &CertificateInfo) -> String {
        let mut changed = self.changed.subscribe();
        loop {
            if let Some(refusal) = self.refusal(certificate) {
                return refusal;
            }
            if changed.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Follow the store until `stop`: reload when a revocation is logged
    /// (by any replica), when events were missed, and every 30 s.
    pub async fn keep_current(self: Arc<Self>, store: Store, stop: CancellationToken) {
        let mut events = store.subscribe();
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
                received = events.recv() => match received {
                    Ok(event) => match event.kind {
                        Some(event::Kind::Certificate(c)) if c.action == Action::Revoked as i32 => {}
                        _ => continue,
                    },
                    Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
            }
            match store.list_revocations().await {
                Ok(list) => self.replace(list),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the revocations; keeping those known")
                }
            }
        }
    }
}

/// The handshake's check: a revoked certificate is refused with the
/// `certificate_revoked` alert.
#[derive(Debug)]
pub struct RevocationCheck(pub Arc<Revocations>);

impl CertificateCheck for RevocationCheck {
    fn check(&self, leaf: &CertificateDer<'_>) -> Result<(), CertificateError> {
        // A certificate without an identity is refused by every RPC anyway.
        let Ok(info) = CertificateInfo::from_der(leaf.as_ref()) else {
            return Ok(());
        };
        match self.0.refusal(&info) {
            Some(_) => Err(CertificateError::Revoked),
            None => Ok(()),
        }
    }
}
