"""Building blocks shared by the LLaDA backbone, the planner head and the AR teacher.

Parameter names follow the HF checkpoints (`weight` for norms, `kernel` `[in, out]` for linear
maps, `embedding` `[V, D]`) so that checkpoint conversion is a table of renames and transposes.
Normalisation statistics, RoPE and softmax run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ModelConfig
from dultra_jax.sharding import BATCH_AXES, constrain


def truncated_normal_init(std: float):
    """Truncated normal at +-3 std (LLaDA's "mitchell" init)."""
    base = jax.nn.initializers.truncated_normal(stddev=1.0, lower=-3.0, upper=3.0)

    def init(key, shape, dtype=jnp.float32):
        return (base(key, shape, jnp.float32) * std).astype(dtype)

    return init


class Linear(nnx.Module):
    """`y = x @ kernel (+ bias)`, kernel `[in, out]`, computed in `dtype`."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = False,
                 kernel_init=None, dtype=jnp.float32, param_dtype=jnp.float32):
        kernel_init = kernel_init or truncated_normal_init(1.0 / math.sqrt(in_features))
        self.kernel = nnx.Param(kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding `[V, D]`; lookups are cast to the compute dtype (no sqrt(D) scaling)."""

    def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs, std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        init = jax.nn.initializers.normal(stddev=std)
        self.embedding = nnx.Param(init(rngs.params(), (num_embeddings, features), param_dtype))
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    """LLaDA / Llama RMSNorm: normalise in float32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...].astype(x.dtype)


def layer_norm_no_affine(x: jax.Array, eps: float) -> jax.Array:
    """Mean-centred LayerNorm without scale or bias, statistics in float32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE tables in float32.

    Args:
      positions: `[B, L]` or `[L]` integer positions.
    Returns:
      `(cos, sin)`, each `[..., L, head_dim]` float32 with angles `cat(freqs, freqs)`.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Applies rotate-half RoPE in float32. `x` is `[B, L, H, Dh]`, tables `[B or 1, L, Dh]`."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return (x32 * cos + rotated * sin).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_valid: jax.Array | None = None,
              causal: bool = False) -> jax.Array:
    """Scaled dot-product attention with grouped-query heads.

    Args:
      q: `[B, L, H, Dh]`; k, v: `[B, S, Hkv, Dh]` with `H % Hkv == 0` (kv head j serves query
        heads `j*H/Hkv ... (j+1)*H/Hkv - 1`).
      key_valid: optional `[B, S]` bool; False keys receive no attention.
      causal: lower-triangular mask (the AR teacher); the LLaDA backbone is bidirectional.
    Returns:
      `[B, L, H, Dh]` in q's dtype; the softmax runs in float32.
    """
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)


def swiglu(gate: Linear, up: Linear, down: Linear, x: jax.Array) -> jax.Array:
    """LLaDA / Llama MLP: `down(silu(gate(x)) * up(x))` (LLaDA names them ff_proj, up_proj, ff_out);
    the `[B, L, F]` hidden layer is rows over the batch axes, F over 'tensor'."""
    return down(constrain(jax.nn.silu(gate(x)) * up(x), BATCH_AXES, None, "tensor"))


KV = tuple  # (keys, values), each `[B, Hkv, S, Dh]` (one layer) or `[n_layers, B, Hkv, S, Dh]`


def self_attention(h: jax.Array, q_proj: Linear, k_proj: Linear, v_proj: Linear, out_proj: Linear, *,
                   n_heads: int, n_kv_heads: int, head_dim: int, rope, valid: jax.Array | None,
                   causal: bool = False) -> jax.Array:
    """Grouped-query self-attention with RoPE on the normed input `h` `[B, L, D]` -> `[B, L, D]`."""
    return self_attention_kv(h, q_proj, k_proj, v_proj, out_proj, n_heads=n_heads, n_kv_heads=n_kv_heads,
                             head_dim=head_dim, rope=rope, valid=valid, causal=causal)[0]


