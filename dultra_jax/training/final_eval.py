"""The end-of-run comparison: named rows (a rule on the initial or the trained parameters)
evaluated on held-out records, written as `results.json`, `pareto.png` and a logged table.

Config (`final_eval`):
  generator / path, split, limit: the held-out records (as in `data`).
  rows: `{name: {"params": "initial" | "trained", "rule": str, <knob>: value}}`, e.g.
        `{"factor": {"params": "initial", "rule": "factor", "factor": 1.0}}`.
  seeds, batch_size: decoding seeds (token temperature 0, spec section 8) and rows per batch.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax

from dultra_jax import evaluation
from dultra_jax.config import ConfigError
from dultra_jax.data.tasks import load_task_records

log = logging.getLogger(__name__)

BATCH_SIZE = 64  # rows per batch when `final_eval.batch_size` is unset
KEYS = {"generator", "path", "split", "limit", "rows", "seeds", "batch_size"}
ROW_KEYS = {"params", "rule", "factor", "threshold", "steps", "entropy_bound"}


def _records(spec: Mapping[str, Any], task) -> list[dict]:
    from dultra_jax.training.data_setup import generate_records

    if spec.get("generator"):
        return generate_records(spec["generator"])
    if spec.get("path"):
        return load_task_records(task, spec["path"], spec.get("split"), limit=spec.get("limit"))
    raise ConfigError("final_eval needs `generator` or `path`")


def check(spec: Mapping[str, Any], task, param_groups=("initial", "trained")
          ) -> tuple[list[dict], dict[str, list[tuple[str, str, float | None]]]]:
    """Validates `spec` and reads its records; the trainer calls it at start-up, so that a typo
    fails before training, not after it.

    Returns:
      `(records, {params group: [(row name, rule, knob value or None)]})`.
    """
    unknown = sorted(set(spec) - KEYS)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join('final_eval.' + k for k in unknown)}")
    groups: dict[str, list[tuple[str, str, float | None]]] = {}
    for name, row in dict(spec.get("rows") or {}).items():
        row = dict(row)
        unknown = sorted(set(row) - ROW_KEYS)
        if unknown or row.get("params") not in param_groups or "rule" not in row:
            raise ConfigError(f"final_eval.rows.{name}: needs `params` ({' or '.join(param_groups)}) and `rule`, "
                              f"optionally one of {', '.join(sorted(ROW_KEYS - {'params', 'rule'}))}; got {row}")
        if row["rule"] not in evaluation.SWEEP_KEYS:
            raise ConfigError(f"final_eval.rows.{name}.rule={row['rule']!r} is unknown; use one of "
                              f"{', '.join(evaluation.SWEEP_KEYS)}")
        knob = evaluation.SWEEP_KEYS[row["rule"]]
        groups.setdefault(row["params"], []).append((name, row["rule"], row.get(knob) if knob else None))
    if not groups:
        raise ConfigError("final_eval.rows is empty: name at least one row")
    return _records(spec, task), groups


def compare(spec: Mapping[str, Any], params_by_group: Mapping[str, Any], model, tokenizer, task, decode,
            stop_ids, workdir: str, mesh=None, plan=None) -> dict[str, dict[str, float]]:
    """Evaluates every row and writes `results.json` / `pareto.png` into `workdir`.

    Args:
      params_by_group: `{"initial": params, "trained": params}`.
      decode: the run's `DecodeConfig` (prompt, generation and block lengths).
      plan: what `check(spec, task)` returned at start-up (its records are not read twice);
        None checks here.
    Returns:
      `{row name: {"accuracy": percent, "accuracy_stderr", "nfe", "tpf", "tpf_non_eos",
      "tokens_per_s", "rule", "params"}}`.
    """
    records, groups = plan if plan is not None else check(spec, task, tuple(params_by_group))

    results: dict[str, dict[str, Any]] = {}
    for group, members in groups.items():
        summary = evaluation.evaluate(
            params_by_group[group], model, tokenizer, records, task,
            rules_and_sweeps=[(rule, [value]) for _, rule, value in members],
            seeds=tuple(spec.get("seeds", (0,))), gen_length=decode.gen_length, block_length=decode.block_length,
            prompt_length=decode.prompt_length, batch_size=int(spec.get("batch_size", BATCH_SIZE)), temperature=0.0,
            out_dir=os.path.join(workdir, "eval", group), progress=False, mesh=mesh, stop_ids=stop_ids, plot=False)
        for (name, rule, _), row in zip(members, summary["rows"]):
            assert row["rule"] == rule, (row["rule"], rule)
            results[name] = {"accuracy": row["accuracy"], "accuracy_stderr": row["accuracy_stderr"],
                             "nfe": row["nfe"], "tpf": row["tpf"], "tpf_non_eos": row["tpf_non_eos"],
                             "tokens_per_s": row["tokens_per_s"], "rule": rule, "params": group,
                             "sweep_value": row["sweep_value"], "n": row["n"]}
    # Baselines first, slowest first, then the trained rows (config dicts do not keep key order).
    results = dict(sorted(results.items(), key=lambda item: (item[1]["params"] == "trained", -item[1]["nfe"])))
    if jax.process_index() == 0:  # every process holds the same results; one writes them
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot_rows = [{**r, "rule": name, "sweep_value": None} for name, r in results.items()]
        evaluation.plot_pareto(plot_rows, os.path.join(workdir, "pareto.png"),
                               title=f"{task.name}: accuracy vs NFE on {len(records)} held-out problems")
    log.info("final evaluation on %d held-out records:\n%s", len(records), format_table(results))
    return results


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of the rows: accuracy (percent), mean NFE, tokens per forward."""
    lines = ["| row | params | accuracy % | NFE | tokens / forward |", "|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['params']} | {r['accuracy']:.1f} | {r['nfe']:.2f} | {r['tpf']:.2f} |")
    return "\n".join(lines)
