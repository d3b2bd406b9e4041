"""The CUDA C sources shipped in this package and the template instantiations the CuPy backend uses.

Shared by the CuPy backend (``_cupy.py``) and the compile check (``tests/test_kernel_sources_compile.py``), so the
check compiles exactly what runs on the GPU. Pure stdlib: importing it needs no CuPy, torch or compiler.
"""
from __future__ import annotations

import re
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent

#: kernel templates per source file
KERNELS: dict[str, tuple[str, ...]] = {
    "adaptive_conv.cu": ("adaptive_conv_forward", "adaptive_conv_grad_input", "adaptive_conv_grad_filter"),
    "jbu_fused.cu": ("jbu_fused_forward", "jbu_fused_forward_vec"),
}

#: torch dtype name -> CUDA storage type of featup_common.cuh (16-bit types are storage structs, math is float32)
CUDA_TYPES: dict[str, str] = {"float32": "float", "float16": "half_t", "bfloat16": "bf16_t"}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.MULTILINE)


def load_source(name: str) -> str:
    """Source text of ``name`` with its local ``#include "..."`` lines inlined.

    Inlining (rather than passing ``-I``) keeps CuPy's on-disk kernel cache keyed on the full text, so an edited
    header can never be served from a stale cache entry.
    """
    seen: set[str] = set()

    def expand(fname: str) -> str:
        if fname in seen:
            return ""
        seen.add(fname)
        text = (SOURCE_DIR / fname).read_text()
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


#: tap counts per side for which jbu_fused_forward_vec is also compiled with K fixed (loops unrolled); any other
#: odd K uses its K = 0 instantiation, which reads K from the launch arguments. Only FeatUp's K = 7: ptxas gives it
#: 72 registers (fp16, sm_90) against 92 at run-time K, while a fixed K = 5 took 128 (fewer resident threads).
FUSED_VEC_FIXED_K = (7,)


def template_k(kernel: str, K: int) -> int | None:
    """The compile-time K argument ``kernel`` is instantiated with for a launch with ``K`` taps per side: for
    ``jbu_fused_forward_vec`` K itself when it is in ``FUSED_VEC_FIXED_K``, else 0 (run-time K); None for kernels
    without one."""
    if kernel != "jbu_fused_forward_vec":
        return None
    return K if K in FUSED_VEC_FIXED_K else 0


def kernel_expression(kernel: str, ctype: str, K: int) -> str:
    """The instantiation a launch of ``kernel`` on ``ctype`` with ``K`` taps per side uses, e.g.
    ``jbu_fused_forward_vec<half_t, 7>`` or ``adaptive_conv_forward<float>``."""
    kc = template_k(kernel, K)
    return f"{kernel}<{ctype}>" if kc is None else f"{kernel}<{ctype}, {kc}>"


def name_expressions(name: str) -> list[str]:
    """Every template instantiation of ``name``'s kernels, e.g. ``adaptive_conv_forward<half_t>``."""
    out = []
    for k in KERNELS[name]:
        for t in CUDA_TYPES.values():
            if k == "jbu_fused_forward_vec":
                out += [f"{k}<{t}, {kc}>" for kc in (0, *FUSED_VEC_FIXED_K)]
            else:
                out.append(f"{k}<{t}>")
    return out

# ---- launch geometry (shared by the CuPy backend and the host-emulation test, so both run the same grids) ----

#: thread block of the adaptive-conv kernels: 32 columns (one warp, coalesced rows) x 8 rows
BLOCK = (32, 8, 1)
#: CUDA's limit on grid.y and grid.z; the kernels walk z with a grid-stride loop, so B*C is unbounded
MAX_GRID_YZ = 65535
#: must match FEATUP_CPT / FEATUP_MAX_K in featup_common.cuh
CHANNELS_PER_THREAD = 4
MAX_K = 15
#: channels summed per z step of the fused kernel; each step recomputes its pixels' weights (D*K*K work per
#: 64*K*K of channel work, so the overhead is ~D/64 for the usual key dim D = 32)
FUSED_CHANNELS_PER_BLOCK = 64
#: shared-memory budget per block for the fused kernels' per-thread weights (48 KB needs no opt-in)
FUSED_SHARED_BYTES = 48 * 1024


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def launch_geometry(
    kernel: str,
    *,
    B: int,
    C: int,
    H: int,
    W: int,
    K: int,
    max_grid_z: int = MAX_GRID_YZ,
    channels_per_block: int | None = None,
) -> tuple[tuple[int, int, int], tuple[int, int, int], int, int]:
    """Grid, block, dynamic shared bytes and (fused only) channels per z step for one launch.

    Args:
        kernel: one of the names in ``KERNELS`` (``jbu_fused_forward_vec``: two output columns per thread, so
            grid.x covers ``ceil(W/2)`` thread columns).
        B, C, H, W, K: batch, channels, *output* height/width, taps per side.
        max_grid_z: cap on grid.z (tests lower it to exercise the kernels' grid-stride loop).
        channels_per_block: fused kernels only: channels summed per z step (default ``FUSED_CHANNELS_PER_BLOCK``);
            each step recomputes its pixels' weights, fewer steps mean fewer blocks (the benchmark sweeps it).

    Returns:
        ``(grid, block, shared_mem_bytes, channels_per_block)``; ``channels_per_block`` is 0 except for the fused
        kernel.

    Raises:
        ValueError: more rows than grid.y can cover.
    """
    block, shared, cpb = BLOCK, 0, 0
    if kernel == "adaptive_conv_forward":
        cols, rows, nz = W, H, B * _ceil(C, CHANNELS_PER_THREAD)
    elif kernel == "adaptive_conv_grad_input":
        cols, rows, nz = W + K - 1, H + K - 1, B * _ceil(C, CHANNELS_PER_THREAD)
    elif kernel == "adaptive_conv_grad_filter":
        cols, rows, nz = W, H, B * K
    elif kernel == "jbu_fused_forward":
        by = max(1, min(8, FUSED_SHARED_BYTES // (4 * K * K * BLOCK[0])))
        block = (BLOCK[0], by, 1)
        shared = 4 * K * K * block[0] * block[1]
        cpb = max(1, min(C, channels_per_block or FUSED_CHANNELS_PER_BLOCK))
        cols, rows, nz = W, H, B * _ceil(C, cpb)
    elif kernel == "jbu_fused_forward_vec":
        # two pixels per thread, so two K*K weight slots; halve the block width if one row of 32 does not fit
        per_thread = 2 * 4 * K * K
        bx = BLOCK[0]
        while bx > 1 and per_thread * bx > FUSED_SHARED_BYTES:
            bx //= 2
        by = max(1, min(8, FUSED_SHARED_BYTES // (per_thread * bx)))
        block = (bx, by, 1)
        shared = per_thread * bx * by
        cpb = max(1, min(C, channels_per_block or FUSED_CHANNELS_PER_BLOCK))
        cols, rows, nz = _ceil(W, 2), H, B * _ceil(C, cpb)
    else:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {[k for v in KERNELS.values() for k in v]}")
    gy = _ceil(rows, block[1])
    if gy > MAX_GRID_YZ:
        raise ValueError(f"{rows} rows exceed the CUDA grid limit ({MAX_GRID_YZ * block[1]} rows)")
    grid = (max(1, _ceil(cols, block[0])), max(1, gy), max(1, min(nz, max_grid_z, MAX_GRID_YZ)))
    return grid, block, shared, cpb
