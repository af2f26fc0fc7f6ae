//! Viewer and publisher tokens.
//!
//! A token is a JWT the overlay's operator signs (`onode token mint`) that
//! grants reading and/or publishing the streams whose names match its
//! patterns, until it expires. POPs and servers given a verifying key
//! (`--token-key`) take media requests only with a token that grants them.
//!
//! Two kinds of key:
//! - a shared secret (`onode token new-secret`): HS256; every node that
//!   checks tokens holds the secret, and so could mint them;
//! - an Ed25519 key pair (`onode token keygen`): EdDSA; nodes hold only the
//!   public key, the private key stays with whoever mints.
//!
//! Checking is pure: the time is passed in, so expiry is tested without a
//! clock.

use std::path::Path;

use anyhow::{bail, Context};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Shortest shared secret taken (HS256 wants at least its hash's size).
pub const MIN_SECRET: usize = 32;
/// Longest token taken (a real one is a few hundred bytes).
pub const MAX_TOKEN: usize = 4096;
/// Most patterns a token may hold, per action.
pub const MAX_PATTERNS: usize = 64;
/// Clock difference allowed between the minting host and the node (s).
pub const LEEWAY_S: u64 = 30;

/// What a token lets its holder do with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    /// Granted by `mint --publish`: servers take a live publish of it.
    Publish,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Read => "read",
            Action::Publish => "publish",
        })
    }
}

/// The claims of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who holds it (a viewer's or publisher's name, for the logs).
    pub sub: String,
    /// Issued at (Unix seconds).
    pub iat: u64,
    /// Expires at (Unix seconds).
    pub exp: u64,
    /// Stream name patterns it may read.
    #[serde(default)]
    pub read: Vec<String>,
    /// Stream name patterns it may publish.
    #[serde(default)]
    pub publish: Vec<String>,
}

impl Claims {
    /// Whether the claims grant `action` on `stream`.
    pub fn grants(&self, action: Action, stream: &str) -> bool {
        let patterns = match action {
            Action::Read => &self.read,
            Action::Publish => &self.publish,
        };
        patterns.iter().any(|p| matches(p, stream))
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of
/// characters (also none) and every other character for itself.
pub fn matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Greedy match with backtracking to the last star: linear in practice,
    // never exponential.
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// Why a request's token was not good enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// No token came with the request.
    Missing,
    /// Not a token of this overlay (bad format, signature or claims).
    Invalid(String),
    /// It was good until `exp`.
    Expired { sub: String, exp: u64 },
    /// It does not grant this.
    NotGranted { sub: String, action: Action, stream: String },
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Missing => write!(f, "a token is required and none was given"),
            TokenError::Invalid(why) => write!(f, "the token is not valid here: {why}"),
            TokenError::Expired { sub, exp } => write!(f, "the token of {sub:?} expired at {exp} (Unix time)"),
            TokenError::NotGranted { sub, action, stream } => {
                write!(f, "the token of {sub:?} does not grant {action} on stream {stream:?}")
            }
        }
    }
}

impl std::error::Error for TokenError {}

/// Checks tokens with one verifying key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("algorithms", &self.validation.algorithms).finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier from a key file: a shared secret, or an Ed25519 public
    /// key in PEM (`onode token keygen`'s `token.pub`).
    pub fn from_file(path: &Path) -> anyhow::Result<Verifier> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read token key {}", path.display()))?;
        Verifier::from_bytes(&bytes).with_context(|| format!("token key {}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> anyhow::Result<Verifier> {
        let (key, alg) = match KeyFile::of(bytes)? {
            KeyFile::Private => bail!(
                "this is a private key: give nodes the public key (token.pub), keep the private one with the minter"
            ),
            KeyFile::Public => {
                (DecodingKey::from_ed_pem(bytes).context("not an Ed25519 public key")?, Algorithm::EdDSA)
            }
            KeyFile::Secret(secret) => (DecodingKey::from_secret(secret)?, Algorithm::HS256),
        };
        let mut validation = Validation::new(alg);
        // Expiry is checked by `check` against the time it is given.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = false;
        Ok(Verifier { key, validation })
    }

    /// Checks that `token` grants `action` on `stream` at `now` (Unix
    /// seconds); returns its claims.
    pub fn check(&self, token: Option<&str>, action: Action, stream: &str, now: u64) -> Result<Claims, TokenError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        if token.len() > MAX_TOKEN {
            return Err(TokenError::Invalid(format!("{} bytes long, at most {MAX_TOKEN}", token.len())));
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| TokenError::Invalid(e.to_string()))?
            .claims;
        if claims.read.len() > MAX_PATTERNS || claims.publish.len() > MAX_PATTERNS {
            return Err(TokenError::Invalid(format!("more than {MAX_PATTERNS} patterns")));
        }
        if claims.exp.saturating_add(LEEWAY_S) < now {
            return Err(TokenError::Expired { sub: claims.sub, exp: claims.exp });
        }
        if !claims.grants(action, stream) {
            return Err(TokenError::NotGranted { sub: claims.sub, action, stream: stream.to_string() });
        }
        Ok(claims)
    }
}

