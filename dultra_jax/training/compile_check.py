"""Ahead-of-time compilation of a run's programs for a Cloud TPU topology, on any machine with
`libtpu` installed (the `tpu` extra): memory per chip and FLOPs per step, before paying for a
slice (as MaxText's `train_compile.py`).

    report = compile_run(config, "v5litepod-8")   # every program the run executes, compiled
    print(format_report(report)); sys.exit(0 if report.fits else 1)

The run's mesh is built on the topology's devices (`jax.experimental.topologies`), the run's
start-up checks run on it, and each program comes from `training.programs` lowered on sharded
`ShapeDtypeStruct`s (no weights are read or materialised), so an 8B model is checked in host
memory of a few GiB.

Per program and chip the report gives XLA's buffer assignment (`memory_analysis`): arguments,
outputs (less those aliased into donated arguments), temporaries and code, plus the run's
resident arrays that the program does not take (the optimiser moments during the rollout, a
resident teacher), against the chip's HBM. An offloaded teacher (`rewards.teacher_offload`) is
in host memory during the rollout, the old log-probs and the update, so it counts only in its
own scoring program (as that program's arguments); the report's `teacher` line says which.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dultra_jax.config import (ConfigError, GRPOConfig, ModelConfig, PlannerInitConfig, PretrainConfig,
                               from_config, model_config_from_dict)
from dultra_jax.data.sft import get_sft_task
from dultra_jax.errors import UserError
from dultra_jax.interop import build
from dultra_jax.interop.tables import read_hf_config
from dultra_jax.models import teacher as teacher_lib
from dultra_jax.models.flops import forward_flops
from dultra_jax.rewards.distill import Teacher
from dultra_jax.sharding import make_mesh, param_shardings
from dultra_jax.training import grpo, mdlm_sft, planner_init, programs, sft

log = logging.getLogger(__name__)

GIB = 1024 ** 3


class TopologyError(UserError):
    """An accelerator type this check does not know, or no `libtpu` to compile for it."""


@dataclasses.dataclass(frozen=True)
class Generation:
    """A TPU generation: libtpu's name, chip config, HBM per JAX device, how `gcloud` counts."""

    libtpu_name: str
    chip_config: str  # "megacore": one JAX device per chip (v4, v5p)
    hbm_bytes: int
    cores_per_chip: int  # gcloud's `-N` counts TensorCores for v4 / v5p, chips for v5e / v6e
    dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)


