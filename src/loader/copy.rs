//! PostgreSQL's binary COPY format for `audit_events` rows.
//!
//! The loader decodes WAL records and encodes them straight into the body of a
//! `COPY audit_events (...) FROM STDIN (FORMAT binary)`, skipping text formatting and
//! server-side parsing. Binary COPY is type-exact: every field is written in the
//! exact binary representation of its column's type (uuid, timestamptz, text, inet,
//! jsonb, bigint, double precision), so the column list (`crate::columns`, checked
//! against the migrated table by tests/pg_schema.rs) and the encoders must agree
//! with migrations/. This module knows bytes only: no connections, no retries.
//!
//! Layout (PostgreSQL docs, "COPY", binary format): an 11-byte signature, a 32-bit
//! flags field and a 32-bit header-extension length; then per row a 16-bit field
//! count and, per field, a 32-bit length (-1 for NULL) and the value; then a 16-bit -1
//! trailer. All integers big-endian.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::chain::Link;
use crate::columns::{self, ColumnVisitor, Value, LOADED_COLUMNS};
use crate::event::AuditEvent;

/// The columns every COPY names, in the order rows are encoded (the list is
/// `columns::LOADED_COLUMNS`). `id` (nextval) and `recorded_at` (now()) are left
/// to their defaults, which keep COPY's fast path.
pub const COPY_COLUMNS: [&str; LOADED_COLUMNS.len()] = {
    let mut names = [""; LOADED_COLUMNS.len()];
    let mut i = 0;
    while i < names.len() {
        names[i] = LOADED_COLUMNS[i].name;
        i += 1;
    }
    names
};

const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Microseconds from the Unix epoch to PostgreSQL's epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800 * 1_000_000;

/// `inet` address families as PostgreSQL encodes them (not the OS's AF_* values).
const PGSQL_AF_INET: u8 = 2;
const PGSQL_AF_INET6: u8 = 3;

/// The `jsonb` binary format version byte.
const JSONB_VERSION: u8 = 1;

/// `COPY audit_events (<columns>) FROM STDIN (FORMAT binary)` into `table`.
pub fn copy_statement(table: &str) -> String {
    format!(
        "COPY {table} ({}) FROM STDIN (FORMAT binary)",
        columns::name_list(&LOADED_COLUMNS)
    )
}

/// Where a row came from in the WAL; stored with the row.
#[derive(Debug, Clone, Copy)]
pub struct RowOrigin<'a> {
    pub stream_id: &'a str,
    pub lsn: u64,
    pub sample_rate: f64,
    /// The row's hash-chain link and the record bytes it covers (NULL columns
    /// when absent: replayed rows).
    pub link: Option<Link>,
    pub payload: Option<&'a [u8]>,
}

/// A binary COPY body being built: header, rows, and (on `finish`) the trailer.
pub struct CopyBuffer {
    buf: Vec<u8>,
    rows: usize,
}

impl Default for CopyBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyBuffer {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
        CopyBuffer { buf, rows: 0 }
    }

    /// Rows encoded so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes encoded so far (header included, trailer not).
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Appends one row: the event's fields, then its WAL origin and link.
    pub fn push(&mut self, event: &AuditEvent, origin: RowOrigin<'_>) {
        let b = &mut self.buf;
        b.extend_from_slice(&(COPY_COLUMNS.len() as i16).to_be_bytes());
        columns::visit_event(event, &mut RowFields(b));
        // The rest of LOADED_COLUMNS: stream_id, lsn, sample_rate,
        // chain_prev_lsn, chain_hash, wal_payload.
        put_text(b, Some(origin.stream_id));
        put_field(b, &(origin.lsn as i64).to_be_bytes());
        put_field(b, &origin.sample_rate.to_be_bytes());
        match origin.link {
            Some(link) => {
                put_field(b, &(link.prev_lsn as i64).to_be_bytes());
                put_field(b, &link.hash);
            }
            None => {
                put_null(b);
                put_null(b);
            }
        }
        match origin.payload {
            Some(payload) => put_field(b, payload),
            None => put_null(b),
        }
        self.rows += 1;
    }

    /// Takes the bytes encoded so far (the header with the first call), leaving the
    /// buffer empty for more rows: for streaming a large body in chunks. The
    /// chunks, followed by [`CopyBuffer::finish`]'s bytes, form one COPY body.
    pub fn drain(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// The complete COPY body (or its last chunk after [`CopyBuffer::drain`]),
    /// trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

/// Encodes the event's columns ([`columns::visit_event`]) into a row.
struct RowFields<'a>(&'a mut Vec<u8>);

