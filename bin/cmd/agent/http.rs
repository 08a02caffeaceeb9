//! The agent's HTTP transport: `POST /v1/events` on a loopback address.
//!
//! The body is one JSON event, or JSON lines (one event a line). The mode comes
//! from a `mode` key of the event, else `?mode=`, else the agent's default. One
//! event is answered with one JSON object: 200 with the receipt, or the error's
//! status (4xx for a bad event, naming the field; 503 when it cannot be stored
//! now). Several are answered 200 with one JSON line per event, in body order,
//! each a receipt or an error: one bad event does not refuse the others. The
//! response is sent only after every event's mode promise holds. Requests are
//! bounded by the body limit and the connection's own flow control (hyper reads
//! the next request only after answering this one).

use std::net::SocketAddr;
use std::sync::Arc;

use auditwal::Mode;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::protocol::{self, ErrorKind, Peer, Refusal, RequestId};
use super::Agent;

/// Largest request body: a batch of many events.
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

#[derive(serde::Deserialize)]
struct EventsQuery {
    mode: Option<String>,
}

/// Serves until `stop` turns true, then finishes the requests in flight.
pub async fn serve(
    listener: TcpListener,
    agent: Arc<Agent>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/v1/events", post(post_events))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(agent);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        super::unix::stopped(&mut stop).await;
    })
    .await
}

fn json_response(status: u16, body: String, lines: bool) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let kind = if lines {
        "application/x-ndjson"
    } else {
        "application/json"
    };
    (status, [(header::CONTENT_TYPE, kind)], body).into_response()
}

async fn post_events(
    State(agent): State<Arc<Agent>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    Query(query): Query<EventsQuery>,
    body: Bytes,
) -> Response {
    let no_id = RequestId::null();
    let query_mode = match query
        .mode
        .as_deref()
        .map(protocol::mode_from_str)
        .transpose()
    {
        Ok(m) => m,
        Err(refusal) => {
            let status = refusal.kind.http_status();
            return json_response(status, protocol::error_answer(&no_id, &refusal), false);
        }
    };
    let text = match std::str::from_utf8(&body) {
        Ok(t) => t,
        Err(e) => {
            let refusal = Refusal::new(
                ErrorKind::InvalidRequest,
                Some("body"),
                format!("the body is not UTF-8: {e}"),
            );
            return json_response(400, protocol::error_answer(&no_id, &refusal), false);
        }
    };
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let peer = Peer::Http { addr };
    if lines.len() <= 1 {
        let line = lines.first().copied().unwrap_or("");
        return match record_line(&agent, line, query_mode, peer).await {
            Ok(answer) => json_response(200, answer, false),
            Err(refusal) => json_response(
                refusal.kind.http_status(),
                protocol::error_answer(&no_id, &refusal),
                false,
            ),
        };
    }
    // Durable and sync events are recorded concurrently, so that they share
    // fsyncs and commits; the answers keep body order.
    let mut tasks = Vec::with_capacity(lines.len());
    for line in lines {
        let (agent, line) = (agent.clone(), line.to_string());
        tasks.push(tokio::spawn(async move {
            record_line(&agent, &line, query_mode, peer).await
        }));
    }
    let mut out = String::new();
    for task in tasks {
        let answer = match task.await {
            Ok(Ok(answer)) => answer,
            Ok(Err(refusal)) => protocol::error_answer(&no_id, &refusal),
            Err(e) => protocol::error_answer(
                &no_id,
                &Refusal::new(
                    ErrorKind::Unavailable,
                    None,
                    format!("recording failed: {e}"),
                ),
            ),
        };
        out.push_str(&answer);
        out.push('\n');
    }
    json_response(200, out, true)
}

async fn record_line(
    agent: &Agent,
    line: &str,
    query_mode: Option<Mode>,
    peer: Peer,
) -> Result<String, Refusal> {
    if line.len() > agent.line_limit {
        return Err(Refusal::new(
            ErrorKind::TooLarge,
            Some("line"),
            format!("event line is over the limit of {} bytes", agent.line_limit),
        ));
    }
    let request = protocol::parse_http_event(line, query_mode, agent.max_event_bytes, peer)?;
    let (mode, receipt) = agent.record(request).await?;
    Ok(protocol::receipt_answer(&RequestId::null(), mode, &receipt))
}
