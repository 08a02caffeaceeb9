//! The agent's wire format, as pure functions: the text of one request in, a
//! parsed request or a typed refusal out; an outcome in, the text of its answer
//! out. docs/agent.md describes the same format byte by byte.
//!
//! A request line is `{"id": ID, "mode": MODE, "event": EVENT}` (socket) or
//! the event itself, optionally with a `mode` key (HTTP). EVENT is exactly what
//! `auditwal emit` reads and is parsed by the same [`AuditEvent::from_json`].
//! The invariant kept here: every request gets exactly one answer carrying its
//! `id` (when the request had a readable one), and a refusal names the field at
//! fault; nothing here touches a socket, the WAL or the database.
//!
//! The peer's identity is the agent's to state, never the client's: whatever a
//! client put under [`PEER_KEY`] in `metadata` is replaced by what the kernel
//! said about the connection.

use std::fmt::Write as _;
use std::net::SocketAddr;

use auditwal::pg::PgError;
use auditwal::wal::WalError;
use auditwal::{AuditError, AuditEvent, EventError, JsonText, Mode, Receipt};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The `metadata` key under which the agent records who sent the event.
pub const PEER_KEY: &str = "_auditwal_peer";

/// How many leading bytes of an oversized line are kept to find its `id`.
pub const ID_PREFIX_BYTES: usize = 128;

/// Who sent a request, as the kernel (not the client) reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A Unix-socket peer, from SO_PEERCRED at connect time.
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// An HTTP peer: its TCP address (loopback unless remote access was allowed).
    Http { addr: SocketAddr },
}

impl Peer {
    fn to_json(self) -> serde_json::Value {
        match self {
            Peer::Unix { uid, gid, pid } => {
                serde_json::json!({ "transport": "unix", "uid": uid, "gid": gid, "pid": pid })
            }
            Peer::Http { addr } => {
                serde_json::json!({ "transport": "http", "addr": addr.to_string() })
            }
        }
    }
}

/// What kind of refusal or failure an answer reports. The spelling is the
/// `kind` field of an error answer; clients decide on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request's envelope is wrong: not JSON, not an object, a bad `id`,
    /// `mode` or `sample_rate`, no `event`. Nothing was written.
    InvalidRequest,
    /// The event is refused (validation, with the field). Nothing was written.
    InvalidEvent,
    /// The line is over the size limit. Nothing was written.
    TooLarge,
    /// The peer's uid is not on the allow-list. Nothing was written.
    Forbidden,
    /// The WAL or the database cannot take the event now (full disk budget,
    /// failed fsync, database unreachable, mode not configured). Not stored.
    Unavailable,
    /// Sync: the INSERT was sent and no answer came; it may be stored. Sending
    /// the same event (same `event_id` and `occurred_at`) again is safe.
    OutcomeUnknown,
    /// Sync: a row with this `event_id` and `occurred_at` is already stored.
    Duplicate,
    /// The agent is shutting down. Not stored.
    Closed,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::InvalidEvent => "invalid_event",
            ErrorKind::TooLarge => "too_large",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::OutcomeUnknown => "outcome_unknown",
            ErrorKind::Duplicate => "duplicate",
            ErrorKind::Closed => "closed",
        }
    }

    /// The HTTP status of a single-event answer of this kind.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::InvalidEvent => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::Duplicate => 409,
            ErrorKind::TooLarge => 413,
            ErrorKind::Unavailable | ErrorKind::OutcomeUnknown | ErrorKind::Closed => 503,
        }
    }
}

/// Why a request got no receipt.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub kind: ErrorKind,
    /// The field at fault (`action`, `mode`, `metadata`, ...), when one is.
    pub field: Option<&'static str>,
    pub message: String,
}

impl Refusal {
    pub fn new(kind: ErrorKind, field: Option<&'static str>, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            field,
            message: message.into(),
        }
    }

    fn request(field: &'static str, message: impl Into<String>) -> Self {
        Refusal::new(ErrorKind::InvalidRequest, Some(field), message)
    }
}

impl From<EventError> for Refusal {
    fn from(e: EventError) -> Self {
        let kind = match e {
            EventError::TooLarge { .. } => ErrorKind::TooLarge,
            _ => ErrorKind::InvalidEvent,
        };
        Refusal::new(kind, e.field(), e.to_string())
    }
}

