"""Lowering a function for CUDA on a CPU-only machine (pallas.md): the full Pallas ->
Triton-IR lowering runs, catching what interpret mode hides (non-power-of-two arrays,
unsupported primitives). PTX compilation itself happens only on a GPU."""
import jax


def lower_for_cuda(f, *specs):
    from jax import export
    from jax._src.mesh import AbstractDevice   # private: pinned by the tests that use this
    from jax.experimental.pallas import triton as pltriton
    from jax.sharding import AbstractMesh, AxisType
    mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda"))
    with jax.sharding.use_abstract_mesh(mesh):
        return export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(pltriton.CUSTOM_CALL_TARGET_NAME)])(*specs)
