//! Whether opening a PostgreSQL connection is worth trying now ([`Reconnect`]),
//! shared by sync mode's committers and by the audit log starting its sync
//! writer. It knows connect attempts and how they ended, not what the
//! connection is for.

use std::sync::MutexGuard;
use std::time::Duration;

use tokio::time::Instant;

/// After a connect got no answer, how long batches that need a connection
/// fail at once before a committer tries again ([`Reconnect`]).
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// Whether opening a connection is worth trying, shared by the committers.
///
/// A connect that gets no answer before its batch's deadline (a link that drops
/// packets, a server that accepts and hangs) would hold every later caller for
/// its whole timeout too, on the same dead link. So after one, batches that need
/// a connection fail at once for [`RECONNECT_PAUSE`]; then one committer tries
/// again (the probe, bounded by its batch's deadline) while the others go on
/// failing at once, until the probe ends. A connect that fails quickly (refused)
/// pauses nothing: trying costs no one a wait. A committer that still holds a
/// live connection goes on using it whatever the state. The audit log applies
/// the same rule to starting the writer (`AuditLog`'s sync mode).
#[derive(Debug, Default)]
pub(crate) struct Reconnect(std::sync::Mutex<LinkState>);

#[derive(Debug, Default)]
enum LinkState {
    #[default]
    Up,
    /// The last connect got no answer (`reason`); none is tried before `until`.
    Paused { until: Instant, reason: String },
    /// A caller (a committer, or the log starting the writer) is trying again
    /// after a pause.
    Probing { reason: String },
}

impl Reconnect {
    fn lock(&self) -> MutexGuard<'_, LinkState> {
        // The state is one assignment away from consistent at any point.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The attempt to report on, if the caller may connect now (it is then
    /// the probe, if the link was paused), or why not.
    pub(crate) fn attempt(&self, now: Instant) -> Result<Attempt<'_>, String> {
        let mut st = self.lock();
        // Made only on the way out: dropped unreported under the lock held
        // here, its Drop would lock again.
        let attempt = || Attempt {
            reconnect: self,
            reported: false,
        };
        match &*st {
            LinkState::Up => Ok(attempt()),
            LinkState::Paused { until, reason } if now < *until => Err(format!(
                "{reason} on the last attempt; the next one is due within {RECONNECT_PAUSE:?}"
            )),
            LinkState::Paused { reason, .. } => {
                *st = LinkState::Probing {
                    reason: reason.clone(),
                };
                Ok(attempt())
            }
            LinkState::Probing { reason } => Err(format!(
                "{reason} on the last attempt; another attempt is under way"
            )),
        }
    }

    /// A connect got no answer before its deadline (also for a caller that
    /// gave up waiting for one before its attempt could report).
    pub(crate) fn no_answer(&self, now: Instant, reason: String) {
        *self.lock() = LinkState::Paused {
            until: now + RECONNECT_PAUSE,
            reason,
        };
    }
}

/// One connect attempt allowed by [`Reconnect::attempt`]. Report how it ended;
/// an attempt dropped unreported (its caller cancelled) lets the next caller
/// probe at once rather than leave the others failing "under way" forever.
pub(crate) struct Attempt<'a> {
    reconnect: &'a Reconnect,
    reported: bool,
}

impl Attempt<'_> {
    /// The connect ended with an answer (a connection, or a quick refusal).
    pub(crate) fn answered(mut self) {
        self.reported = true;
        *self.reconnect.lock() = LinkState::Up;
    }

    /// The connect got no answer before its deadline.
    pub(crate) fn no_answer(mut self, now: Instant, reason: String) {
        self.reported = true;
        self.reconnect.no_answer(now, reason);
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        let mut st = self.reconnect.lock();
        if let LinkState::Probing { reason } = &*st {
            *st = LinkState::Paused {
                until: Instant::now(),
                reason: reason.clone(),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::PgError;

    #[test]
    fn after_a_connect_without_answer_one_probe_goes_out_after_the_pause_and_the_rest_fail_at_once()
    {
        let r = Reconnect::default();
        let t0 = Instant::now();
        let first = r.attempt(t0).expect("up: anyone may connect");
        first.no_answer(t0, PgError::timed_out("connecting", Duration::from_secs(1)));
        let err = r
            .attempt(t0 + Duration::from_millis(10))
            .err()
            .expect("paused");
        assert!(
            err.contains("no answer") && err.contains("due within"),
            "{err}"
        );
        let after = t0 + RECONNECT_PAUSE;
        let probe = r.attempt(after).expect("the probe");
        let err = r.attempt(after).err().expect("one probe at a time");
        assert!(err.contains("under way"), "{err}");
        probe.no_answer(after, "connecting: no answer within 1s".into());
        assert!(r.attempt(after).is_err(), "a failed probe pauses again");
        let later = after + RECONNECT_PAUSE;
        r.attempt(later).expect("the next probe").answered();
        assert!(r.attempt(later).is_ok());
        assert!(r.attempt(later).is_ok(), "up again: anyone may connect");
    }

    #[test]
    fn a_probe_dropped_without_a_report_lets_the_next_caller_probe_at_once() {
        let r = Reconnect::default();
        let t0 = Instant::now();
        r.no_answer(t0, "connecting: no answer within 1s".into());
        let after = t0 + RECONNECT_PAUSE;
        drop(r.attempt(after).expect("the probe"));
        let next = r.attempt(Instant::now()).expect("not stuck 'under way'");
        assert!(
            r.attempt(Instant::now()).is_err(),
            "and it is the probe now"
        );
        next.answered();
    }
}
