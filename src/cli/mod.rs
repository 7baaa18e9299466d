//! The command line. Each command parses its arguments, calls the library or the
//! running daemon, and prints for humans or as JSON. Nothing here reads on-disk
//! formats.
//!
//! - [`output`]: human lines, JSON, progress bars, exit codes, logging;
//! - [`target`]: where a command goes (a daemon, or the pool opened here);
//! - [`mount`]: mount, unmount, the `mount.fuse.vpool` helper;
//! - [`status`]: status, health, metrics, check, events, jobs;
//! - [`admin`]: scrub, member changes, rebalance, settings;
//! - [`snapshot`]: the snapshot commands; [`export`]: `snapshot export`;
//! - [`transfer`]: send, receive, and backup directories (`send --to`);
//! - [`stream`]: streams without a pool (verify, list, restore);
//! - [`docs`]: shell completions and man pages.

mod admin;
mod docs;
mod export;
mod mount;
pub mod output;
mod snapshot;
mod status;
mod stream;
mod target;
mod transfer;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use output::{EXIT_ERROR, EXIT_USAGE};

#[derive(Parser, Debug)]
#[command(
    name = "vpool",
    version,
    about = "Pool directories or disks into one FUSE filesystem of volume images",
    after_help = "Exit codes: 0 done (pool healthy), 1 error, 2 bad usage, \
                  3 done but the pool is degraded or problems were found."
)]
pub struct Cli {
    /// Say more (repeat for debug logs).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Say only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Answer with one JSON document on stdout (errors too:
    /// {"error":{"code":N,"message":...}}).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

fn size_arg(s: &str) -> Result<u64, String> {
    crate::util::parse_size(s)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A sparse raw image.
    Raw,
    /// qcow2 version 3 (an overlay with --from).
    Qcow2,
    /// Ceph's `rbd diff v1` stream (`rbd import-diff`).
    RbdDiff,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StatusFormat {
    Text,
    Json,
    /// Prometheus text format (node_exporter's textfile collector).
    Prometheus,
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
    /// Mount the pool that member DIR belongs to (silent on success; -v talks).
    Mount {
        /// Stay in the foreground (logs to stderr, or to the journal under
        /// systemd, which hears READY=1 once mounted) instead of detaching.
        #[arg(long)]
        foreground: bool,
        /// Mount options: allow_other, allow_root, ro, noatime, ..., nonempty, threads=N,
        /// odirect=direct|cached, max_request=SIZE (1M-16M, default 4M; raises
        /// fs.fuse.max_pages_limit as root), nowritebackcache, writeback_nice=N (0-19, default 19;
        /// 0: off), writeback_group_nice=N (0-19, default 5; 0: off), snapdir=visible, event_hooks=DIR. fstab's
        /// defaults, nofail, noauto, _netdev and x-* are accepted and ignored.
        #[arg(short = 'o', value_name = "OPTION,...")]
        options: Vec<String>,
        /// Internal: this process is the detached daemon started by `vpool mount`.
        #[arg(long, hide = true)]
        daemon_child: bool,
        /// Internal: the detached daemon's log file.
        #[arg(long, hide = true)]
        log_file: Option<PathBuf>,
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
    /// Show a pool (mountpoint or member directory), or every mounted pool.
    Status {
        /// Only unhealthy pools ("all pools are healthy" otherwise).
        #[arg(short = 'x')]
        unhealthy: bool,
        #[arg(long, value_enum)]
        format: Option<StatusFormat>,
        target: Option<PathBuf>,
    },
    /// Check an unmounted pool for consistency (exit 3 when problems are found).
    Check { dir: PathBuf },
    /// Verify every copy of every block, metadata record and snapshot delta,
    /// repairing from good copies (online; exit 3 when problems remain).
    Scrub {
        /// Stop the scrub running on the pool.
        #[arg(long)]
        stop: bool,
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
    /// Create, list, delete, restore, clone, hold and prune snapshots.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// The pool's event history: member failures, repairs, scrubs,
    /// snapshots, space warnings (all mounted pools without TARGET).
    Events {
        /// Keep printing new events as they come.
        #[arg(short, long)]
        follow: bool,
        target: Option<PathBuf>,
    },
    /// Long jobs running in mounted pools, with progress; `cancel ID` stops one.
    Jobs {
        #[command(subcommand)]
        cmd: Option<JobsCmd>,
        /// A pool (all mounted pools without it).
        target: Option<PathBuf>,
    },
    /// Check, describe and restore send streams, without any pool.
    Stream {
        #[command(subcommand)]
        cmd: StreamCmd,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (vpool.1, vpool-mount.1, ...) into DIR.
    Man { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// Stop job ID (`vpool jobs` lists them); work done so far stays.
    Cancel {
        id: String,
        /// The pool (needed only when several pools run a job with that id).
        target: Option<PathBuf>,
    },
}

fn kind_arg(s: &str) -> Result<crate::snapshot::Kind, String> {
    crate::snapshot::Kind::parse(s)
        .ok_or_else(|| format!("{s}: expected full, incremental or differential"))
}

fn within_arg(s: &str) -> Result<u64, String> {
    crate::snapshot::prune::parse_within(s)
}

/// The IANA name of this machine's time zone, for prune's calendar buckets
/// in the daemon.
fn local_zone() -> Option<String> {
    jiff::tz::TimeZone::system().iana_name().map(str::to_string)
}

/// Keep rules (restic's, in local time) for prune and backup directories.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KeepArgs {
    /// Only snapshots whose name starts with this (e.g. auto-).
    #[arg(long)]
    pub prefix: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_hourly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_monthly: u32,
    #[arg(long, default_value_t = 0)]
    pub keep_yearly: u32,
    /// Keep all made within this long of the newest (36h, 7d, 2w, 6m, 1y).
    #[arg(long, value_parser = within_arg)]
    pub keep_within: Option<u64>,
}

impl KeepArgs {
    pub fn policy(self) -> crate::snapshot::PrunePolicy {
        crate::snapshot::PrunePolicy {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
            keep_monthly: self.keep_monthly,
            keep_yearly: self.keep_yearly,
            keep_within_secs: self.keep_within.unwrap_or(0),
            prefix: self.prefix,
            time_zone: local_zone(),
        }
    }
}

/// Streams need no pool: STREAM is a file, or - for stdin.
#[derive(Subcommand, Debug)]
pub enum StreamCmd {
    /// Read every record and check every checksum (exit 3 when one fails).
    Verify { streams: Vec<PathBuf> },
    /// Describe streams: snapshot, base, identities, sizes.
    List { streams: Vec<PathBuf> },
    /// Rebuild the files of the newest snapshot of a chain (a full stream,
    /// then its incrementals in order) in DEST_DIR, an empty directory.
    Restore {
        /// STREAM... DEST_DIR
        #[arg(value_name = "STREAM... DEST_DIR", num_args = 2..)]
        args: Vec<PathBuf>,
    },
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
        /// Name it PREFIX + the local time (YYYY-MM-DD_HHMMSS) instead of NAME.
        #[arg(long)]
        auto: bool,
        /// The prefix of --auto names.
        #[arg(long, default_value = "auto-", requires = "auto")]
        prefix: String,
        target: PathBuf,
        #[arg(required_unless_present = "auto", conflicts_with = "auto")]
        name: Option<String>,
    },
    /// List snapshots: kind, base, creation time, sizes, changed blocks, state.
    List { target: PathBuf },
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
    /// Write PATH's image as of snapshot NAME to OUT in a format any host
    /// reads: a sparse raw image, a qcow2 (with --from: an overlay of the
    /// clusters changed since BASE over the export of BASE), or the
    /// `rbd diff v1` stream of `rbd import-diff` (OUT `-`: stdout).
    Export {
        /// Only what changed since snapshot BASE (qcow2 overlay, rbd-diff incremental).
        #[arg(long = "from", value_name = "BASE")]
        from: Option<String>,
        #[arg(long, value_enum)]
        format: ExportFormat,
        /// qcow2 overlay: its backing file as the header names it, relative to
        /// OUT's directory (default: OUT's file name with NAME replaced by BASE,
        /// else BASE.qcow2).
        #[arg(long, value_name = "FILE", requires = "from")]
        backing: Option<String>,
        /// Format of the backing file (default: read from the file when it
        /// exists, else qcow2 for a .qcow2 name and raw otherwise).
        #[arg(long, value_parser = ["raw", "qcow2"], requires = "from")]
        backing_format: Option<String>,
        /// A mountpoint, or a member directory of a mounted pool or not.
        target: PathBuf,
        /// The snapshot to export (complete; one being captured is waited for).
        name: String,
        /// The file, inside the pool (vm/disk.img) or under the mountpoint.
        path: PathBuf,
        /// Output file (`-`: stdout, rbd-diff only).
        out: PathBuf,
    },
    /// Keep a snapshot: prune passes over it and delete refuses it.
    Hold { target: PathBuf, name: String },
    /// Undo `hold`.
    Release { target: PathBuf, name: String },
    /// Delete the snapshots the keep rules do not keep (restic's rules, in
    /// local time), of those named with --prefix; held ones always stay.
    Prune {
        target: PathBuf,
        #[command(flatten)]
        keep: KeepArgs,
        /// Only print what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write snapshot NAME as a stream (to stdout, -o FILE, or a backup
    /// directory with --to): all of it, or with --from only what changed
    /// since BASE. `vpool snapshot send --from A pool B | ssh host vpool
    /// snapshot receive pool2` copies it to another machine.
    Send {
        /// Only the blocks changed since this snapshot (the receiver must hold it).
        #[arg(long)]
        from: Option<String>,
        /// Resume an interrupted receive with the token it printed.
        #[arg(long)]
        resume: Option<String>,
        /// Write the stream here (default: stdout).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Keep the stream in this backup directory (base chosen there, files
        /// named by the chain, --keep-* rules applied after).
        #[arg(long, conflicts_with_all = ["output", "resume"])]
        to: Option<PathBuf>,
        #[command(flatten)]
        keep: KeepArgs,
        target: PathBuf,
        name: String,
    },
    /// Read a stream (stdin, or -i FILE) into the pool as a new snapshot,
    /// browsable, restorable and clonable like one taken here.
    Receive {
        /// Name the snapshot this (default: the name it had).
        #[arg(long)]
        name: Option<String>,
        /// Read the stream from this file (default: stdin).
        #[arg(short, long)]
        input: Option<PathBuf>,
        /// Drop what interrupted receives kept for a resume.
        #[arg(long, conflicts_with_all = ["name", "input"])]
        abort: bool,
        target: PathBuf,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    // mount(8) runs `mount.fuse.vpool` (a link to this binary) for fstab
    // lines of type fuse.vpool.
    let argv0 = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if argv0.starts_with("mount.") {
        return mount::helper(&args);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                return 0;
            }
            if args.iter().any(|a| a == "--json") {
                output::set(output::Ui {
                    json: true,
                    ..Default::default()
                });
                output::error(EXIT_USAGE, e.to_string().trim());
                return EXIT_USAGE;
            }
            let _ = e.print();
            return EXIT_USAGE;
        }
    };
    output::set(output::Ui {
        json: cli.json,
        quiet: cli.quiet,
        verbose: cli.verbose,
    });
    if !matches!(cli.command, Command::Mount { .. }) {
        // Like other Unix tools, die quietly when the reader of our output goes
        // away (`vpool status | head`). The daemon keeps SIGPIPE ignored.
        // SAFETY: setting a signal disposition to its default has no preconditions.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
        output::init_cli_logging();
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            output::error(EXIT_ERROR, &format!("{e:#}"));
            EXIT_ERROR
        }
    }
}

fn run(cmd: Command) -> anyhow::Result<i32> {
    match cmd {
        Command::Create {
            copies,
            extent_size,
            block_size,
            dirs,
        } => admin::create(&dirs, copies, extent_size, block_size),
        Command::Mount {
            foreground,
            mut options,
            daemon_child,
            log_file,
            force,
            dir,
            mountpoint,
        } => {
            if force {
                options.push("force".into());
            }
            mount::mount(mount::MountArgs {
                dir: &dir,
                mountpoint: &mountpoint,
                options: &options,
                foreground,
                daemon_child,
                log_file: log_file.as_deref(),
            })
        }
        Command::Unmount { mountpoint } => mount::unmount(&mountpoint),
        Command::Status {
            unhealthy,
            format,
            target,
        } => status::status(target.as_deref(), unhealthy, format),
        Command::Check { dir } => status::check(&dir),
        Command::Scrub { stop, target } => admin::scrub(&target, stop),
        Command::Device { cmd } => admin::device(cmd),
        Command::Rebalance { target } => admin::rebalance(&target),
        Command::Set { target, setting } => admin::set(&target, &setting),
        Command::Snapshot { cmd } => snapshot::run(cmd),
        Command::Stream { cmd } => stream::run(cmd),
        Command::Events { follow, target } => status::events(target.as_deref(), follow),
        Command::Jobs { cmd, target } => match cmd {
            None => status::jobs(target.as_deref()),
            Some(JobsCmd::Cancel { id, target: t }) => {
                status::job_cancel(&id, t.as_deref().or(target.as_deref()))
            }
        },
        Command::Completions { shell } => docs::completions(shell),
        Command::Man { dir } => docs::man(&dir),
    }
}
