//! The URL shortener of the seed account, as an axum service audited by auditwal.
//!
//! This module owns the HTTP surface ([`router`]), a small in-memory store of
//! links and users ([`AppState`]) and the rule of which endpoint is audited how:
//!
//! - user-facing endpoints (create a link, bulk import, reorder a bio page) use
//!   the service's [`UserAudit`] setting: off, or one auditwal [`Mode`];
//! - admin endpoints (disable a user, override a link's safety flag) are always
//!   [`Mode::Sync`]: the row is committed in PostgreSQL *before* the action takes
//!   effect and before the response, the response carries the audit id, and if
//!   the audit fails the action does not happen and the client gets 503;
//! - `GET /{code}` (the redirect) is not audited: visits are analytics.
//!
//! The ordering rule it keeps: in the *proof* modes (sync and durable, whether
//! chosen for the user endpoints or forced on admin ones) nothing becomes
//! visible until its audit call returned a receipt, and the audit call and the
//! action (or its undo) run in a task of their own, so a client that hangs up
//! cannot leave one without the other. In the *fire-and-forget* modes (async
//! and sampled) the action happens first and the audit call cannot fail the
//! request: its failure is counted by [`AuditLog`] (`AuditStats::failed`),
//! logged by it, and shown in the response's `audit` field. Every event is
//! built and validated before the action, so an event the log would refuse is
//! a 400 and nothing happens, in every mode. Getting the WAL into PostgreSQL is
//! the loader's job (main.rs runs one); what each mode can lose is
//! docs/modes.md's.
//!
//! `ip` is the first `x-forwarded-for` address when the header is present,
//! else the peer's: right behind a proxy that sets the header, spoofable
//! without one (the example serves loopback only).
//!
//! It is the library of this crate (`shortener_app`), which `auditwal bench e2e`
//! and tests/example_service.rs serve in-process; main.rs runs it as a process.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use auditwal::{AuditError, AuditEvent, AuditLog, Mode, Outcome, Receipt};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest accepted URL, in bytes (what browsers and most shorteners accept).
const MAX_URL_BYTES: usize = 2048;
/// Longest accepted user, admin or reason text, in bytes.
const MAX_NAME_BYTES: usize = 128;
const MAX_REASON_BYTES: usize = 1024;
/// Most URLs in one bulk import: bounds the request and the audit event (whose
/// metadata lists the created codes).
const MAX_BULK_URLS: usize = 500;
/// Most links on one bio page (bounds the reorder event's before/after lists).
const MAX_BIO_LINKS: usize = 100;
/// Characters of a generated code, and how many: 62^8 ≈ 2.2e14 codes.
const CODE_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const CODE_LEN: usize = 8;
/// Shards of each map: writers to different shards never wait for each other.
const SHARDS: usize = 32;
/// Longest `x-request-id` / `user-agent` kept in an event, in bytes.
const MAX_HEADER_BYTES: usize = 256;

/// How the user-facing endpoints are audited. Admin endpoints are always sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserAudit {
    Off,
    Mode(Mode),
}

impl UserAudit {
    pub fn as_str(self) -> &'static str {
        match self {
            UserAudit::Off => "off",
            UserAudit::Mode(m) => m.as_str(),
        }
    }
}

impl std::fmt::Display for UserAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for UserAudit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(UserAudit::Off);
        }
        s.parse::<Mode>().map(UserAudit::Mode).map_err(|_| {
            format!("unknown user audit {s:?}: use off, sync, durable, async or sampled")
        })
    }
}

/// Whether a link may be followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Visibility {
    /// Reserved while its proof-mode audit call is in flight: not followed.
    Pending,
    Live,
}

#[derive(Debug, Clone)]
struct Link {
    url: String,
    owner: String,
    visibility: Visibility,
    /// Set at creation by the safety check ([`is_suspicious`]); such a link
    /// answers 403 until an admin overrides it.
    flagged: bool,
    overridden: bool,
}

#[derive(Debug, Default, Clone)]
struct User {
    disabled: bool,
    /// The bio page's links, in display order.
    bio: Vec<String>,
}

/// A map split into [`SHARDS`] independently locked parts. Locks are std
/// `RwLock`s held for a lookup or an insert only, never across an `.await`.
struct Sharded<V> {
    shards: Vec<RwLock<HashMap<String, V>>>,
}

