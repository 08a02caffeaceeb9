//! The columns of `audit_events`: one list of what a stored event is made of, in
//! order, with each column's PostgreSQL type and how to read it from an event.
//!
//! Every writer of rows and of WAL records takes its field order from here: the
//! binary COPY encoder (`loader::copy`), sync mode's INSERT statements and binds
//! (`pg::sync`), replay's INSERT ... SELECT (`loader::replay`) and the WAL payload
//! encoder (`wal::payload`). The list is written once, in `event_columns!`
//! below, which makes both the data ([`EVENT_COLUMNS`]: names and types, for SQL
//! text and for the schema test against the migrations) and the code
//! ([`visit_event`]: one call per column, in the same order, with the value read
//! from the event). The hot encoders implement [`ColumnVisitor`]; it is generic
//! and each call passes a [`Value`] of a variant fixed at the call site, so after
//! inlining every column is straight-line code, as if written out by hand: no
//! loop, no function pointer, no allocation.
//!
//! The WAL payload is the event columns in this order followed by the sample
//! rate (docs/segment-format.md). Changing this list therefore changes the
//! on-disk format as well as the table, on purpose (a new column has to reach
//! the WAL to reach the table); the payload tests hold the encoder to a fixed
//! bincode struct, so an accidental reorder fails them.
//!
//! What is not here: the table's constraints, indexes and partitions
//! (migrations/), and the columns the database fills itself (`id`,
//! `recorded_at`), which no writer names.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::event::{AuditEvent, JsonText, Outcome};

/// The table every writer fills, as SQL spells it (a plain identifier: no
/// quoting needed, and none is used anywhere).
pub const TABLE: &str = "audit_events";

/// One column: its name and its type as `information_schema.columns.udt_name`
/// reports it (also valid SQL type names for casts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub pg_type: &'static str,
    /// False for the `NOT NULL` columns (and then the WAL payload writes the
    /// value without an option tag).
    pub nullable: bool,
}

/// How a column's value is held in an event; fixes its PostgreSQL type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `uuid NOT NULL`.
    Uuid,
    /// `timestamptz NOT NULL`.
    Timestamptz,
    /// `text NOT NULL`.
    Text,
    /// `text`, NULL when absent.
    OptText,
    /// `text` holding [`Outcome::as_str`]; the WAL keeps it as one byte.
    Outcome,
    /// `inet`.
    Inet,
    /// `jsonb`, from validated JSON text.
    Jsonb,
}

impl Kind {
    pub const fn pg_type(self) -> &'static str {
        match self {
            Kind::Uuid => "uuid",
            Kind::Timestamptz => "timestamptz",
            Kind::Text | Kind::OptText | Kind::Outcome => "text",
            Kind::Inet => "inet",
            Kind::Jsonb => "jsonb",
        }
    }

    pub const fn nullable(self) -> bool {
        !matches!(self, Kind::Uuid | Kind::Timestamptz | Kind::Text)
    }

    const fn column(self, name: &'static str) -> Column {
        Column {
            name,
            pg_type: self.pg_type(),
            nullable: self.nullable(),
        }
    }
}

