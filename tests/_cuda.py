"""Lowering a function for CUDA on a CPU-only machine (pallas.md): the full Pallas ->
Triton-IR lowering runs, catching what interpret mode hides (non-power-of-two arrays,
unsupported primitives). PTX compilation itself happens only on a GPU."""
from st_jax._export import export_for


def lower_for_cuda(f, *specs):
    return export_for(f, "cuda", *specs)
