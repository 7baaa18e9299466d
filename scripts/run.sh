#!/usr/bin/env bash
# Build vpool and mount a small demo pool at ./mnt. Safe to run repeatedly.
#
#   scripts/run.sh
#
# Environment:
#   VPOOL_DEMO_DIR   where the demo member directories live (default ./demo)
#   VPOOL_MNT        mount point (default ./mnt)
#   VPOOL_MOUNT_OPTS extra mount options for -o, e.g. "allow_other" (default none)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

DEMO_DIR="${VPOOL_DEMO_DIR:-demo}"
MNT="${VPOOL_MNT:-mnt}"
MOUNT_OPTS="${VPOOL_MOUNT_OPTS:-}"
DISK1="$DEMO_DIR/disk1"
DISK2="$DEMO_DIR/disk2"
LABEL=vpool-label.0
VPOOL=target/release/vpool

# 1. System dependencies (FUSE runtime + headers for the build).
ensure_build_deps
ensure_dev_fuse
ensure_cargo_path

# 2. Build.
log "cargo build --release"
cargo build --release
[[ -x $VPOOL ]] || die "$VPOOL was not built"

# 3. Demo pool (created once; detected by its label file).
if [[ -f $DISK1/$LABEL ]]; then
    log "demo pool already exists in $DISK1 and $DISK2"
else
    log "creating demo pool over $DISK1 $DISK2"
    mkdir -p "$DISK1" "$DISK2"
    "$VPOOL" create "$(realpath "$DISK1")" "$(realpath "$DISK2")"
fi

# 4. Mount.
if is_stale_mount "$MNT"; then
    warn "$MNT is a stale mount (its daemon is gone); unmounting it"
    lazy_unmount "$MNT"
fi
mkdir -p "$MNT"
if is_mounted "$MNT"; then
    log "$MNT is already mounted; leaving it as it is"
else
    log "mounting the pool at $MNT"
    mount_args=()
    if [[ -n $MOUNT_OPTS ]]; then
        mount_args+=(-o "$MOUNT_OPTS")
    fi
    "$VPOOL" mount "${mount_args[@]}" "$(realpath "$DISK1")" "$(realpath "$MNT")"
    is_mounted "$MNT" || die "vpool mount returned but $MNT is not mounted"
fi

# 5. What to do next.
hint() { printf '  %-46s # %s\n' "$1" "$2"; }
echo
echo "vpool is mounted at ./$MNT (members: ./$DISK1 ./$DISK2). Things to try:"
echo
hint "$VPOOL status ./$MNT" "pool size, members, usage"
hint "qemu-img create -f raw ./$MNT/vm1.img 20G" "thin: no space used until written"
hint "qemu-img create -f qcow2 ./$MNT/vm2.qcow2 10G" "qcow2 works too"
hint "cp --sparse=always some-disk.img ./$MNT/" "copy an existing image in"
hint "qemu-img info ./$MNT/vm1.img" "inspect an image"
hint "ls -ls ./$MNT" "apparent vs allocated size"
hint "ls ./$DISK1 ./$DISK2" "what the members hold"
echo
echo "When you are done:"
echo
hint "$VPOOL unmount ./$MNT" "flush and unmount"
hint "$VPOOL check ./$DISK1" "offline consistency check"
