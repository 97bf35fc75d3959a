//! Signed deployment intent (DESIGN.md invariant 9): what an agent acts on
//! comes from a statement that CI (or an operator) signed for exactly one
//! machine or VM instance, never from the control plane, which only routes
//! it.
//!
//! A statement is a JWS in compact serialization (RFC 7515) with EdDSA over
//! Ed25519 (RFC 8037), so any JOSE library can verify it:
//! `BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)`, the
//! signature over the ASCII text before the second dot. The protected header
//! is `{"alg":"EdDSA","kid":KEY_NAME,"typ":"procurator-intent+json"}` and the
//! payload an [`Intent`] as JSON. The keys are Nix's own
//! (`nix key generate-secret --key-name NAME`), so a fleet manages one kind
//! of key for caches and intents. docs/interfaces.md gives the exact bytes.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::artifact::GitCommit;
use crate::names::MachineName;
use crate::store_path::StorePath;

/// A statement longer than this is refused unread, by the artifact's parser,
/// the control plane and the agent alike.
pub use crate::limits::MAX_STATEMENT_BYTES;

/// The JWS `typ` of a statement: the version of [`Intent`]'s shape.
pub const STATEMENT_TYPE: &str = "procurator-intent+json";
const ALGORITHM: &str = "EdDSA";
const MAX_KEY_NAME_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntentError {
    #[error("the statement is {0} bytes; the limit is {MAX_STATEMENT_BYTES}")]
    TooLarge(usize),
    #[error("the statement is malformed: {0}")]
    Malformed(String),
    #[error(
        "signed by unknown key {0}; trust its public half (nix key convert-secret-to-public) or sign with a trusted key"
    )]
    UnknownKey(String),
    #[error(
        "the signature by key {0} does not verify: the statement was changed after signing, or key {0} is not the key this agent trusts under that name"
    )]
    BadSignature(String),
    #[error("{0}")]
    Key(String),
}

/// What one machine (or VM instance) is to do, exactly as signed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Intent {
    /// The row it is for: a machine's name, or a VM instance's.
    pub name: MachineName,
    pub closure: StorePath,
    pub git_commit: GitCommit,
    /// Unix milliseconds at signing. A machine accepts only statements newer
    /// than the newest it accepted, so an old one cannot be replayed.
    pub issued_at_ms: u64,
    /// The enabled health checks, run as root with `sh -c`.
    pub health_checks: Vec<IntentCheck>,
    pub auto_rollback: bool,
    pub allow_reboot: bool,
    /// 0: no connectivity confirmation.
    pub confirm_timeout_secs: u32,
    /// Set for a VM instance: what its host runs it with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmIntent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IntentCheck {
    pub command: String,
    pub timeout_secs: u32,
    pub interval_secs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmIntent {
    /// The blueprint machine the instance is a replica of.
    pub machine: MachineName,
    pub milli_cpus: u64,
    pub memory_bytes: u64,
}

impl Intent {
    /// The fields that differ from `other`'s, ignoring the issue time: what
    /// a statement and the artifact it sits in disagree on.
    pub fn differences(&self, other: &Intent) -> Vec<&'static str> {
        let mut differ = Vec::new();
        let mut check = |same: bool, field: &'static str| {
            if !same {
                differ.push(field);
            }
        };
        check(self.name == other.name, "name");
        check(self.closure == other.closure, "closure");
        check(self.git_commit == other.git_commit, "gitCommit");
        check(self.health_checks == other.health_checks, "healthChecks");
        check(self.auto_rollback == other.auto_rollback, "autoRollback");
        check(self.allow_reboot == other.allow_reboot, "allowReboot");
        check(
            self.confirm_timeout_secs == other.confirm_timeout_secs,
            "confirmTimeoutSecs",
        );
        check(self.vm == other.vm, "vm");
        differ
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    kid: String,
    typ: String,
}

/// A statement as it travels: its exact text, parsed but not yet verified.
#[derive(Debug, Clone)]
pub struct Statement {
    text: String,
    key_name: String,
    intent: Intent,
    signature: Vec<u8>,
}

impl PartialEq for Statement {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Statement {
    /// Parse a statement's text. Checks its shape and size only: who signed
    /// it is [`Statement::verify`]'s question.
    pub fn parse(text: &str) -> Result<Self, IntentError> {
        if text.len() > MAX_STATEMENT_BYTES {
            return Err(IntentError::TooLarge(text.len()));
        }
        let malformed = |why: String| IntentError::Malformed(why);
        let mut parts = text.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed(
                "expected three base64url parts separated by dots (a JWS in compact form)".into(),
            ));
        };
        let decode = |part: &str, what: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| malformed(format!("its {what} is not base64url: {e}")))
        };
        let header: Header = serde_json::from_slice(&decode(header, "header")?)
            .map_err(|e| malformed(format!("its header: {e}")))?;
        if header.alg != ALGORITHM || header.typ != STATEMENT_TYPE {
            return Err(malformed(format!(
                "its header says alg {:?} and typ {:?}; expected {ALGORITHM:?} and {STATEMENT_TYPE:?}",
                header.alg, header.typ
            )));
        }
        check_key_name(&header.kid).map_err(malformed)?;
        let intent: Intent = serde_json::from_slice(&decode(payload, "payload")?)
            .map_err(|e| malformed(format!("its payload: {e}")))?;
        let signature = decode(signature, "signature")?;
        if signature.len() != 64 {
            return Err(malformed(format!(
                "its signature is {} bytes; an Ed25519 signature is 64",
                signature.len()
            )));
        }
        Ok(Self {
            text: text.to_owned(),
            key_name: header.kid,
            intent,
            signature,
        })
    }

    /// The statement's exact text, as signed and as forwarded.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The name of the key that says it signed this (unverified).
    pub fn key_name(&self) -> &str {
        &self.key_name
    }

    /// What the statement says, before anyone checked who said it. Only the
    /// agent's own [`Statement::verify`] makes it trustworthy.
    pub fn unverified_intent(&self) -> &Intent {
        &self.intent
    }

    /// The intent, if one of `keys` signed it.
    pub fn verify(&self, keys: &[PublicKey]) -> Result<&Intent, IntentError> {
        let key = keys
            .iter()
            .find(|k| k.name == self.key_name)
            .ok_or_else(|| IntentError::UnknownKey(self.key_name.clone()))?;
        let signed = signing_input(&self.text);
        UnparsedPublicKey::new(&ED25519, &key.bytes)
            .verify(signed.as_bytes(), &self.signature)
            .map_err(|_| IntentError::BadSignature(self.key_name.clone()))?;
        Ok(&self.intent)
    }
}

