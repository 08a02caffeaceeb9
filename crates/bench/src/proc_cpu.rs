//! CPU accounting from `/proc`, for `bench fleet`: how many cores the server,
//! given processes, and the whole machine used between two snapshots.
//!
//! It owns the parsing of `/proc/<pid>/stat` and `/proc/stat` (pure functions
//! over their text, tested on fixed lines) and the sums over processes. The
//! invariant it keeps: a snapshot's server total never goes back when a
//! backend exits (see [`server_ticks`]), so the difference of two snapshots is
//! the CPU spent in between. Which processes to count is the caller's.

/// The figures of `/proc/<pid>/stat` the bench reads, CPU in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatTimes {
    pub ppid: u32,
    /// utime + stime.
    pub own: u64,
    /// cutime + cstime: the children it has waited for.
    pub children: u64,
}

/// Parses one `/proc/<pid>/stat` line. The command name (field 2) may hold
/// spaces and parentheses, so the fields are counted from its last `)`.
pub fn parse_stat(text: &str) -> Option<StatTimes> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the name: state (3), ppid (4), ..., utime (14), stime (15),
    // cutime (16), cstime (17).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i - 3)?.parse::<i64>().ok();
    Some(StatTimes {
        ppid: u32::try_from(num(4)?).ok()?,
        own: (num(14)? + num(15)?).max(0) as u64,
        children: (num(16)? + num(17)?).max(0) as u64,
    })
}

/// USER_HZ, the unit of `/proc/<pid>/stat` times: 100 on every architecture
/// this bench runs on (the kernel's ABI, whatever its internal HZ).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU ticks so far of the postmaster and every process under it. A backend
/// that exits moves its ticks into the postmaster's child times when the
/// postmaster reaps it, so the sum never goes back and a difference of two
/// sums is the CPU spent in between, ended backends included.
pub fn server_ticks(postmaster: u32) -> Option<u64> {
    let own = parse_stat(&std::fs::read_to_string(format!("/proc/{postmaster}/stat")).ok()?)?;
    let mut total = own.own + own.children;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        // A process that ends between the listing and the read is skipped:
        // its ticks are in the postmaster's child times by then, or soon.
        let Some(st) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        else {
            continue;
        };
        if st.ppid == postmaster {
            total += st.own;
        }
    }
    Some(total)
}

/// CPU ticks so far of the given processes (each with all its threads).
pub fn process_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(&text).map(|s| s.own)
        })
        .sum()
}

/// Ticks that all CPUs of the machine spent busy (anything but idle and
/// iowait), from the first line of `/proc/stat`.
pub fn parse_machine_busy(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<u64> = line
        .split_whitespace()
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let at = |i: usize| f.get(i).copied();
    Some(at(0)? + at(1)? + at(2)? + at(5)? + at(6)? + at(7).unwrap_or(0))
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    pub server: Option<u64>,
    pub loaders: u64,
    pub writers: u64,
    /// This process: the feeders, the ack readers, the checkpoint poller.
    pub bench: u64,
    pub machine: Option<u64>,
}

impl CpuSnapshot {
    pub fn take(postmaster: Option<u32>, loaders: &[u32], writers: &[u32]) -> CpuSnapshot {
        CpuSnapshot {
            server: postmaster.and_then(server_ticks),
            loaders: process_ticks(loaders),
            writers: process_ticks(writers),
            bench: process_ticks(&[std::process::id()]),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| parse_machine_busy(&s)),
        }
    }
}

/// Cores used on average between two snapshots `secs` apart.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CoresUsed {
    pub server: Option<f64>,
    pub loaders: f64,
    pub writers: f64,
    pub bench: f64,
    /// Every process of the machine, these and whatever else ran.
    pub machine: Option<f64>,
}

impl CoresUsed {
    pub fn between(before: &CpuSnapshot, after: &CpuSnapshot, secs: f64) -> CoresUsed {
        let cores = |ticks: u64| ticks as f64 / TICKS_PER_SEC / secs.max(1e-9);
        CoresUsed {
            server: match (before.server, after.server) {
                (Some(b), Some(a)) => Some(cores(a.saturating_sub(b))),
                _ => None,
            },
            loaders: cores(after.loaders.saturating_sub(before.loaders)),
            writers: cores(after.writers.saturating_sub(before.writers)),
            bench: cores(after.bench.saturating_sub(before.bench)),
            machine: match (before.machine, after.machine) {
                (Some(b), Some(a)) => Some(cores(a.saturating_sub(b))),
                _ => None,
            },
        }
    }
}

/// The parent of `pid`, from its `/proc/<pid>/stat`.
pub fn parent_of(pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text).map(|s| s.ppid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_from_after_the_command_name() {
        // A name with a space and a parenthesis, as a backend's title can be.
        let line = "4242 (postgres: a) b) S 4000 4242 4242 0 -1 4194560 500 0 0 0 \
                    150 25 7 3 20 0 1 0 1000 100000 200 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(StatTimes {
                ppid: 4000,
                own: 175,
                children: 10
            })
        );
        assert_eq!(parse_stat("12 (x) S 1"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn cores_are_ticks_over_the_window() {
        let before = CpuSnapshot {
            server: Some(1000),
            loaders: 50,
            writers: 10,
            bench: 5,
            machine: Some(9000),
        };
        let after = CpuSnapshot {
            server: Some(1000 + 300),
            loaders: 50 + 100,
            writers: 10 + 20,
            bench: 5 + 10,
            machine: Some(9000 + 390),
        };
        let c = CoresUsed::between(&before, &after, 2.0);
        assert_eq!(c.server, Some(1.5));
        assert_eq!(c.loaders, 0.5);
        assert_eq!(c.writers, 0.1);
        assert_eq!(c.bench, 0.05);
        assert_eq!(c.machine, Some(1.95));
        let unseen = CoresUsed::between(&CpuSnapshot::default(), &after, 2.0);
        assert_eq!(unseen.server, None);
        assert_eq!(unseen.machine, None);
    }

    #[test]
    fn the_machine_is_busy_for_all_but_idle_and_iowait() {
        let stat = "cpu  100 20 30 5000 40 1 2 3 0 0\ncpu0 50 10 15 2500 20 1 1 2 0 0\n";
        assert_eq!(parse_machine_busy(stat), Some(100 + 20 + 30 + 1 + 2 + 3));
        assert_eq!(parse_machine_busy("cpu0 1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_machine_busy("cpu  1 x 3 4 5 6 7\n"), None);
        let real = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        assert!(parse_machine_busy(&real).is_some(), "{real}");
    }

    #[test]
    fn this_process_and_its_own_children_are_counted_by_pid() {
        let me = std::process::id();
        let text = std::fs::read_to_string(format!("/proc/{me}/stat")).expect("own stat");
        let st = parse_stat(&text).expect("own stat parses");
        assert_eq!(
            st.ppid,
            rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32)
        );
        assert_eq!(process_ticks(&[]), 0);
        // A PID that is not a process counts nothing.
        assert_eq!(process_ticks(&[u32::MAX]), 0);
    }
}
