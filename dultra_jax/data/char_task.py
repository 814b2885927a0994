"""What the embedded character-level tasks (`arithmetic`, `fill`) share: seeded problems in two
splits whose prompts can never overlap, and a tokenizer with one token per character.

Splits. `TRAIN_SEEDS` and `HELDOUT_SEEDS` are disjoint seed ranges, and each prompt belongs to
exactly one split by construction: `split_of(prompt)` is the low bit of the BLAKE2b hash of the
prompt text, and a task's `make_problem(seed)` redraws (from the same seeded stream) until its
prompt belongs to `split_of_seed(seed)`. So no held-out prompt can ever equal a training prompt,
however many problems either side draws.

Tokenizer. A `tokenizers` WordLevel model over single characters, with a pre-tokenizer that
isolates every character and a `Fuse` decoder; vocabulary = `SPECIAL_TOKENS` (EOS, which is also
the pad token, id 0; the mask token, id 1) then the task's characters in order. There is no
unknown token (encoding a character outside the vocabulary raises) and no chat template: prompts
are encoded as plain text.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Iterable

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mdm_mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN)   # in id order
EOS_ID = 0
MASK_ID = 1
PAD_ID = EOS_ID

TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = range(1_000_000, 2_000_000)
SPLITS = {"train": TRAIN_SEEDS, "heldout": HELDOUT_SEEDS}


def split_of(prompt: str) -> str:
    """The split ("train" or "heldout") a prompt belongs to: the low bit of its BLAKE2b hash.

    A pure function of the prompt text, so a prompt can only ever be generated for one split.
    """
    digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
    return "heldout" if digest[-1] & 1 else "train"


def split_of_seed(seed: int) -> str:
    """The split whose seed range holds `seed`; ValueError outside both ranges."""
    for name, seeds in SPLITS.items():
        if seed in seeds:
            return name
    raise ValueError(f"seed {seed} is in no split: train seeds are {TRAIN_SEEDS}, held-out seeds {HELDOUT_SEEDS}")


def make_problems(make_problem: Callable[[int], dict], split: str, n: int, start: int = 0) -> list[dict]:
    """`make_problem(seed)` for the seeds `SPLITS[split][start:start + n]`."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    seeds = SPLITS[split]
    if n < 0 or start < 0 or start + n > len(seeds):
        raise ValueError(f"split {split!r} has {len(seeds)} seeds; asked for [{start}, {start + n})")
    return [make_problem(s) for s in seeds[start:start + n]]


def write_jsonl(path: str, rows: Iterable[dict]) -> str:
    """Writes `rows` as JSON lines to `path` (its directory is created); returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def vocab(chars: str) -> dict[str, int]:
    """Token -> id: the special tokens, then one id per character of `chars`."""
    return {**{t: i for i, t in enumerate(SPECIAL_TOKENS)},
            **{c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)}}


def tokenizer_config(max_length: int) -> dict[str, Any]:
    """The `tokenizer_config.json` written next to `tokenizer.json`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "model_max_length": max_length,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
    }


def build_tokenizer(chars: str, max_length: int, out_dir: str | None = None):
    """The character-level tokenizer over `chars`, a `transformers.PreTrainedTokenizerFast`.

    With `out_dir`, also saves `tokenizer.json`, `tokenizer_config.json` and
    `special_tokens_map.json` there, so that `transformers.AutoTokenizer.from_pretrained(out_dir,
    local_files_only=True)` and `dultra_jax.data.tokenizer.load_tokenizer(out_dir)` load it.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(chars), unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    config = tokenizer_config(max_length)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
            json.dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "mask_token": MASK_TOKEN}, f, indent=2)
            f.write("\n")
    kwargs = {k: v for k, v in config.items() if k != "tokenizer_class"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