def self_attention_kv(h: jax.Array, q_proj: Linear, k_proj: Linear, v_proj: Linear, out_proj: Linear, *,
                      n_heads: int, n_kv_heads: int, head_dim: int, rope, valid: jax.Array | None,
                      causal: bool = False, cache: KV | None = None, query_positions: jax.Array | None = None):
    """Self-attention that also returns its keys/values (the block KV cache).

    Without `cache`, `h` is the whole sequence `[B, S, D]` and the returned keys/values are its
    own. With `cache` (keys/values of all `S` positions, `[B, Hkv, S, Dh]` each), `h` is a window
    `[B, W, D]` (its positions' RoPE in `rope`) whose queries attend to the window's fresh
    keys/values and the cached ones everywhere else (`attention_over_cache`; `valid` is then the
    window's `WindowKeys`), and the keys/values it attended to at the window's positions, `[B,
    Hkv, W, Dh]`, come back.
    With `query_positions` `[B, K]` (indices into `h`'s rows), every position of `h` gives
    keys/values but only those `K` positions' queries run, so the output is `[B, K, D]`.

    Returns:
      `(out [B, W|S|K, D], (keys, values) [B, Hkv, W|S, Dh])`, RoPE applied to the keys.
    """
    batch, length, _ = h.shape
    h_query, query_rope = h, rope
    if query_positions is not None:
        h_query = gather_positions(h, query_positions)
        query_rope = tuple(gather_positions(jnp.broadcast_to(table, (batch,) + table.shape[1:]), query_positions)
                           for table in rope)
    num_queries = h_query.shape[1]
    heads = (BATCH_AXES, None, "tensor", None)  # rows over the batch axes, heads over 'tensor'
    q = constrain(q_proj(h_query).reshape(batch, num_queries, n_heads, head_dim), *heads)
    k = constrain(k_proj(h).reshape(batch, length, n_kv_heads, head_dim), *heads)
    v = constrain(v_proj(h).reshape(batch, length, n_kv_heads, head_dim), *heads)
    q, k = apply_rope(q, *query_rope), apply_rope(k, *rope)
    heads_major = lambda x: constrain(jnp.swapaxes(x, 1, 2), BATCH_AXES, "tensor", None, None)  # noqa: E731
    if cache is None:
        out = attention(q, k, v, key_valid=valid, causal=causal)
        kv = heads_major(k), heads_major(v)
    else:
        kv = heads_major(k.astype(cache[0].dtype)), heads_major(v.astype(cache[1].dtype))
        if valid.keep_cached is not None:  # a suffix window: rows whose own window starts later
            start = valid.cache_length       # read the positions before it from the cache
            keep = valid.keep_cached[:, None, :, None]
            kv = tuple(jnp.where(keep, c[:, :, start:], fresh) for c, fresh in zip(cache, kv))
        cached = tuple(c[:, :, :valid.cache_length] for c in cache)
        out = attention_over_cache(q, cached, kv, valid.cache_valid, valid.fresh_valid)
    return out_proj(out.reshape(batch, num_queries, n_heads * head_dim)), kv


class WindowKeys(NamedTuple):
    """The keys a window forward's queries attend to (`attention_over_cache`).

    Attributes:
      cache_valid: `[B, S]` bool, the cache's keys attended to; the cache is read at its first
        `S = cache_length` positions only.
      fresh_valid: `[B, W]` bool, the window's own keys attended to.
      cache_length: `S`, a Python int.
      keep_cached: None, or for a suffix window (`suffix_window_keys`, window `[S, L)`) `[B, W]`
        bool: the window positions whose keys/values are read from the cache instead (before a
        row's own block).
    """

    cache_valid: jax.Array
    fresh_valid: jax.Array
    cache_length: int
    keep_cached: jax.Array | None = None


