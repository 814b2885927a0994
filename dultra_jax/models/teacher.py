"""Autoregressive teacher (Qwen2 / Llama causal LM) that scores completions for the distillation reward.

Parameter paths mirror the HF names with the `model.` prefix and `self_attn` / `mlp` levels dropped:
`embed_tokens/embedding`, `layers/...` (stacked `[n_layers, ...]` leaves when `scan_layers`, else
`layers/{i}/...`), per layer `input_layernorm`, `q_proj`, `k_proj`, `v_proj`, `o_proj`,
`post_attention_layernorm`, `gate_proj`, `up_proj`, `down_proj`; then `norm` and `lm_head` (absent
when the embeddings are tied). Conversion from HF is a table of renames and transposes
(`dultra_jax.interop.hf_teacher`).

As in `dultra_jax.models.policy`, the hot path is pure functions of a plain parameter dict with
the frozen `TeacherConfig` static; the graph definition is rebuilt from a cache inside `jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from dultra_jax.config import ConfigError, parse_dtype
from dultra_jax.models import pure
from dultra_jax.models.layers import (Embed, Linear, RMSNorm, make_layers, rope_tables, run_layers, self_attention,
                                      swiglu)
from dultra_jax.sharding import BATCH_AXES, constrain

Params = dict[str, Any]

FAMILIES = ("qwen2", "llama")
_DEFAULT_ROPE_TYPES = (None, "default")


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Static description of a Qwen2 / Llama causal LM (field names follow HF `config.json`).

    `attention_bias` is the q/k/v bias; it defaults to True for Qwen2 (whose q/k/v always carry
    biases) and False for Llama. Only Llama with `attention_bias` also has an `o_proj` bias.
    `head_dim` defaults to `hidden_size // num_attention_heads`. `dtype` is the compute dtype,
    `param_dtype` the storage dtype of the parameters.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None
    head_dim: int | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"teacher.family={self.family!r} is not supported; use one of {FAMILIES}")
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size")
        for key in positive:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"teacher.{key}={value!r} must be a positive integer")
        # Frozen dataclass: resolve the family defaults once so the config hashes to its meaning.
        if self.attention_bias is None:
            object.__setattr__(self, "attention_bias", self.family == "qwen2")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"teacher.hidden_size={self.hidden_size} is not divisible by "
                    f"teacher.num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.family == "qwen2" and not self.attention_bias:
            raise ConfigError("teacher.attention_bias=False is not a Qwen2 model (its q/k/v always have biases)")
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ConfigError(f"teacher.head_dim={self.head_dim!r} must be a positive integer")
        if self.head_dim % 2:
            raise ConfigError(f"teacher.head_dim={self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"teacher.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"teacher.num_key_value_heads={self.num_key_value_heads}")
        if not self.rope_theta > 0:
            raise ConfigError(f"teacher.rope_theta={self.rope_theta!r} must be positive")
        if not self.rms_norm_eps > 0:
            raise ConfigError(f"teacher.rms_norm_eps={self.rms_norm_eps!r} must be positive")
        for key in ("dtype", "param_dtype"):
            parse_dtype(getattr(self, key), f"teacher.{key}")

    @property
    def compute_dtype(self):
        return parse_dtype(self.dtype, "teacher.dtype")

    @property
    def weight_dtype(self):
        return parse_dtype(self.param_dtype, "teacher.param_dtype")

    @property
    def o_proj_bias(self) -> bool:
        # Llama's `attention_bias` covers o_proj too; Qwen2's o_proj never has a bias.
        return self.family == "llama" and bool(self.attention_bias)

    def replace(self, **changes) -> "TeacherConfig":
        return dataclasses.replace(self, **changes)


def _rope_theta(hf_config: Mapping[str, Any]) -> float:
    """RoPE theta from `rope_parameters` (transformers 5) or top-level `rope_theta` / `rope_scaling`."""
    theta = hf_config.get("rope_theta")
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf_config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise ConfigError(f"{key}={rope!r} is not supported; expected a mapping or null")
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in _DEFAULT_ROPE_TYPES:
            raise ConfigError(f"{key}.rope_type={rope_type!r} is not supported; only default RoPE is")
        theta = rope.get("rope_theta", theta)
    return 10000.0 if theta is None else float(theta)


def teacher_config_from_hf(hf_config: Mapping[str, Any], **overrides) -> TeacherConfig:
    """A `TeacherConfig` from an HF `config.json` dict; `overrides` replace fields (e.g. `dtype`).

    Raises `ConfigError` naming the key and value for anything this implementation would get wrong:
    another `model_type`, RoPE scaling, an activation other than SiLU, sliding-window attention,
    MLP biases.
    """
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(f"model_type={model_type!r} is not supported for the teacher; use one of {FAMILIES}")
    hidden_act = hf_config.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ConfigError(f"hidden_act={hidden_act!r} is not supported; only 'silu' is")
    if hf_config.get("mlp_bias", False):
        raise ConfigError(f"mlp_bias={hf_config['mlp_bias']!r} is not supported")
    if model_type == "qwen2" and hf_config.get("use_sliding_window", False):
        raise ConfigError(f"use_sliding_window={hf_config['use_sliding_window']!r} is not supported")
    layer_types = hf_config.get("layer_types") or ()
    for i, layer_type in enumerate(layer_types):
        if layer_type != "full_attention":
            raise ConfigError(f"layer_types[{i}]={layer_type!r} is not supported; only 'full_attention' is")
    heads = hf_config["num_attention_heads"]
    fields = dict(
        family=model_type,
        vocab_size=hf_config["vocab_size"],
        hidden_size=hf_config["hidden_size"],
        num_hidden_layers=hf_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=hf_config.get("num_key_value_heads") or heads,
        intermediate_size=hf_config["intermediate_size"],
        rope_theta=_rope_theta(hf_config),
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf_config.get("tie_word_embeddings", False)),
        attention_bias=True if model_type == "qwen2" else bool(hf_config.get("attention_bias", False)),
        head_dim=hf_config.get("head_dim") or None,
    )
    fields.update(overrides)
    return TeacherConfig(**fields)


# --------------------------------------------------------------------------------------------------
# Modules


def _hf_init(std: float = 0.02):
    """HF's `initializer_range` normal init (the teacher is normally loaded, never trained here)."""
    base = jax.nn.initializers.normal(stddev=std)

    def init(key, shape, dtype=jnp.float32):
        return base(key, shape, jnp.float32).astype(dtype)

    return init


