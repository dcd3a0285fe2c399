"""What the GPU build of the kernels looks like, checked without a GPU.

1. How many kernels vLLM's start-up compiles. Every distinct Triton specialization (constexprs,
   plus int arguments equal to 1 or divisible by 16, plus pointer alignment) is a JIT compile,
   and vLLM captures CUDA graphs at every batch size up to 512 tokens: a config or an argument
   class that moves with the token count turns into compiles during capture (measured: 45 s of
   capture instead of 7 s). The keys are computed with Triton's own specialization function on
   the exact arguments `launch_plans` gives the kernels.
2. The kernels compile for the H100 (sm_90) and their weight loads are 16-byte asynchronous
   copies (the interpreter tests prove the math, not that the GPU build works or is fast).
   Triton compiles ahead of time to PTX and cubin (its bundled ptxas) given a target, the
   argument types and the divisibility facts derived, as in (1), from the launch arguments. It
   runs in a subprocess because this folder's tests switch Triton's interpreter on, which also
   turns Triton's own helpers (`tl.cdiv`, ...) into interpreted functions the compiler cannot use.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch

H100 = ("cuda", 90, 32)
#: Llama-2-7B's fused layers: (module ids, in_features, slice widths); Llama-3-8B adds GQA widths.
LLAMA2_LAYERS = {
    "qkv_proj": ((0, 1, 2), 4096, (4096, 4096, 4096)),
    "o_proj": ((3,), 4096, (4096,)),
    "gate_up_proj": ((4, 5), 4096, (11008, 11008)),
    "down_proj": ((6,), 11008, (4096,)),
}
LLAMA3_LAYERS = {
    "qkv_proj": ((0, 1, 2), 4096, (4096, 1024, 1024)),
    "o_proj": ((3,), 4096, (4096,)),
    "gate_up_proj": ((4, 5), 4096, (14336, 14336)),
    "down_proj": ((6,), 14336, (4096,)),
}
MAX_RANK = 128
#: vLLM's CUDA-graph capture sizes are at most 512 tokens; eager steps hold up to the batch budget.
CAPTURE_SIZES = range(1, 513)
PREFILL_SIZES = (2048, 8192)


def plans(layers: dict, num_tokens: int, dtype: torch.dtype, meta):
    """The (shrink, expand) launches of every layer at one token count, on CPU tensors of the real
    shapes (never run: only their types, values and alignment matter)."""
    from slora_plugin.kernels.lora_linear import launch_plans

    slots = meta.max_slots
    a_addr = torch.zeros((slots, 7, MAX_RANK), dtype=torch.int64)
    ranks = torch.zeros((slots, 7), dtype=torch.int32)
    scales = torch.ones((slots, 7), dtype=torch.float32)
    pool = torch.empty(1024, dtype=dtype)
    for module_ids, k_in, widths in layers.values():
        x = torch.empty((num_tokens, k_in), dtype=dtype)
        y = torch.empty((num_tokens, sum(widths)), dtype=dtype)
        yield from launch_plans(y, x, pool, meta, a_addr, a_addr, ranks, scales, module_ids, widths, MAX_RANK)


def specialization(launch) -> dict[str, tuple]:
    """Triton's (type, specialization) of each runtime argument, as its launcher computes it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return {name: tuple(native_specialize_impl(BaseBackend, value, False, name not in launch.dynamic, True))
            for name, value in launch.args.items()}


def compile_key(launch) -> tuple:
    return (launch.kernel.__name__ if hasattr(launch.kernel, "__name__") else launch.kernel.fn.__name__,
            tuple(sorted(specialization(launch).items())), tuple(sorted(launch.constexprs.items())),
            launch.num_warps, launch.num_stages)


