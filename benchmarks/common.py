"""Shared helpers for the benchmarks: timed loops, a matmul FLOP/s reference, tables, JSON lines.

Every benchmark warms up (compiles) first, then times `iters` calls, each ended with
`jax.block_until_ready`, and reports best / mean / median seconds. Figures are compared with a
plain jitted `jnp.dot` measured in the same run, so a number means something on any machine.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dultra_jax.config import CACHE_MODES, CACHE_REFRESHES, ModelConfig, PlannerConfig


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds for the first (compiling) call and for each timed call."""

    compile_s: float
    times_s: tuple[float, ...]

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def as_dict(self) -> dict[str, float]:
        return {"compile_s": self.compile_s, "best_s": self.best_s, "mean_s": self.mean_s,
                "median_s": self.median_s, "iters": len(self.times_s)}


def time_fn(fn: Callable[..., Any], *args, iters: int = 5, warmup: int = 1, **kwargs) -> Timing:
    """Times `fn(*args, **kwargs)`: `warmup` untimed calls (the first one compiles), then `iters`.

    Each call is followed by `jax.block_until_ready` on its outputs, so asynchronous dispatch
    does not hide device time.
    """
    if iters < 1:
        raise ValueError(f"iters={iters} must be at least 1")
    start = time.perf_counter()
    jax.block_until_ready(fn(*args, **kwargs))
    compile_s = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        jax.block_until_ready(fn(*args, **kwargs))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - start)
    return Timing(compile_s, tuple(times))


def matmul_flops_per_s(n: int = 1024, iters: int = 10, dtype: Any = jnp.float32) -> dict[str, float]:
    """Best-of-`iters` FLOP/s of a jitted `[n, n] @ [n, n]` `jnp.dot` (2 n^3 FLOPs) in `dtype`."""
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), dtype)
    b = jax.random.normal(key_b, (n, n), dtype)
    timing = time_fn(jax.jit(jnp.dot), a, b, iters=iters)
    flops = 2.0 * n ** 3
    return {"n": n, "dtype": jnp.dtype(dtype).name, "flops": flops, "best_s": timing.best_s,
            "flops_per_s": flops / timing.best_s}


def device_info() -> dict[str, Any]:
    """The backend and devices this run used."""
    devices = jax.devices()
    return {"backend": jax.default_backend(), "device_kind": devices[0].device_kind,
            "device_count": len(devices), "jax_version": jax.__version__}


def si(value: float, unit: str = "") -> str:
    """`1.23e11` -> `'123.0 G'` + unit."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of `rows` (dicts of already formatted values) in `columns` order."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def json_line(record: dict[str, Any]) -> str:
    """One compact JSON line (the machine-readable last line of a benchmark's output)."""
    return json.dumps(record, sort_keys=False, separators=(",", ":"))


MODEL_NAMES = ("tiny", "small", "small_llada_vocab", "llada_1b")  # the shapes `model_configs` builds


# `--caches` entries: a `decode.cache` mode (its default refresh, `auto`), a cached one with
# `+REFRESH` for `decode.cache_refresh`.
CACHE_SPECS = CACHE_MODES + tuple(f"{cache}+{refresh}" for cache in CACHE_MODES if cache != "none"
                                  for refresh in CACHE_REFRESHES if refresh != "auto")


def cache_fields(spec: str) -> dict[str, str]:
    """A `--caches` entry (`CACHE_SPECS`: `none`, `dual`, `dual+full`, `dual+blocks`, ...) as `DecodeConfig`
    fields `{"cache", "cache_refresh"}`; ValueError for any other."""
    if spec not in CACHE_SPECS:
        raise ValueError(f"unknown cache mode {spec!r}; known: {', '.join(CACHE_SPECS)}")
    cache, _, refresh = spec.partition("+")
    return {"cache": cache, "cache_refresh": refresh or "auto"}


def model_configs(length: int) -> dict[str, ModelConfig]:
    """The benchmarks' model shapes, both with a planner, holding canvases of `length` tokens.

    `tiny`: the tests' shape (V 64, D 32, 2 layers, 4/2 heads, F 48); `small`: ~35M params
    (V 4096, D 512, 8 layers, 8 heads, F 1408); `small_llada_vocab`: `small`'s body with LLaDA's
    tokenizer (V 126,464 and its special ids; 159.9M params, 129.5M of them in `wte` and the LM
    head), where the LM head is the larger part of a full-canvas forward, as in small MDMs that
    keep a large tokenizer; `llada_1b`: LLaDA-8B's layout at 1.2B params for one accelerator
    (D 2048, 12 layers, 16 heads of 128, F 6144 = 3 D as LLaDA's, V 126,464, rope theta 5e5).
    """
    max_len = max(4096, length)
    configs = {
        "tiny": ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                            rope_theta=10000.0, max_sequence_length=max_len, mask_token_id=63, eos_token_id=1,
                            pad_token_id=1, eot_token_id=2, planner=PlannerConfig()),
        "small": ModelConfig(vocab_size=4096, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8,
                             mlp_hidden_size=1408, rope_theta=10000.0, max_sequence_length=max_len,
                             mask_token_id=4095, eos_token_id=1, pad_token_id=1, eot_token_id=2,
                             planner=PlannerConfig()),
    }
    configs["small_llada_vocab"] = configs["small"].replace(  # ModelConfig's defaults are LLaDA's ids
        vocab_size=126464, mask_token_id=ModelConfig.mask_token_id, eos_token_id=ModelConfig.eos_token_id,
        pad_token_id=ModelConfig.pad_token_id, eot_token_id=ModelConfig.eot_token_id)
    configs["llada_1b"] = ModelConfig(vocab_size=126464, d_model=2048, n_layers=12, n_heads=16, n_kv_heads=16,
                                      mlp_hidden_size=6144, max_sequence_length=max_len, planner=PlannerConfig())
    return configs


