r"""Forward-pass throughput of the policy (backbone + planner): tokens/s, achieved FLOP/s and MFU.

    python benchmarks/forward.py [--configs=tiny,small] [--batch=4] [--length=256] [--iters=5]
                                 [--dtype=float32] [--param_dtype=...] [--matmul_size=1024]

Each config is jitted `policy_apply(params, canvas, config)` (one NFE) on a `[B, L]` canvas with
half its positions masked, compiled first, then timed over `--iters` calls ended with
`block_until_ready`; figures use the best call. A jitted `jnp.dot` of `--matmul_size`^3 in the
compute dtype is measured in the same run (before and after the models, best kept) as the
reference peak; on an accelerator give it a size that fills the device (e.g. 8192). Where the
device's data-sheet peak for the dtype is known (`common.PEAK_BF16_FLOPS`: bfloat16 on H100,
H200, A100 and TPU v4 to v6), the achieved FLOP/s over it is the MFU. The last line printed is
one JSON object (`{"benchmark": "forward", ...}`) with every figure.

Model FLOPs per forward are `forward_flops` (every matmul of a full forward, attention
included, multiply-adds counting 2; norms and activations left out). A GPU run at the reference
shape (Lp 32 + gen 256 = 288 positions):
`--configs=llada_1b --dtype=bfloat16 --length=288 --matmul_size=8192`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from dultra_jax.config import ModelConfig
from dultra_jax.models import policy
from dultra_jax.models.flops import forward_flops

if __package__:
    from benchmarks import common
else:  # run as `python benchmarks/forward.py`: the script's folder is on sys.path
    import common

_CONFIGS = flags.DEFINE_list("configs", ["tiny", "small"],
                              f"Model configs to run: any of {', '.join(common.MODEL_NAMES)}.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows B.")
_LENGTH = flags.DEFINE_integer("length", 256, "Canvas length L.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed iterations (after one compiling call).")
_DTYPES = common.define_dtype_flags()
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 1024, "n of the n x n x n reference matmul.")
_MATMUL_ITERS = flags.DEFINE_integer("matmul_iters", 10, "Timed iterations of the reference matmul.")


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
    dtype = _DTYPES.compute
    before = common.matmul_flops_per_s(_MATMUL_SIZE.value, _MATMUL_ITERS.value, dtype)
    results = []
    for name in _CONFIGS.value:
        config = _DTYPES.apply(configs[name])
        results.append(bench_config(name, config, _BATCH.value, _LENGTH.value, _ITERS.value))
    after = common.matmul_flops_per_s(_MATMUL_SIZE.value, _MATMUL_ITERS.value, dtype)
    matmul = dict(max(before, after, key=lambda m: m["flops_per_s"]),
                  flops_per_s_before=before["flops_per_s"], flops_per_s_after=after["flops_per_s"])
    info = common.device_info()
    peak = common.peak_flops_per_s(info["device_kind"], dtype)
    for result in results:
        result["fraction_of_matmul"] = result["flops_per_s"] / matmul["flops_per_s"]
        result["mfu"] = None if peak is None else result["flops_per_s"] / peak

    print(f"forward benchmark on {info['device_count']} x {info['device_kind']} ({info['backend']}), "
          f"jax {info['jax_version']}")
    print(f"reference: {dtype} jnp.dot {matmul['n']}^3, best of {_MATMUL_ITERS.value}: "
          f"{common.si(matmul['flops_per_s'], 'FLOP/s')} "
          f"(before {common.si(before['flops_per_s'])}, after {common.si(after['flops_per_s'])}); "
          f"data-sheet peak: {'unknown' if peak is None else common.si(peak, 'FLOP/s')}")
    rows = [{"config": r["config"], "params": common.si(r["params"]), "B": r["batch"], "L": r["length"],
             "dtype": r["dtype"], "compile s": f"{r['compile_s']:.2f}", "best ms": f"{1e3 * r['best_s']:.2f}",
             "mean ms": f"{1e3 * r['mean_s']:.2f}", "tokens/s": f"{r['tokens_per_s']:,.0f}",
             "FLOP/fwd": common.si(r["flops_per_forward"]), "FLOP/s": common.si(r["flops_per_s"]),
             "vs matmul": f"{100 * r['fraction_of_matmul']:.1f}%",
             "MFU": "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"} for r in results]
    print(common.format_table(rows, list(rows[0])))
    print(common.json_line({"benchmark": "forward", **info, "matmul": matmul, "peak_flops_per_s": peak,
                            "results": results}))


if __name__ == "__main__":
    app.run(main)
