"""Shared config pieces. Config files return `ml_collections.ConfigDict`s built from these.

Every default lives in its dataclass in `dultra_jax/config.py`; `as_config_dict` turns a
dataclass's defaults (plus the values given here) into a `ConfigDict`, so a section here states
only where this project's recipes depart from those defaults.
"""

import ml_collections

from dultra_jax.config import (CheckpointConfig, DecodeConfig, MeshConfig, ModelConfig, OptimConfig, PlannerConfig,
                               RewardsConfig, RLConfig, as_config_dict)


def planner() -> ml_collections.ConfigDict:
    """The dUltra planner head (`dultra_jax/models/planner.py`)."""
    return as_config_dict(PlannerConfig)


def llada_8b_model() -> ml_collections.ConfigDict:
    """LLaDA-8B-Instruct shapes (the ids are `ModelConfig`'s defaults), planner included, bf16 and
    rematerialised layers as the reference trains.

    `path` is the HF directory to load (None: random init with these shapes).
    """
    model = as_config_dict(ModelConfig, vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                           mlp_hidden_size=12288, dtype="bfloat16", param_dtype="bfloat16", remat=True)
    model.path = ml_collections.FieldReference(None, field_type=str)
    return model


def tiny_model() -> ml_collections.ConfigDict:
    """A 2-layer, D=32 model over a 64-token vocabulary: tests and CPU smoke runs."""
    model = llada_8b_model()
    model.update(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                      rope_theta=10000.0, max_sequence_length=256, mask_token_id=63, eos_token_id=1,
                      pad_token_id=1, eot_token_id=2, dtype="float32", param_dtype="float32", remat=False))
    return model


def rl(**overrides) -> ml_collections.ConfigDict:
    """GRPO as the reference dUltra code runs it (`RLConfig`'s defaults)."""
    return as_config_dict(RLConfig, **overrides)


def optim(**overrides) -> ml_collections.ConfigDict:
    """AdamW(0.9, 0.99, wd 0.1), lr 5e-6 constant, clip 1.0, backbone and planner trained
    (`OptimConfig`'s defaults)."""
    return as_config_dict(OptimConfig, **overrides)


def rewards(**overrides) -> ml_collections.ConfigDict:
    """The rewards and the distillation teacher (`RewardsConfig`'s defaults), every key declared so
    that a command-line override (`--config.rewards.teacher_offload=True`) can set it."""
    return as_config_dict(RewardsConfig, **overrides)


def decode(**overrides) -> ml_collections.ConfigDict:
    """Training rollouts: planner Bernoulli, gen 256, block 32 (`DecodeConfig`'s defaults), token
    temperature 0.1 as the reference's GSM8K runs."""
    return as_config_dict(DecodeConfig, **{"temperature": 0.1, **overrides})


def checkpoint(**overrides) -> ml_collections.ConfigDict:
    """A GRPO checkpoint every 400 steps (a step is minutes at 8B scale), the newest 3 kept."""
    return as_config_dict(CheckpointConfig, **{"every": 400, **overrides})


def mesh(**overrides) -> ml_collections.ConfigDict:
    """All devices on 'fsdp' by default; set data/tensor for larger slices."""
    return as_config_dict(MeshConfig, **overrides)