/// The refusal an [`AuditLog`](auditwal::AuditLog) failure is answered with.
pub fn refusal_of(e: &AuditError) -> Refusal {
    let message = chain(e);
    let kind = match e {
        AuditError::InvalidEvent(inner) => return Refusal::from(inner.clone()),
        AuditError::Closed | AuditError::Wal(WalError::Closed { .. }) => ErrorKind::Closed,
        AuditError::Sync(PgError::OutcomeUnknown { .. }) => ErrorKind::OutcomeUnknown,
        AuditError::Sync(PgError::Duplicate { .. }) => ErrorKind::Duplicate,
        AuditError::Sync(PgError::Rejected { .. }) => ErrorKind::InvalidEvent,
        AuditError::ModeUnavailable { .. } => {
            return Refusal::new(ErrorKind::Unavailable, Some("mode"), message)
        }
        _ => ErrorKind::Unavailable,
    };
    Refusal::new(kind, None, message)
}

/// `e` and its sources, `: `-separated: a client sees the cause, not only the
/// outermost sentence.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// The `id` of a request, as the JSON text to echo back (`null` when absent or
/// unreadable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    pub fn null() -> Self {
        RequestId("null".to_string())
    }

    #[cfg(test)]
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

/// One parsed request: the mode asked for (`None`: the agent's default), the
/// sampling rate the client expects, and the event, stamped with its peer.
#[derive(Debug)]
pub struct Request {
    pub mode: Option<Mode>,
    pub sample_rate: Option<f64>,
    pub event: AuditEvent,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    mode: Option<&'a RawValue>,
    #[serde(borrow)]
    sample_rate: Option<&'a RawValue>,
    #[serde(borrow)]
    event: Option<&'a RawValue>,
}

/// Parses one socket request line. The id comes back even when the rest is
/// refused, so that a pipelining client can match the refusal.
pub fn parse_socket_request(
    line: &[u8],
    max_event_bytes: usize,
    peer: Peer,
) -> (RequestId, Result<Request, Refusal>) {
    let text = match std::str::from_utf8(line) {
        Ok(t) => t,
        Err(e) => {
            let id = id_from_prefix(line).unwrap_or_else(RequestId::null);
            return (id, Err(Refusal::request("line", format!("not UTF-8: {e}"))));
        }
    };
    let envelope: Envelope = match serde_json::from_str(text) {
        Ok(e) => e,
        Err(e) => {
            let id = id_from_prefix(line).unwrap_or_else(RequestId::null);
            let message = format!(
                "a request is one JSON object {{\"id\", \"mode\", \"sample_rate\", \"event\"}}: {e}"
            );
            return (id, Err(Refusal::request("line", message)));
        }
    };
    let id = match envelope.id.map(parse_id).transpose() {
        Ok(id) => id.unwrap_or_else(RequestId::null),
        Err(r) => return (RequestId::null(), Err(r)),
    };
    let request = (|| {
        let mode = envelope.mode.map(parse_mode).transpose()?.flatten();
        let sample_rate = envelope.sample_rate.map(parse_rate).transpose()?.flatten();
        let event = envelope.event.ok_or_else(|| {
            Refusal::request("event", "field `event` is required: the event to record")
        })?;
        let mut event = AuditEvent::from_json(event.get(), max_event_bytes)?;
        stamp(&mut event, peer)?;
        Ok(Request {
            mode,
            sample_rate,
            event,
        })
    })();
    (id, request)
}

/// Parses one HTTP body line: an event, optionally with a `mode` key, which
/// wins over `query_mode`.
pub fn parse_http_event(
    line: &str,
    query_mode: Option<Mode>,
    max_event_bytes: usize,
    peer: Peer,
) -> Result<Request, Refusal> {
    let mut object = match serde_json::from_str::<serde_json::Value>(line) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(_) => return Err(Refusal::request("line", "an event is one JSON object")),
        Err(e) => {
            return Err(EventError::Malformed {
                reason: e.to_string(),
            }
            .into())
        }
    };
    let mode = match object.remove("mode") {
        None | Some(serde_json::Value::Null) => query_mode,
        Some(serde_json::Value::String(s)) => Some(mode_from_str(&s)?),
        Some(_) => return Err(Refusal::request("mode", "field `mode` must be a string")),
    };
    let text = serde_json::Value::Object(object).to_string();
    let mut event = AuditEvent::from_json(&text, max_event_bytes)?;
    stamp(&mut event, peer)?;
    Ok(Request {
        mode,
        sample_rate: None,
        event,
    })
}

/// A mode name, as in `?mode=` or a `mode` field.
pub fn mode_from_str(s: &str) -> Result<Mode, Refusal> {
    s.parse::<Mode>().map_err(|_| {
        Refusal::request(
            "mode",
            format!("field `mode`: {s:?} is not one of sync, durable, async, sampled"),
        )
    })
}

