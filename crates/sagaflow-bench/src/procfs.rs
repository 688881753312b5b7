//! CPU time and resident memory of a process, read from Linux's `/proc` (absent elsewhere: then zero).

use std::time::Duration;

/// Clock ticks per second of `/proc/*/stat` times: `USER_HZ`, 100 on every Linux ABI.
const TICKS_PER_SECOND: f64 = 100.0;

/// Which process: this one, or another by pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Process {
    /// The bench itself.
    Myself,
    /// Another process.
    Pid(u32),
}

impl Process {
    fn path(self, file: &str) -> String {
        match self {
            Self::Myself => format!("/proc/self/{file}"),
            Self::Pid(pid) => format!("/proc/{pid}/{file}"),
        }
    }

    /// CPU time (user + system, all threads) used so far.
    pub(crate) fn cpu_time(self) -> Option<Duration> {
        parse_cpu_time(&std::fs::read_to_string(self.path("stat")).ok()?)
    }

    /// Peak resident memory so far (`VmHWM`), in KiB.
    pub(crate) fn peak_rss_kib(self) -> Option<u64> {
        parse_status_kib(&std::fs::read_to_string(self.path("status")).ok()?, "VmHWM:")
    }

    /// Resident memory now (`VmRSS`), in KiB; `None` once the process is gone.
    pub(crate) fn rss_kib(self) -> Option<u64> {
        parse_status_kib(&std::fs::read_to_string(self.path("status")).ok()?, "VmRSS:")
    }
}

/// `utime + stime` of a `/proc/PID/stat` line. The command name may hold spaces and parentheses,
/// so fields are counted after its last `)`.
fn parse_cpu_time(stat: &str) -> Option<Duration> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // After the name: state (field 3) … utime (field 14), stime (field 15).
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_secs_f64((user + system) as f64 / TICKS_PER_SECOND))
}

/// The KiB value of `key` in a `/proc/PID/status` text.
fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| line.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_utime_plus_stime_even_with_odd_process_names() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 125 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_time(stat), Some(Duration::from_millis(3750)));
        assert_eq!(parse_cpu_time("garbage"), None);
    }

    #[test]
    fn peak_rss_comes_from_vmhwm() {
        let status = "Name:\tbooking\nVmPeak:\t  900000 kB\nVmHWM:\t   61234 kB\nVmRSS:\t   50000 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(61_234));
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(50_000));
        assert_eq!(parse_status_kib(status, "VmSwap:"), None);
    }

    #[test]
    fn this_process_can_read_itself_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(Process::Myself.cpu_time().is_some());
            assert!(Process::Myself.peak_rss_kib().unwrap() > 0);
            assert!(Process::Myself.rss_kib().unwrap() > 0);
        } else {
            assert_eq!(Process::Myself.cpu_time(), None);
        }
    }
}
