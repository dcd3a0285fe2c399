"""The memory plan: stock vLLM's slot bytes must reproduce the baseline's measurements."""

from __future__ import annotations

import pytest

from slora_plugin.adapters.peft_format import adapter_config, write_adapter
from slora_plugin.bench.cli import main
from slora_plugin.bench.plan import (
    GIB, TUNED_STOCK_TARGETS, PlanError, adapter_ranks_from_dir, format_plan, make_plan,
    ranks_from_mix, stock_slot_bytes)
from slora_plugin.model_config import LLAMA_2_7B, ModelMemory, write_model_config

MEM = ModelMemory.from_config(LLAMA_2_7B)
#: H100 as torch reports it, and the overhead calibrated on the baseline's row a.
H100 = dict(gpu_gib=79.19, overhead_gib=1.7)


@pytest.mark.parametrize("row,max_loras,rank,measured_gib,tol", [
    ("c", 32, 16, 2.46, 0.01), ("d", 32, 128, 19.62, 0.01), ("e", 8, 128, 4.96, 0.015)])
def test_stock_slots_match_baseline_default_targets(row, max_loras, rank, measured_gib, tol):
    """Baseline rows c/d/e: growth of "Model loading took" over row a (12.55 GiB)."""
    got = stock_slot_bytes(MEM, max_loras, rank) / GIB
    assert got == pytest.approx(measured_gib, rel=tol), row


def test_naive_formula_would_not_match():
    """Without per-slice A's and the embedding layers the baseline's d row is missed by 18%:
    this is why the formula counts them."""
    d = MEM.dims
    naive = 32 * 128 * 2 * d.num_hidden_layers * sum(
        i + o for i, o in [(4096, 3 * 4096), (4096, 4096), (4096, 2 * 11008), (11008, 4096)])
    assert naive / GIB == pytest.approx(16.06, abs=0.01)
    assert stock_slot_bytes(MEM, 32, 128) / naive > 1.2


def test_tuned_targets_and_peft_names():
    assert stock_slot_bytes(MEM, 128, 128, TUNED_STOCK_TARGETS) == 32 * GIB  # baseline d2
    assert stock_slot_bytes(MEM, 64, 16, TUNED_STOCK_TARGETS) == 2 * GIB      # baseline c2
    assert stock_slot_bytes(MEM, 8, 16, ["q_proj", "o_proj"]) == stock_slot_bytes(MEM, 8, 16, TUNED_STOCK_TARGETS)
    with pytest.raises(PlanError, match="'mlp' is not a vLLM Llama LoRA layer"):
        stock_slot_bytes(MEM, 8, 16, ["mlp"])
    with pytest.raises(PlanError, match="must be >= 1"):
        stock_slot_bytes(MEM, 0, 16)


def test_kv_tokens_match_baseline_log():
    """KV cache tokens vLLM logged: a 116,768; c 111,744; d 76,608; e 106,624; d2 51,232."""
    plan = make_plan(LLAMA_2_7B, ranks_from_mix(32, [16]), resident=(8, 32), **H100)
    assert plan.num_blocks * 16 == 116_768
    by_k = {r.resident: r for r in plan.rows}
    assert by_k[32].stock["stock default"][1] == 111_744            # c: 32 slots r16
    mixed = make_plan(LLAMA_2_7B, ranks_from_mix(1000, [8, 16, 32, 64, 128]),
                      resident=(8, 32, 128), **H100)
    by_k = {r.resident: r for r in mixed.rows}
    assert by_k[32].stock["stock default"][1] == 76_608              # d
    assert by_k[8].stock["stock default"][1] == pytest.approx(106_624, rel=0.002)  # e
    assert by_k[128].stock["stock tuned"][1] == 51_232               # d2


