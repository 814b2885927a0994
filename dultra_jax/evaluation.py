"""Evaluation (the paper's protocol): accuracy, NFE, tokens per forward and wall tokens/s over rules,
sweeps and seeds, with the samples, a summary and an accuracy-versus-NFE Pareto plot on disk.

    params, model, source_dir = build.load_model_source("/ckpt/dUltra-8B", mesh=make_mesh(), dtype="bfloat16")
    summary = evaluate(params, model, load_tokenizer(source_dir), records, get_task("gsm8k"),
                       rules_and_sweeps={"planner_bernoulli": None, "threshold": [0.9]},
                       seeds=(42, 123, 456, 789, 1000), gen_length=256, block_length=32,
                       prompt_length=512, batch_size=32, out_dir="/tmp/eval")

A *setting* is one rule with one value of its sweep knob (`SWEEP_KEYS`: `factor` for the `factor`
and planner rules, `threshold` for `threshold`, `steps` for `low_confidence` / `random`,
`entropy_bound` for `entropy_bound`; `ass` has none). A sweep value of None means the rule's
default (threshold 0.9, factor 1.0, steps = gen_length: one token per step); the planner rules'
default sweep is the paper's factors {0.5, 0.8, 1.0, 1.2, 1.5}.

Every setting decodes every record once per seed, in fixed-shape batches (the last one padded, its
filler rows ignored); a deterministic setting (`DecodeConfig.deterministic`: greedy tokens and a
rule without random draws) ignores its key, so it is decoded for the first seed only and every
other seed repeats those results (its tokens/s counts the decoded seed). The rollout traces
factor, threshold, entropy_bound and steps, so one compile serves a rule's whole sweep over them;
one untimed warm-up batch per compile keeps compilation out of the wall time. Batch `j` of seed
`s` uses `fold_in(key(s), j)`, the same for every setting (common random numbers). Correctness is
the task's correctness reward (`training.data_setup.CORRECTNESS`: `math_correct` for math,
`code_correct` for code, `exact_match` for `exact`, `fill_correct` for the demo task) being
positive.

Outputs in `out_dir` (the summary files are rewritten after each setting, so a long run that stops
keeps the settings it finished):
  samples.jsonl  one line per record x setting x seed: index, rule, sweep_key, sweep_value, seed,
                 prompt, completion, reference, correct, nfe, non_eos_tokens
  summary.json   {"task", "mode", "num_records", "seeds", "gen_length", ..., "rows": [...]}, one row
                 per setting: `SUMMARY_COLUMNS` plus `accuracy_per_seed`
  summary.csv    the same rows, `SUMMARY_COLUMNS` only
  pareto.png     accuracy vs mean NFE, one series per rule, points labelled with their sweep value,
                 the Pareto front (no other point has both fewer NFE and higher accuracy) highlighted

Devices: params and batches are sharded over `mesh` when one is given (every device takes part).
With several processes (`jax.distributed`) a mesh is required: each process feeds its rows of
every batch and scores those rows, the tokens and verdicts are gathered to every process, every
process returns the same summary, and process 0 alone writes the files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from dultra_jax.config import PLANNER_RULES, RULES, ConfigError, DecodeConfig, ModelConfig
from dultra_jax.decoding.rollout import Trajectory, check_prompts, rollout

log = logging.getLogger(__name__)

# The DecodeConfig field each rule's sweep varies (None: the rule has no knob).
SWEEP_KEYS: dict[str, str | None] = {
    "planner_bernoulli": "factor", "planner_topk": "factor", "factor": "factor", "threshold": "threshold",
    "low_confidence": "steps", "random": "steps", "entropy_bound": "entropy_bound", "ass": None,
}
assert set(SWEEP_KEYS) == set(RULES)
DEFAULT_FACTORS = (0.5, 0.8, 1.0, 1.2, 1.5)  # the paper's sweep, planner rules
DEFAULT_SEEDS = (42, 123, 456, 789, 1000)

SAMPLE_FIELDS = ("index", "rule", "sweep_key", "sweep_value", "seed", "prompt", "completion", "reference",
                 "correct", "nfe", "non_eos_tokens")
SUMMARY_COLUMNS = ("rule", "sweep_key", "sweep_value", "accuracy", "accuracy_stderr", "accuracy_seed_std",
                   "nfe", "tpf", "tpf_non_eos", "tokens_per_s", "non_eos_tokens_per_s", "wall_s", "warmup_s",
                   "n", "seeds")
SAMPLES_FILE, SUMMARY_JSON, SUMMARY_CSV, PARETO_PNG = "samples.jsonl", "summary.json", "summary.csv", "pareto.png"


# ------------------------------------------------------------------------------------- loading




# ------------------------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class Setting:
    """One rule with one value of its sweep knob (`key`; None for rules without one)."""

    rule: str
    key: str | None
    value: float | int | None

    @property
    def label(self) -> str:
        if self.key is None:
            return self.rule
        return f"{self.rule} {self.key}=" + ("default" if self.value is None else f"{self.value:g}")

    def decode_config(self, **common) -> DecodeConfig:
        """The `DecodeConfig` of this setting; `common` holds every other field."""
        knob = {} if self.key is None or self.value is None else {self.key: self.value}
        return DecodeConfig(rule=self.rule, **common, **knob)


def effective_value(config: DecodeConfig) -> float | int | None:
    """The value the rule actually uses for its sweep knob (defaults resolved)."""
    key = SWEEP_KEYS[config.rule]
    return {None: None, "factor": config.rule_factor, "threshold": config.rule_threshold,
            "steps": config.total_steps, "entropy_bound": config.rule_entropy_bound}[key]


def sweep_settings(rules_and_sweeps: Mapping[str, Sequence | None] | Sequence) -> list[Setting]:
    """Settings in order from `{rule: values}`, `[(rule, values), ...]` or `[rule, ...]`.

    `values` None (or a bare rule name) takes the rule's default sweep: `DEFAULT_FACTORS` for the
    planner rules, the rule's default knob otherwise. A value of None is the rule's default knob.
    Raises ConfigError for an unknown rule, a value for a rule without a knob, or a repeated setting.
    """
    if isinstance(rules_and_sweeps, Mapping):
        items = list(rules_and_sweeps.items())
    else:
        items = [(r, None) if isinstance(r, str) else tuple(r) for r in rules_and_sweeps]
    if not items:
        raise ConfigError("rules_and_sweeps is empty: give at least one rule")
    settings: list[Setting] = []
    for rule, values in items:
        if rule not in RULES:
            raise ConfigError(f"unknown rule {rule!r}; use one of {', '.join(RULES)}")
        key = SWEEP_KEYS[rule]
        if values is None:
            values = DEFAULT_FACTORS if rule in PLANNER_RULES else (None,)
        elif isinstance(values, (int, float)):
            values = (values,)
        if not values:
            raise ConfigError(f"rule {rule!r}: empty sweep")
        for value in values:
            if key is None and value is not None:
                raise ConfigError(f"rule {rule!r} has no sweep knob, but got the value {value!r}")
            if value is not None:
                value = int(value) if key == "steps" else float(value)
            setting = Setting(rule, key, value)
            if setting in settings:
                raise ConfigError(f"setting {setting.label} is given twice")
            settings.append(setting)
    return settings


# ------------------------------------------------------------------------------------- metrics


def first_stop_lengths(tokens, stop_ids: Sequence[int]) -> np.ndarray:
    """`[N]` number of tokens before the first of `stop_ids` in each row of `tokens [N, Lg]`
    (`Lg` when a row has none): its non-EOS tokens."""
    tokens = np.asarray(tokens)
    is_stop = np.isin(tokens, np.asarray(list(stop_ids), dtype=tokens.dtype))
    return np.where(is_stop.any(axis=-1), is_stop.argmax(axis=-1), tokens.shape[-1]).astype(np.int64)


def row_metrics(trajectory: Trajectory, stop_ids: Sequence[int], row_valid=None) -> dict[str, np.ndarray]:
    """Per valid row of a trajectory: `nfe`, `generated` (= Lg) and `non_eos` tokens, `[n]` int64."""
    tokens = np.asarray(trajectory.tokens)
    nfe = np.asarray(trajectory.num_steps).astype(np.int64)
    keep = np.ones(tokens.shape[0], bool) if row_valid is None else np.asarray(row_valid, bool)
    return {"nfe": nfe[keep], "generated": np.full(int(keep.sum()), tokens.shape[1], np.int64),
            "non_eos": first_stop_lengths(tokens[keep], stop_ids)}


def accuracy_stats(correct) -> dict[str, Any]:
    """Accuracy (percent) of `correct [S, N]` (seeds x records) and its uncertainty.

    Returns:
      accuracy: mean over records and seeds.
      accuracy_stderr: the standard error over records of the seed-averaged correctness,
        `std_i(mean_s correct[s, i], ddof=1) / sqrt(N)` (None when N < 2): the uncertainty from
        the finite set of records, as lm-eval-harness reports it.
      accuracy_seed_std: the standard deviation (ddof=1) of the per-seed accuracies (None with
        one seed): the decoding randomness.
      accuracy_per_seed: `[S]` accuracies.
    """
    correct = np.atleast_2d(np.asarray(correct, np.float64))
    seeds, n = correct.shape
    per_record = correct.mean(axis=0)
    per_seed = 100.0 * correct.mean(axis=1)
    return {"accuracy": 100.0 * float(correct.mean()),
            "accuracy_stderr": 100.0 * float(per_record.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
            "accuracy_seed_std": float(per_seed.std(ddof=1)) if seeds > 1 else None,
            "accuracy_per_seed": [float(a) for a in per_seed]}


def summarize_setting(setting: Setting, correct, nfe, non_eos, gen_length: int, wall_s: float,
                      warmup_s: float = 0.0, timed_seeds: int | None = None) -> dict[str, Any]:
    """One summary row from `[S, N]` arrays of correctness, NFE and non-EOS tokens.

    `nfe` is the mean NFE per row; `tpf` = generated tokens / NFE and `tpf_non_eos` = non-EOS
    tokens / NFE, both as ratios of totals over records and seeds; `tokens_per_s` (and
    `non_eos_tokens_per_s`) are the tokens of the first `timed_seeds` seeds (default all: the
    seeds that were decoded) over `wall_s`, their decoding seconds (compilation excluded).
    """
    nfe = np.asarray(nfe, np.float64)
    non_eos = np.asarray(non_eos, np.float64)
    generated = float(gen_length) * nfe.size
    total_nfe = max(float(nfe.sum()), 1.0)
    timed = slice(0, timed_seeds)
    timed_generated = float(gen_length) * np.atleast_2d(nfe)[timed].size
    timed_non_eos = float(np.atleast_2d(non_eos)[timed].sum())
    row = {"rule": setting.rule, "sweep_key": setting.key, "sweep_value": setting.value,
           **accuracy_stats(correct),
           "nfe": float(nfe.mean()), "tpf": generated / total_nfe, "tpf_non_eos": float(non_eos.sum()) / total_nfe,
           "tokens_per_s": timed_generated / wall_s if wall_s > 0 else None,
           "non_eos_tokens_per_s": timed_non_eos / wall_s if wall_s > 0 else None,
           "wall_s": float(wall_s), "warmup_s": float(warmup_s),
           "n": int(np.atleast_2d(nfe).shape[1]), "seeds": int(np.atleast_2d(nfe).shape[0])}
    return row


def pareto_front(nfe: Sequence[float], accuracy: Sequence[float]) -> np.ndarray:
    """`[K]` bool: the points no other point dominates (NFE <= and accuracy >=, one of them strictly)."""
    x, y = np.asarray(nfe, np.float64), np.asarray(accuracy, np.float64)
    dominated = ((x[None, :] <= x[:, None]) & (y[None, :] >= y[:, None])
                 & ((x[None, :] < x[:, None]) | (y[None, :] > y[:, None])))
    return ~dominated.any(axis=1)


# ------------------------------------------------------------------------------------- outputs


def write_summary_csv(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in SUMMARY_COLUMNS})


def plot_pareto(rows: Sequence[Mapping[str, Any]], path: str, title: str | None = None,
                highlight: Sequence[Mapping[str, Any]] = (), log_nfe: bool | None = None) -> None:
    """Accuracy (with standard-error bars) vs mean NFE as a PNG (matplotlib, Agg, no pyplot state).

    `rows` are drawn as one curve per `rule` (each point labelled with its `sweep_value`; dashed
    when its rows say `"dashed": True`), `highlight` as large labelled markers (named by their
    `rule`); the Pareto front over both is a dotted black line through circled points. `log_nfe`:
    a logarithmic NFE axis (None: when the NFE span 10x).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator

    fig = Figure(figsize=(9.5, 5.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for rule in dict.fromkeys(r["rule"] for r in rows):
        series = sorted((r for r in rows if r["rule"] == rule), key=lambda r: r["nfe"])
        x = [r["nfe"] for r in series]
        y = [r["accuracy"] for r in series]
        err = [r["accuracy_stderr"] or 0.0 for r in series]
        ax.errorbar(x, y, yerr=err, marker="o", markersize=4, capsize=2, linewidth=1.2, label=rule,
                    linestyle="--" if series[0].get("dashed") else "-")
        for r in series:
            if r["sweep_value"] is not None:
                ax.annotate(f"{r['sweep_value']:g}", (r["nfe"], r["accuracy"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    markers = "*Ds^vP"
    for i, r in enumerate(highlight):
        ax.errorbar([r["nfe"]], [r["accuracy"]], yerr=[r["accuracy_stderr"] or 0.0],
                    marker=markers[i % len(markers)], markersize=11, capsize=3, linestyle="none", zorder=4,
                    label=r["rule"])
    every = [*rows, *highlight]
    if every:
        front = pareto_front([r["nfe"] for r in every], [r["accuracy"] for r in every])
        points = sorted((r["nfe"], r["accuracy"]) for r, keep in zip(every, front) if keep)
        ax.plot([p[0] for p in points], [p[1] for p in points], linestyle=":", color="black", linewidth=1,
                zorder=1)
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=160, facecolors="none", edgecolors="black",
                   linewidths=1.5, zorder=3, label="Pareto front")
        nfes = [r["nfe"] for r in every if r["nfe"] > 0]
        if log_nfe is None:  # e.g. one-token-per-step baselines beside the planner
            log_nfe = bool(nfes) and max(nfes) > 10 * min(nfes)
        if log_nfe and nfes:
            ax.set_xscale("log")
            ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0, 7.0)))
            plain = FuncFormatter(lambda v, _: f"{v:g}")
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("mean NFE (forward passes per sample)" + (", log scale" if log_nfe else ""))
    ax.set_ylabel("accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="png")


def json_ready(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_outputs(summary: Mapping[str, Any], out_dir: str, plot: bool = True) -> dict[str, str]:
    """Writes summary.json, summary.csv and (with `plot`) pareto.png; returns their paths."""
    paths = {"summary_json": os.path.join(out_dir, SUMMARY_JSON), "summary_csv": os.path.join(out_dir, SUMMARY_CSV)}
    with open(paths["summary_json"], "w") as f:
        json.dump(json_ready(dict(summary)), f, indent=2, allow_nan=False)
    write_summary_csv(summary["rows"], paths["summary_csv"])
    if plot:
        paths["pareto_png"] = os.path.join(out_dir, PARETO_PNG)
        plot_pareto(summary["rows"], paths["pareto_png"],
                    title=f"{summary.get('task')}: gen {summary.get('gen_length')}, block "
                          f"{summary.get('block_length')}, {len(summary.get('seeds', ()))} seed(s)")
    return paths


# ------------------------------------------------------------------------------------ evaluate


def _gather_rows(trajectory: Trajectory, mesh) -> Trajectory:
    """The whole batch's `tokens` and `num_steps` on every process, in global row order, from a
    rollout whose rows are sharded over several processes (what scoring reads)."""
    from dultra_jax.training.grpo_trainer import all_rows, local_rows

    rows = all_rows(local_rows({"tokens": trajectory.tokens, "num_steps": trajectory.num_steps}, mesh), mesh)
    return trajectory.replace(**rows)


def _correctness_part(task) -> str:
    from dultra_jax.training.data_setup import CORRECTNESS
    try:
        return CORRECTNESS[task.kind]
    except KeyError:
        raise ConfigError(f"task {task.name!r} of kind {task.kind!r} has no correctness reward; known kinds: "
                          f"{', '.join(CORRECTNESS)}") from None


def score_completions(task, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], nfe,
                      reward_options: Mapping[str, Mapping] | None = None) -> np.ndarray:
    """`[n]` bool: the task's correctness reward (weight 1) is positive for each completion."""
    from dultra_jax import rewards as reward_lib
    part = _correctness_part(task)
    inputs = reward_lib.RewardInputs(completions=list(completions), examples=[dict(e) for e in examples],
                                     num_steps=np.asarray(nfe))
    options = {k: v for k, v in (reward_options or {}).items() if k == part}
    _, parts = reward_lib.compute_rewards(inputs, {part: 1.0}, options)
    values = parts[part]
    return np.where(np.isnan(values), False, values > 0)


def _score_own_rows(task, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], nfe, rows: np.ndarray,
                    mine: slice, mesh, reward_options: Mapping[str, Mapping] | None) -> np.ndarray:
    """`score_completions` of a batch's valid `rows` (`[n]` indices into the batch, with their
    `completions`, `examples` and `nfe`) shared between processes: each scores the rows it fed
    (`mine`; a single process feeds them all) and the verdicts are gathered in row order, so a
    code task runs each completion's tests once, not once per process. With several processes
    every one must call it (a collective). Returns `[n]` bool."""
    from dultra_jax.training.grpo_trainer import all_rows

    own = np.flatnonzero((rows >= mine.start) & (rows < mine.stop))
    verdicts = np.zeros(mine.stop - mine.start, bool)
    if own.size:
        verdicts[rows[own] - mine.start] = score_completions(
            task, [completions[r] for r in own], [examples[r] for r in own], np.asarray(nfe)[own], reward_options)
    return all_rows(verdicts, mesh)[rows]


def evaluate(params, model: ModelConfig, tokenizer, records: Sequence[Mapping[str, Any]], task, *,
             rules_and_sweeps, seeds: Sequence[int] = DEFAULT_SEEDS, gen_length: int = 256,
             block_length: int = 32, prompt_length: int = 512, batch_size: int = 8, temperature: float = 0.0,
             out_dir: str, progress: bool = True, mode: str | None = None, max_steps: int | None = None,
             decode_overrides: Mapping[str, Any] | None = None, mesh=None, stop_ids: Sequence[int] | None = None,
             reward_options: Mapping[str, Mapping] | None = None, plot: bool = True) -> dict[str, Any]:
    """Decodes `records` under every setting and seed, scores them and writes the outputs.

    Args:
      params, model: the policy (`load_model_source` / `build_model`); params may be sharded.
      tokenizer: the HF tokenizer (None when the records carry `prompt_ids`; completions are then
        space-separated ids).
      records, task: the records the task uses (`load_task_records`) and the `data.tasks.Task`.
      rules_and_sweeps: `{rule: values or None}`, see `sweep_settings`.
      seeds: decoding seeds; every setting runs every seed over every record.
      gen_length, block_length, prompt_length, temperature, max_steps: the `DecodeConfig` fields
        shared by all settings; `decode_overrides` sets any other field (e.g. `{"eoser": True}`).
      batch_size: rows per rollout (fixed; divisible by the mesh's ('data', 'fsdp') when `mesh`).
      out_dir: where the outputs go (created; existing outputs are replaced).
      progress: a tqdm progress bar on stderr (one tick per batch).
      mode: the prompt mode (None: the task's).
      mesh: batches are sharded over ('data', 'fsdp') of this mesh (None: default placement).
        Needed with several processes: each feeds its devices' rows and scores them, every
        process gets the whole batch's tokens and verdicts back and returns the same summary, and
        process 0 alone writes the files.
      stop_ids: ids that end a completion (default: the tokenizer's EOS / end-of-turn ids plus the
        model's EOS and EOT ids).
      reward_options: options of the correctness reward, e.g. `{"code_correct": {"timeout_s": 5}}`.
      plot: write pareto.png.
    Returns:
      The summary (what summary.json holds): run metadata and `rows`, one per setting with
      `SUMMARY_COLUMNS` (accuracy and its standard error in percent, see `accuracy_stats`; `nfe`
      the mean NFE; `tpf`, `tpf_non_eos`, `tokens_per_s`, see `summarize_setting`) and
      `accuracy_per_seed`; `files` maps each output to its path.
    Raises:
      ConfigError for an unknown rule, a bad decoding setting or batch size, and a task without a
      correctness reward; DataError for records the task or tokenizer cannot use.
    """
    from tqdm.auto import tqdm

    from dultra_jax.data.pipeline import make_eval_batches
    from dultra_jax.data.tokenizer import decode_completion, stop_token_ids

    multi_process = jax.process_count() > 1
    if multi_process and mesh is None:
        raise ConfigError(f"evaluate on {jax.process_count()} processes needs `mesh`: each process feeds its "
                          "devices' rows of every batch")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={seeds}: give one or more distinct seeds")
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be positive")
    settings = sweep_settings(rules_and_sweeps)
    overrides = dict(decode_overrides or {})
    reserved = {"rule", "prompt_length", "gen_length", "block_length", "temperature", "max_steps",
                *(k for k in SWEEP_KEYS.values() if k)}
    if reserved & set(overrides):
        raise ConfigError(f"decode_overrides: {sorted(reserved & set(overrides))} are set by evaluate's own "
                          "arguments and the sweeps")
    common = dict(prompt_length=prompt_length, gen_length=gen_length, block_length=block_length,
                  temperature=temperature, max_steps=max_steps, eos_token_id=model.eos_token_id)
    common.update(overrides)
    decodes = [s.decode_config(**common) for s in settings]
    for decode in decodes:
        decode.check_model(model)
    # Resolve default knobs so every row and sample names the value actually used.
    settings = [dataclasses.replace(s, value=effective_value(d)) for s, d in zip(settings, decodes)]
    if len(set(settings)) != len(settings):
        raise ConfigError(f"a setting is given twice once defaults are resolved: {[s.label for s in settings]}")
    _correctness_part(task)
    if mesh is not None:
        from dultra_jax.sharding import check_batch
        check_batch("batch_size", batch_size, mesh)
    if stop_ids is None:
        extra = (model.eos_token_id,) + ((model.eot_token_id,) if model.eot_token_id is not None else ())
        stop_ids = stop_token_ids(tokenizer, extra=extra)
    stop_ids = tuple(int(i) for i in stop_ids)

    # Encode once; every setting and seed reuses the device batches.
    batches = list(make_eval_batches(records, task, tokenizer, prompt_length=prompt_length, batch_size=batch_size,
                                     mode=mode, pad_id=model.pad_token_id))
    sharding, mine = None, slice(0, batch_size)
    if mesh is not None:
        from dultra_jax.sharding import batch_sharding, process_row_range
        sharding = batch_sharding(mesh)
        mine = process_row_range(mesh, batch_size)
    device_batches = []
    for batch in batches:
        tokens, valid = check_prompts(batch["prompt_tokens"], batch["prompt_valid"], model, decodes[0])
        if multi_process:  # every process encodes every batch and feeds its own rows
            from dultra_jax.training.grpo_trainer import global_rows
            device_batches.append(tuple(global_rows(np.asarray(x)[mine], mesh) for x in (tokens, valid)))
        else:
            device_batches.append((jax.device_put(tokens, sharding), jax.device_put(valid, sharding)))
    field_keys = [k for k in batches[0] if batches[0][k].dtype == object
                  and k not in ("prompt_text", "prompt_messages")]
    num_records = sum(int(np.sum(b["row_valid"])) for b in batches)
    references = {}
    for batch in batches:
        for i in np.flatnonzero(batch["row_valid"]):
            index = int(batch["index"][i])
            references[index] = task.reference(records[index])

    # With several processes the rollout's rows are gathered to every process, each scores the rows
    # it fed, and the verdicts are gathered too; process 0 alone writes.
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    summary: dict[str, Any] = {
        "task": task.name, "mode": mode or task.mode, "num_records": num_records, "seeds": seeds,
        "gen_length": gen_length, "block_length": block_length, "prompt_length": prompt_length,
        "batch_size": batch_size, "temperature": temperature, "max_steps": max_steps,
        "decode_overrides": dict(decode_overrides or {}), "stop_ids": list(stop_ids),
        "correctness_reward": _correctness_part(task),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "rows": []}
    samples_path = os.path.join(out_dir, SAMPLES_FILE)
    log.info("evaluating %s on %d records: %d setting(s) x %d seed(s), %d batch(es) of %d", task.name, num_records,
             len(settings), len(seeds), len(batches), batch_size)
    bar = tqdm(total=len(settings) * len(seeds) * len(batches), disable=not (progress and writer), file=sys.stderr,
               unit="batch", dynamic_ncols=True)
    files: dict[str, str] = {"samples": samples_path}
    try:
        with open(samples_path if writer else os.devnull, "w") as samples_file:
            compiled = set()  # the rollouts' static configs (`DecodeConfig.without_knobs`) warmed up
            for setting, decode in zip(settings, decodes):
                bar.set_description(setting.label)
                warmup_s = 0.0
                if decode.without_knobs() not in compiled:  # warm-up: compiles the rollout (untimed)
                    start = time.perf_counter()
                    tokens0, valid0 = device_batches[0]
                    warmup_key = jax.random.fold_in(jax.random.key(seeds[0]), 0)
                    jax.block_until_ready(rollout(params, tokens0, valid0, warmup_key, decode, model))
                    warmup_s = time.perf_counter() - start
                    compiled.add(decode.without_knobs())
                correct, nfe, non_eos, wall_s = [], [], [], 0.0
                decoded_seeds = 1 if decode.deterministic else len(seeds)
                for seed in seeds[:decoded_seeds]:
                    seed_correct, seed_nfe, seed_non_eos, seed_samples = [], [], [], []
                    keys = [jax.random.fold_in(jax.random.key(seed), j) for j in range(len(batches))]
                    for batch, (tokens, valid), rng in zip(batches, device_batches, keys):
                        start = time.perf_counter()
                        trajectory = jax.block_until_ready(rollout(params, tokens, valid, rng, decode, model))
                        wall_s += time.perf_counter() - start
                        if multi_process:
                            trajectory = _gather_rows(trajectory, mesh)
                        rows = np.flatnonzero(batch["row_valid"])
                        metrics = row_metrics(trajectory, stop_ids, batch["row_valid"])
                        out_tokens = np.asarray(trajectory.tokens)[rows]
                        completions = [decode_completion(tokenizer, t, stop_ids) for t in out_tokens]
                        examples = [{k: batch[k][i] for k in field_keys} for i in rows]
                        ok = _score_own_rows(task, completions, examples, metrics["nfe"], rows, mine, mesh,
                                             reward_options)
                        for r, i in enumerate(rows):
                            index = int(batch["index"][i])
                            sample = {"index": index, "rule": setting.rule, "sweep_key": setting.key,
                                      "sweep_value": setting.value, "seed": seed,
                                      "prompt": str(batch["prompt_text"][i]), "completion": completions[r],
                                      "reference": references[index], "correct": bool(ok[r]),
                                      "nfe": int(metrics["nfe"][r]), "non_eos_tokens": int(metrics["non_eos"][r])}
                            samples_file.write(json.dumps(sample, ensure_ascii=False) + "\n")
                            seed_samples.append(sample)
                        samples_file.flush()
                        seed_correct.append(ok)
                        seed_nfe.append(metrics["nfe"])
                        seed_non_eos.append(metrics["non_eos"])
                        bar.update(1)
                    correct.append(np.concatenate(seed_correct))
                    nfe.append(np.concatenate(seed_nfe))
                    non_eos.append(np.concatenate(seed_non_eos))
                    bar.set_postfix(acc=f"{100 * np.mean(correct):.1f}", nfe=f"{np.mean(nfe):.1f}")
                for seed in seeds[decoded_seeds:]:  # the key is unused: every seed decodes these tokens
                    correct.append(correct[0])
                    nfe.append(nfe[0])
                    non_eos.append(non_eos[0])
                    for sample in seed_samples:
                        samples_file.write(json.dumps({**sample, "seed": seed}, ensure_ascii=False) + "\n")
                    bar.update(len(batches))
                row = summarize_setting(setting, np.stack(correct), np.stack(nfe), np.stack(non_eos), gen_length,
                                        wall_s, warmup_s, timed_seeds=decoded_seeds)
                summary["rows"].append(row)
                if writer:
                    files.update(write_outputs(summary, out_dir, plot=plot))
                stderr = row["accuracy_stderr"]
                log.info("%s: accuracy %.2f%% (stderr %s) NFE %.2f TPF %.2f (non-EOS %.2f) %.1f tokens/s "
                         "(warm-up %.1fs)", setting.label, row["accuracy"],
                         "n/a" if stderr is None else f"{stderr:.2f}", row["nfe"], row["tpf"], row["tpf_non_eos"],
                         row["tokens_per_s"] or 0.0, warmup_s)
    finally:
        bar.close()
    summary["files"] = files
    return summary