/// What a key file holds; both signing and checking take any of them
/// and refuse the half that is not theirs.
enum KeyFile<'a> {
    /// An Ed25519 private key (PEM).
    Private,
    /// An Ed25519 public key (PEM).
    Public,
    /// A shared secret: the file's bytes without surrounding white space.
    Secret(&'a [u8]),
}

impl KeyFile<'_> {
    fn of(bytes: &[u8]) -> anyhow::Result<KeyFile<'_>> {
        let text = bytes.trim_ascii();
        let first = text.split(|b| *b == b'\n').next().unwrap_or_default();
        if first.starts_with(b"-----BEGIN") {
            let label = String::from_utf8_lossy(first);
            if label.contains("PRIVATE KEY") {
                return Ok(KeyFile::Private);
            }
            if label.contains("PUBLIC KEY") {
                return Ok(KeyFile::Public);
            }
        }
        if text.len() < MIN_SECRET {
            bail!(
                "a shared secret must be at least {MIN_SECRET} bytes long, this one is {} (make one with `onode token new-secret`)",
                text.len()
            );
        }
        Ok(KeyFile::Secret(text))
    }
}

/// Signs `claims` with a key file: a shared secret, or an Ed25519 private
/// key in PEM (`onode token keygen`'s `token.key`).
pub fn mint(key_file: &Path, claims: &Claims) -> anyhow::Result<String> {
    let bytes = std::fs::read(key_file).with_context(|| format!("cannot read token key {}", key_file.display()))?;
    mint_with(&bytes, claims).with_context(|| format!("token key {}", key_file.display()))
}

pub fn mint_with(key: &[u8], claims: &Claims) -> anyhow::Result<String> {
    for p in claims.read.iter().chain(&claims.publish) {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b)) {
            bail!("stream pattern {p:?} may hold only letters, digits, '.', '_', '-' and '*'");
        }
    }
    let (key, alg) = match KeyFile::of(key)? {
        KeyFile::Public => bail!("this is a public key: tokens are signed with the private key (token.key)"),
        KeyFile::Private => (EncodingKey::from_ed_pem(key).context("not an Ed25519 private key")?, Algorithm::EdDSA),
        KeyFile::Secret(secret) => (EncodingKey::from_secret(secret)?, Algorithm::HS256),
    };
    jsonwebtoken::encode(&Header::new(alg), claims, &key).context("cannot sign the token")
}

/// A new random shared secret, as text (64 hex digits).
pub fn new_secret() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new Ed25519 key pair: (private key PEM, public key PEM).
pub fn new_key_pair() -> anyhow::Result<(String, String)> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).context("cannot make an Ed25519 key pair")?;
    Ok((pair.serialize_pem(), pair.public_key_pem()))
}

