//! Who may do what: bearer tokens with scopes and a path prefix, signed URLs,
//! and the anonymous mode of a server without tokens.
//!
//! Every request passes [`authenticate`], which leaves a [`Grant`] in its
//! extensions; handlers take it with the [`Caller`] extractor and ask it about
//! every path they touch ([`Grant::allow`]).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::{Error, Result};
use crate::protocol::RemotePath;

/// Query parameters of a signed URL.
pub const SIGNED_EXPIRES: &str = "expires";
pub const SIGNED_SIGNATURE: &str = "signature";
/// Query parameter carrying a token where headers cannot be set (browsers
/// opening a WebSocket or an EventSource).
pub const ACCESS_TOKEN_QUERY: &str = "access_token";

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
}

/// One `[[token]]` of the server's config: the token itself is never stored,
/// only its SHA-256.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Shown in logs and used as the owner of upload sessions.
    pub name: String,
    /// Lowercase hex SHA-256 of the token.
    pub sha256: String,
    pub scopes: Vec<Scope>,
    /// The only part of the store the token reaches (`""`: all of it).
    #[serde(default)]
    pub prefix: String,
}

/// A new random token and its config entry.
pub fn new_token(name: &str, scopes: Vec<Scope>, prefix: &str) -> (String, TokenConfig) {
    let token = format!("ferry_{}", hex::encode(rand::random::<[u8; 32]>()));
    let config = TokenConfig {
        name: name.to_owned(),
        sha256: hex::encode(Sha256::digest(token.as_bytes())),
        scopes,
        prefix: prefix.trim_matches('/').to_owned(),
    };
    (token, config)
}

/// What the caller of one request may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// A server without tokens (loopback, or `--allow-anonymous`).
    Anonymous,
    Token {
        name: String,
        read: bool,
        write: bool,
        prefix: RemotePath,
    },
    /// A valid signed URL: reading exactly this one file.
    Signed { path: RemotePath },
}

impl Grant {
    /// Refuses (403) unless the caller may act on `path` with `scope`.
    pub fn allow(&self, path: &RemotePath, scope: Scope) -> Result<()> {
        match self {
            Grant::Anonymous => Ok(()),
            Grant::Token {
                name,
                read,
                write,
                prefix,
            } => {
                let scoped = match scope {
                    Scope::Read => *read,
                    Scope::Write => *write,
                };
                if !scoped {
                    return Err(Error::Forbidden(format!(
                        "token {name:?} has no {} scope",
                        scope_name(scope)
                    )));
                }
                if !path.starts_with(prefix) {
                    return Err(Error::Forbidden(format!(
                        "token {name:?} does not reach {path:?} (only {:?})",
                        prefix.as_str()
                    )));
                }
                Ok(())
            }
            Grant::Signed { path: signed } if scope == Scope::Read && signed == path => Ok(()),
            Grant::Signed { .. } => Err(Error::Forbidden(
                "a signed URL only reads the file it was signed for".into(),
            )),
        }
    }

    /// What `GET /v1/whoami` answers.
    pub fn access(&self) -> Option<crate::protocol::Access> {
        use crate::protocol::Access;
        match self {
            Grant::Anonymous => Some(Access {
                token: None,
                read: true,
                write: true,
                prefix: RemotePath::root(),
                limits: None,
            }),
            Grant::Token {
                name,
                read,
                write,
                prefix,
            } => Some(Access {
                token: Some(name.clone()),
                read: *read,
                write: *write,
                prefix: prefix.clone(),
                limits: None,
            }),
            Grant::Signed { .. } => None,
        }
    }

    /// Names the owner recorded on upload sessions this caller creates.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Grant::Token { name, .. } => Some(name),
            Grant::Anonymous | Grant::Signed { .. } => None,
        }
    }

    /// Refuses (403) a session created by another token.
    pub fn allow_session(&self, owner: Option<&str>) -> Result<()> {
        match self {
            Grant::Anonymous => Ok(()),
            Grant::Token { .. } if self.owner() == owner => Ok(()),
            _ => Err(Error::Forbidden(
                "this upload session belongs to another token".into(),
            )),
        }
    }

    /// The part of the store a watch of `prefix` may see: `prefix` itself
    /// when it lies within the token's reach, refused otherwise.
    pub fn watch_prefix(&self, prefix: &RemotePath) -> Result<RemotePath> {
        self.allow(prefix, Scope::Read).map(|()| prefix.clone())
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Read => "read",
        Scope::Write => "write",
    }
}

struct TokenRule {
    sha256: [u8; 32],
    grant: Grant,
}

/// The server's tokens and URL-signing key.
pub struct Authenticator {
    tokens: Vec<TokenRule>,
    signing_key: Vec<u8>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.tokens.len())
            .finish_non_exhaustive()
    }
}

impl Default for Authenticator {
    /// Anonymous, with a random signing key.
    fn default() -> Self {
        Self::new(&[], None).expect("no tokens, no errors")
    }
}