fn parse_id(raw: &RawValue) -> Result<RequestId, Refusal> {
    let text = raw.get();
    let ok = match text.as_bytes().first() {
        Some(b'"') => true,
        Some(b) => b.is_ascii_digit() || *b == b'-',
        None => false,
    };
    if ok && text.len() <= ID_PREFIX_BYTES / 2 {
        Ok(RequestId(text.to_string()))
    } else {
        Err(Refusal::request(
            "id",
            "field `id` must be a number or a string of at most 64 bytes",
        ))
    }
}

fn parse_mode(raw: &RawValue) -> Result<Option<Mode>, Refusal> {
    match serde_json::from_str::<Option<String>>(raw.get()) {
        Ok(Some(s)) => mode_from_str(&s).map(Some),
        Ok(None) => Ok(None),
        Err(_) => Err(Refusal::request("mode", "field `mode` must be a string")),
    }
}

fn parse_rate(raw: &RawValue) -> Result<Option<f64>, Refusal> {
    match serde_json::from_str::<Option<f64>>(raw.get()) {
        Ok(Some(r)) if (0.0..=1.0).contains(&r) => Ok(Some(r)),
        Ok(None) => Ok(None),
        _ => Err(Refusal::request(
            "sample_rate",
            "field `sample_rate` must be a number in [0, 1]",
        )),
    }
}

/// The `id` of a line too long (or too broken) to parse whole, when it starts
/// with `{"id":` followed by a number or a string, as the Python client writes.
pub fn id_from_prefix(line: &[u8]) -> Option<RequestId> {
    let head = &line[..line.len().min(ID_PREFIX_BYTES)];
    let rest = head.strip_prefix(b"{\"id\":")?;
    let rest = rest.trim_ascii_start();
    let end = match rest.first()? {
        b'"' => 1 + rest[1..].iter().position(|&b| b == b'"' || b == b'\\')? + 1,
        b if b.is_ascii_digit() || *b == b'-' => rest
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'-'))?,
        _ => return None,
    };
    let id = std::str::from_utf8(&rest[..end]).ok()?;
    // A string id closed by an escape is not one we can echo safely.
    if id.is_empty() || (id.starts_with('"') && !id.ends_with('"')) {
        return None;
    }
    Some(RequestId(id.to_string()))
}

/// Puts the peer under [`PEER_KEY`] in `metadata`, replacing any value the
/// client sent there. `metadata` must be an object (or absent, or null).
fn stamp(event: &mut AuditEvent, peer: Peer) -> Result<(), Refusal> {
    let mut map = match event.metadata.take() {
        None => serde_json::Map::new(),
        Some(text) => match serde_json::from_str::<serde_json::Value>(text.as_str()) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(serde_json::Value::Null) => serde_json::Map::new(),
            _ => {
                return Err(Refusal::new(
                    ErrorKind::InvalidEvent,
                    Some("metadata"),
                    format!(
                        "field `metadata` must be a JSON object: the agent adds `{PEER_KEY}` to it"
                    ),
                ))
            }
        },
    };
    map.insert(PEER_KEY.to_string(), peer.to_json());
    event.metadata = Some(JsonText::from_value("metadata", &map)?);
    Ok(())
}

/// The answer to a request that got a receipt: `event_id` and `lsn` (durable,
/// async, kept sampled), `row_id` (sync) or `sampled_out: true`.
pub fn receipt_answer(id: &RequestId, mode: Mode, receipt: &Receipt) -> String {
    let mut out = String::with_capacity(96);
    out.push('{');
    if id.0 != "null" {
        let _ = write!(out, "\"id\":{},", id.0);
    }
    let _ = write!(
        out,
        "\"event_id\":\"{}\",\"mode\":\"{}\"",
        receipt.event_id(),
        mode
    );
    match *receipt {
        Receipt::Committed { row_id, .. } => {
            let _ = write!(out, ",\"row_id\":{row_id}");
        }
        Receipt::Durable { lsn, .. } => {
            let _ = write!(out, ",\"lsn\":{lsn}");
        }
        Receipt::Appended {
            lsn, sample_rate, ..
        } => {
            let _ = write!(out, ",\"lsn\":{lsn},\"sample_rate\":{sample_rate}");
        }
        Receipt::SampledOut { .. } => out.push_str(",\"sampled_out\":true"),
    }
    out.push('}');
    out
}

