"""Admission by adapter bytes, simulated on CPU with the roofline's byte model: a MODEL, not a
measurement (no GPU, no vLLM engine, no kernels; real steps also pay kernel inefficiency, host
time and adapter loads, which this leaves out).

A queue of requests over N adapters arrives at once (adapter of each request drawn as the
throughput benchmark draws it: `int(N * power(alpha))`, uniform at alpha 1; ranks 8-128 in turn on
the Llama-2-7B modules given). Every step admits, in FCFS order, the requests the policy leaves
visible (`slora_plugin.pool.admission_budget.plan_budget`; all of them without it) while a slot
(`--max-num-seqs`), the step's token budget (a whole prompt, no chunking) and `--max-loras`
distinct adapters allow; admitted requests prefill in that step, running ones decode one token.
A step takes `roofline.step_time` at the H100's copy bandwidth and fp16 peak (base efficiency 1),
so the tokens per modelled second are what the byte model allows, not what an engine reaches.

    python benchmarks/admission_sim.py                       # 100 and 1,000 adapters, budgets off/0.25/0.5/1
    python benchmarks/admission_sim.py --n-adapters 100 --budgets off,0.3 --max-wait 64
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from dataclasses import dataclass

from slora_plugin.layout import MODULES, ModelDims
from slora_plugin.model_config import LLAMA_2_7B
from slora_plugin.pool.admission_budget import budget_bytes, plan_budget
from slora_plugin.roofline import (H100_COPY_GBPS, H100_PEAK_TFLOPS, ModelBytes, StepLoad,
                                   step_time)


@dataclass
class Req:
    rid: int
    adapter: int
    input_len: int
    output_len: int
    done: int = 0  # tokens generated
    admitted_step: int = -1


def workload(n_adapters: int, n_requests: int, alpha: float, input_len: int, output_len: int,
             seed: int) -> list[Req]:
    rng = random.Random(seed)
    return [Req(i, min(int(n_adapters * rng.random() ** (1 / alpha)), n_adapters - 1),
                input_len, output_len) for i in range(n_requests)]


def simulate(reqs: list[Req], model: ModelBytes, adapter_bytes: list[int],
             adapter_elems: list[int], *, budget: int | None, max_wait: int, max_num_seqs: int,
             max_tokens: int, max_loras: int) -> dict:
    """Step the queue to the end; the run's modelled throughput and per-step statistics."""
    waiting = list(reqs)
    running: list[Req] = []
    held: dict = {}
    t = 0.0
    step = 0
    out_tokens = 0
    distinct, abytes, max_held = [], [], 0
    starving = 0
    while waiting or running:
        if budget is None:
            visible = waiting
        else:
            plan = plan_budget(waiting, lambda r: r.adapter, lambda r: adapter_bytes[r.adapter],
                               [(r.adapter, adapter_bytes[r.adapter]) for r in running],
                               budget_bytes=budget, slots=max_num_seqs - len(running),
                               max_wait_steps=max_wait, held_steps=held, key=lambda r: r.rid)
            gone = {r.rid for r in plan.held}
            visible = [r for r in waiting if r.rid not in gone]
            starving += plan.starving
            max_held = max([max_held, *held.values()])
        tokens = len(running)
        in_step = {r.adapter for r in running}
        admitted = []
        for r in visible:
            if len(running) + len(admitted) >= max_num_seqs:
                break
            if tokens + r.input_len > max_tokens:
                break  # vLLM's FCFS stops at the first request that does not fit
            if r.adapter not in in_step and len(in_step) >= max_loras:
                continue  # vLLM's max_loras skip
            in_step.add(r.adapter)
            tokens += r.input_len
            admitted.append(r)
        gone_ids = {r.rid for r in admitted}
        waiting = [r for r in waiting if r.rid not in gone_ids]
        load = StepLoad(decode=len(running), decode_ctx=sum(r.input_len + r.done for r in running),
                        prefill=len(admitted), prefill_tokens=sum(r.input_len for r in admitted),
                        prefill_pairs=sum(r.input_len * (r.input_len + 1) // 2 for r in admitted),
                        adapters=len(in_step),
                        adapter_bytes=sum(adapter_bytes[a] for a in in_step))
        load.lora_token_elems = (sum(adapter_elems[r.adapter] for r in running)
                                 + sum(adapter_elems[r.adapter] * r.input_len for r in admitted))
        t += step_time(model, load, H100_COPY_GBPS, H100_PEAK_TFLOPS)
        for r in admitted:
            r.admitted_step = step
        running.extend(admitted)
        for r in running:
            r.done += 1
        out_tokens += len(running)
        running = [r for r in running if r.done < r.output_len]
        distinct.append(load.adapters)
        abytes.append(load.adapter_bytes)
        step += 1
    waits = [r.admitted_step for r in reqs]
    return {"out_tok_per_s": out_tokens / t, "steps": step, "modelled_s": t,
            "distinct_per_step": statistics.fmean(distinct),
            "adapter_gb_per_step": statistics.fmean(abytes) / 1e9,
            "admit_step_p50": statistics.median(waits), "admit_step_max": max(waits),
            "max_held_steps": max_held, "starving": starving}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="admission_sim.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--n-adapters", default="100,1000")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=1.0, help="popularity power law (1 = uniform)")
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--ranks", default="8,16,32,64,128", help="adapter j has ranks[j %% len]")
    p.add_argument("--modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--budgets", default="off,0.25,0.5,1",
                   help="adapter_bytes_per_step_budget values ('off': no policy)")
    p.add_argument("--max-wait", type=int, default=128, help="max_admission_wait_steps")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--max-loras", type=int, default=128, help="max_adapters_per_step")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = ModelBytes(ModelDims.from_hf_config(argparse.Namespace(**LLAMA_2_7B)),
                       LLAMA_2_7B["vocab_size"], 2)
    ranks = [int(r) for r in args.ranks.split(",")]
    modules = args.modules.split(",")
    assert set(modules) <= set(MODULES), f"modules must be among {MODULES}"
    print("MODEL, not a measurement: roofline step times (H100 copy bandwidth, base efficiency 1)")
    print(f"base weights {model.weight_bytes_per_step / 1e9:.1f} GB/step; {args.requests} requests "
          f"{args.input_len}+{args.output_len} at once, max_num_seqs {args.max_num_seqs}, "
          f"max_wait {args.max_wait} steps\n")
    print("| adapters | budget | modelled out tok/s | distinct/step | adapter GB/step | steps "
          "| admit step p50 / max | max held steps | starving request-steps |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.n_adapters.split(",")):
        elems = [model.adapter_elems({m: ranks[j % len(ranks)] for m in modules}) for j in range(n)]
        sizes = [e * model.dtype_bytes for e in elems]
        for b in args.budgets.split(","):
            budget = None if b == "off" else budget_bytes(float(b), model.weight_bytes_per_step)
            reqs = workload(n, args.requests, args.alpha, args.input_len, args.output_len,
                            args.seed)
            r = simulate(reqs, model, sizes, elems, budget=budget, max_wait=args.max_wait,
                         max_num_seqs=args.max_num_seqs, max_tokens=args.max_num_batched_tokens,
                         max_loras=args.max_loras)
            print(f"| {n} | {b} | {r['out_tok_per_s']:,.0f} | {r['distinct_per_step']:.1f} | "
                  f"{r['adapter_gb_per_step']:.2f} | {r['steps']} | {r['admit_step_p50']:.0f} / "
                  f"{r['admit_step_max']} | {r['max_held_steps']} | {r['starving']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
