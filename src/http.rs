//! The HTTP listener (one port, loopback by default): `/metrics` (Prometheus text),
//! `/healthz` (the process is alive), `/readyz` (200 only while the database answers,
//! the listener is connected and every destination is reachable; 503 naming what is
//! down), and the operator API (`/api/dead-letters`, `/api/events`), which needs
//! `Authorization: Bearer <http.admin_token>`.

use crate::config::Secret;
use crate::dead_letters::{self, ListRequest, RequestError};
use crate::events;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::replay::{self, ReplayRequest};
use crate::store::Store;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub metrics: Metrics,
    pub health: Health,
    pub store: Store,
    pub admin_token: Secret,
    /// The destinations this instance defines (a replay names one).
    pub destinations: Vec<String>,
    /// Wakes this instance's replayer when a replay is stored here.
    pub replays: std::sync::Arc<tokio::sync::Notify>,
}

/// Binds `addr` now (so a taken port fails the start).
pub async fn bind(addr: &str) -> Result<TcpListener, String> {
    TcpListener::bind(addr).await.map_err(|e| {
        format!(
            "cannot listen on {addr}: {e}; set http.listen (OUTBOXD_HTTP_LISTEN) to a free address"
        )
    })
}

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) {
    let api_off = state.admin_token.expose().is_empty();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/dead-letters", get(list_dead_letters))
        .route("/api/dead-letters/redrive", post(redrive))
        .route("/api/dead-letters/discard", post(discard))
        .route("/api/dead-letters/{id}", get(show_event))
        .route("/api/events", get(list_events))
        .route("/api/events/{event}", get(find_event))
        .route("/api/replays", get(list_replays).post(start_replay))
        .route("/api/replays/{id}", get(show_replay))
        .route("/api/replays/{id}/cancel", post(cancel_replay))
        .fallback(|| async {
            problem(
                StatusCode::NOT_FOUND,
                "no such endpoint: /metrics, /healthz, /readyz, /api/dead-letters, /api/dead-letters/ID, POST /api/dead-letters/redrive, POST /api/dead-letters/discard, /api/events?aggregate=TYPE:ID, /api/events/TRACKING_ID, /api/replays, POST /api/replays, /api/replays/ID, POST /api/replays/ID/cancel",
            )
        })
        .with_state(state);
    let address = listener
        .local_addr()
        .map_or_else(|_| "(unknown)".to_string(), |a: SocketAddr| a.to_string());
    if api_off {
        tracing::info!(
            %address,
            "serving /metrics, /healthz and /readyz; the operator API (/api/dead-letters, /api/events, /api/replays) is off (no http.admin_token)"
        );
    } else {
        tracing::info!(
            %address,
            "serving /metrics, /healthz, /readyz, /api/dead-letters, /api/events and /api/replays"
        );
    }
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = result {
        tracing::error!(%error, "HTTP listener failed");
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

async fn readyz(State(state): State<AppState>) -> Response {
    let down = state.health.down(&state.metrics);
    if down.is_empty() {
        (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "down": down })),
        )
            .into_response()
    }
}

/// An answer as JSON, or the refusal as a JSON error with its status.
fn answer<T: serde::Serialize>(result: Result<T, RequestError>) -> Response {
    match result {
        Ok(value) => Json(value).into_response(),
        Err(error) => error.into_response(),
    }
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// A request refused before any work, answered as `{"error": ...}`.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        problem(self.0, self.1)
    }
}

/// The admin token, compared in constant time.
fn authorize(headers: &HeaderMap, token: &Secret) -> Result<(), Refusal> {
    let expected = token.expose().as_bytes();
    if expected.is_empty() {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "the operator API (dead letters, events, replays) is off: set http.admin_token (OUTBOXD_HTTP_ADMIN_TOKEN)".into(),
        ));
    }
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    // Constant time over the bytes (subtle); only the length can tell.
    let same: bool = subtle::ConstantTimeEq::ct_eq(given, expected).into();
    if same {
        Ok(())
    } else {
        Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token: send Authorization: Bearer <http.admin_token>".into(),
        ))
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
    before_id: Option<i64>,
    limit: Option<i64>,
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let status = match &self {
            RequestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RequestError::NoEvent(_) => StatusCode::NOT_FOUND,
            RequestError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        problem(status, self.to_string())
    }
}

async fn list_dead_letters(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad query: {}; it takes event_type, since, until (RFC 3339), before_id and limit (whole numbers)",
                    rejection.body_text()
                ),
            );
        }
    };
    let request = ListRequest {
        event_type: query.event_type,
        since: query.since,
        until: query.until,
        before_id: query.before_id,
        limit: query.limit,
    };
    answer(dead_letters::list(&state.store, &request).await)
}

async fn show_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let Ok(Path(id)) = id else {
        return problem(
            StatusCode::BAD_REQUEST,
            "an event id is a whole number: GET /api/dead-letters/1234",
        );
    };
    answer(dead_letters::show(&state.store, id).await)
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// `TYPE:ID`; or the two parts apart, for a type that holds a colon.
    aggregate: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    before_id: Option<i64>,
    limit: Option<i64>,
}

