"""What a user's `--model` names: its policy and tokenizer, and sampling, scoring and exporting it.

    policy = load_policy("assets/demo")                      # its config.json's torch_dtype
    samples = sample(policy, load_source_tokenizer(policy.source_dir), prompt="??##?dc????d???c",
                     decode={"rule": "planner_bernoulli", "gen_length": 32, "block_length": 32})

A *model source* is an HF LLaDA (+ planner) directory (or its hub id, `GSAI-ML/LLaDA-8B-Instruct`,
resolved from the HF cache by `training.restore.resolve_source`) or a training workdir of `launch/train.py`,
`pretrain.py` or `init_planner.py` (`model`), or a config file's `model` section (`config`:
random weights unless its `path` is set), or both (the section's runtime fields with `model`, an
HF directory, as its path). The tokenizer comes from the source's directory: the HF directory, a
pretrain workdir's `tokenizer/`, or the HF directory a training run started from.

`sample_source`, `score_source` and `export_source` are what `launch/sample.py`, `score.py` and
`export.py` run (`evaluate_source` is `evaluate.py`'s). Errors about an argument start
with its name (`model: ...`, `prompt_ids: ...`) or quote it (`overwrite=True`), which the
launchers turn into their flags (`dultra_jax.cli`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dultra_jax import distributed, evaluation
from dultra_jax.config import ConfigError, DecodeConfig, ModelConfig
from dultra_jax.data.tasks import get_task, load_task_records
from dultra_jax.hub import resolve_model_dir
from dultra_jax.data.tokenizer import encode_prompt, has_tokenizer, load_tokenizer
from dultra_jax.decoding.generate import Generation, generate
from dultra_jax.errors import CheckpointError, DataError, TokensError
from dultra_jax.interop.hf_llada import check_export_dir, checkpoint_dtype, export_hf
from dultra_jax.interop.logit_check import check_token_range, read_token_lists, read_tokens, save_scores, score_tokens
from dultra_jax.interop.build import build_model
from dultra_jax.sharding import make_mesh
from dultra_jax.training.restore import load_model_source, model_source_kind, resolve_source

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Parameters and model config of a model source, and the directory of its tokenizer (None
    when it has none)."""

    params: Any
    model: ModelConfig
    source_dir: str | None


def check_source(model: str) -> str:
    """`model_source_kind(model)` ("hf" or "workdir") without reading weights; CheckpointError
    `model: ...` when it is neither."""
    try:
        return model_source_kind(model)
    except CheckpointError as e:
        raise CheckpointError(f"model: {e}") from None


def load_policy(model: str | None = None, config: Mapping[str, Any] | None = None, *, dtype: str | None = None,
                param_dtype: str | None = None, default_dtype: str | None = None, mesh=None,
                seed: int = 0) -> Policy:
    """The policy of a model source (module doc).

    Args:
      model: an HF directory (or its hub id) or a training workdir.
      config: a config's `model` section (with `model`: its runtime fields; `model` must then be
        an HF directory, since a workdir carries its own model config).
      dtype, param_dtype: compute and storage dtypes. None takes `default_dtype` when given, else
        the source's own: an HF directory's config.json `torch_dtype` (float32 when it has none),
        a workdir's checkpoint, a config section's fields.
      mesh: parameters are sharded on it (None: an HF directory or a config's weights go to the
        default device, a workdir's to every device on 'fsdp').
      seed: initialisation seed of random weights (a config section without `path`).
    Raises:
      ConfigError / CheckpointError starting with `model:` or `config:`.
    """
    if model is None and config is None:
        raise ConfigError("model / config: give a model directory or training workdir, or a config file")
    model = resolve_source(model) if model is not None else None
    if config is not None:
        section = dict(config.to_dict() if hasattr(config, "to_dict") else config)
        if model is None and section.get("path"):
            try:
                section["path"] = resolve_model_dir(section["path"], "model.path")
            except ConfigError as e:
                raise ConfigError(f"config: {e}") from None
        if model is not None:
            if check_source(model) != "hf":
                raise ConfigError(f"model: {model} is a training workdir, which carries its own model config; give "
                                  f"it without `config`")
            section["path"] = model
        section.update({k: v for k, v in (("dtype", dtype), ("param_dtype", param_dtype)) if v is not None})
        try:
            params, built = build_model(section, mesh=mesh, seed=seed)
        except (CheckpointError, ConfigError) as e:
            raise type(e)(f"{'model' if model is not None else 'config'}: {e}") from None
        return Policy(params, built, section.get("path") or None)
    try:
        if check_source(model) == "hf":
            own = checkpoint_dtype(model) or "float32"
            dtype, param_dtype = dtype or default_dtype or own, param_dtype or default_dtype or own
        else:
            dtype, param_dtype = dtype or default_dtype, param_dtype or default_dtype
        params, loaded, source_dir = load_model_source(model, mesh=mesh, dtype=dtype, param_dtype=param_dtype)
    except (CheckpointError, ConfigError) as e:
        raise type(e)(str(e) if str(e).startswith("model: ") else f"model: {e}") from None
    log.info("%s: %d layers, d_model %d, planner %s, %s parameters, %s compute", model, loaded.n_layers,
             loaded.d_model, loaded.has_planner, loaded.param_dtype, loaded.dtype)
    return Policy(params, loaded, source_dir)


