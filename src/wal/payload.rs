//! The payload of an event record: an [`AuditEvent`] and its sample rate as bytes.
//!
//! This module owns the event payload layout of docs/segment-format.md: bincode 2
//! with `bincode::config::standard()` (varint integers, little-endian), fields in
//! the order of `columns::EVENT_COLUMNS` (the table's), then the sample rate. [`encode_event`] is on the append hot path,
//! so it encodes borrowed fields straight into the caller's buffer: no JSON work, no
//! allocation beyond growing that buffer. [`decode_event`] runs on bytes a CRC has
//! vouched for, but still treats them as untrusted: it decodes under a byte limit
//! of [`MAX_PAYLOAD_LEN`] (a hostile length cannot drive an allocation), rejects
//! trailing bytes, unknown outcome bytes, out-of-range timestamps, bad sample
//! rates and invalid UTF-8, and cheaply checks that JSON fields look like JSON
//! values. Framing, checksums and files are `wal::format`'s and the writer's and
//! reader's business.

use std::net::IpAddr;

use chrono::DateTime;
use uuid::Uuid;

use crate::columns::{self, ColumnVisitor, Value};
use crate::event::{AuditEvent, JsonText, Outcome};
use crate::wal::format::MAX_PAYLOAD_LEN;

/// An event as read back from the WAL.
#[derive(Debug, Clone, PartialEq)]
pub struct WalEvent {
    pub event: AuditEvent,
    /// The sampling rate the event was kept at; 1.0 when it was not sampled.
    pub sample_rate: f64,
}

/// Why a payload could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PayloadError {
    #[error("event payload is {len} bytes, over the record limit of {MAX_PAYLOAD_LEN}")]
    TooLarge { len: usize },
    #[error("occurred_at ({micros} µs since the epoch) is outside PostgreSQL's timestamptz range")]
    TimestampOutOfRange { micros: i64 },
    #[error("sample_rate {value} is not in (0, 1]")]
    InvalidSampleRate { value: f64 },
    #[error("event payload is malformed: {reason}")]
    Malformed { reason: String },
    #[error("event payload has {trailing} trailing bytes after the event")]
    TrailingBytes { trailing: usize },
    #[error("outcome byte {value} is not 0 (success), 1 (failure) or 2 (denied)")]
    InvalidOutcome { value: u8 },
    #[error("field `{field}` does not hold a JSON value")]
    InvalidJson { field: &'static str },
}

/// The earliest `occurred_at` PostgreSQL's `timestamptz` accepts (4713 BC, i.e.
/// year -4712, January 1st, 00:00 UTC), in microseconds since the Unix epoch. The
/// latest chrono can represent is earlier than PostgreSQL's latest, so only the
/// lower bound needs a check.
pub const MIN_OCCURRED_AT_MICROS: i64 = -210_863_520_000_000_000;

/// The bincode configuration of the payload; the limit bounds every allocation a
/// decode can make by the largest payload a frame may carry.
fn config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_PAYLOAD_LEN>,
> {
    bincode::config::standard().with_limit::<MAX_PAYLOAD_LEN>()
}

/// The payload's fields as bincode derives them; [`encode_event`] writes the same
/// bytes by hand (it is on the append hot path), and a property test holds the
/// two to the same output.
#[cfg(test)]
#[derive(bincode::Encode)]
struct WireRef<'a> {
    event_id: [u8; 16],
    occurred_at: i64,
    action: &'a str,
    actor_id: Option<&'a str>,
    actor_type: Option<&'a str>,
    target_type: Option<&'a str>,
    target_id: Option<&'a str>,
    target_name: Option<&'a str>,
    tenant_id: Option<&'a str>,
    outcome: Option<u8>,
    reason: Option<&'a str>,
    ip: Option<IpAddr>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    before: Option<&'a str>,
    after: Option<&'a str>,
    metadata: Option<&'a str>,
    sample_rate: f64,
}

