r"""Forward-pass throughput of the policy (backbone + planner): tokens/s and achieved FLOP/s.

    python benchmarks/forward.py [--configs=tiny,small] [--batch=4] [--length=256] [--iters=5]
                                 [--dtype=float32]

Each config is jitted `policy_apply(params, canvas, config)` (one NFE) on a `[B, L]` canvas with
half its positions masked, compiled first, then timed over `--iters` calls ended with
`block_until_ready`; figures use the best call. A jitted f32 `jnp.dot` of `--matmul_size`^3 is
measured in the same run (before and after the models, best kept) as the reference peak. The last line printed is one JSON object
(`{"benchmark": "forward", ...}`) with every figure.

Model FLOPs per forward are counted analytically (multiply-adds count 2):

    FLOPs = 2 * N_mm * B * L                      every per-token matmul: the Linear kernels of the
                                                  n_layers blocks, the LM head ff_out [D, V], and the
                                                  planner's block, AdaLN modulations [D, 2D] x 2 and
                                                  mask_linear [D, 1] (embedding lookups count 0)
          + 2 * B * (F * D + D * D)               planner timestep MLP, once per row (F = freq_dim)
          + 4 * B * L^2 * D_attn * n_attn         attention scores QK^T and the weighted sum AV,
                                                  D_attn = n_heads * head_dim, n_attn = n_layers
                                                  (+1 with the planner block)

`N_mm` is read off the parameter tree (every `.../kernel` leaf outside the timestep MLP), so
the count follows the model. Norms, RoPE, softmax and activations are left out (they are not
matmuls), so the figure is a slight underestimate of the work done.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dultra_jax.config import ModelConfig
from dultra_jax.models import policy
from dultra_jax.sharding import path_str

if __package__:
    from benchmarks import common
else:  # run as `python benchmarks/forward.py`: the script's folder is on sys.path
    import common

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "small"],
                              f"Model configs to run: any of {', '.join(common.MODEL_NAMES)}.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows B.")
_LENGTH = flags.DEFINE_integer("length", 256, "Canvas length L.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations (after one compiling call).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (parameters stay float32).")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 1024, "n of the n x n x n reference matmul.")
_MATMUL_ITERS = flags.DEFINE_integer("matmul_iters", 10, "Timed iterations of the reference matmul.")


def forward_flops(config: ModelConfig, batch: int, length: int) -> dict[str, float]:
    """Analytic FLOPs of one `policy_apply` on `[batch, length]` (formula in the module docstring)."""
    flat = jax.tree_util.tree_flatten_with_path(policy.abstract_params(config))[0]
    per_token, per_row, total_params = 0, 0, 0
    for path, leaf in flat:
        name = path_str(path)
        size = int(np.prod(leaf.shape))
        total_params += size
        if name.endswith("/kernel"):
            if name.startswith("planner/time_embedding/"):
                per_row += size
            else:
                per_token += size
    n_attn = config.n_layers + (1 if config.has_planner else 0)
    d_attn = config.n_heads * config.head_dim
    matmul = 2.0 * per_token * batch * length + 2.0 * per_row * batch
    attention = 4.0 * batch * length ** 2 * d_attn * n_attn
    return {"params": total_params, "matmul_params": per_token, "matmul_flops": matmul,
            "attention_flops": attention, "flops": matmul + attention}


def bench_config(name: str, config: ModelConfig, batch: int, length: int, iters: int) -> dict:
    params = jax.jit(policy.init_params, static_argnums=0)(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    canvas = rng.integers(0, config.vocab_size - 1, size=(batch, length)).astype(np.int32)
    canvas[:, length // 2:] = config.mask_token_id
    canvas = jnp.asarray(canvas)
    apply = jax.jit(lambda p, c: policy.policy_apply(p, c, config))
    timing = common.time_fn(apply, params, canvas, iters=iters)
    flops = forward_flops(config, batch, length)
    return {"config": name, "batch": batch, "length": length, "dtype": config.dtype,
            "params": flops["params"], "flops_per_forward": flops["flops"],
            "attention_flops_per_forward": flops["attention_flops"], **timing.as_dict(),
            "tokens_per_s": batch * length / timing.best_s, "flops_per_s": flops["flops"] / timing.best_s}


def main(argv):
    del argv
    configs = common.model_configs(_LENGTH.value)
    unknown = [c for c in _CONFIGS.value if c not in configs]
    if unknown:
        raise app.UsageError(f"--configs: unknown config(s) {unknown}; known: {sorted(configs)}")
    # The reference is measured before and after the models and the better run kept: on a shared
    # machine one measurement can land in someone else's busy second.
    before = common.matmul_flops_per_s(_MATMUL_SIZE.value, _MATMUL_ITERS.value)
    results = []
    for name in _CONFIGS.value:
        config = dataclasses.replace(configs[name], dtype=_DTYPE.value)
        results.append(bench_config(name, config, _BATCH.value, _LENGTH.value, _ITERS.value))
    after = common.matmul_flops_per_s(_MATMUL_SIZE.value, _MATMUL_ITERS.value)
    matmul = dict(max(before, after, key=lambda m: m["flops_per_s"]),
                  flops_per_s_before=before["flops_per_s"], flops_per_s_after=after["flops_per_s"])
    for result in results:
        result["fraction_of_matmul"] = result["flops_per_s"] / matmul["flops_per_s"]

    info = common.device_info()
    print(f"forward benchmark on {info['device_count']} x {info['device_kind']} ({info['backend']}), "
          f"jax {info['jax_version']}")
    print(f"reference: f32 jnp.dot {matmul['n']}^3, best of {_MATMUL_ITERS.value}: "
          f"{common.si(matmul['flops_per_s'], 'FLOP/s')} "
          f"(before {common.si(before['flops_per_s'])}, after {common.si(after['flops_per_s'])})")
    rows = [{"config": r["config"], "params": common.si(r["params"]), "B": r["batch"], "L": r["length"],
             "dtype": r["dtype"], "compile s": f"{r['compile_s']:.2f}", "best ms": f"{1e3 * r['best_s']:.2f}",
             "mean ms": f"{1e3 * r['mean_s']:.2f}", "tokens/s": f"{r['tokens_per_s']:,.0f}",
             "FLOP/fwd": common.si(r["flops_per_forward"]), "FLOP/s": common.si(r["flops_per_s"]),
             "vs matmul": f"{100 * r['fraction_of_matmul']:.1f}%"} for r in results]
    print(common.format_table(rows, list(rows[0])))
    print(common.json_line({"benchmark": "forward", **info, "matmul": matmul, "results": results}))


if __name__ == "__main__":
    app.run(main)
