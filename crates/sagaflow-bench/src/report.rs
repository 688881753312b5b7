//! The report of a run: vegeta's figures and text layout, plus what this bench adds (the load, its own
//! CPU, watched processes, the upstreams' counters). The JSON keeps vegeta's field names and units
//! (nanoseconds), so tools reading `vegeta report -type=json` read it too.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resources::Resources;

/// Latencies in ns, under vegeta's JSON names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Latencies {
    /// Sum of all latencies.
    pub(crate) total: u64,
    /// Mean latency.
    pub(crate) mean: u64,
    /// Median.
    #[serde(rename = "50th")]
    pub(crate) p50: u64,
    /// 90th percentile.
    #[serde(rename = "90th")]
    pub(crate) p90: u64,
    /// 95th percentile.
    #[serde(rename = "95th")]
    pub(crate) p95: u64,
    /// 99th percentile.
    #[serde(rename = "99th")]
    pub(crate) p99: u64,
    /// Longest.
    pub(crate) max: u64,
    /// Shortest.
    pub(crate) min: u64,
}

/// One distinct error and how often it happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct ErrorCount {
    /// The error, numbers masked as `N`.
    pub(crate) error: String,
    /// Requests that ended with it.
    pub(crate) count: u64,
}

/// What load was offered, to what.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Load {
    /// `sync`, `async`, `throttling` or `direct`.
    pub(crate) flow: String,
    /// The address called, comma-separated when the calls were spread over several replicas
    /// (for `direct`, the order and payment services).
    pub(crate) target: String,
    /// Requests/s (open loop); `None` for a closed loop.
    pub(crate) rate: Option<f64>,
    /// Requested length of the attack, in ns.
    pub(crate) duration: u64,
    /// Most requests outstanding at once (closed loop: the number of callers).
    pub(crate) max_in_flight: usize,
    /// Share of requests carrying `FaultInject`.
    pub(crate) fault_rate: f64,
    /// gRPC connections per service.
    pub(crate) connections: usize,
    /// Runtime worker threads of the generator.
    pub(crate) threads: usize,
    /// Start of the run, Unix time in ms.
    pub(crate) started_unix_ms: u64,
}

/// CPU and memory used by a process during the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Usage {
    /// What the process is (`--watch-pid NAME=PID`), or empty.
    #[serde(default)]
    pub(crate) name: String,
    /// The process id.
    pub(crate) pid: u32,
    /// CPU time (user + system) spent during the run, in s.
    pub(crate) cpu_seconds: f64,
    /// Peak resident memory of the process so far (`VmHWM`), in KiB.
    pub(crate) peak_rss_kib: u64,
}

/// The requests of a run that went to one orchestrator replica.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct TargetShare {
    /// The replica's gRPC address.
    pub(crate) addr: String,
    /// Requests sent to it.
    pub(crate) requests: u64,
    /// Of those, the ones that got the answer they asked for.
    pub(crate) successes: u64,
}

/// One upstream mock's counters after the run (its `Snapshot`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct UpstreamCounters {
    /// Calls received (Snapshot excluded).
    pub(crate) calls: u64,
    /// Records created.
    pub(crate) creates: u64,
    /// Cancels received.
    pub(crate) cancels: u64,
    /// Repeated creates answered with the existing record.
    pub(crate) duplicates_absorbed: u64,
    /// Most calls in flight at once since the service started.
    pub(crate) peak_in_flight: u64,
    /// Calls refused with `RESOURCE_EXHAUSTED` (over capacity).
    pub(crate) rejected: u64,
    /// Failures injected by its failure rate or by `FaultInject`.
    pub(crate) injected_failures: u64,
    /// Calls in flight when the snapshot was taken.
    pub(crate) in_flight: u64,
}

/// Both upstreams' counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Upstreams {
    /// The OrderService.
    pub(crate) order: UpstreamCounters,
    /// The PaymentService.
    pub(crate) payment: UpstreamCounters,
}

