//! Sampled mode's decision: keep this event or not, and with which weight.
//!
//! This module owns three things: the rate (a fraction in [0, 1]), the
//! force-keep rules (actions such as `admin.*` and outcomes such as `failure`
//! that are kept whatever the rate), and the sampling key (a field, by default
//! `request_id`, whose value decides for every event that carries it, so the
//! events of one request are kept or dropped together). The invariant it keeps:
//! a kept event's stored `sample_rate` is the probability with which such an
//! event is kept, so `sum(1 / sample_rate)` over kept rows estimates the count of
//! all events; forced keeps store 1.0.
//!
//! The keyed decision is a pure function of the key's bytes and the rate:
//! FNV-1a (64-bit) over the UTF-8 key, then the MurmurHash3 `fmix64` finalizer
//! (FNV alone mixes short keys poorly into its high bits), whose top 53 bits
//! read as a fraction in [0, 1). The event is kept when that fraction is below
//! the rate. The hash has no random seed and no dependence on the platform or
//! the Rust version, so every process (and a service written in another
//! language that implements the same two steps) keeps the same requests, and a
//! request kept at rate r is also kept at every rate above r. Events without a
//! key get an independent random draw each.
//!
//! It knows nothing about where kept events go; `log` delivers them async.

use std::fmt;
use std::str::FromStr;

use crate::event::{AuditEvent, Outcome};

/// The event field whose value decides sampling for every event that has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum SampleKey {
    /// One request's events are kept or dropped together (the default).
    #[default]
    RequestId,
    /// One actor's events are kept or dropped together.
    ActorId,
    /// One tenant's events are kept or dropped together.
    TenantId,
    /// One target object's events are kept or dropped together.
    TargetId,
    /// No key: every event is an independent random draw.
    None,
}

impl SampleKey {
    /// The spelling used in configuration (`request_id`, …, `none`).
    pub fn as_str(self) -> &'static str {
        match self {
            SampleKey::RequestId => "request_id",
            SampleKey::ActorId => "actor_id",
            SampleKey::TenantId => "tenant_id",
            SampleKey::TargetId => "target_id",
            SampleKey::None => "none",
        }
    }

    /// The key's value in `event`, if the event has one.
    pub fn value(self, event: &AuditEvent) -> Option<&str> {
        match self {
            SampleKey::RequestId => event.request_id.as_deref(),
            SampleKey::ActorId => event.actor_id.as_deref(),
            SampleKey::TenantId => event.tenant_id.as_deref(),
            SampleKey::TargetId => event.target_id.as_deref(),
            SampleKey::None => None,
        }
    }
}

impl fmt::Display for SampleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SampleKey {
    type Err = SamplingError;
    fn from_str(s: &str) -> Result<Self, SamplingError> {
        match s.trim() {
            "request_id" => Ok(SampleKey::RequestId),
            "actor_id" => Ok(SampleKey::ActorId),
            "tenant_id" => Ok(SampleKey::TenantId),
            "target_id" => Ok(SampleKey::TargetId),
            "none" | "" => Ok(SampleKey::None),
            other => Err(SamplingError::UnknownKey {
                value: other.to_string(),
            }),
        }
    }
}

/// Why a sampling setting was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum SamplingError {
    #[error("sample rate {value} is not a number in [0, 1]")]
    InvalidRate { value: f64 },
    #[error(
        "action pattern {pattern:?}: {reason} (use an exact action, a prefix ending in `*` \
         such as `admin.*`, or `*` for every action)"
    )]
    InvalidPattern {
        pattern: String,
        reason: &'static str,
    },
    #[error("sample key {value:?} is not one of request_id, actor_id, tenant_id, target_id, none")]
    UnknownKey { value: String },
}

/// One force-keep rule on the action: exact, a prefix (`admin.*`), or any (`*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionPattern {
    text: String,
    /// The part before a trailing `*`; `None` for an exact match.
    prefix: Option<usize>,
}

impl ActionPattern {
    /// Parses `admin.*` (prefix), `*` (any) or `url.deleted` (exact).
    pub fn parse(pattern: &str) -> Result<ActionPattern, SamplingError> {
        let bad = |reason| {
            Err(SamplingError::InvalidPattern {
                pattern: pattern.to_string(),
                reason,
            })
        };
        let text = pattern.trim();
        if text.is_empty() {
            return bad("it is empty");
        }
        let stars = text.matches('*').count();
        let prefix = match (stars, text.strip_suffix('*')) {
            (0, _) => None,
            (1, Some(head)) => Some(head.len()),
            _ => return bad("`*` may appear only once, at the end"),
        };
        Ok(ActionPattern {
            text: text.to_string(),
            prefix,
        })
    }

