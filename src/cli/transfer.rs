//! `vpool snapshot send`, `receive`, and the backup directory of `send --to`.
//!
//! The stream goes through a descriptor: the CLI opens the output (stdout,
//! `-o FILE`) or the input (stdin, `-i FILE`) with its own rights and hands
//! it to the daemon, or to the pool it opens itself when it is not mounted.
//!
//! A backup directory (`send --to DIR`) holds one stream per snapshot,
//! `NNNNNN-NAME.full.vpstream` or `NNNNNN-NAME.from-BASE.vpstream`: the
//! number orders them, the name says what each needs. A send there picks as
//! base the newest snapshot the directory has that the pool still holds,
//! writes to a hidden temporary name, syncs and renames; the `--keep-*`
//! rules then delete streams no kept stream needs (a kept stream keeps its
//! whole chain down to its full).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::output::{json, say, ui};
use super::target::{Target, expect_done, resolve, send, send_fd};
use crate::control::{Request, Response};
use crate::snapshot::prune::{Candidate, PrunePolicy, plan};
use crate::stream::format::{Decoder, Record};
use crate::stream::ident_text;
use crate::util::human;

/// Suffix of a stream file in a backup directory.
pub const STREAM_SUFFIX: &str = ".vpstream";

/// One stream of a backup directory.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Kept {
    pub file: PathBuf,
    pub seq: u64,
    pub name: String,
    pub identity: String,
    pub base: Option<String>,
    pub created: i64,
}

/// The streams in `dir`, by number (their begin records read, nothing more).
pub fn backup_dir_streams(dir: &Path) -> Result<Vec<Kept>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
        let e = e?;
        let fname = e.file_name().to_string_lossy().into_owned();
        if fname.starts_with('.') || !fname.ends_with(STREAM_SUFFIX) {
            continue;
        }
        let Some(seq) = fname.split('-').next().and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        let path = e.path();
        let f = File::open(&path).with_context(|| format!("{}", path.display()))?;
        let mut d = Decoder::new(std::io::BufReader::new(f))
            .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?;
        let Some(Record::Begin(b)) = d
            .next_record()
            .map_err(|m| anyhow::anyhow!("{}: {m}", path.display()))?
        else {
            bail!("{}: no begin record", path.display());
        };
        out.push(Kept {
            file: path,
            seq,
            name: b.name.clone(),
            identity: ident_text(&b.snapshot),
            base: b.incremental.then(|| ident_text(&b.base)),
            created: b.snapshot.secs,
        });
    }
    out.sort_by_key(|k| k.seq);
    Ok(out)
}

fn snapshots(t: &Target) -> Result<Vec<crate::snapshot::SnapshotInfo>> {
    match expect_done(send(t, &Request::SnapshotList, "list", "")?)? {
        Response::Snapshots { list } => Ok(list),
        other => bail!("unexpected answer {other:?}"),
    }
}

pub struct SendArgs {
    pub target: PathBuf,
    pub name: String,
    pub from: Option<String>,
    pub resume: Option<String>,
    pub output: Option<PathBuf>,
    pub to: Option<PathBuf>,
    pub keep: PrunePolicy,
}

pub fn send_cmd(a: SendArgs) -> Result<i32> {
    let t = resolve(&a.target)?;
    if let Some(dir) = &a.to {
        return send_to_dir(&t, &a, dir);
    }
    if a.keep.has_rule() {
        bail!("--keep-* rules apply to a backup directory: give --to DIR");
    }
    let (f, to_stdout) = match &a.output {
        Some(p) if p != Path::new("-") => (
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .with_context(|| format!("cannot write {}", p.display()))?,
            false,
        ),
        _ => {
            use std::io::IsTerminal;
            if std::io::stdout().is_terminal() {
                bail!(
                    "the stream is binary: redirect it (`> FILE`, `| ssh host vpool snapshot receive ...`) or give -o FILE"
                );
            }
            let f = stdout_file()?;
            widen_pipe(&f);
            (f, true)
        }
    };
    let r = run_send(&t, &a.name, a.from.clone(), a.resume.clone(), &f)?;
    report_send(&r, to_stdout);
    Ok(0)
}

