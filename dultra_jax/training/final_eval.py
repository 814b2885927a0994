"""The end-of-run comparison: named rows and sweeps (a rule on the initial or the trained
parameters) evaluated on held-out records, written as `results.json`, `pareto.png` and a logged
table.

Config (`final_eval`, `config.FinalEvalConfig`):
  generator / path, split, limit: the held-out records (as in `data`).
  rows: `{name: {"params": "initial" | "trained", "rule": str, <knob>: value}}`, e.g.
        `{"factor": {"params": "initial", "rule": "factor", "factor": 1.0}}`: the headline points.
  sweeps: `{name: {"params": ..., "rule": str, "values": [knob values]}}`, e.g.
        `{"factor": {"params": "initial", "rule": "factor", "values": [0.5, 1, 2]}}`: one curve
        each (the knob is the rule's `evaluation.SWEEP_KEYS` entry). A setting shared by a row
        and a sweep is decoded once.
  seeds, batch_size: decoding seeds (token temperature 0) and rows per batch; the batch is
        rounded up to a multiple of the mesh's batch devices (filler rows are ignored), so one
        config runs on 1, 4 or 8 devices.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, NamedTuple

import jax

from dultra_jax import evaluation
from dultra_jax.config import ConfigError, DecodeConfig, FinalEvalConfig, TrainEvalConfig, from_config
from dultra_jax.data.tasks import load_task_records
from dultra_jax.sharding import batch_devices
from dultra_jax.training.data_setup import generate_records

log = logging.getLogger(__name__)

ROW_KEYS = {"params", "rule", "factor", "threshold", "steps", "entropy_bound"}
SWEEP_KEYS = {"params", "rule", "values"}


class Point(NamedTuple):
    """One decoded setting of the comparison: a rule and its knob value (None: the rule's
    default) on one parameter group."""

    params: str
    rule: str
    value: float | int | None


class Plan(NamedTuple):
    """What `check` read and validated: the records, the headline rows and the sweeps."""

    records: list[dict]
    rows: dict[str, Point]
    sweeps: dict[str, list[Point]]


def _records(spec: FinalEvalConfig | TrainEvalConfig, task, section: str = "final_eval") -> list[dict]:
    if spec.generator:
        return generate_records(spec.generator, f"{section}.generator.")
    if spec.path:
        return load_task_records(task, spec.path, spec.split, limit=spec.limit)
    raise ConfigError(f"{section} needs `generator` or `path`")


def _rule(where: str, rule: Any) -> str | None:
    """The sweep knob of `rule` (ConfigError naming `where` for an unknown rule)."""
    if rule not in evaluation.SWEEP_KEYS:
        raise ConfigError(f"{where}.rule={rule!r} is unknown; use one of {', '.join(evaluation.SWEEP_KEYS)}")
    return evaluation.SWEEP_KEYS[rule]


def _spec(spec: FinalEvalConfig | Mapping[str, Any]) -> FinalEvalConfig:
    """The `final_eval` section as its dataclass (a plain mapping is checked key by key)."""
    return spec if isinstance(spec, FinalEvalConfig) else from_config(FinalEvalConfig, spec, "final_eval.")


def check(spec: FinalEvalConfig | Mapping[str, Any], task, param_groups=("initial", "trained")) -> Plan:
    """Validates the rows and sweeps of `spec` and reads its records; the trainer calls it at
    start-up, so that a typo fails before training, not after it."""
    spec = _spec(spec)
    rows: dict[str, Point] = {}
    for name, row in dict(spec.rows or {}).items():
        row = dict(row)
        unknown = sorted(set(row) - ROW_KEYS)
        if unknown or row.get("params") not in param_groups or "rule" not in row:
            raise ConfigError(f"final_eval.rows.{name}: needs `params` ({' or '.join(param_groups)}) and `rule`, "
                              f"optionally one of {', '.join(sorted(ROW_KEYS - {'params', 'rule'}))}; got {row}")
        knob = _rule(f"final_eval.rows.{name}", row["rule"])
        rows[name] = Point(row["params"], row["rule"], row.get(knob) if knob else None)
    sweeps: dict[str, list[Point]] = {}
    for name, sweep in dict(spec.sweeps or {}).items():
        sweep = dict(sweep)
        where = f"final_eval.sweeps.{name}"
        if set(sweep) != SWEEP_KEYS or sweep["params"] not in param_groups:
            raise ConfigError(f"{where}: needs exactly `params` ({' or '.join(param_groups)}), `rule` and "
                              f"`values`; got {sweep}")
        knob = _rule(where, sweep["rule"])
        values = list(sweep["values"])
        if knob is None or not values or len(set(values)) != len(values):
            raise ConfigError(f"{where}.values={values}: give distinct values of the rule's knob "
                              f"({knob or 'rule ' + repr(sweep['rule']) + ' has none'})")
        sweeps[name] = [Point(sweep["params"], sweep["rule"], v) for v in values]
    if not rows and not sweeps:
        raise ConfigError("final_eval.rows and final_eval.sweeps are empty: name at least one row")
    return Plan(_records(spec, task), rows, sweeps)


def batch_rows(batch_size: int, mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's batch devices (`('data', 'fsdp')`)."""
    if batch_size <= 0:
        raise ConfigError(f"final_eval.batch_size={batch_size} must be positive")
    devices = 1 if mesh is None else batch_devices(mesh)
    return -(-batch_size // devices) * devices


def _resolved(point: Point, decode: DecodeConfig) -> Point:
    """`point` with its knob's default filled in (the value the rule uses), so that e.g.
    `factor` with no value and `factor` 1.0 are one setting."""
    setting = evaluation.Setting(point.rule, evaluation.SWEEP_KEYS[point.rule], point.value)
    config = setting.decode_config(prompt_length=decode.prompt_length, gen_length=decode.gen_length,
                                   block_length=decode.block_length)
    return point._replace(value=evaluation.effective_value(config))


def _entry(row: Mapping[str, Any], point: Point) -> dict[str, Any]:
    return {"accuracy": row["accuracy"], "accuracy_stderr": row["accuracy_stderr"], "nfe": row["nfe"],
            "tpf": row["tpf"], "tpf_non_eos": row["tpf_non_eos"], "tokens_per_s": row["tokens_per_s"],
            "rule": point.rule, "params": point.params, "sweep_value": row["sweep_value"], "n": row["n"],
            "seeds": row["seeds"]}


def compare(spec: FinalEvalConfig | Mapping[str, Any], params_by_group: Mapping[str, Any], model, tokenizer, task, decode,
            stop_ids, workdir: str, mesh=None, plan: Plan | None = None) -> dict[str, Any]:
    """Evaluates every row and sweep and writes `results.json` / `pareto.png` into `workdir`.

    Args:
      params_by_group: `{"initial": params, "trained": params}`.
      decode: the run's `DecodeConfig` (prompt, generation and block lengths).
      plan: what `check(spec, task)` returned at start-up (its records are not read twice);
        None checks here.
    Returns:
      What `results.json` holds: `{row name: entry, ..., "sweeps": {sweep name: [entry per
      value, in the config's order]}}`, each entry `{"accuracy": percent, "accuracy_stderr",
      "nfe", "tpf", "tpf_non_eos", "tokens_per_s", "rule", "params", "sweep_value", "n", "seeds"}`.
    """
    spec = _spec(spec)
    plan = plan if plan is not None else check(spec, task, tuple(params_by_group))
    rows = {name: _resolved(point, decode) for name, point in plan.rows.items()}
    sweeps = {name: [_resolved(p, decode) for p in points] for name, points in plan.sweeps.items()}
    points = list(dict.fromkeys([*rows.values(), *(p for points in sweeps.values() for p in points)]))
    batch_size = batch_rows(spec.batch_size, mesh)
    measured: dict[Point, dict[str, Any]] = {}
    for group in dict.fromkeys(p.params for p in points):
        members = [p for p in points if p.params == group]
        summary = evaluation.evaluate(
            params_by_group[group], model, tokenizer, plan.records, task,
            rules_and_sweeps=[(p.rule, [p.value]) for p in members],
            seeds=tuple(spec.seeds), gen_length=decode.gen_length, block_length=decode.block_length,
            prompt_length=decode.prompt_length, batch_size=batch_size, temperature=0.0,
            out_dir=os.path.join(workdir, "eval", group), progress=False, mesh=mesh, stop_ids=stop_ids, plot=False)
        for point, row in zip(members, summary["rows"]):
            assert (row["rule"], row["sweep_value"]) == (point.rule, point.value), (row, point)
            measured[point] = _entry(row, point)
    # Baselines first, slowest first, then the trained rows (config dicts do not keep key order).
    ordered = sorted(rows.items(), key=lambda item: (item[1].params == "trained", -measured[item[1]]["nfe"]))
    results: dict[str, Any] = {name: measured[point] for name, point in ordered}
    results["sweeps"] = {name: [measured[p] for p in points] for name, points in sweeps.items()}
    if jax.process_index() == 0:  # every process holds the same results; one writes them
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(evaluation.json_ready(results), f, indent=2, allow_nan=False)
        evaluation.plot_comparison(results, os.path.join(workdir, "pareto.png"),
                        title=f"{task.name}: accuracy vs NFE on {len(plan.records)} held-out problems "
                              f"x {len(spec.seeds)} seed(s)")
    log.info("final evaluation on %d held-out records:\n%s", len(plan.records), evaluation.format_table(results))
    return results


# --------------------------------------------------------------------- while training


def heldout_records(spec: TrainEvalConfig, task) -> list[dict] | None:
    """The records of GRPO's `eval` section, read (and the rule checked) at start-up; None when
    `eval.every` is 0."""
    if not spec.every:
        return None
    if spec.rule is not None:
        _rule("eval", spec.rule)
    return _records(spec, task, "eval")


def heldout_evaluator(spec: TrainEvalConfig, records: list[dict] | None, model, tokenizer, task,
                      decode: DecodeConfig, stop_ids, workdir: str, mesh=None, reward_options=None):
    """The `train_loop` evaluation of GRPO's `eval` section on `records` (None when there are none).

    Returns `evaluate(state, step) -> {"eval_accuracy" (percent), "eval_nfe", "eval_tpf",
    "eval_objective"}`: the current parameters decode the records with the rollout's rule and
    knob (or `eval.rule` with its default knob) at temperature 0, scored as the final evaluation
    scores; the samples and summary go to `WORKDIR/eval/step_N/`.
    """
    if records is None:
        return None
    rule = spec.rule or decode.rule
    value = evaluation.effective_value(decode) if rule == decode.rule else None
    batch_size = batch_rows(spec.batch_size, mesh)
    log.info("held-out evaluation every %d steps: %s (%s) on %d records x %d seed(s)", spec.every, rule,
             value if value is not None else "default knob", len(records), len(spec.seeds))

    def evaluate(state, step: int) -> dict[str, float]:
        summary = evaluation.evaluate(
            state.params, model, tokenizer, records, task, rules_and_sweeps=[(rule, [value])], seeds=tuple(spec.seeds),
            gen_length=decode.gen_length, block_length=decode.block_length, prompt_length=decode.prompt_length,
            max_steps=decode.max_steps, batch_size=batch_size, temperature=0.0,
            out_dir=os.path.join(workdir, "eval", f"step_{step}"), progress=False, mesh=mesh, stop_ids=stop_ids,
            reward_options=reward_options, plot=False, scoring=spec.scoring)
        row = summary["rows"][0]
        accuracy, nfe = float(row["accuracy"]), float(row["nfe"])
        objective = accuracy if spec.objective == "accuracy" else accuracy / max(nfe, 1e-9)
        return {"eval_accuracy": accuracy, "eval_nfe": nfe, "eval_tpf": float(row["tpf"]),
                "eval_objective": objective}

    return evaluate
