#!/usr/bin/env bash
# Install vpool system-wide: the binary, the mount helper, systemd units,
# shell completions, man pages and example event hooks. Safe to run again
# (an upgrade is the same command).
#
#   sudo scripts/install.sh                       # build, then install under /usr/local
#   sudo scripts/install.sh --bin target/release/vpool   # install a binary built before
#   DESTDIR=/tmp/stage scripts/install.sh --bin target/release/vpool   # staging (packages)
#
# Options:
#   --prefix DIR   installation prefix (default /usr/local)
#   --bin PATH     install this binary instead of running `cargo build --release`
#   --no-systemd   do not install the systemd units
#   -h, --help     this text
#
# Environment:
#   DESTDIR        staging root prepended to every path (default: none)
#
# What goes where (PREFIX=/usr/local):
#   PREFIX/bin/vpool                                  the binary
#   /sbin/mount.fuse.vpool -> PREFIX/bin/vpool        mount helper (fstype fuse.vpool)
#   /etc/systemd/system/vpool*.service, vpool*.timer  units (see scripts/systemd/)
#   PREFIX/share/bash-completion/completions/vpool    bash completion
#   PREFIX/share/zsh/site-functions/_vpool            zsh completion
#   PREFIX/share/fish/vendor_completions.d/vpool.fish fish completion
#   PREFIX/share/man/man1/vpool*.1                    man pages
#   /etc/vpool/events.d/examples/                     example event hooks (not enabled)
#   /etc/vpool/mount/                                 for vpool@.service's env files
#
# The units are overwritten on every run: change them with drop-ins
# (`systemctl edit UNIT`), not by editing the installed files.
#
# Build as yourself first, then install as root; cargo should not run as root:
#   cargo build --release && sudo scripts/install.sh --bin target/release/vpool
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
}

PREFIX=/usr/local
BIN=
SYSTEMD=1
DESTDIR="${DESTDIR:-}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix)
            [[ $# -ge 2 ]] || die "--prefix needs a directory"
            PREFIX="$2"
            shift 2
            ;;
        --prefix=*)
            PREFIX="${1#--prefix=}"
            shift
            ;;
        --bin)
            [[ $# -ge 2 ]] || die "--bin needs a path"
            BIN="$2"
            shift 2
            ;;
        --bin=*)
            BIN="${1#--bin=}"
            shift
            ;;
        --no-systemd)
            SYSTEMD=0
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            die "unknown argument: $1 (see $0 --help)"
            ;;
    esac
done