def window_keys(valid: jax.Array | None, positions: jax.Array, length: int) -> WindowKeys:
    """Which keys a window at any `positions` `[B, W]` attends to (`attention_over_cache`): the
    cached ones outside the window, `[B, S]` (`valid` `[B, S]` key mask or None), and the first
    occurrence of each window position among the fresh ones, `[B, W]` (a prefix window clipped
    at the canvas end repeats its last position; each key must count once)."""
    batch, width = positions.shape
    rows = jnp.arange(batch)[:, None]
    in_window = jnp.zeros((batch, length), jnp.bool_).at[rows, positions].set(True)
    earlier = jnp.arange(width)[:, None] > jnp.arange(width)[None, :]  # [W, W]: key j before query i
    repeated = jnp.any((positions[:, :, None] == positions[:, None, :]) & earlier[None], axis=-1)
    cache_valid, fresh_valid = ~in_window, ~repeated
    if valid is not None:
        cache_valid, fresh_valid = cache_valid & valid, fresh_valid & jnp.take_along_axis(valid, positions, axis=1)
    return WindowKeys(cache_valid, fresh_valid, length)


def suffix_window_keys(valid: jax.Array | None, start: int, own_start: jax.Array, length: int) -> WindowKeys:
    """The keys of a suffix window `[start, L)` shared by every row (`length` `L`): the cache
    before `start`, the window's own keys from there on, except, for a row whose own window
    starts later (`own_start` `[B]`), the positions before it, read from the cache: its outputs
    are then those of its own window. The cache's keys inside the window are never read, so the
    attention has exactly `L` keys (`window_keys`' general window has `L + W`)."""
    batch = own_start.shape[0]
    window = jnp.arange(start, length, dtype=jnp.int32)
    if valid is None:
        valid = jnp.ones((batch, length), jnp.bool_)
    return WindowKeys(valid[:, :start], valid[:, start:], start, keep_cached=window[None, :] < own_start[:, None])


def attention_over_cache(q: jax.Array, cache: KV, fresh: KV, cache_valid: jax.Array,
                         fresh_valid: jax.Array) -> jax.Array:
    """Attention of a window's queries over two key sets: the cache and the window's own.

    One softmax over both, as `attention` over the cache with the window's keys/values written
    in, without writing them: writing meant a copy of the whole cache in every layer and step,
    a sixth of a dual-cache window step on CPU.

    Args:
      q: `[B, W, H, Dh]`; cache: `(k, v)` `[B, Hkv, S, Dh]`; fresh: `(k, v)` `[B, Hkv, W, Dh]`.
      cache_valid, fresh_valid: `[B, S]`, `[B, W]` bool, the keys attended to (`WindowKeys`).
    Returns:
      `[B, W, H, Dh]` in q's dtype; logits and softmax in float32, as `attention`.
    """
    batch, width, heads, head_dim = q.shape
    kv_heads, length = cache[0].shape[1], cache[0].shape[2]
    group = heads // kv_heads
    # [B, W, Hkv, G, Dh] -> [B, Hkv, G * W, Dh]: a kv head's queries as one batched product's rows
    grouped = jnp.moveaxis(q.reshape(batch, width, kv_heads, group, head_dim), 1, 3)
    grouped = grouped.reshape(batch, kv_heads, group * width, head_dim)
    floor = jnp.finfo(jnp.float32).min

    def logits(keys, valid):
        scores = jnp.einsum("bhqd,bhsd->bhqs", grouped, keys, preferred_element_type=jnp.float32)
        return jnp.where(valid[:, None, None, :], scores / math.sqrt(head_dim), floor)

    # One softmax over both key sets, without concatenating their logits (a copy of both).
    cache_logits, fresh_logits = logits(cache[0], cache_valid), logits(fresh[0], fresh_valid)
    peak = jnp.maximum(jnp.max(cache_logits, -1, keepdims=True), jnp.max(fresh_logits, -1, keepdims=True))
    cache_weights, fresh_weights = jnp.exp(cache_logits - peak), jnp.exp(fresh_logits - peak)
    total = jnp.sum(cache_weights, -1, keepdims=True) + jnp.sum(fresh_weights, -1, keepdims=True)
    out = (jnp.einsum("bhqs,bhsd->bhqd", (cache_weights / total).astype(cache[1].dtype), cache[1])
           + jnp.einsum("bhqs,bhsd->bhqd", (fresh_weights / total).astype(fresh[1].dtype), fresh[1]))
    out = jnp.moveaxis(out.reshape(batch, kv_heads, group, width, head_dim), 3, 1)
    return out.reshape(batch, width, heads, head_dim).astype(q.dtype)