impl ColumnVisitor<'_> for RowFields<'_> {
    #[inline(always)]
    fn value(&mut self, value: Value<'_>) {
        let b = &mut *self.0;
        match value {
            Value::Uuid(id) => put_uuid(b, id),
            Value::Timestamptz(t) => put_timestamptz(b, t),
            Value::Text(s) => put_text(b, Some(s)),
            Value::OptText(s) => put_text(b, s),
            Value::Outcome(o) => put_text(b, o.map(|o| o.as_str())),
            Value::Inet(ip) => put_inet(b, ip),
            Value::Jsonb(j) => put_jsonb(b, j.map(|j| j.as_str())),
        }
    }
}

fn put_field(b: &mut Vec<u8>, value: &[u8]) {
    // Values are bounded by the event size limit, far below i32::MAX.
    b.extend_from_slice(&(value.len() as i32).to_be_bytes());
    b.extend_from_slice(value);
}

fn put_null(b: &mut Vec<u8>) {
    b.extend_from_slice(&(-1i32).to_be_bytes());
}

fn put_text(b: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(s) => put_field(b, s.as_bytes()),
        None => put_null(b),
    }
}

fn put_uuid(b: &mut Vec<u8>, id: &Uuid) {
    put_field(b, id.as_bytes());
}

fn put_timestamptz(b: &mut Vec<u8>, t: &DateTime<Utc>) {
    let us = t.timestamp_micros() - PG_EPOCH_OFFSET_US;
    put_field(b, &us.to_be_bytes());
}

fn put_inet(b: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => put_null(b),
        Some(IpAddr::V4(v4)) => {
            b.extend_from_slice(&8i32.to_be_bytes());
            b.extend_from_slice(&[PGSQL_AF_INET, 32, 0, 4]);
            b.extend_from_slice(&v4.octets());
        }
        Some(IpAddr::V6(v6)) => {
            b.extend_from_slice(&20i32.to_be_bytes());
            b.extend_from_slice(&[PGSQL_AF_INET6, 128, 0, 16]);
            b.extend_from_slice(&v6.octets());
        }
    }
}

fn put_jsonb(b: &mut Vec<u8>, json: Option<&str>) {
    match json {
        None => put_null(b),
        Some(text) => {
            b.extend_from_slice(&((text.len() + 1) as i32).to_be_bytes());
            b.push(JSONB_VERSION);
            b.extend_from_slice(text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_body_is_signature_flags_extension_and_trailer() {
        let body = CopyBuffer::new().finish();
        assert_eq!(&body[..11], SIGNATURE);
        assert_eq!(&body[11..19], &[0u8; 8]);
        assert_eq!(&body[19..], &[0xff, 0xff]);
    }

    #[test]
    fn timestamps_count_from_the_postgres_epoch() {
        let mut b = Vec::new();
        let t = DateTime::parse_from_rfc3339("2000-01-01T00:00:01Z")
            .expect("valid")
            .with_timezone(&Utc);
        put_timestamptz(&mut b, &t);
        assert_eq!(&b[..4], &8i32.to_be_bytes());
        assert_eq!(&b[4..], &1_000_000i64.to_be_bytes());
    }

    #[test]
    fn row_has_one_length_prefixed_field_per_column() {
        let e = AuditEvent::new("a.b").ip("10.0.0.1".parse().expect("ip"));
        let mut c = CopyBuffer::new();
        c.push(
            &e,
            RowOrigin {
                stream_id: "s",
                lsn: 7,
                sample_rate: 1.0,
                link: Some(Link {
                    prev_lsn: 6,
                    hash: [1; 32],
                }),
                payload: Some(b"record"),
            },
        );
        let body = c.finish();
        // Walk the row by its length prefixes; it must end exactly at the trailer.
        let mut at = 19;
        let count = i16::from_be_bytes([body[at], body[at + 1]]);
        assert_eq!(count as usize, COPY_COLUMNS.len());
        at += 2;
        for _ in 0..count {
            let len = i32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
            at += 4 + len.max(0) as usize;
        }
        assert_eq!(&body[at..], &[0xff, 0xff]);
    }
}