impl<V> Sharded<V> {
    fn new() -> Self {
        Sharded {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &RwLock<HashMap<String, V>> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// A poisoned lock only means another request panicked mid-update of a
    /// plain map entry; the map itself is still consistent, so keep serving.
    fn read(&self, key: &str) -> RwLockReadGuard<'_, HashMap<String, V>> {
        self.shard(key).read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, key: &str) -> RwLockWriteGuard<'_, HashMap<String, V>> {
        self.shard(key).write().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// The service's state: the store, the audit log, and how users are audited.
pub struct AppState {
    links: Sharded<Link>,
    users: Sharded<User>,
    audit: Option<Arc<AuditLog>>,
    user_audit: UserAudit,
}

impl AppState {
    /// `audit` may be None only when user_audit is Off (admin endpoints then
    /// answer 503). Given None with another setting, the audited user
    /// endpoints answer 503 too: the service never pretends to audit.
    pub fn new(audit: Option<Arc<AuditLog>>, user_audit: UserAudit) -> Arc<AppState> {
        if audit.is_none() && user_audit != UserAudit::Off {
            tracing::error!(
                user_audit = user_audit.as_str(),
                "no audit log: the audited user endpoints will answer 503"
            );
        }
        Arc::new(AppState {
            links: Sharded::new(),
            users: Sharded::new(),
            audit,
            user_audit,
        })
    }
}

/// The service's routes. Serve with `axum::serve(listener,
/// router(state).into_make_service_with_connect_info::<SocketAddr>())` to have
/// the peer address recorded as `ip` (without it, only `x-forwarded-for` is).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/stats", get(stats))
        .route("/api/links", post(create_link))
        .route("/api/links/bulk", post(bulk_import))
        .route("/api/bio/{user}/reorder", post(reorder_bio))
        .route("/admin/users/{id}/disable", post(disable_user))
        .route("/admin/links/{code}/override", post(override_link))
        .route("/{code}", get(follow_link))
        .with_state(state)
}

// ---------------------------------------------------------------- errors

/// An error answer: its status and a JSON body `{"error": …, "field"?: …}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
    extra: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
            extra: None,
        }
    }

    fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            field: Some(field.to_string()),
            ..ApiError::new(StatusCode::BAD_REQUEST, message)
        }
    }

    fn with(mut self, extra: Value) -> Self {
        self.extra = Some(extra);
        self
    }

    /// 404: no such user or link.
    fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// No audit log, though this endpoint must be audited.
    fn audit_not_configured() -> Self {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit is not configured on this service; the action was not performed",
        )
    }

    /// A proof-mode audit call failed: the action was not performed.
    fn audit_failed(mode: Mode, event_id: uuid::Uuid, e: &AuditError) -> Self {
        if let AuditError::InvalidEvent(inner) = e {
            return event_refused(inner);
        }
        let maybe_stored = matches!(
            e,
            AuditError::Sync(auditwal::pg::PgError::OutcomeUnknown { .. })
        );
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the {mode} audit record could not be written, so the action was NOT performed; \
                 retry later ({e})"
            ),
        )
        .with(json!({
            "audit_event_id": event_id.to_string(),
            "audit_maybe_stored": maybe_stored,
        }))
    }
}

fn event_refused(e: &auditwal::EventError) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, format!("audit event refused: {e}"))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.message });
        if let Some(field) = self.field {
            body["field"] = Value::String(field);
        }
        if let Some(Value::Object(extra)) = self.extra {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        (self.status, Json(body)).into_response()
    }
}

// ---------------------------------------------------------------- input

/// Parses a JSON body into `T`. On failure, finds the field at fault so the
/// 400 names it: serde's own message names a missing field but not one of the
/// wrong type, so the body is looked at again as a JSON value against
/// `fields` (name, expected JSON type).
fn parse_body<T: DeserializeOwned>(body: &[u8], fields: &[(&str, &str)]) -> Result<T, ApiError> {
    match serde_json::from_slice::<T>(body) {
        Ok(v) => Ok(v),
        Err(e) => {
            let value: Value = match serde_json::from_slice(body) {
                Ok(v) => v,
                Err(_) => {
                    return Err(ApiError::new(
                        StatusCode::BAD_REQUEST,
                        format!("the body is not valid JSON: {e}"),
                    ))
                }
            };
            let Some(obj) = value.as_object() else {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "the body must be a JSON object",
                ));
            };
            for (name, kind) in fields {
                let ok = match (obj.get(*name), *kind) {
                    (None, _) => {
                        return Err(ApiError::field(name, format!("field `{name}` is required")))
                    }
                    (Some(Value::String(_)), "string") => true,
                    (Some(Value::Array(a)), "array of strings") => a.iter().all(Value::is_string),
                    _ => false,
                };
                if !ok {
                    return Err(ApiError::field(
                        name,
                        format!("field `{name}` must be a {kind}"),
                    ));
                }
            }
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid body: {e}"),
            ))
        }
    }
}

