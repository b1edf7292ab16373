#!/usr/bin/env bash
# Named GPU measurements, one call of the lent machine: install what travelled (as
# scripts/gpu_check.sh does), then run the steps asked for, in order, each under its own time
# limit, each writing its log and JSON under $OUT (results/ where OUT is unset).
#
#   scripts/gpu_measure.sh STEP[:SECONDS] ...
#
# Steps (default limit in seconds):
#   artifact-load (200)  benchmarks/artifact_load.py: a fresh process's first compiled-graph load
#   profile (150)        benchmarks/profile_paths.py --models gpt2,llama: in-process cgtree vs reduce-overhead
#   registration (240)   benchmarks/bench_registration.py: stall during a compile, warm restart
#   chaos (200)          benchmarks/chaos.py, 8 clients, SIGKILL after 30 s (defaults: inductor)
#   chaos-eager (150)    the same with daemon.compile = "eager"
#   startup (120)        benchmarks/startup.py --runs 2
#   soak (420)           benchmarks/soak_fuzz.py --messages 100000 on a CUDA daemon
#   models (540)         benchmarks/bench_models.py, the whole zoo, defaults (--time-budget: limit - 60)
#   compile (240)        benchmarks/bench_compile.py: the GPT step
#   tests (400)          pytest -m gpu over the whole suite
# Each step's log is $OUT/<step>.log; a summary of exit codes and seconds ends the run.

set -u -o pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False
cd "$(dirname "$0")/.." || exit 2
OUT_DIR=${OUT:-$(pwd)/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}

if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT_DIR/install.log" 2>&1 \
    || { echo "gpu_measure: install failed"; tail -20 "$OUT_DIR/install.log"; exit 2; }

summary=()
run_step() {
    local step=$1 limit=$2; shift 2
    local started=$SECONDS
    echo "=== $step (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$step.log" 2>&1
    local rc=$?
    tail -n "${TAIL_LINES:-25}" "$OUT_DIR/$step.log"
    summary+=("$step rc=$rc $((SECONDS - started))s")
}

for spec in "$@"; do
    step=${spec%%:*}
    limit=${spec#*:}
    [ "$limit" = "$spec" ] && limit=""
    case "$step" in
        artifact-load) run_step "$step" "${limit:-200}" $PY benchmarks/artifact_load.py --device cuda --repeats 1 \
                           --json "$OUT_DIR/artifact_load.json" --profile-dir "$OUT_DIR" ;;
        profile) run_step "$step" "${limit:-150}" $PY benchmarks/profile_paths.py --models gpt2,llama --device cuda \
                     --out "$OUT_DIR/profile_paths.txt" --json "$OUT_DIR/profile_paths.json" ;;
        registration) run_step "$step" "${limit:-240}" $PY benchmarks/bench_registration.py --device cuda \
                          --json "$OUT_DIR/bench_registration.json" ;;
        chaos) run_step "$step" "${limit:-200}" $PY benchmarks/chaos.py --device cuda --clients 8 --kill-after 30 \
                   --json "$OUT_DIR/chaos.json" ;;
        chaos-eager) run_step "$step" "${limit:-150}" $PY benchmarks/chaos.py --device cuda --clients 8 --kill-after 20 \
                         --compile eager --json "$OUT_DIR/chaos_eager.json" ;;
        startup) run_step "$step" "${limit:-120}" $PY benchmarks/startup.py --device cuda --runs 2 \
                     --json "$OUT_DIR/startup.json" ;;
        soak) lim=${limit:-420}
              run_step "$step" "$lim" $PY benchmarks/soak_fuzz.py --messages 100000 --device cuda \
                  --time-budget $((lim - 40)) --json "$OUT_DIR/soak_cuda.json" ;;
        models) lim=${limit:-540}
                run_step "$step" "$lim" $PY benchmarks/bench_models.py --device cuda \
                    --paths eager,reduce-overhead,cgtree,cgtreed --time-budget $((lim - 90)) \
                    --json "$OUT_DIR/bench_models.json" ;;
        compile) run_step "$step" "${limit:-240}" $PY benchmarks/bench_compile.py --device cuda --rounds 2 \
                     --json "$OUT_DIR/bench_compile.json" ;;
        tests) run_step "$step" "${limit:-400}" $PY -m pytest -m gpu -q -p no:cacheprovider tests ;;
        *) echo "gpu_measure: unknown step $step"; summary+=("$step unknown") ;;
    esac
done
echo "=== summary"
printf '%s\n' "${summary[@]}"
