"""Configs as data: `ml_collections.ConfigDict` in, frozen and validated dataclasses out.

Config files under `configs/` build a `ConfigDict`; the jitted code only ever sees the frozen
dataclasses made here, so a typo or an inconsistent value fails at start-up with the key's name.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import ml_collections

from dultra_jax.errors import ConfigError  # re-exported; errors.py holds every user error

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}


def parse_dtype(name: str, key: str) -> Any:
    """Maps a dtype name (`"bfloat16"`) to the jnp dtype; `key` names the config entry."""
    try:
        return _DTYPES[str(name)]
    except KeyError:
        raise ConfigError(f"{key}={name!r} is not a supported dtype; use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class PlannerConfig:
    """The dUltra unmasking planner head."""

    num_head_layers: int = 1
    freq_dim: int = 256  # sinusoidal timestep features
    adaln_eps: float = 1e-4


# `jax.checkpoint_policies` a remat block may use (`ModelConfig.remat_policy`), least memory first.
REMAT_POLICIES = ("nothing_saveable", "dots_with_no_batch_dims_saveable", "dots_saveable")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static description of a LLaDA backbone (+ optional planner head).

    Attributes mirror the HF LLaDA `config.json` names where one exists. `dtype` is the compute
    dtype (activations, matmul inputs), `param_dtype` the storage dtype of the parameters.
    `remat` recomputes each block's activations in the backward pass; `remat_policy` (one of
    `REMAT_POLICIES`, `jax.checkpoint_policies` names) says which of them a remat block keeps
    instead: `nothing_saveable` keeps only the block's input (least memory, a second forward),
    `dots_with_no_batch_dims_saveable` and `dots_saveable` keep the matmul outputs (more memory,
    less recomputation). The gradients are the same under every policy.
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
    remat_policy: str = "nothing_saveable"
    # docs/algorithm.md section 9: the reference attends to left padding; we mask padding keys by default.
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
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"model.remat_policy={self.remat_policy!r} is unknown; use one of "
                              f"{', '.join(REMAT_POLICIES)}")
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


def model_config_from_dict(cfg: Mapping[str, Any] | ml_collections.ConfigDict,
                           prefix: str = "model.") -> ModelConfig:
    """Builds a `ModelConfig` from a model section, rejecting unknown keys by name.

    `planner` may be None (no planner head) or a mapping of `PlannerConfig` fields. Keys that
    belong to the loader rather than the architecture (`path`) are ignored here.
    """
    cfg = _plain(cfg)
    cfg.pop("path", None)
    return from_config(ModelConfig, cfg, prefix)


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """Inverse of `model_config_from_dict` (plain JSON-able dict)."""
    return dataclasses.asdict(config)


RULES = ("planner_bernoulli", "planner_topk", "threshold", "factor", "low_confidence", "random",
         "entropy_bound", "ass")
PLANNER_RULES = ("planner_bernoulli", "planner_topk")
RANDOM_RULES = ("planner_bernoulli", "random")  # the rules that draw random numbers (`rules.py`)
SCHEDULED_RULES = ("low_confidence", "random")
CONFIDENCE_RULES = ("threshold", "factor", "low_confidence", "ass")
CACHE_MODES = ("none", "prefix", "dual")
CACHE_REFRESHES = ("auto", "full", "blocks")
FORCED_LOGPROB_MODES = ("reference", "exact")
# The rules' numeric knobs: traced inputs of the compiled rollout (`rules.Knobs`), not part of its
# static config, so that one compile serves a whole sweep over them.
KNOB_FIELDS = ("factor", "threshold", "entropy_bound", "steps")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static description of one semi-autoregressive decoding.

    A rule-specific knob left at None takes the rule's default; setting one that the chosen rule
    does not read is an error (no silently ignored flags).

    Attributes:
      rule: one of `RULES`.
      prompt_length: `Lp`, the (left-padded) prompt width; the canvas is `Lp + gen_length`.
      gen_length, block_length: `Lg` and the semi-AR block size (`Lg % block_length == 0`).
      max_steps: the step budget `T` (default `gen_length`: every step reveals at least one).
      temperature: token sampling temperature (0 = argmax; Gumbel-max otherwise).
      logprob_temperature: temperature of `q` in the action log-prob (reference: 1.0); None
        uses the sampling temperature.
      forced_logprob: how the action log-prob of `planner_bernoulli` scores a step whose only
        reveal is the best candidate, which the at-least-one rule forces when the draws pick
        nothing: `reference` gives it `log p_i` like any draw (the reference's choice);
        `exact` uses the outcome's true probability, `prod_{j != i} (1 - p_j)`.
      threshold: confidence threshold of the `threshold` rule (default 0.9).
      factor: `f` of the `factor` rule (default 1.0), or the multiplier on planner
        probabilities of the planner rules (default 1.0, swept at evaluation).
      steps: total steps of `low_confidence` / `random` over the whole generation (default
        `gen_length`: one token per step).
      entropy_bound: cumulative entropy budget (nats) of `entropy_bound` (default 1.0).
      eoser: EOS early rejection on confidence rules; `eoser_gamma_min` its starting factor.
      eos_token_id: the EOS id EOSER looks for.
      cache: block KV cache (Fast-dLLM): `none` recomputes the whole canvas every step (exact);
        `prefix` refreshes a cache of every position's keys/values with one full forward when a
        row enters a new block, and later steps of the block run only the block and everything
        after it against the cached prefix; `dual` also reuses the cached suffix, so steps run
        only the block. Cached keys/values are stale by the tokens revealed since the refresh.
      cache_refresh: how a cache is refreshed when a row enters a new block after the first:
        `full`, one full forward (Fast-dLLM; the rows enter each block together so that it is one
        batched forward); `blocks`, a window forward over the new block and the one just finished
        (`prefix`: and everything after), which writes those positions' keys/values and leaves the
        rest (the prompt, earlier blocks) as they were: a further approximation, about `L / (2 Lb)`
        times cheaper than a full refresh under `dual`; under `prefix` the rows then go at their
        own pace. `auto` (default): `blocks` under the planner rules, which take few steps per
        block, so that a full forward per block would cost most of what the cache saves; `full`
        under the others (Fast-dLLM's rules decode as Fast-dLLM does). `resolved_cache_refresh`.
    """

    rule: str = "planner_bernoulli"
    prompt_length: int = 512
    gen_length: int = 256
    block_length: int = 32
    max_steps: int | None = None
    temperature: float = 0.0
    logprob_temperature: float | None = 1.0
    forced_logprob: str = "reference"
    threshold: float | None = None
    factor: float | None = None
    steps: int | None = None
    entropy_bound: float | None = None
    eoser: bool = False
    eoser_gamma_min: float = 0.4
    eos_token_id: int = 126081
    cache: str = "none"
    cache_refresh: str = "auto"

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(f"decode.rule={self.rule!r} is unknown; use one of {', '.join(RULES)}")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"decode.cache={self.cache!r} is unknown; use one of {', '.join(CACHE_MODES)}")
        if self.cache_refresh not in CACHE_REFRESHES:
            raise ConfigError(f"decode.cache_refresh={self.cache_refresh!r} is unknown; use one of "
                              f"{', '.join(CACHE_REFRESHES)}")
        for key in ("prompt_length", "gen_length", "block_length"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"decode.{key}={value!r} must be a positive integer")
        if self.gen_length % self.block_length:
            raise ConfigError(f"decode.gen_length={self.gen_length} is not a multiple of "
                              f"decode.block_length={self.block_length}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"decode.max_steps={self.max_steps!r} must be positive")
        if self.temperature < 0:
            raise ConfigError(f"decode.temperature={self.temperature} must be >= 0")
        if self.logprob_temperature is not None and self.logprob_temperature <= 0:
            raise ConfigError(f"decode.logprob_temperature={self.logprob_temperature} must be > 0")
        if self.forced_logprob not in FORCED_LOGPROB_MODES:
            raise ConfigError(f"decode.forced_logprob={self.forced_logprob!r} is unknown; use one of "
                              f"{', '.join(FORCED_LOGPROB_MODES)}")
        if self.forced_logprob == "exact" and self.rule != "planner_bernoulli":
            raise ConfigError(f"decode.forced_logprob='exact' does not apply to rule {self.rule!r} "
                              f"(only to planner_bernoulli, whose draws can pick nothing)")
        applies = {"threshold": ("threshold",), "factor": ("factor",) + PLANNER_RULES,
                   "steps": SCHEDULED_RULES, "entropy_bound": ("entropy_bound",)}
        for key, rules in applies.items():
            if getattr(self, key) is not None and self.rule not in rules:
                raise ConfigError(f"decode.{key}={getattr(self, key)!r} does not apply to rule {self.rule!r} "
                                  f"(only to {', '.join(rules)})")
        if self.eoser and self.rule not in CONFIDENCE_RULES:
            raise ConfigError(f"decode.eoser=True does not apply to rule {self.rule!r} "
                              f"(only to {', '.join(CONFIDENCE_RULES)})")
        if self.rule in SCHEDULED_RULES:
            steps = self.total_steps
            if steps <= 0 or steps % self.num_blocks or steps > self.gen_length:
                raise ConfigError(f"decode.steps={steps} must be a multiple of the {self.num_blocks} blocks "
                                  f"and at most decode.gen_length={self.gen_length}")
        if not 0 < self.eoser_gamma_min <= 1:
            raise ConfigError(f"decode.eoser_gamma_min={self.eoser_gamma_min} must be in (0, 1]")

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def canvas_length(self) -> int:
        return self.prompt_length + self.gen_length

    @property
    def step_budget(self) -> int:
        return self.max_steps if self.max_steps is not None else self.gen_length

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.gen_length

    @property
    def steps_per_block(self) -> int:
        return self.total_steps // self.num_blocks

    @property
    def uses_planner(self) -> bool:
        return self.rule in PLANNER_RULES

    @property
    def resolved_cache_refresh(self) -> str:
        """`cache_refresh` with `auto` resolved: `blocks` under the planner rules, else `full`."""
        if self.cache_refresh != "auto":
            return self.cache_refresh
        return "blocks" if self.uses_planner else "full"

    @property
    def rule_threshold(self) -> float:
        return 0.9 if self.threshold is None else self.threshold

    @property
    def rule_factor(self) -> float:
        return 1.0 if self.factor is None else self.factor

    @property
    def rule_entropy_bound(self) -> float:
        return 1.0 if self.entropy_bound is None else self.entropy_bound

    @property
    def logprob_temp(self) -> float:
        """Temperature of q in the action log-prob; falls back to the sampling temperature."""
        if self.logprob_temperature is not None:
            return self.logprob_temperature
        return self.temperature if self.temperature > 0 else 1.0

    def replace(self, **changes) -> "DecodeConfig":
        return dataclasses.replace(self, **changes)

    @property
    def deterministic(self) -> bool:
        """Whether the rollout ignores its random key: greedy tokens (temperature 0) and a rule
        that draws nothing, so every seed decodes the same tokens."""
        return self.temperature == 0 and self.rule not in RANDOM_RULES

    def without_knobs(self) -> "DecodeConfig":
        """This config with `KNOB_FIELDS` at None: the static key of the compiled rollout, shared
        by every value of a sweep over them (their values travel as `rules.Knobs`)."""
        return dataclasses.replace(self, **dict.fromkeys(KNOB_FIELDS))

    def check_model(self, model: ModelConfig) -> None:
        """Start-up checks that need the model too."""
        if self.uses_planner and not model.has_planner:
            raise ConfigError(f"decode.rule={self.rule!r} needs a planner head, but the model has none")
        if self.canvas_length > model.max_sequence_length:
            raise ConfigError(f"decode.prompt_length + decode.gen_length = {self.canvas_length} exceeds "
                              f"model.max_sequence_length={model.max_sequence_length}")
        if self.eoser and not 0 <= self.eos_token_id < model.vocab_size:
            raise ConfigError(f"decode.eos_token_id={self.eos_token_id} is outside the vocabulary "
                              f"[0, {model.vocab_size})")


ADVANTAGES = ("mean", "mean_std", "leave_one_out")
TRAINABLE = ("all", "planner", "backbone")
SCHEDULES = ("constant", "cosine", "linear")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """GRPO.

    Attributes:
      group_size: G rollouts per prompt.
      advantage: "mean" (R - group mean, the reference), "mean_std" (also / group std),
        "leave_one_out" (R - mean of the other G-1).
      advantage_min_clip: C; advantages below it become 0.
      eps_low, eps_high: the ratio clip range [1 - eps_low, 1 + eps_high].
      beta: KL weight to the frozen initial policy (0: no reference model).
      num_iterations: updates per rollout batch (>1 uses the rollout's log-probs as "old").
      update_micro_batches: the update replays the batch in this many slices of rows, each
        device taking 1/n of its own rows at a time, with gradients accumulated (the same update
        as one pass; peak activation memory / n). Rows per device must be a multiple.
    """

    group_size: int = 12
    advantage: str = "mean"
    advantage_min_clip: float = 0.0
    eps_low: float = 0.2
    eps_high: float = 1.0
    beta: float = 0.0
    num_iterations: int = 1
    update_micro_batches: int = 1

    def __post_init__(self):
        if self.update_micro_batches < 1:
            raise ConfigError(f"rl.update_micro_batches={self.update_micro_batches} must be >= 1")
        if self.group_size < 2:
            raise ConfigError(f"rl.group_size={self.group_size} must be at least 2 (advantages are group-relative)")
        if self.advantage not in ADVANTAGES:
            raise ConfigError(f"rl.advantage={self.advantage!r} is unknown; use one of {', '.join(ADVANTAGES)}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ConfigError(f"rl.eps_low={self.eps_low} must be in [0, 1) and rl.eps_high={self.eps_high} >= 0")
        if self.beta < 0:
            raise ConfigError(f"rl.beta={self.beta} must be >= 0")
        if self.num_iterations < 1:
            raise ConfigError(f"rl.num_iterations={self.num_iterations} must be >= 1")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with gradient clipping and a learning-rate schedule; `train` picks the parameter group,
    `backbone_lr_scale` multiplies the backbone's rate (with `train="all"`: a planner that learns
    fast beside a backbone that moves slowly; 1.0 as the reference). `moment_dtype` stores Adam's
    two moments in "float32" or "bfloat16" (half the memory of float32 moments; the step itself
    computes in float32); None (default) stores them in each parameter's dtype (optax's rule)."""

    learning_rate: float = 5e-6
    schedule: str = "constant"
    warmup_steps: int = 0
    min_learning_rate: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    train: str = "all"
    backbone_lr_scale: float = 1.0
    moment_dtype: str | None = None

    def __post_init__(self):
        if self.moment_dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"optim.moment_dtype={self.moment_dtype!r} is unknown; use float32, bfloat16 or None "
                              "(each parameter's dtype)")
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate={self.learning_rate} must be positive")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"optim.schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}")
        if self.train not in TRAINABLE:
            raise ConfigError(f"optim.train={self.train!r} is unknown; use one of {', '.join(TRAINABLE)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ConfigError(f"optim.min_learning_rate={self.min_learning_rate} must be in "
                              f"[0, optim.learning_rate={self.learning_rate}]")
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
        if self.eps <= 0:
            raise ConfigError(f"optim.eps={self.eps} must be positive")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay} must be >= 0")
        if self.backbone_lr_scale <= 0:
            raise ConfigError(f"optim.backbone_lr_scale={self.backbone_lr_scale} must be positive (freeze the "
                              "backbone with optim.train='planner')")
        if self.grad_clip <= 0:  # optax would zero (0) or flip (< 0) every gradient
            raise ConfigError(f"optim.grad_clip={self.grad_clip} must be positive (the largest global gradient norm)")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """The `checkpoint` section of a training config: save every `every` steps (and at the end),
    keep the newest `keep`, write in the background when `async_save`."""

    every: int = 100
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"checkpoint.every={self.every} must be >= 1 (steps between checkpoints)")
        if self.keep < 1:  # 0 would delete each checkpoint as it lands: a killed run could not resume
            raise ConfigError(f"checkpoint.keep={self.keep} must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` section: device counts of the ('data', 'fsdp', 'tensor') axes; one may be -1
    (all the devices the others leave)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


# ---------------------------------------------------------------------- training sections


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The `data` section of GRPO training: the task, where its records come from, and batching.

    Records come from `examples` (inline), `generator` (`{"name", "split", "n"}`, a built-in
    generator) or `path` (a JSONL, JSON or Parquet file, a directory of split files, or
    `tfds:NAME:SPLIT`; with `split`, `data_dir`, `limit`). `tokenizer` is a directory (default
    `model.path`; none for records with `prompt_ids`). `prompts_per_step` is the global number of
    prompts per step (each rolled out `rl.group_size` times), or -1 for one prompt per device of
    the mesh's batch axes (data x fsdp; the reference's one prompt per GPU), so one config runs
    on any number of chips; `shuffle_seed` defaults to `seed`.
    """

    task: str
    task_options: Mapping[str, Any] | None = None
    examples: Sequence[Mapping[str, Any]] | None = None
    generator: Mapping[str, Any] | None = None
    path: str | None = None
    split: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    tokenizer: str | None = None
    mode: str | None = None
    prompts_per_step: int = 1
    shuffle_seed: int | None = None



