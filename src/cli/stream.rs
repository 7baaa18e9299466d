//! `vpool stream verify|list|restore`: streams on their own, no pool needed.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::StreamCmd;
use super::output::{json, local_time, rate_bar, say, ui};
use crate::stream;
use crate::util::human;

fn open(p: &Path) -> Result<(String, Box<dyn Read>, u64)> {
    if p == Path::new("-") {
        return Ok(("stdin".into(), Box::new(std::io::stdin()), 0));
    }
    let f = std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((p.display().to_string(), Box::new(f), len))
}

pub fn run(cmd: StreamCmd) -> Result<i32> {
    match cmd {
        StreamCmd::Verify { streams } | StreamCmd::List { streams } if streams.is_empty() => {
            bail!("give at least one stream")
        }
        StreamCmd::Verify { streams } => {
            let mut bad = 0;
            let mut out = Vec::new();
            for p in &streams {
                let (label, r, _) = open(p)?;
                match stream::verify(r) {
                    Ok(s) => {
                        say(format!(
                            "{label}: ok ({} {}, {} of data)",
                            s.kind,
                            s.name,
                            human(s.data_blocks * u64::from(s.block_size))
                        ));
                        out.push(serde_json::json!({ "stream": label, "ok": true, "summary": s }));
                    }
                    Err(e) => {
                        bad += 1;
                        if !ui().json {
                            eprintln!("vpool: {label}: {e}");
                        }
                        out.push(serde_json::json!({ "stream": label, "ok": false, "error": e }));
                    }
                }
            }
            json(&out);
            Ok(if bad > 0 {
                super::output::EXIT_PROBLEMS
            } else {
                0
            })
        }
        StreamCmd::List { streams } => {
            let mut out = Vec::new();
            for p in &streams {
                let (label, r, _) = open(p)?;
                let s = stream::verify(r).map_err(|e| anyhow::anyhow!("{label}: {e}"))?;
                say(format!(
                    "{label}\n  snapshot  {} ({})\n  identity  {}\n  base      {}\n  created   {}\n  inodes    {}, {} file(s) with data\n  size      {} logical; {} data, {} zero, {} hole block(s) of {} bytes\n  stream    {}",
                    s.name,
                    s.kind,
                    s.snapshot,
                    s.base.clone().unwrap_or_else(|| "-".into()),
                    local_time(s.created, true),
                    s.inodes,
                    s.files_with_data,
                    human(s.logical_bytes),
                    s.data_blocks,
                    s.zero_blocks,
                    s.hole_blocks,
                    s.block_size,
                    human(s.bytes)
                ));
                out.push(serde_json::json!({ "stream": label, "summary": s }));
            }
            json(&out);
            Ok(0)
        }
        StreamCmd::Restore { args } => {
            let Some((dest, streams)) = args.split_last() else {
                bail!("give the streams, then the destination directory");
            };
            if streams.is_empty() {
                bail!(
                    "give the streams (a full, then its incrementals in order), then the destination directory"
                );
            }
            restore(streams, dest)
        }
    }
}

fn restore(streams: &[PathBuf], dest: &Path) -> Result<i32> {
    let mut inputs = Vec::new();
    let mut total = 0;
    for p in streams {
        let (label, r, len) = open(p)?;
        total += len;
        inputs.push((label, r));
    }
    let pb = rate_bar("restore", "bytes");
    pb.set_length(total);
    let s = stream::restore::restore(&mut inputs, dest, &mut |n| pb.set_position(n))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    pb.finish_and_clear();
    json(&s);
    say(format!(
        "restored {} into {}: {} file(s), {} dir(s), {} symlink(s); {} of data from {} in {:.1} s ({}/s)",
        s.snapshot,
        dest.display(),
        s.files,
        s.directories,
        s.symlinks,
        human(s.data_bytes),
        human(s.stream_bytes),
        s.seconds,
        human((s.stream_bytes as f64 / s.seconds.max(1e-3)) as u64)
    ));
    for n in &s.notes {
        if !ui().quiet && !ui().json {
            eprintln!("vpool: note: {n}");
        }
    }
    Ok(0)
}
