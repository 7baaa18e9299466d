#!/usr/bin/env bash
# Measure what FUSE over io_uring (Linux 6.14+, module parameter
# `enable_uring`) would gain against the /dev/fuse transport vpool uses, with
# the one server that has both: libfuse's `passthrough_hp` example (kernel
# passthrough and splice off, so every read and write goes through the
# daemon, as in vpool). fuser has no io_uring transport, so vpool itself
# cannot be measured on it; this is the evidence for or against a change of
# library (docs/perf/README.md, "FUSE over io_uring").
#
#   scripts/eval-fuse-uring.sh LIBFUSE-SOURCE [OUTFILE]
#
# LIBFUSE-SOURCE: a libfuse checkout of 3.18 or later (it has io_uring
# support; this machine cannot download it, so it is passed in).
# Environment: EVAL_ROUNDS (alternated rounds per transport, default 2),
# EVAL_SECONDS (per fio job, default 8), EVAL_DIR (scratch parent on the disk
# to measure, default ./target), EVAL_THREADS (workers of the /dev/fuse
# transport, default 32 as vpool's default on 2 CPUs).
#
# Per transport and member kind (tmpfs: the transport's cost alone; the disk:
# what a VM sees): fio libaio, O_DIRECT, iodepth 32, 4 KiB random reads and
# writes (IOPS, p50/p99, daemon CPU per request), and a buffered 4 KiB random
# writer for 2 s then `syncfs` (pages written, daemon CPU). Restores
# `enable_uring` on exit. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
SRC="$(realpath "${1:?usage: scripts/eval-fuse-uring.sh LIBFUSE-SOURCE [OUTFILE]}")"
OUTFILE="$(realpath -m "${2:-target/eval-fuse-uring.txt}")"
ROUNDS="${EVAL_ROUNDS:-2}"
SECS="${EVAL_SECONDS:-8}"
THREADS="${EVAL_THREADS:-32}"
PARAM=/sys/module/fuse/parameters/enable_uring
[[ -e $PARAM ]] || die "this kernel has no FUSE over io_uring ($PARAM missing)"
[[ ${EUID:-$(id -u)} -eq 0 ]] || die "needs root (it sets $PARAM and drops caches)"
command -v fio >/dev/null || apt_install fio
command -v meson >/dev/null || apt_install meson ninja-build
pkg-config --exists liburing 2>/dev/null || apt_install liburing-dev pkg-config
command -v g++ >/dev/null || apt_install g++

mkdir -p "${EVAL_DIR:-target}"
WORK="$(mktemp -d "$(realpath "${EVAL_DIR:-target}")/vpool-uring.XXXXXX")"
SHM="$(mktemp -d /dev/shm/vpool-uring.XXXXXX)"
MNT="$WORK/mnt"
OLD="$(cat "$PARAM")"
cleanup() {
    set +e
    is_mounted "$MNT" && { umount "$MNT" || lazy_unmount "$MNT"; }
    [[ $OLD == Y ]] && echo 1 >"$PARAM" || echo 0 >"$PARAM"
    rm -rf --one-file-system -- "$WORK" "$SHM"
}
trap cleanup EXIT

log "building libfuse from $SRC"
meson setup "$WORK/build" "$SRC" -Dexamples=true -Dtests=false -Dutils=false \
    -Denable-io-uring=true >"$WORK/meson.log" 2>&1 || die "meson failed: $WORK/meson.log"
grep -Eiq "io_uring support *: *(yes|true)" "$WORK/meson.log" ||
    die "libfuse built without io_uring support (liburing too old?): $WORK/meson.log"
ninja -C "$WORK/build" example/passthrough_hp >"$WORK/ninja.log" 2>&1 ||
    die "build failed: $WORK/ninja.log"
HP="$WORK/build/example/passthrough_hp"
echo 1 >"$PARAM"
mkdir -p "$MNT" "$WORK/disk"

# daemon_cpu PID: user+system CPU of PID in ms.
daemon_cpu() { awk '{ print ($14 + $15) * 10 }' "/proc/$1/stat"; }

# round TRANSPORT MEMBERS-DIR LABEL
round() {
    local transport=$1 dir=$2 label=$3 opts pid c0 c1 rw key
    if [[ $transport == uring ]]; then
        opts=(-o io_uring -o io_uring_q_depth=32)
    else
        opts=(--num-threads "$THREADS" --clone-fd)
    fi
    [[ -f $dir/f.img ]] || fio --name=layout --filename="$dir/f.img" --rw=write --bs=1M \
        --size=1G --end_fsync=1 --output=/dev/null
    "$HP" --foreground --nopassthrough --nosplice "${opts[@]}" "$dir" "$MNT" &
    pid=$!
    for _ in $(seq 50); do is_mounted "$MNT" && break; sleep 0.1; done
    is_mounted "$MNT" || die "passthrough_hp did not mount"
    for rw in randread randwrite; do
        drop_caches
        c0=$(daemon_cpu "$pid")
        fio --name=q --filename="$MNT/f.img" --ioengine=libaio --iodepth=32 --direct=1 \
            --rw="$rw" --bs=4k --size=1G --time_based --runtime="$SECS" \
            --output-format=json --output="$WORK/fio.json" >/dev/null
        c1=$(daemon_cpu "$pid")
        key="read"
        [[ $rw == randwrite ]] && key="write"
        python3 - "$WORK/fio.json" "$key" "$((c1 - c0))" "$label $transport $rw" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0][sys.argv[2]]
p = j["clat_ns"]["percentile"]
cpu = int(sys.argv[3])
print("%-28s %8.0f IOPS  p50 %5.0f us  p99 %5.0f us  daemon %5d ms = %4.1f us/request"
      % (sys.argv[4], j["iops"], p["50.000000"] / 1e3, p["99.000000"] / 1e3,
         cpu, cpu * 1e3 / max(j["total_ios"], 1)))
PY
    done
    python3 - "$MNT/f.img" "$(daemon_cpu "$pid")" "$pid" "$label $transport buffered" <<'PY'
import ctypes, mmap, os, random, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
slots = os.fstat(fd).st_size // 4096
rng = random.Random(7)
buf = mmap.mmap(-1, 4096)
buf.write(rng.randbytes(4096))
n, end = 0, time.time() + 2
while time.time() < end:
    os.pwrite(fd, buf, rng.randrange(slots) * 4096)
    n += 1
t0 = time.time()
if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
    sys.exit("syncfs: %s" % os.strerror(ctypes.get_errno()))
sync_ms = (time.time() - t0) * 1e3
stat = open("/proc/%s/stat" % sys.argv[3]).read().split()
cpu = (int(stat[13]) + int(stat[14])) * 10 - int(sys.argv[2])
print("%-28s %8d pages in 2 s, then syncfs %4.0f ms; daemon %5d ms = %4.1f us/page"
      % (sys.argv[4], n, sync_ms, cpu, cpu * 1e3 / max(n, 1)))
PY
    umount "$MNT"
    wait "$pid" || true
}

{
    echo "# FUSE transports: /dev/fuse ($THREADS threads, clone_fd) vs io_uring (queue depth 32, a queue per CPU)"
    echo "# libfuse $(git -C "$SRC" describe --tags --always 2>/dev/null || echo '?'), $(uname -r), $(nproc) CPUs, $SECS s per fio job"
    for r in $(seq "$ROUNDS"); do
        for t in dev uring; do
            round "$t" "$SHM" "r$r tmpfs"
            round "$t" "$WORK/disk" "r$r disk"
        done
    done
} | tee "$OUTFILE"
log "results in $OUTFILE"
