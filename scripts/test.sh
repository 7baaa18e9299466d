#!/usr/bin/env bash
# Install what the test suite needs (when missing), then run formatting,
# lint and the full test suite (unit + FUSE integration tests) in release.
#
#   scripts/test.sh
#
# Environment:
#   VPOOL_TEST_ARGS     extra arguments for `cargo test --profile ci --features
#                       fault-injection` (e.g. a filter)
#   VPOOL_TEST_TIMEOUT  seconds before `cargo test` is killed (default 1500)
# The test daemons log into a temporary directory ($VPOOL_LOG_DIR), removed
# when every check passes.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
. scripts/lib.sh

START=$SECONDS
TEST_TIMEOUT="${VPOOL_TEST_TIMEOUT:-1500}"
STEPS=()
CURRENT=""
TEST_LOG="$(mktemp -t vpool-test.XXXXXX)"
# The daemons the tests mount log here, not one file per test pool in
# /var/log/vpool; kept when a test fails, for its daemon's log.
VPOOL_LOG_DIR="$(mktemp -d -t vpool-test-logs.XXXXXX)"
export VPOOL_LOG_DIR

summary() {
    local rc=$?
    rm -f -- "$TEST_LOG"
    echo
    echo "==================== vpool test summary ===================="
    local s
    for s in "${STEPS[@]}"; do
        echo "  ok    $s"
    done
    if [[ $rc -ne 0 && -n $CURRENT ]]; then
        echo "  FAIL  $CURRENT (exit $rc)"
    fi
    echo "  total $((SECONDS - START))s"
    if [[ $rc -eq 0 ]]; then
        rm -rf -- "$VPOOL_LOG_DIR"
        echo "RESULT: all checks passed"
    else
        echo "  the test daemons' logs: $VPOOL_LOG_DIR"
        echo "RESULT: FAILED"
    fi
    if [[ -n ${TESTS_LINE:-} ]]; then
        echo "$TESTS_LINE"
    fi
}
trap summary EXIT

# step NAME CMD...: run CMD, remember NAME and how long it took.
step() {
    local name="$1" t0=$SECONDS
    shift
    CURRENT="$name"
    log "$name"
    "$@"
    STEPS+=("$name ($((SECONDS - t0))s)")
    CURRENT=""
}

install_deps() {
    local pkgs=()
    command -v fusermount3 >/dev/null 2>&1 || pkgs+=(fuse3)
    command -v fio >/dev/null 2>&1 || pkgs+=(fio)
    # tests/suite/units.rs verifies the unit files; tests/suite/ops.rs mounts from an fstab.
    command -v systemd-analyze >/dev/null 2>&1 || pkgs+=(systemd)
    command -v findmnt >/dev/null 2>&1 || pkgs+=(util-linux)
    if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
        pkgs+=(qemu-utils)
    fi
    if ! command -v mkfs.ext4 >/dev/null 2>&1 && [[ ! -x /usr/sbin/mkfs.ext4 && ! -x /sbin/mkfs.ext4 ]]; then
        pkgs+=(e2fsprogs)
    fi
    if [[ ${#pkgs[@]} -gt 0 ]]; then
        apt_install "${pkgs[@]}"
    else
        log "test packages already present"
    fi
    # tests/suite/export_ceph.rs: a real single-node Ceph (skipped when this fails).
    if ! command -v ceph-osd >/dev/null 2>&1 || ! command -v rbd >/dev/null 2>&1; then
        (apt_install ceph-mon ceph-osd ceph-common uuid-runtime) ||
            warn "the Ceph packages did not install: the rbd-diff test will be skipped"
    fi
    ensure_build_deps

    ensure_cargo_path
    if ! command -v fsx >/dev/null 2>&1; then
        cargo install fsx --locked
    fi
    command -v fsx >/dev/null 2>&1 || die "fsx not on PATH after install"

    ensure_dev_fuse
    [[ -e /dev/fuse ]] || die "/dev/fuse missing; the integration tests need FUSE"
}

# Tools installed by root to /usr/sbin are not always on a user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

step "install test dependencies" install_deps

log "tools:"
{
    rustc --version
    cargo --version
    fusermount3 --version 2>&1 | head -n1
    fio --version
    qemu-img --version | head -n1
    fsx --version
} | sed 's/^/      /' >&2

step "cargo fmt --check" cargo fmt --all -- --check
step "cargo clippy -D warnings" cargo clippy --all-targets --all-features -- -D warnings

run_tests() {
    local rc=0
    # A hung FUSE test must not eat CI's whole time budget.
    # shellcheck disable=SC2086 # VPOOL_TEST_ARGS is deliberately word-split
    timeout -k 30 "$TEST_TIMEOUT" \
        cargo test --profile ci --features fault-injection ${VPOOL_TEST_ARGS:-} 2>&1 | tee "$TEST_LOG" || rc=$?
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        warn "cargo test timed out after ${TEST_TIMEOUT}s"
    fi
    # Totals over all test binaries, for the summary's last line.
    TESTS_LINE="$(awk '
        /^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i + 1) ~ /^passed/) p += $i
                if ($(i + 1) ~ /^failed/) f += $i
                if ($(i + 1) ~ /^ignored/) s += $i
            }
        }
        /^test result:/ { n++ }
        END { if (n) printf "tests: %d passed, %d failed, %d skipped\n", p, f, s }
    ' "$TEST_LOG")"
    return "$rc"
}
step "cargo test --profile ci" run_tests

# The rbd-diff exports against a real Ceph (ignored by plain `cargo test`: it
# installs packages and starts daemons). A test that could not get Ceph
# prints SKIPPED and is reported here as skipped, not passed.
run_ceph_test() {
    local rc=0 out
    out="$(mktemp -t vpool-ceph.XXXXXX)"
    timeout -k 30 600 cargo test --profile ci --features fault-injection \
        --test suite -- --ignored --nocapture export_ceph:: 2>&1 | tee "$out" || rc=$?
    if grep -q '^SKIPPED:' "$out"; then
        CEPH_SKIPPED="$(grep '^SKIPPED:' "$out" | head -n1)"
        warn "$CEPH_SKIPPED"
    fi
    rm -f -- "$out"
    return "$rc"
}
CEPH_SKIPPED=""
step "real Ceph: rbd import-diff of exports" run_ceph_test
if [[ -n $CEPH_SKIPPED ]]; then
    STEPS[${#STEPS[@]}-1]="(skipped) real Ceph test: ${CEPH_SKIPPED#SKIPPED: }"
fi