def gather_positions(x: jax.Array, positions: jax.Array) -> jax.Array:
    """`x[b, positions[b, k]]`: `[B, L, ...]`, `[B, K]` -> `[B, K, ...]`."""
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def make_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs, stacked: bool):
    """`n` layers from `make(rngs)`: one module with stacked `[n, ...]` parameters (for
    `lax.scan`), or an `nnx.List`."""
    if not stacked:
        return nnx.List([make(rngs) for _ in range(n)])

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return make(rngs)

    return create(rngs)


def run_layers(layers, x: jax.Array, rope, valid, *, stacked: bool, remat: bool,
               remat_policy: str = "nothing_saveable", query_positions: jax.Array | None = None) -> jax.Array:
    """Applies `layer(x, rope, valid)` in order: `lax.scan` over stacked parameters, or a loop.

    With `remat`, each layer's activations are recomputed in the backward pass, so training
    memory holds one layer's activations plus the `[B, L, D]` residual per layer, and what
    `remat_policy` (a `jax.checkpoint_policies` name) keeps besides.
    With `query_positions` `[B, K]`, the last layer runs its queries, attention output and MLP only
    at those positions (its keys/values still come from all `L`) and the result is `[B, K, D]`:
    the same values as the full stack gathered there, without the `L - K` rows nobody reads.
    """
    def apply(graphdef, state, h, query_positions=None):
        layer = nnx.merge(graphdef, state)
        if query_positions is None:  # layers without query selection (the teacher's) take 3 arguments
            return layer(h, rope, valid)
        return layer(h, rope, valid, query_positions)

    if remat:
        apply = jax.checkpoint(apply, static_argnums=(0,), prevent_cse=not stacked,
                               policy=getattr(jax.checkpoint_policies, remat_policy))
    if stacked:
        graphdef, state = nnx.split(layers)
        if query_positions is None:
            x, _ = jax.lax.scan(lambda h, layer_state: (apply(graphdef, layer_state, h), None), x, state)
            return x
        # Scan over layer indices into the whole stack (not over a `[:-1]` slice of it, which XLA
        # would copy: most of the weights, every call), then the last layer on its own.
        num_layers = jax.tree.leaves(state)[0].shape[0]
        layer = lambda i: jax.tree.map(lambda a: a[i], state)  # noqa: E731
        x, _ = jax.lax.scan(lambda h, i: (apply(graphdef, layer(i), h), None), x, jnp.arange(num_layers - 1))
        return apply(graphdef, layer(num_layers - 1), x, query_positions)
    for i, module in enumerate(layers):
        graphdef, state = nnx.split(module)
        x = apply(graphdef, state, x, query_positions if i == len(layers) - 1 else None)
    return x


