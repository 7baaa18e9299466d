//! The files that put vpool into a system, outside the Rust code:
//!
//! - every systemd unit in `scripts/systemd/` passes `systemd-analyze verify`
//!   without a single warning (templates through an instance name, with the
//!   binary path pointed at the test build);
//! - `scripts/install.sh` into a `DESTDIR` installs the binary, the
//!   `mount.fuse.vpool` helper, the units (with the prefix's binary path),
//!   completions, man pages and the example event hooks, and a second run
//!   changes nothing;
//! - the bash completion of `vpool completions bash` completes subcommands.
//!
//! Nothing is mounted; the whole file runs in seconds. Without
//! `systemd-analyze` (or bash) the tests that need it say so and pass.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
const VPOOL: &str = env!("CARGO_BIN_EXE_vpool");
/// The binary path written in the unit files in the repository.
const UNIT_BIN: &str = "/usr/local/bin/vpool";
/// The instance used for template units: `systemd-escape --path /var/lib/images`.
const INSTANCE: &str = "var-lib-images";
/// The units the repository ships; each must exist.
const EXPECTED_UNITS: [&str; 7] = [
    "vpool@.service",
    "vpool-snapshot@.service",
    "vpool-snapshot@.timer",
    "vpool-scrub@.service",
    "vpool-scrub@.timer",
    "vpool-metrics.service",
    "vpool-metrics.timer",
];

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` on PATH, or in the usual system directories (a test runner's PATH
/// may lack the sbin ones).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn show(out: &Output) -> String {
    format!(
        "exit: {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The unit files of `scripts/systemd/` (file names, sorted).
fn unit_files() -> Vec<String> {
    let dir = repo_path("scripts/systemd");
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".service") || n.ends_with(".timer"))
        .collect();
    names.sort();
    for want in EXPECTED_UNITS {
        assert!(
            names.iter().any(|n| n == want),
            "scripts/systemd/{want} is missing"
        );
    }
    names
}

/// The name systemd knows a unit by: a template `a@.service` gets an
/// instance, `a@var-lib-images.service`.
fn instance_name(file: &str) -> String {
    match file.split_once("@.") {
        Some((prefix, suffix)) => format!("{prefix}@{INSTANCE}.{suffix}"),
        None => file.to_string(),
    }
}

/// The directives of a unit file as (key, value), continuation lines joined
/// and comments skipped, as systemd reads them.
fn directives(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if line.is_empty()
            || line.starts_with('#')
            || line.starts_with(';')
            || line.starts_with('[')
        {
            continue;
        }
        let mut logical = line.to_string();
        while logical.ends_with('\\') {
            logical.pop();
            logical.push(' ');
            match lines.next() {
                Some(next) => logical.push_str(next.trim()),
                None => break,
            }
        }
        if let Some((k, v)) = logical.split_once('=') {
            out.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Runs `systemd-analyze verify` on the unit `names` in `dir` and returns
/// its output and the lines of its stderr that are about vpool's units
/// (every unit name, and so every warning about one, contains "vpool").
fn verify(analyze: &Path, dir: &Path, names: &[String]) -> (Output, Vec<String>) {
    let out = Command::new(analyze)
        .arg("verify")
        // Documentation=man:vpool-mount(1) and the like name pages that are
        // installed with the binary, not present here; without --man=no
        // verify runs man(1) for each and fails.
        .arg("--man=no")
        .args(names.iter().map(|n| dir.join(n)))
        .current_dir(dir)
        .env("SYSTEMD_COLORS", "0")
        .env("SYSTEMD_PAGER", "")
        .output()
        .expect("run systemd-analyze");
    let warnings = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| l.contains("vpool"))
        .map(str::to_string)
        .collect();
    (out, warnings)
}

#[test]
fn systemd_units_pass_verify() {
    let Some(analyze) = find_program("systemd-analyze") else {
        eprintln!("systemd_units_pass_verify: skipped, systemd-analyze is not installed");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();

    // First make sure this systemd's verify reports what the check below
    // looks for: a unit with an unknown key is loaded with a warning on
    // stderr (and exit status 0, which is why stderr is what is checked).
    let control = tmp.path().join("control");
    fs::create_dir(&control).unwrap();
    fs::write(
        control.join("vpool-selftest.service"),
        "[Unit]\nDescription=x\n[Service]\nType=oneshot\nExecStart=/bin/sh -c true\nNoSuchKey=1\n",
    )
    .unwrap();
    let (out, warnings) = verify(&analyze, &control, &["vpool-selftest.service".to_string()]);
    assert!(
        !warnings.is_empty(),
        "systemd-analyze verify did not report an unknown key; the check of the real units would prove nothing\n{}",
        show(&out)
    );

    // The real units, with the binary path pointed at the test build (verify
    // checks that every Exec*= program exists and is executable).
    assert!(Path::new(VPOOL).is_absolute(), "{VPOOL} is not absolute");
    let dir = tmp.path().join("units");
    fs::create_dir(&dir).unwrap();
    let mut names = Vec::new();
    for file in unit_files() {
        let text = fs::read_to_string(repo_path("scripts/systemd").join(&file)).unwrap();
        if file.ends_with(".service") {
            assert!(text.contains(UNIT_BIN), "{file} does not run {UNIT_BIN}");
        }
        let text = text.replace(UNIT_BIN, VPOOL);
        fs::write(dir.join(&file), text).unwrap();
        let name = instance_name(&file);
        if name != file {
            std::os::unix::fs::symlink(&file, dir.join(&name)).unwrap();
        }
        names.push(name);
    }
    let (out, warnings) = verify(&analyze, &dir, &names);
    assert!(
        out.status.success() && warnings.is_empty(),
        "systemd-analyze verify complained about the units:\n{}\n{}",
        warnings.join("\n"),
        show(&out)
    );
}

/// Every file under `root`, as paths relative to it (symlinks not followed).
fn tree(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            out.insert(path.strip_prefix(root).unwrap().to_path_buf());
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn run_install(destdir: &Path, args: &[&str]) {
    let out = Command::new("bash")
        .arg(repo_path("scripts/install.sh"))
        .args(["--bin", VPOOL])
        .args(args)
        .env("DESTDIR", destdir)
        .output()
        .expect("run scripts/install.sh");
    assert!(
        out.status.success(),
        "scripts/install.sh {args:?} failed\n{}",
        show(&out)
    );
}

/// The values of the Exec* directives `key` of an installed unit.
fn exec_lines(unit: &Path, key: &str) -> Vec<String> {
    let text = fs::read_to_string(unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    directives(&text)
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn install_into_destdir() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path();
    run_install(dest, &["--prefix", "/usr/local"]);
    let p = |rel: &str| dest.join(rel.trim_start_matches('/'));

    // The binary and the mount helper.
    let bin = p("/usr/local/bin/vpool");
    assert!(
        is_executable(&bin),
        "{} missing or not executable",
        bin.display()
    );
    assert_eq!(
        fs::metadata(&bin).unwrap().len(),
        fs::metadata(VPOOL).unwrap().len(),
        "installed binary differs from {VPOOL}"
    );
    let helper = p("/sbin/mount.fuse.vpool");
    let md = fs::symlink_metadata(&helper).unwrap_or_else(|e| panic!("{}: {e}", helper.display()));
    assert!(
        md.file_type().is_symlink(),
        "{} is not a symlink",
        helper.display()
    );
    assert_eq!(
        fs::read_link(&helper).unwrap(),
        Path::new("/usr/local/bin/vpool")
    );

    // Every unit, running the installed binary.
    let mut man_refs = BTreeSet::new();
    for file in unit_files() {
        let unit = p("/etc/systemd/system").join(&file);
        assert!(unit.is_file(), "{} not installed", unit.display());
        if file.ends_with(".service") {
            let starts = exec_lines(&unit, "ExecStart");
            assert!(!starts.is_empty(), "{file}: no ExecStart");
            for line in starts {
                assert!(
                    line.contains("/usr/local/bin/vpool "),
                    "{file}: ExecStart={line}"
                );
            }
        }
        let text = fs::read_to_string(&unit).unwrap();
        for (_, doc) in directives(&text)
            .into_iter()
            .filter(|(k, _)| k == "Documentation")
        {
            for uri in doc.split_whitespace() {
                if let Some(page) = uri.strip_prefix("man:") {
                    // man:vpool-mount(1) -> vpool-mount.1
                    let (name, section) = page.trim_end_matches(')').split_once('(').unwrap();
                    man_refs.insert(format!("{name}.{section}"));
                }
            }
        }
    }
    assert!(p("/etc/vpool/mount").is_dir());

    // Completions and man pages, made by the installed binary.
    for rel in [
        "/usr/local/share/bash-completion/completions/vpool",
        "/usr/local/share/zsh/site-functions/_vpool",
        "/usr/local/share/fish/vendor_completions.d/vpool.fish",
    ] {
        let len = fs::metadata(p(rel)).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{rel} missing or empty");
    }
    let man1 = p("/usr/local/share/man/man1");
    assert!(man1.join("vpool.1").is_file(), "vpool.1 not installed");
    // The man pages the units' Documentation= lines name exist.
    for page in &man_refs {
        assert!(
            man1.join(page).is_file(),
            "a unit names man page {page}, which is not installed"
        );
    }

    // The hook examples, installed but not enabled.
    let examples = p("/etc/vpool/events.d/examples");
    for hook in fs::read_dir(repo_path("scripts/events.d")).unwrap() {
        let name = hook.unwrap().file_name();
        assert!(
            is_executable(&examples.join(&name)),
            "hook example {name:?} not installed"
        );
    }
    let enabled: Vec<_> = fs::read_dir(p("/etc/vpool/events.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "examples")
        .collect();
    assert!(
        enabled.is_empty(),
        "hooks enabled by the install: {enabled:?}"
    );

    // Running it again changes nothing: same files, no leftovers.
    let before = tree(dest);
    run_install(dest, &["--prefix", "/usr/local"]);
    assert_eq!(tree(dest), before, "a second install left a different tree");
}

#[test]
fn install_rewrites_the_binary_path_for_the_prefix() {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path();
    run_install(dest, &["--prefix", "/opt/vpool"]);
    assert!(is_executable(&dest.join("opt/vpool/bin/vpool")));
    assert_eq!(
        fs::read_link(dest.join("sbin/mount.fuse.vpool")).unwrap(),
        Path::new("/opt/vpool/bin/vpool")
    );
    for file in unit_files() {
        let text = fs::read_to_string(dest.join("etc/systemd/system").join(&file)).unwrap();
        assert!(!text.contains(UNIT_BIN), "{file} still names {UNIT_BIN}");
        if file.ends_with(".service") {
            assert!(
                text.contains("/opt/vpool/bin/vpool "),
                "{file} does not run /opt/vpool/bin/vpool"
            );
        }
    }
    assert!(dest.join("opt/vpool/share/man/man1/vpool.1").is_file());

    // --no-systemd: no units.
    let tmp2 = tempfile::tempdir().unwrap();
    run_install(tmp2.path(), &["--prefix", "/usr/local", "--no-systemd"]);
    assert!(
        !tmp2.path().join("etc/systemd").exists(),
        "--no-systemd installed units"
    );
    assert!(is_executable(&tmp2.path().join("usr/local/bin/vpool")));
}

/// What bash completion offers for the command line `words`, the last word
/// being completed: sources the script of `vpool completions bash` and calls
/// the function it registered for `vpool` the way bash does (arguments:
/// command, current word, previous word).
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let bash = find_program("bash").expect("bash");
    let prog = r#"
        script=$1; shift
        source "$script" || exit 1
        fn=$(complete -p vpool 2>/dev/null | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
        fn=${fn:-_vpool}
        declare -F "$fn" >/dev/null || { echo "no completion function $fn" >&2; exit 1; }
        COMP_WORDS=("$@")
        COMP_CWORD=$(($# - 1))
        COMP_LINE="$*"
        COMP_POINT=${#COMP_LINE}
        COMPREPLY=()
        "$fn" "${COMP_WORDS[0]}" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD - 1]}"
        printf '%s\n' "${COMPREPLY[@]}"
    "#;
    let out = Command::new(bash)
        .args(["--noprofile", "--norc", "-c", prog, "bash"])
        .arg(script)
        .args(words)
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "completion of {words:?} failed\n{}",
        show(&out)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_completion_completes_subcommands() {
    if find_program("bash").is_none() {
        eprintln!("bash_completion_completes_subcommands: skipped, bash is not installed");
        return;
    }
    let out = Command::new(VPOOL)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "vpool completions bash failed\n{}",
        show(&out)
    );
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("vpool.bash");
    fs::write(&script, &out.stdout).unwrap();

    let got = bash_complete(&script, &["vpool", "sna"]);
    assert!(
        got.iter().any(|w| w == "snapshot"),
        "`vpool sna<TAB>` offered {got:?}"
    );
    assert!(
        got.iter().all(|w| w.starts_with("sna")),
        "`vpool sna<TAB>` offered {got:?}"
    );

    let got = bash_complete(&script, &["vpool", "snapshot", "cr"]);
    assert!(
        got.iter().any(|w| w == "create"),
        "`vpool snapshot cr<TAB>` offered {got:?}"
    );
}
