r"""Sample from a LLaDA (+ dUltra planner) model with any unmasking rule.

    python launch/sample.py --model=assets/demo --prompt="??##?dc????d???c????b##?##???b??" \
        --gen_length=32 --block_length=32
    python launch/sample.py --model=HF_DIR_OR_WORKDIR --prompt_ids=PROMPTS.json --out=OUT.json
    python launch/sample.py --config=configs/tiny.py --prompt_ids='[[5, 6, 7], [8, 9]]'

`--model` is an HF LLaDA (+ planner) directory or a training workdir of `launch/train.py`,
`pretrain.py` or `init_planner.py` (its latest checkpoint; the tokenizer as `launch/evaluate.py`
finds it). An HF directory's weights run in its config.json's `torch_dtype` (a workdir's in its
checkpoint's dtypes) unless `--dtype` (compute) or `--param_dtype` (storage) say otherwise.
`--config` names a config file whose `model` section is used (random weights unless
`model.path` or `--model`, an HF directory, is given; its dtypes unless the flags say otherwise).

`--prompt` is rendered with the tokenizer's chat template (plain text without one) and the
decoded text is printed; `--prompt_ids` is a JSON file (or inline JSON) holding a list of
token-id lists, and `--out` receives `{"rows": [{"tokens", "unmask_step", "nfe"}], "wall_s",
"compile_s"}`. The knob flags (`--threshold`, `--factor`, `--steps`, `--entropy_bound`,
`--eoser`) apply to the rules that read them; giving one to another rule is an error.
"""

from __future__ import annotations

import json

from absl import flags, logging
from ml_collections import config_flags

from dultra_jax import cli
from dultra_jax.config import RULES
from dultra_jax.model_source import eoser_fields, sample_source

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a `model` section.")
_MODEL = flags.DEFINE_string("model", None, "HF LLaDA directory, its hub id (ORG/NAME[@REVISION], from "
                             "the HF cache) or training workdir (with --config: an HF directory or hub id that overrides "
                             "config.model.path).")
_PROMPT = flags.DEFINE_string("prompt", None, "A user message, encoded with the model's chat template.")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None, "JSON file (or inline JSON) with token-id lists.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_RULE = flags.DEFINE_enum("rule", "planner_bernoulli", list(RULES), "Unmasking rule.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 256, "Generated tokens per prompt.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Token temperature (0 = argmax).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Confidence threshold (rule threshold; default 0.9).")
_FACTOR = flags.DEFINE_float("factor", None, "Factor rule's f, or the planner probability multiplier (default 1).")
_STEPS = flags.DEFINE_integer("steps", None, "Total steps (rules low_confidence, random; default gen_length).")
_ENTROPY_BOUND = flags.DEFINE_float("entropy_bound", None, "Entropy budget in nats (rule entropy_bound; default 1).")
_EOSER = flags.DEFINE_bool("eoser", False, "EOS early rejection (confidence rules).")
_EOSER_GAMMA_MIN = flags.DEFINE_float("eoser_gamma_min", None, "EOSER's starting factor on EOS confidence "
                                      "(default 0.4; needs --eoser).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and init seed of random weights).")
_CACHE, _CACHE_REFRESH = cli.DEFINE_cache_flags()
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute dtype (default: the checkpoint's torch_dtype, or the config's).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, ["float32", "bfloat16", "float16"],
                                 "Parameter dtype (default: the checkpoint's torch_dtype, or the config's).")

FLAG_NAMES = {
    **cli.decode_flag_names("rule", "gen_length", "block_length", "temperature", "threshold", "factor", "steps",
                            "entropy_bound", "eoser", "eoser_gamma_min", "cache", "cache_refresh"),
    "model": "--model", "config": "--config", "prompt": "--prompt", "prompt_ids": "--prompt_ids",
    "model.dtype": "--dtype", "model.param_dtype": "--param_dtype",
}


def main() -> None:
    decode = dict(rule=_RULE.value, gen_length=_GEN_LENGTH.value, block_length=_BLOCK_LENGTH.value,
                  temperature=_TEMPERATURE.value, threshold=_THRESHOLD.value, factor=_FACTOR.value,
                  steps=_STEPS.value, entropy_bound=_ENTROPY_BOUND.value, cache=_CACHE.value,
                  cache_refresh=_CACHE_REFRESH.value,
                  **eoser_fields(_EOSER.value, _EOSER_GAMMA_MIN.value))
    result = sample_source(model=_MODEL.value, config=None if _CONFIG.value is None else _CONFIG.value.model,
                           prompt=_PROMPT.value, prompt_ids=_PROMPT_IDS.value, decode=decode,
                           dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, seed=_SEED.value)
    generation = result.generation
    for i, row in enumerate(generation.rows):
        text = result.texts[i] if result.texts is not None else row["tokens"]
        print(f"[{i}] NFE {row['nfe']}, tokens per forward {len(row['tokens']) / max(row['nfe'], 1):.2f}: {text}")
    print(f"rule {result.decode.rule}: {len(generation.rows)} rows x {result.decode.gen_length} tokens in "
          f"{generation.wall_s:.3f} s (compile {generation.compile_s:.1f} s), {generation.tokens_per_forward:.2f} "
          f"tokens per forward")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"rows": generation.rows, "wall_s": generation.wall_s, "compile_s": generation.compile_s}, f)
        logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
    cli.run(main, flag_names=FLAG_NAMES)
