"""``jax.export`` for one platform, including CUDA from a machine without a GPU.

Pallas kernels lower through Triton custom calls, which are not on jax.export's stable list
(the artifact is tied to the GPU build); exporting for ``"cuda"`` therefore disables that one
check and lowers under an abstract H100 mesh, so the full Pallas -> Triton-IR lowering runs
on CPU (PTX compilation happens when the artifact is first run on a GPU). See pallas.md.
"""
from __future__ import annotations

import jax

PLATFORMS = ("cpu", "cuda")


def export_for(fn, platform: str, *specs):
    """``jax.export.export(jax.jit(fn), platforms=[platform])(*specs)``; for ``"cuda"`` works
    on CPU-only machines too. ``specs``: pytrees of ``jax.ShapeDtypeStruct``."""
    from jax import export
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}; got {platform!r}")
    if platform == "cpu":
        return export.export(jax.jit(fn), platforms=["cpu"])(*specs)
    from jax._src.mesh import AbstractDevice   # private: pinned by tests/test_export.py
    from jax.experimental.pallas import triton as pltriton
    from jax.sharding import AbstractMesh, AxisType
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)])(*specs)