/// The figures of one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Report {
    /// Latency figures, ns.
    pub(crate) latencies: Latencies,
    /// The attack: from the first send to the last, ns.
    pub(crate) duration: u64,
    /// From the last send to the last outcome, ns.
    pub(crate) wait: u64,
    /// Requests due (sent or not).
    pub(crate) requests: u64,
    /// Requests per second of attack.
    pub(crate) rate: f64,
    /// Successes per second of attack and wait.
    pub(crate) throughput: f64,
    /// Share of requests that got the answer they asked for.
    pub(crate) success: f64,
    /// Requests by status.
    pub(crate) status_codes: BTreeMap<String, u64>,
    /// Distinct errors (vegeta's error set).
    pub(crate) errors: Vec<String>,
    /// Distinct errors with their counts, most frequent first.
    pub(crate) error_counts: Vec<ErrorCount>,
    /// Requests not sent because `max_in_flight` were outstanding (counted as failures).
    pub(crate) unsent: u64,
    /// Longest delay between a request's intended and actual send, ns: the generator's own lag.
    pub(crate) max_send_lag: u64,
    /// The load offered.
    pub(crate) load: Load,
    /// The generator's own CPU and memory.
    pub(crate) generator: Usage,
    /// Processes watched with `--watch-pid`.
    pub(crate) watched: Vec<Usage>,
    /// The watched processes' memory and CPU and the watched directories' size over the run,
    /// sampled every `--sample-interval`.
    #[serde(default, skip_serializing_if = "Resources::is_empty")]
    pub(crate) resources: Resources,
    /// The upstreams' counters, with `--upstream-snapshot`.
    pub(crate) upstream: Option<Upstreams>,
    /// Async callbacks that named no request waiting for one (late or duplicate).
    pub(crate) unexpected_callbacks: u64,
    /// The requests each orchestrator replica was sent (one entry per `--target`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) targets: Vec<TargetShare>,
}

/// A run of `--compare`: the same load direct to the upstreams, then through the orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Comparison {
    /// The upstreams called directly.
    pub(crate) direct: Report,
    /// The flow through the orchestrator.
    pub(crate) flow: Report,
    /// Flow throughput over direct throughput.
    pub(crate) throughput_ratio: f64,
    /// Flow p99 minus direct p99, ns (negative when the flow is faster).
    pub(crate) p99_delta: i64,
}

impl Comparison {
    /// Compares `flow` against `direct`.
    pub(crate) fn new(direct: Report, flow: Report) -> Self {
        let throughput_ratio = if direct.throughput > 0.0 { flow.throughput / direct.throughput } else { 0.0 };
        let p99_delta = flow.latencies.p99 as i64 - direct.latencies.p99 as i64;
        Self { direct, flow, throughput_ratio, p99_delta }
    }

    /// The line printed after both reports.
    pub(crate) fn text(&self) -> String {
        let sign = if self.p99_delta < 0 { "-" } else { "+" };
        line(
            "Compare",
            "[throughput ratio, p99 delta]",
            &format!(
                "{:.3} ({:.2} / {:.2}), {sign}{}",
                self.throughput_ratio,
                self.flow.throughput,
                self.direct.throughput,
                go_duration(self.p99_delta.unsigned_abs())
            ),
        )
    }
}

