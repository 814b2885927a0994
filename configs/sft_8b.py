r"""LLaDA supervised fine-tuning (masked diffusion) of an 8B backbone on chat data.

    python launch/pretrain.py --config=configs/sft_8b.py --workdir=runs/sft_8b \
        --config.model.path=GSAI-ML/LLaDA-8B-Base --config.data.path=/data/my_chat_data.jsonl

LLaDA's SFT recipe (its paper, section 2.3 and appendix B): each conversation is `[prompt |
response | EOS fill]`, 4,096 tokens wide; only response positions (EOS fill included, which is
how the model learns to stop) are masked, at t ~ U(eps, 1), and scored with weight 1/t over the
response length; the prompt is never masked. AdamW, weight decay 0.1, learning rate warmed up
linearly from 0 to 2.5e-5 over 50 steps, then constant; batch 256. `data.path` is any
`messages` or `prompt`/`response` data (`launch/pretrain.py --helpfull`, README "Reproducing
dUltra on LLaDA-8B"). Without `model.path` the backbone starts from random weights.

Difference from LLaDA: its last 10% of steps decay the rate linearly to 2.5e-6; set
`--config.optim.schedule=linear --config.optim.min_learning_rate=2.5e-6` for a decay over the
whole run instead.
"""

import ml_collections

from configs import common
from dultra_jax.config import SFTEvalConfig, as_config_dict


def get_config(arg=None):
    del arg
    model = common.llada_8b_model()
    model.planner = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    return ml_collections.ConfigDict(dict(
        model=model,
        optim=common.optim(learning_rate=2.5e-5, schedule="constant", warmup_steps=50, weight_decay=0.1,
                           grad_clip=1.0, train="all"),
        data=dict(task="chat", path=ml_collections.FieldReference(None, field_type=str), split="train",
                  data_dir=ml_collections.FieldReference(None, field_type=str),
                  limit=ml_collections.FieldReference(None, field_type=int),
                  tokenizer=ml_collections.FieldReference(None, field_type=str), sequence_length=4096,
                  strip_think=False, batch_size=256, shuffle_seed=ml_collections.FieldReference(None, field_type=int)),
        eval=as_config_dict(SFTEvalConfig),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=500, keep=2),
        total_steps=10_000,
        seed=0,
        log_every=10,
        mask_eps=1e-3,
        export_dir=ml_collections.FieldReference(None, field_type=str),
        export_dtype="bfloat16",
    ))
