"""A tiny end-to-end GRPO run on a random model with built-in exact-match prompts.

    python launch/train.py --config=configs/tiny.py --workdir=/tmp/tiny --config.total_steps=2

Runs in seconds on a CPU; tests use it. There is no tokenizer: prompts are token ids and a
completion is rendered as its space-separated ids (up to EOS) for the exact-match reward.
"""

import ml_collections

from configs import common

# Prompt ids -> the answer string the exact-match reward compares with (ids 3..62 are plain tokens).
EXAMPLES = [
    {"prompt_ids": [3, 4, 5], "answer": "3 4 5"},
    {"prompt_ids": [10, 11], "answer": "12"},
    {"prompt_ids": [20, 21, 22, 23], "answer": "24 25"},
    {"prompt_ids": [30], "answer": "30 30"},
    {"prompt_ids": [40, 41, 42], "answer": "43"},
    {"prompt_ids": [50, 51], "answer": "52 53"},
]


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(
        model=common.tiny_model(),
        decode=common.decode(prompt_length=8, gen_length=8, block_length=4, temperature=1.0, eos_token_id=1),
        rl=common.rl(group_size=4),
        optim=common.optim(learning_rate=1e-3),
        data=dict(task="exact", examples=EXAMPLES, prompts_per_step=2, shuffle_seed=0),
        rewards=dict(weights={"exact_match": 1.0, "step_penalty": 0.1}),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=1, keep=3),
        total_steps=4,
        seed=0,
    ))
