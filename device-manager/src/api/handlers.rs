//! The endpoints, and the OpenAPI document generated from their annotations.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use policy::Policy;
use serde::{Deserialize, Serialize};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::{Stream, StreamExt};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::error::{ApiError, ApiJson, ApiPath, ApiQuery, ErrorBody};
use super::{metrics, AppState};
use crate::devices::{self, BarView, IoSpaceSummary, PciDeviceView};
use crate::fault::Fault;
use crate::service::{
    ApplyOutcome, BlkChannel, ChannelStats, ChannelView, Command, Event, EventKind, GuestView,
    IddState, IddView, NetChannel, PolicyState, RecoveryView, Reply,
};

/// A summary of the whole system.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatusView {
    /// Service uptime, milliseconds.
    pub uptime_ms: u64,
    /// The running policy's name.
    pub policy: String,
    /// Every IDD with its state.
    pub idds: Vec<IddView>,
    /// Guests whose process runs.
    pub guests_running: u32,
    /// Guests in all.
    pub guests: u32,
    /// Channels, and how many failed.
    pub channels: u32,
    /// Failed channels.
    pub channels_failed: u32,
}

/// A policy text to validate or apply.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyText {
    /// The TOML text.
    pub text: String,
    /// The name shown in error positions (default `policy.toml`).
    pub name: Option<String>,
}

/// A fault to inject.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FaultRequest {
    /// `crash` (SIGABRT), `hang` (SIGSTOP) or `corrupt` (a guest's ring).
    pub fault: FaultKind,
    /// The guest whose ring to corrupt (`corrupt` only).
    pub guest: Option<String>,
}

/// Fault kinds.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Abort the IDD process.
    Crash,
    /// Stop it (no heartbeat).
    Hang,
    /// Corrupt a guest's ring.
    Corrupt,
}

/// The result of a validation.
#[derive(Debug, Serialize, ToSchema)]
pub struct ValidateOutcome {
    /// Always true here (an invalid policy is a 422 error with every diagnostic).
    pub valid: bool,
    /// What applying it would change.
    #[schema(value_type = Vec<Object>)]
    pub changes: Vec<serde_json::Value>,
}

fn snapshot(st: &AppState) -> std::sync::Arc<crate::service::Snapshot> {
    st.svc.snapshot()
}

/// System summary.
#[utoipa::path(get, path = "/v1/status", tag = "system",
    responses((status = 200, body = StatusView), (status = 401, body = ErrorBody)))]
pub async fn status(State(st): State<AppState>) -> Json<StatusView> {
    let s = snapshot(&st);
    let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
    Json(StatusView {
        uptime_ms: s.uptime_ms,
        policy: st.svc.policy().name,
        idds: s.idds.clone(),
        guests_running: n(s.guests.iter().filter(|g| g.running).count()),
        guests: n(s.guests.len()),
        channels: n(s.channels.len()),
        channels_failed: n(s.channels.iter().filter(|c| c.failed).count()),
    })
}

/// Every PCI function: host (sysfs) and emulated, with owners and I/O Spaces.
#[utoipa::path(get, path = "/v1/devices", tag = "devices",
    responses((status = 200, body = Vec<PciDeviceView>), (status = 401, body = ErrorBody)))]
pub async fn list_devices(
    State(st): State<AppState>,
) -> Result<Json<Vec<PciDeviceView>>, ApiError> {
    let ps = st.svc.policy();
    let root = st.sysfs.clone();
    let v = tokio::task::spawn_blocking(move || {
        let p = Policy::parse(&ps.text, &ps.name).ok();
        devices::enumerate(&root, p.as_ref())
    })
    .await
    .map_err(|e| ApiError::internal(format!("enumeration failed: {e}")))?;
    Ok(Json(v))
}

/// Driver domains.
#[utoipa::path(get, path = "/v1/idds", tag = "idds",
    responses((status = 200, body = Vec<IddView>), (status = 401, body = ErrorBody)))]
pub async fn list_idds(State(st): State<AppState>) -> Json<Vec<IddView>> {
    Json(snapshot(&st).idds.clone())
}

/// One driver domain.
#[utoipa::path(get, path = "/v1/idds/{name}", tag = "idds",
    params(("name" = String, Path, description = "IDD name, `idd-<device>`")),
    responses((status = 200, body = IddView), (status = 404, body = ErrorBody)))]
