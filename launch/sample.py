r"""Sample from a LLaDA (+ dUltra planner) model with any unmasking rule.

    python launch/sample.py --model=HF_DIR --prompt="What is 7 * 6?"
    python launch/sample.py --model=HF_DIR --prompt_ids=PROMPTS.json --out=OUT.json
    python launch/sample.py --config=configs/tiny.py --prompt_ids='[[5, 6, 7], [8, 9]]'

`--prompt` is rendered with the directory's tokenizer and chat template and the decoded text is
printed; `--prompt_ids` is a JSON file (or inline JSON) holding a list of token-id lists, and
`--out` receives `{"rows": [{"tokens", "unmask_step", "nfe"}], "wall_s", "compile_s"}`.
`--config` names a config file whose `model` section is used (random weights unless
`model.path` or `--model` is given).
"""

from __future__ import annotations

import json

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from dultra_jax.config import CACHE_MODES, RULES, ConfigError, DecodeConfig
from dultra_jax.data.tokenizer import encode_prompt, load_tokenizer
from dultra_jax.decoding.generate import generate
from dultra_jax.interop.logit_check import TokensError, check_token_lists, check_token_range, read_token_lists
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.models.build import build_model
from dultra_jax.sharding import ShardingError, make_mesh

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file with a `model` section.")
_MODEL = flags.DEFINE_string("model", None, "HF LLaDA directory (overrides config.model.path).")
_PROMPT = flags.DEFINE_string("prompt", None, "A user message, encoded with the model's chat template.")
_PROMPT_IDS = flags.DEFINE_string("prompt_ids", None, "JSON file (or inline JSON) with token-id lists.")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_RULE = flags.DEFINE_enum("rule", "planner_bernoulli", list(RULES), "Unmasking rule.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 256, "Generated tokens per prompt.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Token temperature (0 = argmax).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "Confidence threshold (rule threshold).")
_FACTOR = flags.DEFINE_float("factor", None, "Factor rule's f, or the planner probability multiplier.")
_STEPS = flags.DEFINE_integer("steps", None, "Total steps (rules low_confidence, random).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (and init seed of random weights).")
_CACHE = flags.DEFINE_enum("cache", "none", list(CACHE_MODES), "Block KV cache (none is exact; prefix / dual "
                           "reuse keys/values within a block, Fast-dLLM).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: the config's).")


def _model_section():
    if _CONFIG.value is not None:
        section = _CONFIG.value.model
    elif _MODEL.value is not None:
        from configs import common
        section = common.llada_8b_model()  # shapes come from the directory; runtime fields from here
    else:
        raise ConfigError("give --model=HF_DIR or --config=CONFIG_FILE")
    if _MODEL.value is not None:
        section.path = _MODEL.value
    if _DTYPE.value is not None:
        section.dtype = _DTYPE.value
    return section


def main(argv):
    del argv
    try:
        if (_PROMPT.value is None) == (_PROMPT_IDS.value is None):
            raise ConfigError("give exactly one of --prompt and --prompt_ids")
        section = _model_section()
        tokenizer = None
        if _PROMPT.value is not None:
            if not section.get("path"):
                raise ConfigError("--prompt needs a model directory with a tokenizer (--model)")
            tokenizer = load_tokenizer(section.path)
            prompts = [encode_prompt(tokenizer, _PROMPT.value)]
        elif _PROMPT_IDS.value.lstrip().startswith("["):
            try:
                prompts = check_token_lists(json.loads(_PROMPT_IDS.value), "--prompt_ids")
            except json.JSONDecodeError as e:
                raise TokensError(f"--prompt_ids is not valid JSON: {e}") from None
        else:
            prompts = read_token_lists(_PROMPT_IDS.value)
        params, model = build_model(section, mesh=make_mesh(), seed=_SEED.value)
        for i, prompt in enumerate(prompts):
            check_token_range(np.asarray([prompt]), model.vocab_size, source=f"prompt {i}")
        decode = DecodeConfig(
            rule=_RULE.value, prompt_length=max(map(len, prompts)), gen_length=_GEN_LENGTH.value,
            block_length=_BLOCK_LENGTH.value, temperature=_TEMPERATURE.value, threshold=_THRESHOLD.value,
            factor=_FACTOR.value, steps=_STEPS.value, eos_token_id=model.eos_token_id, cache=_CACHE.value)
        result = generate(params, model, decode, prompts, seed=_SEED.value)
    except (ConfigError, CheckpointError, ShardingError, TokensError) as e:
        raise SystemExit(f"sample.py: error: {e}") from None

    for i, row in enumerate(result.rows):
        text = tokenizer.decode(row["tokens"], skip_special_tokens=True) if tokenizer else row["tokens"]
        print(f"[{i}] NFE {row['nfe']}, tokens per forward {len(row['tokens']) / max(row['nfe'], 1):.2f}: {text}")
    print(f"rule {decode.rule}: {len(result.rows)} rows x {decode.gen_length} tokens in {result.wall_s:.3f} s "
          f"(compile {result.compile_s:.1f} s), {result.tokens_per_forward:.2f} tokens per forward")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"rows": result.rows, "wall_s": result.wall_s, "compile_s": result.compile_s}, f)
        logging.info("wrote %s", _OUT.value)


if __name__ == "__main__":
    app.run(main)