@dataclasses.dataclass(frozen=True)
class DtypeFlags:
    """A script's `--dtype` (compute) and `--param_dtype` (storage, default: `--dtype`) flags."""

    dtype: flags.FlagHolder
    param_dtype: flags.FlagHolder

    @property
    def compute(self) -> str:
        return self.dtype.value

    @property
    def storage(self) -> str:
        return self.param_dtype.value or self.dtype.value

    def apply(self, config: ModelConfig) -> ModelConfig:
        """`config` with these compute and storage dtypes."""
        return config.replace(dtype=self.compute, param_dtype=self.storage)


def define_dtype_flags() -> DtypeFlags:
    """Defines `--dtype` and `--param_dtype` (absl flags, once per script, at import)."""
    return DtypeFlags(
        dtype=flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype."),
        param_dtype=flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16"],
                                      "Storage dtype of the parameters (default: --dtype)."))


# Dense bfloat16 peak FLOP/s of one JAX device, from the vendors' data sheets (without sparsity).
# The first key contained in `device_kind` wins, so the narrower names come first. TPU v2/v3 are
# left out: a JAX device there is one of a chip's two cores.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
                   ("A100", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
                   ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))


def peak_flops_per_s(device_kind: str, dtype: str) -> float | None:
    """The data-sheet peak of one `device_kind` device for `dtype` matmuls, or None when unknown.

    Only bfloat16 has one: float32 matmuls run as TF32, bf16 passes or full float32 depending on
    the backend and `jax_default_matmul_precision`, so their peak is not one number (and CPUs
    have no entry). MFU = achieved model FLOP/s / this peak.
    """
    if dtype != "bfloat16":
        return None
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_kind), None)


class CompileCounter:
    """Counts XLA backend compilations (JAX's compile-duration monitoring event) while open."""

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration_s: float, **kwargs) -> None:
        del duration_s, kwargs
        if event == "/jax/core/compile/backend_compile_duration":
            self.count += 1

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


def random_prompts(model: ModelConfig, batch: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`[B, Lp]` int32 random tokens (never the mask id), all valid."""
    tokens = np.random.default_rng(seed).integers(0, model.vocab_size - 1, size=(batch, length))
    tokens[tokens >= model.mask_token_id] += 1
    return tokens.astype(np.int32), np.ones((batch, length), bool)


def warm_rollout(params, prompts, valid, rng, config, model: ModelConfig) -> None:
    """Compiles everything `rollout` runs, on the same shapes and configs, without decoding
    (ahead of time; the timed calls count any compilation they still trigger)."""
    from dultra_jax.decoding import rollout as rollout_lib

    rollout_lib.compile_rollout(params, prompts, valid, rng, config, model)