/// A user, admin or similar identifier: 1..=128 bytes, no control characters.
fn check_name(field: &str, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::field(
            field,
            format!("field `{field}` must not be empty"),
        ));
    }
    if value.len() > MAX_NAME_BYTES {
        return Err(ApiError::field(
            field,
            format!("field `{field}` is longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::field(
            field,
            format!("field `{field}` contains a control character"),
        ));
    }
    Ok(())
}

fn check_reason(value: &str) -> Result<(), ApiError> {
    if value.trim().is_empty() {
        return Err(ApiError::field(
            "reason",
            "field `reason` must not be empty: admin actions record why",
        ));
    }
    if value.len() > MAX_REASON_BYTES {
        return Err(ApiError::field(
            "reason",
            format!("field `reason` is longer than {MAX_REASON_BYTES} bytes"),
        ));
    }
    if value.contains('\0') {
        return Err(ApiError::field(
            "reason",
            "field `reason` contains a NUL character",
        ));
    }
    Ok(())
}

/// Checks that `url` is an absolute http(s) URL, or says why not in a 400
/// naming `field`. Deliberately small: the scheme, a non-empty host of
/// characters a host can have, no whitespace, a bounded length.
fn check_url(field: &str, url: &str) -> Result<(), ApiError> {
    let bad = |why: &str| ApiError::field(field, format!("field `{field}`: {why}"));
    if url.len() > MAX_URL_BYTES {
        return Err(bad(&format!("longer than {MAX_URL_BYTES} bytes")));
    }
    if url.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad("contains whitespace or a control character"));
    }
    let rest = if let Some(r) = url.strip_prefix("https://") {
        r
    } else if let Some(r) = url.strip_prefix("http://") {
        r
    } else {
        return Err(bad("must start with http:// or https://"));
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit('@').next().unwrap_or("");
    let host = host(host_port);
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'))
    {
        return Err(bad("the host has characters a host cannot have"));
    }
    Ok(())
}

/// `host[:port]` → host (an IPv6 literal keeps its brackets).
fn host(host_port: &str) -> &str {
    if host_port.starts_with('[') {
        return host_port.split_inclusive(']').next().unwrap_or("");
    }
    host_port.split(':').next().unwrap_or("")
}

/// The safety check: a link to a bare IP address is a classic phishing sign,
/// so it is flagged and not followed until an admin overrides it.
fn is_suspicious(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let h = host(authority.rsplit('@').next().unwrap_or(""));
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok()
}

fn new_code() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..CODE_LEN)
        .map(|_| CODE_ALPHABET[rng.gen_range(0..CODE_ALPHABET.len())] as char)
        .collect()
}

/// What the request tells about its origin, recorded in every event.
struct Client {
    ip: Option<IpAddr>,
    request_id: Option<String>,
    user_agent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let headers = &parts.headers;
        let forwarded = header_text(headers, "x-forwarded-for")
            .and_then(|v| v.split(',').next().and_then(|ip| ip.trim().parse().ok()));
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        Ok(Client {
            ip: forwarded.or(peer),
            request_id: header_text(headers, "x-request-id").map(bounded),
            user_agent: header_text(headers, header::USER_AGENT.as_str()).map(bounded),
        })
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
}

/// `s` cut to [`MAX_HEADER_BYTES`] on a character boundary, without NULs.
fn bounded(s: &str) -> String {
    let mut end = s.len().min(MAX_HEADER_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].replace('\0', "")
}

impl Client {
    fn stamp(&self, mut event: AuditEvent) -> AuditEvent {
        if let Some(ip) = self.ip {
            event = event.ip(ip);
        }
        if let Some(r) = &self.request_id {
            event = event.request_id(r.clone());
        }
        if let Some(ua) = &self.user_agent {
            event = event.user_agent(ua.clone());
        }
        event
    }
}

// ---------------------------------------------------------------- audit

/// A receipt as the response shows it.
fn receipt_json(mode: Mode, r: &Receipt) -> Value {
    match *r {
        Receipt::Committed { event_id, row_id } => {
            json!({"mode": mode.as_str(), "event_id": event_id, "row_id": row_id.0})
        }
        Receipt::Durable { event_id, lsn } => {
            json!({"mode": mode.as_str(), "event_id": event_id, "lsn": lsn})
        }
        Receipt::Appended {
            event_id,
            lsn,
            sample_rate,
        } => {
            json!({"mode": mode.as_str(), "event_id": event_id, "lsn": lsn, "sample_rate": sample_rate})
        }
        Receipt::SampledOut { event_id } => {
            json!({"mode": mode.as_str(), "event_id": event_id, "sampled_out": true})
        }
    }
}