def test_startup_compiles_few_kernels() -> None:
    """Over every capture size 1..512 and two prefill sizes, all four layers of Llama-2-7B (and of
    Llama-3-8B, GQA) share one config per phase and one compiled kernel per (kernel, phase):
    4 compiles per dtype in all, none of them at a capture size after the first."""
    from slora_plugin.kernels.metadata import SegmentMeta
    from slora_plugin.kernels.tiling import choose_config

    meta = SegmentMeta(max_tokens=max(PREFILL_SIZES), max_slots=64, device="cpu")
    for name, layers in (("llama-2-7b", LLAMA2_LAYERS), ("llama-3-8b", LLAMA3_LAYERS)):
        configs = {choose_config(t, k_in, MAX_RANK) for t in (*CAPTURE_SIZES, *PREFILL_SIZES)
                   for _, k_in, _ in layers.values()}
        keys = {compile_key(launch) for t in (*CAPTURE_SIZES, *PREFILL_SIZES)
                for launch in plans(layers, t, torch.float16, meta)}
        decode_keys = {compile_key(launch) for t in CAPTURE_SIZES for launch in plans(layers, t, torch.float16, meta)}
        assert len(configs) == 2, f"{name}: {configs}"
        assert len(keys) == 4, f"{name}: {len(keys)} compiled kernels:\n" + "\n".join(map(str, sorted(keys)))
        assert len(decode_keys) == 2, f"{name}: {len(decode_keys)} decode kernels"


def test_token_count_moves_no_specialized_argument() -> None:
    """Guards the list of unspecialized arguments: across capture sizes, the only specialized
    arguments whose value changes are pointers (whose alignment does not)."""
    from slora_plugin.kernels.metadata import SegmentMeta

    meta = SegmentMeta(max_tokens=512, max_slots=64, device="cpu")
    seen: dict[tuple, dict] = {}
    for t in (1, 2, 3, 16, 17, 100, 512):
        for i, launch in enumerate(plans(LLAMA2_LAYERS, t, torch.bfloat16, meta)):
            spec = specialization(launch)
            assert seen.setdefault((i,), spec) == spec, f"launch {i} at {t} tokens: " + str(
                {k: (seen[(i,)][k], v) for k, v in spec.items() if seen[(i,)][k] != v})


def compile_for_h100(launch):
    """Compile `launch` ahead of time for sm_90 with the signature and divisibility facts its
    arguments would give on the GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = launch.kernel
    signature, constants, attrs = {}, dict(launch.constexprs), {}
    if "UPCAST" in constants:  # the bf16 upcast is for the interpreter (CPU tensors) only
        constants["UPCAST"] = False
    for name, (ty, spec) in specialization(launch).items():
        if ty == "constexpr":
            signature[name], constants[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec == "D":
            attrs[(kernel.arg_names.index(name),)] = [["tt.divisibility", 16]]
    signature.update({k: "constexpr" for k in launch.constexprs})
    signature = {name: signature[name] for name in kernel.arg_names}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget(*H100),
                          options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})


def async_copy_sizes(ptx: str) -> set[int]:
    return {int(n, 16) for n in re.findall(r"cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x(\w+)", ptx)}


def check_all() -> None:
    """Compile both kernels for fp16/bf16 x decode/prefill (Llama-2-7B qkv_proj); raise on failure."""
    from slora_plugin.kernels.metadata import SegmentMeta

    meta = SegmentMeta(max_tokens=4096, max_slots=64, device="cpu")
    layers = {"qkv_proj": LLAMA2_LAYERS["qkv_proj"]}
    for dtype in (torch.float16, torch.bfloat16):
        for t in (256, 4096):
            for launch in plans(layers, t, dtype, meta):
                kernel = compile_for_h100(launch)
                where = f"{launch.kernel.fn.__name__} {dtype} T={t} {launch.constexprs} warps={launch.num_warps}"
                assert kernel.asm.get("cubin"), f"{where}: no cubin"
                assert 16 in async_copy_sizes(kernel.asm["ptx"]), f"{where}: weights not loaded by 16-byte copies"
                print(f"ok {where}")


def test_kernels_compile_for_h100_with_vector_loads() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == 8, done.stdout


if __name__ == "__main__":
    check_all()
