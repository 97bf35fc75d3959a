//! Who may connect: join tokens (stored as their SHA-256 only, used once)
//! and revocations, both in the store so that every replica enforces them
//! and a restart forgets none. Enrollments, refusals of known tokens,
//! renewals and revocations are events in the log.

use procurator_core::certificate::CertificateInfo;
use procurator_core::{Identity, MachineName, Role};
use procurator_proto::v1::{CertificateEvent, Revocation, certificate_event::Action, event};
use sha2::Digest as _;

use super::engine::{Sql, SqlExt as _};
use super::{Store, StoreError, Tx};

/// The prefix of every join token, so that secret scanners and people
/// recognise one.
pub const TOKEN_PREFIX: &str = "pjt_";
/// The most join tokens that may wait unused at once.
pub const MAX_LIVE_TOKENS: i64 = 100_000;
/// The most revocations the store holds: each is checked at every handshake.
pub const MAX_REVOCATIONS: i64 = 100_000;
/// A known token refused again within this long adds no event: a machine
/// retrying a used token cannot grow the log.
const REFUSAL_EVENT_EVERY_MS: i64 = 60_000;
/// Used and expired tokens are forgotten this long after they stopped
/// mattering (their events stay as long as the log keeps them).
const FORGET_TOKENS_AFTER_MS: i64 = 30 * 24 * 3600 * 1000;

/// A token made for a machine, shown once.
#[derive(Debug, Clone)]
pub struct JoinToken {
    pub token: String,
    pub expires_ms: i64,
}

/// Why a join token was refused: said to the machine as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error(
        "this join token is not known to the control plane (mistyped, or forgotten 30 days after it was used or expired)"
    )]
    Unknown,
    #[error("this join token was used already, at {0}; a token enrolls one machine once")]
    Used(String),
    #[error("this join token expired at {0}")]
    Expired(String),
    #[error("this join token is for machine {token_for}, not {claimed}")]
    OtherMachine { token_for: String, claimed: String },
}

/// What redeeming a token gave: the signed certificate, or why not.
pub enum Redeemed<T, E> {
    Issued(T),
    Refused(TokenRefusal),
    /// Signing failed; the token stays unused.
    NotSigned(E),
}

/// Why a revocation was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error(
        "the store holds {MAX_REVOCATIONS} revocations already; replace the fleet CA instead of revoking more"
    )]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What one revocation covers.
#[derive(Debug, Clone)]
pub enum Revoked {
    /// Every certificate of this role and name issued up to now.
    Identity(Role, MachineName),
    /// One certificate.
    Serial(String),
}

fn hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

fn at(ms: i64) -> String {
    procurator_core::certificate::format_utc(ms.div_euclid(1000))
}