/// The token a request carries as `authorization: Bearer TOKEN`.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).map(str::trim)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn claims(read: &[&str], publish: &[&str], exp: u64) -> Claims {
        Claims {
            sub: "alice".into(),
            iat: 1000,
            exp,
            read: read.iter().map(|s| s.to_string()).collect(),
            publish: publish.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn patterns_match_with_stars() {
        assert!(matches("test", "test"));
        assert!(!matches("test", "tests"));
        assert!(matches("*", "anything"));
        assert!(matches("live-*", "live-1"));
        assert!(matches("live-*", "live-"));
        assert!(!matches("live-*", "clip"));
        assert!(matches("*.mp4", "movie.mp4"));
        assert!(matches("a*b*c", "aXXbYYc"));
        assert!(!matches("a*b*c", "aXXbYY"));
        assert!(matches("a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaab"));
        assert!(!matches("a*a*a*a*b", &"a".repeat(2000)));
        assert!(!matches("", "x"));
    }

    #[test]
    fn a_secret_token_grants_what_it_says_until_it_expires() {
        let v = Verifier::from_bytes(SECRET).unwrap();
        let t = mint_with(SECRET, &claims(&["test", "live-*"], &["cam"], 5000)).unwrap();
        assert_eq!(v.check(Some(&t), Action::Read, "test", 4000).unwrap().sub, "alice");
        assert!(v.check(Some(&t), Action::Read, "live-7", 4000).is_ok());
        assert!(v.check(Some(&t), Action::Publish, "cam", 4000).is_ok());
        assert!(matches!(
            v.check(Some(&t), Action::Read, "cam", 4000),
            Err(TokenError::NotGranted { action: Action::Read, .. })
        ));
        assert!(matches!(v.check(Some(&t), Action::Publish, "test", 4000), Err(TokenError::NotGranted { .. })));
        // Within the leeway it still holds; past it, it does not.
        assert!(v.check(Some(&t), Action::Read, "test", 5000 + LEEWAY_S).is_ok());
        assert_eq!(
            v.check(Some(&t), Action::Read, "test", 5001 + LEEWAY_S),
            Err(TokenError::Expired { sub: "alice".into(), exp: 5000 })
        );
    }

    #[test]
    fn missing_forged_and_foreign_tokens_are_refused() {
        let v = Verifier::from_bytes(SECRET).unwrap();
        assert_eq!(v.check(None, Action::Read, "test", 0), Err(TokenError::Missing));
        assert_eq!(v.check(Some(""), Action::Read, "test", 0), Err(TokenError::Missing));
        assert!(matches!(v.check(Some("garbage"), Action::Read, "test", 0), Err(TokenError::Invalid(_))));
        let other = mint_with(b"another secret, just as long as the first", &claims(&["*"], &[], 5000)).unwrap();
        assert!(matches!(v.check(Some(&other), Action::Read, "test", 0), Err(TokenError::Invalid(_))));
        // Claims changed after signing.
        let good = mint_with(SECRET, &claims(&["test"], &[], 5000)).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let forged_claims = {
            use base64::Engine;
            let json = serde_json::to_vec(&claims(&["*"], &["*"], u64::MAX / 2)).unwrap();
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
        };
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert!(matches!(v.check(Some(&forged), Action::Read, "x", 0), Err(TokenError::Invalid(_))));
        assert!(matches!(v.check(Some(&"x".repeat(MAX_TOKEN + 1)), Action::Read, "x", 0), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn key_pairs_sign_with_the_private_half_and_check_with_the_public_one() {
        let (private, public) = new_key_pair().unwrap();
        let t = mint_with(private.as_bytes(), &claims(&["test"], &[], 5000)).unwrap();
        let v = Verifier::from_bytes(public.as_bytes()).unwrap();
        assert!(v.check(Some(&t), Action::Read, "test", 10).is_ok());
        // A token signed with the secret is not taken by a key-pair node.
        let hs = mint_with(SECRET, &claims(&["test"], &[], 5000)).unwrap();
        assert!(matches!(v.check(Some(&hs), Action::Read, "test", 10), Err(TokenError::Invalid(_))));
        // Halves in the wrong places are refused with a reason.
        let e = Verifier::from_bytes(private.as_bytes()).err().unwrap().to_string();
        assert!(e.contains("private key"), "{e}");
        let e = mint_with(public.as_bytes(), &claims(&["x"], &[], 1)).unwrap_err().to_string();
        assert!(e.contains("public key"), "{e}");
    }

    #[test]
    fn short_secrets_and_bad_patterns_are_refused() {
        let e = Verifier::from_bytes(b"short\n").err().unwrap().to_string();
        assert!(e.contains("at least 32 bytes"), "{e}");
        let e = mint_with(SECRET, &claims(&["bad pattern"], &[], 1)).unwrap_err().to_string();
        assert!(e.contains("bad pattern"), "{e}");
        assert_eq!(new_secret().len(), 64);
        assert!(Verifier::from_bytes(new_secret().as_bytes()).is_ok());
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut m = tonic::metadata::MetadataMap::new();
        assert_eq!(bearer(&m), None);
        m.insert("authorization", "Bearer abc.def.ghi".parse().unwrap());
        assert_eq!(bearer(&m), Some("abc.def.ghi"));
        m.insert("authorization", "Basic xyz".parse().unwrap());
        assert_eq!(bearer(&m), None);
    }
}
