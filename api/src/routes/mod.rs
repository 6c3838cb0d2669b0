//! THE list of routes. Handlers live in the sibling modules; every one of them authenticates
//! before it reads or writes anything.

mod body;
mod channels;
mod health;
mod records_sse;
mod sessions;
mod snapshots;
mod unread_body;
mod waitpoints;
pub mod writer;

use axum::Router;
use axum::http::{HeaderName, Method, header};
use axum::routing::{MethodRouter, get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::AppState;
use crate::error::ApiError;

/// The committed OpenAPI document of every route (`api/openapi.json`), served at
/// `/openapi.json`. A test checks it against [`route_table`] and the live router.
pub const OPENAPI_DOCUMENT: &str = include_str!("../../openapi.json");

/// THE list of routes: path → methods and handlers. [`router`] is built from it, so the
/// OpenAPI test sees exactly the paths the router serves.
pub fn route_table() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/healthz", get(shared::telemetry::healthz)),
        ("/readyz", get(health::readyz)),
        ("/metrics", get(shared::telemetry::metrics)),
        ("/openapi.json", get(openapi)),
        (
            "/api/v1/sessions",
            post(sessions::create).get(sessions::list),
        ),
        (
            "/api/v1/sessions/{session}",
            get(sessions::retrieve).patch(sessions::patch),
        ),
        ("/api/v1/sessions/{session}/close", post(sessions::close)),
        (
            "/api/v1/sessions/{session}/end-and-continue",
            post(sessions::end_and_continue),
        ),
        (
            "/api/v1/sessions/{session}/snapshot-url",
            get(snapshots::snapshot_url).put(snapshots::snapshot_url),
        ),
        (
            "/api/v1/session-snapshots/{session}",
            get(snapshots::blob).put(snapshots::blob),
        ),
        ("/api/v1/auth/jwt/claims", post(sessions::jwt_claims)),
        (
            "/realtime/v1/sessions/{session}/{io}/append",
            // The append route enforces its own limit from content-length, before reading.
            post(channels::append),
        ),
        (
            "/realtime/v1/sessions/{session}/{io}/records",
            get(channels::records),
        ),
        (
            "/realtime/v1/sessions/{session}/{io}",
            get(records_sse::subscribe)
                .head(records_sse::head)
                .put(writer::initialize_stream),
        ),
        (
            "/realtime/v1/sessions/{session}/channels/{name}/{io}/append",
            post(channels::append_to_channel),
        ),
        (
            "/realtime/v1/sessions/{session}/channels/{name}/{io}/records",
            get(channels::channel_records),
        ),
        (
            "/realtime/v1/sessions/{session}/channels/{name}/{io}",
            get(records_sse::subscribe_to_channel)
                .head(records_sse::head_of_channel)
                .put(writer::initialize_channel_stream),
        ),
        (
            "/s2/v1/streams/{stream}/records",
            // Append sessions are unbounded streams of frames; each frame and each REST body
            // has its own limit (`s2_wire`).
            post(writer::append_records),
        ),
        (
            "/api/v1/runs/{run}/session-streams/wait",
            post(waitpoints::wait),
        ),
        (
            "/api/v1/waitpoints/tokens/{waitpoint}",
            get(waitpoints::retrieve),
        ),
    ]
}

pub fn router(state: AppState) -> Router {
    let discard_bounds = unread_body::DiscardBounds {
        max_bytes: state.settings.max_discard_bytes,
        timeout: state.settings.discard_timeout,
        tasks: state.tasks.clone(),
    };
    let mut router = Router::new();
    let metrics_apart = state.settings.metrics_addr.is_some();
    for (path, methods) in route_table() {
        if path == "/metrics" && metrics_apart {
            // Served by `metrics_router` on SESSIONS_METRICS_ADDR instead.
            continue;
        }
        router = router.route(path, methods);
    }
    crate::signals::register_panic_counter();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(refuse_nul_in_url))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn(record_request))
        // Outside the handlers, the panic catcher and the metrics: whatever answered before the
        // body was read, the rest of it is discarded (bounded) before the answer goes out.
        .layer(axum::middleware::from_fn_with_state(
            discard_bounds,
            unread_body::discard_unread_body,
        ))
        .layer(cors())
        .with_state(state)
}

