#!/usr/bin/env bash
# Compare vpool with the plain member directory and with mergerfs, with fio,
# in one run on this machine. All three targets sit on the same disk.
#
#   scripts/bench.sh
#
# Environment:
#   BENCH_SIZE      file size per workload (fio syntax, default 1G)
#   BENCH_RUNTIME   seconds per job (default 12)
#   BENCH_JOBS      numjobs for the random workloads (default 2)
#   BENCH_REPEAT    rounds over all targets; the table shows each cell's median
#                   (default 1; use 3 on noisy virtual disks)
#   BENCH_TARGETS   which targets to run (default "plain mergerfs vpool");
#                   each round starts with the next one in this list
#   BENCH_DIR       parent of the scratch dir (default ./target, i.e. the disk
#                   the repo is on; avoid tmpfs). A vpool-bench.XXXXXX dir is
#                   made inside it and removed afterwards.
#   BENCH_OUT       where raw fio JSON and the table are kept
#                   (default ./target/bench-results)
#   BENCH_MERGERFS_OPTS  mergerfs -o options
#                   (default cache.files=off,dropcacheonclose=true,category.create=mfs)
#   BENCH_VPOOL_CREATE_ARGS  extra args for `vpool create` (e.g. "--extent-size 64M")
#   BENCH_VPOOL_MOUNT_OPTS   -o options for `vpool mount` (e.g. "threads=8")
#   BENCH_GROUPS    which groups of workloads (default "buffered direct qemu"):
#                   buffered: psync, iodepth 1 (page cache in play);
#                   direct: libaio, O_DIRECT, iodepth BENCH_QD (what a VM with
#                   cache=none,aio=native sends); qemu: `qemu-img bench -t none
#                   -i native` reads and writes at depth BENCH_QD
#                   stall (opt-in, vpool only): the longest latency of a 4 KiB
#                   random writer, buffered and O_DIRECT, while a full snapshot
#                   of a BENCH_STALL_SIZE image is captured and an incremental
#                   one is requested meanwhile
#                   guest (opt-in): a QEMU VM (KVM, or TCG without it) boots a
#                   Debian kernel with its root filesystem on a raw image on
#                   the target (virtio, cache=none, aio=io_uring) and runs fio
#                   inside (io_uring, O_DIRECT, iodepth BENCH_QD); see
#                   scripts/guest.sh (GUEST_* variables)
#   BENCH_QD        queue depth of the direct and qemu groups (default 32)
#   BENCH_STALL_SIZE  image size of the stall group (default 4G)
#   BENCH_QEMU_COUNT  requests per qemu-img bench run (default 50000, 4 KiB each)
#   BENCH_VPOOL     a vpool binary to measure instead of building one (to
#                   compare builds: keep a copy of an earlier one)
#   BENCH_REPORT_ONLY  1: print the table of the results already in BENCH_OUT
#   BENCH_CARGO_FLAGS flags for the release build (e.g. "--all-features";
#                   the feature is inert unless its environment variables
#                   are set)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

SIZE="${BENCH_SIZE:-1G}"
RUNTIME="${BENCH_RUNTIME:-12}"
JOBS="${BENCH_JOBS:-2}"
REPEAT="${BENCH_REPEAT:-1}"
ROUND=1
read -r -a TARGETS <<<"${BENCH_TARGETS:-plain mergerfs vpool}"
for t in "${TARGETS[@]}"; do
    case $t in
    plain | mergerfs | vpool) ;;
    *) die "BENCH_TARGETS: unknown target '$t' (plain, mergerfs, vpool)" ;;
    esac
done
BASE="${BENCH_DIR:-$PWD/target}"
OUT="${BENCH_OUT:-$PWD/target/bench-results}"
MERGERFS_OPTS="${BENCH_MERGERFS_OPTS:-cache.files=off,dropcacheonclose=true,category.create=mfs}"
read -r -a VPOOL_CREATE_ARGS <<<"${BENCH_VPOOL_CREATE_ARGS:-}"
VPOOL="${BENCH_VPOOL:-$PWD/target/release/vpool}"
read -r -a GROUPS_ <<<"${BENCH_GROUPS:-buffered direct qemu}"
QD="${BENCH_QD:-32}"
QEMU_COUNT="${BENCH_QEMU_COUNT:-50000}"
STALL_SIZE="${BENCH_STALL_SIZE:-4G}"
read -r -a CARGO_FLAGS <<<"${BENCH_CARGO_FLAGS:-}"
read -r -a VPOOL_MOUNT_ARGS <<<"${BENCH_VPOOL_MOUNT_OPTS:+-o $BENCH_VPOOL_MOUNT_OPTS}"

