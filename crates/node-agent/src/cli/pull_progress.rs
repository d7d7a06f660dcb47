//! The progress display of `image pull`: progress bars (bytes per layer, then unpack,
//! then mkfs) when stderr is a terminal, else one plain line per layer and stage as
//! each completes. Written to stderr, so stdout keeps only the result (the disk path,
//! or the JSON) for scripts.
//!
//! It reads a [`PullProgress`] the pipeline updates (atomics, polled every 100 ms) and
//! must not touch the pipeline otherwise.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::human;
use crate::image::progress::{PullProgress, Stage};

/// How the progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Progress bars (a terminal).
    Bars,
    /// One line per completed layer and stage.
    Lines,
    /// Nothing.
    Quiet,
}

/// A running display; [`Viewer::finish`] shows the last state and stops it.
pub struct Viewer {
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Viewer {
    /// Starts showing `progress` in `mode`.
    pub fn start(progress: Arc<PullProgress>, mode: Mode) -> Viewer {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            let mut view: Box<dyn View + Send> = match mode {
                Mode::Bars => Box::new(Bars::new()),
                Mode::Lines => Box::new(Lines::new(std::io::stderr())),
                Mode::Quiet => return,
            };
            loop {
                view.update(&progress);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped.changed() => {
                        view.update(&progress);
                        view.finish();
                        return;
                    }
                }
            }
        });
        Viewer { stop, task }
    }

    /// Shows the final state and waits for the display to stop.
    pub async fn finish(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

trait View {
    fn update(&mut self, p: &PullProgress);
    fn finish(&mut self) {}
}

/// Plain lines: each layer and stage once, when seen complete, in the order seen.
pub struct Lines<W: Write> {
    out: W,
    announced: bool,
    layers_done: Vec<bool>,
    unpacking: bool,
    unpacked: Vec<bool>,
    mkfs: bool,
    done: bool,
}

impl<W: Write> Lines<W> {
    /// Lines written to `out`.
    pub fn new(out: W) -> Lines<W> {
        Lines {
            out,
            announced: false,
            layers_done: Vec::new(),
            unpacking: false,
            unpacked: Vec::new(),
            mkfs: false,
            done: false,
        }
    }

    /// Writes the lines for what changed since the last call.
    pub fn update(&mut self, p: &PullProgress) {
        let stage = p.stage();
        let layers = p.layers();
        let n = layers.len();
        let mut lines = Vec::new();
        if p.cache_hit() && !self.done {
            self.done = true;
            let _ = writeln!(self.out, "root disk found in the cache");
            return;
        }
        if !self.announced && n > 0 {
            self.announced = true;
            self.layers_done = vec![false; n];
            self.unpacked = vec![false; n];
            let total: u64 = layers.iter().map(|l| l.size).sum();
            lines.push(format!("pulling {n} layer(s), {}", human::bytes(total)));
        }
        for (i, l) in layers.iter().enumerate() {
            if l.is_done() && !self.layers_done[i] {
                self.layers_done[i] = true;
                if l.was_cached() {
                    lines.push(format!(
                        "layer {}/{n} {}: already downloaded ({})",
                        i + 1,
                        l.digest,
                        human::bytes(l.size)
                    ));
                } else {
                    lines.push(format!(
                        "layer {}/{n} {}: downloaded {}",
                        i + 1,
                        l.digest,
                        human::bytes(l.downloaded())
                    ));
                }
            }
        }
        if stage >= Stage::Unpacking && !self.unpacking {
            self.unpacking = true;
            lines.push(format!("unpacking {n} layer(s)"));
        }
        // Layers unpack in parallel: each is told when its own unpack is done.
        for (i, l) in layers.iter().enumerate() {
            if l.is_unpacked() && !self.unpacked[i] {
                self.unpacked[i] = true;
                lines.push(format!("unpacked layer {}/{n} {}", i + 1, l.digest));
            }
        }
        if stage >= Stage::Mkfs && !self.mkfs {
            self.mkfs = true;
            lines.push("building the ext4 root disk (mkfs)".into());
        }
        if stage >= Stage::Done && !self.done {
            self.done = true;
            lines.push("root disk built".into());
        }
        for l in lines {
            let _ = writeln!(self.out, "{l}");
        }
        let _ = self.out.flush();
    }
}

impl<W: Write> View for Lines<W> {
    fn update(&mut self, p: &PullProgress) {
        Lines::update(self, p)
    }
}

/// Progress bars: one per layer (bytes), one for the stage.
struct Bars {
    multi: MultiProgress,
    stage: ProgressBar,
    layers: Vec<ProgressBar>,
}

impl Bars {
    fn new() -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let stage = multi.add(ProgressBar::new_spinner());
        stage.set_message("resolving the manifest");
        Bars {
            multi,
            stage,
            layers: Vec::new(),
        }
    }
}

