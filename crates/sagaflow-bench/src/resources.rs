//! Resources over a run (a soak): the resident memory and CPU of the processes watched with
//! `--watch-pid` and the size of the directories watched with `--watch-dir`, sampled every
//! `--sample-interval`, printed as they come and kept as series for the report and the plot.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::procfs::Process;

/// What to sample, and how often.
#[derive(Debug, Clone)]
pub(crate) struct Watch {
    /// Processes, by name (may be empty) and pid.
    pub(crate) pids: Vec<(String, u32)>,
    /// Directories, by name (may be empty) and path.
    pub(crate) dirs: Vec<(String, PathBuf)>,
    /// Time between two samples.
    pub(crate) interval: Duration,
}

impl Watch {
    /// Whether there is anything to sample.
    pub(crate) fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.dirs.is_empty()
    }
}

/// One sample of a watched process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ProcessSample {
    /// Seconds since the run started.
    pub(crate) t_s: f64,
    /// Resident memory (`VmRSS`), KiB; `None` when the process could not be read (gone).
    pub(crate) rss_kib: Option<u64>,
    /// CPU used since the previous sample, in % of one core; `None` for the first sample and
    /// one taken less than 100 ms after the previous.
    pub(crate) cpu_percent: Option<f64>,
}

/// The samples of one watched process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ProcessSeries {
    /// Its `--watch-pid` name, or empty.
    pub(crate) name: String,
    /// Its pid.
    pub(crate) pid: u32,
    /// Oldest first.
    pub(crate) samples: Vec<ProcessSample>,
}

/// One sample of a watched directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct DirSample {
    /// Seconds since the run started.
    pub(crate) t_s: f64,
    /// Total size of the files under it (their lengths), bytes.
    pub(crate) bytes: u64,
}

/// The samples of one watched directory.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct DirSeries {
    /// Its `--watch-dir` name, or empty.
    pub(crate) name: String,
    /// Its path.
    pub(crate) path: PathBuf,
    /// Oldest first.
    pub(crate) samples: Vec<DirSample>,
}

/// Every series of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Resources {
    /// The sampling interval, s.
    pub(crate) interval_s: f64,
    /// The watched processes.
    pub(crate) processes: Vec<ProcessSeries>,
    /// The watched directories.
    pub(crate) dirs: Vec<DirSeries>,
}

impl Resources {
    /// Whether nothing was sampled.
    pub(crate) fn is_empty(&self) -> bool {
        self.processes.is_empty() && self.dirs.is_empty()
    }

    /// Summary lines for the report: per process its RSS at the first sample at or after one
    /// minute (or the first sample), at the end, the change between them and the peak sampled;
    /// per directory its size at the start and the end, and the largest.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        for series in &self.processes {
            let rss: Vec<(f64, u64)> = series.samples.iter().filter_map(|s| Some((s.t_s, s.rss_kib?))).collect();
            let Some(&(last_t, last)) = rss.last() else { continue };
            let &(from_t, from) = rss.iter().find(|(t, _)| *t >= 60.0).unwrap_or(&rss[0]);
            let peak = rss.iter().map(|&(_, kib)| kib).max().unwrap_or(0);
            let growth = if from > 0 { (last as f64 / from as f64 - 1.0) * 100.0 } else { 0.0 };
            let cpu: Vec<f64> = series.samples.iter().filter_map(|s| s.cpu_percent).collect();
            let mean_cpu = if cpu.is_empty() { 0.0 } else { cpu.iter().sum::<f64>() / cpu.len() as f64 };
            let _ = writeln!(
                out,
                "{:<14}{:<34}{}: {} at {from_t:.0}s, {} at {last_t:.0}s ({growth:+.1}%), peak {}, cpu {mean_cpu:.0}%",
                "Resources",
                "[process rss: from, to, peak]",
                who(&series.name, &series.pid.to_string()),
                mib(from),
                mib(last),
                mib(peak),
            );
        }
        for series in &self.dirs {
            let (Some(first), Some(last)) = (series.samples.first(), series.samples.last()) else { continue };
            let largest = series.samples.iter().map(|s| s.bytes).max().unwrap_or(0);
            let _ = writeln!(
                out,
                "{:<14}{:<34}{}: {} at {:.0}s, {} at {:.0}s, largest {}",
                "Resources",
                "[dir size: from, to, largest]",
                who(&series.name, &series.path.display().to_string()),
                mib(first.bytes / 1024),
                first.t_s,
                mib(last.bytes / 1024),
                last.t_s,
                mib(largest / 1024),
            );
        }
        out
    }
}