/// The listener of `SESSIONS_METRICS_ADDR`: `/metrics` and `/healthz`, nothing a client of the
/// api could reach (keep this port off the public network).
pub fn metrics_router() -> Router {
    Router::new()
        .route("/metrics", get(shared::telemetry::metrics))
        .route("/healthz", get(shared::telemetry::healthz))
}

async fn openapi() -> impl axum::response::IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI_DOCUMENT,
    )
}

/// A request body read within `SESSIONS_MAX_JSON_BYTES` and the body timeouts, refused with our
/// JSON errors (413 when too large, 408 when too slow) instead of axum's plain-text rejections.
#[derive(Debug)]
pub(crate) struct LimitedBody(pub axum::body::Bytes);

impl axum::extract::FromRequest<AppState> for LimitedBody {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &AppState,
    ) -> Result<Self, ApiError> {
        let limits =
            body::BodyLimits::from_settings(&state.settings, state.settings.max_json_bytes);
        body::read_whole_body(request.into_body(), limits)
            .await
            .map(LimitedBody)
            .map_err(|error| error.into_api_error("Request body is larger than the limit".into()))
    }
}

/// The api's external base URL: `SESSIONS_PUBLIC_URL`, else `http://<Host header>`.
pub(crate) fn public_base_url(state: &AppState, headers: &axum::http::HeaderMap) -> String {
    match &state.settings.public_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => format!(
            "http://{}",
            headers
                .get(header::HOST)
                .and_then(|host| host.to_str().ok())
                .unwrap_or("localhost")
        ),
    }
}

/// Requests by route template (never by id), method and status; durations; body sizes.
async fn record_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    if let Some(length) = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<f64>().ok())
    {
        crate::signals::request_body(&route, length);
    }
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    crate::signals::request_finished(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// A handler that panicked: counted (`sessions_api_panics_total`), logged, answered 500 with
/// the fixed JSON error body.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> axum::response::Response {
    let message = panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic payload".to_owned());
    crate::signals::handler_panicked(&message);
    axum::response::IntoResponse::into_response(ApiError::Internal(message))
}

/// A percent-encoded NUL (`%00`) in the path or query is refused before any handler: no id,
/// cursor or filter may contain U+0000 (the database cannot compare or store it).
async fn refuse_nul_in_url(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let has_nul = |text: &str| text.as_bytes().windows(3).any(|w| w == b"%00");
    let uri = request.uri();
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        const MESSAGE: &str = "The URL must not contain NUL (%00) characters";
        if uri.path().starts_with(writer::WRITER_PATH_PREFIX) {
            return axum::response::IntoResponse::into_response(crate::s2_wire::WireError::new(
                400, "invalid", MESSAGE,
            ));
        }
        return axum::response::IntoResponse::into_response(ApiError::BadRequest(MESSAGE.into()));
    }
    next.run(request).await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("No such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Browsers call these routes directly: any origin, the methods and headers the client uses.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("x-part-id"),
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("timeout-seconds"),
            HeaderName::from_static("prefer"),
            HeaderName::from_static("x-peek-settled"),
            HeaderName::from_static("x-trigger-stream-start"),
        ])
        .expose_headers([
            header::CONTENT_TYPE,
            HeaderName::from_static("x-stream-version"),
            HeaderName::from_static("x-session-settled"),
            HeaderName::from_static("x-should-retry"),
            header::RETRY_AFTER,
        ])
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::Service;

    use super::*;

    async fn buggy_handler() -> &'static str {
        panic!("a handler bug")
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_with_the_fixed_json_error() {
        let mut app: Router = Router::new()
            .route("/boom", get(buggy_handler))
            .layer(CatchPanicLayer::custom(panic_response));
        let request = Request::get("/boom").body(Body::empty()).expect("request");
        let response = app.call(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
        assert_eq!(body, serde_json::json!({ "error": "Internal error" }));
    }
}