async fn list_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let Query(query) = match query {
        Ok(query) => query,
        Err(rejection) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad query: {}; it takes aggregate (TYPE:ID), before_id and limit (whole numbers)",
                    rejection.body_text()
                ),
            );
        }
    };
    let aggregate = match (query.aggregate, query.aggregate_type, query.aggregate_id) {
        (Some(text), None, None) => match events::Aggregate::parse(&text) {
            Ok(aggregate) => aggregate,
            Err(error) => return error.into_response(),
        },
        (None, Some(aggregate_type), Some(aggregate_id))
            if !aggregate_type.is_empty() && !aggregate_id.is_empty() =>
        {
            events::Aggregate {
                aggregate_type,
                aggregate_id,
            }
        }
        _ => {
            return problem(
                StatusCode::BAD_REQUEST,
                "name one aggregate: ?aggregate=TYPE:ID (order:42), or ?aggregate_type=order&aggregate_id=42",
            );
        }
    };
    let request = events::ListRequest {
        aggregate,
        before_id: query.before_id,
        limit: query.limit,
    };
    answer(events::list(&state.store, &request).await)
}

async fn find_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    event: Result<Path<String>, PathRejection>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let Ok(Path(event)) = event else {
        return problem(
            StatusCode::BAD_REQUEST,
            "name the event by its tracking_id or id: GET /api/events/0192f0c1-7d3e-7a00-8000-000000000001",
        );
    };
    match events::EventKey::parse(&event) {
        Ok(key) => answer(events::show(&state.store, key).await),
        Err(error) => error.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct RedriveRequest {
    ids: Vec<i64>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    by: Option<String>,
}

/// An action on dead letters (`redrive`, `discard`), as the API takes it: the admin
/// token, a JSON body, a reason (`why` says what it is for) and who asks (default
/// "api"). Worded for the API (the store's own words name the CLI's flags).
fn dead_letter_action(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Json<RedriveRequest>, axum::extract::rejection::JsonRejection>,
    action: &str,
    why: &str,
) -> Result<(RedriveRequest, String), Box<Response>> {
    authorize(headers, &state.admin_token).map_err(|refused| Box::new(refused.into_response()))?;
    let Json(request) = body.map_err(|rejection| {
        Box::new(problem(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"ids\": [..], \"reason\": \"..\", \"by\": \"..\"}}: {rejection}"),
        ))
    })?;
    if request.reason.trim().is_empty() {
        return Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            format!("a {action} needs a reason: \"reason\" is required ({why})"),
        )));
    }
    let by = request.by.clone().unwrap_or_else(|| "api".into());
    if by.trim().is_empty() {
        return Err(Box::new(problem(
            StatusCode::BAD_REQUEST,
            format!(
                "\"by\" names who asks for the {action}: leave it out (it is then \"api\") or give a name"
            ),
        )));
    }
    Ok((request, by))
}

async fn redrive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<RedriveRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match dead_letter_action(
        &state,
        &headers,
        body,
        "redrive",
        "what was fixed, so the event can pass now",
    ) {
        Ok((request, by)) => {
            answer(dead_letters::redrive(&state.store, &request.ids, &request.reason, &by).await)
        }
        Err(refused) => *refused,
    }
}

/// POST /api/dead-letters/discard `{"ids": [..], "reason": "..", "by": ".."}`: gives up
/// on dead letters; with ordering, the next events of their aggregates go on at once.
async fn discard(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<RedriveRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match dead_letter_action(
        &state,
        &headers,
        body,
        "discard",
        "why the event is given up on",
    ) {
        Ok((request, by)) => {
            answer(dead_letters::discard(&state.store, &request.ids, &request.reason, &by).await)
        }
        Err(refused) => *refused,
    }
}

/// GET /api/replays: the newest replays, with their progress.
async fn list_replays(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    answer(replay::status(&state.store, None).await)
}

/// GET /api/replays/ID.
async fn show_replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<i64>, PathRejection>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let Ok(Path(id)) = id else {
        return problem(
            StatusCode::BAD_REQUEST,
            "a replay id is a whole number: GET /api/replays/7",
        );
    };
    answer(
        replay::status(&state.store, Some(id))
            .await
            .map(|mut r| r.remove(0)),
    )
}

/// POST /api/replays `{"destination", "from", "to", "event_type", "aggregate",
/// "reason", "rate", "dry_run", "by"}`: stores a replay (or counts it, dry run).
async fn start_replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<ReplayRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let Json(request) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!(
                    "expected {{\"destination\": \"webhook:NAME\", \"reason\": \"..\", and optionally \"from\", \"to\" (id or RFC 3339 time), \"event_type\", \"aggregate\" (TYPE or TYPE:ID), \"rate\" (events/s), \"dry_run\", \"by\"}}: {rejection}"
                ),
            );
        }
    };
    let started = replay::start(&state.store, &state.destinations, &request).await;
    if matches!(started, Ok(replay::Started::Stored { .. })) {
        state.replays.notify_one();
    }
    answer(started)
}

#[derive(Debug, Default, Deserialize)]
struct CancelRequest {
    #[serde(default)]
    by: Option<String>,
}

/// POST /api/replays/ID/cancel `{"by": ".."}` (body optional).
async fn cancel_replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    id: Result<Path<i64>, PathRejection>,
    body: Option<Json<CancelRequest>>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let Ok(Path(id)) = id else {
        return problem(
            StatusCode::BAD_REQUEST,
            "a replay id is a whole number: POST /api/replays/7/cancel",
        );
    };
    let by = body
        .and_then(|Json(b)| b.by)
        .unwrap_or_else(|| "api".into());
    answer(replay::cancel(&state.store, id, &by).await)
}
