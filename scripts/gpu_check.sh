#!/usr/bin/env bash
# One command for a GPU host: install what travelled, show the environment, run the GPU tests,
# then the benchmarks. Meant for the lent H200 machines (no network there: Python packages
# missing from the image travel as wheels in .whl/), but runs on any CUDA host.
#
#   scripts/gpu_check.sh [--tests-only | --bench-only] [--quick] [-- extra pytest args]
#
# Everything is printed and also written under $OUT (the lent machine's folder that comes
# back) or, where OUT is unset, under results/:
#   gpu_check.log          this whole run
#   gpu_tests.log          pytest's output
#   bench_inprocess.json   benchmark numbers, environment, ratios, targets
#   bench_inprocess.md     the same as markdown tables
#   bench_transport.json   the bare round trip: ZeroMQ against submit lanes
#   bench_daemon.json      the daemon benchmark: round trip, GPU memory of 8 clients, cold start
#   bench_daemon.md        the same as markdown tables
#
# Exit status: 0 when every step that ran passed, 1 when any failed (install, environment,
# tests, a benchmark path that errored or disagreed with eager). Failing tests do not stop the
# benchmarks: one run should bring back everything there is to learn. Missed performance
# targets are reported in the tables, not counted as failures: they are measurements.
#
# Time, for one 10-minute call: the tests are stopped after TEST_BUDGET_S (180 s; 120 with
# --quick), the in-process benchmark after BENCH_BUDGET_S (240 s). The full benchmark is
# expected to take 1-2 minutes on an H200, --quick under one. bench_daemon then gets
# BENCH_DAEMON_BUDGET_S (200 s) or what is left of TOTAL_BUDGET_S (540 s) since the start,
# whichever is less (skipped under 60 s); it is told its budget and reports what fitted. So
# even the worst case, every budget spent, ends within about 9 minutes (benchmarks/README.md).
# Overridable: PYTHON, BENCH_ITERS, BENCH_ROUNDS, TEST_BUDGET_S, BENCH_BUDGET_S, TEST_TIMEOUT_S,
# BENCH_DAEMON_BUDGET_S, TOTAL_BUDGET_S.

set -u -o pipefail
export PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1

run_tests=1
run_bench=1
quick=0
pytest_extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --tests-only) run_bench=0 ;;
        --bench-only) run_tests=0 ;;
        --quick) quick=1 ;;
        --) shift; pytest_extra=("$@"); break ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$run_tests" = 0 ] && [ "$run_bench" = 0 ]; then
    echo "gpu_check: --tests-only and --bench-only together leave nothing to run" >&2
    exit 2
fi

cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-$REPO/results}
mkdir -p "$OUT_DIR" || exit 2

if [ "$quick" = 1 ]; then
    BENCH_ITERS=${BENCH_ITERS:-300}
    BENCH_ROUNDS=${BENCH_ROUNDS:-2}
    TEST_BUDGET_S=${TEST_BUDGET_S:-120}
else
    BENCH_ITERS=${BENCH_ITERS:-2000}
    BENCH_ROUNDS=${BENCH_ROUNDS:-5}
    TEST_BUDGET_S=${TEST_BUDGET_S:-180}
fi
BENCH_BUDGET_S=${BENCH_BUDGET_S:-240}
BENCH_DAEMON_BUDGET_S=${BENCH_DAEMON_BUDGET_S:-200}
TOTAL_BUDGET_S=${TOTAL_BUDGET_S:-540}    # the whole script, for bench_daemon's share
TEST_TIMEOUT_S=${TEST_TIMEOUT_S:-120}   # per test, through pytest-timeout

PY_RUN=("$PY")   # how Python is started for tests and benchmarks (install_cgtree may add -P)
failures=()
notes=()
started=$SECONDS

step() { printf '\n=== [%4ds] %s\n' "$((SECONDS - started))" "$*"; }
fail() { failures+=("$1"); echo "FAILED: $1"; }

