"""launch/train.py end to end on the tiny config: metrics, checkpoints, resume, export, errors."""

import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from configs import demo, tiny
from dultra_jax.config import ConfigError, DataConfig, DecodeConfig, GRPOConfig, RewardsConfig, from_config
from dultra_jax.interop.hf_llada import load_hf
from dultra_jax.training.data_setup import TrainData
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.training.grpo import train
from dultra_jax.training.restore import restore_params
from tests.helpers import one_device_env, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"step", "loss", "reward_mean", "reward_exact_match", "reward_step_penalty", "accuracy", "nfe_mean",
            "tokens_per_forward", "clip_fraction", "logp_gap", "grad_norm", "step_time_s"}


def _run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=one_device_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _train(workdir, steps):
    return _run("launch/train.py", "--config=configs/tiny.py", f"--workdir={workdir}", f"--config.total_steps={steps}")


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run B: 2 steps, then a fresh process resumes to 4. Run A: 4 steps in one go."""
    base = tmp_path_factory.mktemp("train")
    resumed, straight = str(base / "resumed"), str(base / "straight")
    _train(resumed, 2)
    after_two = _metrics(resumed)
    resume_log = _train(resumed, 4).stderr
    _train(straight, 4)
    return resumed, straight, after_two, resume_log


def test_two_steps_write_metrics_and_checkpoints(runs):
    _, _, after_two, _ = runs
    assert [row["step"] for row in after_two] == [1, 2]
    for row in after_two:
        assert REQUIRED <= set(row), REQUIRED - set(row)
        assert np.isfinite(row["loss"]) and row["logp_gap"] < 1e-4  # replay reproduces the rollout
        assert 1 <= row["nfe_mean"] <= 8 and row["tokens_per_forward"] == pytest.approx(8 / row["nfe_mean"])


def test_resume_equals_uninterrupted(runs):
    resumed, straight, _, resume_log = runs
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints")), key=int)[-1] == "4"
    # The one setting changed on resume is named, with both values (tiny's LR is constant).
    assert ("resuming step 2 with 1 setting(s) changed since that checkpoint; the run continues with the new "
            "values: config.total_steps: 2 -> 4") in resume_log, resume_log[-3000:]
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != "step_time_s"} for r in rows]  # noqa: E731
    assert drop_time(_metrics(resumed)) == drop_time(_metrics(straight))
    assert os.path.isdir(os.path.join(straight, "tensorboard"))
    params_resumed, model, _ = restore_params(resumed)
    params_straight, _, _ = restore_params(straight)
    for a, b in zip(jax.tree.leaves(params_resumed), jax.tree.leaves(params_straight)):
        np.testing.assert_array_equal(a, b)
    assert model.n_layers == 2 and model.has_planner


def test_export_training_checkpoint_to_hf(runs, tmp_path):
    resumed, _, _, _ = runs
    out = str(tmp_path / "hf")
    _run("launch/export.py", f"--model={resumed}", f"--out={out}", "--dtype=float32")
    loaded, config, hf = load_hf(out)
    params, _, _ = restore_params(resumed)
    assert hf["architectures"] == ["LLaDOUModelLM"] and config.has_planner
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_config_errors_name_the_key(tmp_path, monkeypatch):
    config = tiny.get_config()
    config.total_steps = 1
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.rl.group_size = 3  # 2 prompts x 3 rows = 6 rows on 8 devices
    with pytest.raises(ConfigError, match=r"batch rows = data.prompts_per_step \(2\) \* rl.group_size \(3\) = 6 "
                                          r"do not split over the 8 devices.*set --config.data.prompts_per_step=-1 "
                                          r"\(one prompt per device: 8 x 3 rows\) or a multiple of 8"):
        train(bad, str(tmp_path / "a"))
    # A sweep without values: refused before training, not after it.
    bad = demo.get_config()
    bad.total_steps = 1
    bad.final_eval.sweeps.factor.values = ()
    with pytest.raises(ConfigError, match=r"final_eval.sweeps.factor.values=\[\]: give distinct values of the "
                                          r"rule's knob \(factor\)"):
        train(bad, str(tmp_path / "e"))
    assert not os.path.exists(tmp_path / "e" / "metrics.jsonl")
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.optim.lr = 0.1
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) optim.lr"):
        train(bad, str(tmp_path / "b"))
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.data.shuffle = True
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) data.shuffle"):
        train(bad, str(tmp_path / "c"))
    # The think-tag reward with prompts that do not ask for think tags (configs/math.py's weights
    # with the non-thinking prompts); refused before any data or model is loaded.
    from configs import math

    bad = math.get_config()
    bad.data.mode = "non-thinking"
    bad.data.path = str(tmp_path / "no_such_file.jsonl")
    with pytest.raises(ConfigError, match=r"rewards.weights.think_format=0.5 applies to data.mode='thinking' only, "
                                          r"but data.task='gsm8k' prompts in 'non-thinking' mode"):
        TrainData(from_config(DataConfig, bad.data, "data."), from_config(RewardsConfig, bad.rewards, "rewards."),
                  tiny_config(), DecodeConfig(), seed=0)
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.data.prompts_per_step = 0
    with pytest.raises(ConfigError, match=r"data.prompts_per_step=0 must be a positive multiple of the 1 process"):
        train(bad, str(tmp_path / "f"))
    # A typo in the end-of-run evaluation fails at start-up, not after training.
    bad = demo.get_config()
    bad.total_steps = 1
    bad.final_eval.batch_size = 8
    bad.final_eval.rows.factor.rule = "factr"
    with pytest.raises(ConfigError, match=r"final_eval.rows.factor.rule='factr' is unknown; use one of"):
        train(bad, str(tmp_path / "g"))
    assert not os.path.exists(tmp_path / "g" / "metrics.jsonl")
    # A bucket URL is refused, not created as a local `gs:` directory.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="workdir gs://bucket/run is a URL"):
        train(config, "gs://bucket/run")
    assert not os.path.exists(tmp_path / "gs:")
    proc = subprocess.run([sys.executable, "launch/train.py", "--config=configs/tiny.py",
                           f"--workdir={tmp_path / 'd'}", "--config.rl.no_such_key=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr


@pytest.mark.parametrize("key, value, message", [
    ("checkpoint.every", 0, "checkpoint.every=0 must be >= 1"),
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be >= 1"),
    ("checkpoint.evry", 5, r"unknown config key\(s\) checkpoint.evry"),
    ("mesh.fdsp", 2, r"unknown config key\(s\) mesh.fdsp"),
    ("optim.grad_clip", -1.0, r"optim.grad_clip=-1.0 must be positive"),
    ("optim.grad_clip", 0.0, r"optim.grad_clip=0.0 must be positive"),
    ("optim.b2", 1.5, r"optim.b2=1.5 must be in \[0, 1\)"),
    ("optim.b1", -0.1, r"optim.b1=-0.1 must be in \[0, 1\)"),
    ("optim.eps", 0.0, "optim.eps=0.0 must be positive"),
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1 must be >= 0"),
    ("optim.min_learning_rate", 1.0, r"optim.min_learning_rate=1.0 must be in \[0, optim.learning_rate="),
])
def test_section_values_are_checked_at_start_up(key, value, message):
    config = tiny.get_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        from_config(GRPOConfig, config)


def test_reference_configs_validate_and_match_the_reference():
    from configs import code, math
    from dultra_jax.config import model_config_from_dict
    from dultra_jax.data.tasks import get_task

    for module, temperature in ((math, 0.1), (code, 0.5)):
        run = from_config(GRPOConfig, module.get_config())
        assert run.rl.group_size == 12 and run.rl.advantage == "mean" and run.rl.advantage_min_clip == 0.0
        assert (run.rl.eps_low, run.rl.eps_high, run.rl.beta, run.rl.num_iterations) == (0.2, 1.0, 0.0, 1)
        assert (run.optim.learning_rate, run.optim.schedule, run.optim.b1, run.optim.b2) == (5e-6, "constant", 0.9, 0.99)
        assert (run.optim.weight_decay, run.optim.grad_clip, run.optim.train) == (0.1, 1.0, "all")
        assert (run.decode.gen_length, run.decode.block_length, run.decode.temperature) == (256, 32, temperature)
        assert run.decode.rule == "planner_bernoulli" and run.decode.logprob_temperature == 1.0
        model = model_config_from_dict(run.model)
        assert (model.n_layers, model.d_model, model.vocab_size, model.mask_token_id) == (32, 4096, 126464, 126336)
        data = module.get_config().data
        task = get_task(data.task, mode=data.mode, **dict(data.get("task_options") or {}))  # a valid mode and options
        assert task.mode == data.mode
    # Distillation is on by default with the task's teacher (a hub id), off in the `nodistill` variant.
    for module, teacher in ((math, "Qwen/Qwen2.5-Math-7B-Instruct"), (code, "Qwen/Qwen2.5-Coder-7B-Instruct")):
        rewards = from_config(GRPOConfig, module.get_config()).rewards
        assert (rewards.distill, rewards.teacher_path, rewards.teacher_weight, rewards.uses_teacher) == (
            True, teacher, 1.0, True)
        # Every rewards key is declared, so `--config.rewards.teacher_offload=True` overrides one.
        assert module.get_config().rewards.teacher_offload is False and rewards.teacher_offload is False
        rewards = from_config(GRPOConfig, module.get_config("nodistill")).rewards
        assert (rewards.distill, rewards.teacher_path, rewards.uses_teacher) == (False, None, False)
    with pytest.raises(ConfigError, match=r"configs/math.py takes no argument or 'nodistill', got 'distil'"):
        math.get_config("distil")
    bad = math.get_config()
    bad.rewards.teacher_path = None
    with pytest.raises(ConfigError, match=r"rewards.distill=True needs rewards.teacher_path .*"
                                          r"set --config.rewards.distill=False"):
        from_config(GRPOConfig, bad)
