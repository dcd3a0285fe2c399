"""Every change this plugin makes to vLLM's own classes: one vLLM component per file.

Each file states what it changes, the vLLM version it was written against (`VLLM_VERSION`) and
the private names it relies on (`REQUIRES`, checked by `guard.enforce` before anything is
patched). A patch applied once per process exposes an idempotent `apply()`; one needed only
around a single vLLM call is a context manager that restores the original on exit.
"""
