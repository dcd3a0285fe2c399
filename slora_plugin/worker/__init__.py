"""Worker side: applies the scheduler's commands and runs vLLM's LoRA layers on paged kernels."""
