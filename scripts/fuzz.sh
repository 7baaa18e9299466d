#!/usr/bin/env bash
# Long fuzzing of the on-disk parsers (tests/fuzz_parsers.rs): every parser
# for SECONDS seconds (default 600), two at a time (the test threads), with a
# random seed unless VPOOL_FUZZ_SEED is set. A failure prints a one-line
# reproduction and leaves its input in target/fuzz-failures/.
#
#   scripts/fuzz.sh [SECONDS] [test filters or options, e.g. fuzz_label fuzz_sum, --skip fuzz_delta_parts]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
shift || true
VPOOL_FUZZ_SECS=$secs exec nice -n "${NICE:-10}" cargo test --release --test fuzz_parsers -- --nocapture "$@"