def test_plugin_pages_follow_real_ranks():
    plan = make_plan(LLAMA_2_7B, ranks_from_mix(10, [8, 16, 32, 64, 128]), kv_gib=57.02)
    # q,k,v,o rows of 4096 halves: 32 rows per 256 KiB page, 8 rows per rank -> rank / 4 pages
    assert plan.pages_per_adapter == (2, 4, 8, 16, 32) * 2
    by_k = {r.resident: r for r in plan.rows}
    assert sorted(by_k) == [1, 8, 10]
    assert by_k[1].plugin_adapter_bytes == 2 * 8 * 2**20
    assert by_k[10].plugin_kv_tokens == (plan.num_blocks - 124) * 16
    # stock pads every slot to rank 128: one r128 slot over q,k,v,o is 256 MiB tuned
    assert by_k[1].stock["stock tuned"][0] == 256 * 2**20


def test_plan_reports_what_does_not_fit():
    plan = make_plan(LLAMA_2_7B, ranks_from_mix(1000, [128]), resident=(512,), **H100)
    by_k = {r.resident: r for r in plan.rows}
    assert by_k[1000].plugin_kv_tokens == -1 and by_k[512].stock["stock tuned"][1] == -1
    text = format_plan(plan)
    assert "does not fit" in text and "| 1,000 |" in text
    with pytest.raises(PlanError, match="no room for a KV cache"):
        make_plan(LLAMA_2_7B, ranks_from_mix(1, [8]), gpu_gib=10)


def test_adapter_dir_ranks(tmp_path):
    write_adapter(str(tmp_path / "b"), adapter_config(8, 16, ["q_proj", "v_proj"],
                                                      rank_pattern={"v_proj": 32}), {})
    write_adapter(str(tmp_path / "a"), adapter_config(4, 8, ["o_proj", "lm_head"]), {})
    (tmp_path / "not-an-adapter").mkdir()
    assert adapter_ranks_from_dir(str(tmp_path)) == [{"o_proj": 4}, {"q_proj": 8, "v_proj": 32}]
    write_adapter(str(tmp_path / "c"), adapter_config(4, 8, "all-linear"), {})
    with pytest.raises(PlanError, match="adapter c: target_modules is a pattern"):
        adapter_ranks_from_dir(str(tmp_path))
    with pytest.raises(PlanError, match="no sub-directory has an adapter_config.json"):
        adapter_ranks_from_dir(str(tmp_path / "not-an-adapter"))


def test_cli_plan_prints_table(capsys, tmp_path):
    assert main(["plan", "--model", "llama-2-7b", "--gpu-gib", "80", "--ranks", "8,16,32,64,128",
                 "--adapters", "1000"]) == 0
    out = capsys.readouterr().out
    assert "| resident K | plugin adapters GiB | plugin KV tokens |" in out
    assert "| 32 | 2.95 |" in out and "19.61" in out
    d = write_model_config(str(tmp_path / "gqa"), {**LLAMA_2_7B, "num_key_value_heads": 8})
    assert main(["plan", "--model", d, "--adapters", "3", "--ranks", "16"]) == 0
    assert "8 KV heads" in capsys.readouterr().out
    assert main(["plan", "--ranks", "8,x"]) == 2
    assert "--ranks: expected comma-separated integers" in capsys.readouterr().err


def test_tuned_stock_wraps_the_layers_the_adapters_touch():
    plan = make_plan(LLAMA_2_7B, [{"q_proj": 8, "gate_proj": 8}], kv_gib=50)
    assert plan.stock_targets == {"stock tuned": ("qkv_proj", "gate_up_proj"), "stock default": None}
    assert "'stock tuned' qkv_proj,gate_up_proj" in format_plan(plan)
    custom = make_plan(LLAMA_2_7B, [{"q_proj": 8}], kv_gib=50, stock_targets={"mine": ["o_proj"]})
    assert list(custom.rows[0].stock) == ["mine"]
    assert custom.rows[0].stock["mine"][0] == stock_slot_bytes(MEM, 1, 8, ["o_proj"])
