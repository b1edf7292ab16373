#!/usr/bin/env bash
# Named GPU measurements, one call of the lent machine: install what travelled (as
# scripts/gpu_check.sh does), then run the steps asked for, in order, each under its own time
# limit, each writing its log and JSON under $OUT (results/ where OUT is unset).
#
#   scripts/gpu_measure.sh [+]STEP[:SECONDS] ...
#
# A step written +STEP runs in the background, beside the steps after it (the call waits for
# it before packing up): e.g. the soak, which checks correctness, not time, beside the tests.
#
# Steps (default limit in seconds):
#   artifact-load (200)  benchmarks/artifact_load.py: a fresh process's first compiled-graph load
#   profile (150)        benchmarks/profile_paths.py --models gpt2,llama: in-process cgtree vs reduce-overhead
#   registration (240)   benchmarks/bench_registration.py: stall during a compile, warm restart
#   chaos (200)          benchmarks/chaos.py, 8 clients, SIGKILL after 30 s (defaults: inductor)
#   chaos-eager (150)    the same with daemon.compile = "eager"
#   startup (120)        benchmarks/startup.py --runs 2
#   soak (420)           benchmarks/soak_fuzz.py --messages 100000 on a CUDA daemon
#   models (540)         benchmarks/bench_models.py, the inference zoo, defaults (--time-budget: limit - 90;
#                        about 45 s a model on the H200 with a child process per model; one child for
#                        all should bring it near 25 s, unmeasured: MODELS=a,b,c runs only those)
#   compile (240)        benchmarks/bench_compile.py: the GPT step, 20 rounds of 100 steps a path (short
#                        blocks side by side: the lent hosts stall for seconds, PERFORMANCE.md section 18)
#   stages (240)         benchmarks/submit_stages.py on each of STAGES_MODELS (default llama,mobilenet-v3-small-tv):
#                        the daemon path's per-call time, stage by stage, both processes
#   in-place-check (60)  benchmarks/in_place_check.py: the per-replay address check, C++ against the loop
#   tests (400)          pytest -m gpu over the whole suite (TESTS_K=expr: only those matching -k expr)
#   before-after (300)   scripts/gpu_before_after.sh: bench_daemon's latency section (quick; BA_MODELS, default
#                        tiny,mlp24) on the tree in $BEFORE_TREE (default before/, ignored by git: carry it) and
#                        on $AFTER_TREE (default this one), alternating, ROUNDS=1 by default. Make a tree with
#                        `rm -rf before && mkdir before && git archive REV | tar -x -C before && echo REV >before/REVISION`
# Each step's log is $OUT/<step>.log; a summary of exit codes and seconds ends the run. The lent
# machines return at most 8 files, so everything is also packed into $OUT/measure.tar.gz and
# only that and the step logs' summary stay. pytest-xdist, where its wheel travelled in .whl/,
# runs the tests 4 files at a time.
#
# PYTHONPYCACHEPREFIX: the lent image's site-packages holds no bytecode and is read-only, so
# every process compiled torch's sources again (1.7 s of a first artifact load was `compile`);
# a host that ran torch once has its .pyc. One writable prefix gives this call's processes a
# real host's imports.

set -u -o pipefail
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/cgtree-pycache}
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

