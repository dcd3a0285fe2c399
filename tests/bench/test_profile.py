"""GPU-time summary of torch-profiler Chrome traces (bench.profile), on synthetic traces shaped
like the ones Kineto writes (kernel names as seen on the H100: FA3, nvjet, the paged kernels)."""

from __future__ import annotations

import gzip
import json
import threading
import time

import pytest

from slora_plugin.bench.profile import (
    CATEGORIES, NAME_CHARS, TOP_N, ProfileError, ProfileWindow, category, copy_table, describe,
    load_chrome_trace, summarize_gpu_trace, wait_for_trace)

FA3 = "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>(...)"


def _ev(name, ts, dur, cat="kernel", stream=7, **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"device": 0, "stream": stream, **args}}


def _trace(events):
    return {"schemaVersion": 1, "traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "python"}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0, "dur": 10_000},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "pid": 1, "tid": 1, "ts": 5, "dur": 3},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "execute_context_1", "pid": 0, "tid": 7,
         "ts": 0, "dur": 10_000},
        {"ph": "f", "cat": "ac2g", "name": "ac2g", "id": 1, "pid": 0, "tid": 7, "ts": 100},
        *events]}


@pytest.mark.parametrize("name, kind, want", [
    ("_shrink_kernel", "kernel", "lora"), ("_expand_kernel", "kernel", "lora"),
    ("_lora_shrink_kernel", "kernel", "lora"), ("_page_writer_kernel", "kernel", "adapter_write"),
    (FA3, "kernel", "attention"), ("flash_fwd_splitkv_kernel", "kernel", "attention"),
    ("void cutlass::device_kernel<flash::FlashAttnFwdCombine<cute::tuple<...>>>", "kernel", "attention"),
    ("void vllm::reshape_and_cache_flash_kernel<unsigned short>", "kernel", "attention"),
    ("fmha_cutlassF_f16_aligned_64x64_rf_sm80", "kernel", "attention"),
    ("nvjet_sm90_hsh_192x192_64x4_2x1_v_bz_coopB_TNN", "kernel", "gemm"),
    ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64", "kernel", "gemm"),
    ("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_tn_align8>", "kernel", "gemm"),
    ("triton_poi_fused_mul_silu_slice_1", "kernel", "other"),
    ("Memcpy HtoD (Pinned -> Device)", "memcpy", "memcpy_htod"),
    ("Memcpy DtoH (Device -> Pageable)", "memcpy", "memcpy_other"),
    ("Memcpy DtoD (Device -> Device)", "memcpy", "memcpy_other"),
    ("Memset (Device)", "memset", "memset"),
])
def test_category_of_real_kernel_names(name, kind, want):
    assert category(name, kind) == want


def test_summary_unions_overlapping_streams_and_counts_categories():
    events = [
        _ev("nvjet_sm90_hsh_64x128_64x8_2x1_v_bz_TNN", 1000, 400),            # gemm 1000-1400
        _ev("_shrink_kernel", 1400, 100), _ev("_expand_kernel", 1500, 100),   # lora 1400-1600
        _ev(FA3, 1600, 200),                                                  # attention
        _ev("Memcpy HtoD (Pinned -> Device)", 1300, 500, cat="gpu_memcpy", stream=20,
            bytes=1 << 20),                                                   # overlaps on stream 20
        _ev("_page_writer_kernel", 1800, 100, stream=20),
        _ev("Memcpy DtoH (Device -> Pageable)", 2500, 50, cat="gpu_memcpy", bytes=64),
        _ev("Memset (Device)", 2550, 50, cat="gpu_memset"),                   # touches the copy
        _ev("triton_poi_fused_mul_silu_slice_1", 2900, 100),                  # 2900-3000
    ]
    s = summarize_gpu_trace(_trace(events))
    # GPU events span 1000..3000 us; busy = 1000-1900 (union of all streams) + 2500-2600 + 2900-3000.
    assert s["window_s"] == pytest.approx(0.002)
    assert s["gpu_busy_s"] == pytest.approx(0.0011)
    assert s["gpu_idle_s"] == pytest.approx(0.0009)
    assert s["gpu_idle_fraction"] == pytest.approx(0.45)
    assert s["kernel_launches"] == 6 and s["gpu_events"] == 9 and s["streams"] == 2
    cats = s["categories"]
    assert list(cats) == list(CATEGORIES)
    assert {c: cats[c]["time_s"] for c in CATEGORIES} == pytest.approx(
        {"lora": 2e-4, "adapter_write": 1e-4, "gemm": 4e-4, "attention": 2e-4, "memcpy_htod": 5e-4,
         "memcpy_other": 5e-5, "memset": 5e-5, "other": 1e-4})
    assert cats["lora"]["count"] == 2 and cats["lora"]["share_of_busy"] == pytest.approx(2 / 11, abs=1e-4)
    # Sums over overlapping streams: the shares add up to more than the busy time.
    assert sum(c["share_of_busy"] for c in cats.values()) == pytest.approx(16 / 11, abs=1e-3)
    assert (cats["memcpy_htod"]["bytes"], cats["memcpy_other"]["bytes"]) == (1 << 20, 64)
    assert "bytes" not in cats["gemm"]
    top = s["top"]
    assert [t["name"] for t in top[:2]] == ["Memcpy HtoD (Pinned -> Device)",
                                            "nvjet_sm90_hsh_64x128_64x8_2x1_v_bz_TNN"]
    assert top[0] == {"name": "Memcpy HtoD (Pinned -> Device)", "category": "memcpy_htod",
                      "count": 1, "total_s": pytest.approx(5e-4)}
    assert any(t["name"].endswith("...") and len(t["name"]) == NAME_CHARS for t in top)   # FA3 shortened
    line = describe(s)
    assert "idle 45.0%" in line and "lora 18.2%" in line and "6 kernels" in line


