//! `vpool snapshot export`: one file's image as of a snapshot, as a sparse
//! raw image, a qcow2 (an overlay with `--from`) or an `rbd diff v1` stream.
//!
//! The map of the file (what holds data, what changed since the base) comes
//! from the daemon serving a mounted pool (`SnapshotExportMap`), whose bytes
//! are then read through `MOUNT/.snapshots/NAME/PATH`; or, when the pool is
//! not mounted, from the pool opened here. The writers are in
//! `crate::export`. A file output is written to a temporary name beside OUT
//! and renamed when complete.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use super::ExportFormat;
use super::output::{bar, ui};
use super::snapshot::pool_path;
use super::target::{Target, expect_done, offline, resolve, send};
use crate::control::{Request, Response};
use crate::export::{self, ImageMap, ReadAt, Summary};
use crate::fs::snapexport::SnapshotFileReader;
use crate::util::human;

pub struct Args {
    pub from: Option<String>,
    pub format: ExportFormat,
    pub backing: Option<String>,
    pub backing_format: Option<String>,
    pub target: PathBuf,
    pub name: String,
    pub path: PathBuf,
    pub out: PathBuf,
}

/// The `--json` answer.
#[derive(Serialize)]
struct Report<'a> {
    snapshot: &'a str,
    base: Option<&'a str>,
    path: &'a str,
    out: String,
    backing: Option<&'a export::qcow2::Backing>,
    #[serde(flatten)]
    summary: &'a Summary,
}

/// Reads a snapshot's file through the mount (a daemon serves the pool).
struct MountReader(File);

impl ReadAt for MountReader {
    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0.read_exact_at(buf, off)
    }
}

/// The backing file the overlay names when `--backing` is not given: OUT's
/// file name with NAME replaced by BASE (disk-s2.qcow2 -> disk-s1.qcow2),
/// else BASE.qcow2.
fn default_backing(out: &Path, name: &str, base: &str) -> String {
    let file = out
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    match file.rfind(name) {
        Some(i) if !name.is_empty() => {
            format!("{}{base}{}", &file[..i], &file[i + name.len()..])
        }
        _ => format!("{base}.qcow2"),
    }
}

/// The backing file's format: the file's magic when it exists (relative to
/// OUT's directory), else its name's extension.
fn backing_format(out: &Path, backing: &str) -> String {
    let dir = out.parent().unwrap_or(Path::new("."));
    let mut magic = [0u8; 4];
    if let Ok(mut f) = File::open(dir.join(backing))
        && f.read_exact(&mut magic).is_ok()
    {
        return if u32::from_be_bytes(magic) == export::qcow2::MAGIC {
            "qcow2".into()
        } else {
            "raw".into()
        };
    }
    if backing.ends_with(".qcow2") {
        "qcow2".into()
    } else {
        "raw".into()
    }
}

/// Where a file export goes until it is complete.
fn temp_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".vpool-export-{}.tmp", std::process::id()));
    out.with_file_name(name)
}

/// Runs the writer of `args.format` over `map` and `src`.
fn write(
    args: &Args,
    map: &ImageMap,
    src: &mut dyn ReadAt,
    backing: Option<&export::qcow2::Backing>,
) -> Result<Summary> {
    let pb = bar("export", "MiB");
    let mut progress = |done: u64, total: u64| {
        pb.set_length(total >> 20);
        pb.set_position(done >> 20);
    };
    let to_stdout = args.out.as_os_str() == "-";
    let summary = if to_stdout {
        let stdout = std::io::stdout();
        let mut w = BufWriter::with_capacity(export::CHUNK as usize, stdout.lock());
        let s = export::rbd::write(
            map,
            src,
            &mut w,
            args.from.as_deref(),
            &args.name,
            &mut progress,
        )
        .context("writing the rbd diff to stdout")?;
        w.flush().context("writing the rbd diff to stdout")?;
        s
    } else {
        let tmp = temp_path(&args.out);
        let r = (|| -> Result<Summary> {
            let f = File::options()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?;
            let s = match args.format {
                ExportFormat::Raw => export::raw::write(map, src, &f, &mut progress)?,
                ExportFormat::Qcow2 => export::qcow2::write(map, src, &f, backing, &mut progress)?,
                ExportFormat::RbdDiff => {
                    let mut w = BufWriter::with_capacity(export::CHUNK as usize, &f);
                    let s = export::rbd::write(
                        map,
                        src,
                        &mut w,
                        args.from.as_deref(),
                        &args.name,
                        &mut progress,
                    )?;
                    w.flush()?;
                    drop(w);
                    f.sync_all()?;
                    s
                }
            };
            std::fs::rename(&tmp, &args.out)
                .with_context(|| format!("cannot rename to {}", args.out.display()))?;
            if let Some(d) = args.out.parent()
                && let Ok(d) = File::open(if d.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    d
                })
            {
                let _ = d.sync_all();
            }
            Ok(s)
        })();
        if r.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        r.with_context(|| format!("exporting to {}", args.out.display()))?
    };
    pb.finish_and_clear();
    Ok(summary)
}