class TeacherBlock(nnx.Module):
    """Pre-norm decoder block: causal grouped-query attention with RoPE, then a SwiGLU MLP."""

    def __init__(self, config: TeacherConfig, *, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        kw = dict(rngs=rngs, kernel_init=_hf_init(), dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.q_proj = Linear(d, q_dim, use_bias=config.attention_bias, **kw)
        self.k_proj = Linear(d, kv_dim, use_bias=config.attention_bias, **kw)
        self.v_proj = Linear(d, kv_dim, use_bias=config.attention_bias, **kw)
        self.o_proj = Linear(q_dim, d, use_bias=config.o_proj_bias, **kw)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.gate_proj = Linear(d, f, **kw)
        self.up_proj = Linear(d, f, **kw)
        self.down_proj = Linear(f, d, **kw)
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], valid: jax.Array | None) -> jax.Array:
        """`x` `[B, L, D]`, `rope` tables `[B|1, L, Dh]`, `valid` `[B, L]` key mask or None; input
        and output pinned to rows over the batch axes (`sharding.constrain`)."""
        x = constrain(x, BATCH_AXES)
        x = x + self_attention(self.input_layernorm(x), self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                               n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                               rope=rope, valid=valid, causal=True)
        return constrain(x + swiglu(self.gate_proj, self.up_proj, self.down_proj, self.post_attention_layernorm(x)),
                         BATCH_AXES)