GENERATIONS = {
    "v4": Generation("v4", "megacore", 32 * GIB, 2, 3),
    "v5p": Generation("v5", "megacore", 95 * GIB, 2, 3),
    "v5litepod": Generation("v5e", "default", 16 * GIB, 1, 2),
    "v6e": Generation("v6e", "default", 32 * GIB, 1, 2),
}
# Chips -> torus shape, as Cloud TPU lays out its slices.
SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8)}
SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A named slice: `name` as gcloud spells it, its devices (one per chip), HBM per device."""

    name: str
    devices: tuple
    hbm_bytes: int

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind


def topology(name: str, num_slices: int = 1) -> Topology:
    """The devices of a Cloud TPU accelerator type (`v4-8`, `v5p-8`, `v5litepod-16`, `v6e-8`),
    `num_slices` of them over DCN; needs `libtpu` (`pip install -e .[tpu]`)."""
    match = re.fullmatch(r"(v4|v5p|v5litepod|v6e)-(\d+)", name)
    if match is None:
        raise TopologyError(f"--topology={name!r} is not a TPU accelerator type this check knows; use one of "
                            f"{', '.join(g + '-N' for g in GENERATIONS)} (e.g. v4-8, v5p-8, v5litepod-16, v6e-8)")
    gen = GENERATIONS[match.group(1)]
    count = int(match.group(2))
    chips, rest = divmod(count, gen.cores_per_chip)
    shapes = SHAPES_3D if gen.dims == 3 else SHAPES_2D
    if rest or chips not in shapes:
        sizes = sorted(c * gen.cores_per_chip for c in shapes)
        raise TopologyError(f"--topology={name!r}: {match.group(1)} slices come in sizes {sizes}")
    shape = shapes[chips]
    # One host holds 4 chips (v4, v5p, v5e / v6e pods), or all 8 of a single-host v5e / v6e.
    per_host = (2, 4, 1) if gen.dims == 2 and chips == 8 else (min(shape[0], 2), min(shape[1], 2), 1)
    # Describing a topology loads libtpu, which otherwise takes a host-wide lock that any other JAX
    # process on this machine may hold (it tries the TPU backend first); compiling needs no TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu: optional)
        desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{gen.libtpu_name}:" + "x".join(map(str, shape)),
                                            chip_config_name=gen.chip_config, chips_per_host_bounds=per_host,
                                            num_slices=num_slices)
    except Exception as error:  # noqa: BLE001 (no libtpu, or it refuses: one line either way)
        raise TopologyError(f"--topology={name}: cannot describe the TPU topology ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}); install libtpu with "
                            f"`pip install -e .[tpu]`") from error
    return Topology(name if num_slices == 1 else f"{num_slices}x{name}", tuple(desc.devices), gen.hbm_bytes)


# --------------------------------------------------------------------------------- the report


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """One compiled program's memory per chip (bytes) and FLOPs per call (whole slice).

    `resident`: the run's arrays that stay in HBM while the program runs without being its
    arguments. `error`: the compiler's message when it could not compile (out of memory).
    """

    name: str
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0
    temporaries: int = 0
    code: int = 0
    resident: int = 0
    flops: float = 0.0
    error: str | None = None

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code + self.resident


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """Every program's report on `topology`; `teacher`: one line on the distillation teacher (its
    bytes per chip, resident or offloaded), None without one."""

    topology: Topology
    mesh: str
    programs: tuple[ProgramReport, ...]
    teacher: str | None = None

    def fits(self, program: ProgramReport) -> bool:
        return program.error is None and program.total <= self.topology.hbm_bytes

    @property
    def all_fit(self) -> bool:
        return all(self.fits(p) for p in self.programs)

    def first_failure(self) -> ProgramReport | None:
        return next((p for p in self.programs if not self.fits(p)), None)


def per_chip_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard)) * jnp.dtype(leaf.dtype).itemsize
    return total


def _compile(name: str, lowered, resident: int, flops: float) -> ProgramReport:
    try:
        memory = lowered.compile().memory_analysis()
    except Exception as error:  # noqa: BLE001 (XLA's out-of-memory and other compile errors)
        message = " ".join(str(error).split())
        return ProgramReport(name, resident=resident, flops=flops, error=message[:400])
    return ProgramReport(name, arguments=memory.argument_size_in_bytes, outputs=memory.output_size_in_bytes,
                         aliased=memory.alias_size_in_bytes, temporaries=memory.temp_size_in_bytes,
                         code=memory.generated_code_size_in_bytes, resident=resident, flops=flops)


# ------------------------------------------------------------------------------ the programs


def model_config(section: Any) -> ModelConfig:
    """The `model` section's `ModelConfig`; with `path`, the architecture of its `config.json`
    (no weights read). A path that is not a local directory falls back on the section's shapes."""
    section = dict(section.to_dict() if hasattr(section, "to_dict") else section)
    path = section.get("path")
    if path and os.path.isfile(os.path.join(path, "config.json")):
        return build.model_config(section)
    if path:
        log.warning("model.path=%s is not a local directory: compiling with the config's shapes", path)
    return model_config_from_dict({k: v for k, v in section.items() if k != "path"})


# Qwen2.5-Math-7B-Instruct's shapes (the reference's distillation teacher), for `--teacher=qwen2.5-7b`.
QWEN25_7B = dict(family="qwen2", vocab_size=152064, hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, intermediate_size=18944, rope_theta=10000.0, rms_norm_eps=1e-6)


def teacher_config(teacher: str | None, dtype: str) -> teacher_lib.TeacherConfig | None:
    """None, `qwen2.5-7b` or the reference's hub id (built-in shapes: nothing is downloaded) or an
    HF directory (its `config.json`)."""
    if not teacher or teacher == "none":
        return None
    if teacher.lower() in ("qwen2.5-7b", "qwen/qwen2.5-math-7b-instruct") and not os.path.isdir(teacher):
        return teacher_lib.TeacherConfig(**QWEN25_7B, dtype=dtype, param_dtype=dtype)
    if not os.path.isfile(os.path.join(teacher, "config.json")):
        raise ConfigError(f"teacher {teacher!r}: no config.json there; pass an HF directory or --teacher=qwen2.5-7b")
    return teacher_lib.teacher_config_from_hf(read_hf_config(teacher), dtype=dtype, param_dtype=dtype)


