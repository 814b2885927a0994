r"""Planner initialisation for LLaDA-8B as the reference (`planner/planner_train.py`) runs it.

    python launch/init_planner.py --config=configs/planner_init_8b.py --workdir=runs/planner_init_8b \
        --config.model.path=Zigeng/dParallel-LLaDA-8B-instruct \
        --config.data.path=/data/Nemotron-Post-Training-Dataset-v1/data

The backbone (`model.path`: an HF directory or hub id; the reference starts from
dParallel-LLaDA-8B-instruct) is frozen and a fresh planner head learns to imitate the factor rule
(f = 1) on chat data: Nemotron-Post-Training-Dataset-v1's `math` and `code` splits (`messages`
records; `data.split="math,code"` reads both), think tags removed, rows of 512 tokens, a random
span of at least 32 tokens masked at t ~ U(0, 1) with everything after it masked. AdamW lr 1e-5,
cosine to 1e-7, weight decay 0.01, gradient clipping 1.0, batch 64, 100k steps; a checkpoint
every 2,000 steps, the newest 2 kept, as the reference saves. The result is exported in bfloat16
(`export_dir`, default `WORKDIR/hf`) with the base directory's tokenizer.

Differences from the reference: its two splits are interleaved alternately, ours concatenated
and shuffled together (each record is seen in proportion to the split sizes); rows are not
re-cut at random lengths (its `truncate` option is off by default too).
"""

import ml_collections

from configs import common
from dultra_jax.config import PlannerEvalConfig, as_config_dict


def get_config(arg=None):
    del arg
    model = common.llada_8b_model()
    model.planner = common.planner()
    return ml_collections.ConfigDict(dict(
        model=model,
        optim=common.optim(learning_rate=1e-5, schedule="cosine", min_learning_rate=1e-7, weight_decay=0.01,
                           grad_clip=1.0, train="planner"),
        data=dict(task="chat", path=ml_collections.FieldReference(None, field_type=str), split="math,code",
                  data_dir=ml_collections.FieldReference(None, field_type=str),
                  limit=ml_collections.FieldReference(None, field_type=int),
                  tokenizer=ml_collections.FieldReference(None, field_type=str), sequence_length=512,
                  strip_think=True, block_length=32, corruption="span", batch_size=64,
                  shuffle_seed=ml_collections.FieldReference(None, field_type=int)),
        eval=as_config_dict(PlannerEvalConfig, split="test", agreement_batches=0),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=2000, keep=2),
        total_steps=100_000,
        seed=42,
        log_every=10,
        factor=1.0,
        export_dir=ml_collections.FieldReference(None, field_type=str),
        export_dtype="bfloat16",
    ))