class TeacherLM(nnx.Module):
    """`embed_tokens -> layers -> norm -> lm_head` (or the tied embedding)."""

    def __init__(self, config: TeacherConfig, *, rngs: nnx.Rngs):
        self.config = config
        kw = dict(dtype=config.compute_dtype, param_dtype=config.weight_dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, rngs=rngs, **kw)
        self.layers = make_layers(lambda r: TeacherBlock(config, rngs=r), config.num_hidden_layers, rngs,
                                  stacked=config.scan_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=config.weight_dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.hidden_size, config.vocab_size, rngs=rngs, kernel_init=_hf_init(), **kw))

    def hidden(self, tokens: jax.Array, valid: jax.Array | None) -> jax.Array:
        """Final hidden states `[B, L, D]` (after `norm`) for `tokens` `[B, L]`.

        `valid` `[B, L]` bool marks real tokens (None: all). Positions count real tokens only,
        so a left-padded row is computed exactly like its unpadded version; padding keys are masked.
        """
        if valid is None:
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        else:
            positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)
        rope = rope_tables(positions, self.config.head_dim, self.config.rope_theta)
        x = self.embed_tokens(tokens)
        x = run_layers(self.layers, x, rope, valid, stacked=self.config.scan_layers, remat=False)
        return self.norm(x)

    def logits(self, h: jax.Array) -> jax.Array:
        """LM head on hidden states `[..., D]` -> float32 logits `[..., V]`.

        The matmul takes compute-dtype inputs but accumulates and returns float32, so bfloat16
        teachers still give float32 log-probs.
        """
        dtype = self.config.compute_dtype
        if self.lm_head is None:
            kernel = self.embed_tokens.embedding[...].T
        else:
            kernel = self.lm_head.kernel[...]
        logits = jnp.dot(h.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
        return constrain(logits, BATCH_AXES, *([None] * (logits.ndim - 2)), "tensor")

    def __call__(self, tokens: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """Logits `[B, L, V]` float32 for `tokens` `[B, L]`."""
        return self.logits(self.hidden(tokens, valid))


# --------------------------------------------------------------------------------------------------
# Pure functions


def teacher_abstract_params(config: TeacherConfig) -> Params:
    """`jax.ShapeDtypeStruct` pytree of the parameters (for loading and shardings)."""
    return pure.abstract_params(TeacherLM, config)


def teacher_init_params(config: TeacherConfig, rng: jax.Array) -> Params:
    """Randomly initialised parameters (HF normal(0.02) init), as a plain nested dict."""
    return pure.init_params(TeacherLM, config, rng)


def bind_teacher(config: TeacherConfig, params: Params) -> TeacherLM:
    """A module view of `params`, for use inside a traced function."""
    return pure.bind(TeacherLM, config, params)


def teacher_forward(params: Params, tokens: jax.Array, config: TeacherConfig,
                    valid: jax.Array | None = None) -> jax.Array:
    """Causal LM forward.

    Args:
      tokens: `[B, L]` int token ids.
      valid: `[B, L]` bool, False on padding (left padding keeps real tokens' positions at 0..);
        None treats every token as real.
    Returns:
      logits `[B, L, V]` float32; position `j` predicts token `j + 1`.
    """
    return bind_teacher(config, params)(tokens, valid)


def score(params: Params, prompt_ids: jax.Array, completion_ids: jax.Array, config: TeacherConfig,
          prompt_valid: jax.Array | None = None, completion_valid: jax.Array | None = None) -> jax.Array:
    """Teacher log-probability of each completion token given the prompt and earlier completion.

    Args:
      prompt_ids: `[B, Lp]` int, `Lp >= 1`, usually left-padded.
      completion_ids: `[B, Lc]` int, usually right-padded.
      prompt_valid, completion_valid: `[B, Lp]`, `[B, Lc]` bool, False on padding (None: all real).
    Returns:
      `[B, Lc]` float32 `log p(completion[:, j] | prompt, completion[:, :j])`; 0 where
      `completion_valid` is False.
    """
    batch, prompt_len = prompt_ids.shape
    completion_len = completion_ids.shape[1]
    if prompt_len < 1:
        raise ValueError("score needs at least one prompt position to predict the first completion token")
    if prompt_valid is None and completion_valid is None:
        valid = None
    else:
        if prompt_valid is None:
            prompt_valid = jnp.ones((batch, prompt_len), bool)
        if completion_valid is None:
            completion_valid = jnp.ones((batch, completion_len), bool)
        valid = jnp.concatenate([prompt_valid.astype(bool), completion_valid.astype(bool)], axis=1)
    tokens = jnp.concatenate([prompt_ids, completion_ids], axis=1).astype(jnp.int32)
    model = bind_teacher(config, params)
    h = model.hidden(tokens, valid)
    # Only the Lc positions that predict completion tokens go through the [D, V] head.
    logits = model.logits(h[:, prompt_len - 1:prompt_len - 1 + completion_len])
    # logit[token] - logsumexp avoids materialising a second [B, Lc, V] log_softmax array.
    picked = jnp.take_along_axis(logits, completion_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    logps = picked - jax.nn.logsumexp(logits, axis=-1)
    if completion_valid is not None:
        logps = jnp.where(completion_valid, logps, 0.0)
    return logps


score_jit = jax.jit(score, static_argnames=("config",))
