//! The audit event: who did what, to which object, when, and with what outcome.
//!
//! This module owns the event's shape (the schema's field names, documented in
//! docs/modes.md and used alike by the Rust struct, the JSON lines `emit` reads
//! and `inspect` prints, and the `audit_events` columns of `columns`) and its validation: everything
//! PostgreSQL would refuse to store (a NUL byte in text, a timestamp outside
//! `timestamptz`, an oversized event) is refused here, with an error naming the
//! field, before the event is written anywhere. It knows nothing about the WAL or
//! the database; the byte layout inside a WAL record lives in `wal::payload`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

/// Default limit on an event's size: the sum of its text and JSON fields, in bytes.
/// Audit rows are small; a 64 KiB event is almost always a bug (a whole request
/// body pasted into `metadata`), and bounding it keeps WAL records and COPY batches
/// bounded too.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;

/// Longest accepted `action`, in bytes. Actions are dotted names such as
/// `admin.user.disabled`, used in indexes and in force-keep rules.
pub const MAX_ACTION_BYTES: usize = 256;

/// How the action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Failure,
    Denied,
}

impl Outcome {
    /// The text stored in the `outcome` column and printed in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
            Outcome::Denied => "denied",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Outcome {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, EventError> {
        match s {
            "success" => Ok(Outcome::Success),
            "failure" => Ok(Outcome::Failure),
            "denied" => Ok(Outcome::Denied),
            other => Err(EventError::InvalidOutcome {
                value: other.to_string(),
            }),
        }
    }
}

/// A JSON value kept as its validated text.
///
/// `before`, `after` and `metadata` are stored as `jsonb` and written to the WAL as
/// text; keeping them as text avoids parsing and re-serialising on the hot path.
/// The text is always a complete, valid JSON value.
#[derive(Clone, PartialEq, Eq)]
pub struct JsonText(String);

impl JsonText {
    /// Parses `text`, keeping it verbatim when it is one valid JSON value.
    pub fn parse(field: &'static str, text: &str) -> Result<Self, EventError> {
        let raw: Box<RawValue> =
            serde_json::from_str(text).map_err(|e| EventError::InvalidJson {
                field,
                reason: e.to_string(),
            })?;
        Ok(JsonText(raw.get().to_string()))
    }

    /// Serialises any value to JSON text.
    pub fn from_value<T: Serialize + ?Sized>(
        field: &'static str,
        value: &T,
    ) -> Result<Self, EventError> {
        serde_json::to_string(value)
            .map(JsonText)
            .map_err(|e| EventError::InvalidJson {
                field,
                reason: e.to_string(),
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// Wraps text already known to be valid JSON (it was validated before it was
    /// written to the WAL and is covered by the record's CRC).
    pub(crate) fn from_trusted(text: String) -> Self {
        JsonText(text)
    }

    /// True when some string or key in the value holds U+0000, which `jsonb`
    /// rejects. Cheap in the common case: only text containing a `\u0000` escape
    /// (the only way JSON can carry a NUL) is parsed.
    fn contains_nul(&self) -> bool {
        // One memchr pass for the backslash that every escape starts with; most
        // audit JSON has none, and this runs on every call.
        let bytes = self.0.as_bytes();
        let mut from = 0;
        let mut maybe = false;
        while let Some(i) = self.0[from..].find('\\') {
            let at = from + i;
            let esc = &bytes[at + 1..bytes.len().min(at + 6)];
            if esc.len() == 5 && (esc[0] == b'u' || esc[0] == b'U') && &esc[1..] == b"0000" {
                maybe = true;
                break;
            }
            from = at + 1;
        }
        if !maybe {
            return false;
        }
        match serde_json::from_str::<serde_json::Value>(&self.0) {
            Ok(v) => value_has_nul(&v),
            Err(_) => true,
        }
    }
}

fn value_has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(value_has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || value_has_nul(v)),
        _ => false,
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for JsonText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Emit the value itself, not a string holding it.
        match RawValue::from_string(self.0.clone()) {
            Ok(raw) => raw.serialize(s),
            Err(e) => Err(serde::ser::Error::custom(e)),
        }
    }
}

impl<'de> Deserialize<'de> for JsonText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(d)?;
        Ok(JsonText(raw.get().to_string()))
    }
}

/// One audit event, validated.
///
/// Field names are the schema's names everywhere. Construct with
/// [`AuditEvent::new`] and the builder methods, or parse a JSON line with
/// [`AuditEvent::from_json`]; either way call [`AuditEvent::validate`] (the audit
/// API and `emit` do) before writing it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEvent {
    pub event_id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<JsonText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<JsonText>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<JsonText>,
}

