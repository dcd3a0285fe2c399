"""The bytes roofline (issue 14): the byte and FLOP model of a step, checked against numbers
computed by hand on a tiny model; a run cut into steps (recorded or reconstructed); and the
whole path on a synthetic recorded run: rows, side files, calibration on the base row, the
report's column and plot, and benchmarks/roofline.py."""

from __future__ import annotations

import gzip
import json
import os
import runpy
import sys

import pytest

from slora_plugin.bench.report import load_results, markdown_table, summarize, write_report, write_results
from slora_plugin.bench.roofline_rows import (
    adapter_costs, compressed_costs, fill_file, model_config_of, roofline_fields, write_steps)
from slora_plugin.layout import ModelDims
from slora_plugin.model_config import LLAMA_2_7B
from slora_plugin.roofline import (
    AdapterCost, ModelBytes, RequestSpan, Roofline, StepLoad, arrival_bound, base_efficiency,
    reconstruct_steps, reconstruction_check, run_roofline, run_steps, spans_from_records,
    step_bytes, step_flops, step_time)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# hidden 8, 2 query heads and 1 KV head of 4 (GQA), MLP 16, 2 layers, vocabulary 10, fp16.
TINY = ModelBytes(ModelDims(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                            intermediate_size=16, num_hidden_layers=2), vocab_size=10, dtype_bytes=2)
#: 1 byte/s and 1 FLOP/s: step times equal bytes or FLOPs.
UNIT = dict(gbps=1e-9, tflops=1e-12)


def test_model_sizes_by_hand():
    # q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8
    assert TINY.dims.linear_params_per_layer == 64 + 32 + 32 + 64 + 128 + 128 + 128 == 576
    # 2 layers x (576 + two norms of 8) + lm_head 10 x 8 + final norm 8, 2 bytes each
    assert TINY.weight_bytes_per_step == (2 * (576 + 16) + 80 + 8) * 2 == 2544
    # K and V x 2 layers x 1 KV head x 4 x 2 bytes: the KV heads, not the query heads
    assert TINY.kv_bytes_per_token == 32
    # rank 2 on q (8 + 8) and rank 1 on v (8 + 4), 2 layers
    assert TINY.adapter_elems({"q_proj": 2, "v_proj": 1, "k_proj": 0}) == 2 * (2 * 16 + 12) == 88


def test_step_bytes_flops_and_time_by_hand():
    # 3 decoding sequences with contexts 10, 20, 30 and one prompt of 5 tokens; adapters 100 B
    load = StepLoad(decode=3, decode_ctx=60, prefill=1, prefill_tokens=5, prefill_pairs=15,
                    lora_token_elems=7, adapters=2, adapter_bytes=100)
    # weights 2544 + embedding rows 8 tokens x 8 x 2 + KV (60 read + 3 + 5 written) x 32
    assert step_bytes(TINY, load) == 2544 + 128 + 68 * 32 + 100 == 4948
    # linears 2 x 2 x 576 x 8 tokens, lm_head 2 x 10 x 8 x 4 sequences,
    # attention 4 x 2 layers x 2 heads x 4 x (60 + 3 + 15) pairs, LoRA 2 x 7
    assert step_flops(TINY, load) == 18432 + 640 + 4992 + 14 == 24078
    # compute-bound here: max(4848, 24078) at half the base's speed, plus the adapter bytes
    assert step_time(TINY, load, **UNIT, base_efficiency=0.5) == pytest.approx(24078 / 0.5 + 100)
    # one sequence, bytes-bound at 1 byte/s (the FLOPs, 3168, at 1e12/s take no time)
    decode_only = StepLoad(decode=1, decode_ctx=10, adapter_bytes=4)
    assert step_time(TINY, decode_only, gbps=1e-9, tflops=1.0) == pytest.approx(2544 + 16 + 11 * 32 + 4)
    with pytest.raises(ValueError, match="must be > 0"):
        step_time(TINY, load, gbps=0, tflops=1)