/// The payload's fields, owned, for decoding, in format order: do not reorder.
#[derive(bincode::Decode)]
struct Wire {
    event_id: [u8; 16],
    occurred_at: i64,
    action: String,
    actor_id: Option<String>,
    actor_type: Option<String>,
    target_type: Option<String>,
    target_id: Option<String>,
    target_name: Option<String>,
    tenant_id: Option<String>,
    outcome: Option<u8>,
    reason: Option<String>,
    ip: Option<IpAddr>,
    user_agent: Option<String>,
    request_id: Option<String>,
    before: Option<String>,
    after: Option<String>,
    metadata: Option<String>,
    sample_rate: f64,
}

/// Appends bincode output to a Vec (tests compare it with the hand encoder).
#[cfg(test)]
struct VecWriter<'a>(&'a mut Vec<u8>);

#[cfg(test)]
impl bincode::enc::write::Writer for VecWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// bincode 2's varint (standard config): values below 251 in one byte, then a
/// marker byte 251/252/253 followed by a u16/u32/u64, little-endian.
#[inline]
fn put_varint(dst: &mut Vec<u8>, v: u64) {
    if v < 251 {
        dst.push(v as u8);
    } else if v <= u64::from(u16::MAX) {
        dst.push(251);
        dst.extend_from_slice(&(v as u16).to_le_bytes());
    } else if v <= u64::from(u32::MAX) {
        dst.push(252);
        dst.extend_from_slice(&(v as u32).to_le_bytes());
    } else {
        dst.push(253);
        dst.extend_from_slice(&v.to_le_bytes());
    }
}

/// bincode 2's zigzag mapping of signed integers before the varint.
#[inline]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// A string: varint byte length, then the UTF-8 bytes.
#[inline]
fn put_str(dst: &mut Vec<u8>, s: &str) {
    put_varint(dst, s.len() as u64);
    dst.extend_from_slice(s.as_bytes());
}

/// An option: tag byte 0 (None) or 1 followed by the value.
#[inline]
fn put_opt_str(dst: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => dst.push(0),
        Some(s) => {
            dst.push(1);
            put_str(dst, s);
        }
    }
}

fn outcome_byte(outcome: Outcome) -> u8 {
    match outcome {
        Outcome::Success => 0,
        Outcome::Failure => 1,
        Outcome::Denied => 2,
    }
}

/// Encodes the event's fields ([`columns::visit_event`], the columns' order is
/// the payload's) as bincode 2 would: a NOT NULL column without an option tag.
struct PayloadFields<'a>(&'a mut Vec<u8>);

impl ColumnVisitor<'_> for PayloadFields<'_> {
    #[inline(always)]
    fn value(&mut self, value: Value<'_>) {
        let dst = &mut *self.0;
        match value {
            Value::Uuid(id) => dst.extend_from_slice(id.as_bytes()),
            // Range-checked by encode_event before any field is written.
            Value::Timestamptz(t) => put_varint(dst, zigzag(t.timestamp_micros())),
            Value::Text(s) => put_str(dst, s),
            Value::OptText(s) => put_opt_str(dst, s),
            Value::Outcome(None) => dst.push(0),
            Value::Outcome(Some(o)) => dst.extend_from_slice(&[1, outcome_byte(o)]),
            Value::Inet(None) => dst.push(0),
            // Option tag, then bincode's IpAddr: variant index as a varint, octets.
            Value::Inet(Some(IpAddr::V4(v4))) => {
                dst.extend_from_slice(&[1, 0]);
                dst.extend_from_slice(&v4.octets());
            }
            Value::Inet(Some(IpAddr::V6(v6))) => {
                dst.extend_from_slice(&[1, 1]);
                dst.extend_from_slice(&v6.octets());
            }
            Value::Jsonb(j) => put_opt_str(dst, j.map(JsonText::as_str)),
        }
    }
}

fn check_sample_rate(value: f64) -> Result<(), PayloadError> {
    // `!(x > 0.0)` also catches NaN.
    if !(value > 0.0 && value <= 1.0) {
        return Err(PayloadError::InvalidSampleRate { value });
    }
    Ok(())
}