/// Why an event was refused. Each variant names the field at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    #[error("event is not valid JSON: {reason}")]
    Malformed { reason: String },
    #[error("field `{field}` is required")]
    MissingField { field: &'static str },
    #[error("field `{field}` contains a NUL byte, which PostgreSQL text cannot store")]
    NulByte { field: &'static str },
    #[error("field `{field}` is {len} bytes, over the limit of {limit}")]
    FieldTooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("field `ip`: {value:?} is not an IPv4 or IPv6 address")]
    InvalidIp { value: String },
    #[error("field `outcome`: {value:?} is not one of success, failure, denied")]
    InvalidOutcome { value: String },
    #[error("field `event_id`: {value:?} is not a UUID")]
    InvalidEventId { value: String },
    #[error("field `occurred_at`: {value:?} is not an RFC 3339 timestamp")]
    InvalidTimestamp { value: String },
    #[error("field `occurred_at`: {value} is outside PostgreSQL's timestamptz range")]
    TimestampOutOfRange { value: String },
    #[error("field `{field}` is not valid JSON: {reason}")]
    InvalidJson { field: &'static str, reason: String },
    #[error("event is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// A known field holds a JSON value of the wrong type (`{"action": 5}`).
    #[error("field `{field}` must be {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
}

impl EventError {
    /// The schema field at fault, when the error is about one field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            EventError::Malformed { .. } | EventError::TooLarge { .. } => None,
            EventError::MissingField { field }
            | EventError::NulByte { field }
            | EventError::FieldTooLong { field, .. }
            | EventError::InvalidJson { field, .. }
            | EventError::WrongType { field, .. } => Some(field),
            EventError::InvalidIp { .. } => Some("ip"),
            EventError::InvalidOutcome { .. } => Some("outcome"),
            EventError::InvalidEventId { .. } => Some("event_id"),
            EventError::InvalidTimestamp { .. } | EventError::TimestampOutOfRange { .. } => {
                Some("occurred_at")
            }
        }
    }
}

/// Why serde refused `line`, named by field where it can be: serde's own message
/// gives a line and column, not the field, and a caller in another language
/// needs the field. Called only on the error path.
fn diagnose(line: &str, serde_reason: String) -> EventError {
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(line) else {
        return EventError::Malformed {
            reason: serde_reason,
        };
    };
    // The fields of [`EventInput`] read as text (a JSON string or null); the
    // others (`before`, `after`, `metadata`) take any JSON value.
    let text_fields = crate::columns::EVENT_COLUMNS
        .iter()
        .filter(|c| c.pg_type != "jsonb")
        .map(|c| c.name);
    for field in text_fields {
        if map
            .get(field)
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            return EventError::WrongType {
                field,
                expected: "a string",
            };
        }
    }
    EventError::Malformed {
        reason: serde_reason,
    }
}

/// The loose shape of an incoming JSON line: every field that can be malformed is
/// taken as text first so that the error can name it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventInput {
    event_id: Option<String>,
    occurred_at: Option<String>,
    action: Option<String>,
    actor_id: Option<String>,
    actor_type: Option<String>,
    target_type: Option<String>,
    target_id: Option<String>,
    target_name: Option<String>,
    tenant_id: Option<String>,
    outcome: Option<String>,
    reason: Option<String>,
    ip: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    before: Option<JsonText>,
    after: Option<JsonText>,
    metadata: Option<JsonText>,
}

/// A fresh UUID v7 and the instant its timestamp names, from one clock read.
///
/// `Uuid::now_v7` and `Utc::now` each read the clock, and `now_v7` also
/// serializes every caller of the process through a shared counter that keeps
/// ids made in the same millisecond in order; together they were a fifth of
/// building an event (docs/benchmarks.md, `bench record`). Event ids need to
/// be unique, not ordered (the time is `occurred_at`): here all 74 bits after
/// the millisecond timestamp are random, from the thread's generator.
fn now_v7() -> (Uuid, DateTime<Utc>) {
    let now = Utc::now();
    // Before 1970 only with a broken clock; the id then carries time zero.
    let secs = u64::try_from(now.timestamp()).unwrap_or(0);
    let ts = uuid::Timestamp::from_unix(uuid::NoContext, secs, now.timestamp_subsec_nanos());
    (Uuid::new_v7(ts), now)
}

