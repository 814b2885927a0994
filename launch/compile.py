r"""Ahead-of-time compilation of a run's programs for a Cloud TPU slice, on this machine (no TPU):
memory per chip and FLOPs per step, before paying for the slice.

    python launch/compile.py --config=configs/math.py --topology=v5litepod-8 [--config.x.y=value ...]
        [--teacher=qwen2.5-7b|none|HF_DIR] [--eval_rows=N] [--num_slices=1] [--largest_group_size=LIMIT]

`--topology` is an accelerator type as `gcloud` spells it (`v4-8`, `v5p-8`, `v5litepod-16`,
`v6e-8`). The config is any trainer's (GRPO, planner initialisation, pretraining); its mesh
section, start-up checks and programs are the run's own, compiled with their real shardings from
abstract shapes (nothing is loaded: `model.path`, when a local directory, gives the architecture).
Needs `libtpu` (`pip install -e .[tpu]`).

Prints per program and chip: arguments, outputs, temporaries, code, the run's other resident
arrays (a resident teacher among them; an offloaded one, `--config.rewards.teacher_offload=True`,
only in its scoring program), total against HBM, headroom, and the analytic TFLOPs of one call;
then one JSON line with the same figures in bytes. With `--largest_group_size=LIMIT` (GRPO) it then searches the largest
`rl.group_size` up to LIMIT at which every program fits (doubling, then bisecting: each size
tried is one more compilation of the run) and prints it, also as `largest_group_size` in the JSON
line. Exit status 0 when
every program fits, 1 naming the first that does not (its bytes, or the compiler's message), 2
for a mistake in the flags or the config.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU from the host CPU, not on a TPU

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dultra_jax import cli  # noqa: E402
from dultra_jax.errors import ConfigError  # noqa: E402
from dultra_jax.training.compile_check import (compile_run, failure_line, format_report, largest_group_size,  # noqa: E402
                                               report_json, trainer_of)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU accelerator type, e.g. v5litepod-8.", required=True)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices over DCN (multi-slice).")
_TEACHER = flags.DEFINE_string("teacher", None, "GRPO: the distillation teacher: qwen2.5-7b, none or an HF directory "
                                                "(default: the config's rewards.teacher_path); resident beside the "
                                                "policy, or in host memory between scorings with "
                                                "--config.rewards.teacher_offload=True.")
_EVAL_ROWS = flags.DEFINE_integer("eval_rows", None, "GRPO: also compile the evaluation rollout at this many rows.")
_LARGEST_GROUP_SIZE = flags.DEFINE_integer("largest_group_size", 0, "GRPO: also find the largest rl.group_size up to "
                                           "this limit at which every program fits (0: no search).")


def main() -> None:
    search = _LARGEST_GROUP_SIZE.value
    if search and trainer_of(_CONFIG.value) != "grpo":
        raise ConfigError("--largest_group_size applies to GRPO configs (an rl section) only")
    report = compile_run(_CONFIG.value, _TOPOLOGY.value, num_slices=_NUM_SLICES.value, teacher=_TEACHER.value,
                         eval_rows=_EVAL_ROWS.value)
    print(format_report(report))
    extra = {}
    if search:
        # The report above is the search's first size when it ran the same programs.
        same_run = _CONFIG.value.data.prompts_per_step == -1 and not _EVAL_ROWS.value
        size, tried = largest_group_size(_CONFIG.value, _TOPOLOGY.value, num_slices=_NUM_SLICES.value,
                                         teacher=_TEACHER.value, limit=search,
                                         known={_CONFIG.value.rl.group_size: report.all_fit} if same_run else None)
        sizes = ", ".join(f"{g} {'fits' if ok else 'no'}" for g, ok in tried.items())
        print(f"largest rl.group_size that fits {_TOPOLOGY.value} (up to {search}): {size or 'none'} (tried: {sizes})")
        extra = {"largest_group_size": size, "group_sizes_tried": {str(g): ok for g, ok in tried.items()}}
    print(report_json(report, **extra))
    failure = failure_line(report)
    if failure is not None:
        sys.stderr.write(f"{cli.program_name()}: {failure}\n")
        sys.exit(1)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run(main)
