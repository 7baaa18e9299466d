//! How the CLI speaks: human lines or one JSON document on stdout, progress
//! bars on stderr when it is a terminal, the exit codes, and logging.
//!
//! Exit codes (stable, documented in the README):
//! - 0: done; the pool is healthy;
//! - 1: an error (the message names it);
//! - 2: bad usage (unknown option, missing argument);
//! - 3: done, but the pool is degraded or problems were found (status,
//!   check, scrub).

use std::io::IsTerminal;
use std::sync::OnceLock;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub const EXIT_OK: i32 = 0;
pub const EXIT_ERROR: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_PROBLEMS: i32 = 3;

/// The global flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ui {
    pub json: bool,
    pub quiet: bool,
    pub verbose: u8,
}

static UI: OnceLock<Ui> = OnceLock::new();

pub fn set(ui: Ui) {
    let _ = UI.set(ui);
}

pub fn ui() -> Ui {
    UI.get().copied().unwrap_or_default()
}

/// A line for humans on stdout (not with `--json` or `-q`).
pub fn say(msg: impl AsRef<str>) {
    let u = ui();
    if !u.json && !u.quiet {
        println!("{}", msg.as_ref());
    }
}

/// The JSON answer of a command (only with `--json`).
pub fn json<T: Serialize>(v: &T) {
    if ui().json {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vpool: cannot encode the answer: {e}"),
        }
    }
}

/// Prints an error the way the flags ask: `{"error":{"code":N,"message":..}}`
/// on stdout with `--json`, `vpool: error: ...` on stderr otherwise.
pub fn error(code: i32, message: &str) {
    if ui().json {
        let v = serde_json::json!({ "error": { "code": code, "message": message } });
        println!("{v}");
    } else {
        eprintln!("vpool: error: {message}");
    }
}

/// A progress bar on stderr labelled `what` counting `unit`, drawn only
/// when stderr is a terminal and neither `--json` nor `-q` was given.
pub fn bar(what: &str, unit: &str) -> ProgressBar {
    let u = ui();
    if u.json || u.quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:40}}] {{pos}}/{{len}} {unit}  {{elapsed}} (eta {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}

/// [`bar`] with the rate: `unit` "bytes" counts bytes (MiB/s), any other
/// unit counts that unit per second.
pub fn rate_bar(what: &str, unit: &str) -> ProgressBar {
    let u = ui();
    if u.json || u.quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(0);
    let t = if unit == "bytes" {
        format!(
            "{what} [{{bar:40}}] {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}}  {{elapsed}} (eta {{eta}})"
        )
    } else {
        format!("{what} [{{bar:40}}] {{pos}}/{{len}} {unit} {{per_sec}}  {{elapsed}} (eta {{eta}})")
    };
    pb.set_style(
        ProgressStyle::with_template(&t)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb
}

/// A time for humans: local, to the second (with the zone's abbreviation
/// when `zone`).
pub fn local_time(secs: i64, zone: bool) -> String {
    let fmt = if zone {
        "%Y-%m-%d %H:%M:%S %Z"
    } else {
        "%Y-%m-%d %H:%M:%S"
    };
    jiff::Timestamp::from_second(secs)
        .map(|t| {
            t.to_zoned_datetime(jiff::tz::TimeZone::system())
                .strftime(fmt)
                .to_string()
        })
        .unwrap_or_else(|_| secs.to_string())
}

/// Sets up logging for a CLI command: warnings by default, `-v` info, `-vv`
/// debug, `-q` errors only; `VPOOL_LOG` (an env-filter) overrides.
pub fn init_cli_logging() {
    let u = ui();
    let level = match (u.quiet, u.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("VPOOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