impl Store {
    /// A new single-use token for `machine`, valid for `ttl_ms`.
    pub async fn create_join_token(
        &self,
        machine: MachineName,
        vm_host: bool,
        ttl_ms: i64,
        created_by: String,
    ) -> Result<Option<JoinToken>, StoreError> {
        let secret: [u8; 32] = rand::random();
        let token = format!(
            "{TOKEN_PREFIX}{}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, secret)
        );
        self.write(move |tx| {
            let live: i64 = tx.sql.fetch_one(
                "SELECT count(*) FROM join_tokens WHERE used_ms IS NULL AND expires_ms > ?1",
                &[&tx.now],
                |r| r.get(0),
            )?;
            if live >= MAX_LIVE_TOKENS {
                return Ok(None);
            }
            let expires_ms = tx.now.saturating_add(ttl_ms);
            tx.sql.exec(
                "INSERT INTO join_tokens (token_hash, machine, vm_host, created_by, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &[
                    &hash(&token),
                    &machine.as_str(),
                    &vm_host,
                    &created_by,
                    &tx.now,
                    &expires_ms,
                ],
            )?;
            let identity = Identity {
                vm_host,
                ..Identity::new(Role::Agent, machine)
            };
            emit(
                tx,
                CertificateEvent {
                    action: Action::JoinTokenCreated as i32,
                    identity: identity.to_string(),
                    reason: format!("by {created_by}, expires {}", at(expires_ms)),
                    ..Default::default()
                },
            )?;
            Ok(Some(JoinToken { token, expires_ms }))
        })
        .await
    }

    /// Use `token` for `machine` and, in the same transaction, `sign` the
    /// machine's certificate (given whether it may host VMs). A refusal of
    /// a token the store knows is an event (at most one a minute per
    /// token); a failed `sign` leaves the token unused.
    pub async fn redeem_join_token<T: Send + 'static, E: Send + 'static>(
        &self,
        machine: MachineName,
        token: String,
        peer: String,
        sign: impl FnOnce(&Identity) -> Result<(T, String), E> + Send + 'static,
    ) -> Result<Redeemed<T, E>, StoreError> {
        self.write(move |tx| {
            let token_hash = hash(&token);
            let found: Option<(String, bool, i64, Option<i64>, i64)> = tx.sql.fetch_opt(
                "SELECT machine, vm_host, expires_ms, used_ms, last_refusal_ms
                     FROM join_tokens WHERE token_hash = ?1",
                &[&token_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )?;
            let Some((token_for, vm_host, expires_ms, used_ms, last_refusal_ms)) = found else {
                return Ok(Redeemed::Refused(TokenRefusal::Unknown));
            };
            let refusal = if let Some(used) = used_ms {
                Some(TokenRefusal::Used(at(used)))
            } else if expires_ms <= tx.now {
                Some(TokenRefusal::Expired(at(expires_ms)))
            } else if token_for != machine.as_str() {
                Some(TokenRefusal::OtherMachine {
                    token_for: token_for.clone(),
                    claimed: machine.to_string(),
                })
            } else {
                None
            };
            if let Some(refusal) = refusal {
                if tx.now - last_refusal_ms >= REFUSAL_EVENT_EVERY_MS {
                    tx.sql.exec(
                        "UPDATE join_tokens SET last_refusal_ms = ?2 WHERE token_hash = ?1",
                        &[&token_hash, &tx.now],
                    )?;
                    emit(
                        tx,
                        CertificateEvent {
                            action: Action::EnrollRefused as i32,
                            identity: format!("agent/{machine}"),
                            reason: refusal.to_string(),
                            peer,
                            ..Default::default()
                        },
                    )?;
                }
                return Ok(Redeemed::Refused(refusal));
            }
            let identity = Identity {
                vm_host,
                ..Identity::new(Role::Agent, machine)
            };
            let (signed, serial) = match sign(&identity) {
                Ok(signed) => signed,
                Err(e) => return Ok(Redeemed::NotSigned(e)),
            };
            tx.sql.exec(
                "UPDATE join_tokens SET used_ms = ?2 WHERE token_hash = ?1",
                &[&token_hash, &tx.now],
            )?;
            emit(
                tx,
                CertificateEvent {
                    action: Action::Enrolled as i32,
                    identity: identity.to_string(),
                    serial,
                    peer,
                    ..Default::default()
                },
            )?;
            Ok(Redeemed::Issued(signed))
        })
        .await
    }

    /// `identity` renewed its certificate: the new one has `serial`.
    pub async fn record_renewal(
        &self,
        identity: &Identity,
        renewed: &CertificateInfo,
    ) -> Result<(), StoreError> {
        let machine = identity.name.to_string();
        let identity = identity.to_string();
        let serial = renewed.serial.clone();
        let not_after_ms = renewed.not_after.saturating_mul(1000);
        self.write(move |tx| {
            // The agent keeps its stream (its old certificate was checked
            // when it connected): what status shows is the new one.
            tx.sql.exec(
                "UPDATE agents SET cert_serial = ?1, cert_not_after_ms = ?2 WHERE machine = ?3",
                &[&serial, &not_after_ms, &machine],
            )?;
            emit(
                tx,
                CertificateEvent {
                    action: Action::Renewed as i32,
                    identity,
                    serial,
                    ..Default::default()
                },
            )
        })
        .await
    }

    /// Record a revocation by `revoked_by`.
    pub async fn revoke(
        &self,
        revoked: Revoked,
        reason: String,
        revoked_by: String,
    ) -> Result<Revocation, RevokeError> {
        let written = self
            .write(move |tx| {
                let count: i64 =
                    tx.sql
                        .fetch_one("SELECT count(*) FROM revocations", &[], |r| r.get(0))?;
                if count >= MAX_REVOCATIONS {
                    return Ok(None);
                }
                let (role, name, serial) = match &revoked {
                    Revoked::Identity(role, name) => {
                        (role.as_str().to_owned(), name.to_string(), String::new())
                    }
                    Revoked::Serial(serial) => (String::new(), String::new(), serial.clone()),
                };
                let id: i64 = tx.sql.fetch_one(
                    "INSERT INTO revocations (role, name, serial, reason, revoked_by, revoked_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
                    &[&role, &name, &serial, &reason, &revoked_by, &tx.now],
                    |r| r.get(0),
                )?;
                let revocation = Revocation {
                    id: u64::try_from(id).unwrap_or(0),
                    role,
                    name,
                    serial,
                    reason,
                    revoked_by,
                    revoked_at_ms: tx.now,
                };
                emit(
                    tx,
                    CertificateEvent {
                        action: Action::Revoked as i32,
                        identity: if revocation.name.is_empty() {
                            String::new()
                        } else {
                            format!("{}/{}", revocation.role, revocation.name)
                        },
                        serial: revocation.serial.clone(),
                        reason: revocation.reason.clone(),
                        ..Default::default()
                    },
                )?;
                Ok(Some(revocation))
            })
            .await?;
        written.ok_or(RevokeError::TooMany)
    }

    /// Every revocation, oldest first.
    pub async fn list_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        self.read(|conn| list_revocations(conn)).await
    }

    /// Forget tokens used or expired long ago.
    pub(super) fn forget_old_tokens(tx: &mut Tx<'_>) -> Result<usize, StoreError> {
        let before = tx.now - FORGET_TOKENS_AFTER_MS;
        tx.sql.exec(
            "DELETE FROM join_tokens WHERE expires_ms < ?1 OR used_ms < ?1",
            &[&before],
        )
    }
}

fn list_revocations(conn: &dyn Sql) -> Result<Vec<Revocation>, StoreError> {
    conn.fetch_all(
        "SELECT id, role, name, serial, reason, revoked_by, revoked_ms
             FROM revocations ORDER BY id",
        &[],
        |r| {
            Ok(Revocation {
                id: u64::try_from(r.get::<i64>(0)?).unwrap_or(0),
                role: r.get(1)?,
                name: r.get(2)?,
                serial: r.get(3)?,
                reason: r.get(4)?,
                revoked_by: r.get(5)?,
                revoked_at_ms: r.get(6)?,
            })
        },
    )
}

fn emit(tx: &mut Tx<'_>, certificate: CertificateEvent) -> Result<(), StoreError> {
    tx.emit("", event::Kind::Certificate(certificate))?;
    Ok(())
}
