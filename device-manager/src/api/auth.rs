//! Bearer tokens with read-only or admin rights.
//!
//! Tokens come from a TOML file (`iddctl serve --tokens FILE`) or the command line:
//!
//! ```toml
//! [[token]]
//! name = "dashboard"          # shown in logs, never the secret
//! secret = "at least 16 characters"
//! role = "read"               # GET only
//!
//! [[token]]
//! name = "ops"
//! secret = "another long secret"
//! role = "admin"              # everything: faults, restart, policy apply
//! ```
//!
//! A request carries `Authorization: Bearer SECRET`. Reads (`GET`, `HEAD`) need any token,
//! everything else an admin token. No or an unknown token: 401 with `WWW-Authenticate: Bearer`;
//! a read-only token on an admin endpoint: 403. With no token configured the API is open, which
//! `iddctl serve` allows only on a loopback address (see [`crate::api`]).
//!
//! Secrets are compared in time independent of where they differ (every configured token is
//! compared in full), so response timing does not reveal a prefix.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use axum::http::StatusCode;

/// Shortest secret accepted.
pub const MIN_SECRET: usize = 16;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads only.
    Read,
    /// Everything.
    Admin,
}

/// One token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Token {
    /// Its name (for logs).
    pub name: String,
    /// The secret.
    pub secret: String,
    /// Its rights.
    pub role: Role,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    token: Vec<Token>,
}

/// Why a token configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The file could not be read.
    #[error("cannot read token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not the format above.
    #[error("token file {path}: {message}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A secret too short to be a secret.
    #[error("token {0}: the secret must have at least {MIN_SECRET} characters")]
    Short(String),
}

/// The configured tokens.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

/// Constant-time equality of two byte strings of equal length (length is not secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// No tokens: the API is open.
    pub fn none() -> Self {
        Self::default()
    }

    /// Parse the TOML format above.
    pub fn parse(text: &str, path: &str) -> Result<Self, AuthError> {
        let f: TokenFile = toml::from_str(text).map_err(|e| AuthError::Format {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let mut t = Self::none();
        for tok in f.token {
            t.add(tok)?;
        }
        Ok(t)
    }

    /// Read a token file.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Add one token.
    pub fn add(&mut self, t: Token) -> Result<(), AuthError> {
        if t.secret.chars().count() < MIN_SECRET {
            return Err(AuthError::Short(t.name));
        }
        self.tokens.push(t);
        Ok(())
    }

    /// Whether requests must carry a token.
    pub fn required(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The role of `secret`, if it is a configured token.
    pub fn role_of(&self, secret: &str) -> Option<(Role, &str)> {
        let mut found = None;
        // Compare with every token (no early exit).
        for t in &self.tokens {
            if same(t.secret.as_bytes(), secret.as_bytes()) && found.is_none() {
                found = Some((t.role, t.name.as_str()));
            }
        }
        found
    }

    /// Check a request's `Authorization` header against the right `method` needs.
    pub fn check(&self, method: &Method, auth: Option<&HeaderValue>) -> Result<(), ApiError> {
        if !self.required() {
            return Ok(());
        }
        let need = if method == Method::GET || method == Method::HEAD {
            Role::Read
        } else {
            Role::Admin
        };
        let secret = auth
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        let Some(secret) = secret else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this API needs a bearer token (Authorization: Bearer TOKEN)",
            ));
        };
        match self.role_of(secret) {
            None => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "unknown token",
            )),
            Some((role, name)) if role < need => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("token {name} is read-only; this request needs an admin token"),
            )),
            Some(_) => Ok(()),
        }
    }
}

/// The middleware: refuses a request before any handler runs.
pub async fn require(
    State(tokens): State<std::sync::Arc<Tokens>>,
    req: Request,
    next: Next,
) -> Response {
    match tokens.check(req.method(), req.headers().get(header::AUTHORIZATION)) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            let unauthorized = e.status == StatusCode::UNAUTHORIZED;
            let mut r = e.into_response();
            if unauthorized {
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            r
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
[[token]]
name = "dash"
secret = "read-only-secret-0001"
role = "read"

[[token]]
name = "ops"
secret = "admin-secret-00000001"
role = "admin"
"#;

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    #[test]
    fn roles_and_statuses() {
        let t = Tokens::parse(FILE, "t.toml").unwrap();
        assert!(t.required());
        let read = hv("Bearer read-only-secret-0001");
        let admin = hv("Bearer admin-secret-00000001");
        assert!(t.check(&Method::GET, Some(&read)).is_ok());
        assert!(t.check(&Method::GET, Some(&admin)).is_ok());
        assert!(t.check(&Method::POST, Some(&admin)).is_ok());
        assert_eq!(t.check(&Method::POST, Some(&read)).unwrap_err().status, 403);
        assert_eq!(t.check(&Method::GET, None).unwrap_err().status, 401);
        assert_eq!(
            t.check(&Method::GET, Some(&hv("Bearer nope")))
                .unwrap_err()
                .status,
            401
        );
        assert_eq!(
            t.check(&Method::GET, Some(&hv("Basic abc")))
                .unwrap_err()
                .status,
            401
        );
    }

    #[test]
    fn open_without_tokens_and_refuses_bad_files() {
        assert!(Tokens::none().check(&Method::POST, None).is_ok());
        assert!(matches!(
            Tokens::parse("[[token]]\nname='a'\nsecret='short'\nrole='admin'\n", "t"),
            Err(AuthError::Short(_))
        ));
        assert!(matches!(
            Tokens::parse(
                "[[token]]\nname='a'\nsecret='long enough secret!'\nrole='root'\n",
                "t"
            ),
            Err(AuthError::Format { .. })
        ));
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }

    proptest::proptest! {
        /// Any text as a token file: an error or tokens, never a panic; any header value: a
        /// verdict, never a panic.
        #[test]
        fn token_files_and_headers_never_panic(text in "[\\[\\]a-z=\"' \n]{0,200}", header in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let _ = Tokens::parse(&text, "t.toml");
            let t = Tokens::parse(FILE, "t.toml").unwrap();
            if let Ok(h) = HeaderValue::from_bytes(&header) {
                let r = t.check(&Method::POST, Some(&h));
                proptest::prop_assert!(r.is_err());
            }
        }
    }
}
