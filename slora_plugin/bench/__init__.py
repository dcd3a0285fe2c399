"""The throughput harness: base model, stock vLLM multi-LoRA and the plugin on the same traces.

`workload` (S-LoRA-style traces), `plan` (GPU memory plan, no GPU), `run` (the GPU runner, one
engine per command), `pool_log` (the page pool's counters from its log), `profile` (GPU time of a
torch-profiler window), `report` (results files, markdown table, plots) and `cli` (`slora-plugin
bench ...`). It sits on top of the package: it drives vLLM through its public API and reads the
plugin's log; of the package's other modules only the console script (slora_plugin/cli.py)
imports it. Model configs come from slora_plugin.model_config, adapter fleets from
slora_plugin.adapters.fleet (shared with `slora-plugin adapters synth`).
"""
