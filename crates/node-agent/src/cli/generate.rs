//! `completions <shell>` and `man`: shell completion scripts and roff man pages,
//! generated from the clap definitions of the binary, so they never drift from the
//! options the binary accepts.
//!
//! The caller (`main.rs`) hands in its `clap::Command`; this module only renders it. It
//! must not talk to the daemon or read the config.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
pub use clap_complete::Shell;

/// Writes the completion script for `shell` to `out`.
pub fn completions(mut cmd: clap::Command, shell: Shell, out: &mut dyn Write) {
    let name = cmd.get_name().to_string();
    clap_complete::generate(shell, &mut cmd, name, out);
}

/// Writes the man page of the whole command (section 1) to `out`.
pub fn man(cmd: clap::Command, out: &mut dyn Write) -> anyhow::Result<()> {
    clap_mangen::Man::new(cmd)
        .render(out)
        .context("cannot write the man page")
}

/// Writes one man page per command and subcommand (`plfm-node-agent.1`,
/// `plfm-node-agent-status.1`, …) into `dir` (created if missing); returns the files.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "1"))
        .collect();
    files.sort();
    Ok(files)
}
