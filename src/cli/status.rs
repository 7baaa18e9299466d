//! `vpool status` (one pool, every mounted pool, `-x`, Prometheus metrics),
//! `vpool check`, `vpool events` and `vpool jobs`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::StatusFormat;
use super::output::{EXIT_PROBLEMS, json, local_time, say, ui};
use super::target::{Named, Target, mounted_pools, name_target, resolve};
use crate::control::{self, Request, Response};
use crate::pool::PoolStatus;
use crate::pool::info::Event;
use crate::pool::inspect;
use crate::util::human;

fn ask_status(mp: &Path) -> Result<PoolStatus> {
    match control::request(mp, &Request::Status)
        .with_context(|| format!("no vpool daemon answers for {}", mp.display()))?
    {
        Response::Status(st) => Ok(*st),
        Response::Error { message } => bail!("daemon: {message}"),
        _ => bail!("daemon gave no status"),
    }
}

/// TARGET's status: from its daemon, or read here for a member directory
/// whose daemon is gone or does not answer (a stale lock).
fn status_of(target: &Path) -> Result<PoolStatus> {
    match name_target(target)? {
        Named::Mountpoint(mp) => ask_status(&mp),
        Named::Member { dir, daemon } => {
            if let Some(mp) = daemon
                && let Ok(st) = ask_status(&mp)
            {
                return Ok(st);
            }
            Ok(inspect::offline_status(&dir)?)
        }
    }
}

