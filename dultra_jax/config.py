"""Configs as data: `ml_collections.ConfigDict` in, frozen and validated dataclasses out.

Config files under `configs/` build a `ConfigDict`; the jitted code only ever sees the frozen
dataclasses made here, so a typo or an inconsistent value fails at start-up with the key's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp
import ml_collections

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


class ConfigError(ValueError):
    """A config value is missing, unknown or inconsistent; the message names the key."""


def parse_dtype(name: str, key: str) -> Any:
    """Maps a dtype name (`"bfloat16"`) to the jnp dtype; `key` names the config entry."""
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"{key}={name!r} is not a supported dtype; use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """The dUltra unmasking planner head (spec section 2)."""

    num_head_layers: int = 1
    freq_dim: int = 256  # sinusoidal timestep features
    adaln_eps: float = 1e-4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a LLaDA backbone (+ optional planner head).

    Attributes mirror the HF LLaDA `config.json` names where one exists. `dtype` is the compute
    dtype (activations, matmul inputs), `param_dtype` the storage dtype of the parameters.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    mlp_hidden_size: int
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    eot_token_id: int | None = 126348
    planner: PlannerConfig | None = PlannerConfig()
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: bool = False
    # Spec section 1: the reference attends to left padding; we mask padding keys by default.
    mask_padding: bool = True

    def __post_init__(self):
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                    "max_sequence_length")
        for key in positive:
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{key}={value!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} (model.d_model / model.n_heads) must be even for RoPE")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"model.mask_token_id={self.mask_token_id} is outside the vocabulary [0, {self.vocab_size})")
        for key in ("dtype", "param_dtype"):
            parse_dtype(getattr(self, key), f"model.{key}")
        if self.rope_theta <= 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta} must be positive")
        if self.planner is not None and self.planner.num_head_layers != 1:
            raise ConfigError(
                f"model.planner.num_head_layers={self.planner.num_head_layers} is not supported; "
                "the dUltra planner has exactly one block")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def compute_dtype(self):
        return parse_dtype(self.dtype, "model.dtype")

    @property
    def weight_dtype(self):
        return parse_dtype(self.param_dtype, "model.param_dtype")

    @property
    def has_planner(self) -> bool:
        return self.planner is not None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _unknown_keys(given: Mapping[str, Any], known: set[str], prefix: str) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known keys: {', '.join(sorted(known))}")


def model_config_from_dict(cfg: Mapping[str, Any] | ml_collections.ConfigDict,
                           prefix: str = "model.") -> ModelConfig:
    """Builds a `ModelConfig` from a (ConfigDict) mapping, rejecting unknown keys by name.

    `planner` may be None (no planner head) or a mapping of `PlannerConfig` fields. Keys that
    belong to the loader rather than the architecture (`path`) are ignored here.
    """
    cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
    cfg.pop("path", None)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    _unknown_keys(cfg, fields, prefix)
    planner = cfg.get("planner", PlannerConfig())
    if isinstance(planner, Mapping):
        planner = dict(planner)
        _unknown_keys(planner, {f.name for f in dataclasses.fields(PlannerConfig)}, prefix + "planner.")
        planner = PlannerConfig(**planner)
    cfg["planner"] = planner
    return ModelConfig(**cfg)


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Inverse of `model_config_from_dict` (plain JSON-able dict)."""
    return dataclasses.asdict(config)