    pub fn matches(&self, action: &str) -> bool {
        match self.prefix {
            Some(n) => action.starts_with(&self.text[..n]),
            None => action == self.text,
        }
    }

    /// The pattern as written (`admin.*`).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for ActionPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The rules that keep an event whatever the rate: an action pattern or an
/// outcome matches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ForceKeep {
    pub actions: Vec<ActionPattern>,
    pub outcomes: Vec<Outcome>,
}

impl ForceKeep {
    /// No rule: only the rate decides.
    pub fn none() -> ForceKeep {
        ForceKeep::default()
    }

    /// Rules from action patterns (`admin.*` a prefix, `*` any, `url.deleted` exact) and outcomes.
    pub fn new<S: AsRef<str>>(
        actions: impl IntoIterator<Item = S>,
        outcomes: impl IntoIterator<Item = Outcome>,
    ) -> Result<ForceKeep, SamplingError> {
        Ok(ForceKeep {
            actions: actions
                .into_iter()
                .map(|a| ActionPattern::parse(a.as_ref()))
                .collect::<Result<_, _>>()?,
            outcomes: outcomes.into_iter().collect(),
        })
    }

    /// True when some rule keeps `event` whatever the rate.
    pub fn matches(&self, event: &AuditEvent) -> bool {
        event.outcome.is_some_and(|o| self.outcomes.contains(&o))
            || self.actions.iter().any(|p| p.matches(&event.action))
    }
}

/// What the sampler decided for one event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Keep it, storing `sample_rate` with the row (1.0 when `forced`).
    Keep { sample_rate: f64, forced: bool },
    /// Do not record it.
    Drop,
}

/// Sampled mode's decision maker: rate, force-keep rules, key.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampler {
    rate: f64,
    force_keep: ForceKeep,
    key: SampleKey,
}