/// The statuses asked for: TARGET's, or every mounted pool's (a pool whose
/// daemon does not answer is an error line, not a stop).
fn statuses(target: Option<&Path>) -> Result<(Vec<PoolStatus>, Vec<String>)> {
    if let Some(t) = target {
        return Ok((vec![status_of(t)?], Vec::new()));
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for mp in mounted_pools() {
        match ask_status(&mp) {
            Ok(st) => out.push(st),
            Err(e) => errors.push(format!("{}: {e:#}", mp.display())),
        }
    }
    Ok((out, errors))
}

pub fn status(target: Option<&Path>, unhealthy: bool, format: Option<StatusFormat>) -> Result<i32> {
    let format = match format {
        Some(f) => f,
        None if ui().json => StatusFormat::Json,
        None => StatusFormat::Text,
    };
    let (all, errors) = statuses(target)?;
    let sick = all.iter().any(|s| !s.healthy()) || !errors.is_empty();
    let shown: Vec<&PoolStatus> = all.iter().filter(|s| !unhealthy || !s.healthy()).collect();
    match format {
        StatusFormat::Prometheus => {
            print!("{}", prometheus(&all, jiff::Timestamp::now().as_second()))
        }
        StatusFormat::Json => {
            let v = if target.is_some() && !unhealthy {
                serde_json::to_value(&all[0])?
            } else {
                serde_json::json!({ "pools": shown, "errors": errors })
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        StatusFormat::Text => {
            for e in &errors {
                println!("error: {e}");
            }
            if all.is_empty() && errors.is_empty() {
                println!("no pools are mounted");
            } else if unhealthy && shown.is_empty() && errors.is_empty() {
                println!("all pools are healthy");
            }
            for (i, st) in shown.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_status(st);
            }
        }
    }
    Ok(if sick { EXIT_PROBLEMS } else { 0 })
}

fn print_status(st: &PoolStatus) {
    match (&st.mountpoint, st.pid) {
        (Some(mp), Some(pid)) => println!(
            "pool {}  {}  mounted at {} (pid {pid})",
            st.pool,
            st.state,
            mp.display()
        ),
        _ => println!("pool {}  {}  not mounted", st.pool, st.state),
    }
    println!(
        "copies {}, extent size {}, block size {}",
        st.copies,
        human(st.extent_size),
        human(st.block_size as u64)
    );
    println!(
        "{:<40} {:<8} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "MEMBER", "HEALTH", "SIZE", "USED", "FREE", "STORED", "EXTENTS"
    );
    for m in &st.members {
        println!(
            "{:<40} {:<8} {:>10} {:>10} {:>10} {:>10} {:>8}",
            m.path.display(),
            m.health,
            human(m.size),
            human(m.used),
            human(m.free),
            human(m.stored_bytes),
            m.extents
        );
    }
    println!(
        "total: size {}, used {}, free {}; {} file(s), {} logical, {} stored",
        human(st.size),
        human(st.used),
        human(st.free),
        st.files,
        human(st.logical_bytes),
        human(st.stored_bytes)
    );
    for m in st.members.iter().filter(|m| m.health != "ONLINE") {
        println!(
            "member {} is {}: {}",
            m.path.display(),
            m.health,
            m.reason.as_deref().unwrap_or("unknown reason")
        );
    }
    if st.state != "ONLINE" || st.degraded_bytes > 0 || st.unavailable_bytes > 0 {
        println!(
            "DEGRADED: {} with fewer copies than asked, {} with no copy left (reads there fail); \
             `vpool device replace` rebuilds a lost member's copies",
            human(st.degraded_bytes),
            human(st.unavailable_bytes)
        );
    }
    let i = &st.integrity;
    println!(
        "integrity (pool lifetime): {} checksum error(s), {} repaired, {} unrecoverable, {} read error(s)",
        i.checksum_errors, i.repaired, i.unrecoverable, i.io_errors
    );
    match &st.last_scrub {
        Some(s) => println!(
            "last scrub: {} at {}, took {:.1}s ({} checksum error(s), {} repaired, {} unrecoverable)",
            s.result,
            local_time(s.started, true),
            s.seconds,
            s.checksum_errors,
            s.repaired,
            s.unrecoverable
        ),
        None => println!("last scrub: never (`vpool scrub` checks every copy)"),
    }
    if let Some(n) = &st.newest_snapshot {
        println!(
            "snapshots: {}, newest {} at {}",
            st.snapshots,
            n.name,
            local_time(n.created, true)
        );
    }
    match &st.last_sent {
        Some(s) => println!(
            "newest snapshot off the pool: {} (taken {}), sent at {}, {}",
            s.snapshot,
            local_time(s.created, true),
            local_time(s.at, true),
            human(s.bytes)
        ),
        None if st.snapshots > 0 => {
            println!("newest snapshot off the pool: none (`vpool snapshot send` copies one out)")
        }
        None => {}
    }
    if let Some(l) = &st.log {
        println!("log: {l}");
    }
    let problems = st.problems();
    if problems.is_empty() {
        println!("health: healthy");
    } else {
        println!("health: {} problem(s)", problems.len());
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of `pools` (node_exporter's textfile
/// collector reads it), `now` being the time of the scrape.
pub fn prometheus(pools: &[PoolStatus], now: i64) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, f64)>| {
        let _ = writeln!(out, "# HELP vpool_{name} {help}");
        let _ = writeln!(out, "# TYPE vpool_{name} {kind}");
        for (labels, v) in rows {
            let _ = writeln!(out, "vpool_{name}{{{labels}}} {v}");
        }
    };
    let pl = |s: &PoolStatus| {
        format!(
            "pool=\"{}\",mountpoint=\"{}\"",
            label(&s.pool),
            label(
                &s.mountpoint
                    .as_ref()
                    .map(|m| m.display().to_string())
                    .unwrap_or_default()
            )
        )
    };
    let per = |f: &dyn Fn(&PoolStatus) -> Option<f64>| -> Vec<(String, f64)> {
        pools
            .iter()
            .filter_map(|s| f(s).map(|v| (pl(s), v)))
            .collect()
    };
    family(
        "pool_healthy",
        "gauge",
        "1 when every member is online, every extent has its copies and the last scrub left no problem.",
        per(&|s| Some(s.healthy() as u8 as f64)),
    );
    let mut members = Vec::new();
    for s in pools {
        for m in &s.members {
            members.push((
                format!(
                    "{},member=\"{}\",health=\"{}\"",
                    pl(s),
                    label(&m.path.display().to_string()),
                    m.health
                ),
                m,
            ));
        }
    }
    family(
        "member_online",
        "gauge",
        "1 when the member is ONLINE (the health label says what it is otherwise).",
        members
            .iter()
            .map(|(l, m)| (l.clone(), (m.health == "ONLINE") as u8 as f64))
            .collect(),
    );
    family(
        "member_free_bytes",
        "gauge",
        "Free bytes on the member's filesystem.",
        members
            .iter()
            .map(|(l, m)| (l.clone(), m.free as f64))
            .collect(),
    );
    family(
        "member_stored_bytes",
        "gauge",
        "Bytes of extent files on the member.",
        members
            .iter()
            .map(|(l, m)| (l.clone(), m.stored_bytes as f64))
            .collect(),
    );
    family(
        "size_bytes",
        "gauge",
        "Pool capacity.",
        per(&|s| Some(s.size as f64)),
    );
    family(
        "free_bytes",
        "gauge",
        "Pool free space.",
        per(&|s| Some(s.free as f64)),
    );
    family(
        "used_bytes",
        "gauge",
        "Pool used space.",
        per(&|s| Some(s.used as f64)),
    );
    family(
        "degraded_bytes",
        "gauge",
        "Logical bytes with fewer copies than asked.",
        per(&|s| Some(s.degraded_bytes as f64)),
    );
    family(
        "unavailable_bytes",
        "gauge",
        "Logical bytes with no copy left.",
        per(&|s| Some(s.unavailable_bytes as f64)),
    );
    family(
        "checksum_errors_total",
        "counter",
        "Blocks found not matching their checksum (pool lifetime).",
        per(&|s| Some(s.integrity.checksum_errors as f64)),
    );
    family(
        "repaired_total",
        "counter",
        "Bad block copies rewritten from a good copy (pool lifetime).",
        per(&|s| Some(s.integrity.repaired as f64)),
    );
    family(
        "unrecoverable_total",
        "counter",
        "Blocks found with no good copy (pool lifetime).",
        per(&|s| Some(s.integrity.unrecoverable as f64)),
    );
    family(
        "read_errors_total",
        "counter",
        "Member reads that failed with an I/O error (pool lifetime).",
        per(&|s| Some(s.integrity.io_errors as f64)),
    );
    family(
        "last_scrub_timestamp_seconds",
        "gauge",
        "When the last scrub started.",
        per(&|s| s.last_scrub.as_ref().map(|r| r.started as f64)),
    );
    family(
        "last_scrub_duration_seconds",
        "gauge",
        "How long the last scrub took.",
        per(&|s| s.last_scrub.as_ref().map(|r| r.seconds)),
    );
    family(
        "last_scrub_success",
        "gauge",
        "1 when the last scrub ran to the end and left no problem.",
        per(&|s| {
            s.last_scrub
                .as_ref()
                .map(|r| matches!(r.result.as_str(), "clean" | "repaired") as u8 as f64)
        }),
    );
    family(
        "snapshots",
        "gauge",
        "Snapshots of the pool.",
        per(&|s| Some(s.snapshots as f64)),
    );
    family(
        "newest_snapshot_age_seconds",
        "gauge",
        "Age of the newest complete snapshot.",
        per(&|s| {
            s.newest_snapshot
                .as_ref()
                .map(|n| (now - n.created).max(0) as f64)
        }),
    );
    family(
        "last_capture_bytes_per_second",
        "gauge",
        "Speed of the last snapshot capture (changed blocks read and saved).",
        per(&|s| s.last_capture.as_ref().map(|c| c.bytes_per_second)),
    );
    out
}

pub fn check(dir: &Path) -> Result<i32> {
    let r = crate::check::check_pool(dir)?;
    json(&r);
    say(format!(
        "pool {}: {} member(s), {} inode(s), {} extent(s)",
        r.pool, r.members, r.inodes, r.extents
    ));
    for n in &r.notes {
        say(format!("note: {n}"));
    }
    for p in &r.problems {
        say(format!("PROBLEM: {p}"));
    }
    if r.is_clean() {
        say("consistent");
    } else {
        say(format!("{} problem(s) found", r.problems.len()));
    }
    Ok(if r.is_clean() { 0 } else { EXIT_PROBLEMS })
}

/// The mounted pools TARGET names (one), or all of them.
fn mounted_targets(target: Option<&Path>) -> Result<Vec<PathBuf>> {
    match target {
        Some(t) => match resolve(t)? {
            Target::Mounted(mp) => Ok(vec![mp]),
            Target::Offline(d) => bail!(
                "the pool of {} is not mounted: no job runs in it",
                d.display()
            ),
        },
        None => Ok(mounted_pools()),
    }
}

fn print_event(mp: Option<&Path>, e: &Event) {
    if ui().json {
        let mut v = serde_json::to_value(e).unwrap_or_default();
        if let (Some(mp), Some(o)) = (mp, v.as_object_mut()) {
            o.insert("mountpoint".into(), serde_json::json!(mp));
        }
        // One object per line: `-f` streams them.
        println!("{v}");
        return;
    }
    let member = e
        .member
        .as_deref()
        .map(|m| format!(" [{m}]"))
        .unwrap_or_default();
    let pool = mp.map(|m| format!("{}: ", m.display())).unwrap_or_default();
    println!(
        "{}  {:<7} {:<18} {pool}{}{member}",
        local_time(e.time, true),
        e.severity.as_str(),
        e.kind,
        e.message
    );
}

pub fn events(target: Option<&Path>, follow: bool) -> Result<i32> {
    let many = target.is_none();
    let pools: Vec<Target> = match target {
        Some(t) => vec![resolve(t)?],
        None => mounted_pools().into_iter().map(Target::Mounted).collect(),
    };
    if follow {
        let Some(Target::Mounted(mp)) = pools.first().filter(|_| pools.len() == 1) else {
            bail!("--follow needs one mounted pool (give its TARGET)");
        };
        control::request_stream(
            mp,
            &Request::Events {
                since: 0,
                follow: true,
            },
            &mut |r| {
                if let Response::Event(e) = r {
                    print_event(None, e);
                    use std::io::Write;
                    let _ = std::io::stdout().flush();
                }
                true
            },
        )?;
        return Ok(0);
    }
    for t in pools {
        let (list, mp) = match &t {
            Target::Mounted(mp) => match control::request(
                mp,
                &Request::Events {
                    since: 0,
                    follow: false,
                },
            )? {
                Response::Events { list } => (list, Some(mp.clone())),
                Response::Error { message } => bail!("{message}"),
                other => bail!("unexpected answer: {other:?}"),
            },
            Target::Offline(dir) => {
                let mut pool = crate::pool::Pool::open(dir)?;
                pool.load_metadata(false)?;
                (pool.info.events_since(0), None)
            }
        };
        for e in &list {
            print_event(if many { mp.as_deref() } else { None }, e);
        }
    }
    Ok(0)
}

pub fn jobs(target: Option<&Path>) -> Result<i32> {
    let mut all = Vec::new();
    for mp in mounted_targets(target)? {
        match control::request(&mp, &Request::Jobs)? {
            Response::Jobs { list } => all.extend(list.into_iter().map(|j| (mp.clone(), j))),
            Response::Error { message } => bail!("{message}"),
            other => bail!("unexpected answer: {other:?}"),
        }
    }
    if ui().json {
        let v: Vec<serde_json::Value> = all
            .iter()
            .map(|(mp, j)| {
                let mut v = serde_json::to_value(j).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("mountpoint".into(), serde_json::json!(mp));
                }
                v
            })
            .collect();
        json(&v);
        return Ok(0);
    }
    if all.is_empty() {
        say("no jobs running");
        return Ok(0);
    }
    say(format!(
        "{:<28} {:<15} {:<24} {:>22} {:>8}  MOUNTPOINT",
        "ID", "KIND", "WHAT", "PROGRESS", "ETA"
    ));
    for (mp, j) in &all {
        let pct = if j.total > 0 {
            format!(" ({:.0}%)", j.done as f64 * 100.0 / j.total as f64)
        } else {
            String::new()
        };
        let eta = j
            .eta_seconds
            .map(|s| format!("{}:{:02}", s / 60, s % 60))
            .unwrap_or_else(|| "-".into());
        say(format!(
            "{:<28} {:<15} {:<24} {:>22} {:>8}  {}{}",
            j.id,
            j.kind,
            j.what,
            format!("{}/{} {}{pct}", j.done, j.total, j.unit),
            eta,
            mp.display(),
            if j.cancelling { "  (cancelling)" } else { "" }
        ));
    }
    Ok(0)
}

pub fn job_cancel(id: &str, target: Option<&Path>) -> Result<i32> {
    let mut hits = Vec::new();
    for mp in mounted_targets(target)? {
        if let Ok(Response::Jobs { list }) = control::request(&mp, &Request::Jobs)
            && list.iter().any(|j| j.id == id)
        {
            hits.push(mp);
        }
    }
    let mp = match &hits[..] {
        [mp] => mp.clone(),
        [] => bail!("no running job {id} (see `vpool jobs`)"),
        _ => bail!(
            "several pools run a job {id}: name the pool (`vpool jobs cancel {id} MOUNTPOINT`)"
        ),
    };
    match control::request(&mp, &Request::JobCancel { id: id.into() })? {
        Response::Cancelled { jobs } => {
            json(&jobs);
            for j in &jobs {
                say(format!(
                    "job {} ({} {}) cancelled at {}/{} {}; what it did stays done",
                    j.id, j.kind, j.what, j.done, j.total, j.unit
                ));
            }
            Ok(0)
        }
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line is a comment or `name{labels} value`, each family has
    /// HELP and TYPE, and label values are escaped.
    #[test]
    fn prometheus_text_is_well_formed() {
        let st: PoolStatus = serde_json::from_value(serde_json::json!({
            "pool": "p1", "state": "DEGRADED", "mounted": true,
            "mountpoint": "/mnt/a \"b\"\\c", "pid": 1, "copies": 2,
            "extent_size": 1, "block_size": 4096, "size": 100, "used": 10, "free": 90,
            "files": 1, "logical_bytes": 5, "stored_bytes": 5,
            "members": [
                {"path": "/d1", "id": "x", "size": 50, "used": 5, "free": 45,
                 "health": "ONLINE", "stored_bytes": 5, "extents": 1},
                {"path": "/d2", "id": "y", "size": 0, "used": 0, "free": 0,
                 "health": "MISSING", "stored_bytes": 0, "extents": 0}
            ],
            "newest_snapshot": {"name": "s", "created": 1000},
            "last_scrub": {"started": 900, "seconds": 2.5, "result": "clean",
                           "checksum_errors": 0, "repaired": 0, "unrecoverable": 0, "io_errors": 0}
        }))
        .unwrap();
        let text = prometheus(&[st], 1600);
        let re_ok = |l: &str| {
            let (name, rest) = l.split_once('{').unwrap();
            let (_, value) = rest.rsplit_once("} ").unwrap();
            name.starts_with("vpool_") && value.parse::<f64>().is_ok()
        };
        for l in text.lines() {
            assert!(
                l.starts_with("# HELP vpool_") || l.starts_with("# TYPE vpool_") || re_ok(l),
                "{l}"
            );
        }
        assert!(text.contains(r#"mountpoint="/mnt/a \"b\"\\c""#), "{text}");
        assert!(text.contains("vpool_pool_healthy{pool=\"p1\""), "{text}");
        assert!(text.contains("} 0\n"), "a degraded pool is not healthy");
        assert!(text.contains("health=\"MISSING\"} 0"), "{text}");
        assert!(text.contains("vpool_newest_snapshot_age_seconds{pool=\"p1\",mountpoint=\"/mnt/a \\\"b\\\"\\\\c\"} 600"), "{text}");
        assert!(
            text.contains("vpool_last_scrub_success{")
                && text.contains("vpool_last_scrub_duration_seconds{")
        );
    }
}