/// Appends the payload for `event` kept at `sample_rate` to `dst`. On error `dst`
/// is left as it was. The event is expected to be validated already
/// ([`AuditEvent::validate`]); this checks only what would make the record
/// undecodable.
pub fn encode_event(
    event: &AuditEvent,
    sample_rate: f64,
    dst: &mut Vec<u8>,
) -> Result<(), PayloadError> {
    check_sample_rate(sample_rate)?;
    let micros = event.occurred_at.timestamp_micros();
    if micros < MIN_OCCURRED_AT_MICROS {
        return Err(PayloadError::TimestampOutOfRange { micros });
    }
    let start = dst.len();
    // One reservation up front: the content plus a generous allowance for the
    // fixed fields, option tags and varint lengths (at most ~140 bytes).
    dst.reserve(event.content_len() + 160);
    columns::visit_event(event, &mut PayloadFields(dst));
    dst.extend_from_slice(&sample_rate.to_le_bytes());
    let len = dst.len() - start;
    if len > MAX_PAYLOAD_LEN {
        dst.truncate(start);
        return Err(PayloadError::TooLarge { len });
    }
    Ok(())
}

/// A cheap plausibility check of JSON text written by [`encode_event`]: the
/// encoder only ever writes a validated [`JsonText`] (verbatim, no surrounding
/// whitespace) and the record's CRC covers it, so a full parse is not repeated
/// here; this catches a payload built by something else.
fn json_text(field: &'static str, text: Option<String>) -> Result<Option<JsonText>, PayloadError> {
    let Some(text) = text else { return Ok(None) };
    let bytes = text.as_bytes();
    let plausible = match (bytes.first(), bytes.last()) {
        (Some(first), Some(last)) => {
            matches!(
                first,
                b'{' | b'[' | b'"' | b'-' | b'0'..=b'9' | b't' | b'f' | b'n'
            ) && matches!(last, b'}' | b']' | b'"' | b'0'..=b'9' | b'e' | b'l')
        }
        _ => false,
    };
    if !plausible {
        return Err(PayloadError::InvalidJson { field });
    }
    Ok(Some(JsonText::from_trusted(text)))
}