pub async fn get_idd(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<IddView>, ApiError> {
    snapshot(&st)
        .idds
        .iter()
        .find(|i| i.name == name)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no IDD {name}")))
}

/// Guests.
#[utoipa::path(get, path = "/v1/guests", tag = "guests",
    responses((status = 200, body = Vec<GuestView>), (status = 401, body = ErrorBody)))]
pub async fn list_guests(State(st): State<AppState>) -> Json<Vec<GuestView>> {
    Json(snapshot(&st).guests.clone())
}

/// Channels (one per guest per device), with ring numbers.
#[utoipa::path(get, path = "/v1/channels", tag = "guests",
    responses((status = 200, body = Vec<ChannelView>), (status = 401, body = ErrorBody)))]
pub async fn list_channels(State(st): State<AppState>) -> Json<Vec<ChannelView>> {
    Json(snapshot(&st).channels.clone())
}

/// The running policy.
#[utoipa::path(get, path = "/v1/policy", tag = "policy",
    responses((status = 200, body = PolicyState), (status = 401, body = ErrorBody)))]
pub async fn get_policy(State(st): State<AppState>) -> Json<PolicyState> {
    Json(st.svc.policy())
}

/// Validate a policy and show what applying it would change.
#[utoipa::path(post, path = "/v1/policy/validate", tag = "policy", request_body = PolicyText,
    responses((status = 200, body = ValidateOutcome),
        (status = 422, description = "every error with line and column", body = ErrorBody),
        (status = 409, description = "unsafe on the running system", body = ErrorBody),
        (status = 501, description = "plugs or unplugs a running guest's device, which is not done live", body = ErrorBody)))]
pub async fn validate_policy(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<PolicyText>,
) -> Result<Json<ValidateOutcome>, ApiError> {
    let name = body.name.unwrap_or_else(|| "policy.toml".into());
    let out = st.svc.validate(&body.text, &name)?;
    Ok(Json(ValidateOutcome {
        valid: true,
        changes: out.changes,
    }))
}

/// Apply a policy (admin): shares, allowed IPs and grown regions reach the running IDDs at
/// once (no restart); the answer lists what was done for each change (`applied`).
#[utoipa::path(post, path = "/v1/policy/apply", tag = "policy", request_body = PolicyText,
    responses((status = 200, body = ApplyOutcome),
        (status = 422, description = "every error with line and column", body = ErrorBody),
        (status = 409, description = "unsafe on the running system, every reason", body = ErrorBody),
        (status = 501, description = "plugs or unplugs a running guest's device, which is not done live; nothing applied", body = ErrorBody),
        (status = 500, description = "a running IDD did not take a change; the stored config has it", body = ErrorBody),
        (status = 403, body = ErrorBody)))]
pub async fn apply_policy(
    State(st): State<AppState>,
    ApiJson(body): ApiJson<PolicyText>,
) -> Result<Json<ApplyOutcome>, ApiError> {
    let name = body.name.unwrap_or_else(|| "policy.toml".into());
    match st
        .svc
        .command(Command::ApplyPolicy {
            text: body.text,
            name,
        })
        .await?
    {
        Reply::Applied(o) => Ok(Json(o)),
        Reply::Accepted { message } => {
            Err(ApiError::internal(format!("unexpected answer: {message}")))
        }
    }
}

