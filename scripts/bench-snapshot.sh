#!/usr/bin/env bash
# Snapshot benchmark: vpool snapshots against restic and borg backing up the
# same VM image, plus the writer stall during a snapshot and the read speed of
# a snapshot, in one run on this machine. Everything sits on the same disk.
#
#   scripts/bench-snapshot.sh
#
# What it does:
#   1. builds a base image once: a sparse IMAGE_SIZE raw file holding an ext4
#      filesystem filled with part of /usr (loop mount), so the image is real
#      data, partly sparse; it is kept in BENCH_DIR and reused by later runs;
#   2. copies it (cp --sparse=always) into a 2-member vpool and into a plain
#      directory, so every tool backs up identical bytes;
#   3. vpool: full snapshot s1, change step, incremental snapshot s2;
#      restic and borg: full backup, change step, incremental backup
#      (the change step rewrites CHANGE_PCT % of the image in scattered
#      4 KiB and 64 KiB writes of random data; a fixed seed makes the vpool
#      copy and the plain copy receive the same offsets and bytes);
#   4. the longest latency of a 4 KiB O_DIRECT random writer on the vpool
#      image while incremental snapshot s3 is taken, against the same writer
#      without a snapshot (and, for reference, on the plain copy);
#   5. cold-cache sequential read of .snapshots/s2/img against the live image;
#   6. streams: full send of s1 and incremental send of s2 to files, each
#      received into a second pool, a `send | receive` pipeline into a third
#      pool (MiB/s), and `vpool stream restore` of the two streams into a plain
#      directory, against `restic restore` of the same image;
#   7. prints a table and checks the ratios against the snapshot targets.
# The page cache is dropped before every timed backup, snapshot and read.
# Needs root (loop mount, FUSE, drop_caches); about 6-9 minutes on 2 CPUs.
#
# Environment:
#   BENCH_DIR      where the base image and the scratch dir go (default
#                  ./target/bench-snapshot: the disk the repo is on, and
#                  ignored by git). A run.XXXXXX dir is made inside it and
#                  removed afterwards; the base image stays for the next run.
#   BENCH_OUT      where the result table is written
#                  (default ./target/bench-snapshot-results.txt)
#   IMAGE_SIZE     size of the raw image (default 4G)
#   FILL_PCT       how much to fill it: this % of the smaller of the
#                  filesystem's free space and /usr (default 65)
#   CHANGE_PCT     % of the image size rewritten by each change step (default 2)
#   BENCH_SEED     seed of the change steps and the writer (default 42)
#   STALL_BASELINE_SECS  seconds of the writer without a snapshot (default 10)
#   READ_ROUNDS    cold reads of each file; the best is reported (default 1)
#   VPOOL          1 (default) to run the vpool part; 0 to skip it (restic and
#                  borg only; vpool cells show n/a)
#   VPOOL_BIN      vpool binary to use; when set, cargo build is skipped
#                  (default: target/release/vpool, built with cargo)
#   BENCH_VPOOL_CREATE_ARGS  extra args for `vpool create`
#   BENCH_VPOOL_MOUNT_OPTS   -o options for `vpool mount` (default none)
#   BENCH_REBUILD_BASE  1 to rebuild the base image even if one is kept
#   BENCH_KEEP     1 to keep the scratch dir (images, repos, logs)
#   BENCH_STRICT   1 to exit with status 1 when a target is missed
#   RESTIC_PASSWORD  password of the scratch restic repo (default "bench")
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

IMAGE_SIZE="${IMAGE_SIZE:-4G}"
FILL_PCT="${FILL_PCT:-65}"
CHANGE_PCT="${CHANGE_PCT:-2}"
SEED="${BENCH_SEED:-42}"
STALL_BASELINE_SECS="${STALL_BASELINE_SECS:-10}"
READ_ROUNDS="${READ_ROUNDS:-1}"
RUN_VPOOL="${VPOOL:-1}"
BASE="${BENCH_DIR:-$PWD/target/bench-snapshot}"
OUT="${BENCH_OUT:-$PWD/target/bench-snapshot-results.txt}"
read -r -a VPOOL_CREATE_ARGS <<<"${BENCH_VPOOL_CREATE_ARGS:-}"
VPOOL_MOUNT_OPTS="${BENCH_VPOOL_MOUNT_OPTS:-}"
export RESTIC_PASSWORD="${RESTIC_PASSWORD:-bench}"