/// Widens a pipe to 1 MiB (best effort): the stream then moves in large
/// writes between the two daemons instead of 64 KiB at a time.
fn widen_pipe(f: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor we own; F_SETPIPE_SZ fails harmlessly on
    // anything but a pipe.
    unsafe {
        libc::fcntl(f.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

fn stdout_file() -> Result<File> {
    use std::os::fd::AsFd;
    Ok(File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("stdout")?,
    ))
}

fn run_send(
    t: &Target,
    name: &str,
    from: Option<String>,
    resume: Option<String>,
    f: &File,
) -> Result<crate::snapshot::send::SendReport> {
    let req = Request::SnapshotSend {
        name: name.to_string(),
        base: from,
        resume,
    };
    match expect_done(send_fd(t, &req, f, "send", "blocks")?)? {
        Response::Sent(r) => Ok(r),
        other => bail!("unexpected answer {other:?}"),
    }
}

/// The summary; on stderr when the stream went to stdout.
fn report_send(r: &crate::snapshot::send::SendReport, to_stdout: bool) {
    let line = format!(
        "sent {}{}: {} file(s), {} block(s) ({} of data), {} in {:.1} s ({}/s)",
        r.snapshot,
        r.base
            .as_ref()
            .map(|b| format!(" from {b}"))
            .unwrap_or_default(),
        r.files,
        r.blocks,
        r.data_blocks,
        human(r.bytes),
        r.seconds,
        human((r.bytes as f64 / r.seconds.max(1e-3)) as u64)
    );
    if ui().json {
        if to_stdout {
            if let Ok(s) = serde_json::to_string(r) {
                eprintln!("{s}");
            }
        } else {
            json(r);
        }
    } else if !ui().quiet {
        if to_stdout {
            eprintln!("{line}");
        } else {
            say(line);
        }
    }
}

fn send_to_dir(t: &Target, a: &SendArgs, dir: &Path) -> Result<i32> {
    if a.output.is_some() || a.resume.is_some() {
        bail!("--to DIR names its files itself: no -o or --resume with it");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let kept = backup_dir_streams(dir)?;
    let snaps = snapshots(t)?;
    let me = snaps
        .iter()
        .find(|s| s.name == a.name && s.state == "complete")
        .with_context(|| format!("no complete snapshot named {}", a.name))?;
    let in_dir: BTreeSet<&str> = kept.iter().map(|k| k.identity.as_str()).collect();
    if in_dir.contains(me.identity.as_str()) {
        say(format!("{} is in {} already", a.name, dir.display()));
        return Ok(0);
    }
    // The base: --from, or the newest snapshot older than this one that
    // the directory has and the pool still holds.
    let base = match &a.from {
        Some(b) => {
            let bi = snaps
                .iter()
                .find(|s| &s.name == b)
                .with_context(|| format!("no snapshot named {b}"))?;
            if !in_dir.contains(bi.identity.as_str()) {
                bail!(
                    "{} has no stream of {b}: an incremental from it could not be restored from there",
                    dir.display()
                );
            }
            Some(b.clone())
        }
        None => kept
            .iter()
            .rev()
            .filter_map(|k| snaps.iter().find(|s| s.identity == k.identity))
            .find(|s| s.id < me.id && s.state == "complete")
            .map(|s| s.name.clone()),
    };
    let seq = kept.last().map_or(1, |k| k.seq + 1);
    let fname = match &base {
        Some(b) => format!("{seq:06}-{}.from-{b}{STREAM_SUFFIX}", a.name),
        None => format!("{seq:06}-{}.full{STREAM_SUFFIX}", a.name),
    };
    let tmp = dir.join(format!(".{fname}.tmp"));
    let dest = dir.join(&fname);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let r = match run_send(t, &a.name, base, None, &f) {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &dest).with_context(|| format!("{}", dest.display()))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    report_send(&r, false);
    say(format!("kept as {}", dest.display()));
    if a.keep.has_rule() {
        let removed = retain(dir, &a.keep)?;
        for f in &removed {
            say(format!("removed {}", f.display()));
        }
    }
    Ok(0)
}

/// Applies the keep rules to the streams of `dir`: a stream goes only when
/// no rule keeps it and no kept stream is based on it (directly or through
/// others). Returns the files removed.
pub fn retain(dir: &Path, keep: &PrunePolicy) -> Result<Vec<PathBuf>> {
    let kept = backup_dir_streams(dir)?;
    let cands: Vec<Candidate> = kept
        .iter()
        .map(|k| Candidate {
            id: k.seq,
            name: k.name.clone(),
            created: k.created,
            complete: true,
            pending: false,
            held: false,
        })
        .collect();
    let decisions = plan(&cands, keep);
    let by_ident: BTreeMap<&str, &Kept> = kept.iter().map(|k| (k.identity.as_str(), k)).collect();
    let mut keep_set: BTreeSet<u64> = decisions.iter().filter(|d| d.keep).map(|d| d.id).collect();
    // Streams outside the prefix get no verdict: they stay.
    let judged: BTreeSet<u64> = decisions.iter().map(|d| d.id).collect();
    keep_set.extend(
        kept.iter()
            .filter(|k| !judged.contains(&k.seq))
            .map(|k| k.seq),
    );
    // The newest stream always stays: the next send builds on it.
    if let Some(k) = kept.last() {
        keep_set.insert(k.seq);
    }
    // Every base a kept stream needs, down to its full.
    let mut stack: Vec<u64> = keep_set.iter().copied().collect();
    while let Some(seq) = stack.pop() {
        let Some(k) = kept.iter().find(|k| k.seq == seq) else {
            continue;
        };
        if let Some(b) = k.base.as_deref().and_then(|b| by_ident.get(b))
            && keep_set.insert(b.seq)
        {
            stack.push(b.seq);
        }
    }
    let mut removed = Vec::new();
    for k in &kept {
        if !keep_set.contains(&k.seq) {
            std::fs::remove_file(&k.file).with_context(|| format!("{}", k.file.display()))?;
            removed.push(k.file.clone());
        }
    }
    Ok(removed)
}

pub fn receive_cmd(
    target: PathBuf,
    name: Option<String>,
    input: Option<PathBuf>,
    abort: bool,
) -> Result<i32> {
    let t = resolve(&target)?;
    if abort {
        return match expect_done(send(&t, &Request::ReceiveAbort, "abort", "")?)? {
            Response::Removed { count } => {
                json(&serde_json::json!({ "removed": count }));
                say(format!("{count} interrupted receive(s) dropped"));
                Ok(0)
            }
            other => bail!("unexpected answer {other:?}"),
        };
    }
    let (f, total) = match &input {
        Some(p) if p != Path::new("-") => {
            let f = File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            (f, len)
        }
        _ => {
            use std::io::IsTerminal;
            use std::os::fd::AsFd;
            if std::io::stdin().is_terminal() {
                bail!(
                    "give the stream on stdin (`< FILE`, `ssh host vpool snapshot send ... |`) or with -i FILE"
                );
            }
            let f = File::from(
                std::io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("stdin")?,
            );
            widen_pipe(&f);
            (f, 0)
        }
    };
    let t0 = std::time::Instant::now();
    let req = Request::SnapshotReceive { name, total };
    match send_fd(&t, &req, &f, "receive", "bytes")? {
        Response::Snapshot(i) => {
            let secs = t0.elapsed().as_secs_f64();
            json(&serde_json::json!({ "snapshot": i, "seconds": secs }));
            say(format!(
                "received {} ({}{}): {} block(s), {} stored, in {secs:.1} s",
                i.name,
                i.kind,
                i.base
                    .as_ref()
                    .map(|b| format!(", base {b}"))
                    .unwrap_or_default(),
                i.changed_blocks,
                human(i.stored_bytes)
            ));
            Ok(0)
        }
        Response::ReceiveFailed { message, token } => {
            if ui().json {
                let v = serde_json::json!({ "error": { "code": 1, "message": message, "resume_token": token } });
                println!("{v}");
            } else {
                eprintln!("vpool: error: {message}");
                if let Some(tok) = &token {
                    eprintln!(
                        "vpool: what arrived is kept; resume with: vpool snapshot send --resume {tok} ... | vpool snapshot receive {}",
                        target.display()
                    );
                }
            }
            let _ = std::io::stderr().flush();
            Ok(super::output::EXIT_ERROR)
        }
        other => {
            expect_done(other)?;
            Ok(0)
        }
    }
}