[[ $PREFIX == /* ]] || die "--prefix must be an absolute path (got $PREFIX)"
PREFIX="${PREFIX%/}"
[[ -n $PREFIX ]] || die "--prefix / is not supported; use --prefix /usr"
DESTDIR="${DESTDIR%/}"
if [[ -n $DESTDIR && $DESTDIR != /* ]]; then
    DESTDIR="$(pwd)/$DESTDIR"
fi

INSTALLED=()
# note PATH: remember an installed path for the summary (without DESTDIR).
note() { INSTALLED+=("${1#"$DESTDIR"}"); }

# 1. The binary.
if [[ -z $BIN ]]; then
    ensure_cargo_path
    log "cargo build --release"
    cargo build --release
    BIN=target/release/vpool
fi
[[ -f $BIN && -x $BIN ]] || die "$BIN is not an executable file"

BINDIR="$DESTDIR$PREFIX/bin"
VPOOL="$BINDIR/vpool"
install -d -m 0755 "$BINDIR"
# install(1) removes the old file first, so running daemons keep their copy.
install -m 0755 "$BIN" "$VPOOL"
note "$VPOOL"

# 2. The mount helper: mount(8) runs /sbin/mount.fuse.vpool for fuse.vpool.
# On merged-/usr systems /sbin is a symlink to usr/sbin; that is fine.
install -d -m 0755 "$DESTDIR/sbin"
ln -sfn "$PREFIX/bin/vpool" "$DESTDIR/sbin/mount.fuse.vpool"
note "$DESTDIR/sbin/mount.fuse.vpool -> $PREFIX/bin/vpool"

# write_file SRC DEST MODE: copy SRC to DEST with the binary's path rewritten
# for this prefix; the file appears under its final name only when complete.
write_file() {
    local src="$1" dest="$2" mode="$3" text tmp
    text="$(<"$src")"
    text="${text//"/usr/local/bin/vpool"/"$PREFIX/bin/vpool"}"
    tmp="$(mktemp "$dest.XXXXXX")"
    printf '%s\n' "$text" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
}

# 3. systemd units.
if [[ $SYSTEMD -eq 1 ]]; then
    UNITDIR="$DESTDIR/etc/systemd/system"
    install -d -m 0755 "$UNITDIR"
    for unit in scripts/systemd/*.service scripts/systemd/*.timer; do
        write_file "$unit" "$UNITDIR/$(basename "$unit")" 0644
        note "$UNITDIR/$(basename "$unit")"
    done
    install -d -m 0755 "$DESTDIR/etc/vpool/mount"
    note "$DESTDIR/etc/vpool/mount/"
fi

# 4. Shell completions, made by the installed binary.
# gen_to DEST CMD...: write CMD's output to DEST, atomically.
gen_to() {
    local dest="$1" tmp
    shift
    install -d -m 0755 "$(dirname "$dest")"
    tmp="$(mktemp "$dest.XXXXXX")"
    if ! "$@" >"$tmp"; then
        rm -f -- "$tmp"
        die "failed: $*"
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$dest"
    note "$dest"
}
SHARE="$DESTDIR$PREFIX/share"
gen_to "$SHARE/bash-completion/completions/vpool" "$VPOOL" completions bash
gen_to "$SHARE/zsh/site-functions/_vpool" "$VPOOL" completions zsh
gen_to "$SHARE/fish/vendor_completions.d/vpool.fish" "$VPOOL" completions fish

# 5. Man pages.
MANDIR="$SHARE/man/man1"
install -d -m 0755 "$MANDIR"
"$VPOOL" man "$MANDIR" || die "failed: $VPOOL man $MANDIR"
[[ -f $MANDIR/vpool.1 ]] || die "$VPOOL man did not write $MANDIR/vpool.1"
note "$MANDIR/vpool*.1 ($(find "$MANDIR" -maxdepth 1 -name 'vpool*.1' | wc -l) pages)"

# 6. Example event hooks, not enabled: the daemon only runs files directly
# in /etc/vpool/events.d/, never in a subdirectory.
EXAMPLES="$DESTDIR/etc/vpool/events.d/examples"
install -d -m 0755 "$EXAMPLES"
for hook in scripts/events.d/*; do
    [[ -f $hook ]] || continue
    write_file "$hook" "$EXAMPLES/$(basename "$hook")" 0755
    note "$EXAMPLES/$(basename "$hook")"
done

# 7. Tell a running systemd about new or changed units.
if [[ $SYSTEMD -eq 1 && -z $DESTDIR && -d /run/systemd/system ]]; then
    log "systemctl daemon-reload"
    systemctl daemon-reload
fi

log "installed${DESTDIR:+ under DESTDIR=$DESTDIR}:"
for path in "${INSTALLED[@]}"; do
    printf '      %s\n' "$path"
done
cat >&2 <<EOF
==> next steps (see README.md, "Operations"):
      mount at boot:  an /etc/fstab line with type fuse.vpool, or
                      systemctl enable --now vpool@\$(systemd-escape --path /var/lib/images).service
      snapshots:      systemctl enable --now vpool-snapshot@var-lib-images.timer
      scrubs:         systemctl enable --now vpool-scrub@var-lib-images.timer
      event hooks:    install -m 0755 /etc/vpool/events.d/examples/10-log /etc/vpool/events.d/
EOF