fn who(name: &str, id: &str) -> String {
    if name.is_empty() { id.to_owned() } else { format!("{name} {id}") }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The shortest span over which CPU use is given as a percentage.
const MIN_CPU_SPAN: Duration = Duration::from_millis(100);

/// Where the sampler prints each sample as it is taken.
#[derive(Debug, Clone)]
pub(crate) enum Printer {
    /// Nowhere.
    Quiet,
    /// A line on stderr.
    Stderr,
    /// Above a progress bar.
    Bar(indicatif::ProgressBar),
}

impl Printer {
    fn print(&self, line: &str) {
        match self {
            Self::Quiet => {}
            Self::Stderr => eprintln!("{line}"),
            Self::Bar(bar) => bar.println(line),
        }
    }
}

/// The size of every file under `path` (symbolic links not followed); 0 when it cannot be read.
pub(crate) fn dir_bytes(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return std::fs::symlink_metadata(path).map(|m| if m.is_file() { m.len() } else { 0 }).unwrap_or(0);
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_bytes(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// The state kept between two samples.
struct Taker {
    start: Instant,
    last: Vec<Option<(Instant, Duration)>>,
    resources: Resources,
}

impl Taker {
    fn new(watch: &Watch, start: Instant) -> Self {
        let processes = watch
            .pids
            .iter()
            .map(|(name, pid)| ProcessSeries { name: name.clone(), pid: *pid, samples: Vec::new() })
            .collect();
        let dirs = watch
            .dirs
            .iter()
            .map(|(name, path)| DirSeries { name: name.clone(), path: path.clone(), samples: Vec::new() })
            .collect();
        Self {
            start,
            last: vec![None; watch.pids.len()],
            resources: Resources { interval_s: watch.interval.as_secs_f64(), processes, dirs },
        }
    }

    /// Takes one sample of everything watched; returns it as one line.
    fn sample(&mut self) -> String {
        let now = Instant::now();
        let t_s = now.duration_since(self.start).as_secs_f64();
        let mut line = format!("[resources] {t_s:.0}s:");
        for (series, last) in self.resources.processes.iter_mut().zip(&mut self.last) {
            let process = Process::Pid(series.pid);
            let rss_kib = process.rss_kib();
            let cpu = process.cpu_time();
            let cpu_percent = match (*last, cpu) {
                // A sample right after the previous one (the last, at the end) has no CPU figure.
                (Some((then, used)), Some(cpu)) if now.duration_since(then) >= MIN_CPU_SPAN => {
                    Some(cpu.saturating_sub(used).as_secs_f64() / now.duration_since(then).as_secs_f64() * 100.0)
                }
                _ => None,
            };
            if cpu_percent.is_some() || last.is_none() {
                *last = cpu.map(|cpu| (now, cpu));
            }
            let _ = write!(line, " {}", who(&series.name, &series.pid.to_string()));
            match rss_kib {
                Some(kib) => {
                    let _ = write!(line, " rss {}", mib(kib));
                }
                None => line.push_str(" gone"),
            }
            if let Some(cpu) = cpu_percent {
                let _ = write!(line, " cpu {cpu:.0}%");
            }
            line.push(';');
            series.samples.push(ProcessSample { t_s, rss_kib, cpu_percent });
        }
        for series in &mut self.resources.dirs {
            let bytes = dir_bytes(&series.path);
            let _ = write!(line, " {} {};", who(&series.name, &series.path.display().to_string()), mib(bytes / 1024));
            series.samples.push(DirSample { t_s, bytes });
        }
        line.pop();
        line
    }
}

/// Samples in the background until [`Sampler::finish`].
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Resources>,
}

impl Sampler {
    /// Takes a sample now, then one every `watch.interval`, printing each with `printer`.
    pub(crate) fn start(watch: Watch, printer: Printer) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut taker = Taker::new(&watch, start);
            let every = watch.interval.max(Duration::from_millis(1));
            let mut tick = tokio::time::interval_at(start, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => printer.print(&taker.sample()),
                    _ = &mut stopped => break,
                }
            }
            // One last sample at the end of the run.
            printer.print(&taker.sample());
            taker.resources
        });
        Self { stop, task }
    }

    /// Takes a last sample and returns every series.
    pub(crate) async fn finish(self) -> Resources {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_sampler_watching_itself_keeps_a_series_of_samples() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![0u8; 24]).unwrap();
        let watch = Watch {
            pids: vec![("me".into(), std::process::id())],
            dirs: vec![("data".into(), dir.path().to_owned())],
            interval: Duration::from_millis(20),
        };
        let sampler = Sampler::start(watch, Printer::Quiet);
        // Real time: the sampler reads /proc. At least the first sample, two ticks and the last.
        tokio::time::sleep(Duration::from_millis(60)).await;
        let resources = sampler.finish().await;

        assert_eq!(resources.interval_s, 0.02);
        let [me] = &resources.processes[..] else { panic!("{resources:?}") };
        assert_eq!((me.name.as_str(), me.pid), ("me", std::process::id()));
        assert!(me.samples.len() >= 2, "{me:?}");
        assert!(me.samples.windows(2).all(|w| w[0].t_s <= w[1].t_s), "in order: {me:?}");
        assert_eq!(me.samples[0].cpu_percent, None, "no CPU figure without a previous sample");
        if cfg!(target_os = "linux") {
            assert!(me.samples.iter().all(|s| s.rss_kib.is_some_and(|kib| kib > 0)), "{me:?}");
            assert!(me.samples.iter().filter_map(|s| s.cpu_percent).all(|cpu| cpu >= 0.0), "{me:?}");
        }
        let [data] = &resources.dirs[..] else { panic!("{resources:?}") };
        assert_eq!(data.samples.len(), me.samples.len());
        assert!(data.samples.iter().all(|s| s.bytes == 1024), "{data:?}");
        assert!(resources.text().contains("me "), "{}", resources.text());
    }

    #[test]
    fn a_process_that_cannot_be_read_is_sampled_as_gone() {
        let watch = Watch { pids: vec![(String::new(), u32::MAX)], dirs: Vec::new(), interval: Duration::ZERO };
        let mut taker = Taker::new(&watch, Instant::now());
        let line = taker.sample();
        assert!(line.ends_with("gone"), "{line}");
        assert_eq!(taker.resources.processes[0].samples[0].rss_kib, None);
    }

    #[test]
    fn a_sample_too_soon_after_the_previous_has_no_cpu_figure() {
        let watch =
            Watch { pids: vec![(String::new(), std::process::id())], dirs: Vec::new(), interval: Duration::ZERO };
        let start = Instant::now();
        let mut taker = Taker::new(&watch, start);
        taker.sample();
        // Pretend the first sample was taken a second ago: the next one has a figure.
        taker.last[0] = taker.last[0].map(|(_, used)| (start - Duration::from_secs(1), used));
        taker.sample();
        taker.sample();
        let cpu: Vec<Option<f64>> = taker.resources.processes[0].samples.iter().map(|s| s.cpu_percent).collect();
        if cfg!(target_os = "linux") {
            assert!(cpu[1].is_some(), "{cpu:?}");
        }
        assert_eq!((cpu[0], cpu[2]), (None, None), "{cpu:?}");
    }

    #[test]
    fn the_summary_compares_the_first_minute_with_the_end() {
        let samples = [(0.0, 20_000), (60.0, 100 * 1024), (300.0, 160 * 1024), (600.0, 110 * 1024)]
            .map(|(t_s, kib)| ProcessSample { t_s, rss_kib: Some(kib), cpu_percent: Some(50.0) })
            .to_vec();
        let resources = Resources {
            interval_s: 10.0,
            processes: vec![ProcessSeries { name: "orchestrator".into(), pid: 7, samples }],
            dirs: vec![DirSeries {
                name: "data".into(),
                path: "/d".into(),
                samples: vec![DirSample { t_s: 0.0, bytes: 0 }, DirSample { t_s: 600.0, bytes: 3 << 20 }],
            }],
        };
        let text = resources.text();
        assert!(
            text.contains("orchestrator 7: 100.0 MiB at 60s, 110.0 MiB at 600s (+10.0%), peak 160.0 MiB, cpu 50%"),
            "{text}"
        );
        assert!(text.contains("data /d: 0.0 MiB at 0s, 3.0 MiB at 600s, largest 3.0 MiB"), "{text}");
    }
}