impl AuditEvent {
    /// A new event for `action`, with a fresh UUID v7 and `occurred_at` = now
    /// (the same instant: see [`now_v7`]).
    pub fn new(action: impl Into<String>) -> Self {
        let (event_id, occurred_at) = now_v7();
        AuditEvent {
            event_id,
            occurred_at,
            action: action.into(),
            actor_id: None,
            actor_type: None,
            target_type: None,
            target_id: None,
            target_name: None,
            tenant_id: None,
            outcome: None,
            reason: None,
            ip: None,
            user_agent: None,
            request_id: None,
            before: None,
            after: None,
            metadata: None,
        }
    }

    pub fn actor(mut self, actor_type: impl Into<String>, actor_id: impl Into<String>) -> Self {
        self.actor_type = Some(actor_type.into());
        self.actor_id = Some(actor_id.into());
        self
    }

    pub fn target(mut self, target_type: impl Into<String>, target_id: impl Into<String>) -> Self {
        self.target_type = Some(target_type.into());
        self.target_id = Some(target_id.into());
        self
    }

    pub fn target_name(mut self, name: impl Into<String>) -> Self {
        self.target_name = Some(name.into());
        self
    }

    pub fn tenant(mut self, tenant_id: impl Into<String>) -> Self {
        self.tenant_id = Some(tenant_id.into());
        self
    }