/// Sync and durable: the caller asked for proof before the response.
fn is_proof(mode: Mode) -> bool {
    matches!(mode, Mode::Sync | Mode::Durable)
}

/// Runs `work` in a task of its own and waits for it. A client that
/// disconnects drops the handler's future; without this, a proof-mode audit
/// call could commit and its action (or undo) never run. With it, whatever
/// `work` started is finished.
async fn to_end<T: Send + 'static>(
    work: impl Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::spawn(work).await {
        Ok(r) => r,
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {e}"),
        )),
    }
}

impl AppState {
    /// The mode of the user endpoints: `None` when off.
    fn user_mode(&self) -> Result<Option<Mode>, ApiError> {
        match (self.user_audit, &self.audit) {
            (UserAudit::Off, _) => Ok(None),
            (UserAudit::Mode(mode), Some(_)) => Ok(Some(mode)),
            (UserAudit::Mode(_), None) => Err(ApiError::audit_not_configured()),
        }
    }

    /// Checks `event` as the log will, so that an event it would refuse stops
    /// the action before anything is stored.
    fn check_event(&self, event: &AuditEvent) -> Result<(), ApiError> {
        let limit = self
            .audit
            .as_ref()
            .map_or(auditwal::DEFAULT_MAX_EVENT_BYTES, |a| {
                a.config().max_event_bytes
            });
        event.validate(limit).map_err(|e| event_refused(&e))
    }

    /// Records a user-endpoint event in `mode`; returns the response's
    /// `audit` field. Proof modes: an error is the caller's (its action must
    /// not happen). Fire-and-forget modes: never an error, since the action
    /// already happened; the failure is counted in `AuditStats::failed` and
    /// logged (rate-limited) by the `AuditLog`, and shown in the field.
    async fn record_user(&self, mode: Mode, event: &AuditEvent) -> Result<Value, ApiError> {
        let log = self
            .audit
            .as_deref()
            .ok_or_else(ApiError::audit_not_configured)?;
        match log.record_with(event, mode).await {
            Ok(r) => Ok(receipt_json(mode, &r)),
            Err(e) if is_proof(mode) => Err(ApiError::audit_failed(mode, event.event_id, &e)),
            Err(e) => Ok(json!({
                "mode": mode.as_str(),
                "event_id": event.event_id,
                "error": e.to_string(),
            })),
        }
    }

    /// Records an admin event in sync mode, then (only on a receipt) applies
    /// the action, both to the end even if the client goes away.
    async fn record_admin(
        self: Arc<Self>,
        event: AuditEvent,
        apply: impl FnOnce(&AppState) + Send + 'static,
    ) -> Result<Receipt, ApiError> {
        to_end(async move {
            let log = self
                .audit
                .as_deref()
                .ok_or_else(ApiError::audit_not_configured)?;
            let receipt = log
                .record_with(&event, Mode::Sync)
                .await
                .map_err(|e| ApiError::audit_failed(Mode::Sync, event.event_id, &e))?;
            // Committed: now, and only now, the change.
            apply(&self);
            Ok(receipt)
        })
        .await
    }
}

/// The admin answer: the action's fields plus the audit reference.
fn admin_answer(mut body: Value, receipt: &Receipt) -> Response {
    body["audit_id"] = json!(receipt.event_id());
    body["audit_row_id"] = json!(receipt.row_id().map(|r| r.0));
    body["audit"] = receipt_json(Mode::Sync, receipt);
    Json(body).into_response()
}