def source_dir_of(model: str | None, config: Mapping[str, Any] | None = None) -> str | None:
    """The tokenizer directory of an HF source known before loading it (None for a workdir, whose
    tokenizer is known once it is restored, and for a config section without `path`)."""
    if model is not None:
        model = resolve_source(model)
        return model if check_source(model) == "hf" else None
    path = (config or {}).get("path")
    if not path:
        return None
    try:
        return resolve_model_dir(path, "model.path")
    except ConfigError as e:
        raise ConfigError(f"config: {e}") from None


def load_source_tokenizer(source_dir: str | None, tokenizer: str | None = None, *, source: str = "model"):
    """The tokenizer of a model source: the directory `tokenizer` when given, else `source_dir`'s,
    else None (with a warning: prompts must then be token ids, completions are rendered as ids).

    Raises:
      CheckpointError `tokenizer=DIR: ...` for a given directory without tokenizer files, and
      `SOURCE: cannot load the tokenizer in DIR: ...` (`source`: the argument that named the
      model source) for tokenizer files that do not load.
    """
    if tokenizer is not None:
        tokenizer = resolve_source(tokenizer, "tokenizer")
        if not os.path.isdir(tokenizer):
            raise CheckpointError(f"tokenizer={tokenizer}: no such directory")
        if not has_tokenizer(tokenizer):
            raise CheckpointError(f"tokenizer={tokenizer}: no tokenizer files in it")
        try:
            return load_tokenizer(tokenizer)
        except CheckpointError as e:
            raise CheckpointError(f"tokenizer={tokenizer}: {e}") from None
    if not has_tokenizer(source_dir):
        log.warning("no tokenizer (%s): prompts must be token ids and completions are rendered as ids", source_dir)
        return None
    try:
        return load_tokenizer(source_dir)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None


def eoser_fields(eoser: bool, gamma_min: float | None) -> dict[str, Any]:
    """The `DecodeConfig` fields of EOS early rejection: `{}` when off; `eoser_gamma_min` needs
    `eoser` (no silently ignored setting)."""
    if not eoser:
        if gamma_min is not None:
            raise ConfigError(f"decode.eoser_gamma_min={gamma_min} needs decode.eoser=True")
        return {}
    return {"eoser": True, **({} if gamma_min is None else {"eoser_gamma_min": gamma_min})}


# ------------------------------------------------------------------------------------ sampling


@dataclasses.dataclass
class Samples:
    """What `sample` decoded: the rows and timings (`generation`), the `DecodeConfig` used, and
    each row's text (None without a tokenizer)."""

    generation: Generation
    decode: DecodeConfig
    texts: list[str] | None