    pub fn outcome(mut self, outcome: Outcome) -> Self {
        self.outcome = Some(outcome);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    pub fn ip(mut self, ip: IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.user_agent = Some(user_agent.into());
        self
    }

    pub fn request_id(mut self, request_id: impl Into<String>) -> Self {
        self.request_id = Some(request_id.into());
        self
    }

    pub fn before<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, EventError> {
        self.before = Some(JsonText::from_value("before", value)?);
        Ok(self)
    }

    pub fn after<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, EventError> {
        self.after = Some(JsonText::from_value("after", value)?);
        Ok(self)
    }

    pub fn metadata<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, EventError> {
        self.metadata = Some(JsonText::from_value("metadata", value)?);
        Ok(self)
    }

    /// Parses one JSON line (the format `emit` reads), fills in `event_id` and
    /// `occurred_at` when absent, and validates the result against
    /// `max_event_bytes`.
    pub fn from_json(line: &str, max_event_bytes: usize) -> Result<Self, EventError> {
        let input: EventInput =
            serde_json::from_str(line).map_err(|e| diagnose(line, e.to_string()))?;
        let (fresh_id, now) = now_v7();
        let event_id = match input.event_id {
            Some(s) => Uuid::parse_str(&s).map_err(|_| EventError::InvalidEventId { value: s })?,
            None => fresh_id,
        };
        let occurred_at = match input.occurred_at {
            Some(s) => DateTime::parse_from_rfc3339(&s)
                .map_err(|_| EventError::InvalidTimestamp { value: s })?
                .with_timezone(&Utc),
            None => now,
        };
        let outcome = input.outcome.map(|s| s.parse()).transpose()?;
        let ip = match input.ip {
            Some(s) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| EventError::InvalidIp { value: s })?,
            ),
            None => None,
        };
        let event = AuditEvent {
            event_id,
            occurred_at,
            action: input
                .action
                .ok_or(EventError::MissingField { field: "action" })?,
            actor_id: input.actor_id,
            actor_type: input.actor_type,
            target_type: input.target_type,
            target_id: input.target_id,
            target_name: input.target_name,
            tenant_id: input.tenant_id,
            outcome,
            reason: input.reason,
            ip,
            user_agent: input.user_agent,
            request_id: input.request_id,
            before: input.before,
            after: input.after,
            metadata: input.metadata,
        };
        event.validate(max_event_bytes)?;
        Ok(event)
    }

    /// The event as one JSON line, fields by their schema names.
    pub fn to_json(&self) -> String {
        // Serialising plain strings, numbers and already-valid JSON text cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The text fields, by schema name, in schema order.
    pub fn text_fields(&self) -> [(&'static str, Option<&str>); 11] {
        [
            ("action", Some(self.action.as_str())),
            ("actor_id", self.actor_id.as_deref()),
            ("actor_type", self.actor_type.as_deref()),
            ("target_type", self.target_type.as_deref()),
            ("target_id", self.target_id.as_deref()),
            ("target_name", self.target_name.as_deref()),
            ("tenant_id", self.tenant_id.as_deref()),
            ("reason", self.reason.as_deref()),
            ("user_agent", self.user_agent.as_deref()),
            ("request_id", self.request_id.as_deref()),
            ("outcome", self.outcome.map(Outcome::as_str)),
        ]
    }

    /// The JSON fields, by schema name.
    pub fn json_fields(&self) -> [(&'static str, Option<&JsonText>); 3] {
        [
            ("before", self.before.as_ref()),
            ("after", self.after.as_ref()),
            ("metadata", self.metadata.as_ref()),
        ]
    }

    /// The size counted against the event size limit: all text and JSON bytes.
    pub fn content_len(&self) -> usize {
        let text: usize = self
            .text_fields()
            .iter()
            .map(|(_, v)| v.map_or(0, str::len))
            .sum();
        let json: usize = self
            .json_fields()
            .iter()
            .map(|(_, v)| v.map_or(0, |j| j.as_str().len()))
            .sum();
        text + json
    }

    /// Checks everything PostgreSQL would refuse, naming the field at fault.
    /// Runs on every audit call, in every mode, so it walks each field once:
    /// the NUL check and the size count in the same pass.
    pub fn validate(&self, max_event_bytes: usize) -> Result<(), EventError> {
        if self.action.is_empty() {
            return Err(EventError::MissingField { field: "action" });
        }
        if self.action.len() > MAX_ACTION_BYTES {
            return Err(EventError::FieldTooLong {
                field: "action",
                len: self.action.len(),
                limit: MAX_ACTION_BYTES,
            });
        }
        let mut size = 0;
        for (field, value) in self.text_fields() {
            if let Some(v) = value {
                size += v.len();
                if has_nul(v.as_bytes()) {
                    return Err(EventError::NulByte { field });
                }
            }
        }
        for (field, value) in self.json_fields() {
            if let Some(j) = value {
                size += j.as_str().len();
                if j.contains_nul() {
                    return Err(EventError::NulByte { field });
                }
            }
        }
        if !timestamp_in_range(&self.occurred_at) {
            return Err(EventError::TimestampOutOfRange {
                value: self.occurred_at.to_rfc3339(),
            });
        }
        if size > max_event_bytes {
            return Err(EventError::TooLarge {
                size,
                limit: max_event_bytes,
            });
        }
        Ok(())
    }
}

/// True when `bytes` holds a NUL. Audit fields are short and a NUL is rare, so
/// this looks at every byte without branching rather than stopping at the
/// first (a memchr's set-up costs more than the scan here), eight bytes at a
/// time: `(w - 0x01…01) & !w & 0x80…80` is nonzero exactly when some byte of
/// `w` is zero (the borrow can only start at a zero byte). A byte-wise fold
/// was not vectorized for these lengths: ~3 instructions a byte in callgrind.
fn has_nul(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    let mut chunks = bytes.chunks_exact(8);
    let mut found = 0u64;
    for chunk in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let w = u64::from_ne_bytes(w);
        found |= w.wrapping_sub(ONES) & !w & HIGHS;
    }
    found != 0 || chunks.remainder().contains(&0)
}

/// True when PostgreSQL's timestamptz can hold `t`: from 4713 BC (year -4712)
/// on. Its upper end, 294276 AD, lies beyond chrono's own (year 262142), so
/// only the lower bound can fail. Compared as an instant: working out the year
/// of every event costs a calendar computation per call.
fn timestamp_in_range(t: &DateTime<Utc>) -> bool {
    static FIRST: std::sync::OnceLock<Option<DateTime<Utc>>> = std::sync::OnceLock::new();
    let first = FIRST.get_or_init(|| {
        chrono::NaiveDate::from_ymd_opt(-4712, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|d| d.and_utc())
    });
    match first {
        Some(first) => t >= first,
        None => (-4712..=294_275).contains(&t.year()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_round_trips_every_field() {
        let line = r#"{"event_id":"01935f3e-8c2a-7b3c-9d4e-0123456789ab","occurred_at":"2026-11-23T10:00:00.123456Z","action":"url.created","actor_id":"42","actor_type":"user","target_type":"url","target_id":"abc","target_name":"my link","tenant_id":"t1","outcome":"success","reason":"ok","ip":"2001:db8::1","user_agent":"curl","request_id":"r-1","before":null,"after":{"x":[1,2]},"metadata":{"k":"v"}}"#;
        let e = AuditEvent::from_json(line, DEFAULT_MAX_EVENT_BYTES).expect("valid");
        assert_eq!(e.action, "url.created");
        assert_eq!(e.ip, Some("2001:db8::1".parse().expect("ip")));
        assert_eq!(e.before, None);
        assert_eq!(
            e.after.as_ref().map(JsonText::as_str),
            Some(r#"{"x":[1,2]}"#)
        );
        let again = AuditEvent::from_json(&e.to_json(), DEFAULT_MAX_EVENT_BYTES).expect("again");
        assert_eq!(e, again);
    }

    #[test]
    fn missing_id_and_time_are_generated() {
        let e = AuditEvent::from_json(r#"{"action":"a"}"#, DEFAULT_MAX_EVENT_BYTES).expect("ok");
        assert_eq!(e.event_id.get_version_num(), 7);
    }

    #[test]
    fn bad_input_names_the_field() {
        let cases = [
            (
                r#"{"actor_id":"x"}"#,
                EventError::MissingField { field: "action" },
            ),
            (
                r#"{"action":"a","ip":"not-an-ip"}"#,
                EventError::InvalidIp {
                    value: "not-an-ip".into(),
                },
            ),
            (
                r#"{"action":"a","outcome":"maybe"}"#,
                EventError::InvalidOutcome {
                    value: "maybe".into(),
                },
            ),
            (
                r#"{"action":"a","reason":"x\u0000y"}"#,
                EventError::NulByte { field: "reason" },
            ),
            (
                r#"{"action":"a","metadata":{"k":"\u0000"}}"#,
                EventError::NulByte { field: "metadata" },
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                AuditEvent::from_json(line, DEFAULT_MAX_EVENT_BYTES),
                Err(want),
                "{line}"
            );
        }
    }

    #[test]
    fn has_nul_finds_a_nul_at_every_position_and_no_other_byte() {
        // Bytes next to zero in value (0x01, 0x80, 0xff) around every position
        // and length, across the eight-byte chunks and the remainder.
        for len in 0..40 {
            for filler in [0x01u8, 0x7f, 0x80, 0x81, 0xff, b'a'] {
                let clean = vec![filler; len];
                assert!(!has_nul(&clean), "len {len} filler {filler:#x}");
                for at in 0..len {
                    let mut with = clean.clone();
                    with[at] = 0;
                    assert!(has_nul(&with), "len {len} filler {filler:#x} at {at}");
                }
            }
        }
    }

    #[test]
    fn escaped_backslash_before_u0000_is_not_a_nul() {
        let e = AuditEvent::from_json(
            r#"{"action":"a","metadata":{"k":"\\u0000"}}"#,
            DEFAULT_MAX_EVENT_BYTES,
        );
        assert!(e.is_ok(), "{e:?}");
    }

    #[test]
    fn timestamps_are_refused_exactly_before_4713_bc() {
        use chrono::TimeZone;
        let at = |y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32| {
            Utc.with_ymd_and_hms(y, mo, d, h, mi, s)
                .single()
                .expect("valid date")
        };
        let mut e = AuditEvent::new("a");
        e.occurred_at = at(-4712, 1, 1, 0, 0, 0);
        assert_eq!(e.validate(1000), Ok(()));
        e.occurred_at = at(-4713, 12, 31, 23, 59, 59);
        assert!(matches!(
            e.validate(1000),
            Err(EventError::TimestampOutOfRange { .. })
        ));
        e.occurred_at = DateTime::<Utc>::MAX_UTC;
        assert_eq!(
            e.validate(1000),
            Ok(()),
            "chrono's last instant fits PostgreSQL"
        );
    }

    #[test]
    fn a_nul_escape_is_found_after_other_escapes() {
        let j = JsonText::parse("metadata", r#"{"a":"x\"y","b":"\n","c":"\u0000"}"#)
            .expect("valid JSON");
        assert!(j.contains_nul());
        let j = JsonText::parse("metadata", r#"{"a":"x\"y","b":"\\u0000"}"#).expect("valid");
        assert!(!j.contains_nul(), "an escaped backslash then u0000 is text");
        let j = JsonText::parse("metadata", r#"{"end":"\\"}"#).expect("valid");
        assert!(!j.contains_nul());
    }

    #[test]
    fn oversized_event_is_refused() {
        let e = AuditEvent::new("a").reason("x".repeat(100));
        assert_eq!(
            e.validate(50),
            Err(EventError::TooLarge {
                size: 101,
                limit: 50
            })
        );
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let err = AuditEvent::from_json(r#"{"action":"a","actor_id":42}"#, 1000);
        assert_eq!(
            err,
            Err(EventError::WrongType {
                field: "actor_id",
                expected: "a string"
            })
        );
        assert_eq!(err.err().and_then(|e| e.field()), Some("actor_id"));
        let not_an_object = AuditEvent::from_json("[1]", 1000);
        assert!(matches!(not_an_object, Err(EventError::Malformed { .. })));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = AuditEvent::from_json(r#"{"action":"a","actr_id":"x"}"#, 1000);
        assert!(matches!(err, Err(EventError::Malformed { reason }) if reason.contains("actr_id")));
    }
}
