//! The management API: HTTP/JSON over axum, on top of [`crate::service::Service`].
//!
//! # Endpoints
//!
//! | method | path | right | what |
//! |---|---|---|---|
//! | GET | `/v1/status` | read | summary: IDD states, guest and channel counts |
//! | GET | `/v1/devices` | read | PCI functions, host and emulated ([`crate::devices`]) |
//! | GET | `/v1/idds`, `/v1/idds/{name}` | read | driver domains: state, pid, restarts, uptime, last recovery's phases |
//! | GET | `/v1/guests` | read | guests |
//! | GET | `/v1/channels` | read | channels with ring numbers, by device kind |
//! | GET | `/v1/policy` | read | the running policy (text and JSON) |
//! | POST | `/v1/policy/validate` | admin | every error with line:column (422), or the changes it would make |
//! | POST | `/v1/policy/apply` | admin | apply; unsafe changes refused with reasons (409) |
//! | POST | `/v1/idds/{name}/faults` | admin | `{"fault": "crash"\|"hang"\|"corrupt", "guest": ..}` (202) |
//! | POST | `/v1/idds/{name}/restart` | admin | restart the IDD's process (202) |
//! | POST | `/v1/devices/{name}/promote` | admin | promote the standby IDD (501 until standby IDDs exist) |
//! | GET | `/v1/events` | read | server-sent events ([`crate::service::Event`]) |
//! | GET | `/metrics` | read | Prometheus text ([`metrics`]) |
//! | GET | `/openapi.json` | read | the OpenAPI document, generated from the handlers' annotations |
//!
//! (`validate` is a POST because it carries a body, so it needs the admin right like every
//! POST: rights go by method, which keeps the rule checkable at a glance.)
//!
//! # Safety of the listener
//!
//! * Loopback by default (`127.0.0.1:7480`). [`check_listener`] refuses a non-loopback address
//!   unless TLS (rustls) **and** tokens are configured; with tokens, every listener needs them.
//! * Request bodies are limited ([`DEFAULT_BODY_LIMIT`]; 413 with a JSON error above it);
//!   headers must arrive within [`HEADER_READ_TIMEOUT`], at most [`MAX_HEADERS`] of them.
//! * Every error is JSON ([`error`]); unknown paths 404, wrong methods 405, a panic in a
//!   handler is caught and answered 500 (the manager runs in its own thread and never sees it).
//! * Requests never reach a domain directly: every action is a [`crate::service::Command`]
//!   the supervision thread checks (IDD and guest names must exist in the running system).

pub mod auth;
pub mod client;
pub mod error;
pub mod handlers;
pub mod metrics;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

use self::auth::Tokens;
use self::error::ApiError;
use crate::service::Service;

/// Largest request body accepted (a policy file is a few KiB).
pub const DEFAULT_BODY_LIMIT: usize = 256 * 1024;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7480";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The service.
    pub svc: Service,
    /// The sysfs root for host enumeration (`/sys`).
    pub sysfs: PathBuf,
}

/// Why a listener was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// A remote listener without TLS or tokens.
    #[error("refusing to listen on {0}: a non-loopback listener needs TLS (--tls-cert/--tls-key) and tokens (--tokens)")]
    Insecure(SocketAddr),
    /// Certificate or key could not be loaded.
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A certificate and key in PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// One listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Where.
    pub addr: SocketAddr,
    /// TLS, if any.
    pub tls: Option<TlsFiles>,
}

/// Refuse a listener that would expose the API unprotected.
pub fn check_listener(l: &Listener, tokens: &Tokens) -> Result<(), ListenError> {
    if l.addr.ip().is_loopback() || (l.tls.is_some() && tokens.required()) {
        Ok(())
    } else {
        Err(ListenError::Insecure(l.addr))
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint (see /openapi.json)")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not take that method",
    )
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::internal("the request handler failed; the manager is unaffected").into_response()
}