pub fn run(args: Args) -> Result<i32> {
    let to_stdout = args.out.as_os_str() == "-";
    if to_stdout && args.format != ExportFormat::RbdDiff {
        bail!("raw and qcow2 exports need a file (only rbd-diff goes to stdout)");
    }
    if args.format == ExportFormat::Raw && args.from.is_some() {
        bail!("a raw export is always full: --from needs --format qcow2 or rbd-diff");
    }
    if args.format != ExportFormat::Qcow2 && args.backing.is_some() {
        bail!("--backing is for --format qcow2");
    }
    let t = resolve(&args.target)?;
    let path = pool_path(&t, &args.path)?;
    let base = args.from.as_deref();
    let backing = match (&args.format, base) {
        (ExportFormat::Qcow2, Some(b)) => {
            let name = args
                .backing
                .clone()
                .unwrap_or_else(|| default_backing(&args.out, &args.name, b));
            let format = args
                .backing_format
                .clone()
                .unwrap_or_else(|| backing_format(&args.out, &name));
            Some(export::qcow2::Backing { name, format })
        }
        _ => None,
    };
    let summary = match &t {
        Target::Mounted(mp) => {
            let req = Request::SnapshotExportMap {
                name: args.name.clone(),
                path: path.clone(),
                base: args.from.clone(),
            };
            let Response::ExportMap { map } = expect_done(send(&t, &req, "map", "")?)? else {
                bail!("unexpected answer from the daemon");
            };
            let file = mp.join(".snapshots").join(&args.name).join(&path);
            let f = File::open(&file).with_context(|| format!("cannot open {}", file.display()))?;
            write(&args, &map, &mut MountReader(f), backing.as_ref())?
        }
        Target::Offline(dir) => offline(dir, |vfs| -> Result<Summary> {
            let src = vfs
                .snapshot_export_map(&args.name, &path, base)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let mut reader = SnapshotFileReader {
                vfs,
                snap_id: src.snap_id,
                ino: src.ino,
            };
            write(&args, &src.map, &mut reader, backing.as_ref())
        })??,
    };
    if let (Some(b), Some(base)) = (&backing, base) {
        let dir = args.out.parent().unwrap_or(Path::new("."));
        if !dir.join(&b.name).exists() && !ui().quiet {
            eprintln!(
                "vpool: note: the backing file {} does not exist yet beside {}: export snapshot \
                 {base} there (`vpool snapshot export --format {} TARGET {base} {path} {}`)",
                b.name,
                args.out.display(),
                b.format,
                b.name
            );
        }
    }
    let report = Report {
        snapshot: &args.name,
        base,
        path: &path,
        out: args.out.display().to_string(),
        backing: backing.as_ref(),
        summary: &summary,
    };
    let u = ui();
    // With the stream on stdout, everything else goes to stderr.
    if u.json {
        let s = serde_json::to_string_pretty(&report).unwrap_or_default();
        if to_stdout {
            eprintln!("{s}");
        } else {
            println!("{s}");
        }
    } else if !u.quiet {
        let over = backing
            .as_ref()
            .map(|b| format!(" over {} ({})", b.name, b.format))
            .unwrap_or_default();
        let msg = format!(
            "exported {path} of snapshot {}{} as {}{over} to {}: {} written, {} of data in {:.1} s ({:.0} MiB/s)",
            args.name,
            base.map(|b| format!(" since {b}")).unwrap_or_default(),
            summary.format,
            args.out.display(),
            human(summary.bytes_written),
            human(summary.data_bytes),
            summary.seconds,
            summary.mib_per_s
        );
        if to_stdout {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backing_replaces_the_snapshot_name() {
        let out = Path::new("/b/disk-s2.qcow2");
        assert_eq!(default_backing(out, "s2", "s1"), "disk-s1.qcow2");
        assert_eq!(
            default_backing(Path::new("x.qcow2"), "s2", "s1"),
            "s1.qcow2"
        );
        assert_eq!(backing_format(out, "disk-s1.qcow2"), "qcow2");
        assert_eq!(backing_format(out, "disk-s1.img"), "raw");
    }
}