def test_llama_2_7b_adapter_bytes_plugin_real_rank_stock_padded_slot():
    row = {"system": "plugin", "workload": {"ranks": [8, 128]}, "settings": {}}
    plugin = adapter_costs(row, LLAMA_2_7B)
    # rank 8 on q,k,v,o: 32 layers x 8 x 4 x (4096 + 4096) x 2 bytes = 16 MiB; adapter 1 has rank 128
    assert plugin(0) == AdapterCost(16 * 2**20, 8 * 2**20) and plugin(1).bytes == 256 * 2**20
    stock = adapter_costs({"system": "stock", "workload": {"ranks": [8, 128]},
                           "settings": {"max_lora_rank": 128, "lora_target_modules": ["qkv_proj", "o_proj"]}},
                          LLAMA_2_7B)
    assert stock(0).bytes == stock(1).bytes == 256 * 2**20      # every slot padded to rank 128
    assert adapter_costs({"system": "base", "workload": {"ranks": []}, "settings": {}}, LLAMA_2_7B)(0) is None
    # all seven modules of a GQA model: k and v are num_key_value_heads x head_dim wide
    gqa = dict(LLAMA_2_7B, num_key_value_heads=8, intermediate_size=14336)
    allm = adapter_costs({"system": "plugin", "workload": {"ranks": [16]}, "settings": {},
                          "adapter_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                              "up_proj", "down_proj"]}, gqa)
    per_layer = 16 * (8192 + 5120 + 5120 + 8192 + 3 * (4096 + 14336))
    assert allm(0).elems == 32 * per_layer


def test_compressed_rows_price_cores_per_adapter_and_bases_every_step():
    row = {"system": "plugin", "workload": {"ranks": [8, 128]}, "settings": {},
           "compressed": {"rank_k": 64, "clusters": 2}}
    bases, cost = compressed_costs(row, LLAMA_2_7B)
    # q,k,v,o of 32 layers: a 64 x 64 core each (fp16) whatever the adapter's own rank; two
    # clusters' bases, each 64 x (4096 + 4096) per (layer, module)
    assert adapter_costs(row, LLAMA_2_7B)(1) == cost == AdapterCost(128 * 64 * 64 * 2, 128 * (64 * 8192 + 64 * 64))
    assert bases == 2 * 128 * 64 * 8192 * 2
    assert compressed_costs({**row, "compressed": None}, LLAMA_2_7B) is None
    # the bases are read by every step, like the model's weights
    mb = ModelBytes(TINY.dims, TINY.vocab_size, TINY.dtype_bytes, shared_bytes=100)
    assert mb.weight_bytes_per_step == TINY.weight_bytes_per_step + 100


def _spans():
    """Five steps ending at 1..5 s. R0 (adapter 0): prompt 4, 3 tokens, prefill in step 0, last
    token in step 2; R1 (adapter 1): prompt 2, 2 tokens, steps 1-2; R2 (adapter 0) arrives at
    3.5 s after the engine went idle: prompt 3, 1 token, step 4."""
    return [RequestSpan(0, 4, 3, 0.0, 1.0, 3.0), RequestSpan(1, 2, 2, 0.0, 2.0, 3.0),
            RequestSpan(0, 3, 1, 3.5, 5.0, 5.0)]


COSTS = {0: AdapterCost(10, 5), 1: AdapterCost(100, 50)}


def test_run_steps_by_hand():
    steps = run_steps(_spans(), [1.0, 2.0, 3.0, 4.0, 5.0], COSTS.get)
    got = [(ld.prefill, ld.prefill_tokens, ld.prefill_pairs, ld.decode, ld.decode_ctx,
            ld.adapters, ld.adapter_bytes, ld.lora_token_elems) for ld in steps.loads]
    assert got == [
        (1, 4, 10, 0, 0, 1, 10, 5 * 4),            # R0's prompt
        (1, 2, 3, 1, 5, 2, 110, 50 * 2 + 5),       # R1's prompt; R0 decodes with 4 + 1 tokens
        (0, 0, 0, 2, 6 + 3, 2, 110, 5 + 50),       # R0 (context 6) and R1 (3) decode
        (0, 0, 0, 0, 0, 0, 0, 0),
        (1, 3, 6, 0, 0, 1, 10, 5 * 3),             # R2's prompt, adapter 0 read again
    ]
    # step 3 waited for R2's arrival at 3.5 s: only 0.5 s of it was busy
    assert steps.measured_s == pytest.approx([1.0, 1.0, 1.0, 0.5, 1.0])


def test_roofline_and_base_efficiency():
    r = Roofline(steps=2, busy_s=2.0, ideal_busy_s=1.0, duration_s=3.0, out_tokens=30, arrival_bound_s=0.0,
                 distinct_adapters_per_step_mean=0, adapter_bytes_per_step_mean=0,
                 batch_size_per_step_mean=0, kv_tokens_per_step_mean=0, by_kind={})
    # idle 1 s kept, busy 2 s -> 1 s
    assert (r.roofline_duration_s, r.roofline_out_tok_per_s) == (2.0, 15.0)
    assert r.pct_of_roofline == pytest.approx(200 / 3) and r.pct_of_roofline_busy == 50.0
    late = Roofline(**{**r.__dict__, "arrival_bound_s": 2.5})
    assert late.roofline_duration_s == 2.5

    steps = run_steps(_spans(), [1.0, 2.0, 3.0, 4.0, 5.0], COSTS.get)
    ideal = [step_time(TINY, ld, **UNIT) for ld in steps.loads]
    rl = run_roofline(TINY, steps, 5.0, 6, **UNIT)
    assert rl.ideal_busy_s == pytest.approx(sum(ideal)) and rl.busy_s == 4.5 and rl.steps == 5
    assert rl.distinct_adapters_per_step_mean == (1 + 2 + 2 + 0 + 1) / 5
    assert rl.adapter_bytes_per_step_mean == (10 + 110 + 110 + 10) / 5
    assert (rl.batch_size_per_step_mean, rl.kv_tokens_per_step_mean) == ((1 + 2 + 2 + 1) / 5, (5 + 9) / 5)
    # steps 0, 1 and 4 run a prompt, 2 and 3 only decode (3 is empty, half of it idle)
    prefill, decode = rl.by_kind["prefill"], rl.by_kind["decode"]
    assert (prefill.steps, prefill.busy_s, decode.steps, decode.busy_s) == (3, 3.0, 2, 1.5)
    assert prefill.ideal_s == pytest.approx(ideal[0] + ideal[1] + ideal[4])
    assert decode.ideal_s == pytest.approx(ideal[2] + ideal[3])
    assert (prefill.adapter_ideal_s, decode.adapter_ideal_s) == (10 + 110 + 10, 110)
    assert decode.pct_of_roofline == pytest.approx(100 * decode.ideal_s / 1.5)
    # a base run at twice its bytes roofline has eta 0.5, and charging it at eta gives 100%
    base = run_steps([RequestSpan(-1, 4, 3, 0.0, 1.0, 3.0)], [1.0, 2.0, 3.0], lambda a: None)
    t = sum(step_time(TINY, ld, **UNIT) for ld in base.loads)
    base = base.__class__(base.loads, [2 * t / 3] * 3)
    eta = base_efficiency(TINY, base, **UNIT)
    assert eta == pytest.approx(0.5)
    assert run_roofline(TINY, base, 2 * t, 3, **UNIT, base_efficiency=eta).pct_of_roofline == pytest.approx(100)


def test_arrival_bound_serves_each_request_alone():
    one = [RequestSpan(0, 4, 3, 10.0, 11.0, 13.0)]
    prefill = StepLoad(prefill=1, prefill_tokens=4, prefill_pairs=10, lora_token_elems=20, adapters=1,
                       adapter_bytes=10)
    decode = StepLoad(decode=1, decode_ctx=4 + 1, lora_token_elems=5, adapters=1, adapter_bytes=10)
    want = 10.0 + step_time(TINY, prefill, **UNIT) + 2 * step_time(TINY, decode, **UNIT)
    assert arrival_bound(TINY, one, COSTS.get, **UNIT) == pytest.approx(want)


def test_reconstructed_steps_match_token_counts():
    # A: first token at 0, 5 tokens, done at 1.0 -> 4 steps in (0, 1]; B: 1.0 -> 1.5, 2 tokens;
    # C's first token (1.002) is stamped with B's finish step (within SAME_STEP_S)
    spans = [RequestSpan(-1, 8, 5, 0.0, 0.0, 1.0), RequestSpan(-1, 8, 2, 0.0, 1.0, 1.5),
             RequestSpan(-1, 8, 1, 0.0, 1.002, 1.002)]
    steps, snapped = reconstruct_steps(spans)
    assert steps == pytest.approx([0.0, 0.2505, 0.501, 0.7515, 1.002, 1.5])
    # A's finish and B's first token are moved to the end of the step they were stamped in
    assert [(s.first_s, s.finish_s) for s in snapped] == [(0.0, 1.002), (1.002, 1.5), (1.002, 1.002)]
    assert reconstruction_check(snapped, steps) == 1.0
    loads = run_steps(snapped, steps, lambda a: None).loads
    assert [(ld.prefill, ld.decode) for ld in loads] == [(1, 0), (0, 1), (0, 1), (0, 1), (2, 1), (0, 1)]
    assert reconstruct_steps([]) == ([], [])


def test_spans_from_records_skip_unfinished():
    recs = [{"adapter": 3, "input_len": 5, "n_out": 4, "finished": True, "arrival_s": 1.0,
             "ttft_s": 0.5, "e2e_s": 2.0, "tpot_s": 0.5},
            {"adapter": 3, "input_len": 5, "n_out": 0, "finished": False, "arrival_s": 1.0,
             "ttft_s": None, "e2e_s": None, "tpot_s": None}]
    assert spans_from_records(recs) == [RequestSpan(3, 5, 4, 1.0, 1.5, 3.0)]


# ----------------------------------------------------------------------------- a recorded run

SPEC = {"n_adapters": 4, "num_requests": 6, "alpha": 1.0, "arrival": "all", "rate": 1.0, "cv": 1.0,
        "concurrency": 64, "input_len": [16, 16], "output_len": [4, 4], "ranks": [8, 16], "seed": 0,
        "name": ""}
TINY_CFG = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100, "torch_dtype": "float16"}


def _write_run(tmp_path, system, step_time_s, n_adapters, settings, steps=True):
    """A recorded run of 6 requests (prompt 16, 4 tokens), 3 admitted per step-group: requests
    0-2 prefill in step 0 and finish in step 3, requests 3-5 in steps 4-7; each step takes
    `step_time_s`. Writes the results file and its requests (and steps) side files."""
    ends = [step_time_s * (k + 1) for k in range(8)]
    records = []
    for i in range(6):
        k0 = 0 if i < 3 else 4
        records.append({"index": i, "adapter": i % max(n_adapters, 1) if n_adapters else -1,
                        "input_len": 16, "n_out": 4, "finished": True, "arrival_s": 0.0,
                        "ttft_s": ends[k0] - 1e-4, "e2e_s": ends[k0 + 3] + 1e-5, "tpot_s": step_time_s})
    spec = dict(SPEC, n_adapters=n_adapters)
    row = {"system": system, "trace": "t", "workload": spec, "n_adapters": n_adapters,
           "ranks": spec["ranks"] if n_adapters else [], **summarize(records, ends[-1], 6.0),
           "settings": settings, "init_s": 1.0, "adapter_modules": ["q_proj", "v_proj"] if n_adapters else []}
    meta = {"date": f"2026-12-05T00:00:0{len(system)}+00:00", "device": "GPU X", "vllm_version": "0.26.0",
            "plugin_version": "0", "command": "throughput.py", "workload": [spec],
            "model_config": TINY_CFG}
    path = str(tmp_path / f"throughput-{system}-x.json")
    with gzip.open(path[:-5] + "-requests.jsonl.gz", "wt") as f:
        for rec in records:
            f.write(json.dumps({"trace": "t", **rec}) + "\n")
    if steps:
        write_steps(path[:-5] + "-steps.jsonl.gz", "t", ends)
    return write_results(path, meta, [row]), row, records, ends


def test_recorded_run_rows_report_and_script(tmp_path, capsys):
    base_path, base_row, base_recs, base_ends = _write_run(tmp_path, "base", 0.01, 0, {})
    plugin_path, plugin_row, plugin_recs, plugin_ends = _write_run(tmp_path, "plugin", 0.02, 4, {})
    stock_path, *_ = _write_run(tmp_path, "stock", 0.03, 4, {"max_lora_rank": 16,
                                                             "lora_target_modules": ["qkv_proj"]}, steps=False)
    assert model_config_of(json.load(open(base_path))) == TINY_CFG
    mb = ModelBytes(ModelDims(64, 4, 2, 16, 128, 2), 100, 2)

    # the base row is calibrated on itself: 100% of its roofline, eta = its bytes efficiency
    base = roofline_fields(base_row, base_recs, base_ends, TINY_CFG, **UNIT)
    assert base["pct_of_roofline"] == 100.0 and base["roofline"]["calibrated_on"] == "this row"
    steps = run_steps(spans_from_records(base_recs), base_ends, lambda a: None)
    assert [ld.batch for ld in steps.loads] == [3] * 8 and steps.measured_s == pytest.approx([0.01] * 8)
    eta = base_efficiency(mb, steps, **UNIT)
    assert base["roofline"]["base_efficiency"] == round(eta, 4) and base["distinct_adapters_per_step_mean"] == 0

    # every file filled from its side files; the plugin and stock rows calibrated on the base row
    candidates = [base_path, plugin_path, stock_path]
    plugin = fill_file(plugin_path, candidates, **UNIT)[0]
    assert plugin["roofline"]["calibrated_on"] == "throughput-base-x.json: t"
    assert plugin["roofline"]["steps_source"] == "recorded" and plugin["roofline"]["step_count_check"] == 1.0
    # adapters 0, 1, 2 in steps 0-3, adapters 3, 0, 1 in steps 4-7, of ranks 8, 16, 8, 16 on q
    # (64 + 64) and v (64 + 32, two KV heads of 16), 2 layers, 2 bytes
    a8, a16 = (2 * r * (64 + 64 + 64 + 32) * 2 for r in (8, 16))
    assert plugin["distinct_adapters_per_step_mean"] == 3.0
    assert plugin["adapter_bytes_per_step_mean"] == round((4 * (a8 + a16 + a8) + 4 * (a16 + a8 + a16)) / 8)
    p_steps = run_steps(spans_from_records(plugin_recs), plugin_ends, adapter_costs(plugin_row, TINY_CFG))
    ideal = sum(step_time(mb, ld, **UNIT, base_efficiency=eta) for ld in p_steps.loads)
    assert plugin["roofline_out_tok_per_s"] == round(24 / ideal, 1)
    assert plugin["pct_of_roofline"] == round(100 * ideal / plugin_ends[-1], 1)
    kinds = plugin["roofline"]["by_step_kind"]  # the busy time split by step kind adds up
    assert sum(k["steps"] for k in kinds.values()) == 8
    assert sum(k["ideal_s"] for k in kinds.values()) == pytest.approx(ideal, abs=2e-3)
    assert "prefill" in kinds and all(k["busy_s"] > 0 for k in kinds.values())
    stock = fill_file(stock_path, candidates, **UNIT)[0]
    assert stock["roofline"]["steps_source"] == "reconstructed" and stock["roofline"]["steps"] == 8
    slot = 16 * 2 * (3 * 64 + 64 + 32 + 32) * 2                 # rank 16 padded, qkv_proj slices
    assert stock["adapter_bytes_per_step_mean"] == 3 * slot

    # the report shows measured vs roofline and draws it
    for path, row in ((plugin_path, plugin), (stock_path, stock)):
        data = json.load(open(path))
        write_results(path, {k: v for k, v in data.items() if k != "rows"}, [row])
    table = markdown_table(load_results(candidates))
    line = next(ln for ln in table.splitlines() if "| plugin |" in ln)
    assert f"{plugin['roofline_out_tok_per_s']:,.1f} ({plugin['pct_of_roofline']:,.1f}%)" in line
    assert next(ln for ln in table.splitlines() if "| base |" in ln).count("| - |") >= 1
    out = write_report(candidates, str(tmp_path / "r"))
    with open(out["roofline_plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # benchmarks/roofline.py over the folder: one line per row
    monkey_argv = [os.path.join(REPO, "benchmarks", "roofline.py"), str(tmp_path / "throughput-*.json")]
    old = sys.argv
    sys.argv = monkey_argv
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(monkey_argv[0], run_name="__main__")
    finally:
        sys.argv = old
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert printed.count("| t |") == 3 and "(base-x: t)" in printed
    assert "Copy bandwidth 3005 GB/s" in printed
