"""Shared config pieces. Config files return `ml_collections.ConfigDict`s built from these."""

import ml_collections


def planner() -> ml_collections.ConfigDict:
    """The dUltra planner head (`dultra_jax/models/planner.py`)."""
    return ml_collections.ConfigDict(dict(num_head_layers=1, freq_dim=256, adaln_eps=1e-4))


def llada_8b_model() -> ml_collections.ConfigDict:
    """LLaDA-8B-Instruct shapes and ids (`dultra_jax/models/llada.py`), planner included, bf16 as the reference.

    `path` is the HF directory to load (None: random init with these shapes).
    """
    return ml_collections.ConfigDict(dict(
        path=ml_collections.FieldReference(None, field_type=str),
        vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
        rope_theta=500000.0, rms_norm_eps=1e-5, max_sequence_length=4096,
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, eot_token_id=126348,
        planner=planner(), dtype="bfloat16", param_dtype="bfloat16",
        scan_layers=True, remat=True, mask_padding=True,
    ))


def tiny_model() -> ml_collections.ConfigDict:
    """A 2-layer, D=32 model over a 64-token vocabulary: tests and CPU smoke runs."""
    model = llada_8b_model()
    model.update(dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                      rope_theta=10000.0, max_sequence_length=256, mask_token_id=63, eos_token_id=1,
                      pad_token_id=1, eot_token_id=2, dtype="float32", param_dtype="float32", remat=False))
    return model


def rl(**overrides) -> ml_collections.ConfigDict:
    """GRPO as the reference dUltra code runs it (`dultra_jax/rl/grpo.py`)."""
    section = ml_collections.ConfigDict(dict(group_size=12, advantage="mean", advantage_min_clip=0.0,
                                             eps_low=0.2, eps_high=1.0, beta=0.0, num_iterations=1))
    section.update(overrides)
    return section


def optim(**overrides) -> ml_collections.ConfigDict:
    """AdamW(0.9, 0.99, wd 0.1), lr 5e-6 constant, clip 1.0, backbone and planner trained."""
    section = ml_collections.ConfigDict(dict(learning_rate=5e-6, schedule="constant", warmup_steps=0,
                                             min_learning_rate=0.0, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
                                             grad_clip=1.0, train="all", backbone_lr_scale=1.0))
    section.update(overrides)
    return section


def decode(**overrides) -> ml_collections.ConfigDict:
    """Training rollouts: planner Bernoulli, gen 256, block 32, temperature 0.1 (reference GSM8K)."""
    section = ml_collections.ConfigDict(dict(
        rule="planner_bernoulli", prompt_length=512, gen_length=256, block_length=32,
        max_steps=ml_collections.FieldReference(None, field_type=int), temperature=0.1, logprob_temperature=1.0,
        forced_logprob="reference",
        threshold=ml_collections.FieldReference(None, field_type=float),
        factor=ml_collections.FieldReference(None, field_type=float),
        steps=ml_collections.FieldReference(None, field_type=int),
        entropy_bound=ml_collections.FieldReference(None, field_type=float),
        eoser=False, eoser_gamma_min=0.4, eos_token_id=126081, cache="none"))
    section.update(overrides)
    return section


def checkpoint(**overrides) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict(dict(every=400, keep=3, async_save=True))
    section.update(overrides)
    return section


def mesh(**overrides) -> ml_collections.ConfigDict:
    """All devices on 'fsdp' by default; set data/tensor for larger slices."""
    section = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    section.update(overrides)
    return section