@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardsConfig:
    """The `rewards` section: `weights` (default: the task's), per-reward `options`, and the
    distillation teacher (`teacher_path`: a directory or hub id, `teacher_weight`, `teacher_dtype`,
    `teacher_offload`).

    `distill` switches the distillation reward: None (on exactly when `teacher_path` is given),
    True (the reference's recipe: `teacher_path` is required) or False (off, whatever the path).

    `teacher_offload` keeps the teacher's weights in host memory (the `pinned_host` memory kind)
    between scorings: each scoring copies them to the chips and frees the copy afterwards, so the
    rollout and the policy update run without them (what fits LLaDA-8B and the 7B teacher on a
    v5litepod-8). It costs one host->device copy of the teacher per scoring.
    """

    weights: Mapping[str, float] | None = None
    options: Mapping[str, Mapping[str, Any]] | None = None
    distill: bool | None = None
    teacher_path: str | None = None
    teacher_weight: float = 1.0
    teacher_dtype: str = "bfloat16"
    teacher_offload: bool = False

    def __post_init__(self):
        if self.distill and not self.teacher_path:
            raise ConfigError("rewards.distill=True needs rewards.teacher_path (a directory or hub id of the teacher, "
                              "e.g. --config.rewards.teacher_path=Qwen/Qwen2.5-Math-7B-Instruct); to train without "
                              "the distillation reward, set --config.rewards.distill=False")

    @property
    def uses_teacher(self) -> bool:
        """Whether the distillation reward runs (a teacher is loaded)."""
        return bool(self.teacher_path) if self.distill is None else bool(self.distill)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinalEvalConfig:
    """The `final_eval` section: the end-of-run comparison (`training.final_eval`).

    Held-out records from `generator` or `path` (+ `split`, `limit`); `rows` and `sweeps` name the
    settings (checked by `final_eval.check`); `seeds` and `batch_size` (rounded up to the mesh).
    """

    generator: Mapping[str, Any] | None = None
    path: str | None = None
    split: str | None = None
    limit: int | None = None
    rows: Mapping[str, Mapping[str, Any]] | None = None
    sweeps: Mapping[str, Mapping[str, Any]] | None = None
    seeds: Sequence[int] = (0,)
    batch_size: int = 64

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"final_eval.batch_size={self.batch_size!r} must be a positive integer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainEvalConfig:
    """The `eval` section of GRPO: held-out evaluation while training.

    Every `every` steps (0: never) the current parameters decode the held-out records
    (`generator` or `path` + `split`, `limit`) with the training rollout's rule and knobs (`rule`
    overrides the rule, with its default knob), greedy tokens, over `seeds`, in batches of
    `batch_size` rows, scored as the final evaluation scores (`scoring`, None: the task's
    default). The row gets `eval_accuracy` (percent), `eval_nfe`, `eval_tpf` and `eval_objective`;
    the parameters with the best `objective` so far ("accuracy", or "accuracy_per_nfe": accuracy
    per forward pass) are kept in `WORKDIR/best/` and named in `WORKDIR/best.json`.
    """

    every: int = 0
    generator: Mapping[str, Any] | None = None
    path: str | None = None
    split: str | None = None
    limit: int | None = None
    rule: str | None = None
    seeds: Sequence[int] = (0,)
    batch_size: int = 64
    scoring: str | None = None
    objective: str = "accuracy"

    def __post_init__(self):
        if not isinstance(self.every, int) or self.every < 0:
            raise ConfigError(f"eval.every={self.every!r} must be 0 (off) or a positive number of steps")
        if self.objective not in EVAL_OBJECTIVES:
            raise ConfigError(f"eval.objective={self.objective!r} is not one of {', '.join(EVAL_OBJECTIVES)}")
        if self.every and not (self.generator or self.path):
            raise ConfigError("eval.every > 0 needs held-out records: eval.path (a file, a directory of split files or "
                              "tfds:NAME:SPLIT) or eval.generator")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"eval.batch_size={self.batch_size!r} must be a positive integer")
        if not self.seeds:
            raise ConfigError("eval.seeds is empty: give at least one decoding seed")


