//! Shell completions and man pages, generated from the clap definitions so
//! that they never disagree with the commands.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

use super::Cli;
use super::output::say;

pub fn completions(shell: clap_complete::Shell) -> Result<i32> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "vpool", &mut std::io::stdout());
    Ok(0)
}

/// Writes `vpool.1` and one page per subcommand (`vpool-snapshot-create.1`, ...).
pub fn man(dir: &Path) -> Result<i32> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let cmd = Cli::command();
    clap_mangen::generate_to(cmd, dir)
        .with_context(|| format!("cannot write man pages into {}", dir.display()))?;
    say(format!("man pages written to {}", dir.display()));
    Ok(0)
}
