"""Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter when there is no
GPU. The switch must be set before `triton.jit` decorates the kernels (it is read at decoration
time), so it is set here, at collection, before any test module imports slora_plugin.kernels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
