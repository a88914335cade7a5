//! Progress of long tasks (loading a model's tensors): a bar per task on a terminal, and on
//! anything else (a file, a pipe, a log collector) one log line per tenth of the work.

use std::io::IsTerminal;

/// A set of tasks reported together.
pub struct Progress {
    bars: Option<indicatif::MultiProgress>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Progress {
    /// Bars when stderr is a terminal, log lines otherwise.
    pub fn new() -> Self {
        Progress {
            bars: std::io::stderr()
                .is_terminal()
                .then(indicatif::MultiProgress::new),
        }
    }

    /// Whether progress is drawn as bars (on a terminal).
    pub fn draws_bars(&self) -> bool {
        self.bars.is_some()
    }

    /// A task, shown as `label`.
    pub fn task(&self, label: impl Into<String>) -> ProgressTask {
        let label = label.into();
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(indicatif::ProgressBar::new(0));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>10} [{bar:40}] {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(label.clone());
            bar
        });
        ProgressTask {
            label,
            bar,
            last_decile: None,
        }
    }
}

/// One task's progress.
pub struct ProgressTask {
    label: String,
    bar: Option<indicatif::ProgressBar>,
    last_decile: Option<usize>,
}

impl ProgressTask {
    /// `done` of `total` items, the last one being `item`.
    pub fn update(&mut self, done: usize, total: usize, item: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                bar.set_message(item.to_string());
            }
            None => {
                let decile = done * 10 / total.max(1);
                if self.last_decile != Some(decile) {
                    self.last_decile = Some(decile);
                    tracing::info!(task = %self.label, done, total, item, "loading");
                }
            }
        }
    }
}

impl Drop for ProgressTask {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