/// The JWS signing input: the text up to the second dot.
fn signing_input(text: &str) -> &str {
    match text.rfind('.') {
        Some(i) => &text[..i],
        None => text,
    }
}

impl Serialize for Statement {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Statement {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

fn check_key_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > MAX_KEY_NAME_LEN
        || name
            .chars()
            .any(|c| c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!(
            "key name {:?} is not 1 to {MAX_KEY_NAME_LEN} characters without ':', spaces or control characters",
            name.chars().take(MAX_KEY_NAME_LEN).collect::<String>()
        ));
    }
    Ok(())
}

/// The secret half of an intent key, in Nix's format: `NAME:BASE64` of the
/// 64-byte Ed25519 secret key (seed, then public key).
pub struct SigningKey {
    name: String,
    pair: Ed25519KeyPair,
    public: [u8; 32],
    /// Seed and public key, as Nix writes them.
    secret: Vec<u8>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Read a key file written by `nix key generate-secret`.
    pub fn read(path: &Path) -> Result<Self, IntentError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            IntentError::Key(format!(
                "cannot read the intent key {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(text.trim()).map_err(|e| {
            IntentError::Key(format!(
                "{} is not an intent key: {e}; make one with `nix key generate-secret --key-name NAME`",
                path.display()
            ))
        })
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let (name, bytes) = split_key(text, 64, "secret")?;
        let (seed, public) = bytes.split_at(32);
        let pair = Ed25519KeyPair::from_seed_and_public_key(seed, public)
            .map_err(|e| format!("its halves do not belong together ({e})"))?;
        let mut public_bytes = [0u8; 32];
        public_bytes.copy_from_slice(public);
        Ok(Self {
            name,
            pair,
            public: public_bytes,
            secret: bytes,
        })
    }

    /// A new random key, as `nix key generate-secret` would make (for
    /// tests and benchmarks; fleets make theirs with Nix).
    pub fn generate(name: &str) -> Result<Self, String> {
        use ring::rand::SecureRandom as _;
        use ring::signature::KeyPair as _;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| "the system has no randomness to make a key from".to_owned())?;
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
            .map_err(|e| format!("cannot make a key: {e}"))?;
        let mut secret = seed.to_vec();
        secret.extend_from_slice(pair.public_key().as_ref());
        Self::parse(&format!("{name}:{}", STANDARD.encode(secret)))
    }

    /// The secret key in Nix's format, `NAME:BASE64`, as a key file holds it.
    pub fn to_nix_secret(&self) -> String {
        format!("{}:{}", self.name, STANDARD.encode(&self.secret))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public half, as `nix key convert-secret-to-public` prints it.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            bytes: self.public,
        }
    }

    /// Sign `intent` as a statement.
    pub fn sign(&self, intent: &Intent) -> Result<Statement, IntentError> {
        let header = Header {
            alg: ALGORITHM.to_owned(),
            kid: self.name.clone(),
            typ: STATEMENT_TYPE.to_owned(),
        };
        let signed = format!("{}.{}", base64_json(&header), base64_json(intent));
        let signature = self.pair.sign(signed.as_bytes());
        let text = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
        if text.len() > MAX_STATEMENT_BYTES {
            return Err(IntentError::Key(format!(
                "the statement for {} would be {} bytes; the limit is {MAX_STATEMENT_BYTES}: shorten its health checks",
                intent.name,
                text.len()
            )));
        }
        Ok(Statement {
            text,
            key_name: self.name.clone(),
            intent: intent.clone(),
            signature: signature.as_ref().to_vec(),
        })
    }
}

fn base64_json<T: Serialize>(value: &T) -> String {
    // Plain data with string keys: serializing cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default())
}

/// The public half of an intent key: `NAME:BASE64` of 32 bytes, as
/// `nix key convert-secret-to-public` prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    bytes: [u8; 32],
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, STANDARD.encode(self.bytes))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let (name, bytes) = split_key(text.trim(), 32, "public").map_err(|e| {
            format!("{e}; expected NAME:BASE64 as `nix key convert-secret-to-public` prints it")
        })?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes);
        Ok(Self { name, bytes: key })
    }
}

/// `NAME:BASE64` with `len` bytes of key.
fn split_key(text: &str, len: usize, what: &str) -> Result<(String, Vec<u8>), String> {
    let (name, key) = text
        .split_once(':')
        .ok_or_else(|| format!("a {what} key is NAME:BASE64, and this has no ':'"))?;
    check_key_name(name)?;
    let bytes = STANDARD
        .decode(key)
        .map_err(|e| format!("the {what} key of {name} is not base64: {e}"))?;
    if bytes.len() != len {
        return Err(format!(
            "the {what} key of {name} is {} bytes; an Ed25519 {what} key is {len}",
            bytes.len()
        ));
    }
    Ok((name.to_owned(), bytes))
}

#[cfg(test)]
mod tests;
