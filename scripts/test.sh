#!/usr/bin/env bash
# Runs vhostd's whole test suite (unit, integration with real TAPs in network
# namespaces, end to end with a QEMU guest and DPDK), then a bounded run of each
# fuzz target (scripts/fuzz.sh) and the tests again against the C extension
# built with ASan + UBSan (scripts/test-sanitize.sh). Needs root on Debian 12;
# installs everything it needs itself. Extra arguments go to both pytest runs.
# VHOSTD_FUZZ_SECONDS (default 45) sets the time per fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build-guest.sh

failed=()
step() {  # name command...: runs every step, remembers which failed
    local name=$1 t0=$SECONDS rc=0
    shift
    "$@" || rc=$?
    echo "test.sh: $name: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - t0))s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}
step pytest .venv/bin/python -m pytest "$@"
step fuzz scripts/fuzz.sh --seconds "${VHOSTD_FUZZ_SECONDS:-45}" all
step sanitize scripts/test-sanitize.sh "$@"
if ((${#failed[@]})); then
    echo "test.sh: failed: ${failed[*]}" >&2
    exit 1
fi
