r"""GRPO update: step time and peak memory for T denoising steps (does memory stay flat in T?).

    python benchmarks/train_step.py [--model=bench] [--steps=8,32,128] [--batch=4] [--iters=2]
                                    [--remat] [--prompt_length=64] [--gen_length=128]
                                    [--block_length=32] [--seed=0] [--dtype=float32]

`grpo_update` replays every denoising step of a batch with gradients: `value_and_grad` of one
step's loss inside a `lax.fori_loop` whose trip count is the batch's largest NFE, accumulating
float32 gradients. Peak memory should therefore be one forward + backward whatever T; the target
is peak(T_max) <= 1.2 x peak(T_min). This benchmark checks it and times the update.

Inputs are synthetic (no rollout): for each T, `--batch` rows of random non-mask tokens with
`--gen_length` (Lg) generated positions after `--prompt_length` (Lp) random prompt tokens. The
T row-steps are split over the Lg / block_length blocks in order (np.array_split: block b gets
s_b consecutive steps starting at start_b), and position i of block b is revealed at step
start_b + (i mod s_b). So blocks are decoded left to right, every step reveals at least one
token, and every row takes exactly T steps (`num_steps = T`, which needs
num_blocks <= T <= Lg). `DecodeConfig(rule="planner_bernoulli", max_steps=T)`, so the
`step_logps` buffer is `[B, T]`; it is filled with the log-probs that `replay_logps` gives under
the benchmarked parameters, as a rollout with those parameters would have recorded them. The
reported `metrics` (loss, grad_norm, logp_gap, ...) are those of the warm-up call, the first
update from those parameters, so `logp_gap` is ~0: a check of the synthetic trajectory. Advantages
are standard normal; `RLConfig()` defaults (beta 0: no reference model, one iteration), AdamW
from `OptimConfig()` defaults, every parameter trained.

Per T, the update is the trainer's own (`training.programs.grpo_programs(...).update`: the state
donated), lowered and compiled once:

  peak memory   from `compiled.memory_analysis()`: XLA's buffer assignment of the whole program,
                `argument + output - alias + temp` bytes (`alias`: outputs written into donated
                argument buffers, here the train state; `temp`: every intermediate, the loop's
                carry and one step's forward + backward activations). This is the peak the
                program can reach, known at compile time; it is the right measure on CPU, where
                the runtime keeps no allocator high-water mark. On a GPU (or any backend whose
                `Device.memory_stats()` has `peak_bytes_in_use`) the allocator's process-wide
                high-water mark after each T is reported too (`device_peak_bytes`; it never goes
                down, and T runs in ascending order, so a flat value means no growth).
  step time     one untimed warm-up call of the compiled update, then `--iters` timed calls
                ended with `block_until_ready`; best / mean / median seconds. Each call's
                new state is fed to the next (the state is donated). `per_step_s` = best / T:
                the cost of one replayed forward + backward.

  FLOP/s, MFU   3 x `forward_flops` per replayed step (a forward and its backward) x T /
                best seconds; MFU divides by the device's data-sheet peak where one is known
                (bfloat16 on H100, H200, A100, TPU v4 to v6: `common.PEAK_BF16_FLOPS`).

and `peak_ratio` = peak(T_max) / peak(T_min), `within_target` = peak_ratio <= 1.2. The last line
printed is one JSON object (`{"benchmark": "train_step", ...}`) with every figure.

Models (random init, with a planner; `tiny` and `small` from benchmarks/common.py):

  tiny    the tests' shape (V 64, D 32, 2 layers), for the test of this script.
  bench   the default: `small` with D 256, 4 layers, 4 heads, F 704 (V 4096; ~6.5M params).
  small   ~35M params (V 4096, D 512, 8 layers, 8 heads, F 1408).
  small_llada_vocab, llada_1b   LLaDA's vocabulary on `small`'s body; LLaDA's layout at 1.2B
          params. On a GPU, the reference shape: `--model=llada_1b --dtype=bfloat16 --prompt_length=32
          --gen_length=256 --block_length=32 --steps=8,32,128`.

With `--rollout_caches=none,dual` (for example) it also times whole GRPO steps: the trainer's
jitted rollout (`planner_bernoulli`, the same shapes, `--batch` random prompts) with each
`decode.cache` mode, then the same compiled update on the trajectory it produced (the replay is
exact whatever the cache, so the update's cost depends only on the rollout's largest NFE). Per
mode: `rollout_s`, `update_s` (best of `--iters`, the rollout modes taking turns), `step_s` =
their sum, `step_speedup_vs_none`, the rollout's `max_nfe` and the update's `logp_gap` (how far
the recorded log-probs are from the exact replay: ~0 without a cache).

`bench` is the default because `small` is too slow for 2 CPU cores: at B=4, Lp=64, Lg=128 one
replayed step (forward + backward) of `small` took ~2.8 s there, so one update at T=128 takes
about six minutes and the default run (warm-up + 2 calls at each of T = 8, 32, 128) well over
half an hour. `bench` took 0.37 s a step on a lightly loaded host (~48 s an update at T=128, the default
run ~4 minutes) and up to 0.87 s on a busy shared one (~110 s at T=128, the run ~9 minutes).
`--model=small` is for accelerators.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dultra_jax.config import ConfigError, DecodeConfig, ModelConfig, OptimConfig, RLConfig
from dultra_jax.decoding import rollout as rollout_lib
from dultra_jax.decoding.rollout import Trajectory
from dultra_jax.models import policy
from dultra_jax.models.flops import forward_flops
from dultra_jax.rl.grpo import replay_logps
from dultra_jax.sharding import make_mesh
from dultra_jax.training import programs

if __package__:
    from benchmarks import common
else:  # run as `python benchmarks/train_step.py`: the script's folder is on sys.path
    import common

MODELS = ("tiny", "bench", *common.MODEL_NAMES[1:])
PEAK_RATIO_TARGET = 1.2

_MODEL = flags.DEFINE_enum("model", "bench", list(MODELS), "Model shape (see the module docstring).")
_STEPS = flags.DEFINE_list("steps", ["8", "32", "128"], "Denoising steps T per row, one update each.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows B.")
_ITERS = flags.DEFINE_integer("iters", 2, "Timed calls per T (after one untimed warm-up call).")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise each block's activations in the backward pass.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 64, "Prompt tokens per row Lp.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 128, "Generated tokens per row Lg.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters, tokens and advantages.")
_ROLLOUT_CACHES = flags.DEFINE_list(
    "rollout_caches", [], "Also time whole GRPO steps (a real rollout + the update on its trajectory) with each of "
    "these decode.cache modes (none, prefix, dual, prefix+full, prefix+blocks, dual+full, dual+blocks); see the "
    "module docstring.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (parameters and optimiser state stay float32).")


def model_config(name: str, length: int, remat: bool, dtype: str = "float32") -> ModelConfig:
    """The `name` shape (module docstring) holding canvases of `length` tokens."""
    configs = common.model_configs(length)
    configs["bench"] = configs["small"].replace(d_model=256, n_layers=4, n_heads=4, n_kv_heads=4,
                                                mlp_hidden_size=704)
    return configs[name].replace(remat=remat, dtype=dtype)


def unmask_schedule(num_steps: int, gen_length: int, block_length: int) -> np.ndarray:
    """`[Lg]` int32 row-step revealing each position: blocks in order, >= 1 token every step.

    The steps are split over the blocks by `np.array_split` (block b gets s_b consecutive steps
    from start_b) and position i of block b is revealed at start_b + (i mod s_b).
    """
    num_blocks = gen_length // block_length
    if not num_blocks <= num_steps <= gen_length:
        raise ValueError(f"T={num_steps} steps must be between the {num_blocks} blocks and gen_length={gen_length}")
    steps = np.empty(gen_length, np.int32)
    for b, block_steps in enumerate(np.array_split(np.arange(num_steps), num_blocks)):
        start, count = int(block_steps[0]), len(block_steps)
        steps[b * block_length:(b + 1) * block_length] = start + np.arange(block_length) % count
    return steps


def synthetic_trajectory(model: ModelConfig, decode: DecodeConfig, batch: int, seed: int) -> Trajectory:
    """`batch` rows that each take exactly `decode.step_budget` steps; `step_logps` zero (filled later)."""
    rng = np.random.default_rng(seed)

    def tokens(width):
        t = rng.integers(0, model.vocab_size - 1, size=(batch, width))
        t[t >= model.mask_token_id] += 1  # never the mask id
        return jnp.asarray(t, jnp.int32)

    num_steps = decode.step_budget
    schedule = unmask_schedule(num_steps, decode.gen_length, decode.block_length)
    return Trajectory(tokens=tokens(decode.gen_length),
                      unmask_step=jnp.asarray(np.broadcast_to(schedule, (batch, decode.gen_length))),
                      num_steps=jnp.full((batch,), num_steps, jnp.int32),
                      step_logps=jnp.zeros((batch, num_steps), jnp.float32),
                      prompt_tokens=tokens(decode.prompt_length),
                      prompt_valid=jnp.ones((batch, decode.prompt_length), jnp.bool_))


def memory_figures(compiled) -> dict[str, int]:
    """XLA's buffer-assignment sizes of a compiled program and the peak they imply (docstring)."""
    stats = compiled.memory_analysis()
    figures = {"argument_bytes": int(stats.argument_size_in_bytes), "output_bytes": int(stats.output_size_in_bytes),
               "alias_bytes": int(stats.alias_size_in_bytes), "temp_bytes": int(stats.temp_size_in_bytes),
               "generated_code_bytes": int(stats.generated_code_size_in_bytes)}
    figures["peak_bytes"] = (figures["argument_bytes"] + figures["output_bytes"] - figures["alias_bytes"]
                             + figures["temp_bytes"])
    return figures


