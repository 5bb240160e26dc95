#!/usr/bin/env bash
# The unit and integration tests (and the DPDK virtio-user end to end test)
# against the C extension built with AddressSanitizer + UndefinedBehaviorSanitizer.
#
# The tracked tree (git ls-files) is copied to a temporary directory and the
# extension is built there with VHOSTD_SANITIZE=1, so the developer's in-place
# build is left alone. Python is not instrumented: the compiler's ASan and UBSan
# runtimes are preloaded, and every daemon the tests start inherits that
# environment. Any sanitizer report fails the run: the runtimes abort the
# process that hit it (abort_on_error, halt_on_error), and every report is also
# written under the run's log directory, which must be empty at the end (this
# catches a daemon subprocess whose abort a test might not notice).
# Leak detection is off: CPython itself keeps memory until exit.
#
# Usage: scripts/test-sanitize.sh [extra pytest args]   (root, Debian 12; after install-deps.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$PWD
PY=$SRC/.venv/bin/python
[ -x "$PY" ] || scripts/install-deps.sh

work=$(mktemp -d /tmp/vhostd-sanitize.XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # tests/daemon/test_access.py runs vhostd from this tree as an unprivileged uid
mkdir -p "$work/tree" "$work/reports"
git ls-files -z | xargs -0 cp --parents -t "$work/tree"
cd "$work/tree"

start=$(date +%s)
echo "test-sanitize: building the extension with -fsanitize=address,undefined in $work/tree"
VHOSTD_SANITIZE=1 "$PY" vhostd/_build_ffi.py

asan=$(gcc -print-file-name=libasan.so)
ubsan=$(gcc -print-file-name=libubsan.so)
for lib in "$asan" "$ubsan"; do
    [ -e "$lib" ] || { echo "test-sanitize: $lib not found (gcc's sanitizer runtimes)" >&2; exit 1; }
done
export LD_PRELOAD="$asan:$ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$work/reports/asan:log_exe_name=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$work/reports/ubsan:log_exe_name=1"

# The build under test must be the sanitized one in this tree, not the developer's.
"$PY" - <<'EOF'
import os, vhostd._native as n
assert os.path.realpath(n.__file__).startswith(os.getcwd() + os.sep), n.__file__
print("test-sanitize: testing", n.__file__)
EOF
if ! grep -q __asan_init "$(ls vhostd/_native*.so)"; then
    echo "test-sanitize: the extension was not built with ASan" >&2
    exit 1
fi

# Everything but the QEMU guest tests (slow under TCG; the datapath they use is
# covered here by the integration tests and the DPDK virtio-user test), the
# benchmark harness's smoke test, and the 500-cycle leak test: ASan's quarantine
# keeps freed memory resident, so RSS measures nothing there (that test runs in
# the main pytest pass; its fd checks run here through the other tests).
rc=0
"$PY" -m pytest -p no:cacheprovider tests \
    --ignore-glob='tests/e2e/test_guest_*' --ignore=tests/e2e/test_reference_dpdk.py \
    --ignore=tests/e2e/test_restart.py --ignore=tests/test_bench.py \
    --deselect=tests/daemon/test_leaks.py::test_500_connect_configure_traffic_disconnect_cycles_leave_fds_and_rss_flat \
    "$@" || rc=$?

reports=$(find "$work/reports" -type f | sort)
if [ -n "$reports" ]; then
    echo "test-sanitize: sanitizer reports:" >&2
    for f in $reports; do
        echo "==== $f" >&2
        cat "$f" >&2
    done
    rc=1
fi
echo "test-sanitize: pytest exit $rc, $(echo -n "$reports" | grep -c . || true) sanitizer report(s), $(( $(date +%s) - start ))s"
exit $rc
