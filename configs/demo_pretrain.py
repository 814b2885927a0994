r"""Pre-training of the demo's tiny LLaDA on the embedded arithmetic task (masked diffusion SFT).

    python launch/pretrain.py --config=configs/demo_pretrain.py --workdir=runs/demo_pretrain
    python launch/pretrain.py --config=configs/demo_pretrain.py:continue --workdir=runs/demo_pretrain2

The first run trains from scratch for 1,500 steps; `:continue` trains its export
(`runs/demo_pretrain/hf`) for 700 more steps on the next 100,000 training problems with a fresh,
lower cosine schedule (the first run was still improving when its schedule ended: held-out
accuracy 41% at step 1,250, 56% at 1,500).

A 4-layer, D=128 bidirectional transformer over the task's 17-token character vocabulary, trained
from scratch with LLaDA's SFT loss on `[prompt (16) | solution + EOS (32)]` rows; at the end the
backbone is exported as an HF directory (`export_dir`, default `WORKDIR/hf`) with the tokenizer,
and held-out problems are decoded greedily with `low_confidence` (one token per step).
Sized for about ten minutes on 2 CPU cores (see the README for the measured time and accuracy).
"""

import ml_collections

from configs import common
from dultra_jax.data import arithmetic as A


def demo_model() -> ml_collections.ConfigDict:
    """The demo backbone: ids from the arithmetic tokenizer, no planner, float32."""
    model = common.llada_8b_model()
    model.update(dict(
        vocab_size=A.vocab_size(), d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, mlp_hidden_size=384,
        rope_theta=10000.0, max_sequence_length=64,
        mask_token_id=A.MASK_ID, eos_token_id=A.EOS_ID, pad_token_id=A.PAD_ID,
        dtype="float32", param_dtype="float32", scan_layers=True, remat=False, mask_padding=True))
    model.eot_token_id = ml_collections.FieldReference(None, field_type=int)
    model.planner = ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict)
    return model


def get_config(arg=None):
    if arg not in (None, "", "continue"):
        raise ValueError(f"configs/demo_pretrain.py: unknown variant {arg!r} (use no argument or ':continue')")
    config = ml_collections.ConfigDict(dict(
        model=demo_model(),
        optim=common.optim(learning_rate=2e-3, schedule="cosine", warmup_steps=100, min_learning_rate=1e-4,
                           b2=0.98, weight_decay=0.01, grad_clip=1.0, train="all"),
        data=dict(task="arithmetic", split="train", num_examples=100_000, start=0, batch_size=128,
                  prompt_length=A.PROMPT_LENGTH, response_length=A.GEN_LENGTH),
        eval=dict(split="heldout", num_examples=512, start=0, batch_size=128, rules=("low_confidence",),
                  every=250, every_examples=128,
                  steps=ml_collections.FieldReference(None, field_type=int),
                  block_length=ml_collections.FieldReference(None, field_type=int)),
        mesh=common.mesh(),
        checkpoint=dict(every=500, keep=2, async_save=True),
        total_steps=1500,
        seed=0,
        log_every=50,
        mask_eps=1e-3,
        export_dir=ml_collections.FieldReference(None, field_type=str),
        export_dtype="float32",
    ))
    if arg == "continue":
        config.model.path = "runs/demo_pretrain/hf"
        config.total_steps = 700
        config.optim.learning_rate = 1e-3
        config.optim.warmup_steps = 20
        config.data.start = 100_000
        config.eval.every = 350
    return config