/// One column's value, borrowed from the event; the variant is the column's
/// [`Kind`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value<'a> {
    Uuid(&'a Uuid),
    Timestamptz(&'a DateTime<Utc>),
    Text(&'a str),
    OptText(Option<&'a str>),
    Outcome(Option<Outcome>),
    Inet(Option<IpAddr>),
    Jsonb(Option<&'a JsonText>),
}

/// Receives an event's values, one call per column of [`EVENT_COLUMNS`], in
/// order ([`visit_event`]). Implementations on a hot path mark `value`
/// `#[inline(always)]` so that the `match` on the variant folds away at each
/// call site.
pub trait ColumnVisitor<'e> {
    fn value(&mut self, value: Value<'e>);
}

/// Writes the column list once as data and once as code, from the same lines.
macro_rules! event_columns {
    ($($name:ident: $kind:ident($event:ident => $read:expr),)*) => {
        /// The columns filled from the event, in table (and WAL payload) order.
        pub const EVENT_COLUMNS: &[Column] = &[$(Kind::$kind.column(stringify!($name)),)*];

        /// Calls `visitor` with each of `event`'s values, in [`EVENT_COLUMNS`]
        /// order.
        #[inline(always)]
        pub fn visit_event<'e, V: ColumnVisitor<'e>>(event: &'e AuditEvent, visitor: &mut V) {
            $({
                let $event = event;
                visitor.value(Value::$kind($read));
            })*
        }
    };
}

event_columns! {
    event_id: Uuid(e => &e.event_id),
    occurred_at: Timestamptz(e => &e.occurred_at),
    action: Text(e => e.action.as_str()),
    actor_id: OptText(e => e.actor_id.as_deref()),
    actor_type: OptText(e => e.actor_type.as_deref()),
    target_type: OptText(e => e.target_type.as_deref()),
    target_id: OptText(e => e.target_id.as_deref()),
    target_name: OptText(e => e.target_name.as_deref()),
    tenant_id: OptText(e => e.tenant_id.as_deref()),
    outcome: Outcome(e => e.outcome),
    reason: OptText(e => e.reason.as_deref()),
    ip: Inet(e => e.ip),
    user_agent: OptText(e => e.user_agent.as_deref()),
    request_id: OptText(e => e.request_id.as_deref()),
    before: Jsonb(e => e.before.as_ref()),
    after: Jsonb(e => e.after.as_ref()),
    metadata: Jsonb(e => e.metadata.as_ref()),
}

/// `stream_id`: the WAL stream a loaded row came from; NULL for sync rows.
pub const STREAM_ID: Column = Column {
    name: "stream_id",
    pg_type: "text",
    nullable: true,
};

/// `lsn`: the row's position in its stream; NULL for sync rows.
pub const LSN: Column = Column {
    name: "lsn",
    pg_type: "int8",
    nullable: true,
};

/// `sample_rate`: the fraction the event was kept at (1.0 when not sampled).
pub const SAMPLE_RATE: Column = Column {
    name: "sample_rate",
    pg_type: "float8",
    nullable: false,
};

/// `chain_prev_lsn`: the LSN of the link before the row's in its stream's hash
/// chain (`chain`); NULL for sync rows.
pub const CHAIN_PREV_LSN: Column = Column {
    name: "chain_prev_lsn",
    pg_type: "int8",
    nullable: true,
};

/// `chain_hash`: the row's link hash; NULL for sync rows.
pub const CHAIN_HASH: Column = Column {
    name: "chain_hash",
    pg_type: "bytea",
    nullable: true,
};

/// `wal_payload`: the WAL record the row was loaded from, the bytes its link
/// hash covers; NULL for sync rows.
pub const WAL_PAYLOAD: Column = Column {
    name: "wal_payload",
    pg_type: "bytea",
    nullable: true,
};

/// The columns the loader's COPY (and replay) sends: the event's, then where
/// the row came from in the WAL, then its hash-chain link. Also every column any
/// writer names, in table order: what the migrations must create after `id`,
/// with `recorded_at` between the sample rate and the chain columns (those came
/// later, and ADD COLUMN appends).
pub const LOADED_COLUMNS: [Column; EVENT_COLUMNS.len() + 6] = event_columns_then(&[
    STREAM_ID,
    LSN,
    SAMPLE_RATE,
    CHAIN_PREV_LSN,
    CHAIN_HASH,
    WAL_PAYLOAD,
]);

/// The columns a sync INSERT sends: the event's and the sample rate
/// (`stream_id` and `lsn` are left NULL).
pub const SYNC_COLUMNS: [Column; EVENT_COLUMNS.len() + 1] = event_columns_then(&[SAMPLE_RATE]);

/// `EVENT_COLUMNS` followed by `rest`: `N` columns in all (checked when the
/// constant is built).
const fn event_columns_then<const N: usize>(rest: &[Column]) -> [Column; N] {
    assert!(
        EVENT_COLUMNS.len() + rest.len() == N,
        "N is not the column count"
    );
    let mut out = [SAMPLE_RATE; N];
    let mut i = 0;
    while i < EVENT_COLUMNS.len() {
        out[i] = EVENT_COLUMNS[i];
        i += 1;
    }
    let mut j = 0;
    while j < rest.len() {
        out[i + j] = rest[j];
        j += 1;
    }
    out
}

/// The names of `columns`, comma-separated, for SQL.
pub fn name_list(columns: &[Column]) -> String {
    columns
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `auditwal verify-db` reads of each row, in this order: the chain
/// columns ([`VERIFY_CHAIN_COLUMNS`]), then every event column in a form
/// compared with the record's value without rendering it (timestamps as
/// microseconds, addresses as `host()`, JSON as text).
pub fn verify_select_list() -> String {
    let mut cols: Vec<String> = VERIFY_CHAIN_COLUMNS.iter().map(|c| c.to_string()).collect();
    for c in EVENT_COLUMNS {
        cols.push(match c.pg_type {
            "timestamptz" => format!("(extract(epoch FROM {0}) * 1000000)::int8 AS {0}", c.name),
            "inet" => format!("host({0}) AS {0}", c.name),
            "jsonb" => format!("{0}::text AS {0}", c.name),
            _ => c.name.to_string(),
        });
    }
    cols.join(", ")
}

/// The columns before the event's in [`verify_select_list`].
pub const VERIFY_CHAIN_COLUMNS: [&str; 6] = [
    "stream_id",
    "lsn",
    "chain_prev_lsn",
    "chain_hash",
    "wal_payload",
    "sample_rate",
];

/// The walk's session settings, sent before [`verify_walk_sql`]. JIT would
/// compile the one long statement for 0.4 s of its 1.7 s at 300,000 rows and
/// gain nothing back (docs/benchmarks.md, `bench verify-db`).
pub const VERIFY_SESSION_SQL: &str = "SET jit = off";

/// verify-db's walk: every chained row (of `$1` when not NULL), each
/// stream's from the LSN after `$3[i]` for the stream `$2[i]` (`--since`), in
/// stream and LSN order.
pub fn verify_walk_sql() -> String {
    format!(
        "SELECT {} FROM {TABLE} e LEFT JOIN unnest($2::text[], $3::int8[]) AS s(start_stream, \
         start_lsn) ON s.start_stream = e.stream_id WHERE e.stream_id IS NOT NULL \
         AND ($1::text IS NULL OR e.stream_id = $1) AND e.lsn > coalesce(s.start_lsn, 0) \
         ORDER BY e.stream_id, e.lsn",
        verify_select_list()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the kind of each value it is given.
    struct Kinds(Vec<Kind>);

    impl ColumnVisitor<'_> for Kinds {
        fn value(&mut self, value: Value<'_>) {
            self.0.push(match value {
                Value::Uuid(_) => Kind::Uuid,
                Value::Timestamptz(_) => Kind::Timestamptz,
                Value::Text(_) => Kind::Text,
                Value::OptText(_) => Kind::OptText,
                Value::Outcome(_) => Kind::Outcome,
                Value::Inet(_) => Kind::Inet,
                Value::Jsonb(_) => Kind::Jsonb,
            });
        }
    }

    #[test]
    fn the_visitor_gives_one_value_per_column_of_the_columns_type() {
        let mut kinds = Kinds(Vec::new());
        visit_event(&AuditEvent::new("a"), &mut kinds);
        assert_eq!(kinds.0.len(), EVENT_COLUMNS.len());
        for (kind, column) in kinds.0.iter().zip(EVENT_COLUMNS) {
            assert_eq!(kind.pg_type(), column.pg_type, "{}", column.name);
            assert_eq!(kind.nullable(), column.nullable, "{}", column.name);
        }
    }

    #[test]
    fn loaded_and_sync_columns_are_the_event_columns_then_their_own() {
        let names = |cols: &[Column]| cols.iter().map(|c| c.name).collect::<Vec<_>>();
        let event = names(EVENT_COLUMNS);
        assert_eq!(
            names(&LOADED_COLUMNS),
            [
                &event[..],
                &[
                    "stream_id",
                    "lsn",
                    "sample_rate",
                    "chain_prev_lsn",
                    "chain_hash",
                    "wal_payload"
                ]
            ]
            .concat()
        );
        assert_eq!(
            names(&SYNC_COLUMNS),
            [&event[..], &["sample_rate"]].concat()
        );
        assert_eq!(event[0], "event_id");
        assert_eq!(event[EVENT_COLUMNS.len() - 1], "metadata");
    }
}
