"""Paged LoRA kernels (Triton) and their plain-torch references. Imports torch and triton only."""