impl Authenticator {
    /// `signing_key` of `None` picks a random one: signed URLs then stop
    /// working when the server restarts.
    pub fn new(tokens: &[TokenConfig], signing_key: Option<&str>) -> anyhow::Result<Self> {
        let mut rules = Vec::with_capacity(tokens.len());
        for t in tokens {
            let digest = hex::decode(&t.sha256)
                .ok()
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("token {:?}: sha256 must be 64 hex digits", t.name)
                })?;
            let prefix = RemotePath::parse(t.prefix.trim_matches('/'))
                .map_err(|e| anyhow::anyhow!("token {:?}: prefix: {e}", t.name))?;
            if t.scopes.is_empty() {
                anyhow::bail!("token {:?} has no scopes (read, write)", t.name);
            }
            // One token, one grant; one name, one owner of sessions (and of
            // idempotency keys): a repeat would silently pick one of two.
            if let Some(other) = rules.iter().find(|r: &&TokenRule| r.sha256 == digest) {
                anyhow::bail!(
                    "tokens {:?} and {:?} have the same sha256: one token, one entry",
                    other.grant.owner().unwrap_or_default(),
                    t.name
                );
            }
            if rules
                .iter()
                .any(|r| r.grant.owner() == Some(t.name.as_str()))
            {
                anyhow::bail!("two tokens are named {:?}: names must differ", t.name);
            }
            rules.push(TokenRule {
                sha256: digest,
                grant: Grant::Token {
                    name: t.name.clone(),
                    read: t.scopes.contains(&Scope::Read),
                    write: t.scopes.contains(&Scope::Write),
                    prefix,
                },
            });
        }
        let signing_key = match signing_key {
            Some(key) if key.len() < 16 => {
                anyhow::bail!("the signing secret must be at least 16 characters")
            }
            Some(key) => key.as_bytes().to_vec(),
            None => rand::random::<[u8; 32]>().to_vec(),
        };
        Ok(Self {
            tokens: rules,
            signing_key,
        })
    }

    /// A server without tokens serves anyone.
    pub fn is_anonymous(&self) -> bool {
        self.tokens.is_empty()
    }

    fn token_grant(&self, token: &str) -> Result<Grant> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // Compare against every rule, in constant time, whatever matches.
        let mut found = None;
        for rule in &self.tokens {
            if bool::from(rule.sha256.ct_eq(&digest)) {
                found = Some(rule.grant.clone());
            }
        }
        found.ok_or_else(|| Error::Unauthorized("unknown token".into()))
    }

    /// The signature of a `GET` of `path` valid until `expires` (Unix seconds).
    pub fn signature(&self, path: &RemotePath, expires: u64) -> String {
        hex::encode(self.mac(path, expires).finalize().into_bytes())
    }

    fn mac(&self, path: &RemotePath, expires: u64) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.signing_key).expect("HMAC takes any key length");
        mac.update(format!("GET\n{}\n{expires}", path.as_str()).as_bytes());
        mac
    }

    /// Checks a signed URL's parameters: 403 when altered, 410 when expired.
    fn verify_signed(&self, path: &RemotePath, expires: &str, signature: &str) -> Result<Grant> {
        let tampered = || Error::Forbidden("the URL's signature does not match".into());
        let expires: u64 = expires.parse().map_err(|_| tampered())?;
        let signature = hex::decode(signature).map_err(|_| tampered())?;
        self.mac(path, expires)
            .verify_slice(&signature)
            .map_err(|_| tampered())?;
        if expires <= unix_now() {
            return Err(Error::Expired("this signed URL has expired".into()));
        }
        Ok(Grant::Signed { path: path.clone() })
    }

    /// The grant of one request, from its signed-URL parameters, its bearer
    /// token, or the anonymous mode.
    fn grant(&self, parts: &Parts) -> Result<Grant> {
        let query: Vec<(String, String)> =
            serde_urlencoded::from_str(parts.uri.query().unwrap_or_default()).unwrap_or_default();
        let param = |name: &str| {
            query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        if let Some(signature) = param(SIGNED_SIGNATURE) {
            let path = signed_path(parts)?;
            let expires = param(SIGNED_EXPIRES)
                .ok_or_else(|| Error::Forbidden("a signed URL needs `expires`".into()))?;
            return self.verify_signed(&path, expires, signature);
        }
        let bearer = match parts.headers.get(header::AUTHORIZATION) {
            Some(value) => Some(value.to_str().ok().and_then(bearer_token).ok_or_else(|| {
                Error::Unauthorized("Authorization must be `Bearer <token>`".into())
            })?),
            None if takes_query_token(parts.uri.path()) => param(ACCESS_TOKEN_QUERY),
            None => None,
        };
        match bearer {
            Some(token) if !self.is_anonymous() => self.token_grant(token),
            // Tokens sent to a server without tokens are ignored.
            Some(_) | None if self.is_anonymous() => Ok(Grant::Anonymous),
            _ => Err(Error::Unauthorized(
                "this server needs a token (Authorization: Bearer …)".into(),
            )),
        }
    }
}

/// Browsers cannot set headers on these.
fn takes_query_token(path: &str) -> bool {
    path == "/v1/ws" || path == "/v1/events"
}

