#!/usr/bin/env bash
# One benchmark on two revisions of cgtree, alternating, in one call of the lent machine: the
# "before and after in one session" a refactor owes (issue 15). Each run installs its tree
# editable (so the daemon children it starts import the same code as the client), runs the
# benchmark script *from that tree*, and writes its JSON under $OUT/<label>-<round>.json.
#
#   scripts/gpu_before_after.sh OLD_TREE ROUNDS BENCHMARK [ARGS...]
#   e.g. mkdir before && git archive d958683 | tar -x -C before && echo d958683 >before/REVISION
#        scripts/gpu_before_after.sh before 2 benchmarks/bench_daemon.py --quick --sections latency
#
# Alternating (old, new, old, new) keeps a drift of the machine from looking like a change of
# code. RUN_LIMIT (seconds, default 600) bounds each run. "After" is $AFTER_TREE when set (an archived
# revision, as "before" is: a refactor's own end, not the working tree that came later), else the
# tree this script lives in; that tree is installed again at the end.
set -u -o pipefail
old=$(cd "$1" && pwd); rounds=$2; bench=$3; shift 3
home=$(cd "$(dirname "$0")/.." && pwd)
new=$home
[ -n "${AFTER_TREE:-}" ] && new=$(cd "$AFTER_TREE" && pwd)
OUT_DIR=${OUT:-$home/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/cgtree-pycache}
install() { $PY -m pip install -q --no-deps --no-build-isolation --no-index -e "$1" >/dev/null 2>&1 \
                || { echo "gpu_before_after: cannot install $1"; exit 2; }; }
# An archived tree names its revision in REVISION (git would answer for the checkout around it).
revision() { if [ -f "$1/REVISION" ]; then cat "$1/REVISION"; else git -C "$1" rev-parse --short HEAD 2>/dev/null || echo "$1"; fi; }
for round in $(seq 1 "$rounds"); do
    for label in before after; do
        tree=$old; [ "$label" = after ] && tree=$new
        install "$tree"
        echo "=== $label round $round ($(revision "$tree"))"
        (cd "$tree" && timeout --kill-after=10 "${RUN_LIMIT:-600}" $PY "$bench" "$@" --json "$OUT_DIR/$label-$round.json") >"$OUT_DIR/$label-$round.log" 2>&1
        echo "rc=$?"; tail -n "${TAIL_LINES:-12}" "$OUT_DIR/$label-$round.log"
    done
done
install "$home"
