r"""Planner initialisation (`dultra_jax/training/planner_init.py`) of the demo base model on the template-filling task.

    python launch/init_planner.py --config=configs/planner_init.py --workdir=runs/demo_planner \
        [--config.model.path=runs/demo_pretrain/hf]

Loads the base HF directory (`model.path`, default `runs/demo_pretrain/hf`, the export of
`configs/demo_pretrain.py`), adds a fresh planner
head, trains only the planner to imitate the factor rule (f = 1) on the frozen backbone's
predictions, and exports an HF directory with the planner (`export_dir`, default `WORKDIR/hf`).
The reference uses AdamW lr 1e-5 for ~100k steps; the demo uses a larger learning rate to get
there in under two minutes on 2 CPU cores (400 steps, 0.17 s each).
"""

import os

import ml_collections

from configs import common
from configs.demo_pretrain import demo_model
from dultra_jax.config import PlannerEvalConfig, as_config_dict
from dultra_jax.data import fill as F


def get_config(arg=None):
    del arg
    model = demo_model()
    # configs/demo_pretrain.py's export (its config.json sets the shape) under the repository's runs/,
    # wherever the command runs from.
    model.path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runs",
                                               "demo_pretrain", "hf"))
    model.planner = common.planner()
    return ml_collections.ConfigDict(dict(
        model=model,
        optim=common.optim(learning_rate=1e-3, schedule="cosine", warmup_steps=20, min_learning_rate=1e-5,
                           weight_decay=0.01, grad_clip=1.0, train="planner"),
        data=dict(task="fill", split="train", num_examples=50_000, start=0, batch_size=64,
                  prompt_length=F.PROMPT_LENGTH, response_length=F.GEN_LENGTH, block_length=F.BLOCK_LENGTH),
        eval=as_config_dict(PlannerEvalConfig, num_examples=256, batch_size=128,
                            rules=("factor", "planner_bernoulli", "planner_topk"), agreement_batches=8),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=200, keep=2),
        total_steps=400,
        seed=0,
        log_every=25,
        factor=1.0,
        export_dir=ml_collections.FieldReference(None, field_type=str),
        export_dtype="float32",
    ))