background=()
# The leftover sweep ends what this run started and nothing else. Matching command lines
# (pgrep -f cgtreed|benchmarks/...) killed the lent machine's own `bash -c "...benchmarks/..."`
# once, which ended the whole call, and on a shared GPU host it would kill a production
# cgtreed. So every process this run starts carries a tag in its environment (daemons and
# workers inherit it, even once reparented to init), and the sweep ends the tagged processes
# other than this shell and its ancestors.
export CGTREE_MEASURE_TAG="gpu-measure-$$-$RANDOM$RANDOM"
tagged() {  # still alive after the scan: the scan's own short-lived processes carry the tag too
    local pid
    for pid in $(grep -lsz -x -F "CGTREE_MEASURE_TAG=$CGTREE_MEASURE_TAG" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3); do
        [ -d "/proc/$pid" ] && echo "$pid"
    done
}
ancestors() {
    local pid=$BASHPID
    while [ -n "$pid" ] && [ "$pid" -gt 1 ]; do
        echo "$pid"
        pid=$(ps -o ppid= -p "$pid" | tr -d ' ')
    done
}
run_now() {
    local step=$1 limit=$2; shift 2
    local started=$SECONDS
    echo "=== $step (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$step.log" 2>&1
    local rc=$?
    # A step stopped at its limit leaves what it started (daemons spinning on their lanes,
    # compile workers, xdist workers) and they would load every later step's measurements:
    # end them, and say so.
    local leftovers
    leftovers=$(tagged | grep -vxF -f <(ancestors) || true)
    if [ "$in_background" = 0 ] && [ ${#background[@]} -eq 0 ] && [ -n "$leftovers" ]; then
        echo "$step: ending $(echo "$leftovers" | wc -l) leftover process(es)" | tee -a "$OUT_DIR/$step.log"
        kill $leftovers 2>/dev/null; sleep 2; kill -9 $leftovers 2>/dev/null
    fi
    tail -n "${TAIL_LINES:-25}" "$OUT_DIR/$step.log"
    echo "$step rc=$rc $((SECONDS - started))s" >>"$OUT_DIR/summary.txt"
}
run_step() {
    if [ "$in_background" = 1 ]; then
        run_now "$@" >"$OUT_DIR/$1.tail" 2>&1 &
        background+=("$1")
    else
        run_now "$@"
    fi
}

for spec in "$@"; do
    in_background=0
    case "$spec" in +*) in_background=1; spec=${spec#+} ;; esac
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
                which=(--families hf-causal-lm,hf-encoder,hf-vision,hf-breadth,timm,torchvision)
                [ -n "${MODELS:-}" ] && which=(--models "$MODELS")
                run_step "$step" "$lim" $PY benchmarks/bench_models.py --device cuda "${which[@]}" \
                    --paths eager,reduce-overhead,cgtree,cgtreed --time-budget $((lim - 90)) \
                    --json "$OUT_DIR/bench_models.json" ;;
        compile) run_step "$step" "${limit:-240}" $PY benchmarks/bench_compile.py --device cuda --rounds 20 --iters 100 \
                     --json "$OUT_DIR/bench_compile.json" ;;
        stages) run_step "$step" "${limit:-240}" bash -c '
                    IFS=, read -ra models <<<"${STAGES_MODELS:-llama,mobilenet-v3-small-tv}"
                    for m in "${models[@]}"; do
                        '"$PY"' benchmarks/submit_stages.py --model "$m" --iters 2000 --json "'"$OUT_DIR"'/stages_$m.json" || echo "stages: $m rc=$?"
                    done' ;;
        in-place-check) run_step "$step" "${limit:-60}" $PY benchmarks/in_place_check.py --device cuda \
                            --json "$OUT_DIR/in_place_check.json" ;;
        tests) parallel=()
               $PY -c "import xdist" 2>/dev/null && parallel=(-n 4 --dist loadfile)
               run_step "$step" "${limit:-400}" $PY -m pytest -m gpu -q -p no:cacheprovider "${parallel[@]}" \
                   --junitxml="$OUT_DIR/gpu_tests.xml" ${TESTS_K:+-k "$TESTS_K"} tests ;;
        before-after) mkdir -p "$OUT_DIR/before_after"
                      run_step "$step" "${limit:-300}" env OUT="$OUT_DIR/before_after" RUN_LIMIT=140 \
                          bash scripts/gpu_before_after.sh "${BEFORE_TREE:-before}" "${ROUNDS:-1}" \
                          benchmarks/bench_daemon.py --device cuda --quick --sections latency --models "${BA_MODELS:-tiny,mlp24}" ;;
        *) echo "gpu_measure: unknown step $step" | tee -a "$OUT_DIR/summary.txt" ;;
    esac
done
wait
for step in "${background[@]}"; do cat "$OUT_DIR/$step.tail"; done
echo "=== summary"
cat "$OUT_DIR/summary.txt"
(cd "$OUT_DIR" && tar czf /tmp/measure.tar.gz --exclude=measure.tar.gz . && find . -type f ! -name summary.txt -delete \
    && mv /tmp/measure.tar.gz .)
