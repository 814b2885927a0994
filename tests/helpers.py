"""Small shared builders for the tests: tiny configs and random parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np

from dultra_jax.config import ModelConfig, PlannerConfig
from dultra_jax.models import policy

MASK_ID = 63


def tiny_config(**overrides) -> ModelConfig:
    """A 2-layer, D=32 LLaDA with a planner and grouped-query heads (4 heads, 2 kv heads)."""
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                  rope_theta=10000.0, max_sequence_length=128, mask_token_id=MASK_ID, eos_token_id=1,
                  pad_token_id=1, eot_token_id=2, planner=PlannerConfig(), scan_layers=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def random_params(config: ModelConfig, seed: int = 0):
    """`policy.init_params` parameters (docs/algorithm.md section 1) with every bias and norm weight perturbed, so no term is trivial."""
    params = jax.jit(policy.init_params, static_argnums=0)(config, jax.random.key(seed))
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        name = jax.tree_util.keystr(path)
        if "bias" in name or "norm" in name:
            return (leaf + 0.1 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(perturb, params)


def random_canvas(batch: int, length: int, num_masked: int, seed: int = 0, vocab: int = 64) -> np.ndarray:
    """`[B, L]` random tokens (never the mask id) whose last `num_masked` positions are masks."""
    rng = np.random.default_rng(seed)
    canvas = rng.integers(0, MASK_ID, size=(batch, length)).astype(np.int32)
    if num_masked:
        canvas[:, -num_masked:] = MASK_ID
    return canvas


def task_model_dir(directory: str, task=None) -> str:
    """A random tiny LLaDA + planner over the ids of a character-level task's tokenizer (`task`: the
    module `dultra_jax.data.arithmetic` (default) or `.fill`), saved with the tokenizer like a real
    model directory (a stand-in for `assets/demo`)."""
    from dultra_jax.data import arithmetic
    from dultra_jax.interop.hf_llada import export_hf

    task = task or arithmetic
    config = tiny_config(vocab_size=task.vocab_size(), mask_token_id=task.MASK_ID,
                         eos_token_id=task.EOS_ID, pad_token_id=task.PAD_ID, eot_token_id=None)
    export_hf(policy.init_params(config, jax.random.key(0)), config, directory, dtype="float32")
    task.build_tokenizer(directory)
    return directory


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device_env() -> dict[str, str]:
    """The environment of a subprocess that runs a launcher or benchmark as a user does: one CPU
    device, not the tests' eight. conftest's fast-compile XLA flags and compilation cache stay:
    on the test models compiling dominates (the tiny GRPO run takes 31 s at XLA's defaults, 21 s
    at -O0; rebuilding the demo asset's few steps 49 s at the defaults, 37 s with both flags)."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags))


def run_benchmark(script: str, *args: str, table_marker: str | None = None) -> tuple[str, dict]:
    """Runs `benchmarks/{script}` as a user does (one CPU device, not the tests' eight).

    Returns `(stdout, the JSON object of its last line)`; a non-zero exit fails with its stderr,
    and with `table_marker` the printed table (a line before the JSON holding it) is required.
    """
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", script), *args], cwd=REPO,
                          env=one_device_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"benchmarks/{script} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    lines = proc.stdout.strip().splitlines()
    if table_marker is not None:
        assert any(table_marker in line for line in lines[:-1]), proc.stdout  # the table came first
    return proc.stdout, json.loads(lines[-1])
