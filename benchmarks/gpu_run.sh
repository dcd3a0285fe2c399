#!/usr/bin/env bash
# GPU run path (the H100 lent through the device tool). Run from the repository root:
#   bash benchmarks/gpu_run.sh STEP [STEP...]
# Steps:
#   install      install this plugin (no deps) into /tmp/site, beside the vLLM staged there by
#                ../shared/gpu/stage_vllm.sh (its remote_install.sh must have run first)
#   tests        the pytest tests marked `gpu`, but the engine restarts of `teardown`
#   teardown     an engine with the plugin and CUDA graphs started and stopped 20 times, each in its
#                own process, none exiting abnormally (tests/worker/test_teardown_gpu.py; ~20 x 25 s;
#                SLORA_TEARDOWN_RUNS / SLORA_TEARDOWN_PARALLEL change the count / engines at once: side
#                by side, after a first run alone, each with a fixed 2 GiB KV cache instead of vLLM's
#                profiled one); engines that would not end within the step's 570 s are not started
#                and the test fails naming how many ran; each run's output in $OUT/teardown-runs/
#   teardown-compressed  the same, eager, with a compressed collection beside the plain adapters
#                (the case that aborted at exit twice on 2026-12-06; SLORA_TEARDOWN_COMPRESSED_RUNS,
#                default 5; ~2.5 min)
#   smoke        dummy Llama-2-7B generation, plugin off then on (benchmarks/gpu_smoke.py)
#   kernels      paged-kernel benchmark vs vLLM's LoRA kernels (benchmarks/bench_kernels.py)
#   kernels-gqa  the same on the GQA model's four fused calls (llama-3-8b: qkv_proj, o_proj,
#                gate_up_proj, down_proj), no config sweep (~2 min each; kernels-<layer>-DATE.json)
#   compress-kernels  compressed-collection op vs paged op, Llama-3-8B layers (benchmarks/bench_compressed.py):
#                decode sizes, then prefill sizes at K = 128 (compress-kernels-prefill-DATE.json)
#   store        host store: pinned host -> GPU bandwidth (benchmarks/bench_store.py)
#   correctness  token-for-token check vs merged weights (benchmarks/gpu_correctness.py)
#   compress-correctness  the fixture's adapters compressed exactly (K = 50, the largest sum of
#                ranks of one module), each served plain and as coll/<name> in one batch, CUDA
#                graphs off and on (gpu_correctness.py --compressed; correctness-compressed-DATE.json)
#   correctness-v1  the same with vLLM's V1 GPU model runner (VLLM_USE_V2_MODEL_RUNNER=0; 0.26
#                uses V2 for dense models); results in correctness-v1-DATE.json (~2 min, at most 3.5)
#   serve        `vllm serve` with the plugin on, over HTTP: adapters by name, an unknown name,
#                three broken adapters, survival, /metrics (benchmarks/gpu_serve.py; server log in
#                $OUT/serve-server.log; ~2 min, at most 6.5)
#   isolation    1,000 distinct adapters under eviction pressure: mixed vs solo outputs, pool
#                accounting (benchmarks/gpu_isolation.py)
#   throughput-plugin  the plugin, 1000 requests 256 in / 128 out all at once with N = 1, 100,
#                1000, 2000 adapters (ranks 8..128), then the S-LoRA-style Gamma trace if time is
#                left (benchmarks/throughput.py; ~6-8 min)
#   throughput-stock   stock vLLM tuned (max_loras 128, lora_target_modules qkv_proj,o_proj),
#                N = 1, 100, 1000 all at once (~6-8 min)
#   throughput-base    the base model, no LoRA: all at once, then the Gamma trace (~3 min)
#   throughput-admission  the plugin with admission by adapter bytes (slora.adapter_bytes_per_step_budget
#                0.5), N = 1, 100, 1000 all at once (the adapter ids and ranks of throughput-plugin;
#                N = 1 is the no-op check); compare with throughput-plugin of the same
#                session (benchmarks/admission_sim.py models it; ~4-6 min)
#   throughput-compressed  the plugin with the adapters of N = 100, 1000 all at once served from one
#                compressed collection of rank SLORA_COMPRESS_RANK (default 128; their distinct random
#                files compressed jointly, slora_plugin.bench.compressed_fleet): issue 15 (~4-6 min)
#   throughput-gqa-{base,plugin,compressed,stock}  the GQA workload: a Llama-3-8B-shaped model
#                (benchmarks/configs/llama-3-8b), adapters of ranks 8-64 on all seven modules, N = 100,
#                1000 all at once (base: one trace; stock: max_loras 64, every module; ~4-7 min each)
#   throughput-stock-gamma  stock tuned on the Gamma trace only (optional, ~4 min)
#   throughput-s1-{base,plugin,stock}  S-LoRA's S1 (rank 8 on q,k,v,o; Gamma arrivals, cv 1,
#                20 req/s, 600 requests, lengths 8-512) with 100, 1000, 2000 adapters (base: one
#                trace); own adapter directory /dev/shm/slora-s1 (~4-8 min each)
#   throughput-s2-plugin  S2 (ranks 8/16/32/64) at 20 req/s, 100 / 1000 / 2000 adapters (~5 min)
#   throughput-report  markdown table + 2 PNG plots from every throughput-*.json in results/
#   finetune     mLoRA training: mixed batches vs PEFT one adapter after another, N = 1, 4, 16, 64,
#                and the frozen base's own forward + backward on the mixed batches (the ceiling)
#                (benchmarks/finetune_bench.py, needs peft, not vLLM; finetune-DATE.json; ~5-7 min)
#   finetune-small  the same with jobs of one 512-token sequence a step per adapter, which leave the
#                GPU idle when trained one after another (finetune-small-jobs-DATE.json; ~3 min)
#   soak-rate    the highest request rate stock vLLM sustains on Llama-2-7B (dummy weights, base
#                model, the soak's lengths; benchmarks/gpu_soak.py --measure-only) -> results/
#                soak-rate-DATE.json, written as each probe ends; no probe starts after 480 s
#                (~5 min, at most 9); stock server log in $OUT/soak-rate-server.log
#   soak         the serving soak of issue 17 at that rate (the newest results/soak-rate-*.json,
#                committed from an earlier session or measured today; measured first if there is
#                none): the plugin over 2,000 synth adapters, Poisson load, chaos on the
#                adapter directory, for SOAK_DURATION_S (default 600) -> results/soak-DATE.json
#                and .png, server log and soak.log in SOAK_LOG_DIR (default $OUT), the result
#                copied there too. Takes ~4 min more than the load itself: longer than one
#                10-minute device command, so start it detached with a log folder outside $OUT
#                ($OUT is emptied before every device command):
#                `mkdir -p /tmp/soak; SOAK_LOG_DIR=/tmp/soak setsid nohup bash benchmarks/gpu_run.sh
#                soak > /tmp/soak/run.out 2>&1 &`, keep the machine busy (it is given back when
#                idle) and collect with `cp -r /tmp/soak "$OUT"/` in a later call
# BENCH_ARGS="..." is appended to every throughput step's command (later flags win), e.g.
# BENCH_ARGS="--n-adapters 100,1000 --gamma none --copy-gbps 4100" on another GPU.
# Each throughput step is one engine in one process, stops starting traces after --deadline-s
# 450 and is killed at 530 s, so it ends under 9 minutes; rows are written after every trace.
# Results go to benchmarks/results/ and, packed, to $OUT (what the device tool brings back).
# Everything runs with /tmp as the working directory: from the repository root, the folders
# `kernels/` and `slora_plugin/` would shadow the installed packages (transformers probes for
# the PyPI package `kernels` with an import).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
RES=$REPO/benchmarks/results
mkdir -p "$OUT" "$RES"
cd /tmp
DAY=$(date +%F)
PY=python3
status=0
step() { echo; echo "=== $1 ($(date +%T))"; }
throughput() {  # STEP ARGS...: one throughput command; log in $OUT, results in $RES
  local name=$1; shift
  step "$name"
  # shellcheck disable=SC2086  # BENCH_ARGS: extra flags for every throughput step, split on spaces
  timeout -k 10 530 $PY "$REPO/benchmarks/throughput.py" --out-dir "$RES" --deadline-s 450 "$@" ${BENCH_ARGS:-} \
      > "$OUT/$name.log" 2>&1 || { rc=$?; status=1; echo "$name FAILED (exit $rc; 124: killed at 530 s)"; }
  grep -a "^\[bench\]" "$OUT/$name.log"; tail -n 5 "$OUT/$name.log"
}
# The GQA workload of issues 14 and 15: a Llama-3-8B-shaped model, adapters on all seven modules.
GQA=(--model "$REPO/benchmarks/configs/llama-3-8b" --n-adapters 100,1000 --gamma none --ranks 8,16,32,64
     --adapter-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --work-dir /dev/shm/slora-gqa)
