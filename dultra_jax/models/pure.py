"""NNX modules as pure functions of a parameter dict.

A model's module structure is a deterministic function of its frozen config, so the graph
definition is rebuilt from a cache keyed by `(module class, config)`: parameters travel as plain
nested dicts (`nnx.to_pure_dict` layout) and no NNX object crosses a `jit` boundary (flax #4336).
"""

from __future__ import annotations

import functools
from typing import Any, Hashable

import jax
from flax import nnx

Params = dict[str, Any]


def _build(module_cls, config: Hashable, rngs: nnx.Rngs) -> nnx.Module:
    return module_cls(config, rngs=rngs)


@functools.lru_cache(maxsize=None)
def graphdef(module_cls, config: Hashable) -> nnx.GraphDef:
    """The static graph definition of `module_cls(config)`; no parameters are allocated."""
    return nnx.split(nnx.eval_shape(lambda: _build(module_cls, config, nnx.Rngs(0))))[0]


def abstract_params(module_cls, config: Hashable) -> Params:
    """`jax.ShapeDtypeStruct` pytree of the parameters (for shardings and checkpoint checks)."""
    return nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: _build(module_cls, config, nnx.Rngs(0))))[1])


def init_params(module_cls, config: Hashable, rng: jax.Array) -> Params:
    """Randomly initialised parameters; jit it with `out_shardings` to create them sharded."""
    return nnx.to_pure_dict(nnx.split(_build(module_cls, config, nnx.Rngs(params=rng)))[1])


def bind(module_cls, config: Hashable, params: Params) -> nnx.Module:
    """A module view of `params`, for use inside a traced function."""
    return nnx.merge(graphdef(module_cls, config), params)