impl View for Bars {
    fn update(&mut self, p: &PullProgress) {
        let layers = p.layers();
        if self.layers.is_empty() && !layers.is_empty() {
            let style = ProgressStyle::with_template(
                "{prefix:>14} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            for l in layers {
                let bar = self.multi.insert_before(
                    &self.stage,
                    ProgressBar::new(l.size).with_style(style.clone()),
                );
                bar.set_prefix(l.digest.chars().take(14).collect::<String>());
                self.layers.push(bar);
            }
        }
        for (bar, l) in self.layers.iter().zip(layers) {
            if bar.is_finished() {
                continue;
            }
            bar.set_position(l.downloaded().min(l.size));
            if l.is_done() {
                bar.set_position(l.size);
                bar.finish_with_message(if l.was_cached() { "cached" } else { "done" });
            }
        }
        let n = layers.len();
        let msg = match p.stage() {
            Stage::Resolving => "resolving the manifest".to_string(),
            Stage::Downloading => "downloading layers".to_string(),
            Stage::Unpacking => format!("unpacking layers ({}/{n})", p.unpacked()),
            Stage::Mkfs => "building the ext4 root disk (mkfs)".to_string(),
            Stage::Done if p.cache_hit() => "root disk found in the cache".to_string(),
            Stage::Done => "root disk built".to_string(),
        };
        self.stage.set_message(msg);
        self.stage.tick();
    }

    fn finish(&mut self) {
        for b in &self.layers {
            if !b.is_finished() {
                b.abandon();
            }
        }
        self.stage.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_name_each_layer_and_stage_once_in_order() {
        let p = PullProgress::new();
        let mut out = Vec::new();
        {
            let mut lines = Lines::new(&mut out);
            lines.update(&p);
            p.set_layers([
                ("sha256:aa".to_string(), 2048),
                ("sha256:bb".to_string(), 10),
            ]);
            p.received(0, 2048);
            p.layer_done(0, false);
            lines.update(&p);
            lines.update(&p);
            // Several steps between two polls are all still told, in order.
            p.layer_done(1, true);
            p.advance(Stage::Unpacking);
            p.layer_unpacked(0);
            p.layer_unpacked(1);
            p.advance(Stage::Mkfs);
            p.advance(Stage::Done);
            lines.update(&p);
            lines.update(&p);
        }
        let text = String::from_utf8(out).expect("utf-8");
        let want = [
            "pulling 2 layer(s), 2.0 KiB",
            "layer 1/2 sha256:aa: downloaded 2.0 KiB",
            "layer 2/2 sha256:bb: already downloaded (10 B)",
            "unpacking 2 layer(s)",
            "unpacked layer 1/2 sha256:aa",
            "unpacked layer 2/2 sha256:bb",
            "building the ext4 root disk (mkfs)",
            "root disk built",
        ];
        assert_eq!(text.lines().collect::<Vec<_>>(), want, "{text}");
    }
}