fn line(label: &str, fields: &str, values: &str) -> String {
    format!("{label:<14}{fields:<34}{values}\n")
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl Report {
    /// The report as vegeta prints it, with this bench's extra lines before the error set.
    pub(crate) fn text(&self) -> String {
        let l = &self.latencies;
        let mut out = String::new();
        out.push_str(&line("Load", "[flow, target, offered]", &self.load_text()));
        out.push_str(&line(
            "Requests",
            "[total, rate, throughput]",
            &format!("{}, {:.2}, {:.2}", self.requests, self.rate, self.throughput),
        ));
        out.push_str(&line(
            "Duration",
            "[total, attack, wait]",
            &format!(
                "{}, {}, {}",
                go_duration(self.duration + self.wait),
                go_duration(self.duration),
                go_duration(self.wait)
            ),
        ));
        let latencies = [l.min, l.mean, l.p50, l.p90, l.p95, l.p99, l.max].map(go_duration).join(", ");
        out.push_str(&line("Latencies", "[min, mean, 50, 90, 95, 99, max]", &latencies));
        out.push_str(&line("Success", "[ratio]", &format!("{:.2}%", self.success * 100.0)));
        let codes: Vec<String> = self.status_codes.iter().map(|(code, n)| format!("{code}:{n}")).collect();
        out.push_str(&line("Status Codes", "[code:count]", &codes.join("  ")));
        let wall = Duration::from_nanos(self.duration + self.wait).as_secs_f64().max(1e-9);
        let cpu = |u: &Usage| format!("{:.2}s ({:.0}% of a core)", u.cpu_seconds, u.cpu_seconds / wall * 100.0);
        out.push_str(&line(
            "Generator",
            "[cpu, peak rss, max send lag]",
            &format!(
                "{}, {}, {}",
                cpu(&self.generator),
                mib(self.generator.peak_rss_kib),
                go_duration(self.max_send_lag)
            ),
        ));
        for watched in &self.watched {
            let who = if watched.name.is_empty() {
                watched.pid.to_string()
            } else {
                format!("{} {}", watched.name, watched.pid)
            };
            out.push_str(&line(
                "Watched",
                "[process, cpu, peak rss]",
                &format!("{who}: {}, {}", cpu(watched), mib(watched.peak_rss_kib)),
            ));
        }
        out.push_str(&self.resources.text());
        if self.targets.len() > 1 {
            for share in &self.targets {
                let success = if share.requests > 0 { share.successes as f64 / share.requests as f64 } else { 0.0 };
                out.push_str(&line(
                    "Target",
                    "[address, requests, success]",
                    &format!("{}, {}, {:.2}%", share.addr, share.requests, success * 100.0),
                ));
            }
        }
        if let Some(up) = &self.upstream {
            out.push_str(&line(
                "Upstream",
                "[peak in flight, rejected]",
                &format!(
                    "order {}, {}; payment {}, {}",
                    up.order.peak_in_flight, up.order.rejected, up.payment.peak_in_flight, up.payment.rejected
                ),
            ));
        }
        if self.unexpected_callbacks > 0 {
            out.push_str(&line("Callbacks", "[unexpected]", &self.unexpected_callbacks.to_string()));
        }
        out.push_str("Error Set:\n");
        for e in &self.error_counts {
            let _ = writeln!(out, "{}  [{}]", e.error, e.count);
        }
        out
    }

    fn load_text(&self) -> String {
        let load = &self.load;
        let duration = go_duration(load.duration);
        let offered = match load.rate {
            Some(rate) => format!("{rate}/s for {duration} (open loop, max {} in flight)", load.max_in_flight),
            None => format!("{} in flight for {duration} (closed loop)", load.max_in_flight),
        };
        let fault = if load.fault_rate > 0.0 {
            format!(", {:.1}% FaultInject", load.fault_rate * 100.0)
        } else {
            String::new()
        };
        format!("{}, {}, {offered}{fault}", load.flow, load.target)
    }

    /// One line for a saturation step or a progress summary.
    pub(crate) fn summary(&self) -> String {
        format!(
            "{} req, {:.2}/s sent, {:.2}/s ok, success {:.2}%, p50 {}, p99 {}, max {}",
            self.requests,
            self.rate,
            self.throughput,
            self.success * 100.0,
            go_duration(self.latencies.p50),
            go_duration(self.latencies.p99),
            go_duration(self.latencies.max)
        )
    }
}

/// Formats ns like vegeta: rounded to 3 decimals of its unit, then as Go prints a `time.Duration`
/// (`36.878s`, `6.88s`, `20.014ms`, `1m2.5s`).
pub(crate) fn go_duration(ns: u64) -> String {
    const US: u64 = 1_000;
    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    let round = |unit: u64| (ns + unit / 2) / unit * unit;
    let ns = if ns > S {
        round(MS)
    } else if ns > MS {
        round(US)
    } else {
        ns
    };
    if ns == 0 {
        return "0s".into();
    }
    if ns < US {
        return format!("{ns}ns");
    }
    if ns < MS {
        return format!("{}µs", fraction(ns, US));
    }
    if ns < S {
        return format!("{}ms", fraction(ns, MS));
    }
    let (hours, rest) = (ns / (3600 * S), ns % (3600 * S));
    let (minutes, rest) = (rest / (60 * S), rest % (60 * S));
    let seconds = fraction(rest, S);
    match (hours, minutes) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

/// `value / unit` with the decimals it needs (none when whole).
fn fraction(value: u64, unit: u64) -> String {
    let whole = value / unit;
    let rest = value % unit;
    if rest == 0 {
        return whole.to_string();
    }
    let digits = unit.ilog10() as usize;
    let decimals = format!("{rest:0digits$}");
    format!("{whole}.{}", decimals.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_like_vegeta() {
        assert_eq!(go_duration(36_878_000_000), "36.878s");
        assert_eq!(go_duration(29_998_123_456), "29.998s");
        assert_eq!(go_duration(6_880_000_000), "6.88s");
        assert_eq!(go_duration(20_014_321), "20.014ms");
        assert_eq!(go_duration(4_786_499_999), "4.786s");
        assert_eq!(go_duration(1_000_000_000), "1s");
        assert_eq!(go_duration(62_500_000_000), "1m2.5s");
        assert_eq!(go_duration(3_723_000_000_000), "1h2m3s");
        assert_eq!(go_duration(852_123), "852.123µs");
        assert_eq!(go_duration(999), "999ns");
        assert_eq!(go_duration(0), "0s");
    }

    fn sample() -> Report {
        Report {
            latencies: Latencies {
                total: 0,
                mean: 6_019_000_000,
                p50: 4_786_000_000,
                p90: 13_826_000_000,
                p95: 17_791_000_000,
                p99: 24_550_000_000,
                max: 30_274_000_000,
                min: 20_014_000,
            },
            duration: 29_998_000_000,
            wait: 6_880_000_000,
            requests: 15_000,
            rate: 500.04,
            throughput: 250.18,
            success: 0.6151,
            status_codes: BTreeMap::from([("OK".into(), 9226), ("RESOURCE_EXHAUSTED".into(), 5774)]),
            errors: vec!["RESOURCE_EXHAUSTED: order service over capacity (N in flight)".into()],
            error_counts: vec![ErrorCount {
                error: "RESOURCE_EXHAUSTED: order service over capacity (N in flight)".into(),
                count: 5774,
            }],
            load: Load {
                flow: "sync".into(),
                target: "127.0.0.1:10000".into(),
                rate: Some(500.0),
                duration: 30_000_000_000,
                max_in_flight: 10_000,
                ..Load::default()
            },
            ..Report::default()
        }
    }

    #[test]
    fn the_text_report_has_vegetas_lines_and_columns() {
        let text = sample().text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[1], "Requests      [total, rate, throughput]         15000, 500.04, 250.18");
        assert_eq!(lines[2], "Duration      [total, attack, wait]             36.878s, 29.998s, 6.88s");
        assert_eq!(
            lines[3],
            "Latencies     [min, mean, 50, 90, 95, 99, max]  20.014ms, 6.019s, 4.786s, 13.826s, 17.791s, 24.55s, 30.274s"
        );
        assert_eq!(lines[4], "Success       [ratio]                           61.51%");
        assert_eq!(lines[5], "Status Codes  [code:count]                      OK:9226  RESOURCE_EXHAUSTED:5774");
        assert!(lines[0].starts_with("Load          [flow, target, offered]           sync, 127.0.0.1:10000, 500/s"));
        let error_set = lines.iter().position(|l| *l == "Error Set:").unwrap();
        assert_eq!(lines[error_set + 1], "RESOURCE_EXHAUSTED: order service over capacity (N in flight)  [5774]");
    }

    #[test]
    fn the_json_uses_vegetas_names_and_round_trips() {
        let report = sample();
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["latencies"]["99th"], 24_550_000_000u64);
        assert_eq!(json["latencies"]["50th"], 4_786_000_000u64);
        assert_eq!(json["status_codes"]["OK"], 9226);
        assert_eq!(json["success"], 0.6151);
        assert_eq!(json["duration"], 29_998_000_000u64);
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn a_run_over_several_replicas_reports_each_ones_share() {
        let mut report = sample();
        assert!(!report.text().contains("Target  "), "one target: no share lines");
        report.targets = vec![
            TargetShare { addr: "127.0.0.1:1".into(), requests: 5000, successes: 5000 },
            TargetShare { addr: "127.0.0.1:2".into(), requests: 5000, successes: 4990 },
        ];
        let text = report.text();
        assert!(
            text.contains("Target        [address, requests, success]      127.0.0.1:1, 5000, 100.00%\n"),
            "{text}"
        );
        assert!(text.contains("127.0.0.1:2, 5000, 99.80%"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["targets"][1]["successes"], 4990);
        assert_eq!(serde_json::from_value::<Report>(json).unwrap(), report);
    }

    #[test]
    fn a_comparison_gives_the_throughput_ratio_and_the_p99_delta() {
        let mut direct = sample();
        direct.throughput = 1000.0;
        direct.latencies.p99 = 3_000_000;
        let mut flow = sample();
        flow.throughput = 620.0;
        flow.latencies.p99 = 4_500_000;
        let comparison = Comparison::new(direct, flow);
        assert!((comparison.throughput_ratio - 0.62).abs() < 1e-9);
        assert_eq!(comparison.p99_delta, 1_500_000);
        assert!(comparison.text().contains("0.620 (620.00 / 1000.00), +1.5ms"), "{}", comparison.text());
    }
}
