//! Operator commands `plfm-node-agent image pull|ls|gc` (like `crictl pull`).
//!
//! They open the cache directly, so they work whether or not the daemon runs: the
//! state store and the per-digest locks arbitrate. `main.rs` parses the arguments
//! and calls [`run_cli`]; output goes to stdout.

use std::path::Path;
use std::sync::Arc;

use crate::cli::human;

use super::{ImageConfig, ImageRef, ImageService};

/// `plfm-node-agent image …`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum ImageCommand {
    /// Pull an image by digest and build its root disk; prints the disk path and
    /// timings.
    ///
    /// Progress goes to stderr: bars on a terminal, else one line per layer and
    /// stage as each completes.
    Pull {
        /// `host[:port]/repository@sha256:…` (a tag alone is refused).
        reference: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// No progress display.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List cached root disks with size, last use and references.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Evict every root disk that no instance references.
    Gc {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one image command against the cache under `data_dir`.
pub async fn run_cli(
    cmd: ImageCommand,
    data_dir: &Path,
    config: ImageConfig,
) -> anyhow::Result<()> {
    let svc = ImageService::open(data_dir, config)?;
    match cmd {
        ImageCommand::Pull {
            reference,
            json,
            quiet,
        } => {
            use std::io::IsTerminal;

            use crate::cli::pull_progress::{Mode, Viewer};
            let image = ImageRef::parse_pinned(&reference)?;
            let mode = match (quiet, std::io::stderr().is_terminal()) {
                (true, _) => Mode::Quiet,
                (false, true) => Mode::Bars,
                (false, false) => Mode::Lines,
            };
            let progress = Arc::new(super::progress::PullProgress::new());
            let viewer = Viewer::start(progress.clone(), mode);
            let result = svc.ensure_with_progress(&image, Some(progress)).await;
            viewer.finish().await;
            let (disk, t) = result?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "path": disk.path,
                        "digest": disk.digest.to_string(),
                        "size_bytes": disk.size_bytes,
                        "cache_hit": t.cache_hit,
                        "pull_ms": t.pull.as_millis() as u64,
                        "unpack_ms": t.unpack.as_millis() as u64,
                        "mkfs_ms": t.mkfs.as_millis() as u64,
                        "total_ms": t.total.as_millis() as u64,
                        "downloaded_bytes": t.downloaded_bytes,
                        "config": disk.config,
                    })
                );
            } else {
                println!("{}", disk.path.display());
                if t.cache_hit {
                    println!("cached: {}", human::duration(t.total));
                } else {
                    println!(
                        "downloaded {} in {}; {} layer disk(s) built at once (unpacking {}, \
                         file systems {}, summed), {} reused; total {}",
                        human::bytes(t.downloaded_bytes),
                        human::duration(t.pull),
                        t.layers_built,
                        human::duration(t.unpack),
                        human::duration(t.mkfs),
                        t.layers_reused,
                        human::duration(t.total)
                    );
                }
            }
        }
        ImageCommand::Ls { json } => {
            let rows = svc.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<22} {:>10} {:>10} {:>5}  {:<20}  SOURCE",
                    "DIGEST", "SIZE", "ON DISK", "REFS", "LAST USED"
                );
                for r in rows {
                    let last = chrono::DateTime::from_timestamp_millis(r.last_used_ms)
                        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_default();
                    println!(
                        "{:<22} {:>10} {:>10} {:>5}  {:<20}  {}",
                        super::error::short(&r.digest),
                        human::bytes(r.size_bytes),
                        human::bytes(r.allocated_bytes),
                        r.refs,
                        last,
                        r.source
                    );
                }
            }
        }
        ImageCommand::Gc { json } => {
            let report = svc.gc_unreferenced()?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "evicted": report.evicted, "freed_bytes": report.freed_bytes })
                );
                return Ok(());
            }
            println!(
                "evicted {} disk(s), freed {}",
                report.evicted.len(),
                human::bytes(report.freed_bytes)
            );
            for d in report.evicted {
                println!("  {d}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: ImageCommand,
    }

    #[test]
    fn subcommands_parse() {
        let c = Cli::parse_from(["x", "ls", "--json"]);
        assert_eq!(c.cmd, ImageCommand::Ls { json: true });
        let c = Cli::parse_from(["x", "pull", "127.0.0.1:5000/app@sha256:00"]);
        assert!(matches!(c.cmd, ImageCommand::Pull { .. }));
        assert_eq!(
            Cli::parse_from(["x", "gc"]).cmd,
            ImageCommand::Gc { json: false }
        );
    }
}
