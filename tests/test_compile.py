"""Ahead-of-time compilation for a TPU topology on the CPU (needs libtpu, the `tpu` extra): the
tiny config's programs compile and fit; a config that cannot fit exits 1 naming its program."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("libtpu")

from configs import planner_init, tiny  # noqa: E402
from dultra_jax.training import compile_check  # noqa: E402
from tests.helpers import REPO, one_device_env  # noqa: E402


def test_the_tiny_grpo_run_compiles_and_fits_on_a_small_slice():
    report = compile_check.compile_run(tiny.get_config(), "v5litepod-4", eval_rows=8)
    assert report.topology.device_kind == "TPU v5 lite" and len(report.topology.devices) == 4
    assert report.mesh == "data=1 fsdp=4 tensor=1"
    assert [p.name for p in report.programs] == ["rollout", "grpo_update", "evaluation"]
    assert report.all_fit and compile_check.failure_line(report) is None
    update = report.programs[1]
    assert update.error is None and update.arguments > 0 and update.temporaries > 0
    assert update.aliased > 0  # the donated train state is updated in place on the TPU too
    assert 0 < update.total < 64 * 2 ** 20 and update.flops > report.programs[0].flops > 0


def test_unknown_topologies_and_sizes_are_one_line_errors():
    with pytest.raises(compile_check.TopologyError, match=r"--topology='a100-8' is not a TPU accelerator type"):
        compile_check.topology("a100-8")
    with pytest.raises(compile_check.TopologyError, match=r"--topology='v4-6': v4 slices come in sizes \[8, 16"):
        compile_check.topology("v4-6")


def test_a_config_that_cannot_fit_exits_1_naming_its_program():
    # ~3B float32 parameters and their Adam moments: far beyond one v5e chip's 16 GiB.
    command = [sys.executable, "launch/compile.py", "--config=configs/tiny.py", "--topology=v5litepod-1",
               "--config.model.d_model=8192", "--config.model.mlp_hidden_size=32768", "--config.model.n_heads=64",
               "--config.model.n_kv_heads=64", "--config.rl.group_size=2", "--config.data.prompts_per_step=1"]
    result = subprocess.run(command, cwd=REPO, env=one_device_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    last = [line for line in result.stderr.splitlines() if line.startswith("compile.py: ")][-1]
    assert last.startswith("compile.py: rollout ") and "v5litepod-1" in last, last
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["fits"] is False and summary["programs"]["rollout"]["fits"] is False


def test_the_planner_initialisation_step_compiles_with_its_frozen_backbone():
    config = planner_init.get_config()
    config.model.path = "/no/such/base"  # not a local directory: the demo's shapes, nothing read
    report = compile_check.compile_run(config, "v5litepod-4")
    (update,) = report.programs
    assert update.name == "planner_update" and update.error is None and report.all_fit
    assert update.aliased > 0 and update.temporaries > 0
