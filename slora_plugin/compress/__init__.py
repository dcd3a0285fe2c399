"""Compress-then-Serve: a collection of LoRA adapters jointly compressed into shared bases and a
small core per adapter (Brüel-Gabrielsson et al. 2024, arXiv 2407.00066). Pure torch, no vLLM.

Import from the submodules (`api` for `compress_collection`, `collection` for the on-disk format):
this package defines no names of its own.
"""
