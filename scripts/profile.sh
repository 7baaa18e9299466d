#!/usr/bin/env bash
# Profile the daemon under one fio workload with perf (call graphs), the
# workload a VM's disk sends by default: 4 KiB random writes, O_DIRECT, libaio,
# queue depth 32, on a 1 GiB file of a fresh two-member pool.
#
#   scripts/profile.sh OUTDIR [VPOOL-BINARY]
#
# Environment: PROF_RW (fio --rw, default randwrite), PROF_BS (default 4k),
# PROF_SECONDS (default 10), PROF_MOUNT_OPTS (vpool mount -o ...),
# PROF_DIR (scratch parent, default ./target), PROF_SIZE (file size, default
# 1G), PROF_BUFFERED=1 (psync, iodepth 1, through the page cache, one pass
# from a cold cache: the buffered sequential workloads; perf then samples the
# whole machine, since the kernel's FUSE side runs in fio's context and in
# kernel threads).
# Leaves OUTDIR/perf.data, OUTDIR/report.txt (perf report --no-children),
# OUTDIR/report-children.txt, OUTDIR/fio.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
OUTDIR="$(realpath -m "${1:?usage: scripts/profile.sh OUTDIR [VPOOL]}")"
VPOOL="$(realpath "${2:-target/release/vpool}")"
RW="${PROF_RW:-randwrite}"
BS="${PROF_BS:-4k}"
SECS="${PROF_SECONDS:-10}"
if [[ ${PROF_BUFFERED:-0} == 1 ]]; then
    IO=(--ioengine=psync --iodepth=1 --direct=0)
    WHAT="psync buffered"
else
    IO=(--ioengine=libaio --iodepth=32 --direct=1)
    WHAT="qd32 O_DIRECT"
fi
command -v perf >/dev/null || apt_install linux-perf
mkdir -p "$OUTDIR" "${PROF_DIR:-target}"
WORK="$(mktemp -d "$(realpath "${PROF_DIR:-target}")/vpool-prof.XXXXXX")"
MNT="$WORK/mnt"
cleanup() {
    set +e
    "$VPOOL" unmount "$MNT" 2>/dev/null || lazy_unmount "$MNT"
    rm -rf --one-file-system -- "$WORK"
}
trap cleanup EXIT
mkdir -p "$WORK/m1" "$WORK/m2" "$MNT"
"$VPOOL" create "$WORK/m1" "$WORK/m2" >/dev/null
"$VPOOL" mount ${PROF_MOUNT_OPTS:+-o "$PROF_MOUNT_OPTS"} "$WORK/m1" "$MNT"
SIZE="${PROF_SIZE:-1G}"
fio --name=layout --directory="$MNT" --filename=img --ioengine=psync --rw=write \
    --bs=1M --size="$SIZE" --end_fsync=1 --output=/dev/null
PID="$(pgrep -f -n "^$VPOOL mount .*$MNT")" || die "no daemon for $MNT"
if [[ ${PROF_BUFFERED:-0} == 1 ]]; then
    # One pass from a cold cache (as bench.sh's buffered sequential jobs),
    # the whole machine sampled while it runs.
    log "daemon pid $PID; fio $RW $BS $WHAT, one pass of $SIZE, perf -a meanwhile"
    echo 3 >/proc/sys/vm/drop_caches
    perf record -F 1999 -g -a -o "$OUTDIR/perf.data" -- \
        fio --name=prof --directory="$MNT" --filename=img "${IO[@]}" --rw="$RW" \
        --bs="$BS" --size="$SIZE" --end_fsync=1 --output-format=json \
        --output="$OUTDIR/fio.json" 2>/dev/null
else
    log "daemon pid $PID; fio $RW $BS $WHAT for $((SECS + 4))s, perf for ${SECS}s"
    fio --name=prof --directory="$MNT" --filename=img "${IO[@]}" \
        --rw="$RW" --bs="$BS" --size="$SIZE" --runtime=$((SECS + 4)) --time_based \
        --output-format=json --output="$OUTDIR/fio.json" &
    FIO=$!
    sleep 2
    perf record -F 1999 -g -p "$PID" -o "$OUTDIR/perf.data" -- sleep "$SECS" 2>/dev/null
    wait "$FIO"
fi
perf report -i "$OUTDIR/perf.data" --no-children --sort dso,sym --stdio --percent-limit 1.5 -g none \
    2>/dev/null | grep -v '^$' | head -150 >"$OUTDIR/report.txt"
perf report -i "$OUTDIR/perf.data" --children --sort sym --stdio --percent-limit 3 -g none \
    2>/dev/null | grep -v '^$' | head -80 >"$OUTDIR/report-children.txt"
python3 - "$OUTDIR/fio.json" <<'PY'
import json, sys
t = open(sys.argv[1]).read()
j = json.loads(t[t.index("{"):])["jobs"][0]
for d in ("read", "write"):
    if j[d]["io_bytes"]:
        print(f"{d}: {j[d]['iops']:.0f} IOPS, {j[d]['bw_bytes']/2**20:.1f} MiB/s")
PY