EVAL_OBJECTIVES = ("accuracy", "accuracy_per_nfe")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """A GRPO training config (`launch/train.py`): `model` is the model section (`path` + fields
    of `ModelConfig`, read by `interop.build.build_model`)."""

    model: Mapping[str, Any]
    decode: DecodeConfig
    data: DataConfig
    total_steps: int
    rl: RLConfig = RLConfig()
    optim: OptimConfig = OptimConfig()
    rewards: RewardsConfig = RewardsConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    seed: int = 0
    eval: TrainEvalConfig = TrainEvalConfig()
    final_eval: FinalEvalConfig | None = None

    def __post_init__(self):
        _check_total_steps(self.total_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTDataConfig:
    """The `data` section of the SFT trainers.

    Either an embedded generator, `task` "arithmetic" or "fill": the problems `[start, start +
    num_examples)` of `split`, in rows of `prompt_length + response_length` tokens (None: the
    task's widths); or `task` "chat": the conversations at `path` (a JSONL, JSON or Parquet file,
    a directory of split files, or `tfds:NAME:SPLIT`; `split` may list several, "math,code"; with
    `data_dir`, `limit`) rendered with the chat template of `tokenizer` (None: `model.path`) into
    rows of `sequence_length` tokens, `strip_think` removing `<think>...</think>` from responses
    (`dultra_jax.data.chat`), shuffled from `shuffle_seed` (None: `seed`). `batch_size` rows per step.
    """

    task: str = "arithmetic"
    split: str = "train"
    num_examples: int = 10000
    start: int = 0
    batch_size: int
    prompt_length: int | None = None
    response_length: int | None = None
    path: str | None = None
    data_dir: str | None = None
    limit: int | None = None
    tokenizer: str | None = None
    sequence_length: int | None = None
    strip_think: bool = False
    shuffle_seed: int | None = None

    def __post_init__(self):
        for key in ("batch_size", "num_examples", "prompt_length", "response_length", "sequence_length", "limit"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ConfigError(f"data.{key}={value!r} must be a positive integer")
        if self.is_chat:
            if not self.path:
                raise ConfigError("data.task='chat' needs data.path (--config.data.path=FILE: a JSONL, JSON or Parquet "
                                  "file of chat records, a directory of split files or tfds:NAME:SPLIT)")
            if self.sequence_length is None:
                raise ConfigError("data.task='chat' needs data.sequence_length (the row width in tokens, e.g. 512)")
            for key in ("prompt_length", "response_length"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"data.{key} does not apply to data.task='chat' (its rows are "
                                      f"data.sequence_length wide, each prompt as long as it is)")
        elif self.path:
            raise ConfigError(f"data.path={self.path!r} is read by data.task='chat' only; data.task={self.task!r} "
                              f"generates its problems (set --config.data.task=chat to train on the file)")

    @property
    def is_chat(self) -> bool:
        return self.task == CHAT_TASK


CHAT_TASK = "chat"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannerDataConfig(SFTDataConfig):
    """Planner initialisation's `data`: also `block_length` (None: the task's) and `corruption`,
    "span" (the reference's) or "aligned"."""

    block_length: int | None = None
    corruption: str = "span"

    def __post_init__(self):
        super().__post_init__()
        if self.corruption not in CORRUPTIONS:
            raise ConfigError(f"data.corruption={self.corruption!r} is not one of {', '.join(CORRUPTIONS)}")
        if self.is_chat and self.corruption != "span":
            raise ConfigError(f"data.corruption={self.corruption!r} needs fixed-width prompts; chat rows use 'span'")
        if self.is_chat and self.block_length is None:
            raise ConfigError("data.task='chat' needs data.block_length (the shortest masked span, e.g. 32)")


CORRUPTIONS = ("span", "aligned")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTEvalConfig:
    """The `eval` section of the SFT trainers: held-out decoding of `rules` on `num_examples`
    problems of `split` after training (greedy tokens; `steps` for scheduled rules, `block_length`
    None: the task's), and every `every` steps (0: never) on the first `every_examples` of them.
    Chat data has no answer checker, hence no `rules`; its held-out rows are the records of
    `split` at `path` (None: `data.path`)."""

    split: str = "heldout"
    path: str | None = None
    start: int = 0
    num_examples: int = 0
    batch_size: int | None = None
    rules: Sequence[str] = ()
    steps: int | None = None
    block_length: int | None = None
    every: int = 0
    every_examples: int = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannerEvalConfig(SFTEvalConfig):
    """Planner initialisation's `eval`: also `agreement_batches` held-out batches scored for
    agreement with the factor rule."""

    agreement_batches: int = 0


EXPORT_DTYPES = ("float32", "bfloat16", "float16")
MASK_EPS = 1e-3  # LLaDA's `eps` of the masking probability `t ~ U(eps, 1)`


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """What the SFT trainers share: checkpoints are cheap beside GRPO's (every 500 steps), metrics
    are means over `log_every` steps, the result is exported as an HF directory (`export_dir`,
    None: `WORKDIR/hf`) in `export_dtype`."""

    model: Mapping[str, Any]
    data: SFTDataConfig
    total_steps: int
    optim: OptimConfig = OptimConfig()
    eval: SFTEvalConfig = SFTEvalConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig(every=500, keep=2)
    seed: int = 0
    log_every: int = 50
    export_dir: str | None = None
    export_dtype: str = "float32"

    def __post_init__(self):
        _check_total_steps(self.total_steps)
        if self.export_dtype not in EXPORT_DTYPES:
            raise ConfigError(f"export_dtype={self.export_dtype!r} must be float32, bfloat16 or float16")
        if not isinstance(self.log_every, int) or self.log_every <= 0:
            raise ConfigError(f"log_every={self.log_every} must be positive")
        every = self.eval.every
        if every < 0 or (every and every % self.log_every):
            raise ConfigError(f"eval.every={every} must be 0 (off) or a multiple of log_every={self.log_every}")
        if self.data.is_chat and self.eval.rules:
            raise ConfigError(f"eval.rules={tuple(self.eval.rules)}: chat data has no answers to check decoding "
                              f"against; set eval.rules=()")
        if self.checkpoint.every % self.log_every:  # a resume would log a row averaging part of its window
            raise ConfigError(f"checkpoint.every={self.checkpoint.every} must be a multiple of "
                              f"log_every={self.log_every}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainConfig(SFTConfig):
    """Masked-diffusion SFT (`launch/pretrain.py`): `mask_eps` is the `eps` of `t ~ U(eps, 1)`."""

    mask_eps: float = MASK_EPS

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mask_eps < 1:
            raise ConfigError(f"mask_eps={self.mask_eps} must be in (0, 1)")
        if self.optim.train != "all":
            raise ConfigError(f"optim.train={self.optim.train!r}: pre-training trains the whole backbone ('all')")
        if self.model.get("planner") is not None:
            raise ConfigError("model.planner must be None for pre-training (the planner is initialised by "
                              "launch/init_planner.py afterwards)")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannerInitConfig(SFTConfig):
    """Planner initialisation (`launch/init_planner.py`): `factor` is the imitated rule's f."""

    data: PlannerDataConfig
    eval: PlannerEvalConfig = PlannerEvalConfig()
    factor: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if not self.model.get("path"):
            raise ConfigError("model.path must name the base HF directory whose planner is initialised")
        if self.model.get("planner", PlannerConfig()) is None:
            raise ConfigError("model.planner is None; planner initialisation needs a planner section")
        if self.optim.train != "planner":
            raise ConfigError(f"optim.train={self.optim.train!r}: planner initialisation trains the planner only "
                              "(set optim.train='planner')")
        if self.factor <= 0:
            raise ConfigError(f"factor={self.factor} must be positive")


EVAL_SCORINGS = ("official", "strict")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalRunConfig:
    """The `evaluate` section of an evaluation config (`launch/evaluate.py --config=configs/eval/...`):
    one row of the paper's tables. The model comes from the config's `model.path` (an HF directory
    or a training workdir); a command-line flag given explicitly overrides the field of its name.

    `data` (+ `split`, `limit`): the benchmark records; `task` with `task_options` (e.g. mbpp
    `split`, `shots`) and the prompt `mode`; `rules` with one sweep list per knob (`factors`,
    `thresholds`, `steps`, `entropy_bounds`; empty: the rule's default); `seeds`; the decoding
    fields; `scoring` (None: the task's default, `official` for the paper's benchmarks);
    `speed_records` (records timed at batch 1 per setting, -1 all); `dtype` of the weights; `out`.
    """

    task: str
    data: str | None = None
    split: str | None = None
    limit: int | None = None
    task_options: Mapping[str, Any] | None = None
    mode: str = "non-thinking"
    rules: Sequence[str] = ("planner_bernoulli",)
    factors: Sequence[float] = (0.5, 0.8, 1.0, 1.2, 1.5)
    thresholds: Sequence[float] = (0.9,)
    steps: Sequence[int] = ()
    entropy_bounds: Sequence[float] = ()
    seeds: Sequence[int] = (42, 123, 456, 789, 1000)
    gen_length: int = 256
    block_length: int = 32
    prompt_length: int = 512
    batch_size: int = 8
    temperature: float = 0.0
    max_steps: int | None = None
    cache: str = "none"
    cache_refresh: str = "auto"
    scoring: str | None = None
    speed_records: int = 0
    dtype: str | None = "bfloat16"
    out: str | None = None

    def __post_init__(self):
        if self.scoring is not None and self.scoring not in EVAL_SCORINGS:
            raise ConfigError(f"evaluate.scoring={self.scoring!r}; use one of {', '.join(EVAL_SCORINGS)} or None")
        if self.cache not in CACHE_MODES:
            raise ConfigError(f"evaluate.cache={self.cache!r}; use one of {', '.join(CACHE_MODES)}")
        if self.cache_refresh not in CACHE_REFRESHES:
            raise ConfigError(f"evaluate.cache_refresh={self.cache_refresh!r}; use one of {', '.join(CACHE_REFRESHES)}")
        if not isinstance(self.speed_records, int) or self.speed_records < -1:
            raise ConfigError(f"evaluate.speed_records={self.speed_records!r} must be an integer >= -1")
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"evaluate.batch_size={self.batch_size!r} must be a positive integer")


def _check_total_steps(total_steps: Any) -> None:
    if not isinstance(total_steps, int) or total_steps < 0:
        raise ConfigError(f"total_steps={total_steps!r} must be an integer >= 0")


# ------------------------------------------------------------------- ConfigDict <-> dataclass


def _plain(cfg: Mapping[str, Any] | ml_collections.ConfigDict | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    return dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)


def _section_type(hint: Any) -> type | None:
    """The dataclass a field holds (`X` or `X | None`), else None."""
    candidates = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return next((c for c in candidates if dataclasses.is_dataclass(c)), None)


def from_config(cls: type, cfg: Mapping[str, Any] | ml_collections.ConfigDict | None, prefix: str = ""):
    """`cls` built from a config (section), nested sections included: the one place where config
    keys are checked. Unknown and missing keys are `ConfigError`s naming the dotted key
    (`prefix` + name); each dataclass validates its own values."""
    values = _plain(cfg)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    missing = [prefix + name for name, f in fields.items() if name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config is missing {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        section = _section_type(hints[name])
        if section is not None and isinstance(value, Mapping):
            values[name] = from_config(section, value, f"{prefix}{name}.")
    return cls(**values)


def as_config_dict(cls: type, **overrides: Any) -> ml_collections.ConfigDict:
    """A `ConfigDict` of `cls`'s defaults with `overrides`, for config files: the defaults are
    stated once, in the dataclass. A None default becomes a typed `FieldReference`, so that a
    command-line override (`--config.decode.steps=8`) can set it."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    section = {}
    for name, f in fields.items():
        if name in overrides:
            value = overrides[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            continue  # a required field the caller did not give
        if dataclasses.is_dataclass(value):
            value = as_config_dict(type(value), **{k.name: getattr(value, k.name) for k in dataclasses.fields(value)})
        elif value is None:
            value = _none_reference(hints[name])
        section[name] = value
    return ml_collections.ConfigDict(section)


def _none_reference(hint: Any) -> ml_collections.FieldReference:
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    kind = kinds[0]
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) in (Mapping, dict) or kind in (Mapping, dict):
        kind = ml_collections.ConfigDict
    elif typing.get_origin(kind) is not None:  # Sequence[...] and other generics
        kind = typing.get_origin(kind)
    return ml_collections.FieldReference(None, field_type=kind)