def _grpo_reports(config: ml_collections.ConfigDict, mesh, teacher: str | None,
                  eval_rows: int | None) -> tuple[list[ProgramReport], str | None]:
    """The GRPO run's programs, and the report's line on its teacher (None without one)."""
    cfg = programs.resolve_prompts_per_step(from_config(GRPOConfig, config), mesh.devices.size)
    grpo.check_mesh(cfg)(mesh)  # the run's own start-up checks
    model = model_config(cfg.model)
    decode = cfg.decode
    decode.check_model(model)
    state = programs.state_programs(model, mesh, cfg.optim, total_steps=cfg.total_steps, seed=cfg.seed,
                                    updates_per_step=cfg.rl.num_iterations, keep_reference=cfg.rl.beta > 0)
    step = programs.grpo_programs(state, decode, cfg.rl)
    rows = cfg.data.prompts_per_step * cfg.rl.group_size
    length = decode.prompt_length + decode.gen_length
    teacher_cfg = teacher_config(teacher if teacher is not None else
                                 (cfg.rewards.teacher_path if cfg.rewards.uses_teacher else None), cfg.rewards.teacher_dtype)
    teacher_params = None
    if teacher_cfg is not None:
        shapes = teacher_lib.teacher_abstract_params(teacher_cfg)
        teacher_params = programs.with_shardings(shapes, param_shardings(shapes, mesh))
    teacher_bytes = per_chip_bytes(teacher_params) if teacher_params is not None else 0
    teacher_note = None
    if teacher_params is not None:
        offload = cfg.rewards.teacher_offload
        teacher_note = (f"{teacher_cfg.family} teacher, {_gib(teacher_bytes)} GiB per chip: " +
                        ("offloaded to host memory between scorings (rewards.teacher_offload), on the chips in "
                         "teacher_score only" if offload else "resident beside the policy in every program"))
        log.info("%s", teacher_note)
    # An offloaded teacher is in host memory while the policy's programs run.
    resident_teacher = 0 if cfg.rewards.teacher_offload else teacher_bytes
    state_bytes, params_bytes = per_chip_bytes(state.abstract), per_chip_bytes(state.abstract.params)
    forward = forward_flops(model, rows, length)["flops"]
    budget = decode.step_budget
    reports = []
    for name, lowered in step.lower(rows).items():
        if name == "grpo_update":  # forward + backward per replayed step (+ the reference's forward)
            flops, resident = forward * budget * (3 + (cfg.rl.beta > 0)), resident_teacher
        else:
            flops, resident = forward * budget, state_bytes - params_bytes + resident_teacher
        reports.append(_compile(name, lowered, resident, flops))
    if teacher_params is not None:
        # the distillation reward pads prompts and completions to multiples of its length bucket
        bucket = next(f.default for f in dataclasses.fields(Teacher) if f.name == "length_bucket")
        widths = (-(-decode.prompt_length // bucket) * bucket, -(-decode.gen_length // bucket) * bucket)
        ids = [programs.abstract_rows(mesh, (rows, w), jnp.int32) for w in widths]
        valid = [programs.abstract_rows(mesh, (rows, w), jnp.bool_) for w in widths]
        with jax.set_mesh(mesh):  # rows over the batch axes, as the policy's programs
            lowered = teacher_lib.score_jit.lower(teacher_params, *ids, config=teacher_cfg, prompt_valid=valid[0],
                                                  completion_valid=valid[1])
        flops = 2.0 * per_chip_bytes(shapes) / jnp.dtype(teacher_cfg.param_dtype).itemsize * rows * sum(widths)
        # The policy's train state stays on the chips; the teacher is this program's arguments
        # (an offloaded teacher's device copy, made for the scoring and freed after it).
        reports.append(_compile("teacher_score", lowered, state_bytes, flops))
    if eval_rows:
        lowered = step.lower_rollout(eval_rows)  # evaluation holds the parameters only
        reports.append(_compile("evaluation", lowered, 0, forward_flops(model, eval_rows, length)["flops"] * budget))
    return reports, teacher_note


def _sft_reports(config: ml_collections.ConfigDict, mesh, planner: bool) -> list[ProgramReport]:
    cfg = from_config(PlannerInitConfig if planner else PretrainConfig, config)
    chat = cfg.data.is_chat
    if not chat and (cfg.data.prompt_length is None or cfg.data.response_length is None):
        cfg = dataclasses.replace(cfg, data=sft.with_task_defaults(cfg.data, get_sft_task(cfg.data.task)))
    sft.check_batch_size(cfg.data)(mesh)
    model = model_config(cfg.model)
    state = programs.state_programs(model, mesh, cfg.optim, total_steps=cfg.total_steps, seed=cfg.seed)
    rows = cfg.data.batch_size
    length = cfg.data.sequence_length if chat else cfg.data.prompt_length + cfg.data.response_length
    forward = forward_flops(model, rows, length)
    batch = {"tokens": ((rows, length), jnp.int32), "valid": ((rows, length), jnp.bool_)}
    if planner:
        decode = planner_init.target_decode(cfg)
        update = programs.batch_update(lambda s, b: planner_init.planner_update(
            s, b, model=model, decode=decode, tx=state.tx, corruption=cfg.data.corruption), state)
        if chat:  # each row's prompt width: its masked span starts after it
            batch["prompt_length"] = ((rows,), jnp.int32)
        # the frozen backbone's forward, then the planner's forward and backward
        name, flops = "planner_update", forward["flops"] + 2 * forward["planner_flops"]
    else:
        update = programs.batch_update(lambda s, b: mdlm_sft.mdlm_update(s, b, model=model, tx=state.tx,
                                                                         eps=cfg.mask_eps), state)
        batch["response"] = ((rows, length), jnp.bool_)
        name, flops = "mdlm_update", 3 * forward["flops"]
    return [_compile(name, programs.lower_batch_update(update, state, batch), 0, flops)]


def trainer_of(config: ml_collections.ConfigDict) -> str:
    """Which trainer a config is for: "grpo" (an `rl` section), "planner_init" (a `factor`) or
    "pretrain"."""
    if "rl" in config:
        return "grpo"
    return "planner_init" if "factor" in config else "pretrain"


def compile_run(config: ml_collections.ConfigDict, topology_name: str, *, num_slices: int = 1,
                teacher: str | None = None, eval_rows: int | None = None) -> CompileReport:
    """Compiles every program of the run `config` describes for `topology_name`.

    Args:
      teacher: for GRPO, None (the config's `rewards`), "none", "qwen2.5-7b" or an HF directory:
        the distillation teacher resident beside the policy, and its scoring program.
      eval_rows: for GRPO, also the evaluation rollout at this many rows (parameters only).
    """
    slice_ = topology(topology_name, num_slices)
    mesh_section = dict(config.get("mesh", {}) or {})
    mesh = make_mesh(**{k: mesh_section.get(k, d) for k, d in (("data", 1), ("fsdp", -1), ("tensor", 1))},
                     devices=host_contiguous(slice_.devices))
    kind = trainer_of(config)
    teacher_note = None
    if kind == "grpo":
        reports, teacher_note = _grpo_reports(config, mesh, teacher, eval_rows)
    else:
        reports = _sft_reports(config, mesh, planner=kind == "planner_init")
    return CompileReport(slice_, describe_mesh(mesh), tuple(reports), teacher=teacher_note)


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int, step: int = 1) -> int:
    """The largest multiple `n` of `step` in `[step, limit]` with `fits(n)`, for a `fits` that is
    monotone (true up to some size, false beyond); 0 when even `step` does not fit.

    Doubles from `start` (rounded to a multiple of `step`) while it fits, halves while it does
    not, then bisects between the last size that fit and the first that did not: about
    `2 log2(limit / step)` calls of `fits`, each a compilation.
    """
    size = min(max(step, start // step * step), limit)
    if fits(size):
        good, bad = size, None
        while bad is None and good < limit:
            size = min(2 * good, limit)
            good, bad = (size, None) if fits(size) else (good, size)
        if bad is None:
            return good
    else:
        good, bad = 0, size
        while good == 0 and bad > step:
            size = max(bad // 2 // step * step, step)
            good, bad = (size, bad) if fits(size) else (0, size)
        if good == 0:
            return 0
    while bad - good > step:
        middle = (good + bad) // 2 // step * step
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def largest_group_size(config: ml_collections.ConfigDict, topology_name: str, *, num_slices: int = 1,
                       teacher: str | None = None, limit: int = 64,
                       known: dict[int, bool] | None = None) -> tuple[int, dict[int, bool]]:
    """The largest `rl.group_size` up to `limit` at which every program of the GRPO run `config`
    fits `topology_name` (`largest_fitting` over whole compilations), with one prompt of G rows
    per chip of the batch axes (`data.prompts_per_step=-1`, as the reference runs one prompt per
    GPU) and the other settings as given. Sizes step by `rl.update_micro_batches`, which must
    divide each chip's rows. `known`: `{size: fits}` already compiled (at one prompt per chip),
    not compiled again. Returns `(size or 0, {size: fits} for every size tried)`."""
    tried: dict[int, bool] = {}

    def fits(size: int) -> bool:
        if known and size in known:
            tried[size] = known[size]
            return tried[size]
        trial = ml_collections.ConfigDict(config.to_dict())
        trial.rl.group_size = size
        trial.data.prompts_per_step = programs.PER_DEVICE
        tried[size] = compile_run(trial, topology_name, num_slices=num_slices, teacher=teacher).all_fit
        log.info("rl.group_size=%d on %s: %s", size, topology_name, "fits" if tried[size] else "does not fit")
        return tried[size]

    step = config.rl.get("update_micro_batches", 1)
    return largest_fitting(fits, config.rl.group_size, limit, step), tried


def host_contiguous(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Devices ordered by process, then id (each host's devices consecutive)."""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


def describe_mesh(mesh) -> str:
    return " ".join(f"{name}={size}" for name, size in mesh.shape.items())


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_report(report: CompileReport, topology_line: bool = True) -> str:
    """A table: per program and chip, GiB of arguments, outputs, temporaries, code, resident
    arrays, the total against HBM and the headroom; TFLOPs per call."""
    hbm = report.topology.hbm_bytes
    lines = []
    if topology_line:
        lines.append(f"{report.topology.name}: {len(report.topology.devices)} x {report.topology.device_kind}, "
                     f"{_gib(hbm)} GiB HBM each; mesh {report.mesh}")
        if report.teacher is not None:
            lines.append(report.teacher)
    lines.append(f"{'program':<16} {'args':>7} {'out':>7} {'temp':>7} {'code':>6} {'resident':>8} {'total':>7} "
                 f"{'headroom':>8}  {'TFLOP':>9}  fits   (GiB per chip)")
    for p in report.programs:
        if p.error is not None:
            lines.append(f"{p.name:<16} did not compile: {p.error}")
            continue
        lines.append(f"{p.name:<16} {_gib(p.arguments):>7} {_gib(p.outputs - p.aliased):>7} {_gib(p.temporaries):>7} "
                     f"{_gib(p.code):>6} {_gib(p.resident):>8} {_gib(p.total):>7} {_gib(hbm - p.total):>8}  "
                     f"{p.flops / 1e12:>9.1f}  {'yes' if report.fits(p) else 'NO'}")
    return "\n".join(lines)


def failure_line(report: CompileReport) -> str | None:
    """One line naming the first program that does not fit, its bytes and the compiler's message."""
    p = report.first_failure()
    if p is None:
        return None
    if p.error is not None:
        return f"{p.name} does not compile for {report.topology.name}: {p.error}"
    return (f"{p.name} needs {_gib(p.total)} GiB per chip ({p.total} bytes: temporaries {_gib(p.temporaries)}, "
            f"arguments {_gib(p.arguments)}, resident {_gib(p.resident)}) on {report.topology.name}, which has "
            f"{_gib(report.topology.hbm_bytes)} GiB")


def report_json(report: CompileReport, **extra: Any) -> str:
    """One JSON line: `{"compile": topology, "mesh", "hbm_bytes", "fits", "teacher", "programs":
    {name: {bytes per chip and flops, "fits", "error"}}}` and the `extra` items."""
    rows = {p.name: {"arguments": p.arguments, "outputs": p.outputs, "aliased": p.aliased, "temporaries": p.temporaries,
                     "code": p.code, "resident": p.resident, "total": p.total, "flops": p.flops,
                     "fits": report.fits(p), "error": p.error} for p in report.programs}
    return json.dumps({"compile": report.topology.name, "device_kind": report.topology.device_kind,
                       "mesh": report.mesh, "hbm_bytes": report.topology.hbm_bytes, "fits": report.all_fit,
                       "teacher": report.teacher, "programs": rows, **extra})