impl Sampler {
    /// `rate` must be a number in [0, 1].
    pub fn new(rate: f64, force_keep: ForceKeep, key: SampleKey) -> Result<Sampler, SamplingError> {
        if !(0.0..=1.0).contains(&rate) {
            return Err(SamplingError::InvalidRate { value: rate });
        }
        Ok(Sampler {
            rate,
            force_keep,
            key,
        })
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn force_keep(&self) -> &ForceKeep {
        &self.force_keep
    }

    pub fn key(&self) -> SampleKey {
        self.key
    }

    /// Keep or drop `event` (see the module docs for the rule).
    pub fn decide(&self, event: &AuditEvent) -> Decision {
        if self.force_keep.matches(event) {
            return Decision::Keep {
                sample_rate: 1.0,
                forced: true,
            };
        }
        // Exact ends first: they need no hash or draw, and 0.0 must never store a
        // zero rate (the WAL and the table accept only (0, 1]).
        if self.rate >= 1.0 {
            return Decision::Keep {
                sample_rate: 1.0,
                forced: false,
            };
        }
        if self.rate <= 0.0 {
            return Decision::Drop;
        }
        let fraction = match self.key.value(event) {
            Some(key) => key_fraction(key),
            None => rand::random::<f64>(),
        };
        if fraction < self.rate {
            Decision::Keep {
                sample_rate: self.rate,
                forced: false,
            }
        } else {
            Decision::Drop
        }
    }
}

/// The sampling key's position in [0, 1): FNV-1a 64 over the key's bytes, the
/// MurmurHash3 `fmix64` finalizer, top 53 bits over 2^53. Stable forever: other
/// processes and languages rely on it to keep the same requests.
pub fn key_fraction(key: &str) -> f64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for &b in key.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    // 53 bits fit an f64's mantissa exactly, so the result is < 1.0.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(rate: f64) -> Sampler {
        let rules =
            ForceKeep::new(["admin.*"], [Outcome::Failure, Outcome::Denied]).expect("valid rules");
        Sampler::new(rate, rules, SampleKey::RequestId).expect("valid rate")
    }

    fn kept(s: &Sampler, e: &AuditEvent) -> bool {
        matches!(s.decide(e), Decision::Keep { .. })
    }

    #[test]
    fn key_fraction_is_pinned_so_other_processes_agree() {
        // Values from an independent implementation (Python, same two steps).
        // Changing them changes which requests every deployed process keeps.
        let pinned = [
            ("r-1", "0.246918206112"),
            ("", "0.936769448390"),
            ("0", "0.757387813305"),
            ("request-42", "0.897786040788"),
        ];
        for (key, want) in pinned {
            assert_eq!(format!("{:.12}", key_fraction(key)), want, "{key:?}");
        }
    }

    #[test]
    fn keyed_fraction_tracks_the_rate_across_rates() {
        let n = 100_000u32;
        for rate in [0.01, 0.1, 0.25, 0.5, 0.9] {
            let s = sampler(rate);
            let k = (0..n)
                .filter(|i| {
                    kept(
                        &s,
                        &AuditEvent::new("url.visited").request_id(i.to_string()),
                    )
                })
                .count();
            let got = f64::from(u32::try_from(k).expect("fits")) / f64::from(n);
            let sd = (rate * (1.0 - rate) / f64::from(n)).sqrt();
            assert!(
                (got - rate).abs() < 4.0 * sd,
                "rate {rate}: kept {got}, {:.1} sd off",
                (got - rate) / sd
            );
        }
    }

    #[test]
    fn forced_rules_keep_whatever_the_rate_and_store_one() {
        let s = sampler(0.0);
        let admin = AuditEvent::new("admin.user.disabled").request_id("x");
        let failed = AuditEvent::new("url.created").outcome(Outcome::Failure);
        let denied = AuditEvent::new("url.created").outcome(Outcome::Denied);
        for e in [&admin, &failed, &denied] {
            assert_eq!(
                s.decide(e),
                Decision::Keep {
                    sample_rate: 1.0,
                    forced: true
                }
            );
        }
        let ok = AuditEvent::new("url.created").outcome(Outcome::Success);
        assert_eq!(s.decide(&ok), Decision::Drop);
        // `admin.*` is a prefix of `admin.`, not of `administrator`.
        assert_eq!(
            s.decide(&AuditEvent::new("administrator.x")),
            Decision::Drop
        );
    }

    #[test]
    fn rate_one_keeps_everything_at_rate_one() {
        let s = sampler(1.0);
        for i in 0..1000 {
            let e = AuditEvent::new("a").request_id(i.to_string());
            assert_eq!(
                s.decide(&e),
                Decision::Keep {
                    sample_rate: 1.0,
                    forced: false
                }
            );
        }
        assert!(kept(&s, &AuditEvent::new("no.key")));
    }

    #[test]
    fn one_request_is_kept_or_dropped_as_a_whole_and_monotone_in_the_rate() {
        let low = sampler(0.3);
        let high = sampler(0.6);
        for r in 0..2000 {
            let key = format!("req-{r}");
            let a = kept(&low, &AuditEvent::new("x.read").request_id(&key));
            let b = kept(&low, &AuditEvent::new("y.write").request_id(&key));
            assert_eq!(a, b, "{key}");
            if a {
                assert!(kept(&high, &AuditEvent::new("z").request_id(&key)), "{key}");
            }
        }
    }

    #[test]
    fn events_without_the_key_are_drawn_at_random() {
        let s = sampler(0.5);
        let k = (0..20_000)
            .filter(|_| kept(&s, &AuditEvent::new("no.key")))
            .count();
        // 20,000 draws at 0.5: sd ≈ 71.
        assert!((9_400..=10_600).contains(&k), "{k}");
    }

    #[test]
    fn patterns_are_exact_prefix_or_any_and_bad_ones_are_refused() {
        let p = ActionPattern::parse("admin.*").expect("prefix");
        assert!(p.matches("admin.user.disabled") && !p.matches("admin"));
        let e = ActionPattern::parse("url.deleted").expect("exact");
        assert!(e.matches("url.deleted") && !e.matches("url.deleted.x"));
        assert!(ActionPattern::parse("*").expect("any").matches("anything"));
        for bad in ["", "a*b", "**", "*.x"] {
            assert!(ActionPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rates_outside_zero_to_one_are_refused() {
        for r in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(
                Sampler::new(r, ForceKeep::none(), SampleKey::None).is_err(),
                "{r}"
            );
        }
    }
}