[[ ${EUID:-$(id -u)} -eq 0 ]] || die "run as root (loop mount, FUSE mounts, drop_caches)"
[[ $RUN_VPOOL == 0 || $RUN_VPOOL == 1 ]] || die "VPOOL must be 0 or 1"

# ---------------------------------------------------------------- setup
pkgs=()
command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
command -v mkfs.ext4 >/dev/null 2>&1 || pkgs+=(e2fsprogs)
command -v restic >/dev/null 2>&1 || pkgs+=(restic)
command -v borg >/dev/null 2>&1 || pkgs+=(borgbackup)
apt_install "${pkgs[@]}"
python3 -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
    die "python3 >= 3.9 is needed (random.randbytes)"

if [[ $RUN_VPOOL == 1 ]]; then
    ensure_dev_fuse
    if [[ -n ${VPOOL_BIN:-} ]]; then
        log "using VPOOL_BIN=$VPOOL_BIN (no cargo build)"
    else
        VPOOL_BIN="$PWD/target/release/vpool"
        ensure_cargo_path
        ensure_build_deps
        log "cargo build --release"
        cargo build --release
    fi
    [[ -x $VPOOL_BIN ]] || die "$VPOOL_BIN is not an executable"
    "$VPOOL_BIN" snapshot --help >/dev/null 2>&1 ||
        die "$VPOOL_BIN has no 'snapshot' command yet (VPOOL=0 runs restic and borg only)"
fi

IMAGE_BYTES="$(numfmt --from=iec "$IMAGE_SIZE")" || die "bad IMAGE_SIZE: $IMAGE_SIZE"
mkdir -p "$BASE" "$(dirname "$OUT")"
BASE="$(realpath "$BASE")"
WORK="$(mktemp -d "$BASE/run.XXXXXX")"
if [[ $(stat -f -c %T "$WORK") == tmpfs ]]; then
    warn "$WORK is on tmpfs: numbers will not reflect a disk (set BENCH_DIR)"
fi
MNT="$WORK/mnt"
VP1="$WORK/vp1"
VP2="$WORK/vp2"
MNT2="$WORK/mnt2"
VP3="$WORK/vp3"
MNT3="$WORK/mnt3"
VP4="$WORK/vp4"
MOUNTS=()
WRITER_PID=""