def run_layers_kv(layers, x: jax.Array, rope, valid, *, stacked: bool, cache: KV | None = None,
                  query_positions: jax.Array | None = None):
    """`run_layers` for decoding with a block KV cache: each layer is `layer.with_kv(h, rope, valid,
    cache) -> (h, (k, v))`. With `query_positions` `[B, K]` (indices into `x`'s rows; layers not
    stacked), the last layer runs its queries, attention output and MLP only there, as in
    `run_layers`, and the output is `[B, K, D]`; the keys/values still cover every row.

    Args:
      x: `[B, S, D]` (no cache: a full forward) or a window `[B, W, D]`.
      valid: `[B, S]` key mask or None; with a cache the window's `WindowKeys` (`window_keys`, or
        `suffix_window_keys` for a canvas suffix), made once for every layer.
      cache: per-layer `(k, v)` `[n_layers, B, Hkv, S, Dh]` or None.
    Returns:
      `(x, (k, v))`: after a full forward `[n_layers, B, Hkv, S, Dh]`, the cache to keep; after a
      window forward the keys/values the window attended to at its positions, `[n_layers, B,
      Hkv, W, Dh]` (its fresh ones, or the cache's where `keys.keep_cached`).
    """
    def apply(graphdef, state, h, layer_cache, query_positions=None):
        return nnx.merge(graphdef, state).with_kv(h, rope, valid, layer_cache, query_positions=query_positions)

    if stacked:
        if query_positions is not None:
            raise ValueError("run_layers_kv: query_positions needs layers that are not stacked")
        graphdef, state = nnx.split(layers)

        def body(h, xs):
            layer_state, layer_cache = xs
            return apply(graphdef, layer_state, h, layer_cache)

        return jax.lax.scan(body, x, (state, cache))
    kvs = []
    for i, layer in enumerate(layers):
        graphdef, state = nnx.split(layer)
        layer_cache = None if cache is None else jax.tree.map(lambda c: c[i], cache)
        x, kv = apply(graphdef, state, x, layer_cache, query_positions if i == len(layers) - 1 else None)
        kvs.append(kv)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *kvs)


# ------------------------------------------------------------------- the LLaDA block


class LLaDABlock(nnx.Module):
    """Pre-norm Llama block with bidirectional attention and a SwiGLU MLP, no biases."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.mlp_hidden_size
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        kw = dict(rngs=rngs, dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        # Output projections use std / sqrt(2) (LLaDA's "mitchell" init).
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.q_proj = Linear(d, q_dim, **kw)
        self.k_proj = Linear(d, kv_dim, **kw)
        self.v_proj = Linear(d, kv_dim, **kw)
        self.attn_out = Linear(q_dim, d, kernel_init=truncated_normal_init(1 / math.sqrt(q_dim) / math.sqrt(2)), **kw)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.ff_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.ff_out = Linear(f, d, kernel_init=truncated_normal_init(1 / math.sqrt(f) / math.sqrt(2)), **kw)
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], valid: jax.Array | None,
                 query_positions: jax.Array | None = None) -> jax.Array:
        """`x` `[B, L, D]`, `rope` tables `[B|1, L, Dh]`, `valid` `[B, L]` key mask or None.

        Returns `[B, L, D]`, or `[B, K, D]` at `query_positions` `[B, K]` (only those rows run
        after the keys/values)."""
        return self.with_kv(x, rope, valid, query_positions=query_positions)[0]

    def with_kv(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], valid: jax.Array | None,
                cache: KV | None = None, query_positions: jax.Array | None = None):
        """The block, also returning its attention keys/values (`layers.self_attention_kv`):
        `x` `[B, W, D]` is the whole sequence, or with `cache` a window (`valid`: its `WindowKeys`).
        Its input and output are pinned to rows over the batch axes (`sharding.constrain`)."""
        x = constrain(x, BATCH_AXES)
        attn, kv = self_attention_kv(self.attn_norm(x), self.q_proj, self.k_proj, self.v_proj, self.attn_out,
                                     n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                                     rope=rope, valid=valid, cache=cache,
                                     query_positions=query_positions)
        if query_positions is not None:
            x = gather_positions(x, query_positions)
        x = x + attn
        return constrain(x + swiglu(self.ff_proj, self.up_proj, self.ff_out, self.ff_norm(x)), BATCH_AXES), kv


def make_blocks(config: ModelConfig, n: int, rngs: nnx.Rngs, stacked: bool):
    """`n` LLaDA blocks, stacked (scan over layers) or as an `nnx.List`."""
    return make_layers(lambda r: LLaDABlock(config, rngs=r), n, rngs, stacked)