install_wheels() {
    step "carried wheels (.whl/ -> /tmp/site)"
    local wheels
    shopt -s nullglob
    wheels=(.whl/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "  none in .whl/ (pyzmq must then be in the image; the daemon needs it)"
        return
    fi
    printf '  %s\n' "${wheels[@]}"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "${wheels[@]}"; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        fail "installing .whl/*.whl into /tmp/site"
    fi
}

# True when cgtree, cgtree.daemon and cgtree.client import (from this tree unless $1 = copy).
cgtree_importable() {
    "${PY_RUN[@]}" -c '
import sys, cgtree, cgtree.daemon, cgtree.client
assert sys.argv[2] == "copy" or cgtree.__file__.startswith(sys.argv[1]), cgtree.__file__
print("  cgtree:", cgtree.__file__, "| cgtree.daemon:", cgtree.daemon.__file__)' "$REPO" "${1:-tree}"
}

# daemon/ and client/ import as cgtree.daemon and cgtree.client (pyproject's package-dir), so
# the repository on PYTHONPATH is not enough. An editable install maps them with a meta-path
# finder, which keeps working when the repository root is on sys.path too (python -m pytest
# puts the working directory there); it builds offline from the image's setuptools, hence
# --no-build-isolation --no-index. Where that fails (old setuptools, read-only site-packages),
# a copy goes to /tmp/cgtree_site; the tree's bare cgtree/ (no daemon/ inside) would shadow
# that copy, so Python then runs with -P: no working directory on sys.path.
install_cgtree() {
    step "cgtree importable as one namespace"
    if cgtree_importable 2>/dev/null; then
        echo "  already installed from this tree"
        return
    fi
    if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . && cgtree_importable; then
        echo "  editable install"
        return
    fi
    echo "  editable install did not work; installing a copy into /tmp/cgtree_site"
    rm -rf /tmp/cgtree_site
    PY_RUN=("$PY" -P)
    if "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --no-compile \
            --target /tmp/cgtree_site . && PYTHONPATH=/tmp/cgtree_site${PYTHONPATH:+:$PYTHONPATH} cgtree_importable copy; then
        export PYTHONPATH=/tmp/cgtree_site${PYTHONPATH:+:$PYTHONPATH}
        notes+=("cgtree ran from a copy in /tmp/cgtree_site, Python with -P (editable install failed)")
    else
        fail "installing cgtree"
    fi
}

show_environment() {
    step "environment"
    nvidia-smi -L || fail "nvidia-smi -L"
    "${PY_RUN[@]}" scripts/gpu_env.py || fail "environment (scripts/gpu_env.py)"
}

run_gpu_tests() {
    step "pytest -m gpu (${TEST_TIMEOUT_S}s per test, ${TEST_BUDGET_S}s in all)"
    local per_test=()
    if "${PY_RUN[@]}" -c "import pytest_timeout" 2>/dev/null; then
        per_test=(--timeout="$TEST_TIMEOUT_S")
    else
        notes+=("pytest-timeout missing: no per-test timeout")
    fi
    # SIGINT first, so pytest still prints what passed and failed before it stops.
    timeout -k 10 -s INT "$TEST_BUDGET_S" "${PY_RUN[@]}" -m pytest -m gpu -q -x -p no:cacheprovider \
        "${per_test[@]+"${per_test[@]}"}" "${pytest_extra[@]+"${pytest_extra[@]}"}" \
        2>&1 | tee "$OUT_DIR/gpu_tests.log"
    local rc=${PIPESTATUS[0]}
    case $rc in
        0) ;;
        5) notes+=("no tests marked gpu were collected") ;;
        124|137) fail "GPU tests stopped after ${TEST_BUDGET_S}s (rc $rc)" ;;
        *) fail "GPU tests (pytest rc $rc)" ;;
    esac
}

run_benchmarks() {
    step "bench_inprocess ($BENCH_ROUNDS rounds x $BENCH_ITERS calls per path)"
    timeout -k 10 "$BENCH_BUDGET_S" "${PY_RUN[@]}" benchmarks/bench_inprocess.py --device cuda \
        --iters "$BENCH_ITERS" --rounds "$BENCH_ROUNDS" \
        --json "$OUT_DIR/bench_inprocess.json" --md "$OUT_DIR/bench_inprocess.md"
    local rc=$?
    case $rc in
        0) ;;
        124|137) fail "bench_inprocess stopped after ${BENCH_BUDGET_S}s" ;;
        *) fail "bench_inprocess (rc $rc: a path failed or disagreed with eager)" ;;
    esac
}

run_bench_transport() {
    step "bench_transport (the bare round trip under every submit: ZeroMQ vs submit lanes)"
    timeout -k 5 60 "${PY_RUN[@]}" benchmarks/bench_transport.py --json "$OUT_DIR/bench_transport.json" \
        || fail "bench_transport"
}

run_bench_daemon() {
    # What is left of the whole script's budget, minus the kill grace and the summary.
    local left=$((TOTAL_BUDGET_S - (SECONDS - started) - 15))
    local budget=$((left < BENCH_DAEMON_BUDGET_S ? left : BENCH_DAEMON_BUDGET_S))
    if [ "$budget" -lt 60 ]; then
        notes+=("bench_daemon skipped: ${budget}s left of TOTAL_BUDGET_S=${TOTAL_BUDGET_S}")
        return
    fi
    local quick_flag=()
    if [ "$quick" = 1 ]; then quick_flag=(--quick); fi
    step "bench_daemon (${budget}s: round trip, GPU memory of 8 clients, cold start)"
    # --time-budget leaves it 15 s to write its report before the hard timeout would kill it.
    timeout -k 10 "$budget" "${PY_RUN[@]}" benchmarks/bench_daemon.py --device cuda \
        "${quick_flag[@]+"${quick_flag[@]}"}" --time-budget $((budget - 15)) \
        --json "$OUT_DIR/bench_daemon.json" --md "$OUT_DIR/bench_daemon.md"
    local rc=$?
    case $rc in
        0) ;;
        124|137) fail "bench_daemon stopped after ${budget}s" ;;
        *) fail "bench_daemon (rc $rc: a row failed or disagreed with eager)" ;;
    esac
}

summary() {
    step "summary"
    echo "  output in $OUT_DIR"
    local line
    for line in "${notes[@]+"${notes[@]}"}"; do echo "  note: $line"; done
    if [ ${#failures[@]} -gt 0 ]; then
        for line in "${failures[@]}"; do echo "  FAILED: $line"; done
        return 1
    fi
    echo "  all steps passed"
}

main() {
    install_wheels
    install_cgtree
    show_environment
    if [ "$run_tests" = 1 ]; then run_gpu_tests; fi
    if [ "$run_bench" = 1 ]; then run_benchmarks; run_bench_transport; run_bench_daemon; fi
    summary
}

# A pipe rather than exec > >(tee): the log is complete when the script exits.
main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