/// Inject a fault into an IDD (admin); the recovery follows on `/v1/events`.
#[utoipa::path(post, path = "/v1/idds/{name}/faults", tag = "idds", request_body = FaultRequest,
    params(("name" = String, Path, description = "IDD name")),
    responses((status = 202, body = Reply), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn inject_fault(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<FaultRequest>,
) -> Result<(StatusCode, Json<Reply>), ApiError> {
    let fault = match (body.fault, body.guest) {
        (FaultKind::Crash, None) => Fault::Crash,
        (FaultKind::Hang, None) => Fault::Hang,
        (FaultKind::Corrupt, Some(guest)) if !guest.is_empty() => Fault::Corrupt { guest },
        (FaultKind::Corrupt, _) => return Err(ApiError::bad_request("corrupt needs a guest")),
        (_, Some(_)) => return Err(ApiError::bad_request("only corrupt takes a guest")),
    };
    let r = st.svc.command(Command::Inject { idd: name, fault }).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

/// Restart an IDD's process (admin).
#[utoipa::path(post, path = "/v1/idds/{name}/restart", tag = "idds",
    params(("name" = String, Path, description = "IDD name")),
    responses((status = 202, body = Reply), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn restart_idd(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<(StatusCode, Json<Reply>), ApiError> {
    let r = st.svc.command(Command::Restart { idd: name }).await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

/// Promote a device's standby IDD (admin; 501 until standby IDDs exist).
#[utoipa::path(post, path = "/v1/devices/{name}/promote", tag = "devices",
    params(("name" = String, Path, description = "device name")),
    responses((status = 202, body = Reply), (status = 404, body = ErrorBody), (status = 501, body = ErrorBody)))]
pub async fn promote_standby(
    State(st): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<(StatusCode, Json<Reply>), ApiError> {
    let r = st
        .svc
        .command(Command::PromoteStandby { device: name })
        .await?;
    Ok((StatusCode::ACCEPTED, Json(r)))
}

fn sse_of(r: Result<Event, BroadcastStreamRecvError>) -> Result<SseEvent, Infallible> {
    Ok(match r {
        Ok(ev) => SseEvent::default()
            .event(ev.type_name())
            .id(ev.seq.to_string())
            .json_data(&ev)
            .unwrap_or_else(|_| {
                SseEvent::default()
                    .event("error")
                    .data("unserializable event")
            }),
        Err(BroadcastStreamRecvError::Lagged(n)) => SseEvent::default()
            .event("lagged")
            .data(format!("{{\"missed\":{n}}}")),
    })
}

/// Where to resume the event stream.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct EventsQuery {
    /// Replay the kept events numbered after this one first (the last `seq` seen; the
    /// `Last-Event-ID` header does the same, as browsers send it on reconnect).
    pub since: Option<u64>,
}

/// Server-sent events: state changes, recoveries (with phases), faults, failed channels,
/// exited guests, applied policies. Each SSE `event:` is the event's `type`, `id:` its `seq`,
/// `data:` the JSON [`Event`]. With `?since=N` or `Last-Event-ID: N` the kept events after N
/// (the last 256) come first.
#[utoipa::path(get, path = "/v1/events", tag = "events", params(EventsQuery),
    responses((status = 200, description = "text/event-stream of Event", content_type = "text/event-stream", body = Event)))]
pub async fn events(
    State(st): State<AppState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let since = q.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok())
    });
    let (past, rx) = match since {
        Some(n) => st.svc.resume(n),
        None => (Vec::new(), st.svc.subscribe()),
    };
    let last_replayed = past.last().map_or(0, |e| e.seq);
    // A first comment line so a client knows it is subscribed before anything happens.
    let hello = tokio_stream::once(Ok(SseEvent::default().comment("subscribed")));
    let replay = tokio_stream::iter(past.into_iter().map(|e| sse_of(Ok(e))));
    let live = BroadcastStream::new(rx)
        .filter(move |r| !matches!(r, Ok(e) if e.seq <= last_replayed))
        .map(sse_of);
    Sse::new(hello.chain(replay).chain(live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "system",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
pub async fn get_metrics(State(st): State<AppState>) -> Response {
    let text = metrics::render(&snapshot(&st));
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
}

/// The OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "system",
    responses((status = 200, description = "this document")))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let c = doc.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "bearer",
            Vec::<String>::new(),
        )]);
    }
}

/// The API's OpenAPI 3.1 document.
#[derive(OpenApi)]
#[openapi(
    info(title = "IDD device manager API", description = "Devices, driver domains (IDDs), guests, channels, policy, faults, events and metrics of the device manager. Reads need a read or admin token, everything else an admin token (when tokens are configured)."),
    paths(status, list_devices, list_idds, get_idd, list_guests, list_channels, get_policy,
        validate_policy, apply_policy, inject_fault, restart_idd, promote_standby, events,
        get_metrics, openapi),
    components(schemas(StatusView, PolicyText, FaultRequest, FaultKind, ValidateOutcome,
        ErrorBody, PciDeviceView, BarView, IoSpaceSummary, IddView, IddState, RecoveryView,
        GuestView, ChannelView, ChannelStats, BlkChannel, NetChannel, PolicyState, ApplyOutcome,
        Reply, Event, EventKind)),
    modifiers(&Bearer)
)]
pub struct ApiDoc;
