#!/usr/bin/env bash
# Runs vhostd's fuzz targets for a bounded time each and prints their figures.
#
#   scripts/fuzz.sh [--seconds N] [messages|rings|all]     (default: 60 s, all)
#
#   messages  fuzz/fuzz_messages.py (atheris): vhost-user byte streams + fds through
#             Connection -> dispatch -> Session -> the C datapath (needs root: TAP, netns)
#   rings     fuzz/fuzz_rings.c (libFuzzer + ASan + UBSan, built here from csrc/):
#             split/packed rings and the TX/RX paths over fuzzed guest memory
#
# Each target starts from its committed seeds (fuzz/corpus/<target>, replayed
# first, so every regression input there runs on every invocation) and keeps
# what it learns in build/fuzz/corpus-<target> across runs. A crash, sanitizer
# report, leak or hang stops the target, leaves the input in
# build/fuzz/artifacts-<target>/ and makes this script exit non-zero; add the
# input to fuzz/corpus/<target>/ with the fix. --seconds 0 only replays the
# corpora. scripts/test.sh runs this in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
seconds=60
targets=()
while (($#)); do
    case "$1" in
        --seconds) seconds=$2; shift 2 ;;
        --seconds=*) seconds=${1#*=}; shift ;;
        messages|rings) targets+=("$1"); shift ;;
        all) targets+=(messages rings); shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "fuzz.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
((${#targets[@]})) || targets=(messages rings)
[ -x "$PY" ] && command -v clang-14 >/dev/null && "$PY" -c 'import atheris' 2>/dev/null || scripts/install-deps.sh

out=$ROOT/build/fuzz
mkdir -p "$out"
# libFuzzer flags shared by both targets: one process, bounded time, a hang is a crash.
common=(-timeout=20 -rss_limit_mb=3072 -print_final_stats=1)
if [ "$seconds" -gt 0 ]; then common+=(-max_total_time="$seconds"); else common+=(-runs=0); fi

netns=""
cleanup() { if [ -n "$netns" ]; then ip netns del "$netns" 2>/dev/null || true; fi; }
trap cleanup EXIT

summary() {  # target log: one line of figures from libFuzzer's output
    local t=$1 log=$2 execs cov corp
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    cov=$(grep -oE '(INITED|DONE|pulse|NEW|REDUCE) +cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+)/\1 edges, \2 features/')
    corp=$(find "$out/corpus-$t" -type f | wc -l)
    echo "fuzz.sh: $t: ${execs:-?} execs in ${seconds}s, coverage ${cov:-?}, corpus $corp inputs" \
         "($(du -sk "$out/corpus-$t" | cut -f1) KiB; seeds $(find "fuzz/corpus/$t" -type f | wc -l))," \
         "crashes $(find "$out/artifacts-$t" -type f -newer "$out/$t.start" | wc -l)"
}

failed=0
for t in "${targets[@]}"; do
    mkdir -p "$out/corpus-$t" "$out/artifacts-$t" "fuzz/corpus/$t"
    log=$out/$t.log
    touch "$out/$t.start"
    case "$t" in
        rings)
            echo "fuzz.sh: building fuzz_rings (clang-14, -fsanitize=fuzzer,address,undefined)"
            clang-14 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
                -std=gnu11 -Wall -Wextra -Wno-unused-parameter -Werror -pthread -Icsrc \
                fuzz/fuzz_rings.c csrc/*.c -o "$out/fuzz_rings"
            cmd=("$out/fuzz_rings" -max_len=70000)
            export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
            export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
            ;;
        messages)
            if [ -z "$netns" ]; then
                netns=vhd-fuzz-$$
                ip netns add "$netns"
            fi
            cmd=(env VHOSTD_FUZZ_NETNS="$netns" "$PY" fuzz/fuzz_messages.py -max_len=8192 -len_control=0
                 -dict=fuzz/messages.dict)
            ;;
    esac
    echo "fuzz.sh: $t for ${seconds}s from $(find "fuzz/corpus/$t" -type f | wc -l) seeds"
    rc=0
    "${cmd[@]}" "${common[@]}" -artifact_prefix="$out/artifacts-$t/" \
        "$out/corpus-$t" "fuzz/corpus/$t" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
        failed=1
        echo "fuzz.sh: $t FAILED (exit $rc); end of $log:" >&2
        grep -v -E '^#[0-9]+ +(NEW|REDUCE|pulse)' "$log" | tail -60 >&2
    fi
    summary "$t" "$log"
done
exit $failed
