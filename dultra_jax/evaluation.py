"""Evaluation (the paper's protocol): accuracy, NFE, tokens per forward and wall tokens/s over rules,
sweeps and seeds, with the samples, a summary and an accuracy-versus-NFE Pareto plot on disk.

    params, model, source_dir = restore.load_model_source("/ckpt/dUltra-8B", mesh=make_mesh(), dtype="bfloat16")
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
`s` uses `fold_in(key(s), j)`, the same for every setting (common random numbers).

Scoring (`scoring`): `official` (the default for gsm8k, math500, humaneval and mbpp) extracts and
compares answers as the official dUltra evaluation does (`rewards.official`: GSM8K's boxed / `####`
/ `<answer>` / last-number chain compared as floats, MATH-500's box with math-verify then
`is_equiv`, HumanEval's first python block sanitised, MBPP's first python block, run in the
sandbox); `strict` (every other task) is the task's correctness reward (`data.tasks.CORRECTNESS`:
`math_correct` for math, `code_correct` for code, `exact_match` for `exact`, `fill_correct` for the
demo task) being positive. Each sample records what was extracted and by which rule.

Speed: `tokens_per_s` is the batched throughput; the paper reports speed per sample at batch 1,
which `speed_records` adds (`time_per_sample`: that many records decoded one at a time, per
setting) as the `sample_*` columns, tokens/s and TPF over all generated tokens and over the
effective ones (before the first stop id, without padding, mask or special ids).

Outputs in `out_dir` (the summary files are rewritten after each setting, so a long run that stops
keeps the settings it finished):
  samples.jsonl  one line per record x setting x seed: index, rule, sweep_key, sweep_value, seed,
                 prompt, completion, reference, correct, scoring, extracted, extracted_by, nfe,
                 non_eos_tokens, effective_tokens
  summary.json   {"task", "mode", "num_records", "seeds", "gen_length", ..., "rows": [...]}, one row
                 per setting: `SUMMARY_COLUMNS` plus `accuracy_per_seed`
  summary.csv    the same rows, `SUMMARY_COLUMNS` only
  pareto.png     accuracy vs mean NFE, one series per rule, points labelled with their sweep value,
                 the Pareto front (no other point has both fewer NFE and higher accuracy) highlighted

Devices: params and batches are sharded over `mesh` when one is given (every device takes part).
With several processes (`jax.distributed`) a mesh is required: each process feeds its rows of
every batch and scores those rows, the tokens and verdicts are gathered to every process, every
process returns the same summary, and process 0 alone writes the files.

`evaluate` in pieces: `plan_settings` (the arguments checked, the settings resolved),
`prepare_batches` (records encoded and placed once), `decode_setting` (warm-up, decoding and
`score_batch` for one setting over the seeds) and `write_outputs`. `model_source.evaluate_source` is
`launch/evaluate.py`'s one call (a model source, a task and its data file, per-knob sweeps), and
`summary_table` its printout, through `format_table`, the one table.
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
from dultra_jax.data.tasks import CORRECTNESS
from dultra_jax.decoding.rollout import Trajectory, check_prompts, rollout
from dultra_jax.rewards import official as official_scoring
from dultra_jax.sharding import all_rows, batch_sharding, check_batch, global_rows, local_rows, process_row_range

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
                 "correct", "scoring", "extracted", "extracted_by", "nfe", "non_eos_tokens", "effective_tokens")
# The per-sample speed columns (`time_per_sample`): batch 1, as the paper reports speed.
SAMPLE_SPEED_COLUMNS = ("sample_tokens_per_s", "sample_effective_tokens_per_s", "sample_tpf", "sample_tpf_effective",
                        "sample_s", "sample_n")
SUMMARY_COLUMNS = ("rule", "sweep_key", "sweep_value", "accuracy", "accuracy_stderr", "accuracy_seed_std",
                   "nfe", "tpf", "tpf_non_eos", "tpf_effective", "tokens_per_s", "non_eos_tokens_per_s", "wall_s",
                   "warmup_s", "n", "seeds") + SAMPLE_SPEED_COLUMNS
SAMPLES_FILE, SUMMARY_JSON, SUMMARY_CSV, PARETO_PNG = "samples.jsonl", "summary.json", "summary.csv", "pareto.png"


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


def effective_lengths(tokens, stop_ids: Sequence[int], special_ids: Sequence[int] = ()) -> np.ndarray:
    """`[N]` effective tokens of each row of `tokens [N, Lg]`: those before the first of `stop_ids`
    that are none of `special_ids` (padding, mask, the tokenizer's special tokens), the count the
    official evaluation reports per sample."""
    tokens = np.asarray(tokens)
    before_stop = np.arange(tokens.shape[-1])[None, :] < first_stop_lengths(tokens, stop_ids)[:, None]
    special = np.isin(tokens, np.asarray(list(special_ids), dtype=tokens.dtype))
    return (before_stop & ~special).sum(axis=-1).astype(np.int64)


def row_metrics(trajectory: Trajectory, stop_ids: Sequence[int], row_valid=None,
                special_ids: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Per valid row of a trajectory, `[n]` int64: `nfe`, `generated` (= Lg), `non_eos` tokens
    (before the first stop id) and `effective` tokens (`effective_lengths`)."""
    tokens = np.asarray(trajectory.tokens)
    nfe = np.asarray(trajectory.num_steps).astype(np.int64)
    keep = np.ones(tokens.shape[0], bool) if row_valid is None else np.asarray(row_valid, bool)
    return {"nfe": nfe[keep], "generated": np.full(int(keep.sum()), tokens.shape[1], np.int64),
            "non_eos": first_stop_lengths(tokens[keep], stop_ids),
            "effective": effective_lengths(tokens[keep], stop_ids, special_ids)}


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
                      warmup_s: float = 0.0, timed_seeds: int | None = None, effective=None,
                      sample_speed: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """One summary row from `[S, N]` arrays of correctness, NFE, non-EOS and effective tokens
    (`effective`, default the non-EOS ones).

    `nfe` is the mean NFE per row; `tpf` = generated tokens / NFE, `tpf_non_eos` = non-EOS tokens /
    NFE and `tpf_effective` = effective tokens / NFE, as ratios of totals over records and seeds;
    `tokens_per_s` (and `non_eos_tokens_per_s`) are the tokens of the first `timed_seeds` seeds
    (default all: the seeds that were decoded) over `wall_s`, their decoding seconds (compilation
    excluded), at the evaluation's batch size. `sample_speed` (`time_per_sample`) fills the
    per-sample, batch-1 columns `SAMPLE_SPEED_COLUMNS` (None without it).
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
           "tpf_effective": float(np.sum(non_eos if effective is None else effective)) / total_nfe,
           "tokens_per_s": timed_generated / wall_s if wall_s > 0 else None,
           "non_eos_tokens_per_s": timed_non_eos / wall_s if wall_s > 0 else None,
           "wall_s": float(wall_s), "warmup_s": float(warmup_s),
           "n": int(np.atleast_2d(nfe).shape[1]), "seeds": int(np.atleast_2d(nfe).shape[0]),
           **{k: (sample_speed or {}).get(k) for k in SAMPLE_SPEED_COLUMNS}}
    return row


def sample_speed(nfe, generated, effective, seconds) -> dict[str, Any]:
    """The per-sample speed columns (`SAMPLE_SPEED_COLUMNS`) from `[n]` arrays of rows decoded one
    at a time: NFE, generated tokens, effective tokens and decoding seconds per row. As the
    official evaluation reports them: tokens/s = total tokens / total seconds (all generated
    tokens, and effective ones), TPF = total tokens / total NFE, `sample_s` the mean seconds per
    sample, `sample_n` the rows timed."""
    nfe, generated, effective, seconds = (np.asarray(x, np.float64) for x in (nfe, generated, effective, seconds))
    total_s, total_nfe = float(seconds.sum()), max(float(nfe.sum()), 1.0)
    return {"sample_tokens_per_s": float(generated.sum()) / total_s if total_s > 0 else None,
            "sample_effective_tokens_per_s": float(effective.sum()) / total_s if total_s > 0 else None,
            "sample_tpf": float(generated.sum()) / total_nfe,
            "sample_tpf_effective": float(effective.sum()) / total_nfe,
            "sample_s": total_s / max(seconds.size, 1), "sample_n": int(seconds.size)}


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
    rows = all_rows(local_rows({"tokens": trajectory.tokens, "num_steps": trajectory.num_steps}, mesh), mesh)
    return trajectory.replace(**rows)


def _correctness_part(task) -> str:
    if task.correctness_part is None:
        raise ConfigError(f"task {task.name!r} of kind {task.kind!r} has no correctness reward; known kinds: "
                          f"{', '.join(CORRECTNESS)}")
    return task.correctness_part


def resolve_scoring(task, scoring: str | None) -> str:
    """The scoring of `task`: `scoring`, or (None) `official` for the benchmarks the paper reports
    (gsm8k, math500, humaneval, mbpp) and `strict` for the others. ConfigError `scoring=...` for an
    unknown name or `official` on another task."""
    if scoring is None:
        return official_scoring.default_scoring(task.name)
    try:
        return official_scoring.check_scoring(scoring, task.name)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def extract_answers(task, completions: Sequence[str], examples: Sequence[Mapping[str, Any]],
                    scoring: str = "strict") -> list[official_scoring.Extraction]:
    """What `scoring` reads from each completion (the answer or program, and the rule that found
    it; see `rewards.official`): cheap, so every process extracts every row."""
    if scoring == "official":
        return [official_scoring.official_extract(task.name, c, e) for c, e in zip(completions, examples)]
    return [official_scoring.strict_extract(task.kind, c, e) for c, e in zip(completions, examples)]


def score_completions(task, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], nfe,
                      reward_options: Mapping[str, Mapping] | None = None, scoring: str = "strict",
                      extractions: Sequence[official_scoring.Extraction] | None = None) -> np.ndarray:
    """`[n]` bool for each completion. `strict`: the task's correctness reward (weight 1) is
    positive; `official`: the official verdict on `extractions` (default: `extract_answers`), with
    the correctness reward's `timeout_s` and `max_workers` options."""
    from dultra_jax import rewards as reward_lib
    part = _correctness_part(task)
    if scoring == "official":
        if extractions is None:
            extractions = extract_answers(task, completions, examples, scoring)
        options = dict((reward_options or {}).get(part, {}))
        options = {k: options[k] for k in ("timeout_s", "max_workers") if k in options}
        return np.asarray(official_scoring.official_correct(task.name, extractions, examples, **options), bool)
    inputs = reward_lib.RewardInputs(completions=list(completions), examples=[dict(e) for e in examples],
                                     num_steps=np.asarray(nfe))
    options = {k: v for k, v in (reward_options or {}).items() if k == part}
    _, parts = reward_lib.compute_rewards(inputs, {part: 1.0}, options)
    values = parts[part]
    return np.where(np.isnan(values), False, values > 0)


def _score_own_rows(task, completions: Sequence[str], examples: Sequence[Mapping[str, Any]], nfe, rows: np.ndarray,
                    mine: slice, mesh, reward_options: Mapping[str, Mapping] | None, scoring: str = "strict",
                    extractions: Sequence[official_scoring.Extraction] | None = None) -> np.ndarray:
    """`score_completions` of a batch's valid `rows` (`[n]` indices into the batch, with their
    `completions`, `examples` and `nfe`) shared between processes: each scores the rows it fed
    (`mine`; a single process feeds them all) and the verdicts are gathered in row order, so a
    code task runs each completion's tests once, not once per process. With several processes
    every one must call it (a collective). Returns `[n]` bool."""
    own = np.flatnonzero((rows >= mine.start) & (rows < mine.stop))
    verdicts = np.zeros(mine.stop - mine.start, bool)
    if own.size:
        kwargs = {} if scoring == "strict" else {"scoring": scoring,
                                                 "extractions": [extractions[r] for r in own] if extractions else None}
        verdicts[rows[own] - mine.start] = score_completions(
            task, [completions[r] for r in own], [examples[r] for r in own], np.asarray(nfe)[own], reward_options,
            **kwargs)
    return all_rows(verdicts, mesh)[rows]


@dataclasses.dataclass
class EvalBatches:
    """The records encoded once, as every setting and seed decodes them.

    Attributes:
      host: `make_eval_batches`' batches (every row of each batch, on every process).
      device: per batch `(prompt_tokens, prompt_valid)` placed for the rollout: sharded over the
        mesh's batch axes (with several processes, each feeds its own rows).
      mine: the rows of each batch this process feeds (and scores).
      field_keys: the record fields the correctness reward reads.
      references: the task's reference answer of each record, by record index.
      num_records: records evaluated (the batches' valid rows).
    """

    host: list[dict[str, np.ndarray]]
    device: list[tuple[jax.Array, jax.Array]]
    mine: slice
    field_keys: list[str]
    references: dict[int, Any]
    num_records: int


def plan_settings(model: ModelConfig, task, rules_and_sweeps, *, seeds: Sequence[int], batch_size: int,
                  common: Mapping[str, Any], decode_overrides: Mapping[str, Any] | None = None,
                  mesh=None) -> tuple[list[Setting], list[DecodeConfig]]:
    """Checks `evaluate`'s arguments and returns its settings (default knobs resolved, so every
    row and sample names the value used) with their `DecodeConfig`s; `common` holds the decode
    fields every setting shares. ConfigError for a bad argument (see `evaluate`)."""
    if jax.process_count() > 1 and mesh is None:
        raise ConfigError(f"evaluate on {jax.process_count()} processes needs `mesh`: each process feeds its "
                          "devices' rows of every batch")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={list(seeds)}: give one or more distinct seeds")
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be positive")
    settings = sweep_settings(rules_and_sweeps)
    overrides = dict(decode_overrides or {})
    reserved = {"rule", *common, *(k for k in SWEEP_KEYS.values() if k)} - {"eos_token_id"}
    if reserved & set(overrides):
        raise ConfigError(f"decode_overrides: {sorted(reserved & set(overrides))} are set by evaluate's own "
                          "arguments and the sweeps")
    decodes = [s.decode_config(**{**common, **overrides}) for s in settings]
    for decode in decodes:
        decode.check_model(model)
    settings = [dataclasses.replace(s, value=effective_value(d)) for s, d in zip(settings, decodes)]
    if len(set(settings)) != len(settings):
        raise ConfigError(f"a setting is given twice once defaults are resolved: {[s.label for s in settings]}")
    _correctness_part(task)
    if mesh is not None:
        check_batch("batch_size", batch_size, mesh)
    return settings, decodes


def prepare_batches(records: Sequence[Mapping[str, Any]], task, tokenizer, model: ModelConfig,
                    decode: DecodeConfig, *, batch_size: int, mode: str | None = None, mesh=None,
                    replicate: bool = False) -> EvalBatches:
    """Encodes `records` into fixed-shape batches once and places their prompts on the devices
    (`mesh`'s batch sharding, or every device holds the whole batch with `replicate`, for a batch
    smaller than the mesh; with several processes each process feeds its own rows)."""
    from dultra_jax.data.pipeline import make_eval_batches  # grain: only evaluation needs it

    host = list(make_eval_batches(records, task, tokenizer, prompt_length=decode.prompt_length,
                                  batch_size=batch_size, mode=mode, pad_id=model.pad_token_id))
    if mesh is None:
        sharding = None
    elif replicate:
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    else:
        sharding = batch_sharding(mesh)
    mine = slice(0, batch_size) if mesh is None or replicate else process_row_range(mesh, batch_size)
    device = []
    for batch in host:
        tokens, valid = check_prompts(batch["prompt_tokens"], batch["prompt_valid"], model, decode)
        if jax.process_count() > 1:  # every process encodes every batch and feeds its own rows
            device.append(tuple(global_rows(np.asarray(x)[mine], mesh) for x in (tokens, valid)))
        else:
            device.append((jax.device_put(tokens, sharding), jax.device_put(valid, sharding)))
    field_keys = [k for k in host[0] if host[0][k].dtype == object and k not in ("prompt_text", "prompt_messages")]
    references = {int(batch["index"][i]): task.reference(records[int(batch["index"][i])])
                  for batch in host for i in np.flatnonzero(batch["row_valid"])}
    return EvalBatches(host=host, device=device, mine=mine, field_keys=field_keys, references=references,
                       num_records=sum(int(np.sum(b["row_valid"])) for b in host))


def _decode_batch(params, model: ModelConfig, decode: DecodeConfig, tokens, valid, rng, mesh):
    """One timed rollout of a placed batch: `(trajectory, seconds)`; with several processes the
    tokens and step counts of every row are gathered to every process."""
    start = time.perf_counter()
    trajectory = jax.block_until_ready(rollout(params, tokens, valid, rng, decode, model))
    seconds = time.perf_counter() - start
    if jax.process_count() > 1:
        trajectory = _gather_rows(trajectory, mesh)
    return trajectory, seconds


def score_batch(trajectory: Trajectory, batch: Mapping[str, np.ndarray], batches: EvalBatches, task, tokenizer,
                stop_ids: Sequence[int], *, setting: Setting, seed: int, mesh=None,
                reward_options: Mapping[str, Mapping] | None = None, scoring: str = "strict",
                special_ids: Sequence[int] = ()):
    """Scores one decoded batch's valid rows under `scoring`: `(correct [n] bool, row metrics,
    samples)`, the samples being the `SAMPLE_FIELDS` dicts of samples.jsonl in row order (with the
    extracted answer and the rule that extracted it). With several processes every one must call
    it (the verdicts are gathered)."""
    from dultra_jax.data.tokenizer import decode_completion

    rows = np.flatnonzero(batch["row_valid"])
    metrics = row_metrics(trajectory, stop_ids, batch["row_valid"], special_ids)
    completions = [decode_completion(tokenizer, t, stop_ids) for t in np.asarray(trajectory.tokens)[rows]]
    examples = [{k: batch[k][i] for k in batches.field_keys} for i in rows]
    extractions = extract_answers(task, completions, examples, scoring)
    correct = _score_own_rows(task, completions, examples, metrics["nfe"], rows, batches.mine, mesh, reward_options,
                              scoring, extractions)
    samples = []
    for r, i in enumerate(rows):
        index = int(batch["index"][i])
        samples.append({"index": index, "rule": setting.rule, "sweep_key": setting.key, "sweep_value": setting.value,
                        "seed": seed, "prompt": str(batch["prompt_text"][i]), "completion": completions[r],
                        "reference": batches.references[index], "correct": bool(correct[r]), "scoring": scoring,
                        "extracted": json_ready(extractions[r].value), "extracted_by": extractions[r].rule,
                        "nfe": int(metrics["nfe"][r]), "non_eos_tokens": int(metrics["non_eos"][r]),
                        "effective_tokens": int(metrics["effective"][r])})
    return correct, metrics, samples


def _warm_up(params, model: ModelConfig, decode: DecodeConfig, batches: EvalBatches, seed: int,
             compiled: set) -> float:
    """Compiles the rollout of `decode` for `batches`' shape once (`compiled` holds the warmed
    `(without_knobs(), batch size)` pairs) by decoding its first batch untimed; returns the seconds."""
    tokens0, valid0 = batches.device[0]
    key = (decode.without_knobs(), int(tokens0.shape[0]))
    if key in compiled:
        return 0.0
    start = time.perf_counter()
    jax.block_until_ready(rollout(params, tokens0, valid0, jax.random.fold_in(jax.random.key(seed), 0), decode, model))
    compiled.add(key)
    return time.perf_counter() - start


def time_per_sample(params, model: ModelConfig, decode: DecodeConfig, batches: EvalBatches, seed: int, *,
                    stop_ids: Sequence[int], special_ids: Sequence[int] = (), compiled: set,
                    mesh=None) -> dict[str, Any]:
    """The speed the paper reports: `batches` (batch size 1) decoded one record at a time with
    `seed`'s keys after an untimed warm-up; returns `sample_speed`'s columns."""
    _warm_up(params, model, decode, batches, seed, compiled)
    nfe, generated, effective, seconds = [], [], [], []
    for j, (batch, (tokens, valid)) in enumerate(zip(batches.host, batches.device)):
        trajectory, spent = _decode_batch(params, model, decode, tokens, valid,
                                          jax.random.fold_in(jax.random.key(seed), j), mesh)
        metrics = row_metrics(trajectory, stop_ids, batch["row_valid"], special_ids)
        nfe.append(metrics["nfe"])
        generated.append(metrics["generated"])
        effective.append(metrics["effective"])
        seconds.append(np.full(metrics["nfe"].shape, spent))
    return sample_speed(*(np.concatenate(x) for x in (nfe, generated, effective, seconds)))


def decode_setting(params, model: ModelConfig, setting: Setting, decode: DecodeConfig, batches: EvalBatches,
                   seeds: Sequence[int], *, task, tokenizer, stop_ids: Sequence[int], samples_file, progress,
                   compiled: set, mesh=None, reward_options: Mapping[str, Mapping] | None = None,
                   scoring: str = "strict", special_ids: Sequence[int] = (),
                   speed_batches: EvalBatches | None = None) -> dict[str, Any]:
    """Decodes and scores (under `scoring`) every batch under one setting for every seed; returns
    its summary row (`summarize_setting`) and writes its samples to `samples_file`.

    The first setting of each compiled rollout (`compiled` holds their `without_knobs()` configs
    and batch sizes) first decodes an untimed warm-up batch; a deterministic setting decodes the
    first seed only and repeats its results for the others. `progress` is the tqdm bar (one tick
    per batch). The per-sample (batch 1) speed columns come from `speed_batches` when given
    (`time_per_sample`, first seed), else, when `batches` are of one row, from the first seed's
    own decoding, else they are None.
    """
    warmup_s = _warm_up(params, model, decode, batches, seeds[0], compiled)
    correct, nfe, non_eos, effective, wall_s, batch_seconds = [], [], [], [], 0.0, []
    decoded_seeds = 1 if decode.deterministic else len(seeds)
    for seed in seeds[:decoded_seeds]:
        seed_correct, seed_nfe, seed_non_eos, seed_effective, seed_samples = [], [], [], [], []
        keys = [jax.random.fold_in(jax.random.key(seed), j) for j in range(len(batches.host))]
        for batch, (tokens, valid), rng in zip(batches.host, batches.device, keys):
            trajectory, seconds = _decode_batch(params, model, decode, tokens, valid, rng, mesh)
            wall_s += seconds
            ok, metrics, samples = score_batch(trajectory, batch, batches, task, tokenizer, stop_ids, setting=setting,
                                               seed=seed, mesh=mesh, reward_options=reward_options, scoring=scoring,
                                               special_ids=special_ids)
            _write_samples(samples_file, samples)
            seed_samples += samples
            seed_correct.append(ok)
            seed_nfe.append(metrics["nfe"])
            seed_non_eos.append(metrics["non_eos"])
            seed_effective.append(metrics["effective"])
            if seed == seeds[0]:
                batch_seconds.append(np.full(metrics["nfe"].shape, seconds))
            progress.update(1)
        correct.append(np.concatenate(seed_correct))
        nfe.append(np.concatenate(seed_nfe))
        non_eos.append(np.concatenate(seed_non_eos))
        effective.append(np.concatenate(seed_effective))
        progress.set_postfix(acc=f"{100 * np.mean(correct):.1f}", nfe=f"{np.mean(nfe):.1f}")
    for seed in seeds[decoded_seeds:]:  # the key is unused: every seed decodes these tokens
        correct.append(correct[0])
        nfe.append(nfe[0])
        non_eos.append(non_eos[0])
        effective.append(effective[0])
        _write_samples(samples_file, [{**sample, "seed": seed} for sample in seed_samples])
        progress.update(len(batches.host))
    if speed_batches is not None:
        speed = time_per_sample(params, model, decode, speed_batches, seeds[0], stop_ids=stop_ids,
                                special_ids=special_ids, compiled=compiled, mesh=mesh)
    elif batches.host[0]["row_valid"].shape[0] == 1:  # the evaluation itself ran one record at a time
        speed = sample_speed(nfe[0], np.full(nfe[0].shape, decode.gen_length), effective[0],
                             np.concatenate(batch_seconds))
    else:
        speed = None
    return summarize_setting(setting, np.stack(correct), np.stack(nfe), np.stack(non_eos), decode.gen_length,
                             wall_s, warmup_s, timed_seeds=decoded_seeds, effective=np.stack(effective),
                             sample_speed=speed)


def _write_samples(samples_file, samples: Sequence[Mapping[str, Any]]) -> None:
    for sample in samples:
        samples_file.write(json.dumps(sample, ensure_ascii=False) + "\n")
    samples_file.flush()


def _log_row(setting: Setting, row: Mapping[str, Any]) -> None:
    stderr = row["accuracy_stderr"]
    log.info("%s: accuracy %.2f%% (stderr %s) NFE %.2f TPF %.2f (non-EOS %.2f) %.1f tokens/s (warm-up %.1fs)%s",
             setting.label, row["accuracy"], "n/a" if stderr is None else f"{stderr:.2f}", row["nfe"], row["tpf"],
             row["tpf_non_eos"], row["tokens_per_s"] or 0.0, row["warmup_s"], _sample_speed_text(row))


def _sample_speed_text(row: Mapping[str, Any]) -> str:
    if row.get("sample_n") is None:
        return ""
    return (f"; batch 1 over {row['sample_n']} samples: {row['sample_tokens_per_s'] or 0:.1f} tokens/s "
            f"({row['sample_effective_tokens_per_s'] or 0:.1f} effective), TPF {row['sample_tpf']:.2f} "
            f"({row['sample_tpf_effective']:.2f} effective), {row['sample_s']:.3f} s/sample")


def special_token_ids(tokenizer, model: ModelConfig, stop_ids: Sequence[int]) -> tuple[int, ...]:
    """The ids that are not text for the effective token count: `stop_ids`, the model's padding
    and mask ids, and the tokenizer's special tokens."""
    ids = [*stop_ids, model.pad_token_id, model.mask_token_id]
    ids += [int(i) for i in (getattr(tokenizer, "all_special_ids", None) or ())]
    return tuple(dict.fromkeys(int(i) for i in ids))


def evaluate(params, model: ModelConfig, tokenizer, records: Sequence[Mapping[str, Any]], task, *,
             rules_and_sweeps, seeds: Sequence[int] = DEFAULT_SEEDS, gen_length: int = 256,
             block_length: int = 32, prompt_length: int = 512, batch_size: int = 8, temperature: float = 0.0,
             out_dir: str, progress: bool = True, mode: str | None = None, max_steps: int | None = None,
             decode_overrides: Mapping[str, Any] | None = None, mesh=None, stop_ids: Sequence[int] | None = None,
             reward_options: Mapping[str, Mapping] | None = None, plot: bool = True, scoring: str | None = None,
             speed_records: int = 0) -> dict[str, Any]:
    """Decodes `records` under every setting and seed, scores them and writes the outputs.

    Args:
      params, model: the policy (`training.restore.load_model_source` / `build_model`); params
        may be sharded.
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
      reward_options: options of the correctness reward, e.g. `{"code_correct": {"timeout_s": 5}}`
        (`official` scoring reads its `timeout_s` and `max_workers`).
      plot: write pareto.png.
      scoring: `official` (the official evaluation's answer extraction and comparison, see
        `rewards.official`) or `strict` (the training rewards'); None: `official` for gsm8k,
        math500, humaneval and mbpp, `strict` for the other tasks.
      speed_records: also time this many records (the first ones; -1: all) decoded one at a time,
        per setting with the first seed, as the paper reports speed: the `sample_*` columns
        (`sample_speed`). With `batch_size` 1 the evaluation itself gives them. Single process only.
    Returns:
      The summary (what summary.json holds): run metadata and `rows`, one per setting with
      `SUMMARY_COLUMNS` (accuracy and its standard error in percent, see `accuracy_stats`; `nfe`
      the mean NFE; `tpf`, `tpf_non_eos`, `tokens_per_s`, see `summarize_setting`) and
      `accuracy_per_seed`; `files` maps each output to its path.
    Raises:
      ConfigError for an unknown rule, a bad decoding setting, batch size, scoring or
      speed_records, and a task without a correctness reward; DataError for records the task or
      tokenizer cannot use.
    """
    from tqdm.auto import tqdm

    from dultra_jax.data.tokenizer import stop_token_ids

    seeds = [int(s) for s in seeds]
    scoring = resolve_scoring(task, scoring)
    if not isinstance(speed_records, int) or speed_records < -1:
        raise ConfigError(f"speed_records={speed_records!r} must be an integer >= -1 (-1: every record, 0: none)")
    if speed_records and batch_size > 1 and jax.process_count() > 1:
        raise ConfigError(f"speed_records={speed_records}: the batch-1 timing runs on one process; got "
                          f"{jax.process_count()}")
    common = dict(prompt_length=prompt_length, gen_length=gen_length, block_length=block_length,
                  temperature=temperature, max_steps=max_steps, eos_token_id=model.eos_token_id)
    settings, decodes = plan_settings(model, task, rules_and_sweeps, seeds=seeds, batch_size=batch_size,
                                      common=common, decode_overrides=decode_overrides, mesh=mesh)
    if stop_ids is None:
        extra = (model.eos_token_id,) + ((model.eot_token_id,) if model.eot_token_id is not None else ())
        stop_ids = stop_token_ids(tokenizer, extra=extra)
    stop_ids = tuple(int(i) for i in stop_ids)
    special_ids = special_token_ids(tokenizer, model, stop_ids)
    batches = prepare_batches(records, task, tokenizer, model, decodes[0], batch_size=batch_size, mode=mode,
                              mesh=mesh)
    speed_batches = None
    if speed_records and batch_size > 1:  # one record per rollout, prompts replicated over the mesh
        count = len(records) if speed_records == -1 else min(speed_records, len(records))
        speed_batches = prepare_batches(records[:count], task, tokenizer, model, decodes[0], batch_size=1, mode=mode,
                                        mesh=mesh, replicate=True)

    # With several processes the rollout's rows are gathered to every process, each scores the rows
    # it fed, and the verdicts are gathered too; process 0 alone writes.
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(out_dir, exist_ok=True)
    summary: dict[str, Any] = {
        "task": task.name, "mode": mode or task.mode, "num_records": batches.num_records, "seeds": seeds,
        "gen_length": gen_length, "block_length": block_length, "prompt_length": prompt_length,
        "batch_size": batch_size, "temperature": temperature, "max_steps": max_steps,
        "decode_overrides": dict(decode_overrides or {}), "stop_ids": list(stop_ids),
        "special_ids": list(special_ids), "scoring": scoring,
        "speed_records": (speed_batches.num_records if speed_batches
                          else batches.num_records if batch_size == 1 else 0),
        "correctness_reward": _correctness_part(task),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}", "rows": []}
    samples_path = os.path.join(out_dir, SAMPLES_FILE)
    log.info("evaluating %s on %d records: %d setting(s) x %d seed(s), %d batch(es) of %d", task.name,
             batches.num_records, len(settings), len(seeds), len(batches.host), batch_size)
    bar = tqdm(total=len(settings) * len(seeds) * len(batches.host), disable=not (progress and writer),
               file=sys.stderr, unit="batch", dynamic_ncols=True)
    files: dict[str, str] = {"samples": samples_path}
    try:
        with open(samples_path if writer else os.devnull, "w") as samples_file:
            compiled: set = set()  # the rollouts' static configs (`DecodeConfig.without_knobs`) warmed up
            for setting, decode in zip(settings, decodes):
                bar.set_description(setting.label)
                row = decode_setting(params, model, setting, decode, batches, seeds, task=task, tokenizer=tokenizer,
                                     stop_ids=stop_ids, samples_file=samples_file, progress=bar, compiled=compiled,
                                     mesh=mesh, reward_options=reward_options, scoring=scoring,
                                     special_ids=special_ids, speed_batches=speed_batches)
                summary["rows"].append(row)
                if writer:
                    files.update(write_outputs(summary, out_dir, plot=plot))
                _log_row(setting, row)
    finally:
        bar.close()
    summary["files"] = files
    return summary


# ---------------------------------------------------------------------- from a model source


def rule_sweeps(rules: Sequence[str], sweeps: Mapping[str, Sequence[float | int]]) -> dict[str, list]:
    """`{rule: values}` for `evaluate` from one value list per knob (`sweeps`, keyed by the
    `SWEEP_KEYS` values: factor, threshold, steps, entropy_bound): each rule takes its knob's
    list, an empty or absent one its default (`[None]`). ConfigError `rules: ...` for an unknown
    or missing rule."""
    unknown = [r for r in rules if r not in SWEEP_KEYS]
    if unknown or not rules:
        raise ConfigError(f"rules: unknown rule(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                          f"use one of {', '.join(SWEEP_KEYS)}")
    result = {}
    for rule in rules:
        knob = SWEEP_KEYS[rule]
        result[rule] = (list(sweeps.get(knob) or ()) if knob else []) or [None]
    sweep_settings(result)
    return result


def summary_table(summary: Mapping[str, Any], params: str = "model") -> str:
    """The summary as text: a header line, the Markdown table of `format_table`
    (one sweep per rule; `params` names the model in its params column), then one line per setting,
    its label and decoding tokens/s at the evaluation's batch size (compilation excluded), the
    per-sample (batch 1) speed of the timed settings, and the output files."""
    sweeps: dict[str, list] = {}
    for row in summary["rows"]:
        sweeps.setdefault(row["rule"], []).append({**row, "params": params})
    lines = [f"{summary['task']}: {summary['num_records']} records x {len(summary['seeds'])} seed(s), "
             f"gen {summary['gen_length']}, block {summary['block_length']}, scoring {summary.get('scoring')}",
             format_table({"sweeps": sweeps}),
             f"tokens/s of each setting (decoding at batch {summary.get('batch_size')}, compilation excluded):"]
    lines += [f"{Setting(r['rule'], r['sweep_key'], r['sweep_value']).label} {r['tokens_per_s'] or 0:.1f}"
              for r in summary["rows"]]
    timed = [r for r in summary["rows"] if r.get("sample_n") is not None]
    if timed:
        lines.append("per sample, as the paper reports speed:")
        lines += [f"{Setting(r['rule'], r['sweep_key'], r['sweep_value']).label}{_sample_speed_text(r)}" for r in timed]
    if summary.get("files"):
        lines.append("outputs: " + ", ".join(sorted(summary["files"].values())))
    return "\n".join(lines)


# ------------------------------------------------------------ the comparison table and plot


def headline_rows(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The named rows of `results` (everything but `sweeps`)."""
    return {name: row for name, row in results.items() if name != "sweeps"}


def plot_comparison(results: Mapping[str, Any], path: str, title: str | None = None) -> None:
    """`pareto.png`: one curve per sweep (labelled with its knob values; dashed for a baseline
    rule on the trained parameters), the headline rows as large markers, the Pareto front of
    every point, NFE on a log axis."""
    curves = [{**r, "rule": name, "dashed": r["params"] == "trained" and r["rule"] not in PLANNER_RULES}
              for name, sweep in results.get("sweeps", {}).items() for r in sweep]
    points = [{**r, "rule": name, "sweep_value": None} for name, r in headline_rows(results).items()]
    plot_pareto(curves, path, title=title, highlight=points, log_nfe=True)


def format_table(results: Mapping[str, Any]) -> str:
    """A Markdown table of the rows, then of every sweep point: accuracy (percent, +- its standard
    error), mean NFE, tokens per forward (all generated tokens, and without EOS padding)."""
    lines = ["| row | params | rule | accuracy % | NFE | tokens / forward | non-EOS tokens / forward |",
             "|---|---|---|---|---|---|---|"]

    def line(name: str, r: Mapping[str, Any]) -> str:
        stderr = "" if r.get("accuracy_stderr") is None else f" ± {r['accuracy_stderr']:.1f}"
        knob = SWEEP_KEYS.get(r["rule"])
        rule = r["rule"] + ("" if knob is None or r.get("sweep_value") is None else f" {knob}={r['sweep_value']:g}")
        return (f"| {name} | {r['params']} | {rule} | {r['accuracy']:.1f}{stderr} | {r['nfe']:.2f} | "
                f"{r['tpf']:.2f} | {r['tpf_non_eos']:.2f} |")

    lines += [line(name, r) for name, r in headline_rows(results).items()]
    for name, sweep in results.get("sweeps", {}).items():
        lines += [line(f"sweep {name}", r) for r in sweep]
    return "\n".join(lines)