/// The router with every endpoint, auth, body limit and error shaping.
pub fn router(state: AppState, tokens: Arc<Tokens>, body_limit: usize) -> Router {
    use handlers::*;
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{name}/promote", post(promote_standby))
        .route("/v1/idds", get(list_idds))
        .route("/v1/idds/{name}", get(get_idd))
        .route("/v1/idds/{name}/faults", post(inject_fault))
        .route("/v1/idds/{name}/restart", post(restart_idd))
        .route("/v1/guests", get(list_guests))
        .route("/v1/channels", get(list_channels))
        .route("/v1/policy", get(get_policy))
        .route("/v1/policy/validate", post(validate_policy))
        .route("/v1/policy/apply", post(apply_policy))
        .route("/v1/events", get(events))
        .route("/metrics", get(get_metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(tokens, auth::require))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

/// A running server.
pub struct Server {
    handle: axum_server::Handle,
    /// Where it listens (the bound port when 0 was asked).
    pub addr: SocketAddr,
    /// `https` or `http`.
    pub scheme: &'static str,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// `scheme://addr`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    /// Stop accepting, give open requests a second, and wait.
    pub async fn shutdown(self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(1)));
        let _ = self.task.await;
    }
}

/// How long a client may take to send its request headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most request headers accepted.
pub const MAX_HEADERS: usize = 64;

/// Connection limits against slow or oversized clients (a client that trickles its headers
/// is dropped after [`HEADER_READ_TIMEOUT`]; more than [`MAX_HEADERS`] headers is refused).
fn harden(b: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>) {
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS);
}

/// Start serving `router` on `l` (within a Tokio runtime). The listener must have passed
/// [`check_listener`].
pub async fn spawn(router: Router, l: &Listener) -> Result<Server, ListenError> {
    let handle = axum_server::Handle::new();
    let app = router.into_make_service();
    let (task, scheme) = match &l.tls {
        Some(t) => {
            tls::install_crypto();
            let cfg = axum_server::tls_rustls::RustlsConfig::from_pem_file(&t.cert, &t.key)
                .await
                .map_err(ListenError::Tls)?;
            let mut srv = axum_server::bind_rustls(l.addr, cfg).handle(handle.clone());
            harden(srv.http_builder());
            (tokio::spawn(async move { srv.serve(app).await }), "https")
        }
        None => {
            let mut srv = axum_server::bind(l.addr).handle(handle.clone());
            harden(srv.http_builder());
            (tokio::spawn(async move { srv.serve(app).await }), "http")
        }
    };
    match handle.listening().await {
        Some(addr) => Ok(Server {
            handle,
            addr,
            scheme,
            task,
        }),
        None => {
            let source = match task.await {
                Ok(Err(e)) => e,
                _ => std::io::Error::other("the server ended before listening"),
            };
            Err(ListenError::Bind {
                addr: l.addr,
                source,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_listeners_need_tls_and_tokens() {
        let open = Tokens::none();
        let mut toks = Tokens::none();
        toks.add(auth::Token {
            name: "a".into(),
            secret: "0123456789abcdef".into(),
            role: auth::Role::Admin,
        })
        .unwrap();
        let tls = Some(TlsFiles {
            cert: "c".into(),
            key: "k".into(),
        });
        let lo = Listener {
            addr: "127.0.0.1:0".parse().unwrap(),
            tls: None,
        };
        let remote = Listener {
            addr: "0.0.0.0:7480".parse().unwrap(),
            tls: None,
        };
        let remote_tls = Listener {
            tls,
            ..remote.clone()
        };
        assert!(check_listener(&lo, &open).is_ok());
        assert!(check_listener(&remote, &toks).is_err());
        assert!(check_listener(&remote_tls, &open).is_err());
        assert!(check_listener(&remote_tls, &toks).is_ok());
    }

    #[test]
    fn openapi_lists_every_route() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(handlers::ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/status",
            "/v1/devices",
            "/v1/idds/{name}/faults",
            "/v1/policy/apply",
            "/v1/events",
            "/metrics",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
