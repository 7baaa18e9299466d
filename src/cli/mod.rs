//! The command line. Each command parses its arguments, calls the library or the
//! running daemon, and prints for humans or as JSON. Nothing here reads on-disk
//! formats.

mod commands;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "vpool",
    version,
    about = "Pool directories or disks into one FUSE filesystem of volume images"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

fn size_arg(s: &str) -> Result<u64, String> {
    crate::util::parse_size(s)
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a pool over existing directories, writing a label into each.
    Create {
        /// Copies of every extent, on distinct members.
        #[arg(long, default_value_t = 1)]
        copies: u32,
        /// Size of the unit of placement (power of two, e.g. 64M).
        #[arg(long, value_parser = size_arg, default_value = "64M")]
        extent_size: u64,
        /// Size of the unit of checksums and change tracking (power of two, e.g. 4K).
        #[arg(long, value_parser = size_arg, default_value = "4K")]
        block_size: u64,
        /// Member directories.
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
    },
    /// Mount the pool that member DIR belongs to.
    Mount {
        /// Stay in the foreground (logs to stderr) instead of detaching.
        #[arg(long)]
        foreground: bool,
        /// Mount options: allow_other, allow_root, ro, noatime, ..., nonempty, threads=N,
        /// nowritebackcache.
        #[arg(short = 'o', value_name = "OPTION,...")]
        options: Vec<String>,
        /// Internal: this process is the detached daemon started by `vpool mount`.
        #[arg(long, hide = true)]
        daemon_child: bool,
        dir: PathBuf,
        mountpoint: PathBuf,
    },
    /// Flush everything to the members and unmount.
    Unmount { mountpoint: PathBuf },
    /// Show members, space and files of a pool (mountpoint or member directory).
    Status {
        #[arg(long)]
        json: bool,
        target: PathBuf,
    },
    /// Check an unmounted pool for consistency; exits 0 only when it is consistent.
    Check {
        #[arg(long)]
        json: bool,
        dir: PathBuf,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Mount { .. }) {
        // Like other Unix tools, die quietly when the reader of our output goes
        // away (`vpool status | head`). The daemon keeps SIGPIPE ignored.
        // SAFETY: setting a signal disposition to its default has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match commands::run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpool: error: {e:#}");
            1
        }
    }
}