/// The file a signed URL names: only `GET`/`HEAD /v1/files/{path}` can be signed.
fn signed_path(parts: &Parts) -> Result<RemotePath> {
    let file = parts
        .uri
        .path()
        .strip_prefix("/v1/files/")
        .filter(|_| parts.method == Method::GET || parts.method == Method::HEAD)
        .ok_or_else(|| Error::Forbidden("only GET and HEAD of a file can be signed".into()))?;
    RemotePath::from_url_path(file).map_err(|_| Error::Forbidden("malformed signed path".into()))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Middleware: authenticates every request except `/healthz` and leaves its
/// [`Grant`] for the handlers.
pub async fn authenticate(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if request.uri().path() == "/healthz" {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    match admit(&app, &parts) {
        Ok(grant) => {
            parts.extensions.insert(grant);
            next.run(Request::from_parts(parts, body)).await
        }
        Err(e) => e.into_response(),
    }
}

/// The grant of a request, or the refusal to answer it with (logged).
pub fn admit(app: &AppState, parts: &Parts) -> Result<Grant> {
    app.auth().grant(parts).inspect_err(|e| {
        tracing::info!(method = %parts.method, path = parts.uri.path(), error = %e, "refused");
    })
}

/// The token of an `Authorization: Bearer <token>` value; the scheme's name
/// is case-insensitive (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The caller's [`Grant`], as [`authenticate`] left it.
pub struct Caller(pub Grant);

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Error> {
        parts
            .extensions
            .get::<Grant>()
            .cloned()
            .map(Caller)
            // Never anonymous by accident: a route outside the middleware fails.
            .ok_or_else(|| Error::Forbidden("request not authenticated".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_or_a_name_listed_twice_is_refused() {
        let entry = |name: &str, sha: &str| TokenConfig {
            name: name.into(),
            sha256: sha.into(),
            scopes: vec![Scope::Read],
            prefix: String::new(),
        };
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        assert!(Authenticator::new(&[entry("x", &a), entry("y", &b)], None).is_ok());
        let same_token = Authenticator::new(&[entry("x", &a), entry("y", &a)], None);
        assert!(same_token.unwrap_err().to_string().contains("same sha256"));
        let same_name = Authenticator::new(&[entry("x", &a), entry("x", &b)], None);
        assert!(same_name.unwrap_err().to_string().contains("named \"x\""));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer t0k", "bearer t0k", "BEARER  t0k ", "bEaReR t0k"] {
            assert_eq!(bearer_token(value), Some("t0k"), "{value:?}");
        }
        for value in ["Basic dXNlcg==", "Bearer", "Bearer   ", "Bearert0k", "t0k"] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }

    fn rules() -> Authenticator {
        let (_, alice) = new_token("alice", vec![Scope::Read, Scope::Write], "alice/");
        Authenticator::new(&[alice], Some("a signing secret of some length")).unwrap()
    }

    fn path(p: &str) -> RemotePath {
        RemotePath::parse(p).unwrap()
    }

    #[test]
    fn a_token_reaches_only_its_prefix_segment_wise() {
        let grant = Grant::Token {
            name: "a".into(),
            read: true,
            write: false,
            prefix: path("alice"),
        };
        assert!(grant.allow(&path("alice/x"), Scope::Read).is_ok());
        assert!(grant.allow(&path("alice"), Scope::Read).is_ok());
        assert!(grant.allow(&path("alicex/y"), Scope::Read).is_err());
        assert!(grant.allow(&path(""), Scope::Read).is_err());
        assert!(grant.allow(&path("alice/x"), Scope::Write).is_err());
    }

    #[test]
    fn signatures_bind_path_and_expiry() {
        let auth = rules();
        let later = unix_now() + 60;
        let sig = auth.signature(&path("a/b.mp4"), later);
        let ok = auth.verify_signed(&path("a/b.mp4"), &later.to_string(), &sig);
        assert_eq!(
            ok.unwrap(),
            Grant::Signed {
                path: path("a/b.mp4")
            }
        );
        let other_path = auth.verify_signed(&path("a/c.mp4"), &later.to_string(), &sig);
        assert!(matches!(other_path, Err(Error::Forbidden(_))));
        let other_expiry = auth.verify_signed(&path("a/b.mp4"), &(later + 1).to_string(), &sig);
        assert!(matches!(other_expiry, Err(Error::Forbidden(_))));
        let past = unix_now() - 1;
        let old = auth.signature(&path("a/b.mp4"), past);
        let expired = auth.verify_signed(&path("a/b.mp4"), &past.to_string(), &old);
        assert!(matches!(expired, Err(Error::Expired(_))));
    }

    #[test]
    fn config_errors_are_clear() {
        let bad = TokenConfig {
            name: "x".into(),
            sha256: "zz".into(),
            scopes: vec![Scope::Read],
            prefix: String::new(),
        };
        let e = Authenticator::new(&[bad], None).err().unwrap();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        assert!(Authenticator::new(&[], Some("short")).is_err());
    }
}
