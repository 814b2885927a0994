"""Held-out evaluation while GRPO trains (`eval` section): rows at the right steps, the best
checkpoint kept through `checkpoint.keep` rotation and through a resume."""

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from dultra_jax.config import ConfigError
from dultra_jax.training.grpo import train
from dultra_jax.training.loop import BEST_DIR, BEST_FILE
from dultra_jax.training.restore import load_model_source, restore_params

EVAL_KEYS = {"eval_accuracy", "eval_nfe", "eval_tpf", "eval_objective"}


def _config(tmp_path, steps, objective="accuracy"):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in tiny.EXAMPLES))
    config = tiny.get_config()
    config.total_steps = steps
    config.checkpoint.update(every=1, keep=1, async_save=False)
    config.eval = ml_collections.ConfigDict(dict(every=2, path=str(path), batch_size=8, seeds=(0, 1),
                                                 objective=objective))
    return config


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _best(workdir):
    with open(os.path.join(workdir, BEST_FILE)) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("train_eval")
    straight, resumed = str(base / "straight"), str(base / "resumed")
    train(_config(base, 6), straight)
    train(_config(base, 4), resumed)
    train(_config(base, 6), resumed)
    return straight, resumed


def test_rows_at_the_eval_steps_and_the_best_kept(runs):
    straight, _ = runs
    rows = _metrics(straight)
    assert [r["step"] for r in rows if EVAL_KEYS <= set(r)] == [2, 4, 6]
    assert not any(EVAL_KEYS & set(r) for r in rows if r["step"] % 2)
    evaluated = {r["step"]: r for r in rows if "eval_objective" in r}
    for r in evaluated.values():
        assert 0 <= r["eval_accuracy"] <= 100 and 1 <= r["eval_nfe"] <= 8
        assert r["eval_objective"] == r["eval_accuracy"]
        assert r["eval_tpf"] == pytest.approx(8 / r["eval_nfe"])
    best = _best(straight)
    first_max = max(evaluated.values(), key=lambda r: (r["eval_objective"], -r["step"]))
    assert best == {"step": first_max["step"], "metric": "eval_objective", "value": first_max["eval_objective"],
                    "checkpoint": os.path.join(BEST_DIR, str(first_max["step"]))}
    # checkpoint.keep=1 leaves only the last step there; the best survives in best/.
    assert os.listdir(os.path.join(straight, "checkpoints")) == ["6"]
    assert str(best["step"]) in os.listdir(os.path.join(straight, BEST_DIR))
    params, model, _ = restore_params(os.path.join(straight, BEST_DIR))
    assert model.has_planner and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    source, _, _ = load_model_source(os.path.join(straight, BEST_DIR))  # what export / evaluate read
    for x, y in zip(jax.tree.leaves(source), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
    # Each evaluation leaves its samples.
    assert os.path.exists(os.path.join(straight, "eval", "step_4", "summary.json"))


def test_resume_keeps_the_same_best(runs):
    straight, resumed = runs
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]  # noqa: E731
    assert drop_time(_metrics(resumed)) == drop_time(_metrics(straight))
    assert _best(resumed) == _best(straight)
    # A better evaluation is the only thing saved there, so the latest step of best/ is the best.
    for workdir in runs:
        assert sorted(os.listdir(os.path.join(workdir, BEST_DIR)), key=int)[-1] == str(_best(straight)["step"])
    a, _, _ = restore_params(os.path.join(straight, BEST_DIR))
    b, _, _ = restore_params(os.path.join(resumed, BEST_DIR))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_eval_section_errors(tmp_path):
    config = _config(tmp_path, 2)
    config.eval.objective = "loss"
    with pytest.raises(ConfigError, match="eval.objective='loss' is not one of accuracy, accuracy_per_nfe"):
        train(config, str(tmp_path / "a"))
    config = _config(tmp_path, 2)
    del config.eval["path"]
    with pytest.raises(ConfigError, match=r"eval.every > 0 needs held-out records: eval.path"):
        train(config, str(tmp_path / "b"))
    config = _config(tmp_path, 2)
    config.eval.rule = "factr"
    with pytest.raises(ConfigError, match=r"eval.rule='factr' is unknown"):
        train(config, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c" / "metrics.jsonl")
