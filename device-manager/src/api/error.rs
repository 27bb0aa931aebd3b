//! JSON errors for every failure, and the JSON body extractor that produces them.
//!
//! Every non-2xx answer of the API has the body `{"error": {"code": "...", "message": "...",
//! "details": ...}}` with a stable, machine-readable `code` (listed in [`ApiError`]'s
//! constructors) and a sentence for people. Body rejections (malformed JSON, wrong content
//! type, over the size limit) come from axum's `Json` extractor and are re-shaped here, keeping
//! their status (413 for a body over the limit).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::Serialize;
use utoipa::ToSchema;

use crate::service::ServiceError;

/// An error answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {code}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
    /// Structured details (policy diagnostics, refusals).
    pub details: Option<serde_json::Value>,
}

/// The error body's inner object.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable code: `unauthorized`, `forbidden`, `not_found`, `method_not_allowed`,
    /// `bad_request`, `payload_too_large`, `unsupported_media_type`, `invalid_policy`,
    /// `reload_refused`, `not_implemented`, `unavailable`, `timeout`, `internal`.
    pub code: String,
    /// What went wrong.
    pub message: String,
    /// Structured details, when there are any.
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
}

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

impl ApiError {
    /// An error with no details.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    fn with_details(mut self, d: serde_json::Value) -> Self {
        self.details = Some(d);
        self
    }

    /// A body rejection, keeping its status.
    pub fn from_rejection(r: &JsonRejection) -> Self {
        let status = r.status();
        let code = match status {
            StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
            _ => "bad_request",
        };
        let mut message = r.body_text();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            message = format!("the request body is over the limit: {message}");
        }
        Self::new(status, code, message)
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::NotFound(_) => Self::not_found(msg),
            ServiceError::BadRequest(_) => Self::bad_request(msg),
            ServiceError::Invalid(errs) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_policy", msg).with_details(
                    serde_json::json!({
                        "file": errs.file,
                        "diagnostics": errs.diagnostics,
                        "rendered": errs.render(),
                    }),
                )
            }
            ServiceError::Refused(r) => Self::new(StatusCode::CONFLICT, "reload_refused", msg)
                .with_details(serde_json::json!({ "refusals": r })),
            ServiceError::NotImplemented(_) => {
                Self::new(StatusCode::NOT_IMPLEMENTED, "not_implemented", msg)
            }
            ServiceError::Unavailable(_) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", msg)
            }
            ServiceError::Timeout => Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", msg),
            ServiceError::Manager(_) => Self::internal(msg),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
                details: self.details,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// `Json<T>` whose rejections are [`ApiError`]s.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(r) => Err(ApiError::from_rejection(&r)),
        }
    }
}

/// `Path<T>` whose rejections (bad percent-encoding, say) are [`ApiError`]s.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Self(v)),
            Err(r) => Err(Self::rejected(r.status(), r.body_text())),
        }
    }
}

impl<T> ApiPath<T> {
    fn rejected(status: StatusCode, text: String) -> ApiError {
        ApiError::new(
            status,
            if status.is_server_error() {
                "internal"
            } else {
                "bad_request"
            },
            text,
        )
    }
}

/// `Query<T>` whose rejections are [`ApiError`]s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(r) => Err(ApiError::new(r.status(), "bad_request", r.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_errors_map_to_statuses() {
        let cases = [
            (ServiceError::NotFound("x".into()), 404, "not_found"),
            (ServiceError::Refused(vec![]), 409, "reload_refused"),
            (
                ServiceError::NotImplemented("x".into()),
                501,
                "not_implemented",
            ),
            (ServiceError::Unavailable("x".into()), 503, "unavailable"),
            (ServiceError::Timeout, 504, "timeout"),
            (ServiceError::Manager("x".into()), 500, "internal"),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status);
            assert_eq!(a.code, code);
        }
    }
}