// ---------------------------------------------------------------- handlers

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /api/stats`: the `AuditStats` snapshot as JSON, for export.
async fn stats(State(state): State<Arc<AppState>>) -> Json<Value> {
    let audit = state.audit.as_ref().map(|log| {
        let s = log.stats();
        let per_mode = |p: auditwal::PerMode| {
            p.iter()
                .map(|(m, n)| (m.as_str().to_string(), Value::from(n)))
                .collect::<serde_json::Map<_, _>>()
        };
        json!({
            "recorded": per_mode(s.recorded),
            "failed": per_mode(s.failed),
            "rejected": s.rejected,
            "sampled_out": s.sampled_out,
            "forced_keeps": s.forced_keeps,
            "dropped": s.dropped,
            "blocked_appends": s.blocked_appends,
            "fsync_failures": s.fsync_failures,
            "unsynced_at_failure": s.unsynced_at_failure,
            "wal": s.wal.map(|w| json!({
                "written_lsn": w.written_lsn,
                "durable_lsn": w.durable_lsn,
                "dropped_events": w.dropped_events,
                "rotations": w.rotations,
                "fsyncs": w.fsyncs,
                "fsync_time_us": u64::try_from(w.fsync_time.as_micros()).unwrap_or(u64::MAX),
            })),
        })
    });
    Json(json!({
        "user_audit": state.user_audit.as_str(),
        "links": state.links.len(),
        "users": state.users.len(),
        "audit": audit,
    }))
}

#[derive(Deserialize)]
struct CreateLink {
    user: String,
    url: String,
}

/// `link.create`'s metadata, serialised straight into the event.
#[derive(Serialize)]
struct CreateMeta<'a> {
    url: &'a str,
    flagged: bool,
}

#[derive(Serialize)]
struct Created<'a> {
    code: &'a str,
    url: &'a str,
    flagged: bool,
    audit: Value,
}

/// `POST /api/links`: the hot path. Validate, check the user, build and check
/// the event, store the link, audit (in the order of the module docs).
async fn create_link(
    State(state): State<Arc<AppState>>,
    client: Client,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: CreateLink = parse_body(&body, &[("user", "string"), ("url", "string")])?;
    check_name("user", &req.user)?;
    check_url("url", &req.url)?;
    let mode = state.user_mode()?;
    if state.is_disabled(&req.user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("user {} is disabled", req.user),
        ));
    }
    let flagged = is_suspicious(&req.url);
    let proof = mode.is_some_and(is_proof);
    let url = req.url.clone();
    let mut link = Link {
        url: req.url,
        owner: req.user,
        visibility: if proof {
            Visibility::Pending
        } else {
            Visibility::Live
        },
        flagged,
        overridden: false,
    };
    // The event is built and checked before the link exists, so an event the
    // log would refuse never leaves a link behind, in any mode.
    let mut code = new_code();
    let mut event = match mode {
        None => None,
        Some(_) => {
            let event = client
                .stamp(
                    AuditEvent::new("link.create")
                        .actor("user", link.owner.as_str())
                        .target("link", code.as_str())
                        .outcome(Outcome::Success),
                )
                .metadata(&CreateMeta {
                    url: &link.url,
                    flagged,
                })
                .map_err(|e| event_refused(&e))?;
            state.check_event(&event)?;
            Some(event)
        }
    };
    loop {
        match state.try_insert_link(&code, link) {
            Ok(()) => break,
            Err(back) => {
                // A collision (about one in 10^8 at a million links): another
                // code, and the event follows it.
                link = back;
                code = new_code();
                if let Some(e) = event.as_mut() {
                    e.target_id = Some(code.clone());
                }
            }
        }
    }
    let audit = match (mode, event) {
        (Some(mode), Some(event)) if proof => {
            let state = state.clone();
            let code = code.clone();
            to_end(async move {
                match state.record_user(mode, &event).await {
                    Ok(audit) => {
                        state.publish_link(&code);
                        Ok(audit)
                    }
                    Err(e) => {
                        state.remove_link(&code);
                        Err(e)
                    }
                }
            })
            .await?
        }
        (Some(mode), Some(event)) => state.record_user(mode, &event).await?,
        _ => Value::Null,
    };
    Ok((
        StatusCode::CREATED,
        Json(Created {
            code: &code,
            url: &url,
            flagged,
            audit,
        }),
    )
        .into_response())
}

#[derive(Deserialize)]
struct BulkImport {
    user: String,
    urls: Vec<String>,
}

/// `POST /api/links/bulk`: each valid URL becomes a link, each invalid one is
/// reported; one `link.bulk_import` event covers the batch (as in the seed,
/// with the counts and the created codes in its metadata).
async fn bulk_import(
    State(state): State<Arc<AppState>>,
    client: Client,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: BulkImport = parse_body(&body, &[("user", "string"), ("urls", "array of strings")])?;
    check_name("user", &req.user)?;
    if req.urls.is_empty() {
        return Err(ApiError::field("urls", "field `urls` must not be empty"));
    }
    if req.urls.len() > MAX_BULK_URLS {
        return Err(ApiError::field(
            "urls",
            format!("field `urls` has more than {MAX_BULK_URLS} entries"),
        ));
    }
    let mode = state.user_mode()?;
    if state.is_disabled(&req.user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("user {} is disabled", req.user),
        ));
    }
    // Audited batches are stored pending and published after the audit call,
    // whatever the mode: an event refused by validation (a batch over
    // `max_event_bytes`, say) then leaves nothing behind. One more lock per
    // link; bulk import is not the hot path.
    let visibility = match mode {
        None => Visibility::Live,
        Some(_) => Visibility::Pending,
    };
    let mut created = Vec::new();
    let mut codes = Vec::new();
    let mut failed = Vec::new();
    for (i, url) in req.urls.iter().enumerate() {
        let field = format!("urls[{i}]");
        match check_url(&field, url) {
            Ok(()) => {
                let flagged = is_suspicious(url);
                let code = state.insert_link(&req.user, url, flagged, visibility);
                created.push(json!({"code": code, "url": url, "flagged": flagged}));
                codes.push(code);
            }
            Err(e) => failed.push(json!({"field": field, "error": e.message})),
        }
    }
    if codes.is_empty() {
        return Err(
            ApiError::field("urls", "no URL in `urls` is valid").with(json!({"failed": failed}))
        );
    }
    let audit = match mode {
        None => Value::Null,
        Some(mode) => {
            let event = client
                .stamp(
                    AuditEvent::new("link.bulk_import")
                        .actor("user", req.user.as_str())
                        .target("link", "bulk")
                        .outcome(Outcome::Success),
                )
                .metadata(&json!({
                    "count": req.urls.len(),
                    "created": codes.len(),
                    "failed": failed.len(),
                    "codes": codes,
                }))
                .map_err(|e| event_refused(&e))
                .and_then(|event| state.check_event(&event).map(|()| event));
            let event = match event {
                Ok(event) => event,
                Err(e) => {
                    state.remove_links(&codes);
                    return Err(e);
                }
            };
            let state = state.clone();
            let work = async move {
                match state.record_user(mode, &event).await {
                    Ok(audit) => {
                        state.publish_links(&codes);
                        Ok(audit)
                    }
                    Err(e) => {
                        state.remove_links(&codes);
                        Err(e)
                    }
                }
            };
            if is_proof(mode) {
                to_end(work).await?
            } else {
                work.await?
            }
        }
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({"created": created, "failed": failed, "audit": audit})),
    )
        .into_response())
}

#[derive(Deserialize)]
struct Reorder {
    order: Vec<String>,
}

/// `POST /api/bio/{user}/reorder`: the bio page shows `order`, each a code the
/// user owns. A minor operation: user mode, the old and new order as the
/// event's before/after.
async fn reorder_bio(
    State(state): State<Arc<AppState>>,
    Path(user): Path<String>,
    client: Client,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: Reorder = parse_body(&body, &[("order", "array of strings")])?;
    check_name("user", &user)?;
    if req.order.len() > MAX_BIO_LINKS {
        return Err(ApiError::field(
            "order",
            format!("field `order` has more than {MAX_BIO_LINKS} links"),
        ));
    }
    for (i, code) in req.order.iter().enumerate() {
        if req.order[..i].contains(code) {
            return Err(ApiError::field(
                "order",
                format!("field `order`: {code:?} appears twice"),
            ));
        }
        let owned = state
            .links
            .read(code)
            .get(code)
            .is_some_and(|l| l.owner == user && l.visibility == Visibility::Live);
        if !owned {
            return Err(ApiError::field(
                "order",
                format!("field `order`: {code:?} is not a link of user {user:?}"),
            ));
        }
    }
    let mode = state.user_mode()?;
    let before = match state.users.read(&user).get(&user) {
        None => return Err(ApiError::not_found(format!("no user {user:?}"))),
        Some(u) if u.disabled => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("user {user} is disabled"),
            ))
        }
        Some(u) => u.bio.clone(),
    };
    let order = req.order;
    let audit = match mode {
        None => {
            state.set_bio(&user, order.clone());
            Value::Null
        }
        Some(mode) => {
            let event = client
                .stamp(
                    AuditEvent::new("bio.links_reordered")
                        .actor("user", user.as_str())
                        .target("bio", user.as_str())
                        .outcome(Outcome::Success),
                )
                .before(&before)
                .and_then(|e| e.after(&order))
                .and_then(|e| e.metadata(&json!({"count": order.len()})))
                .map_err(|e| event_refused(&e))?;
            state.check_event(&event)?;
            if is_proof(mode) {
                // Audited first, applied after, to the end.
                let (state, user, order) = (state.clone(), user.clone(), order.clone());
                to_end(async move {
                    let audit = state.record_user(mode, &event).await?;
                    state.set_bio(&user, order);
                    Ok(audit)
                })
                .await?
            } else {
                state.set_bio(&user, order.clone());
                state.record_user(mode, &event).await?
            }
        }
    };
    Ok(Json(json!({"user": user, "order": order, "audit": audit})).into_response())
}

/// `GET /{code}`: a redirect. Not audited: visits are analytics, not audit
/// events (a service that wants them would record `link.visit` in sampled
/// mode).
async fn follow_link(State(state): State<Arc<AppState>>, Path(code): Path<String>) -> Response {
    let link = state.links.read(&code).get(&code).cloned();
    match link {
        Some(l) if l.visibility == Visibility::Live => {
            if l.flagged && !l.overridden {
                return ApiError::new(
                    StatusCode::FORBIDDEN,
                    "this link was flagged by the safety check and has not been reviewed",
                )
                .into_response();
            }
            if state.is_disabled(&l.owner) {
                return ApiError::new(StatusCode::GONE, "this link's owner is disabled")
                    .into_response();
            }
            (StatusCode::FOUND, [(header::LOCATION, l.url)]).into_response()
        }
        _ => ApiError::not_found(format!("no link {code:?}")).into_response(),
    }
}

#[derive(Deserialize)]
struct AdminAction {
    admin: String,
    reason: String,
}

impl AdminAction {
    /// The body every admin endpoint takes, checked.
    fn parse(body: &Bytes) -> Result<AdminAction, ApiError> {
        let req: AdminAction = parse_body(body, &[("admin", "string"), ("reason", "string")])?;
        check_name("admin", &req.admin)?;
        check_reason(&req.reason)?;
        Ok(req)
    }

    /// The event an admin endpoint records: this admin did `action` to the
    /// target, for this reason, from this client.
    fn event(
        self,
        client: &Client,
        action: &str,
        target_type: &str,
        target_id: &str,
    ) -> AuditEvent {
        client.stamp(
            AuditEvent::new(action)
                .actor("admin", self.admin)
                .target(target_type, target_id)
                .reason(self.reason)
                .outcome(Outcome::Success),
        )
    }
}

/// `POST /admin/users/{id}/disable`: sync audit first, then the change.
async fn disable_user(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    client: Client,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = AdminAction::parse(&body)?;
    check_name("id", &id)?;
    if state.audit.is_none() {
        return Err(ApiError::audit_not_configured());
    }
    let was_disabled = match state.users.read(&id).get(&id) {
        None => return Err(ApiError::not_found(format!("no user {id:?}"))),
        Some(u) => u.disabled,
    };
    let event = req
        .event(&client, "admin.user.disabled", "user", &id)
        .before(&json!({"disabled": was_disabled}))
        .and_then(|e| e.after(&json!({"disabled": true})))
        .map_err(|e| event_refused(&e))?;
    state.check_event(&event)?;
    let target = id.clone();
    let receipt = state
        .record_admin(event, move |s| s.set_disabled(&target))
        .await?;
    Ok(admin_answer(
        json!({"user": id, "disabled": true}),
        &receipt,
    ))
}

/// `POST /admin/links/{code}/override`: let a flagged link be followed.
async fn override_link(
    State(state): State<Arc<AppState>>,
    Path(code): Path<String>,
    client: Client,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req = AdminAction::parse(&body)?;
    if state.audit.is_none() {
        return Err(ApiError::audit_not_configured());
    }
    let (flagged, overridden, url) = match state.links.read(&code).get(&code) {
        Some(l) if l.visibility == Visibility::Live => (l.flagged, l.overridden, l.url.clone()),
        _ => return Err(ApiError::not_found(format!("no link {code:?}"))),
    };
    let event = req
        .event(&client, "admin.url.safety_override", "link", &code)
        .before(&json!({"flagged": flagged, "overridden": overridden}))
        .and_then(|e| e.after(&json!({"flagged": flagged, "overridden": true})))
        .and_then(|e| e.metadata(&json!({"url": url})))
        .map_err(|e| event_refused(&e))?;
    state.check_event(&event)?;
    let target = code.clone();
    let receipt = state
        .record_admin(event, move |s| s.set_overridden(&target))
        .await?;
    Ok(admin_answer(
        json!({"code": code, "overridden": true}),
        &receipt,
    ))
}

// ---------------------------------------------------------------- store

impl AppState {
    fn is_disabled(&self, user: &str) -> bool {
        self.users.read(user).get(user).is_some_and(|u| u.disabled)
    }

    /// Stores `link` under `code` unless the code is taken (then gives the
    /// link back); makes sure its owner is a known user.
    fn try_insert_link(&self, code: &str, link: Link) -> Result<(), Link> {
        // First, and not under the links lock: the two maps are never
        // locked together.
        self.ensure_user(&link.owner);
        let mut shard = self.links.write(code);
        if shard.contains_key(code) {
            return Err(link);
        }
        shard.insert(code.to_string(), link);
        Ok(())
    }

    /// Stores a new link under a fresh code and returns the code.
    fn insert_link(&self, owner: &str, url: &str, flagged: bool, visibility: Visibility) -> String {
        let mut link = Link {
            url: url.to_string(),
            owner: owner.to_string(),
            visibility,
            flagged,
            overridden: false,
        };
        loop {
            let code = new_code();
            match self.try_insert_link(&code, link) {
                Ok(()) => return code,
                Err(back) => link = back,
            }
        }
    }

    /// Registers `user` on its first link (users are known by their links).
    fn ensure_user(&self, user: &str) {
        if !self.users.read(user).contains_key(user) {
            self.users.write(user).entry(user.to_string()).or_default();
        }
    }

    fn publish_link(&self, code: &str) {
        if let Some(l) = self.links.write(code).get_mut(code) {
            l.visibility = Visibility::Live;
        }
    }

    fn publish_links(&self, codes: &[String]) {
        codes.iter().for_each(|c| self.publish_link(c));
    }

    fn remove_link(&self, code: &str) {
        self.links.write(code).remove(code);
    }

    fn remove_links(&self, codes: &[String]) {
        codes.iter().for_each(|c| self.remove_link(c));
    }

    fn set_bio(&self, user: &str, order: Vec<String>) {
        if let Some(u) = self.users.write(user).get_mut(user) {
            u.bio = order;
        }
    }

    fn set_disabled(&self, user: &str) {
        if let Some(u) = self.users.write(user).get_mut(user) {
            u.disabled = true;
        }
    }

    fn set_overridden(&self, code: &str) {
        if let Some(l) = self.links.write(code).get_mut(code) {
            l.overridden = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_absolute_http_with_a_host() {
        for ok in [
            "https://example.com",
            "http://example.com:8080/a?b=c#d",
            "https://user@example.com/x",
            "http://[2001:db8::1]:80/",
        ] {
            assert!(check_url("url", ok).is_ok(), "{ok}");
        }
        for bad in [
            "example.com",
            "ftp://example.com",
            "https://",
            "https:///path",
            "https://exa mple.com",
            "https://ex<ample.com/",
        ] {
            let e = check_url("url", bad).expect_err(bad);
            assert_eq!(e.field.as_deref(), Some("url"), "{bad}");
        }
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_BYTES));
        assert!(check_url("url", &long).is_err());
    }

    #[test]
    fn links_to_bare_ip_addresses_are_flagged() {
        assert!(is_suspicious("http://192.0.2.7/login"));
        assert!(is_suspicious("https://[2001:db8::1]:443/"));
        assert!(is_suspicious("http://u@198.51.100.1:8080"));
        assert!(!is_suspicious("https://example.com/192.0.2.7"));
    }

    #[test]
    fn user_audit_parses_off_and_every_mode() {
        assert_eq!("off".parse::<UserAudit>(), Ok(UserAudit::Off));
        assert_eq!(
            "Async".parse::<UserAudit>(),
            Ok(UserAudit::Mode(Mode::Async))
        );
        for m in Mode::ALL {
            assert_eq!(m.as_str().parse::<UserAudit>(), Ok(UserAudit::Mode(m)));
        }
        assert!("eventually".parse::<UserAudit>().is_err());
    }

    #[test]
    fn the_audit_field_carries_exactly_what_each_receipt_holds() {
        let id = uuid::Uuid::now_v7();
        let row_id = auditwal::pg::RowId(42);
        let cases = [
            (
                Mode::Sync,
                Receipt::Committed {
                    event_id: id,
                    row_id,
                },
                json!({"mode": "sync", "event_id": id, "row_id": 42}),
            ),
            (
                Mode::Durable,
                Receipt::Durable {
                    event_id: id,
                    lsn: 7,
                },
                json!({"mode": "durable", "event_id": id, "lsn": 7}),
            ),
            (
                Mode::Sampled,
                Receipt::Appended {
                    event_id: id,
                    lsn: 8,
                    sample_rate: 0.25,
                },
                json!({"mode": "sampled", "event_id": id, "lsn": 8, "sample_rate": 0.25}),
            ),
            (
                Mode::Sampled,
                Receipt::SampledOut { event_id: id },
                json!({"mode": "sampled", "event_id": id, "sampled_out": true}),
            ),
        ];
        for (mode, receipt, want) in cases {
            assert_eq!(receipt_json(mode, &receipt), want, "{receipt:?}");
        }
    }

    #[test]
    fn codes_are_eight_characters_of_the_alphabet() {
        let c = new_code();
        assert_eq!(c.len(), CODE_LEN);
        assert!(c.bytes().all(|b| CODE_ALPHABET.contains(&b)));
        assert_ne!(new_code(), c);
    }
}
