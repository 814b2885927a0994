r"""Pre-training of the demo's tiny LLaDA on the embedded template-filling task (masked diffusion SFT).

    python launch/pretrain.py --config=configs/demo_pretrain.py --workdir=runs/demo_pretrain

A 4-layer, D=128 bidirectional transformer over the task's 12-token character vocabulary
(`dultra_jax.data.fill`), trained from scratch for 500 steps with LLaDA's SFT loss on `[template
(32) | fill (32)]` rows whose free letters and linked pairs are drawn uniformly, so the model
learns the distribution of correct fills (every free letter and every pair of different letters
equally likely) rather than one canonical fill. At the end the backbone is exported as an HF
directory (`export_dir`, default `WORKDIR/hf`) with the tokenizer, and held-out problems are
decoded greedily with `low_confidence` (one token per step).
"""

import ml_collections

from configs import common
from dultra_jax.config import SFTEvalConfig, as_config_dict
from dultra_jax.data import fill as F


def demo_model() -> ml_collections.ConfigDict:
    """The demo backbone: ids from the task's tokenizer, no planner, float32."""
    model = common.llada_8b_model()
    model.update(dict(
        vocab_size=F.vocab_size(), d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
        rope_theta=10000.0, max_sequence_length=F.PROMPT_LENGTH + F.GEN_LENGTH,
        mask_token_id=F.MASK_ID, eos_token_id=F.EOS_ID, pad_token_id=F.PAD_ID,
        dtype="float32", param_dtype="float32", scan_layers=True, remat=False, mask_padding=True))
    model.eot_token_id = ml_collections.FieldReference(None, field_type=int)
    model.planner = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    return model


def get_config(arg=None):
    del arg
    return ml_collections.ConfigDict(dict(
        model=demo_model(),
        optim=common.optim(learning_rate=2e-3, schedule="cosine", warmup_steps=50, min_learning_rate=1e-4,
                           b2=0.98, weight_decay=0.01, grad_clip=1.0, train="all"),
        data=dict(task="fill", split="train", num_examples=100_000, start=0, batch_size=128,
                  prompt_length=F.PROMPT_LENGTH, response_length=F.GEN_LENGTH),
        eval=as_config_dict(SFTEvalConfig, num_examples=256, batch_size=128, rules=("low_confidence",), every=200),
        mesh=common.mesh(),
        checkpoint=common.checkpoint(every=200, keep=2),
        total_steps=500,
        seed=0,
        log_every=25,
        mask_eps=1e-3,
        export_dir=ml_collections.FieldReference(None, field_type=str),
        export_dtype="float32",
    ))
