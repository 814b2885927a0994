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
the planner head). Both ways are compiled first by a warm-up on the same shapes and configs (the
jitted rollout compiled ahead of time, `rollout.compile_rollout`, so nothing is decoded; the
Python loop for one step), and every XLA compilation during the timed calls is counted (`compiles_during_timing`,
expected 0). The two ways are then timed alternately, `--iters` calls each, every call ended with
`block_until_ready`; per-second figures use the best call (the mean is reported too).

Per way, from the trajectory of the timed calls (same key every call, so the same trajectory):

  tokens_per_s        generated (revealed) tokens / seconds
  nfe_per_s           sum over rows of the row NFEs / seconds (a forward counts once per row)
  loop_iters_per_s    loop iterations / seconds; an iteration is one batched forward, and the loop
                      runs until the slowest row is done, so iterations = max row NFE
  mean_nfe            mean row NFE; tokens_per_forward = gen_length / mean_nfe

and `speedup` = python_loop best seconds / while_loop best seconds; `s_per_loop_iter` is the time
per NFE (one batched forward).

Every rule runs once per `--caches` mode (`decode.cache`: `none` recomputes the canvas every step;
`prefix` / `dual` use the block KV cache, `dultra_jax/decoding/cache.py`). When `none` ran first,
each cached run also reports `token_agreement_vs_none` (share of generated tokens equal to the
exact rollout's on the same prompts and key), `rows_identical_vs_none`, and
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

from dultra_jax.config import CACHE_MODES, RULES, ConfigError, DecodeConfig, ModelConfig
from dultra_jax.decoding import rollout as rollout_lib
from dultra_jax.models import policy

if __package__:
    from benchmarks import common
else:  # run as `python benchmarks/rollout.py`: the script's folder is on sys.path
    import common

_MODELS = flags.DEFINE_list("models", ["tiny"], f"Model shapes to run: any of {', '.join(common.MODEL_NAMES)} "
                            "(see the module docstring).")
_RULES = flags.DEFINE_list("rules", list(RULES), "Decoding rules to run.")
_CACHES = flags.DEFINE_list("caches", ["none"], "Block KV cache modes to run (none, prefix, dual); "
                            "`none` first gives the others a token-agreement reference.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows B.")
_PROMPT_LENGTH = flags.DEFINE_integer("prompt_length", 32, "Prompt tokens per row Lp.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 64, "Generated tokens per row Lg.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 16, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Token sampling temperature (0 = argmax).")
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
    sum_nfe, loop_iters, mean_nfe = int(nfe.sum()), int(nfe.max()), float(nfe.mean())
    return {"generated_tokens": generated, "sum_nfe": sum_nfe, "loop_iters": loop_iters, "mean_nfe": mean_nfe,
            "tokens_per_forward": config.gen_length / mean_nfe, "tokens_per_s": generated / seconds,
            "nfe_per_s": sum_nfe / seconds, "loop_iters_per_s": loop_iters / seconds,
            "s_per_loop_iter": seconds / loop_iters}


def bench_rule(name: str, model: ModelConfig, params, rule: str, cache: str, iters: int,
               seed: int) -> tuple[dict, np.ndarray]:
    """Times one (model, rule, cache); returns the figures and the generated tokens `[B, Lg]`."""
    config = DecodeConfig(rule=rule, prompt_length=_PROMPT_LENGTH.value, gen_length=_GEN_LENGTH.value,
                          block_length=_BLOCK_LENGTH.value, temperature=_TEMPERATURE.value,
                          eos_token_id=model.eos_token_id, cache=cache)
    prompts, valid = common.random_prompts(model, _BATCH.value, config.prompt_length, seed)
    rng = jax.random.key(seed + 1)
    runs = {"while_loop": (rollout_lib.rollout, common.warm_rollout),
            "python_loop": (rollout_lib.rollout_python_loop, warm_python_loop)}

    compile_s = {}
    for mode, (_, warm) in runs.items():
        start = time.perf_counter()
        warm(params, prompts, valid, rng, config, model)
        compile_s[mode] = time.perf_counter() - start

    times = {mode: [] for mode in MODES}
    trajectories = {}
    with common.CompileCounter() as compiles:
        for _ in range(iters):  # alternate the two ways, so a busy second on a shared host hits both alike
            for mode, (fn, _) in runs.items():
                start = time.perf_counter()
                trajectory = jax.block_until_ready(fn(params, prompts, valid, rng, config, model))
                times[mode].append(time.perf_counter() - start)
                trajectories[mode] = trajectory

    result = {"model": name, "rule": rule, "cache": cache, "batch": _BATCH.value, "prompt_length": config.prompt_length,
              "gen_length": config.gen_length, "block_length": config.block_length,
              "temperature": config.temperature, "compiles_during_timing": compiles.count}
    for mode in MODES:
        timing = common.Timing(compile_s[mode], tuple(times[mode]))
        result[mode] = {**timing.as_dict(), **trajectory_figures(trajectories[mode], model, config, timing.best_s)}
    result["speedup"] = result["python_loop"]["best_s"] / result["while_loop"]["best_s"]
    result["speedup_mean"] = result["python_loop"]["mean_s"] / result["while_loop"]["mean_s"]
    result["same_nfe"] = bool(np.array_equal(np.asarray(trajectories["while_loop"].num_steps),
                                             np.asarray(trajectories["python_loop"].num_steps)))
    return result, np.asarray(trajectories["while_loop"].tokens)


def compare_with_exact(result: dict, tokens: np.ndarray, exact: dict, exact_tokens: np.ndarray) -> None:
    """Adds how a cached rollout differs from the exact (`none`) one of the same rule and inputs:
    the share of generated tokens that agree, and the time per loop iteration relative to it."""
    result["token_agreement_vs_none"] = float(np.mean(tokens == exact_tokens))
    result["rows_identical_vs_none"] = int(np.sum(np.all(tokens == exact_tokens, axis=-1)))
    result["per_nfe_speedup_vs_none"] = (exact["while_loop"]["s_per_loop_iter"]
                                         / result["while_loop"]["s_per_loop_iter"])


def table_row(r: dict) -> dict:
    jit, py = r["while_loop"], r["python_loop"]
    agreement = r.get("token_agreement_vs_none")
    return {"model": r["model"], "rule": r["rule"], "cache": r["cache"], "NFE/row": f"{jit['mean_nfe']:.2f}",
            "ms/NFE": f"{1e3 * jit['s_per_loop_iter']:.2f}",
            "vs none": "" if agreement is None else f"{r['per_nfe_speedup_vs_none']:.2f}x, {100 * agreement:.1f}% same",
            "tok/fwd": f"{jit['tokens_per_forward']:.2f}", "loop ms": f"{1e3 * jit['best_s']:.1f}",
            "py ms": f"{1e3 * py['best_s']:.1f}", "speedup": f"{r['speedup']:.2f}x",
            "loop tok/s": f"{jit['tokens_per_s']:,.0f}", "py tok/s": f"{py['tokens_per_s']:,.0f}",
            "loop NFE/s": f"{jit['nfe_per_s']:,.0f}", "py NFE/s": f"{py['nfe_per_s']:,.0f}",
            "loop it/s": f"{jit['loop_iters_per_s']:,.1f}", "py it/s": f"{py['loop_iters_per_s']:,.1f}",
            "compile s": f"{jit['compile_s']:.1f}/{py['compile_s']:.1f}"}


def main(argv):
    del argv
    configs = common.model_configs(_PROMPT_LENGTH.value + _GEN_LENGTH.value)
    unknown = [m for m in _MODELS.value if m not in configs]
    if unknown:
        raise app.UsageError(f"--models: unknown model(s) {unknown}; known: {sorted(configs)}")
    unknown = [r for r in _RULES.value if r not in RULES]
    if unknown:
        raise app.UsageError(f"--rules: unknown rule(s) {unknown}; known: {', '.join(RULES)}")
    unknown = [c for c in _CACHES.value if c not in CACHE_MODES]
    if unknown:
        raise app.UsageError(f"--caches: unknown mode(s) {unknown}; known: {', '.join(CACHE_MODES)}")
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
            for cache in _CACHES.value:
                result, tokens = bench_rule(name, model, params, rule, cache, _ITERS.value, _SEED.value)
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
                "batch": _BATCH.value,
                "prompt_length": _PROMPT_LENGTH.value, "gen_length": _GEN_LENGTH.value,
                "block_length": _BLOCK_LENGTH.value, "temperature": _TEMPERATURE.value, "iters": _ITERS.value,
                "seed": _SEED.value, "dtype": _DTYPES.compute, "param_dtype": _DTYPES.storage}
    print(common.json_line({"benchmark": "rollout", **info, "settings": settings, "params": params_count,
                            "results": results}))


if __name__ == "__main__":
    app.run(main)
