"""Multi-LoRA fine-tuning in one batch (mLoRA's BatchLoRA): many adapters of one frozen base
model trained together, each step one forward and backward over a batch that mixes every
adapter's samples; adapters are written in PEFT format into a directory the plugin serves.

Room 2 of docs/DESIGN.md: torch, transformers and the kernels, nothing of vLLM. Entry points:
`slora_plugin.train.trainer.Trainer` and `slora-plugin train CONFIG` (`train/cli.py`).
"""
