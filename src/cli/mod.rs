//! The command line. Each command parses its arguments, calls the library or the
//! running daemon, and prints for humans or as JSON. Nothing here reads on-disk
//! formats.

mod admin;
mod commands;
mod snapshot;

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
        /// Mount even when members diverged (each took writes while the other
        /// was missing): the newest metadata copy wins, and extent files only
        /// the other side references are moved to DIR/quarantine/.
        #[arg(long)]
        force: bool,
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
    /// Verify every copy of every block, metadata record and snapshot delta,
    /// repairing from good copies (online; exits 1 when problems remain).
    Scrub {
        #[arg(long)]
        json: bool,
        target: PathBuf,
    },
    /// Add, remove or replace a member while the pool stays in use.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Move extents so that every member stores about the same (online).
    Rebalance { target: PathBuf },
    /// Change a pool setting: `copies=N` (re-replicates or trims online).
    Set { target: PathBuf, setting: String },
    /// Create, list, delete, restore, clone and prune snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
}

fn kind_arg(s: &str) -> Result<crate::snapshot::Kind, String> {
    crate::snapshot::Kind::parse(s)
        .ok_or_else(|| format!("{s}: expected full, incremental or differential"))
}

/// TARGET is a mountpoint or a member directory (of a mounted pool or not).
#[derive(Subcommand, Debug)]
pub enum DeviceCmd {
    /// Make DIR a member: capacity grows at once, new extents use it.
    Add { target: PathBuf, dir: PathBuf },
    /// Move everything off member DIR, then take it out of the pool.
    Remove { target: PathBuf, dir: PathBuf },
    /// Rebuild member OLD's data onto NEW (OLD may be gone), then retire OLD.
    Replace {
        target: PathBuf,
        old: PathBuf,
        new: PathBuf,
    },
}

/// TARGET is a mountpoint or a member directory (of a mounted pool or not).
#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a snapshot of the whole pool (browsable at TARGET/.snapshots/NAME).
    Create {
        /// full, incremental or differential (default: full when the pool has no
        /// full snapshot yet, otherwise incremental).
        #[arg(long, value_parser = kind_arg)]
        kind: Option<crate::snapshot::Kind>,
        /// Return only once the snapshot's data is fully captured.
        #[arg(long)]
        wait: bool,
        /// zstd compression level of the deltas, 1 (fastest, default) to 19.
        #[arg(long)]
        level: Option<i32>,
        target: PathBuf,
        name: String,
    },
    /// List snapshots: kind, base, creation time, sizes, changed blocks, state.
    List {
        #[arg(long)]
        json: bool,
        target: PathBuf,
    },
    /// Delete a snapshot; every other one stays readable and unchanged.
    Delete { target: PathBuf, name: String },
    /// Roll files (all of them when no PATH is given) back to their content in
    /// the snapshot. PATH is a path inside the pool (vms/disk.img) or under the
    /// mountpoint.
    Restore {
        target: PathBuf,
        name: String,
        paths: Vec<PathBuf>,
    },
    /// Make NEWPATH a new writable file with PATH's content in the snapshot.
    Clone {
        target: PathBuf,
        name: String,
        path: PathBuf,
        newpath: PathBuf,
    },
    /// Delete the snapshots the keep rules do not keep (restic's rules).
    Prune {
        target: PathBuf,
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        #[arg(long, default_value_t = 0)]
        keep_hourly: u32,
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        #[arg(long, default_value_t = 0)]
        keep_monthly: u32,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
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