cleanup() {
    local rc=$? m busy=0
    set +e
    if [[ -n $WRITER_PID ]] && kill -0 "$WRITER_PID" 2>/dev/null; then
        kill "$WRITER_PID" 2>/dev/null
        wait "$WRITER_PID" 2>/dev/null
    fi
    for m in "${MOUNTS[@]}"; do
        is_mounted "$m" || continue
        log "cleanup: unmount $m"
        if [[ $m == "$MNT" ]]; then
            timeout 120 "$VPOOL_BIN" unmount "$m" >/dev/null 2>&1
        else
            umount "$m" 2>/dev/null
        fi
        if is_mounted "$m"; then
            log "cleanup: lazy unmount $m"
            lazy_unmount "$m"
        fi
        is_mounted "$m" && busy=1
    done
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then
        log "keeping $WORK (BENCH_KEEP=1)"
    elif [[ $busy -eq 0 ]]; then
        rm -rf --one-file-system -- "$WORK"
    else
        warn "leaving $WORK behind: something is still mounted in it"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Wall-clock timing: `timed NAME CMD...` runs CMD and stores its duration in
# seconds in R[NAME.time].
declare -A R=()
now() { printf '%s\n' "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
timed() {
    local name="$1" t0 t1
    shift
    t0="$(now)"
    "$@"
    t1="$(now)"
    R[$name.time]="$(elapsed "$t0" "$t1")"
    log "$name: ${R[$name.time]} s"
}
du_bytes() { du -sb -- "$1" | cut -f1; }

# ---------------------------------------------------------------- helpers (python)
PY="$WORK/py"
mkdir -p "$PY"

# change.py FILE PCT SEED: rewrite PCT % of FILE's size, half of the bytes as
# 4 KiB writes and half as 64 KiB writes, at random offsets aligned to the
# write size, with random bytes; fsync at the end. Same arguments => same
# offsets and bytes.
cat >"$PY/change.py" <<'EOF'
import json, os, random, sys

path, pct, seed = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
size = os.fstat(fd).st_size
rng = random.Random(seed)
half = int(size * pct / 100) // 2
writes = []
for bs in (4096, 65536):
    for _ in range(max(1, half // bs)):
        writes.append((rng.randrange(size // bs) * bs, bs))
rng.shuffle(writes)
blocks = set()
for off, bs in writes:
    os.pwrite(fd, rng.randbytes(bs), off)
    blocks.update(range(off // 4096, (off + bs) // 4096))
os.fsync(fd)
os.close(fd)
print(json.dumps({"writes": len(writes), "bytes": sum(b for _, b in writes),
                  "blocks_4k": len(blocks)}))
EOF

# writer.py FILE LOG SEED MAXSECS: 4 KiB random writes, one at a time, on an
# O_DIRECT fd (aligned mmap buffer) until SIGTERM or MAXSECS; writes the start
# time (unix ns) and latency (ns) of every write to LOG as JSON.
cat >"$PY/writer.py" <<'EOF'
import array, json, mmap, os, random, signal, sys, time

path, logpath, seed, maxsecs = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)

mode = "O_DIRECT"
try:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
except OSError as e:
    print(f"writer: O_DIRECT open failed ({e}); using O_DSYNC", file=sys.stderr)
    mode = "O_DSYNC"
    fd = os.open(path, os.O_WRONLY | os.O_DSYNC)
slots = os.fstat(fd).st_size // 4096
rng = random.Random(seed)
buf = mmap.mmap(-1, 4096)          # page aligned, as O_DIRECT needs
buf.write(rng.randbytes(4096))
starts, lats = array.array("q"), array.array("q")
open(logpath + ".ready", "w").close()
deadline = time.monotonic() + maxsecs
while not stop and time.monotonic() < deadline:
    off = rng.randrange(slots) * 4096
    t = time.time_ns()
    p0 = time.perf_counter_ns()
    os.pwrite(fd, buf, off)
    lats.append(time.perf_counter_ns() - p0)
    starts.append(t)
os.close(fd)
with open(logpath, "w") as f:
    json.dump({"mode": mode, "start_ns": starts.tolist(), "lat_ns": lats.tolist()}, f)
EOF

# stall.py LOG [T0 T1]: summary of a writer log; with T0 T1 (unix seconds),
# only the writes that overlap [T0, T1].
cat >"$PY/stall.py" <<'EOF'
import json, sys

d = json.load(open(sys.argv[1]))
pairs = list(zip(d["start_ns"], d["lat_ns"]))
if len(sys.argv) > 3:
    t0, t1 = float(sys.argv[2]) * 1e9, float(sys.argv[3]) * 1e9
    pairs = [(s, l) for s, l in pairs if s < t1 and s + l > t0]
lats = sorted(l for _, l in pairs)
n = len(lats)
res = {"mode": d["mode"], "writes": n}
if n:
    res.update(max_ms=lats[-1] / 1e6, p99_ms=lats[min(n - 1, int(n * 0.99))] / 1e6,
               mean_ms=sum(lats) / n / 1e6)
    span = (pairs[-1][0] + pairs[-1][1] - pairs[0][0]) / 1e9
    res["iops"] = n / span if span > 0 else 0.0
print(json.dumps(res))
EOF

# jget JSON KEY: one top-level key of a JSON object (empty when missing).
jget() {
    python3 -c 'import json,sys; v=json.loads(sys.argv[1]).get(sys.argv[2]); print("" if v is None else v)' "$1" "$2"
}

change_step() { # FILE STEP
    local res
    res="$(python3 "$PY/change.py" "$1" "$CHANGE_PCT" "$((SEED + $2))")"
    log "change step $2 on $1: $res"
    R[change$2]="$res"
}

# writer_run FILE LOG SECS SEED: the writer in the foreground for SECS.
writer_run() {
    python3 "$PY/writer.py" "$1" "$2" "$4" "$3"
}

# writer_start FILE LOG SEED: the writer in the background, until writer_stop.
writer_start() {
    rm -f -- "$2" "$2.ready"
    python3 "$PY/writer.py" "$1" "$2" "$3" 900 &
    WRITER_PID=$!
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -e $2.ready ]] && return 0
        kill -0 "$WRITER_PID" 2>/dev/null || die "the writer exited early"
        sleep 0.1
    done
    die "the writer did not start"
}
writer_stop() {
    kill -TERM "$WRITER_PID"
    wait "$WRITER_PID" || die "the writer failed"
    WRITER_PID=""
}

# read_mibs FILE: best cold-cache sequential read speed (MiB/s) of FILE over
# READ_ROUNDS rounds.
read_mibs() {
    local f="$1" size t0 t1 best=0 cur i
    size="$(stat -c %s -- "$f")"
    for ((i = 0; i < READ_ROUNDS; i++)); do
        drop_caches
        t0="$(now)"
        dd if="$f" of=/dev/null bs=1M status=none
        t1="$(now)"
        cur="$(awk -v s="$size" -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", s / 1048576 / (b - a) }')"
        log "read $f: $cur MiB/s"
        best="$(awk -v a="$best" -v b="$cur" 'BEGIN { print (b > a) ? b : a }')"
    done
    echo "$best"
}

# ---------------------------------------------------------------- base image
BASE_IMG="$BASE/base.img"
STAMP="size=$IMAGE_BYTES fill=$FILL_PCT v1"

build_base_image() {
    local tmp="$BASE_IMG.tmp" lmnt="$WORK/loop" usr_bytes list="$WORK/usr-files"
    rm -f -- "$BASE_IMG" "$BASE_IMG.stamp" "$tmp"
    log "building the base image: $IMAGE_SIZE sparse raw file, ext4, part of /usr"
    truncate -s "$IMAGE_BYTES" "$tmp"
    mkfs.ext4 -F -q -E lazy_itable_init=0,lazy_journal_init=0 -L vpool-bench "$tmp"
    mkdir -p "$lmnt"
    MOUNTS+=("$lmnt")
    mount -o loop "$tmp" "$lmnt" || die "loop mount of $tmp failed"
    usr_bytes="$(du -sb -x /usr | cut -f1)"
    # Files and symlinks of /usr in path order, up to the budget (sizes
    # rounded up to 4 KiB); NUL-separated for tar.
    python3 - "$lmnt" "$usr_bytes" "$FILL_PCT" "$list" <<'EOF'
import os, sys
mnt, usr_bytes, pct, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
st = os.statvfs(mnt)
budget = int(min(st.f_bavail * st.f_frsize, usr_bytes) * pct / 100)
total, names = 0, []
for root, dirs, files in os.walk("/usr"):
    dirs.sort()
    dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(root, d))]
    for name in sorted(files):
        p = os.path.join(root, name)
        try:
            s = os.lstat(p)
        except OSError:
            continue
        size = (s.st_size + 4095) // 4096 * 4096 if not os.path.islink(p) else 0
        if total + size > budget:
            continue
        total += size
        names.append(os.path.relpath(p, "/usr"))
with open(out, "wb") as f:
    f.write(b"".join(os.fsencode(n) + b"\0" for n in names))
print(f"==> filling with {len(names)} files of /usr, {total / 2**20:.0f} MiB "
      f"(budget {budget / 2**20:.0f} MiB)", file=sys.stderr)
EOF
    tar -C /usr --null --no-recursion -T "$list" -cf - 2>/dev/null |
        tar -C "$lmnt" -xpf -
    sync -f "$lmnt"
    df -h "$lmnt" | tail -n1 | awk '{ print "==> image filesystem: " $3 " used of " $2 }' >&2
    umount "$lmnt"
    e2fsck -fn "$tmp" >"$WORK/e2fsck.log" 2>&1 ||
        die "e2fsck found problems in the new image: $(cat "$WORK/e2fsck.log")"
    mv -- "$tmp" "$BASE_IMG"
    echo "$STAMP" >"$BASE_IMG.stamp"
}

if [[ ${BENCH_REBUILD_BASE:-0} != 1 && -f $BASE_IMG && -f $BASE_IMG.stamp &&
    $(cat "$BASE_IMG.stamp") == "$STAMP" ]]; then
    log "reusing the base image $BASE_IMG (BENCH_REBUILD_BASE=1 rebuilds it)"
else
    timed build_base build_base_image
fi
R[img.apparent]="$(stat -c %s -- "$BASE_IMG")"
R[img.allocated]="$(($(stat -c %b -- "$BASE_IMG") * $(stat -c %B -- "$BASE_IMG")))"
log "base image: $(numfmt --to=iec "${R[img.apparent]}") apparent," \
    "$(numfmt --to=iec "${R[img.allocated]}") allocated"

PLAIN="$WORK/plain"
mkdir -p "$PLAIN"
log "copying the base image to $PLAIN/img"
cp --sparse=always -- "$BASE_IMG" "$PLAIN/img"
sync

# ---------------------------------------------------------------- vpool
snap_du() { # bytes under the members' snap/ dirs (empty when there are none)
    local d total=0 found=0
    for d in "$VP1/snap" "$VP2/snap"; do
        [[ -d $d ]] || continue
        total=$((total + $(du_bytes "$d")))
        found=1
    done
    [[ $found -eq 0 ]] || echo "$total"
}
# snap_field NAME KEY: one field of snapshot NAME in `vpool snapshot list --json`.
snap_field() {
    "$VPOOL_BIN" snapshot list --json "$MNT" | python3 -c '
import json, sys
name, key = sys.argv[1], sys.argv[2]
for s in json.load(sys.stdin):
    if s.get("name") == name:
        v = s.get(key)
        print("" if v is None else v)
        break
else:
    sys.exit(f"snapshot {name} is not in vpool snapshot list --json")
' "$1" "$2"
}
snapshot() { # KIND NAME
    "$VPOOL_BIN" snapshot create --kind "$1" --wait "$MNT" "$2" >&2
}
snap_record() { # KEY NAME
    local state
    R[$1.bytes]="$(snap_field "$2" stored_bytes)"
    R[$1.logical]="$(snap_field "$2" logical_bytes)"
    R[$1.changed_blocks]="$(snap_field "$2" changed_blocks)"
    state="$(snap_field "$2" state)"
    [[ $state == complete ]] || warn "snapshot $2 is '$state' after --wait, not complete"
    log "snapshot $2: stored ${R[$1.bytes]} B, logical ${R[$1.logical]} B," \
        "changed blocks ${R[$1.changed_blocks]}, state $state"
}

if [[ $RUN_VPOOL == 1 ]]; then
    mkdir -p "$VP1" "$VP2" "$MNT"
    "$VPOOL_BIN" create "${VPOOL_CREATE_ARGS[@]}" "$VP1" "$VP2"
    mount_args=()
    [[ -z $VPOOL_MOUNT_OPTS ]] || mount_args+=(-o "$VPOOL_MOUNT_OPTS")
    MOUNTS+=("$MNT")
    "$VPOOL_BIN" mount "${mount_args[@]}" "$VP1" "$MNT"
    is_mounted "$MNT" || die "vpool did not mount"
    log "copying the base image into vpool"
    cp --sparse=always -- "$BASE_IMG" "$MNT/img"
    sync -- "$MNT/img"
    sync

    drop_caches
    timed vpool.full snapshot full s1
    snap_record vpool.full s1
    R[vpool.full.du]="$(snap_du)"

    change_step "$MNT/img" 1
    drop_caches
    timed vpool.incr snapshot incremental s2
    snap_record vpool.incr s2
    du_now="$(snap_du)"
    if [[ -n $du_now && -n ${R[vpool.full.du]} ]]; then
        R[vpool.incr.du]="$((du_now - ${R[vpool.full.du]}))"
    fi

    # Writer stall: baseline, then during incremental snapshot s3.
    log "writer baseline on $MNT/img (${STALL_BASELINE_SECS}s, no snapshot)"
    writer_run "$MNT/img" "$WORK/writer-base.json" "$STALL_BASELINE_SECS" "$((SEED + 100))"
    R[stall.base]="$(python3 "$PY/stall.py" "$WORK/writer-base.json")"
    log "writer baseline: ${R[stall.base]}"
    change_step "$MNT/img" 2
    drop_caches
    log "writer during snapshot s3"
    writer_start "$MNT/img" "$WORK/writer-snap.json" "$((SEED + 102))"
    sleep 1
    t0="$(now)"
    snapshot incremental s3
    t1="$(now)"
    sleep 1
    writer_stop
    R[vpool.s3.time]="$(elapsed "$t0" "$t1")"
    R[stall.snap]="$(python3 "$PY/stall.py" "$WORK/writer-snap.json" "$t0" "$t1")"
    log "snapshot s3 under the writer: ${R[vpool.s3.time]} s; writer: ${R[stall.snap]}"

    # Read speed: snapshot s2 against the live image.
    [[ -f $MNT/.snapshots/s2/img ]] || die "$MNT/.snapshots/s2/img is missing"
    R[read.snap]="$(read_mibs "$MNT/.snapshots/s2/img")"
    R[read.live]="$(read_mibs "$MNT/img")"

    # Streams: send to files, receive into a second pool, a pipeline into a
    # third, and restore from the streams alone.
    drop_caches
    timed vpool.send.full "$VPOOL_BIN" -q snapshot send -o "$WORK/s1.vps" "$MNT" s1
    R[vpool.send.full.bytes]="$(stat -c %s -- "$WORK/s1.vps")"
    drop_caches
    timed vpool.send.incr "$VPOOL_BIN" -q snapshot send --from s1 -o "$WORK/s2.vps" "$MNT" s2
    R[vpool.send.incr.bytes]="$(stat -c %s -- "$WORK/s2.vps")"
    R[vpool.incr.changed_bytes]="$((${R[vpool.incr.changed_blocks]} * 4096))"
    mkdir -p "$VP3" "$MNT2" "$VP4" "$MNT3"
    "$VPOOL_BIN" create "${VPOOL_CREATE_ARGS[@]}" "$VP3"
    "$VPOOL_BIN" create "${VPOOL_CREATE_ARGS[@]}" "$VP4"
    MOUNTS+=("$MNT2" "$MNT3")
    "$VPOOL_BIN" mount "$VP3" "$MNT2"
    "$VPOOL_BIN" mount "$VP4" "$MNT3"
    drop_caches
    timed vpool.recv.full "$VPOOL_BIN" -q snapshot receive -i "$WORK/s1.vps" "$MNT2"
    drop_caches
    timed vpool.recv.incr "$VPOOL_BIN" -q snapshot receive -i "$WORK/s2.vps" "$MNT2"
    drop_caches
    timed vpool.pipe.full sh -c "'$VPOOL_BIN' -q snapshot send '$MNT' s1 | '$VPOOL_BIN' -q snapshot receive '$MNT3'"
    R[vpool.pipe.logical]="${R[vpool.full.logical]}"
    drop_caches
    timed vpool.stream_restore "$VPOOL_BIN" -q stream restore "$WORK/s1.vps" "$WORK/s2.vps" "$WORK/vrestore"
    [[ $(stat -c %s -- "$WORK/vrestore/img") == "${R[img.apparent]}" ]] ||
        warn "the restored image has another size than the original"
    "$VPOOL_BIN" unmount "$MNT3"
    "$VPOOL_BIN" unmount "$MNT2"
    rm -rf -- "$WORK/vrestore" "$VP4" "$VP3" "$WORK/s1.vps"

    "$VPOOL_BIN" unmount "$MNT"
fi

# ---------------------------------------------------------------- restic, borg
export RESTIC_REPOSITORY="$WORK/restic"
export RESTIC_CACHE_DIR="$WORK/restic-cache"
export BORG_BASE_DIR="$WORK/borg-home"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=yes
export BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
BORG_REPO_DIR="$WORK/borg"
RESTIC_VERSION="$(restic version | awk '{ print $2 }')"
BORG_VERSION="$(borg --version | awk '{ print $2 }')"

restic_init_args=()
RESTIC_DESC="restic $RESTIC_VERSION (repo v1, no compression)"
if [[ $(printf '%s\n' 0.14.0 "$RESTIC_VERSION" | sort -V | head -n1) == 0.14.0 ]]; then
    restic_init_args+=(--repository-version 2) # v2: compressed, --compression auto by default
    RESTIC_DESC="restic $RESTIC_VERSION (repo v2, compression auto)"
else
    warn "restic $RESTIC_VERSION has no compression (needs 0.14+)"
fi
restic init -q "${restic_init_args[@]}"
borg init -e none "$BORG_REPO_DIR"

# backup TOOL KEY: timed backup of $PLAIN/img; KEY.bytes = repository growth.
backup() {
    local tool="$1" key="$2" repo before
    if [[ $tool == restic ]]; then repo="$RESTIC_REPOSITORY"; else repo="$BORG_REPO_DIR"; fi
    before="$(du_bytes "$repo")"
    drop_caches
    if [[ $tool == restic ]]; then
        timed "$key" restic backup -q --host bench "$PLAIN/img"
    else
        timed "$key" borg create --compression zstd,3 "$BORG_REPO_DIR::${key#borg.}" "$PLAIN/img"
    fi
    R[$key.bytes]="$(($(du_bytes "$repo") - before))"
    log "$key: +${R[$key.bytes]} B"
}

backup restic restic.full
backup borg borg.full
change_step "$PLAIN/img" 1
backup restic restic.incr
backup borg borg.incr
drop_caches
timed restic.restore restic restore -q latest --host bench --target "$WORK/rrestore"
rm -rf -- "$WORK/rrestore"

# The same writer on the plain copy, for reference (no one reads it any more).
log "writer on the plain copy (${STALL_BASELINE_SECS}s, reference)"
writer_run "$PLAIN/img" "$WORK/writer-plain.json" "$STALL_BASELINE_SECS" "$((SEED + 101))"
R[stall.plain]="$(python3 "$PY/stall.py" "$WORK/writer-plain.json")"
log "writer on the plain copy: ${R[stall.plain]}"

# ---------------------------------------------------------------- report
{
    echo "vpool snapshot benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -r)"
    echo "image: $(numfmt --to=iec "${R[img.apparent]}") raw ext4 holding part of /usr," \
        "$(numfmt --to=iec "${R[img.allocated]}") allocated; change step: $CHANGE_PCT %" \
        "of the image, half 4 KiB and half 64 KiB random writes ($(jget "${R[change1]}" writes) writes," \
        "$(jget "${R[change1]}" blocks_4k) distinct 4 KiB blocks)"
    echo "$RESTIC_DESC, borg $BORG_VERSION (zstd,3)," \
        "cold page cache before every timed step; bytes = repository growth (du -sb)" \
        "for restic and borg, stored_bytes of snapshot list for vpool"
    echo
    args=()
    for k in "${!R[@]}"; do args+=("$k=${R[$k]}"); done
    python3 - "$RUN_VPOOL" "${args[@]}" <<'EOF'
import json, sys

run_vpool = sys.argv[1] == "1"
r = dict(a.split("=", 1) for a in sys.argv[2:])

def num(key):
    try:
        return float(r[key])
    except (KeyError, ValueError):
        return None

def size(b):
    if b is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(b) < 1024 or unit == "TiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024

def secs(t):
    return "n/a" if t is None else f"{t:.2f}"

rows = [
    ("vpool full (s1)", "vpool.full"),
    ("vpool incremental (s2)", "vpool.incr"),
    ("restic full", "restic.full"),
    ("restic incremental", "restic.incr"),
    ("borg full", "borg.full"),
    ("borg incremental", "borg.incr"),
]
print("| step | time (s) | bytes stored/added | cross-check |")
print("|---|---|---|---|")
for label, k in rows:
    b = num(k + ".bytes")
    extra = ""
    if k.startswith("vpool") and num(k + ".du") is not None:
        extra = f"snap/ dirs: {size(num(k + '.du'))}"
    cell = "n/a" if b is None else f"{size(b)} ({int(b)})"
    print(f"| {label} | {secs(num(k + '.time'))} | {cell} | {extra} |")
print()

def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b

def stall(key):
    try:
        return json.loads(r[key])
    except (KeyError, ValueError):
        return {}

checks = []
def check(name, value, ok, detail):
    verdict = "n/a" if value is None else ("PASS" if ok(value) else "FAIL")
    checks.append((name, verdict, detail))

x = ratio(num("vpool.incr.time"), num("restic.incr.time"))
check("incremental time <= 1/5 of restic incremental", x, lambda v: v <= 0.2,
      f"{'n/a' if x is None else f'{x:.3f}'} ({secs(num('vpool.incr.time'))} s vs {secs(num('restic.incr.time'))} s)")
x = ratio(num("vpool.incr.bytes"), num("restic.incr.bytes"))
check("incremental bytes <= 1/4 of restic added bytes", x, lambda v: v <= 0.25,
      f"{'n/a' if x is None else f'{x:.3f}'} ({size(num('vpool.incr.bytes'))} vs {size(num('restic.incr.bytes'))})")
x = ratio(num("vpool.full.time"), num("restic.full.time"))
check("full time <= 1/2 of restic full", x, lambda v: v <= 0.5,
      f"{'n/a' if x is None else f'{x:.3f}'} ({secs(num('vpool.full.time'))} s vs {secs(num('restic.full.time'))} s)")
s, b, p = stall("stall.snap"), stall("stall.base"), stall("stall.plain")
x = s.get("max_ms")
def st(d):
    if not d.get("writes"):
        return "n/a"
    return f"max {d['max_ms']:.1f} ms, p99 {d['p99_ms']:.2f} ms, {d['writes']} writes"
check("longest writer stall during a snapshot < 50 ms", x, lambda v: v < 50,
      f"{'n/a' if x is None else f'{x:.1f} ms'} (during s3, {secs(num('vpool.s3.time'))} s: {st(s)};"
      f" without snapshot: {st(b)}; plain file: {st(p)})")
x = ratio(num("read.snap"), num("read.live"))
check("snapshot read >= 0.5 x live read", x, lambda v: v >= 0.5,
      f"{'n/a' if x is None else f'{x:.2f}'} ({r.get('read.snap', 'n/a')} vs {r.get('read.live', 'n/a')} MiB/s, cold cache)")

rows = [
    ("vpool send full (s1)", "vpool.send.full"),
    ("vpool send incremental (s2 from s1)", "vpool.send.incr"),
    ("vpool receive full", "vpool.recv.full"),
    ("vpool receive incremental", "vpool.recv.incr"),
    ("vpool send piped to receive, full", "vpool.pipe.full"),
    ("vpool stream restore (full + incremental)", "vpool.stream_restore"),
    ("restic restore (after its incremental)", "restic.restore"),
]
print("| stream step | time (s) | stream bytes | MiB/s of image |")
print("|---|---|---|---|")
logical = num("vpool.full.logical")
for label, k in rows:
    t = num(k + ".time")
    b = num(k + ".bytes")
    rate = "n/a" if t in (None, 0) or logical is None else f"{logical / t / 2**20:.0f}"
    print(f"| {label} | {secs(t)} | {size(b)} | {rate} |")
print()

x = ratio(num("vpool.send.incr.bytes"), num("vpool.incr.changed_bytes"))
check("incremental stream <= 1.1 x changed bytes", x, lambda v: v <= 1.1,
      f"{'n/a' if x is None else f'{x:.3f}'} ({size(num('vpool.send.incr.bytes'))} for {size(num('vpool.incr.changed_bytes'))} changed)")
x = num("vpool.send.incr.time")
check("incremental stream sent in < 2 s", x, lambda v: v < 2, f"{secs(x)} s")
x = ratio(num("vpool.send.full.time"), num("vpool.full.time"))
check("full send at least as fast as the full snapshot", x, lambda v: v <= 1.0,
      f"{'n/a' if x is None else f'{x:.2f}'} ({secs(num('vpool.send.full.time'))} s vs {secs(num('vpool.full.time'))} s)")
rt = num("restic.restore.time")
recv = None
if num("vpool.recv.full.time") is not None and num("vpool.recv.incr.time") is not None:
    recv = num("vpool.recv.full.time") + num("vpool.recv.incr.time")
x = ratio(recv, rt)
check("receive (full + incremental) >= 2 x restic restore speed", x, lambda v: v <= 0.5,
      f"{'n/a' if x is None else f'{x:.3f}'} ({secs(recv)} s vs {secs(rt)} s)")
x = ratio(num("vpool.stream_restore.time"), rt)
check("stream restore >= 2 x restic restore speed", x, lambda v: v <= 0.5,
      f"{'n/a' if x is None else f'{x:.3f}'} ({secs(num('vpool.stream_restore.time'))} s vs {secs(rt)} s)")

print("| target | result | measured |")
print("|---|---|---|")
for name, verdict, detail in checks:
    print(f"| {name} | {verdict} | {detail} |")
if not run_vpool:
    print("\n(VPOOL=0: the vpool part was skipped)")
EOF
} | tee "$OUT"
log "table written to $OUT"

if [[ ${BENCH_STRICT:-0} == 1 ]] && grep -q '| FAIL |' "$OUT"; then
    die "some targets were missed (BENCH_STRICT=1)"
fi