def device_peak_bytes() -> int | None:
    """The allocator's process-wide high-water mark, where the backend keeps one (GPU, TPU)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 (backends without memory stats)
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return int(stats["peak_bytes_in_use"])


def bench_steps(model: ModelConfig, params, num_steps: int, iters: int, seed: int) -> dict:
    decode = DecodeConfig(rule="planner_bernoulli", prompt_length=_PROMPT_LENGTH.value,
                          gen_length=_GEN_LENGTH.value, block_length=_BLOCK_LENGTH.value, max_steps=num_steps,
                          eos_token_id=model.eos_token_id)
    decode.check_model(model)
    batch = _BATCH.value
    rl, optim = RLConfig(), OptimConfig()
    # The trainer's own programs (`training.programs`), on this process's first device.
    state_programs = programs.state_programs(model, make_mesh(devices=jax.devices()[:1]), optim, total_steps=1000,
                                             seed=seed, keep_reference=rl.beta > 0)

    trajectory = synthetic_trajectory(model, decode, batch, seed)
    replay = jax.jit(replay_logps, static_argnames=("model", "config"))
    trajectory = trajectory.replace(step_logps=replay(params, trajectory, model=model, config=decode))
    advantages = jax.random.normal(jax.random.key(seed + 1), (batch,), jnp.float32)
    state = state_programs.init(params)

    update = programs.grpo_programs(state_programs, decode, rl).update
    start = time.perf_counter()
    compiled = update.lower(state, trajectory, advantages).compile()
    compile_s = time.perf_counter() - start
    memory = memory_figures(compiled)

    # The warm-up call runs on the parameters that recorded `step_logps`: its metrics are reported.
    state, metrics = jax.block_until_ready(compiled(state, trajectory, advantages))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(compiled(state, trajectory, advantages))
        times.append(time.perf_counter() - start)
    timing = common.Timing(compile_s, tuple(times))
    # One replayed step: a full forward and its backward, ~3x the forward's matmul FLOPs.
    step_flops = 3 * forward_flops(model, batch, decode.canvas_length)["flops"]
    return {"steps": num_steps, "revealed_per_step": decode.gen_length / num_steps, **timing.as_dict(),
            "per_step_s": timing.best_s / num_steps, "flops_per_update": step_flops * num_steps,
            "flops_per_s": step_flops * num_steps / timing.best_s, **memory, "device_peak_bytes": device_peak_bytes(),
            "metrics": {k: v.item() for k, v in jax.device_get(metrics).items()}}


def bench_grpo_steps(model: ModelConfig, params, caches: list[str], iters: int, seed: int) -> list[dict]:
    """Whole GRPO steps (rollout + update) per `decode.cache` mode (module docstring)."""
    decode = DecodeConfig(rule="planner_bernoulli", prompt_length=_PROMPT_LENGTH.value,
                          gen_length=_GEN_LENGTH.value, block_length=_BLOCK_LENGTH.value,
                          eos_token_id=model.eos_token_id)
    batch, rl, optim = _BATCH.value, RLConfig(), OptimConfig()
    state_programs = programs.state_programs(model, make_mesh(devices=jax.devices()[:1]), optim, total_steps=1000,
                                             seed=seed, keep_reference=rl.beta > 0)
    prompts, valid = common.random_prompts(model, batch, decode.prompt_length, seed)
    rng = jax.random.key(seed + 2)
    advantages = jax.random.normal(jax.random.key(seed + 1), (batch,), jnp.float32)
    update = programs.grpo_programs(state_programs, decode, rl).update  # one update serves every mode
    configs = {cache: decode.replace(**common.cache_fields(cache)) for cache in caches}
    trajectories, compile_s = {}, {}
    for cache, config in configs.items():
        start = time.perf_counter()
        rollout_lib.compile_rollout(params, prompts, valid, rng, config, model)
        compile_s[cache] = time.perf_counter() - start
        trajectories[cache] = jax.block_until_ready(rollout_lib.rollout(params, prompts, valid, rng, config, model))
    state = state_programs.init(params)
    compiled = update.lower(state, trajectories[caches[0]], advantages).compile()
    rollout_times = {cache: [] for cache in caches}
    update_times = {cache: [] for cache in caches}
    gaps = {}
    for cache in caches:  # the warm-up update of each mode, on the parameters that decoded it
        _, metrics = jax.block_until_ready(compiled(state_programs.init(params), trajectories[cache], advantages))
        gaps[cache] = float(metrics["logp_gap"])
    for _ in range(iters):
        for cache, config in configs.items():
            start = time.perf_counter()
            jax.block_until_ready(rollout_lib.rollout(params, prompts, valid, rng, config, model))
            rollout_times[cache].append(time.perf_counter() - start)
            fresh = state_programs.init(params)
            start = time.perf_counter()
            jax.block_until_ready(compiled(fresh, trajectories[cache], advantages))
            update_times[cache].append(time.perf_counter() - start)
    results = []
    for cache in caches:
        rollout_s, update_s = min(rollout_times[cache]), min(update_times[cache])
        results.append({"cache": cache, "rollout_s": rollout_s, "update_s": update_s, "step_s": rollout_s + update_s,
                        "rollout_compile_s": compile_s[cache],
                        "max_nfe": int(np.max(np.asarray(trajectories[cache].num_steps))),
                        "mean_nfe": float(np.mean(np.asarray(trajectories[cache].num_steps))),
                        "logp_gap": gaps[cache]})
    if "none" in caches:
        base = next(r for r in results if r["cache"] == "none")["step_s"]
        for r in results:
            r["step_speedup_vs_none"] = base / r["step_s"]
    return results


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2 ** 20:,.1f}"


def table_row(r: dict) -> dict:
    row = {"T": r["steps"], "tok/step": f"{r['revealed_per_step']:.2f}", "best s": f"{r['best_s']:.3f}",
           "mean s": f"{r['mean_s']:.3f}", "ms/step": f"{1e3 * r['per_step_s']:.1f}",
           "FLOP/s": common.si(r["flops_per_s"]), "MFU": "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
           "compile s": f"{r['compile_s']:.1f}", "args MiB": mib(r["argument_bytes"]),
           "out MiB": mib(r["output_bytes"]), "alias MiB": mib(r["alias_bytes"]), "temp MiB": mib(r["temp_bytes"]),
           "peak MiB": mib(r["peak_bytes"]), "logp_gap": f"{r['metrics']['logp_gap']:.1e}"}
    if r["device_peak_bytes"] is not None:
        row["device peak MiB"] = mib(r["device_peak_bytes"])
    return row


def main(argv):
    del argv
    try:
        steps = sorted({int(s) for s in _STEPS.value})
    except ValueError:
        raise app.UsageError(f"--steps={','.join(_STEPS.value)} must be integers") from None
    if not steps:
        raise app.UsageError("--steps is empty")
    if _ITERS.value < 1:
        raise app.UsageError(f"--iters={_ITERS.value} must be at least 1")
    if _BATCH.value < 1:
        raise app.UsageError(f"--batch={_BATCH.value} must be at least 1")
    unknown = [c for c in _ROLLOUT_CACHES.value if c not in common.CACHE_SPECS]
    if unknown:
        raise app.UsageError(f"--rollout_caches: unknown mode(s) {unknown}; known: {', '.join(common.CACHE_SPECS)}")
    try:
        decode = DecodeConfig(rule="planner_bernoulli", prompt_length=_PROMPT_LENGTH.value,
                              gen_length=_GEN_LENGTH.value, block_length=_BLOCK_LENGTH.value)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    bad = [t for t in steps if not decode.num_blocks <= t <= decode.gen_length]
    if bad:
        raise app.UsageError(f"--steps {bad}: every T must be between the {decode.num_blocks} blocks and "
                             f"--gen_length={decode.gen_length} (every step reveals >= 1 token)")

    model = model_config(_MODEL.value, decode.canvas_length, _REMAT.value, _DTYPE.value)
    params = jax.jit(policy.init_params, static_argnums=0)(model, jax.random.key(_SEED.value))
    params_count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    results = [bench_steps(model, params, t, _ITERS.value, _SEED.value) for t in steps]
    info = common.device_info()
    peak = common.peak_flops_per_s(info["device_kind"], _DTYPE.value)
    for result in results:
        result["mfu"] = None if peak is None else result["flops_per_s"] / peak

    low, high = results[0], results[-1]
    peak_ratio = high["peak_bytes"] / low["peak_bytes"]
    within = peak_ratio <= PEAK_RATIO_TARGET
    device_ratio = None
    if low["device_peak_bytes"] and high["device_peak_bytes"] is not None:
        device_ratio = high["device_peak_bytes"] / low["device_peak_bytes"]

    print(f"train_step benchmark on {info['device_count']} x {info['device_kind']} ({info['backend']}), "
          f"jax {info['jax_version']}")
    print(f"model {_MODEL.value} (D {model.d_model}, {model.n_layers} layers, V {model.vocab_size}, "
          f"{common.si(params_count)} params, remat {model.remat}, {model.dtype}); "
          f"B={_BATCH.value} Lp={decode.prompt_length} "
          f"Lg={decode.gen_length} block={decode.block_length}; planner_bernoulli; "
          f"best of {_ITERS.value} after a warm-up call")
    print("one jitted grpo_update per T (every row takes T steps); peak = args + out - alias + temp from XLA's "
          "buffer assignment (compiled.memory_analysis())")
    rows = [table_row(r) for r in results]
    print(common.format_table(rows, list(rows[0])))
    verdict = "within" if within else "NOT within"
    print(f"peak memory T={high['steps']} / T={low['steps']}: {peak_ratio:.3f}x ({verdict} the "
          f"{PEAK_RATIO_TARGET}x target); time T={high['steps']} / T={low['steps']}: "
          f"{high['best_s'] / low['best_s']:.2f}x")
    if _MODEL.value == "bench":
        print("bench = small (35M) shrunk to D 256 / 4 layers (~6.5M), so that T=128 runs in 1 to 2 minutes on "
              "2 CPU cores; --model=small for the small shape")
    if device_ratio is not None:
        print(f"device allocator peak after T={high['steps']} / after T={low['steps']}: {device_ratio:.3f}x")
    grpo_steps = []
    if _ROLLOUT_CACHES.value:
        grpo_steps = bench_grpo_steps(model, params, list(_ROLLOUT_CACHES.value), _ITERS.value, _SEED.value)
        rows = [{"cache": r["cache"], "rollout s": f"{r['rollout_s']:.3f}", "update s": f"{r['update_s']:.3f}",
                 "step s": f"{r['step_s']:.3f}", "vs none": f"{r.get('step_speedup_vs_none', float('nan')):.2f}x",
                 "max NFE": r["max_nfe"], "logp_gap": f"{r['logp_gap']:.1e}"} for r in grpo_steps]
        print("whole GRPO steps (rollout + update on its trajectory), best of "
              f"{_ITERS.value} each, the cache modes taking turns:")
        print(common.format_table(rows, list(rows[0])))
    settings = {"model": _MODEL.value, "steps": steps, "batch": _BATCH.value, "iters": _ITERS.value,
                "remat": _REMAT.value, "prompt_length": decode.prompt_length, "gen_length": decode.gen_length,
                "block_length": decode.block_length, "seed": _SEED.value, "dtype": _DTYPE.value}
    shape = {"vocab_size": model.vocab_size, "d_model": model.d_model, "n_layers": model.n_layers,
             "n_heads": model.n_heads, "mlp_hidden_size": model.mlp_hidden_size}
    print(common.json_line({"benchmark": "train_step", **info, "settings": settings, "model_shape": shape,
                            "params": params_count, "results": results, "grpo_steps": grpo_steps,
                            "peak_ratio": peak_ratio,
                            "peak_ratio_target": PEAK_RATIO_TARGET, "within_target": within,
                            "peak_flops_per_s": peak,
                            "device_peak_ratio": device_ratio}))


if __name__ == "__main__":
    app.run(main)
