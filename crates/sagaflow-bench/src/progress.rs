//! Progress while a run goes: a bar on a terminal, plain periodic lines otherwise (logs, CI).

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::load::Counters;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Display {
    /// Not at all.
    Quiet,
    /// A bar, redrawn in place (stderr is a terminal).
    Bar,
    /// A line on stderr every this often.
    Lines(Duration),
}

impl Display {
    /// A bar on a terminal, else lines every `interval`; nothing when `quiet`.
    pub(crate) fn choose(quiet: bool, interval: Duration) -> Self {
        if quiet {
            Self::Quiet
        } else if std::io::stderr().is_terminal() {
            Self::Bar
        } else {
            Self::Lines(interval)
        }
    }
}

/// The running display; [`Progress::finish`] removes it.
#[derive(Debug)]
pub(crate) struct Progress {
    task: Option<JoinHandle<()>>,
    bar: Option<ProgressBar>,
}

/// The counts as one line of text.
pub(crate) fn status(counters: &Counters) -> String {
    let (sent, done, ok, unsent) = counters.read();
    format!(
        "sent {sent}, done {done}, ok {ok}, failed {}, in flight {}, unsent {unsent}",
        done - ok.min(done),
        sent.saturating_sub(done)
    )
}

impl Progress {
    /// Shows the progress of a run named `label` that sends for `duration`.
    pub(crate) fn start(display: Display, label: String, duration: Duration, counters: Arc<Counters>) -> Self {
        let start = Instant::now();
        match display {
            Display::Quiet => Self { task: None, bar: None },
            Display::Bar => {
                let bar = ProgressBar::new(duration.as_millis().max(1) as u64);
                let style = ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {percent:>3}% {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.set_prefix(label);
                let shown = bar.clone();
                let task = tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(200));
                    loop {
                        tick.tick().await;
                        let elapsed = start.elapsed();
                        shown.set_position(elapsed.as_millis().min(duration.as_millis()) as u64);
                        let phase = if elapsed >= duration { "waiting: " } else { "" };
                        shown.set_message(format!("{phase}{}", status(&counters)));
                    }
                });
                Self { task: Some(task), bar: Some(bar) }
            }
            Display::Lines(every) => {
                let task = tokio::spawn(async move {
                    let mut tick = tokio::time::interval_at(start + every, every);
                    loop {
                        tick.tick().await;
                        eprintln!("[{label}] {:.0}s: {}", start.elapsed().as_secs_f64(), status(&counters));
                    }
                });
                Self { task: Some(task), bar: None }
            }
        }
    }

    /// Where lines printed during the run go: above the bar, on stderr, or nowhere.
    pub(crate) fn printer(&self, display: Display) -> crate::resources::Printer {
        match (&self.bar, display) {
            (Some(bar), _) => crate::resources::Printer::Bar(bar.clone()),
            (None, Display::Quiet) => crate::resources::Printer::Quiet,
            (None, _) => crate::resources::Printer::Stderr,
        }
    }

    /// Stops and clears the display.
    pub(crate) fn finish(self) {
        if let Some(task) = self.task {
            task.abort();
        }
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_status_line_derives_failures_and_in_flight() {
        let counters = Counters::default();
        counters.sent.store(10, Ordering::Relaxed);
        counters.done.store(7, Ordering::Relaxed);
        counters.ok.store(6, Ordering::Relaxed);
        counters.unsent.store(2, Ordering::Relaxed);
        assert_eq!(status(&counters), "sent 10, done 7, ok 6, failed 1, in flight 3, unsent 2");
    }
}
