r"""Rollout throughput: the jitted `lax.while_loop` rollout against the same decoding driven from Python.

    python benchmarks/rollout.py [--models=tiny] [--rules=planner_bernoulli,...] [--batch=4]
                                 [--prompt_length=32] [--gen_length=64] [--block_length=16]
                                 [--temperature=0.0] [--iters=3] [--seed=0] [--caches=none,prefix,dual]
                                 [--dtype=float32] [--param_dtype=...]

For every model in `--models` (the shapes of benchmarks/common.py: `tiny`, the tests' shape;
`small`, ~35M params; `small_llada_vocab`; `llada_1b`; all random-init with a planner) and every
decoding rule, `--batch` random prompts of `--prompt_length` tokens are decoded to `--gen_length`
tokens in blocks of `--block_length` two ways, in the same run and on the same inputs:

  while_loop    `rollout(...)`: the whole decoding is one jitted `lax.while_loop`.
  python_loop   `rollout_python_loop(...)`: a Python loop calling a jitted step once per NFE and
                reading the stop condition back to the host every iteration (how the PyTorch
                implementations run); the baseline.

Rules take their defaults (`low_confidence` / `random`: one token per step; the planner rules use
the planner head). `--ways=while_loop` leaves the Python loop out (it doubles the run time). Every
(cache mode, way) of a rule is compiled first by a warm-up on the same shapes and configs (the
jitted rollout compiled ahead of time, `rollout.compile_rollout`, so nothing is decoded; the
Python loop for one step), and every XLA compilation during the timed calls is counted
(`compiles_during_timing`, expected 0). The timed calls then take turns, `--iters` rounds each
running every cache mode and way once, every call ended with `block_until_ready`, so a busy
stretch of a shared host hits all of them alike; per-second figures use the best call (the
mean is reported too).

Per way, from the trajectory of the timed calls (same key every call, so the same trajectory):

  tokens_per_s        generated (revealed) tokens / seconds
  nfe_per_s           sum over rows of the row NFEs / seconds (a forward counts once per row)
  loop_iters_per_s    loop iterations / seconds; an iteration is one batched forward. Without a
                      cache the loop runs until the slowest row is done, so iterations = max row
                      NFE; with one the rows take each block together, so iterations = the sum
                      over blocks of the slowest row's steps there (`rollout.loop_iterations`)
  mean_nfe            mean row NFE; tokens_per_forward = gen_length / mean_nfe

and (with both ways) `speedup` = python_loop best seconds / while_loop best seconds; `s_per_loop_iter` is the time
per NFE (one batched forward).

Every rule runs once per `--caches` mode (`decode.cache`: `none` recomputes the canvas every step;
`prefix` / `dual` use the block KV cache, `dultra_jax/decoding/cache.py`, with its default
refresh, `auto`: `blocks` under the planner rules, `full` under the others; `prefix+full`,
`dual+blocks`, ... set `decode.cache_refresh`). When `none` ran first,
each cached run also reports `token_agreement_vs_none` (share of generated tokens equal to the
exact rollout's on the same prompts and key), `rows_identical_vs_none`,
`batch_speedup_vs_none` (exact / cached best seconds for the whole batch) and
`per_nfe_speedup_vs_none` (exact time per NFE / cached time per NFE). The reference shape (gen 256,
block 32) is `--models=small --gen_length=256 --block_length=32 --caches=none,prefix,dual`, and on a GPU
`--models=llada_1b --dtype=bfloat16` with the same lengths (`llada_1b`: LLaDA's layout at 1.2B params,
benchmarks/common.py). The last line printed is one JSON object (`{"benchmark": "rollout", ...}`) with
every figure.

`--models` defaults to `tiny` alone, which finishes in 1 to 2 minutes on 2 CPU cores (mostly
compiling: two programs per rule). `small` is for accelerators (`--models=tiny,small`): on 2 idle
CPU cores one of its batched forwards takes ~0.2 s at the default shape and ~0.6 s at the
reference shape (Lp 32, gen 256), where `--rules=low_confidence --iters=1` with all three caches takes
11 minutes.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from dultra_jax.config import RULES, ConfigError, DecodeConfig, ModelConfig
from dultra_jax.decoding import rollout as rollout_lib
from dultra_jax.models import policy

if __package__:
    from benchmarks import common
else:  # run as `python benchmarks/rollout.py`: the script's folder is on sys.path
    import common

_MODELS = flags.DEFINE_list("models", ["tiny"], f"Model shapes to run: any of {', '.join(common.MODEL_NAMES)} "
                            "(see the module docstring).")
_RULES = flags.DEFINE_list("rules", list(RULES), "Decoding rules to run.")
_CACHES = flags.DEFINE_list("caches", ["none"], "Block KV cache modes to run (none, prefix, dual: the default "
                            "refresh, auto; prefix+full, prefix+blocks, dual+full, dual+blocks: that "
                            "decode.cache_refresh); "
                            "`none` first gives the others a token-agreement reference.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows B.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 32, "Prompt tokens per row Lp.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 64, "Generated tokens per row Lg.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 16, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Token sampling temperature (0 = argmax).")
_WAYS = flags.DEFINE_list("ways", ["while_loop", "python_loop"], "Ways to time: while_loop and/or python_loop "
                         "(the Python loop doubles the run time; `speedup` needs both).")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed calls of each way (after the compiling warm-up).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the parameters, the prompts and the rollout key.")
_DTYPES = common.define_dtype_flags()

MODES = ("while_loop", "python_loop")


def warm_python_loop(params, prompts, valid, rng, config: DecodeConfig, model: ModelConfig) -> None:
    """Compiles everything `rollout_python_loop` runs, on the same shapes, by taking one step."""
    tokens, valid = rollout_lib.check_prompts(prompts, valid, model, config)
    state = rollout_lib.init_state_jit(tokens, valid, rng, model=model, config=config)
    bool(rollout_lib.keep_going(state, config))
    state = rollout_lib.denoise_step_jit(params, state, model=model, config=config)
    bool(rollout_lib.keep_going(state, config))
    jax.block_until_ready(rollout_lib.to_trajectory(state, config))


def trajectory_figures(trajectory: rollout_lib.Trajectory, model: ModelConfig, config: DecodeConfig,
                       seconds: float) -> dict:
    """Counts off a finished trajectory, and their rates over `seconds`."""
    nfe = np.asarray(trajectory.num_steps)
    generated = int(np.sum(np.asarray(trajectory.tokens) != model.mask_token_id))
    sum_nfe, loop_iters, mean_nfe = int(nfe.sum()), int(rollout_lib.loop_iterations(trajectory, config)), float(nfe.mean())
    return {"generated_tokens": generated, "sum_nfe": sum_nfe, "loop_iters": loop_iters, "mean_nfe": mean_nfe,
            "tokens_per_forward": config.gen_length / mean_nfe, "tokens_per_s": generated / seconds,
            "nfe_per_s": sum_nfe / seconds, "loop_iters_per_s": loop_iters / seconds,
            "s_per_loop_iter": seconds / loop_iters}


def bench_rule(name: str, model: ModelConfig, params, rule: str, caches: list[str], iters: int,
               seed: int) -> list[tuple[dict, np.ndarray]]:
    """Times one (model, rule) under every cache mode; returns per mode the figures and the
    generated tokens `[B, Lg]`. Every (mode, way) is compiled first; the timed calls then take
    turns (each round runs every mode and way once), so a busy stretch on a shared host hits all
    of them alike and their ratios hold up better than their absolute times."""
    prompts, valid = common.random_prompts(model, _BATCH.value, _PROMPT_LENGTH.value, seed)
    rng = jax.random.key(seed + 1)
    ways = {"while_loop": (rollout_lib.rollout, common.warm_rollout),
            "python_loop": (rollout_lib.rollout_python_loop, warm_python_loop)}
    ways = {mode: ways[mode] for mode in MODES if mode in _WAYS.value}
    configs = {cache: DecodeConfig(rule=rule, prompt_length=_PROMPT_LENGTH.value, gen_length=_GEN_LENGTH.value,
                                   block_length=_BLOCK_LENGTH.value, temperature=_TEMPERATURE.value,
                                   eos_token_id=model.eos_token_id, **common.cache_fields(cache)) for cache in caches}

    compile_s = {}
    for cache, config in configs.items():
        for mode, (_, warm) in ways.items():
            start = time.perf_counter()
            warm(params, prompts, valid, rng, config, model)
            compile_s[cache, mode] = time.perf_counter() - start

    times = {key: [] for key in compile_s}
    trajectories = {}
    compiles = {cache: 0 for cache in caches}
    for _ in range(iters):
        for cache, config in configs.items():
            with common.CompileCounter() as counter:
                for mode, (fn, _) in ways.items():
                    start = time.perf_counter()
                    trajectory = jax.block_until_ready(fn(params, prompts, valid, rng, config, model))
                    times[cache, mode].append(time.perf_counter() - start)
                    trajectories[cache, mode] = trajectory
            compiles[cache] += counter.count

    out = []
    for cache, config in configs.items():
        result = {"model": name, "rule": rule, "cache": cache, "batch": _BATCH.value,
                  "prompt_length": config.prompt_length, "gen_length": config.gen_length,
                  "block_length": config.block_length, "temperature": config.temperature,
                  "compiles_during_timing": compiles[cache]}
        for mode in ways:
            timing = common.Timing(compile_s[cache, mode], tuple(times[cache, mode]))
            result[mode] = {**timing.as_dict(),
                            **trajectory_figures(trajectories[cache, mode], model, config, timing.best_s)}
        if len(ways) == 2:
            result["speedup"] = result["python_loop"]["best_s"] / result["while_loop"]["best_s"]
            result["speedup_mean"] = result["python_loop"]["mean_s"] / result["while_loop"]["mean_s"]
            result["same_nfe"] = bool(np.array_equal(np.asarray(trajectories[cache, "while_loop"].num_steps),
                                                     np.asarray(trajectories[cache, "python_loop"].num_steps)))
        out.append((result, np.asarray(trajectories[cache, "while_loop"].tokens)))
    return out


def compare_with_exact(result: dict, tokens: np.ndarray, exact: dict, exact_tokens: np.ndarray) -> None:
    """Adds how a cached rollout differs from the exact (`none`) one of the same rule and inputs:
    the share of generated tokens that agree, and the time per loop iteration relative to it."""
    result["token_agreement_vs_none"] = float(np.mean(tokens == exact_tokens))
    result["rows_identical_vs_none"] = int(np.sum(np.all(tokens == exact_tokens, axis=-1)))
    result["per_nfe_speedup_vs_none"] = (exact["while_loop"]["s_per_loop_iter"]
                                         / result["while_loop"]["s_per_loop_iter"])
    result["batch_speedup_vs_none"] = exact["while_loop"]["best_s"] / result["while_loop"]["best_s"]


def table_row(r: dict) -> dict:
    jit, py = r["while_loop"], r.get("python_loop")
    agreement = r.get("token_agreement_vs_none")
    row = {"model": r["model"], "rule": r["rule"], "cache": r["cache"], "NFE/row": f"{jit['mean_nfe']:.2f}",
           "ms/NFE": f"{1e3 * jit['s_per_loop_iter']:.2f}",
           "vs none": "" if agreement is None else (f"{r['batch_speedup_vs_none']:.2f}x batch, "
                                                    f"{r['per_nfe_speedup_vs_none']:.2f}x/NFE, "
                                                    f"{100 * agreement:.1f}% same"),
           "tok/fwd": f"{jit['tokens_per_forward']:.2f}", "loop ms": f"{1e3 * jit['best_s']:.1f}",
           "loop tok/s": f"{jit['tokens_per_s']:,.0f}", "loop NFE/s": f"{jit['nfe_per_s']:,.0f}",
           "loop it/s": f"{jit['loop_iters_per_s']:,.1f}", "compile s": f"{jit['compile_s']:.1f}"}
    if py is not None:
        row.update({"py ms": f"{1e3 * py['best_s']:.1f}", "speedup": f"{r['speedup']:.2f}x",
                    "py tok/s": f"{py['tokens_per_s']:,.0f}", "py NFE/s": f"{py['nfe_per_s']:,.0f}",
                    "py it/s": f"{py['loop_iters_per_s']:,.1f}",
                    "compile s": f"{jit['compile_s']:.1f}/{py['compile_s']:.1f}"})
    return row


def main(argv):
    del argv
    configs = common.model_configs(_PROMPT_LENGTH.value + _GEN_LENGTH.value)
    unknown = [m for m in _MODELS.value if m not in configs]
    if unknown:
        raise app.UsageError(f"--models: unknown model(s) {unknown}; known: {sorted(configs)}")
    unknown = [r for r in _RULES.value if r not in RULES]
    if unknown:
        raise app.UsageError(f"--rules: unknown rule(s) {unknown}; known: {', '.join(RULES)}")
    unknown = [c for c in _CACHES.value if c not in common.CACHE_SPECS]
    if unknown:
        raise app.UsageError(f"--caches: unknown mode(s) {unknown}; known: {', '.join(common.CACHE_SPECS)}")
    unknown = [w for w in _WAYS.value if w not in MODES]
    if unknown or "while_loop" not in _WAYS.value:
        raise app.UsageError(f"--ways={','.join(_WAYS.value)}: list while_loop and optionally python_loop")
    if _ITERS.value < 1:
        raise app.UsageError(f"--iters={_ITERS.value} must be at least 1")
    try:  # flag values the decoding rejects (gen_length not a multiple of block_length, ...)
        for rule in _RULES.value:
            DecodeConfig(rule=rule, prompt_length=_PROMPT_LENGTH.value, gen_length=_GEN_LENGTH.value,
                         block_length=_BLOCK_LENGTH.value, temperature=_TEMPERATURE.value)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None

    results, params_count = [], {}
    for name in _MODELS.value:
        model = _DTYPES.apply(configs[name])
        params = jax.jit(policy.init_params, static_argnums=0)(model, jax.random.key(_SEED.value))
        params_count[name] = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
        for rule in _RULES.value:
            exact = None
            for result, tokens in bench_rule(name, model, params, rule, list(_CACHES.value), _ITERS.value,
                                             _SEED.value):
                cache = result["cache"]
                if cache == "none":
                    exact = (result, tokens)
                elif exact is not None:
                    compare_with_exact(result, tokens, *exact)
                results.append(result)

    info = common.device_info()
    print(f"rollout benchmark on {info['device_count']} x {info['device_kind']} ({info['backend']}), "
          f"jax {info['jax_version']}")
    print(f"B={_BATCH.value} Lp={_PROMPT_LENGTH.value} Lg={_GEN_LENGTH.value} block={_BLOCK_LENGTH.value} "
          f"T={_TEMPERATURE.value} {_DTYPES.compute}; models: "
          + ", ".join(f"{n} ({common.si(c)} params)" for n, c in params_count.items())
          + f"; best of {_ITERS.value} after a compiling warm-up")
    print("loop = jitted lax.while_loop rollout; py = Python loop of jitted steps; speedup = py / loop "
          "(best call); it = loop iteration (one batched forward)")
    rows = [table_row(r) for r in results]
    print(common.format_table(rows, list(rows[0])))
    recompiled = [f"{r['model']}/{r['rule']}/{r['cache']}" for r in results if r["compiles_during_timing"]]
    if recompiled:
        print(f"warning: XLA compiled during the timed calls of {', '.join(recompiled)}")
    settings = {"models": list(_MODELS.value), "rules": list(_RULES.value), "caches": list(_CACHES.value),
                "ways": list(_WAYS.value), "batch": _BATCH.value,
                "prompt_length": _PROMPT_LENGTH.value, "gen_length": _GEN_LENGTH.value,
                "block_length": _BLOCK_LENGTH.value, "temperature": _TEMPERATURE.value, "iters": _ITERS.value,
                "seed": _SEED.value, "dtype": _DTYPES.compute, "param_dtype": _DTYPES.storage}
    print(common.json_line({"benchmark": "rollout", **info, "settings": settings, "params": params_count,
                            "results": results}))


if __name__ == "__main__":
    app.run(main)
