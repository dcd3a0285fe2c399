"""The kernels compile for the H100 (sm_90) without a GPU, and their weight loads are 16-byte
asynchronous copies (the interpreter tests prove the math, not that the GPU build works or is fast).

Triton compiles ahead of time to PTX and cubin (its bundled ptxas) given a target, the argument
types and the divisibility hints its launcher derives from real tensors (16-byte aligned pointers,
strides and sizes that are multiples of 16, as for Llama shapes). It runs in a subprocess because
this folder's tests switch Triton's interpreter on, which also turns Triton's own helpers
(`tl.cdiv`, ...) into interpreted functions that the compiler cannot use.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

H100 = ("cuda", 90, 32)
#: int arguments that are multiples of 16 at Llama sizes (the launcher would mark them so).
DIV16 = {"K", "k_per_split", "stride_xm", "stride_as", "stride_am", "stride_hs", "stride_ht", "stride_hi",
         "w0", "w1", "w2", "stride_ym", "stride_bs", "stride_bm", "max_rank"}


def compile_for_h100(kernel, signature: dict[str, str], constants: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {**signature, **{k: "constexpr" for k in constants}}
    assert list(signature) == kernel.arg_names, "kernel arguments changed: update this test"
    attrs = {(kernel.arg_names.index(k),): [["tt.divisibility", 16]]
             for k, t in signature.items() if t.startswith("*") or k in DIV16}
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget(*H100),
                          options={"num_warps": num_warps})


def shrink_signature(dt: str) -> dict[str, str]:
    names = ("x_ptr pool_ptr h_ptr work_ptr work_stride sorted_ptr a_addr_ptr ranks_ptr m0 m1 m2 K max_rank "
             "k_per_split stride_xm stride_xk stride_as stride_am stride_rs stride_hs stride_ht stride_hi").split()
    types = [f"*{dt}", f"*{dt}", "*fp32", "*i32", "i32", "*i32", "*i64", "*i32"] + ["i32"] * 14
    return dict(zip(names, types))


def expand_signature(dt: str) -> dict[str, str]:
    names = ("y_ptr h_ptr pool_ptr work_ptr work_stride sorted_ptr b_addr_ptr ranks_ptr scales_ptr m0 m1 m2 "
             "w0 w1 w2 max_rank n_tiles stride_ym stride_yn stride_bs stride_bm stride_rs stride_hs stride_ht "
             "stride_hi").split()
    types = [f"*{dt}", "*fp32", f"*{dt}", "*i32", "i32", "*i32", "*i64", "*i32", "*fp32"] + ["i32"] * 16
    return dict(zip(names, types))


def async_copy_sizes(ptx: str) -> set[int]:
    return {int(n, 16) for n in re.findall(r"cp\.async\.\w+\.shared\.global \[[^\]]*\], \[[^\]]*\], 0x(\w+)", ptx)}


def check_all() -> None:
    """Compile both kernels for fp16/bf16 x decode/prefill configs; raise on any failure."""
    from slora_plugin.kernels import paged_lora

    for dt in ("fp16", "bf16"):
        for config in (paged_lora.decode_config(256, 4096, 128), paged_lora.prefill_config(4096, 4096, 128)):
            rank_tiles = 128 // config.block_r
            shrink = compile_for_h100(
                paged_lora._shrink_kernel, shrink_signature(dt),
                {"stride_xk": 1, "BLOCK_M": config.block_m, "BLOCK_R": config.block_r, "BLOCK_K": config.block_k,
                 "NUM_RANK_TILES": rank_tiles, "SPLIT_K": config.split_k,
                 "INNER": 3 * rank_tiles * config.split_k, "EVEN_K": True, "UPCAST": False}, config.num_warps)
            expand = compile_for_h100(
                paged_lora._expand_kernel, expand_signature(dt),
                {"stride_yn": 1, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_kr,
                 "SPLIT_K": config.split_k, "RANK_P2": 128, "EVEN_N": True}, config.num_warps)
            for name, kernel in (("shrink", shrink), ("expand", expand)):
                where = f"{name} {dt} {config}"
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
