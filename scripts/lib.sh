# shellcheck shell=bash
# Helpers shared by scripts/*.sh. Source it from the repo root:
#   . scripts/lib.sh

# Colour-free, greppable log lines.
log() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
die() {
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly when we already are, otherwise via sudo.
as_root() {
    if [[ ${EUID:-$(id -u)} -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (and sudo is not installed)"
    fi
}

# Install Debian packages (no prompts, no recommends). Runs `apt-get update`
# once per script run, before the first install.
_APT_UPDATED=0
apt_install() {
    [[ $# -gt 0 ]] || return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "apt-get not found; please install manually: $*"
    if [[ $_APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        _APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" </dev/null
}

# Make cargo-installed binaries (cargo itself, fsx) reachable.
ensure_cargo_path() {
    local bin="${CARGO_HOME:-$HOME/.cargo}/bin"
    case ":$PATH:" in
        *":$bin:"*) ;;
        *) export PATH="$bin:$PATH" ;;
    esac
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found (install Rust via rustup first)"
}

# FUSE runtime (fusermount3) for mounting, plus pkg-config and libfuse3
# headers when Cargo.toml turns on fuser's libfuse features (by default fuser
# mounts in pure Rust and needs neither).
ensure_build_deps() {
    local pkgs=()
    command -v fusermount3 >/dev/null 2>&1 || pkgs+=(fuse3)
    if [[ -f Cargo.toml ]] && grep -q 'libfuse' Cargo.toml; then
        command -v pkg-config >/dev/null 2>&1 || pkgs+=(pkg-config)
        if ! pkg-config --exists fuse3 2>/dev/null; then
            pkgs+=(libfuse3-dev)
        fi
    fi
    apt_install "${pkgs[@]}"
}

# /dev/fuse must exist for any mount.
ensure_dev_fuse() {
    if [[ ! -e /dev/fuse ]]; then
        as_root modprobe fuse 2>/dev/null || true
    fi
    [[ -e /dev/fuse ]] || warn "/dev/fuse is missing: FUSE mounts will fail"
}

# True when PATH (absolute or relative) is a mount point listed in
# /proc/self/mounts. Works for stale FUSE mounts too (where stat fails).
is_mounted() {
    local abs
    abs="$(realpath -m -- "$1")"
    awk -v m="$abs" '$2 == m { found = 1 } END { exit !found }' /proc/self/mounts
}

# True when PATH is mounted but its daemon is gone ("Transport endpoint is
# not connected").
is_stale_mount() {
    is_mounted "$1" && ! stat -- "$1" >/dev/null 2>&1
}

# Write back dirty pages, then drop the page cache (best effort: needs root),
# so a timed run reads from the disk.
drop_caches() {
    sync
    as_root sh -c 'echo 3 > /proc/sys/vm/drop_caches' 2>/dev/null || true
}

# Best-effort lazy unmount of a FUSE mount point.
lazy_unmount() {
    local mnt="$1"
    is_mounted "$mnt" || return 0
    fusermount3 -uz -- "$mnt" 2>/dev/null ||
        as_root umount -l -- "$mnt" 2>/dev/null || true
}