def test_top_is_capped_and_grouped_by_name():
    events = [_ev(f"kernel_{i:02d}", 100 * i, i + 1) for i in range(30)]
    events += [_ev("kernel_00", 5000, 100)] * 3                            # 3 more calls of one kernel
    top = summarize_gpu_trace(_trace(events))["top"]
    assert len(top) == TOP_N
    assert top[0] == {"name": "kernel_00", "category": "other", "count": 4, "total_s": pytest.approx(301e-6)}
    assert [t["name"] for t in top[1:3]] == ["kernel_29", "kernel_28"]


def test_nested_intervals_and_no_gpu_events():
    nested = [_ev("a_gemm", 0, 1000), _ev("b_gemm", 100, 50, stream=8), _ev("c_gemm", 999, 1, stream=9)]
    s = summarize_gpu_trace(_trace(nested))
    assert s["gpu_busy_s"] == pytest.approx(1e-3) and s["gpu_idle_fraction"] == 0
    with pytest.raises(ProfileError, match="no GPU events"):
        summarize_gpu_trace(_trace([]))
    with pytest.raises(ProfileError, match="no 'traceEvents' list"):
        summarize_gpu_trace({"events": []})


def test_load_chrome_trace_json_and_gz(tmp_path):
    trace = _trace([_ev("_shrink_kernel", 10, 5)])
    plain = tmp_path / "a.json"
    plain.write_text(json.dumps(trace))
    packed = tmp_path / "w.123.pt.trace.json.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        json.dump(trace, f)
    assert load_chrome_trace(str(plain)) == load_chrome_trace(str(packed)) == trace
    cut = tmp_path / "cut.pt.trace.json.gz"
    cut.write_bytes(packed.read_bytes()[:40])                 # a gzip file still being written
    with pytest.raises(ProfileError, match="cut.pt.trace.json.gz: cannot read"):
        load_chrome_trace(str(cut))
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ProfileError, match="not a Chrome trace"):
        load_chrome_trace(str(tmp_path / "list.json"))