/// The answer to a request that got no receipt: `error` (a sentence), `kind`
/// and, when one field is at fault, `field`.
pub fn error_answer(id: &RequestId, refusal: &Refusal) -> String {
    let mut answer = serde_json::Map::new();
    if id.0 != "null" {
        if let Ok(v) = serde_json::from_str(&id.0) {
            answer.insert("id".into(), v);
        }
    }
    answer.insert("error".into(), refusal.message.clone().into());
    answer.insert("kind".into(), refusal.kind.as_str().into());
    if let Some(field) = refusal.field {
        answer.insert("field".into(), field.into());
    }
    serde_json::Value::Object(answer).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: Peer = Peer::Unix {
        uid: 1000,
        gid: 1000,
        pid: Some(42),
    };

    fn parse(line: &str) -> (RequestId, Result<Request, Refusal>) {
        parse_socket_request(line.as_bytes(), 64 * 1024, PEER)
    }

    #[test]
    fn a_request_is_parsed_and_stamped_with_its_peer() {
        let (id, req) = parse(r#"{"id":7,"mode":"durable","event":{"action":"a"}}"#);
        assert_eq!(id.as_json(), "7");
        let req = req.expect("valid");
        assert_eq!(req.mode, Some(Mode::Durable));
        let meta: serde_json::Value =
            serde_json::from_str(req.event.metadata.expect("stamped").as_str()).expect("json");
        assert_eq!(meta[PEER_KEY]["uid"], 1000);
        assert_eq!(meta[PEER_KEY]["pid"], 42);
    }

    #[test]
    fn a_client_cannot_claim_another_peer() {
        let line =
            r#"{"id":"x","event":{"action":"a","metadata":{"k":1,"_auditwal_peer":{"uid":0}}}}"#;
        let req = parse(line).1.expect("valid");
        let meta: serde_json::Value =
            serde_json::from_str(req.event.metadata.expect("stamped").as_str()).expect("json");
        assert_eq!(meta[PEER_KEY]["uid"], 1000);
        assert_eq!(meta["k"], 1);
    }

    #[test]
    fn each_bad_request_is_refused_naming_the_field_with_its_id() {
        let cases = [
            (r#"{"id":1,"event":{"actor_id":"x"}}"#, "1", Some("action")),
            (r#"{"id":2,"event":{"action":5}}"#, "2", Some("action")),
            (
                r#"{"id":3,"mode":"later","event":{"action":"a"}}"#,
                "3",
                Some("mode"),
            ),
            (r#"{"id":4}"#, "4", Some("event")),
            (
                r#"{"id":5,"event":{"action":"a","metadata":[1]}}"#,
                "5",
                Some("metadata"),
            ),
            (
                r#"{"id":6,"event":{"action":"a"},"extra":1}"#,
                "6",
                Some("line"),
            ),
            (r#"{"id":7, not json"#, "7", Some("line")),
            (
                r#"{"id":"q","sample_rate":2,"event":{"action":"a"}}"#,
                "\"q\"",
                Some("sample_rate"),
            ),
        ];
        for (line, want_id, field) in cases {
            let (id, req) = parse(line);
            assert_eq!(id.as_json(), want_id, "{line}");
            let refusal = req.expect_err(line);
            assert_eq!(refusal.field, field, "{line}: {refusal:?}");
        }
    }

    #[test]
    fn the_id_of_an_oversized_line_is_found_in_its_first_bytes() {
        assert_eq!(
            id_from_prefix(br#"{"id":12,"event":"#).map(|i| i.0),
            Some("12".into())
        );
        assert_eq!(
            id_from_prefix(br#"{"id":"ab","#).map(|i| i.0),
            Some("\"ab\"".into())
        );
        assert_eq!(id_from_prefix(br#"{"event":{}}"#), None);
        assert_eq!(id_from_prefix(br#"{"id":"a\"b","#), None);
    }

    #[test]
    fn answers_carry_what_each_mode_promises() {
        let id = RequestId("9".into());
        let event_id = uuid::Uuid::nil();
        let a = receipt_answer(
            &id,
            Mode::Sync,
            &Receipt::Committed {
                event_id,
                row_id: auditwal::pg::RowId(5),
            },
        );
        let v: serde_json::Value = serde_json::from_str(&a).expect("json");
        assert_eq!((v["id"].as_i64(), v["row_id"].as_i64()), (Some(9), Some(5)));
        let a = receipt_answer(&id, Mode::Sampled, &Receipt::SampledOut { event_id });
        let v: serde_json::Value = serde_json::from_str(&a).expect("json");
        assert_eq!(v["sampled_out"], true);
        let r = Refusal::new(
            ErrorKind::InvalidEvent,
            Some("action"),
            "field `action` is required",
        );
        let v: serde_json::Value = serde_json::from_str(&error_answer(&id, &r)).expect("json");
        assert_eq!(
            (v["kind"].as_str(), v["field"].as_str()),
            (Some("invalid_event"), Some("action"))
        );
    }
}