# ---------------------------------------------------------------- report
# The table of the results in $OUT; BENCH_REPORT_ONLY=1 prints it again from
# an earlier run's files (same BENCH_OUT) without running anything.
report() {
{
    echo "fio $(fio --version), size $SIZE, ${RUNTIME}s/job, groups: ${GROUPS_[*]};" \
        "buffered: psync, numjobs=$JOBS for random jobs; direct: libaio" \
        "iodepth=$QD O_DIRECT numjobs=1; qemu: qemu-img bench -t none -i native" \
        "-d $QD -s 4096 -c $QEMU_COUNT; guest: fio io_uring iodepth=$QD O_DIRECT" \
        "in a QEMU VM on a raw image (cache=none, aio=io_uring); median of $REPEAT round(s)," \
        "$(nproc) CPUs, $(uname -r)"
    echo
    python3 - "$OUT" "${TARGETS[@]}" <<'PY'
import glob, json, os, re, sys

out, targets = sys.argv[1], sys.argv[2:]
# (file stem, direction(s), label)
workloads = [
    ("seqwrite", "write", "seq write 1M"),
    ("seqread", "read", "seq read 1M"),
    ("randread", "read", "rand read 4K"),
    ("randwrite", "write", "rand write 4K"),
    ("randread_direct", "read", "rand read 4K direct"),
    ("qd_randread", "read", "QD rand read 4K"),
    ("qd_randwrite", "write", "QD rand write 4K"),
    ("qd_randrw", "read+write", "QD rand 70/30 4K"),
    ("qd_seqread", "read", "QD seq read 1M"),
    ("qd_seqwrite", "write", "QD seq write 1M"),
    ("qemu_read", "qemu", "qemu-img bench read 4K"),
    ("qemu_write", "qemu", "qemu-img bench write 4K"),
    ("guest_randread", "read", "guest fio rand read 4K"),
    ("guest_randwrite", "write", "guest fio rand write 4K"),
    ("guest_randrw", "read+write", "guest fio rand 70/30 4K"),
    ("guest_seqread", "read", "guest fio seq read 1M"),
]

def load_fio(path, rw):
    """(MiB/s, IOPS, p50 us, p99 us) of one fio result; a mix sums its
    directions and takes the worse percentile."""
    try:
        text = open(path).read()
        data = json.loads(text[text.index("{"):])  # skip any warnings before the JSON
        job = data["jobs"][0]
        bw = iops = 0.0
        p50 = p99 = 0.0
        for d in rw.split("+"):
            j = job[d]
            bw += j["bw_bytes"] / 2**20
            iops += j["iops"]
            pct = j.get("clat_ns", {}).get("percentile", {})
            p50 = max(p50, pct.get("50.000000", 0) / 1000)
            p99 = max(p99, pct.get("99.000000", 0) / 1000)
        return bw, iops, p50, p99
    except (OSError, ValueError, KeyError, IndexError):
        return None

def load_qemu(path):
    """(MiB/s, IOPS) from the request count and `Run completed in N seconds.`"""
    try:
        text = open(path).read()
        m = re.search(r"Sending (\d+) \w+ requests, (\d+) bytes each", text)
        n, bs = int(m.group(1)), int(m.group(2))
        t = float(re.search(r"Run completed in ([0-9.]+) seconds", text).group(1))
        return n * bs / t / 2**20, n / t, 0.0, 0.0
    except (OSError, ValueError, AttributeError):
        return None

def load(target, name, rw):
    """Median over rounds (by bandwidth) of one target's workload."""
    ext = "txt" if rw == "qemu" else "json"
    paths = glob.glob(os.path.join(out, f"{target}_{name}_r*.{ext}"))
    runs = sorted(
        r for r in ((load_qemu(p) if rw == "qemu" else load_fio(p, rw)) for p in paths)
        if r is not None
    )
    return runs[len(runs) // 2] if runs else None

def cell(r):
    if r is None:
        return "n/a"
    s = f"{r[0]:.1f} MiB/s, {r[1]:.0f} IOPS"
    if r[3]:
        s += f", p50 {r[2]:.0f} us, p99 {r[3]:.0f} us"
    return s

def ratio(a, b):
    return "n/a" if a is None or b is None or b[0] == 0 else f"{a[0] / b[0]:.2f}"

head = ["workload"] + targets
if "vpool" in targets and "plain" in targets:
    head.append("vpool/plain")
if "vpool" in targets and "mergerfs" in targets:
    head.append("vpool/mergerfs")
rows = []
for name, rw, label in workloads:
    r = {t: load(t, name, rw) for t in targets}
    if all(v is None for v in r.values()):
        continue
    row = [label] + [cell(r[t]) for t in targets]
    if "vpool/plain" in head:
        row.append(ratio(r["vpool"], r["plain"]))
    if "vpool/mergerfs" in head:
        row.append(ratio(r["vpool"], r["mergerfs"]))
    rows.append(row)

print("| " + " | ".join(head) + " |")
print("|" + "|".join("---" for _ in head) + "|")
for row in rows:
    print("| " + " | ".join(row) + " |")

for mode in ("buffered", "direct"):
    runs = []
    for p in sorted(glob.glob(os.path.join(out, f"vpool_stall_{mode}_r*.json"))):
        try:
            runs.append(json.load(open(p)))
        except (OSError, ValueError):
            pass
    runs = [r for r in runs if r.get("max_ms") is not None]
    if runs:
        worst = sorted(r["max_ms"] for r in runs)
        print(f"\nvpool writer stall ({mode} 4K writer, full snapshot + incremental requested meanwhile):"
              f" longest {worst[len(worst) // 2]:.1f} ms (median of {len(runs)};"
              f" all: {', '.join(f'{w:.1f}' for w in worst)}), p99"
              f" {sorted(r['p99_ms'] for r in runs)[len(runs) // 2]:.2f} ms,"
              f" {sum(r['seconds'] for r in runs) / len(runs):.1f} s of snapshots")
        steal = [r["steal_pct"] for r in runs if r.get("steal_pct") is not None]
        if steal:
            print(f"  host steal (the CPUs' time the host ran something else) during those rounds:"
                  f" {', '.join(f'{x:.1f} %' for x in steal)}")
PY
} | tee "$OUT/table.md"
}

if [[ ${BENCH_REPORT_ONLY:-0} == 1 ]]; then
    report
    exit 0
fi

# ---------------------------------------------------------------- setup
want() {
    local t
    for t in "${TARGETS[@]}"; do [[ $t == "$1" ]] && return 0; done
    return 1
}

group() {
    local g
    for g in "${GROUPS_[@]}"; do [[ $g == "$1" ]] && return 0; done
    return 1
}

pkgs=()
command -v fio >/dev/null 2>&1 || pkgs+=(fio)
command -v fusermount3 >/dev/null 2>&1 || pkgs+=(fuse3)
if group qemu && ! command -v qemu-img >/dev/null 2>&1; then
    pkgs+=(qemu-utils)
fi
if group guest; then
    # shellcheck source=scripts/guest.sh
    . scripts/guest.sh
    GUEST_QD="$QD"
    GUEST_RUNTIME="$RUNTIME"
fi
if want mergerfs && ! command -v mergerfs >/dev/null 2>&1; then
    pkgs+=(mergerfs)
fi
apt_install "${pkgs[@]}"
command -v python3 >/dev/null 2>&1 || die "python3 is needed to print the results"
ensure_dev_fuse
if want vpool && [[ -n ${BENCH_VPOOL:-} ]]; then
    [[ -x $VPOOL ]] || die "BENCH_VPOOL=$VPOOL is not an executable"
    ensure_build_deps
elif want vpool; then
    ensure_cargo_path
    ensure_build_deps
    log "cargo build --release ${CARGO_FLAGS[*]}"
    cargo build --release "${CARGO_FLAGS[@]}"
    [[ -x $VPOOL ]] || die "$VPOOL was not built"
fi

mkdir -p "$BASE" "$OUT"
if group guest; then
    # Kept across runs: a kernel, busybox and fio for the VM.
    GUEST_KIT="$(realpath "$BASE")/guest-kit"
    guest_kit "$GUEST_KIT"
fi
WORK="$(mktemp -d "$(realpath "$BASE")/vpool-bench.XXXXXX")"
if [[ $(stat -f -c %T "$WORK") == tmpfs ]]; then
    warn "$WORK is on tmpfs: numbers will not reflect a disk (set BENCH_DIR)"
fi
MOUNTS=()

cleanup() {
    local rc=$? m busy=0
    set +e
    for m in "${MOUNTS[@]}"; do
        if is_mounted "$m"; then
            log "cleanup: lazy unmount $m"
            lazy_unmount "$m"
        fi
        is_mounted "$m" && busy=1
    done
    if [[ $busy -eq 0 ]]; then
        rm -rf --one-file-system -- "$WORK"
    else
        warn "leaving $WORK behind: something is still mounted in it"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# fio_job TARGET WORKLOAD DIR FIO-ARGS...: one job, JSON kept in $OUT.
fio_job() {
    local target="$1" workload="$2" dir="$3"
    shift 3
    local json="$OUT/${target}_${workload}_r${ROUND}.json"
    log "[$target] $workload (round $ROUND/$REPEAT)"
    # A target that refuses a workload (mergerfs passes O_DIRECT on with its
    # unaligned buffers: EINVAL) shows n/a; the run goes on.
    if ! fio --name="$workload" --directory="$dir" --ioengine=psync \
        --fallocate=none --group_reporting \
        --output-format=json --output="$json" "$@" 2>"$json.err"; then
        warn "[$target] $workload failed: $(grep -m1 -v '^$' "$json.err" || true)"
        mv -f -- "$json" "$json.failed" 2>/dev/null || true
    fi
    rm -f -- "$json.err"
}

# qemu_bench TARGET WORKLOAD FILE ARGS...: one `qemu-img bench` run at depth
# QD with O_DIRECT and Linux native AIO; the time it prints is kept in $OUT.
qemu_bench() {
    local target="$1" workload="$2" file="$3"
    shift 3
    log "[$target] qemu-img bench $workload (round $ROUND/$REPEAT)"
    if ! qemu-img bench -f raw -t none -i native -d "$QD" -s 4096 \
        -c "$QEMU_COUNT" "$@" "$file" >"$OUT/${target}_${workload}_r${ROUND}.txt" 2>&1; then
        warn "[$target] qemu-img bench $workload failed: $(tail -n1 "$OUT/${target}_${workload}_r${ROUND}.txt")"
    fi
}

# writer.py FILE LOG MODE: 4 KiB random writes, one at a time (MODE direct:
# O_DIRECT from an aligned buffer; buffered: plain pwrite), until SIGTERM;
# logs the start (unix ns) and latency (ns) of every write as JSON.
WRITER_PY='
import array, json, mmap, os, random, signal, sys, time
path, logpath, mode = sys.argv[1], sys.argv[2], sys.argv[3]
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
fd = os.open(path, os.O_WRONLY | (os.O_DIRECT if mode == "direct" else 0))
slots = os.fstat(fd).st_size // 4096
rng = random.Random(7)
buf = mmap.mmap(-1, 4096)
buf.write(rng.randbytes(4096))
starts, lats = array.array("q"), array.array("q")
open(logpath + ".ready", "w").close()
while not stop:
    off = rng.randrange(slots) * 4096
    t = time.time_ns()
    p0 = time.perf_counter_ns()
    os.pwrite(fd, buf, off)
    lats.append(time.perf_counter_ns() - p0)
    starts.append(t)
os.close(fd)
json.dump({"start_ns": starts.tolist(), "lat_ns": lats.tolist()}, open(logpath, "w"))
'

# stall_run TARGET MNT MODE: a full snapshot of MNT/stall.img with an
# incremental one requested 2 s into its capture, under the writer; keeps
# the writes that overlap the snapshots as ${target}_stall_MODE_rN.json.
stall_run() {
    local target="$1" mnt="$2" mode="$3" log pid t0 t1 s0 s1 full incr
    log="$OUT/${target}_stall_${mode}_r${ROUND}.log"
    rm -f -- "$log" "$log.ready"
    log "[$target] writer stall ($mode) during a full snapshot of $STALL_SIZE + an incremental (round $ROUND/$REPEAT)"
    python3 -c "$WRITER_PY" "$mnt/stall.img" "$log" "$mode" &
    pid=$!
    while [[ ! -e $log.ready ]]; do sleep 0.1; done
    sleep 1
    # CPU time the host took from this machine (steal) over the round: a
    # vCPU not running stalls the writer whatever the filesystem does.
    s0="$(awk '/^cpu /{print $9}' /proc/stat)"
    t0="$(date +%s.%N)"
    "$VPOOL" snapshot create --kind full --wait "$mnt" "full-$mode-$ROUND" >/dev/null 2>&1 &
    full=$!
    sleep 2
    "$VPOOL" snapshot create --kind incremental --wait "$mnt" "incr-$mode-$ROUND" \
        >/dev/null 2>&1 &
    incr=$!
    wait "$full" || warn "[$target] the full snapshot failed"
    wait "$incr" || warn "[$target] the incremental snapshot failed"
    t1="$(date +%s.%N)"
    s1="$(awk '/^cpu /{print $9}' /proc/stat)"
    sleep 1
    kill -TERM "$pid"
    wait "$pid" || warn "[$target] the writer failed"
    python3 - "$log" "$t0" "$t1" "$mode" "$((s1 - s0))" "$(getconf CLK_TCK)" "$(nproc)" \
        >"$OUT/${target}_stall_${mode}_r${ROUND}.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
t0, t1 = float(sys.argv[2]) * 1e9, float(sys.argv[3]) * 1e9
steal_ms = int(sys.argv[5]) * 1000 / int(sys.argv[6])
steal_pct = 100 * steal_ms / ((t1 - t0) / 1e6 * int(sys.argv[7]))
pairs = [(s, l) for s, l in zip(d["start_ns"], d["lat_ns"]) if s < t1 and s + l > t0]
lats = sorted(l for _, l in pairs)
n = len(lats)
# The five longest, with when they began (seconds after the full snapshot
# was asked for; the incremental was asked for at 2 s).
top = sorted(pairs, key=lambda p: -p[1])[:5]
print(json.dumps({"mode": sys.argv[4], "writes": n, "seconds": (t1 - t0) / 1e9,
                  "max_ms": lats[-1] / 1e6 if n else None,
                  "p99_ms": lats[min(n - 1, int(n * 0.99))] / 1e6 if n else None,
                  "steal_ms": round(steal_ms), "steal_pct": round(steal_pct, 1),
                  "longest": [[round((s - t0) / 1e9, 3), round(l / 1e6, 1)] for s, l in top]}))
PY
    rm -f -- "$log" "$log.ready"
}

# run_workloads TARGET DIR
run_workloads() {
    local target="$1" dir="$2"
    local timed=(--runtime="$RUNTIME" --time_based)

    if group buffered; then
        # Sequential 1 MiB write of SIZE (capped at RUNTIME), fsync at the end so
        # the page cache cannot absorb it.
        fio_job "$target" seqwrite "$dir" --filename=seq.dat --rw=write --bs=1M \
            --size="$SIZE" --end_fsync=1 --runtime="$RUNTIME"
        rm -f -- "$dir/seq.dat"
    fi

    # Lay out the file the read/random jobs use (not measured).
    if group buffered || group direct || group qemu; then
        log "[$target] laying out $SIZE read file"
        fio --name=layout --directory="$dir" --filename=read.dat --ioengine=psync \
            --fallocate=none --rw=write --bs=1M --size="$SIZE" --end_fsync=1 \
            --output=/dev/null
    fi

    if group buffered; then
        drop_caches
        fio_job "$target" seqread "$dir" --filename=read.dat --rw=read --bs=1M \
            --size="$SIZE" --runtime="$RUNTIME"

        drop_caches
        fio_job "$target" randread "$dir" --filename=read.dat --rw=randread \
            --bs=4k --size="$SIZE" --numjobs="$JOBS" "${timed[@]}"

        drop_caches
        fio_job "$target" randwrite "$dir" --filename=read.dat --rw=randwrite \
            --bs=4k --size="$SIZE" --numjobs="$JOBS" --end_fsync=1 "${timed[@]}"

        drop_caches
        fio_job "$target" randread_direct "$dir" --filename=read.dat \
            --rw=randread --bs=4k --size="$SIZE" --numjobs="$JOBS" --direct=1 \
            "${timed[@]}"
    fi

    if group direct; then
        # What a VM with cache=none and aio=native sends: O_DIRECT, many
        # requests in flight from one submitter.
        local qd=(--ioengine=libaio --iodepth="$QD" --direct=1 --numjobs=1
            --size="$SIZE" "${timed[@]}")
        drop_caches
        fio_job "$target" qd_randread "$dir" --filename=read.dat --rw=randread \
            --bs=4k "${qd[@]}"
        fio_job "$target" qd_randwrite "$dir" --filename=read.dat --rw=randwrite \
            --bs=4k "${qd[@]}"
        fio_job "$target" qd_randrw "$dir" --filename=read.dat --rw=randrw \
            --rwmixread=70 --bs=4k "${qd[@]}"
        drop_caches
        fio_job "$target" qd_seqread "$dir" --filename=read.dat --rw=read \
            --bs=1M "${qd[@]}"
        fio_job "$target" qd_seqwrite "$dir" --filename=read.dat --rw=write \
            --bs=1M "${qd[@]}"
    fi

    if group qemu; then
        qemu_bench "$target" qemu_read "$dir/read.dat"
        qemu_bench "$target" qemu_write "$dir/read.dat" -w
    fi

    rm -f -- "$dir/read.dat"

    if group guest; then
        log "[$target] guest VM on $dir/guest.img (round $ROUND/$REPEAT)"
        guest_image "$GUEST_KIT" "$dir/guest.img"
        guest_run "$GUEST_KIT" "$dir/guest.img" "$OUT/${target}_guest_r${ROUND}.log"
        guest_split "$OUT/${target}_guest_r${ROUND}.log" "$OUT/${target}" "_r${ROUND}"
        rm -f -- "$dir/guest.img"
    fi

    if group stall && [[ $target == vpool ]]; then
        log "[$target] laying out the $STALL_SIZE stall image"
        fio --name=layout --directory="$dir" --filename=stall.img --ioengine=psync \
            --rw=write --bs=1M --size="$STALL_SIZE" --refill_buffers --end_fsync=1 \
            --output=/dev/null
        stall_run "$target" "$dir" buffered
        stall_run "$target" "$dir" direct
        rm -f -- "$dir/stall.img"
    fi
}

# ---------------------------------------------------------------- targets
rm -f -- "$OUT"/*.json "$OUT"/*.txt "$OUT"/*.failed
log "scratch dir $WORK; size $SIZE; ${RUNTIME}s per job; results in $OUT"

# run_target TARGET: one round of TARGET, on a fresh directory, pool or mount.
run_target() {
    # The previous target's dirty data is written back first, so that it does
    # not land on this target's jobs.
    drop_caches
    case $1 in
    plain)
        mkdir -p "$WORK/plain"
        run_workloads plain "$WORK/plain"
        ;;
    mergerfs)
        mkdir -p "$WORK/mfs1" "$WORK/mfs2" "$WORK/mnt-mergerfs"
        MOUNTS+=("$WORK/mnt-mergerfs")
        log "mergerfs $(mergerfs --version 2>&1 | head -n1) -o $MERGERFS_OPTS"
        mergerfs -o "$MERGERFS_OPTS,fsname=bench-mergerfs" \
            "$WORK/mfs1:$WORK/mfs2" "$WORK/mnt-mergerfs"
        is_mounted "$WORK/mnt-mergerfs" || die "mergerfs did not mount"
        run_workloads mergerfs "$WORK/mnt-mergerfs"
        fusermount3 -u "$WORK/mnt-mergerfs"
        ;;
    vpool)
        rm -rf -- "$WORK/vp1" "$WORK/vp2" # a fresh pool each round
        mkdir -p "$WORK/vp1" "$WORK/vp2" "$WORK/mnt-vpool"
        MOUNTS+=("$WORK/mnt-vpool")
        "$VPOOL" create "${VPOOL_CREATE_ARGS[@]}" "$WORK/vp1" "$WORK/vp2"
        "$VPOOL" mount "${VPOOL_MOUNT_ARGS[@]}" "$WORK/vp1" "$WORK/mnt-vpool"
        is_mounted "$WORK/mnt-vpool" || die "vpool did not mount"
        run_workloads vpool "$WORK/mnt-vpool"
        "$VPOOL" unmount "$WORK/mnt-vpool"
        ;;
    esac
}

# Round r starts with the r-th target (plain mergerfs vpool, then mergerfs
# vpool plain, ...): this virtual disk stays slower for a while after a
# target's heavy writes, and a fixed order would always hand that to the same
# target (stop 28 measured 473-802 MiB/s for vpool's sequential write right
# after 16 GiB written, 777-848 MiB/s on an idle disk).
for ((ROUND = 1; ROUND <= REPEAT; ROUND++)); do
    for ((i = 0; i < ${#TARGETS[@]}; i++)); do
        run_target "${TARGETS[(i + ROUND - 1) % ${#TARGETS[@]}]}"
    done
done

report
log "raw fio JSON and table.md are in $OUT"