def test_wait_for_trace_waits_for_a_complete_file(tmp_path):
    trace = _trace([_ev("_expand_kernel", 10, 5)])
    data = gzip.compress(json.dumps(trace).encode())
    path = tmp_path / "slora-bench_dp0_pp0_tp0.1700000000.pt.trace.json.gz"
    (tmp_path / "other_dp0.1.pt.trace.json.gz").write_bytes(data)          # another prefix: ignored
    path.write_bytes(data[:len(data) // 2])                                 # half written

    def finish():
        time.sleep(0.3)
        path.write_bytes(data)

    writer = threading.Thread(target=finish)
    writer.start()
    got, loaded = wait_for_trace(str(tmp_path), "slora-bench", timeout_s=10, poll_s=0.05)
    writer.join()
    assert got == str(path) and loaded == trace
    with pytest.raises(ProfileError, match=r"no complete profiler trace 'nope\*.pt.trace.json\[.gz\]'.*"
                                           r"other_dp0"):
        wait_for_trace(str(tmp_path), "nope", timeout_s=0.1, poll_s=0.05)
    with pytest.raises(ProfileError, match="directory missing"):
        wait_for_trace(str(tmp_path / "none"), "slora-bench", timeout_s=0, poll_s=0.05)


def test_copy_table_truncates(tmp_path):
    src = tmp_path / "prof"
    src.mkdir()
    (src / "profiler_out_0.txt").write_text("".join(f"line {i}\n" for i in range(500)))
    dest = copy_table(str(src), str(tmp_path / "out" / "throughput-plugin-x-profile.txt"), max_lines=200)
    lines = open(dest).read().splitlines()
    assert len(lines) == 201 and lines[199] == "line 199" and lines[200].startswith("... (cut at 200 lines")
    (src / "profiler_out_0.txt").write_text("short\n")
    assert open(copy_table(str(src), dest)).read() == "short\n"
    with pytest.raises(ProfileError, match="no profiler_out_0.txt in"):
        copy_table(str(tmp_path / "out"), dest, timeout_s=0)


def test_profile_window_parse():
    w = ProfileWindow.parse("2:12:6")
    assert (w.trace_index, w.start_s, w.duration_s) == (2, 12.0, 6.0) and str(w) == "2:12:6"
    assert ProfileWindow.parse("0:0.5:1.5") == ProfileWindow(0, 0.5, 1.5)
    for bad, why in [("2:12", "expected INDEX:START_S:DURATION_S"), ("a:1:2", "must be an integer"),
                     ("0:x:2", "numbers"), ("-1:0:2", "INDEX >= 0"), ("0:-1:2", "START_S >= 0"),
                     ("0:1:0", "DURATION_S > 0"), ("0:1:nan", "DURATION_S > 0")]:
        with pytest.raises(ProfileError, match=why):
            ProfileWindow.parse(bad)


def _result_file(tmp_path, name, rows):
    from slora_plugin.bench.report import summarize, write_results
    from slora_plugin.bench.workload import WorkloadSpec

    spec = WorkloadSpec(n_adapters=0, arrival="all")
    recs = [{"input_len": 256, "n_out": 128, "finished": True, "ttft_s": 0.5, "e2e_s": 2.0, "tpot_s": 0.01}]
    meta = {"date": "2026-11-23T00:00:00+00:00", "device": "H100", "vllm_version": "0.26.0",
            "plugin_version": "0", "command": "x", "workload": [spec.to_dict()]}
    full = [{"system": "base", "trace": spec.label, "workload": spec.to_dict(), "n_adapters": 0, "ranks": [],
             **summarize(recs, duration_s, 6.0), "settings": {}, "init_s": 1.0, **extra}
            for duration_s, extra in rows]
    return write_results(str(tmp_path / f"throughput-base-{name}.json"), meta, full)


def test_report_keeps_profiled_rows_out_of_reference_and_plots(tmp_path):
    from slora_plugin.bench.report import load_results, markdown_table, write_report

    summary = summarize_gpu_trace(_trace([_ev("_shrink_kernel", 0, 30), _ev("x_gemm", 30, 10)]))
    profile = {"requested": "0:1:2", "start_s": 1.0, "stop_s": 3.0, "stop_call_s": 9.0, **summary}
    only = _result_file(tmp_path, "p", [(1.0, {"profiled": True, "profile": profile})])
    assert set(write_report([only], str(tmp_path / "r"))) == {"table"}     # nothing to plot
    md = markdown_table(load_results([only]))
    assert "PROFILED (throughput perturbed, not a result)" in md
    line = next(ln for ln in md.splitlines()
                if ln.startswith("| ") and ": all-at-once" in ln.split("|")[1] and "1-3 s" in ln)
    assert "| 75.0 | 0.0 | 25.0 |" in line and "`_shrink_kernel` (75.0%)" in line
    plain = _result_file(tmp_path, "q", [(2.0, {})])
    md = markdown_table(load_results([only, plain]))
    rows = [ln for ln in md.splitlines() if "| base | 0 | - | 1/1 |" in ln]
    assert len(rows) == 2
    # The plain base row (64 out tok/s) is the reference, not the profiled one (128): ratio 2.0.
    assert any("PROFILED" in ln and "| 2.000 |" in ln for ln in rows)