slora_trace() {  # N RANKS: S-LoRA's trace shape (Gamma cv 1, 20 req/s, 600 requests, 8-512 tokens)
  echo "n=$1,requests=600,arrival=gamma,rate=20,cv=1,in=8-512,out=8-512,ranks=$2"
}
for s in "$@"; do
  case "$s" in
    install)
      step install
      $PY -m pip install -q --no-deps --no-build-isolation --no-index --no-cache-dir --upgrade \
          --target /tmp/site "$REPO" 2>&1 | grep -v "^WARNING: Target directory" || true
      $PY -c "import slora_plugin, slora_plugin.kernels, vllm; print('plugin', slora_plugin.__version__, 'vllm', vllm.__version__)" || status=1 ;;
    tests)
      step tests
      $PY -m pytest -m gpu -k "not engine_restarts" -q -p no:cacheprovider --rootdir "$REPO" "$REPO/tests" 2>&1 | tee "$OUT/gpu-tests.log"
      rc=${PIPESTATUS[0]}  # pytest's, read before the copy below replaces PIPESTATUS
      cp "$OUT/gpu-tests.log" "$RES/gpu-tests-$DAY.log"
      [ "$rc" -eq 0 ] || status=1 ;;
    teardown|teardown-compressed)
      step "$s"
      # The test by node id: a -k expression also matches the names of the folders above it.
      # It starts no engine that would not end 40 s before the timeout (pytest's start-up, the
      # report), so a slow engine fails the test with the runs listed instead of killing it;
      # -s shows each run's line as it ends; every run's whole output goes to $OUT/$s-runs/.
      test=test_engine_restarts_with_cuda_graphs_exit_cleanly
      [ "$s" = teardown-compressed ] && test=test_engine_restarts_compressed_eager_exit_cleanly
      limit=570
      SLORA_TEARDOWN_BUDGET_S=${SLORA_TEARDOWN_BUDGET_S:-$((limit - 40))} SLORA_TEARDOWN_LOG_DIR="$OUT/$s-runs" \
          timeout -k 10 $limit $PY -m pytest -m gpu -s -q -p no:cacheprovider --rootdir "$REPO" \
          "$REPO/tests/worker/test_teardown_gpu.py::$test" 2>&1 | tee "$OUT/$s.log"
      rc=${PIPESTATUS[0]}
      cp "$OUT/$s.log" "$RES/$s-$DAY.log"
      [ "$rc" -eq 0 ] || status=1 ;;
    smoke)
      step smoke
      res="$RES/gpu-smoke-$DAY.json"; rm -f "$res"
      for mode in off on; do
        $PY "$REPO/benchmarks/gpu_smoke.py" --mode $mode --out "$res" --adapters /tmp/smoke-adapters \
            > "$OUT/smoke-$mode.log" 2>&1 || { status=1; echo "smoke $mode FAILED"; }
        tail -n 3 "$OUT/smoke-$mode.log"
      done ;;
    kernels)
      step kernels
      $PY "$REPO/benchmarks/bench_kernels.py" 2>&1 | tee "$OUT/kernels.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    kernels-gqa)
      step "$s"
      for layer in qkv_proj o_proj gate_up_proj down_proj; do
        $PY "$REPO/benchmarks/bench_kernels.py" --layer "llama-3-8b:$layer" --no-sweep 2>&1 \
            | tee -a "$OUT/kernels-gqa.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      done ;;
    compress-kernels)
      step compress-kernels
      $PY "$REPO/benchmarks/bench_compressed.py" 2>&1 | tee "$OUT/compress-kernels.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      $PY "$REPO/benchmarks/bench_compressed.py" --tokens 2048,8192 --distinct 16,128 --ranks-k 128 --clusters 1 \
          --tag prefill 2>&1 | tee -a "$OUT/compress-kernels.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    store)
      step store
      $PY "$REPO/benchmarks/bench_store.py" 2>&1 | tee "$OUT/store.log"; [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    correctness)
      step correctness
      $PY "$REPO/benchmarks/gpu_correctness.py" --run "$REPO/benchmarks/fixtures/correctness" 2>&1 | tee "$OUT/correctness.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    compress-correctness)
      step compress-correctness
      rm -rf /tmp/slora-cc
      $PY -m slora_plugin.cli adapters compress "$REPO/benchmarks/fixtures/correctness/adapters" \
          /tmp/slora-cc/coll --rank 50 --model "$REPO/benchmarks/fixtures/correctness/model" \
          2>&1 | tee "$OUT/compress-correctness.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      $PY "$REPO/benchmarks/gpu_correctness.py" --run "$REPO/benchmarks/fixtures/correctness" \
          --compressed /tmp/slora-cc/coll 2>&1 | tee -a "$OUT/compress-correctness.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    correctness-v1)
      step "$s"
      timeout -k 10 210 $PY "$REPO/benchmarks/gpu_correctness.py" --run "$REPO/benchmarks/fixtures/correctness" \
          --model-runner v1 2>&1 | tee "$OUT/correctness-v1.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    serve)
      step serve
      # The script stops the server itself (its own deadlines: start 240 s, checks 90 s).
      timeout -k 10 380 $PY "$REPO/benchmarks/gpu_serve.py" --work-dir /tmp/slora-serve \
          --log "$OUT/serve-server.log" 2>&1 | tee "$OUT/serve.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    isolation)
      step isolation
      $PY "$REPO/benchmarks/gpu_isolation.py" --adapters /dev/shm/slora-iso \
          --out "$RES/isolation-$DAY.json" > "$OUT/isolation.log" 2>&1 || status=1
      tail -n 30 "$OUT/isolation.log" ;;
    throughput-plugin)
      throughput "$s" --system plugin --n-adapters 1,100,1000,2000 ;;
    throughput-stock)
      throughput "$s" --system stock --n-adapters 1,100,1000 --gamma none \
          --max-loras 128 --lora-target-modules qkv_proj,o_proj ;;
    throughput-base)
      throughput "$s" --system base ;;
    throughput-admission)
      throughput "$s" --system plugin --n-adapters 1,100,1000 --gamma none \
          --slora-config '{"adapter_bytes_per_step_budget": 0.5}' ;;
    throughput-compressed)
      # served from one compressed collection of rank K (bench.compressed_fleet)
      throughput "$s" --system plugin --n-adapters 100,1000 --gamma none \
          --compress-rank "${SLORA_COMPRESS_RANK:-128}" --work-dir /dev/shm/slora-bench-compressed ;;
    throughput-gqa-base)
      throughput "$s" --system base --model "$REPO/benchmarks/configs/llama-3-8b" --gamma none ;;
    throughput-gqa-plugin)
      throughput "$s" --system plugin "${GQA[@]}" ;;
    throughput-gqa-compressed)
      throughput "$s" --system plugin "${GQA[@]}" --compress-rank "${SLORA_COMPRESS_RANK:-128}" ;;
    throughput-gqa-stock)
      throughput "$s" --system stock "${GQA[@]}" --max-loras 64 --lora-target-modules all ;;
    throughput-stock-gamma)
      # Own work dir: its adapter ids would get other ranks than the all-at-once runs gave them.
      throughput "$s" --system stock --n-adapters none --max-loras 128 \
          --lora-target-modules qkv_proj,o_proj --work-dir /dev/shm/slora-bench-gamma ;;
    throughput-s1-base)
      throughput "$s" --system base --n-adapters none --gamma none --trace "$(slora_trace 1000 8)" ;;
    throughput-s1-plugin)
      throughput "$s" --system plugin --n-adapters none --gamma none --work-dir /dev/shm/slora-s1 \
          --trace "$(slora_trace 100 8)" --trace "$(slora_trace 1000 8)" --trace "$(slora_trace 2000 8)" ;;
    throughput-s1-stock)
      throughput "$s" --system stock --n-adapters none --gamma none --work-dir /dev/shm/slora-s1 \
          --max-loras 128 --lora-target-modules qkv_proj,o_proj \
          --trace "$(slora_trace 100 8)" --trace "$(slora_trace 1000 8)" --trace "$(slora_trace 2000 8)" ;;
    throughput-s2-plugin)
      throughput "$s" --system plugin --n-adapters none --gamma none --work-dir /dev/shm/slora-s2 \
          --trace "$(slora_trace 100 8/16/32/64)" --trace "$(slora_trace 1000 8/16/32/64)" \
          --trace "$(slora_trace 2000 8/16/32/64)" ;;
    throughput-report)
      step "$s"
      $PY "$REPO/benchmarks/report.py" --out-dir "$RES" 2>&1 | tee "$OUT/throughput-report.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    finetune|finetune-small)
      step "$s"
      small=(); [ "$s" = finetune-small ] && small=(--seqs-per-adapter 1 --tag small-jobs)
      timeout -k 10 590 $PY "$REPO/benchmarks/finetune_bench.py" --out "$RES" "${small[@]}" 2>&1 | tee "$OUT/$s.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    soak-rate)
      step "$s"
      timeout -k 10 540 $PY "$REPO/benchmarks/gpu_soak.py" --measure-only --work-dir /dev/shm/slora-soak \
          --probe-rates 4,8,12,16,24,32 --probe-s 30 --deadline-s 480 --log "$OUT/soak-rate-server.log" \
          --out "$RES/soak-rate-$DAY.json" 2>&1 | tee "$OUT/soak-rate.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    soak)
      step "$s"
      # the newest measured rate (committed from an earlier session, or measured today)
      newest_rate=$(ls -1 "$RES"/soak-rate-*.json 2>/dev/null | sort | tail -n 1)
      rate_from=(); [ -n "$newest_rate" ] && rate_from=(--rate-from "$newest_rate")
      dur=${SOAK_DURATION_S:-600}
      logs=${SOAK_LOG_DIR:-$OUT}; mkdir -p "$logs"
      timeout -k 10 $((dur + 900)) $PY "$REPO/benchmarks/gpu_soak.py" --work-dir /dev/shm/slora-soak \
          --duration-s "$dur" "${rate_from[@]}" --log "$logs/soak-server.log" 2>&1 | tee "$logs/soak.log"
      rc=${PIPESTATUS[0]}
      cp "$RES/soak-$DAY".* "$logs"/ 2>/dev/null
      [ "$rc" -eq 0 ] || status=1 ;;
    *) echo "unknown step $s"; status=2 ;;
  esac
done
tar -C "$REPO" -czf "$OUT/results.tar.gz" benchmarks/results
echo; echo "=== done, status $status"
exit $status
