"""Ahead-of-time compilation for a TPU topology on the CPU (needs libtpu, the `tpu` extra): the
tiny config's programs compile and fit; a config that cannot fit exits 1 naming its program; the
search for the largest group size that fits."""

import importlib.util
import json
import subprocess
import sys

import pytest

from configs import planner_init, tiny
from dultra_jax.training import compile_check
from dultra_jax.training.compile_check import largest_fitting
from tests.helpers import REPO, one_device_env


@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize("start", [1, 4, 12, 64])
def test_the_largest_fitting_size_is_found_in_few_compilations(start, step):
    """Against every boundary: the answer is the largest multiple of `step` that fits (0 if none),
    after at most 2 log2(64 / step) + 2 trials."""
    for boundary in range(0, 70):
        trials = []

        def fits(size):
            trials.append(size)
            return size <= boundary

        want = max((n for n in range(step, 65, step) if n <= boundary), default=0)
        assert largest_fitting(fits, start, 64, step) == want, (boundary, trials)
        assert all(n % step == 0 and step <= n <= 64 for n in trials) and len(trials) <= 14, trials


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="compiling for a TPU needs libtpu (the tpu extra)")


@needs_libtpu
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


@needs_libtpu
def test_an_offloaded_teacher_is_resident_only_while_it_scores(tmp_path, monkeypatch):
    """With `rewards.teacher_offload` the teacher's bytes leave the rollout's and the update's
    resident arrays; its scoring program is the same either way (the teacher as its arguments)."""
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(dict(
        model_type="qwen2", vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48)))
    reports = {}
    for offload in (False, True):
        config = tiny.get_config()
        config.data.prompts_per_step = 1  # programs no other test compiles (persistent-cache hits warn)
        config.rewards.teacher_offload = offload
        reports[offload] = compile_check.compile_run(config, "v5litepod-4", teacher=str(teacher))
        # The offloaded run lowers the same programs: its figures need no second compilation (which
        # would also hit the persistent cache, unreadable without a TPU client, and warn).
        monkeypatch.setattr(compile_check, "_compile", lambda name, lowered, resident, flops:
                            compile_check.ProgramReport(name, resident=resident, flops=flops))
    resident, offloaded = ({p.name: p for p in reports[k].programs} for k in (False, True))
    assert list(resident) == list(offloaded) == ["rollout", "grpo_update", "teacher_score"]
    assert reports[False].all_fit and resident["teacher_score"].arguments > 0
    teacher_bytes = resident["grpo_update"].resident - offloaded["grpo_update"].resident
    assert teacher_bytes > 0 and offloaded["grpo_update"].resident == 0
    assert resident["rollout"].resident - offloaded["rollout"].resident == teacher_bytes
    assert resident["teacher_score"].resident == offloaded["teacher_score"].resident > 0
    assert "offloaded to host memory" in reports[True].teacher and "resident" in reports[False].teacher
    assert reports[True].teacher in compile_check.format_report(reports[True]).splitlines()
    assert json.loads(compile_check.report_json(reports[True]))["teacher"] == reports[True].teacher


@needs_libtpu
def test_unknown_topologies_and_sizes_are_one_line_errors():
    with pytest.raises(compile_check.TopologyError, match=r"--topology='a100-8' is not a TPU accelerator type"):
        compile_check.topology("a100-8")
    with pytest.raises(compile_check.TopologyError, match=r"--topology='v4-6': v4 slices come in sizes \[8, 16"):
        compile_check.topology("v4-6")


@needs_libtpu
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


@needs_libtpu
def test_the_planner_initialisation_step_compiles_with_its_frozen_backbone():
    config = planner_init.get_config()
    config.model.path = "/no/such/base"  # not a local directory: the demo's shapes, nothing read
    report = compile_check.compile_run(config, "v5litepod-4")
    (update,) = report.programs
    assert update.name == "planner_update" and update.error is None and report.all_fit
    assert update.aliased > 0 and update.temporaries > 0


@needs_libtpu
def test_the_largest_group_size_search_compiles_the_run_at_each_size():
    size, tried = compile_check.largest_group_size(tiny.get_config(), "v5litepod-4", limit=8)
    assert size == 8 and tried == {4: True, 8: True}  # the tiny run fits at its own G 4, then at 8


def test_the_group_size_search_is_refused_for_a_trainer_without_groups():
    command = [sys.executable, "launch/compile.py", "--config=configs/planner_init.py", "--topology=v5litepod-4",
               "--largest_group_size=8"]
    result = subprocess.run(command, cwd=REPO, env=one_device_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--largest_group_size applies to GRPO configs (an rl section) only" in result.stderr.splitlines()[-1]