/// Decodes a payload written by [`encode_event`].
pub fn decode_event(payload: &[u8]) -> Result<WalEvent, PayloadError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(PayloadError::TooLarge { len: payload.len() });
    }
    let (wire, consumed): (Wire, usize) =
        bincode::decode_from_slice(payload, config()).map_err(|e| PayloadError::Malformed {
            reason: e.to_string(),
        })?;
    if consumed != payload.len() {
        return Err(PayloadError::TrailingBytes {
            trailing: payload.len() - consumed,
        });
    }
    check_sample_rate(wire.sample_rate)?;
    if wire.occurred_at < MIN_OCCURRED_AT_MICROS {
        return Err(PayloadError::TimestampOutOfRange {
            micros: wire.occurred_at,
        });
    }
    let occurred_at = DateTime::from_timestamp_micros(wire.occurred_at).ok_or(
        PayloadError::TimestampOutOfRange {
            micros: wire.occurred_at,
        },
    )?;
    let outcome = match wire.outcome {
        None => None,
        Some(0) => Some(Outcome::Success),
        Some(1) => Some(Outcome::Failure),
        Some(2) => Some(Outcome::Denied),
        Some(value) => return Err(PayloadError::InvalidOutcome { value }),
    };
    let event = AuditEvent {
        event_id: Uuid::from_bytes(wire.event_id),
        occurred_at,
        action: wire.action,
        actor_id: wire.actor_id,
        actor_type: wire.actor_type,
        target_type: wire.target_type,
        target_id: wire.target_id,
        target_name: wire.target_name,
        tenant_id: wire.tenant_id,
        outcome,
        reason: wire.reason,
        ip: wire.ip,
        user_agent: wire.user_agent,
        request_id: wire.request_id,
        before: json_text("before", wire.before)?,
        after: json_text("after", wire.after)?,
        metadata: json_text("metadata", wire.metadata)?,
    };
    Ok(WalEvent {
        event,
        sample_rate: wire.sample_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;

    fn full_event() -> AuditEvent {
        AuditEvent {
            event_id: Uuid::from_u128(0x0193_5f3e_8c2a_7b3c_9d4e_0123_4567_89ab),
            occurred_at: Utc
                .timestamp_micros(1_795_000_000_123_456)
                .single()
                .expect("time"),
            action: "admin.user.disabled".into(),
            actor_id: Some("42".into()),
            actor_type: Some("user".into()),
            target_type: Some("account".into()),
            target_id: Some("a-7".into()),
            target_name: Some("Ünïcode name".into()),
            tenant_id: Some("t1".into()),
            outcome: Some(Outcome::Denied),
            reason: Some("policy".into()),
            ip: Some("2001:db8::1".parse().expect("ip")),
            user_agent: Some("curl/8".into()),
            request_id: Some("r-1".into()),
            before: Some(JsonText::parse("before", r#"{"enabled":true}"#).expect("json")),
            after: Some(JsonText::parse("after", r#"{"enabled":false}"#).expect("json")),
            metadata: Some(JsonText::parse("metadata", "[1,2,null]").expect("json")),
        }
    }

    fn encode(event: &AuditEvent, rate: f64) -> Vec<u8> {
        let mut v = Vec::new();
        encode_event(event, rate, &mut v).expect("encode");
        v
    }

    #[test]
    fn every_field_round_trips() {
        let e = full_event();
        let bytes = encode(&e, 0.25);
        let back = decode_event(&bytes).expect("decode");
        assert_eq!(back.event, e);
        assert_eq!(back.sample_rate, 0.25);
        // occurred_at is kept to the microsecond, as PostgreSQL keeps it.
        let minimal = AuditEvent {
            ip: Some("10.1.2.3".parse().expect("ip")),
            occurred_at: Utc.timestamp_micros(1).single().expect("time"),
            ..AuditEvent::new("a")
        };
        let back = decode_event(&encode(&minimal, 1.0)).expect("decode");
        assert_eq!(back.event, minimal);
    }

    #[test]
    fn layout_is_bincode_standard_in_schema_order() {
        let e = AuditEvent {
            event_id: Uuid::from_bytes([9; 16]),
            occurred_at: Utc.timestamp_micros(-1).single().expect("time"),
            ..AuditEvent::new("ab")
        };
        let bytes = encode(&e, 1.0);
        let mut want = vec![9u8; 16];
        want.push(1); // zigzag varint of -1
        want.extend_from_slice(&[2, b'a', b'b']);
        want.extend_from_slice(&[0; 14]); // 14 absent options (actor_id ..= metadata)
        want.extend_from_slice(&1.0f64.to_le_bytes());
        assert_eq!(bytes, want);
    }

    #[test]
    fn encode_appends_and_leaves_earlier_bytes_alone() {
        let mut v = b"prefix".to_vec();
        encode_event(&full_event(), 1.0, &mut v).expect("encode");
        assert_eq!(&v[..6], b"prefix");
        assert_eq!(decode_event(&v[6..]).expect("decode").event, full_event());
    }

    #[test]
    fn encode_refuses_what_decode_would_refuse() {
        let mut v = vec![1, 2, 3];
        for rate in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                encode_event(&full_event(), rate, &mut v),
                Err(PayloadError::InvalidSampleRate { .. })
            ));
        }
        let ancient = AuditEvent {
            occurred_at: Utc
                .timestamp_micros(MIN_OCCURRED_AT_MICROS - 1)
                .single()
                .expect("time"),
            ..full_event()
        };
        assert!(matches!(
            encode_event(&ancient, 1.0, &mut v),
            Err(PayloadError::TimestampOutOfRange { .. })
        ));
        let huge = AuditEvent {
            reason: Some("x".repeat(MAX_PAYLOAD_LEN)),
            ..full_event()
        };
        assert!(matches!(
            encode_event(&huge, 1.0, &mut v),
            Err(PayloadError::TooLarge { .. })
        ));
        assert_eq!(v, vec![1, 2, 3], "failed encodes leave dst as it was");
    }

    #[test]
    fn min_timestamp_is_postgres_lower_bound() {
        let t = Utc
            .timestamp_micros(MIN_OCCURRED_AT_MICROS)
            .single()
            .expect("time");
        assert_eq!(t.to_rfc3339(), "-4712-01-01T00:00:00+00:00");
    }

    /// The payload as bincode's derive encodes it.
    fn bincode_derived(e: &AuditEvent, sample_rate: f64) -> Vec<u8> {
        let wire = WireRef {
            event_id: *e.event_id.as_bytes(),
            occurred_at: e.occurred_at.timestamp_micros(),
            action: &e.action,
            actor_id: e.actor_id.as_deref(),
            actor_type: e.actor_type.as_deref(),
            target_type: e.target_type.as_deref(),
            target_id: e.target_id.as_deref(),
            target_name: e.target_name.as_deref(),
            tenant_id: e.tenant_id.as_deref(),
            outcome: e.outcome.map(outcome_byte),
            reason: e.reason.as_deref(),
            ip: e.ip,
            user_agent: e.user_agent.as_deref(),
            request_id: e.request_id.as_deref(),
            before: e.before.as_ref().map(JsonText::as_str),
            after: e.after.as_ref().map(JsonText::as_str),
            metadata: e.metadata.as_ref().map(JsonText::as_str),
            sample_rate,
        };
        let mut v = Vec::new();
        bincode::encode_into_writer(&wire, VecWriter(&mut v), config()).expect("encode");
        v
    }

    #[test]
    fn hand_encoder_matches_bincode_for_long_strings_and_extreme_times() {
        for len in [0, 250, 251, 65_535, 65_536, 70_000] {
            for micros in [
                MIN_OCCURRED_AT_MICROS,
                -1,
                0,
                1,
                125,
                126,
                1 << 40,
                i64::from(i32::MAX),
                8_000_000_000_000_000_000,
            ] {
                let e = AuditEvent {
                    occurred_at: Utc.timestamp_micros(micros).single().expect("time"),
                    reason: Some("r".repeat(len)),
                    ..full_event()
                };
                assert_eq!(
                    encode(&e, 0.5),
                    bincode_derived(&e, 0.5),
                    "len {len} micros {micros}"
                );
            }
        }
    }

    /// Rewrites the payload of `e` with one field changed in the wire struct.
    fn encode_wire(e: &AuditEvent, tweak: impl FnOnce(&mut WireRef<'_>)) -> Vec<u8> {
        let mut wire = WireRef {
            event_id: *e.event_id.as_bytes(),
            occurred_at: e.occurred_at.timestamp_micros(),
            action: &e.action,
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
            sample_rate: 1.0,
        };
        tweak(&mut wire);
        let mut v = Vec::new();
        bincode::encode_into_writer(&wire, VecWriter(&mut v), config()).expect("encode");
        v
    }

    #[test]
    fn decode_rejects_invalid_field_values() {
        let e = AuditEvent::new("a");
        let bad_outcome = encode_wire(&e, |w| w.outcome = Some(3));
        assert_eq!(
            decode_event(&bad_outcome),
            Err(PayloadError::InvalidOutcome { value: 3 })
        );
        let early = encode_wire(&e, |w| w.occurred_at = i64::MIN);
        assert!(matches!(
            decode_event(&early),
            Err(PayloadError::TimestampOutOfRange { .. })
        ));
        let late = encode_wire(&e, |w| w.occurred_at = i64::MAX);
        assert!(matches!(
            decode_event(&late),
            Err(PayloadError::TimestampOutOfRange { .. })
        ));
        let rate = encode_wire(&e, |w| w.sample_rate = 2.0);
        assert!(matches!(
            decode_event(&rate),
            Err(PayloadError::InvalidSampleRate { .. })
        ));
        let json = encode_wire(&e, |w| w.metadata = Some("not json"));
        assert_eq!(
            decode_event(&json),
            Err(PayloadError::InvalidJson { field: "metadata" })
        );
        let empty_json = encode_wire(&e, |w| w.before = Some(""));
        assert_eq!(
            decode_event(&empty_json),
            Err(PayloadError::InvalidJson { field: "before" })
        );
    }

    #[test]
    fn decode_rejects_trailing_bytes_truncation_and_bad_utf8() {
        let mut bytes = encode(&full_event(), 1.0);
        bytes.push(0);
        assert_eq!(
            decode_event(&bytes),
            Err(PayloadError::TrailingBytes { trailing: 1 })
        );
        bytes.pop();
        for cut in 0..bytes.len() {
            assert!(
                matches!(
                    decode_event(&bytes[..cut]),
                    Err(PayloadError::Malformed { .. })
                ),
                "cut at {cut}"
            );
        }
        let e = AuditEvent {
            occurred_at: Utc.timestamp_micros(0).single().expect("time"),
            ..AuditEvent::new("ab")
        };
        let mut b = encode(&e, 1.0);
        assert_eq!(&b[16..20], &[0, 2, b'a', b'b']);
        b[18] = 0xff; // first byte of the action text
        assert!(matches!(
            decode_event(&b),
            Err(PayloadError::Malformed { .. })
        ));
    }

    #[test]
    fn a_hostile_string_length_does_not_allocate_it() {
        // event_id, time 0, then an action claiming u64::MAX bytes.
        let mut b = vec![0u8; 16];
        b.push(0);
        b.push(255);
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode_event(&b),
            Err(PayloadError::Malformed { .. })
        ));
    }

    fn opt_text() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(any::<String>())
    }

    fn opt_json() -> impl Strategy<Value = Option<JsonText>> {
        proptest::option::of(
            prop_oneof![
                Just(serde_json::json!(null)),
                any::<i64>().prop_map(|n| serde_json::json!(n)),
                any::<String>().prop_map(|s| serde_json::json!({ "k": s, "n": [1, 2.5, true] })),
            ]
            .prop_map(|v| JsonText::from_value("json", &v).expect("json")),
        )
    }

    prop_compose! {
        fn arb_event()(
            id in any::<u128>(),
            micros in MIN_OCCURRED_AT_MICROS..=8_000_000_000_000_000_000i64,
            action in any::<String>(),
            t in (opt_text(), opt_text(), opt_text(), opt_text(), opt_text(), opt_text()),
            outcome in proptest::option::of(prop_oneof![Just(Outcome::Success), Just(Outcome::Failure), Just(Outcome::Denied)]),
            reason in opt_text(),
            ip in proptest::option::of(any::<IpAddr>()),
            u in (opt_text(), opt_text()),
            j in (opt_json(), opt_json(), opt_json()),
        ) -> AuditEvent {
            AuditEvent {
                event_id: Uuid::from_u128(id),
                occurred_at: Utc.timestamp_micros(micros).single().expect("in chrono range"),
                action,
                actor_id: t.0, actor_type: t.1, target_type: t.2, target_id: t.3,
                target_name: t.4, tenant_id: t.5,
                outcome, reason, ip,
                user_agent: u.0, request_id: u.1,
                before: j.0, after: j.1, metadata: j.2,
            }
        }
    }

    /// Rough cost of `encode_event` on a ~300-byte event into a reused buffer.
    /// `cargo test --release --lib encode_event_speed -- --ignored --nocapture`
    #[test]
    #[ignore = "timing; run in release"]
    fn encode_event_speed() {
        let e = full_event().reason("r".repeat(120));
        let mut buf = Vec::with_capacity(1024);
        encode_event(&e, 1.0, &mut buf).expect("encode");
        println!("payload {} bytes", buf.len());
        let n = 1_000_000u32;
        let t = std::time::Instant::now();
        for _ in 0..n {
            buf.clear();
            encode_event(std::hint::black_box(&e), 1.0, &mut buf).expect("encode");
            std::hint::black_box(&buf);
        }
        let enc = t.elapsed() / n;
        let t = std::time::Instant::now();
        for _ in 0..n / 10 {
            std::hint::black_box(decode_event(std::hint::black_box(&buf)).expect("decode"));
        }
        let dec = t.elapsed() / (n / 10);
        println!("encode_event {enc:?}/event, decode_event {dec:?}/event");
    }

    proptest! {
        #[test]
        fn arbitrary_events_round_trip(e in arb_event(), rate in prop_oneof![Just(1.0f64), 1e-9f64..=1.0]) {
            let bytes = encode(&e, rate);
            prop_assert_eq!(&bytes, &bincode_derived(&e, rate), "hand encoder == bincode derive");
            let back = decode_event(&bytes).expect("decode");
            prop_assert_eq!(back.sample_rate, rate);
            prop_assert_eq!(back.event, e);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_event(&bytes);
        }
    }
}
