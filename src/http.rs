//! The HTTP listener (one port, loopback by default): `/metrics` (Prometheus text),
//! `/healthz` (the process is alive), `/readyz` (200 only while the database answers,
//! the listener is connected and every destination is reachable; 503 naming what is
//! down), and the dead-letter API, which needs `Authorization: Bearer <http.admin_token>`.

use crate::config::Secret;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::store::operations::{DeadLetterFilter, RedriveError};
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
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/dead-letters", get(list_dead_letters))
        .route("/api/dead-letters/redrive", post(redrive))
        .route("/api/dead-letters/{id}", get(show_event))
        .with_state(state);
    let local: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(address = ?local, "serving /metrics, /healthz, /readyz and /api/dead-letters");
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
            "the dead-letter API is off: set http.admin_token (OUTBOXD_HTTP_ADMIN_TOKEN)".into(),
        ));
    }
    let given = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .as_bytes();
    let same = given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
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

fn parse_time(name: &str, text: Option<&str>) -> Result<Option<std::time::SystemTime>, Refusal> {
    text.map(|t| {
        humantime::parse_rfc3339_weak(t).map_err(|_| {
            Refusal(
                StatusCode::BAD_REQUEST,
                format!("{name}={t:?} is not a time like 2026-11-24T16:00:00Z"),
            )
        })
    })
    .transpose()
}

async fn list_dead_letters(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    let filter = match (
        parse_time("since", query.since.as_deref()),
        parse_time("until", query.until.as_deref()),
    ) {
        (Ok(since), Ok(until)) => DeadLetterFilter {
            event_type: query.event_type,
            since,
            until,
            before_id: query.before_id,
            limit: query.limit.unwrap_or(50),
        },
        (Err(bad), _) | (_, Err(bad)) => return bad.into_response(),
    };
    match state.store.list_dead_letters(&filter).await {
        Ok(items) => {
            let next = (items.len() as i64 >= filter.limit.clamp(1, 1000))
                .then(|| items.last().map(|d| d.id))
                .flatten();
            Json(json!({ "items": items, "next_before_id": next })).into_response()
        }
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    }
}

async fn show_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<i64>,
) -> Response {
    if let Err(refused) = authorize(&headers, &state.admin_token) {
        return refused.into_response();
    }
    match state.store.show_event(id).await {
        Ok(Some(event)) => Json(event).into_response(),
        Ok(None) => problem(StatusCode::NOT_FOUND, format!("no event with id {id}")),
        Err(error) => problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
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

async fn redrive(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<RedriveRequest>, axum::extract::rejection::JsonRejection>,
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
                    "expected {{\"ids\": [..], \"reason\": \"..\", \"by\": \"..\"}}: {rejection}"
                ),
            );
        }
    };
    let by = request.by.unwrap_or_else(|| "api".into());
    match state
        .store
        .redrive(&request.ids, &request.reason, &by)
        .await
    {
        Ok(redriven) => {
            let skipped: Vec<i64> = request
                .ids
                .iter()
                .copied()
                .filter(|id| !redriven.contains(id))
                .collect();
            Json(json!({ "redriven": redriven, "not_dead_letters": skipped })).into_response()
        }
        Err(RedriveError::Store(error)) => {
            problem(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
        }
        Err(refused) => problem(StatusCode::BAD_REQUEST, refused.to_string()),
    }
}