def encode_prompts(tokenizer, prompt: str | None, prompt_ids: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """The prompts' token ids: `prompt` rendered with the tokenizer's chat template, or
    `prompt_ids` as they are (exactly one of the two)."""
    if (prompt is None) == (prompt_ids is None):
        raise ConfigError("prompt / prompt_ids: give exactly one")
    if prompt_ids is not None:
        return [list(p) for p in prompt_ids]
    if tokenizer is None:
        raise ConfigError("prompt: the model source has no tokenizer to encode it; give `prompt_ids`")
    return [encode_prompt(tokenizer, prompt)]


def sample(policy: Policy, tokenizer, *, prompt: str | None = None,
           prompt_ids: Sequence[Sequence[int]] | None = None, decode: Mapping[str, Any] | None = None,
           seed: int = 0, prompts: Sequence[Sequence[int]] | None = None) -> Samples:
    """Decodes one batch of prompts with `generate` (one compile, then a timed call).

    Args:
      prompt / prompt_ids: a user message (chat template) or token-id lists; `prompts`: ids
        already encoded (`encode_prompts`) instead.
      decode: `DecodeConfig` fields (`prompt_length` and `eos_token_id` come from the prompts
        and the model).
      seed: the sampling key's seed.
    """
    prompts = [list(p) for p in prompts] if prompts is not None else encode_prompts(tokenizer, prompt, prompt_ids)
    for i, ids in enumerate(prompts):
        check_token_range(np.asarray([ids]), policy.model.vocab_size, source=f"prompt {i}")
    config = DecodeConfig(**{"prompt_length": max(map(len, prompts)), "eos_token_id": policy.model.eos_token_id,
                             **dict(decode or {})})
    generation = generate(policy.params, policy.model, config, prompts, seed=seed)
    texts = None if tokenizer is None else [tokenizer.decode(row["tokens"], skip_special_tokens=True)
                                            for row in generation.rows]
    return Samples(generation=generation, decode=config, texts=texts)


def sample_source(*, model: str | None = None, config: Mapping[str, Any] | None = None, prompt: str | None = None,
                  prompt_ids: str | Sequence[Sequence[int]] | None = None, decode: Mapping[str, Any] | None = None,
                  dtype: str | None = None, param_dtype: str | None = None, seed: int = 0) -> Samples:
    """`sample` from a model source (module doc), its parameters sharded over every device.

    `prompt_ids` may be a JSON file or inline JSON (`read_token_lists`). The prompt is encoded
    before any weight is read when the tokenizer's directory is known up front (an HF source), so
    a prompt the tokenizer cannot encode fails at once.
    """
    if (prompt is None) == (prompt_ids is None):
        raise ConfigError("prompt / prompt_ids: give exactly one")
    if isinstance(prompt_ids, str):
        try:
            prompt_ids = read_token_lists(prompt_ids)
        except TokensError as e:
            raise TokensError(f"prompt_ids: {e}") from None
    model = resolve_source(model) if model is not None else None
    tokenizer = prompts = None
    early_dir = source_dir_of(model, config)
    source = "model" if model is not None else "config"
    if early_dir is not None and (prompt is not None or has_tokenizer(early_dir)):
        tokenizer = load_source_tokenizer(early_dir, source=source)
        prompts = encode_prompts(tokenizer, prompt, prompt_ids)
    policy = load_policy(model, config, dtype=dtype, param_dtype=param_dtype, mesh=make_mesh(), seed=seed)
    if prompts is None:
        tokenizer = load_source_tokenizer(policy.source_dir, source=source) if has_tokenizer(policy.source_dir) \
            else None
        prompts = encode_prompts(tokenizer, prompt, prompt_ids)
    return sample(policy, tokenizer, prompts=prompts, decode=decode, seed=seed)


# ----------------------------------------------------------------------------- scoring, export


def score_source(*, model: str, tokens: str, out: str, dtype: str = "float32", batch_size: int | None = None,
                 precision: str | None = "highest", shard: bool = True) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """The logit checker (`interop.logit_check.score_tokens`) on a model source: raw outputs on
    the token ids in `tokens` (a JSON file or inline JSON of equal-length lists), written to the
    `.npz` file `out`; returns `(scores, model config)`. The ids' shapes are checked before any
    weight is read, their range against the model's vocabulary after."""
    try:
        read_tokens(tokens)
    except TokensError as e:
        raise TokensError(f"tokens: {e}") from None
    policy = load_policy(model, dtype=dtype, param_dtype=dtype, mesh=make_mesh() if shard else None)
    try:
        ids = read_tokens(tokens, vocab_size=policy.model.vocab_size)
    except TokensError as e:
        raise TokensError(f"tokens: {e}") from None
    scores = score_tokens(policy.params, policy.model, ids, batch_size=batch_size, precision=precision)
    save_scores(out, scores)
    return scores, policy.model


def export_source(*, model: str, out: str, dtype: str = "bfloat16", max_shard_size: str | int | None = "5GB",
                  overwrite: bool = False, shard: bool = True) -> tuple[str, ModelConfig]:
    """Exports a model source as an HF directory (`interop.hf_llada.export_hf`), loading it straight
    into the export dtype (the same round-to-nearest cast the export would do); returns
    `(out, model config)`. `out` is checked before any weight is read."""
    check_export_dir(out, overwrite)
    policy = load_policy(model, dtype=dtype, param_dtype=dtype, mesh=make_mesh() if shard else None)
    export_hf(policy.params, policy.model, out, dtype=dtype, max_shard_size=max_shard_size,
              source_dir=policy.source_dir, overwrite=overwrite)
    return out, policy.model


def evaluate_source(*, model: str | None = None, config: Mapping[str, Any] | None = None,
                    tokenizer: str | None = None, dtype: str | None = None, default_dtype: str | None = "bfloat16",
                    init_seed: int = 0, task: str, task_options: Mapping[str, Any] | None = None,
                    mode: str | None = None, data: str, split: str | None = None, data_dir: str | None = None,
                    limit: int | None = None, rules: Sequence[str], sweeps: Mapping[str, Sequence[float | int]],
                    **evaluate_args) -> dict[str, Any]:
    """`evaluation.evaluate` of a model source (`load_policy`: `model` and / or `config`, `dtype`
    for compute and parameters, default `default_dtype` for `model`) on the records of `task` in
    `data` (`load_task_records`: a file, a directory with {split} files, or `tfds:NAME:SPLIT`),
    over `evaluation.rule_sweeps(rules, sweeps)`; `evaluate_args` are `evaluate`'s keywords (seeds,
    gen_length, ..., out_dir, progress). The mesh spans every device of every process.

    The rules, the model source, the task and the data are checked before any weight is read,
    the decoding settings once the model is known (`evaluation.plan_settings`), all before `out_dir` is
    created; errors start with the argument's name (`rules: ...`, `model: ...`, `data=PATH: ...`,
    `task / task_options: ...`) or a config field (`decode.gen_length=...`).
    """
    rules_and_sweeps = evaluation.rule_sweeps(rules, sweeps)
    tokenizer = resolve_source(tokenizer, "tokenizer") if tokenizer is not None else None
    if model is not None:
        model = resolve_source(model)
        check_source(model)  # fail before reading any data
    elif config is None:
        raise ConfigError("model / config: give a model directory or training workdir, or a config file")
    try:
        task_ = get_task(task, mode=mode, **dict(task_options or {}))
    except ValueError as e:
        raise ConfigError(f"task / task_options: {e}") from None
    if not data.startswith("tfds:") and "{split}" not in data and not os.path.exists(data):
        raise DataError(f"data={data}: no such file or directory")
    try:
        records = load_task_records(task_, data, split, data_dir=data_dir, limit=limit)
    except DataError as e:
        raise DataError(f"data: {e}") from None

    mesh = make_mesh()
    distributed.connect_cpu_collectives(mesh)  # multi-process CPU only: before the processes drift apart
    policy = load_policy(model, config, dtype=dtype, param_dtype=dtype,
                                      default_dtype=default_dtype if config is None else None, mesh=mesh,
                                      seed=init_seed)
    tokenizer_ = load_source_tokenizer(policy.source_dir, tokenizer,
                                                    source="model" if model is not None else "config")
    return evaluation.evaluate(policy.params, policy.model, tokenizer_, records, task_, rules_and_sweeps=rules_and_sweeps,
                    mode=mode, mesh=mesh, **evaluate_args)
