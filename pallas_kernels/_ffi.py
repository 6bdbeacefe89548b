"""CPU primitives backed by the native kernels (:mod:`pallas_kernels.native`).

:func:`native_cpu_primitive` defines a JAX primitive whose lowering chooses, when the program
is lowered: the C++ FFI handler when lowering for CPU alone, not for ``jax.export``, with the
library available (or ``require_native``); otherwise the XLA twin's ops. So an exported
artifact never holds the custom call (it runs wherever jax runs), and a machine without a
compiler runs the twin, with the same results.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.extend
import jax.interpreters.batching
import jax.interpreters.mlir
import jax.numpy as jnp
import numpy as np
from jax import lax


def native_cpu_primitive(name: str, target: str, twin: Callable,
                         out_shapes: Callable) -> jax.extend.core.Primitive:
    """A multiple-result primitive run by FFI target ``target`` on CPU, else by ``twin``.

    Args:
      name: the primitive's name.
      target: the FFI target (registered by :func:`pallas_kernels.native.ensure_loaded`);
        the primitive's integer params (all but ``require_native``) are its attributes.
      twin: ``twin(*operands, **params) -> tuple of arrays``, the XLA implementation.
      out_shapes: ``out_shapes(*avals, **params) -> [(shape, dtype), ...]``.
    Bind it with the operands and the params plus ``require_native`` (True: the native
    kernel or an error; False: the native kernel where it can run, else the twin).
    """
    prim = jax.extend.core.Primitive(name)
    prim.multiple_results = True

    def abstract(*avals, require_native, **params):
        del require_native
        return tuple(avals[0].update(shape=tuple(s), dtype=jnp.dtype(d), weak_type=False)
                     for s, d in out_shapes(*avals, **params))

    def impl(*args, **params):
        return jax.jit(functools.partial(prim.bind, **params))(*args)

    def batch(args, dims, **params):
        """vmap: the primitive once per element of the mapped axis (``lax.map``)."""
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        args = [jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
                for a, d in zip(args, dims)]
        out = lax.map(lambda xs: tuple(prim.bind(*xs, **params)), tuple(args))
        return out, (0,) * len(out)

    def lowering(ctx, *args, require_native, **params):
        from pallas_kernels import native
        cpu_only = tuple(ctx.module_context.platforms) == ("cpu",)
        exporting = ctx.module_context.lowering_parameters.for_export
        if require_native:
            if not cpu_only:
                raise ValueError(f"the native {name} kernel runs on CPU only; lower for 'cpu'")
            native.ensure_loaded()
        if require_native or (cpu_only and not exporting and native.available()):
            return jax.ffi.ffi_lowering(target)(
                ctx, *args, **{k: np.int64(v) for k, v in params.items()})
        fn = functools.partial(twin, **params)
        return jax.interpreters.mlir.lower_fun(lambda *a: tuple(fn(*a)),
                                               multiple_results=True)(ctx, *args)

    prim.def_abstract_eval(abstract)
    prim.def_impl(impl)
    jax.interpreters.batching.primitive_batchers[prim] = batch
    jax.interpreters.mlir.register_lowering(prim, lowering)
    return prim
