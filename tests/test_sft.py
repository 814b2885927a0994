"""Masked-diffusion SFT (pre-training) and planner initialisation on the arithmetic task.

(a) the MDLM loss against a NumPy computation; (b) a few pre-training steps from scratch lower
the loss, resume exactly, and write an HF directory `load_hf` reads; (c) planner-init targets
equal an independent NumPy factor rule, `pos_weight` is right, only the planner moves, and the
export carries the planner.
"""

import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dultra_jax.config import ConfigError, DecodeConfig
from dultra_jax.data import arithmetic as A
from dultra_jax.interop.hf_llada import export_hf, load_hf
from dultra_jax.interop.safetensors_io import CheckpointError
from dultra_jax.models import policy
from dultra_jax.data import sft as sft_data
from dultra_jax.interop.build import build_model
from dultra_jax.training import mdlm_sft
from dultra_jax.training import planner_init
from dultra_jax.training.restore import TOKENIZER_DIR, load_model_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_model(**overrides):
    model = dict(path=ml_collections.FieldReference(None, field_type=str), vocab_size=A.vocab_size(), d_model=32,
                 n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden_size=64, rope_theta=10000.0, max_sequence_length=64,
                 mask_token_id=A.MASK_ID, eos_token_id=A.EOS_ID, pad_token_id=A.PAD_ID,
                 eot_token_id=ml_collections.FieldReference(None, field_type=int),
                 planner=ml_collections.FieldReference(None, field_type=ml_collections.ConfigDict),
                 dtype="float32", param_dtype="float32", scan_layers=True, remat=False, mask_padding=True)
    model.update(overrides)
    return ml_collections.ConfigDict(model)


def _pretrain_config(total_steps=20, lr=5e-3, eval_examples=16):
    return ml_collections.ConfigDict(dict(
        model=_tiny_model(),
        optim=dict(learning_rate=lr, schedule="cosine", warmup_steps=0, min_learning_rate=0.0, b1=0.9, b2=0.98,
                   eps=1e-8, weight_decay=0.01, grad_clip=1.0, train="all"),
        data=dict(task="arithmetic", split="train", num_examples=256, start=0, batch_size=16),
        eval=dict(split="heldout", num_examples=eval_examples, start=0, batch_size=16, rules=("low_confidence",)),
        mesh=dict(data=1, fsdp=-1, tensor=1),
        checkpoint=dict(every=10, keep=3, async_save=False),
        total_steps=total_steps, seed=0, log_every=5, mask_eps=1e-3, export_dir=None, export_dtype="float32"))


def _rows(n=16, split="train"):
    tokenizer = A.build_tokenizer()
    problems = A.make_problems(split, n)
    examples = [A.encode_example(tokenizer, p) for p in problems]
    rows = sft_data.encode_rows(examples, A.PROMPT_LENGTH, A.GEN_LENGTH, A.PAD_ID, A.EOS_ID)
    return problems, {k: jnp.asarray(v) for k, v in rows.items()}


def _leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------ (a) the loss


def test_masked_diffusion_loss_matches_numpy():
    rng = np.random.default_rng(0)
    batch, length, vocab, prompt = 3, 7, 5, 2
    logits = rng.standard_normal((batch, length, vocab)).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    response = np.zeros((batch, length), bool)
    response[:, prompt:] = True
    is_masked = response & (rng.random((batch, length)) < 0.5)
    is_masked[0, prompt] = True
    p_mask = np.array([0.3, 0.9, 0.05], np.float32)
    loss, _ = mdlm_sft.masked_diffusion_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(is_masked),
                                             jnp.asarray(p_mask), jnp.asarray(response))
    expected = 0.0
    for b in range(batch):
        row = 0.0
        for i in range(length):
            if is_masked[b, i]:
                z = logits[b, i].astype(np.float64)
                row += (np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[targets[b, i]]) / p_mask[b]
        expected += row / (length - prompt)  # LLaDA divides by the answer length
    np.testing.assert_allclose(float(loss), expected / batch, rtol=1e-5)


def test_corruption_masks_only_the_response():
    _, rows = _rows(16)
    noisy, is_masked, p_mask = mdlm_sft.corrupt(rows["tokens"], rows["response"], jax.random.key(1), A.MASK_ID, 1e-3)
    noisy, is_masked, p_mask = map(np.asarray, (noisy, is_masked, p_mask))
    assert not is_masked[:, :A.PROMPT_LENGTH].any()
    assert np.all((p_mask >= 1e-3) & (p_mask <= 1.0))
    np.testing.assert_array_equal(noisy == A.MASK_ID, is_masked)
    np.testing.assert_array_equal(noisy[~is_masked], np.asarray(rows["tokens"])[~is_masked])
    # The masked fraction follows each row's t.
    assert np.corrcoef(p_mask, is_masked[:, A.PROMPT_LENGTH:].mean(axis=1))[0, 1] > 0.8


# ------------------------------------------------------------------------- (b) pre-training


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    result = mdlm_sft.pretrain(_pretrain_config(), workdir)
    return workdir, result


def test_pretrain_lowers_the_loss_and_exports_a_loadable_hf_dir(pretrained, tmp_path):
    workdir, result = pretrained
    export_dir = result["export_dir"]
    assert export_dir == os.path.join(workdir, "hf")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(export_dir, name)), name
    params, config, hf = load_hf(export_dir)
    assert not config.has_planner and "mask_embedding.weight" not in json.dumps(hf)
    assert (config.vocab_size, config.mask_token_id, config.eos_token_id) == (A.vocab_size(), A.MASK_ID, A.EOS_ID)
    from dultra_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(export_dir)
    assert tokenizer.convert_tokens_to_ids(A.MASK_TOKEN) == A.MASK_ID

    # The same corruption of the same batch scores lower after training.
    initial, _ = build_model(_tiny_model(), seed=0)
    _, rows = _rows(32)
    loss_fn = jax.jit(lambda p: mdlm_sft.mdlm_loss(p, rows, jax.random.key(7), config)[0])
    before, after = float(loss_fn(initial)), float(loss_fn(params))
    assert after < before - 0.5, (before, after)

    # The workdir itself is a model source (launch/export.py, evaluate.py): its last checkpoint,
    # with the tokenizer files written at start-up, so that a mid-run export is complete too.
    restored, restored_config, source_dir = load_model_source(workdir)
    assert restored_config == config and source_dir == os.path.join(workdir, TOKENIZER_DIR)
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    assert load_model_source(os.path.join(workdir, "checkpoints"))[2] == source_dir  # the folder itself, too
    again = export_hf(restored, restored_config, str(tmp_path / "again"), dtype="float32", source_dir=source_dir)
    assert sorted(os.listdir(again)) == sorted(os.listdir(export_dir))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(again, name)) as f, open(os.path.join(export_dir, name)) as g:
            assert f.read() == g.read(), name

    history = result["history"]
    assert [row["step"] for row in history] == [5, 10, 15, 20]
    assert history[-1]["loss"] < history[0]["loss"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [row["step"] for row in history]
    with open(os.path.join(workdir, "pretrain_eval.json")) as f:
        summary = json.load(f)
    (ev,) = summary["eval"]
    assert ev["rule"] == "low_confidence" and ev["num_examples"] == 16 and ev["nfe_mean"] == A.GEN_LENGTH
    assert 0.0 <= ev["accuracy"] <= 1.0 and ev["samples"]


def test_left_padding_does_not_change_the_outputs(pretrained):
    # Why training and decoding may use different prompt widths: RoPE is relative and padding
    # keys are masked, so a row's logits do not depend on how much left padding it has.
    _, result = pretrained
    params, model, _ = load_hf(result["export_dir"])
    tokenizer = A.build_tokenizer()
    examples = [A.encode_example(tokenizer, p) for p in A.make_problems("heldout", 4)]
    outs = []
    for extra in (0, 5):
        prompt_length = A.PROMPT_LENGTH + extra
        rows = sft_data.encode_rows(examples, prompt_length, A.GEN_LENGTH, A.PAD_ID, A.EOS_ID)
        tokens = np.where(rows["response"], A.MASK_ID, rows["tokens"])
        logits, _ = policy.forward(params, jnp.asarray(tokens), model, valid=jnp.asarray(rows["valid"]))
        outs.append(np.asarray(logits)[:, extra:])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_pretrain_resume_equals_uninterrupted(pretrained, tmp_path, caplog):
    workdir, result = pretrained
    # The same run, stopped after its step-10 checkpoint, then started again.
    resumed_dir = str(tmp_path / "run")
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "20"))
    shutil.rmtree(os.path.join(resumed_dir, "hf"))
    with caplog.at_level(logging.WARNING, logger="dultra_jax.checkpoint"):
        resumed = mdlm_sft.pretrain(_pretrain_config(eval_examples=0), resumed_dir)
    # The one changed setting is named (the tuple `eval.rules` equals the list JSON saved).
    changed = [r.getMessage() for r in caplog.records if "setting(s) changed" in r.getMessage()]
    assert changed == ["resuming step 10 with 1 setting(s) changed since that checkpoint; the run continues with "
                       "the new values: config.eval.num_examples: 16 -> 0"], changed
    assert [row["step"] for row in resumed["history"]] == [15, 20]
    with open(os.path.join(resumed_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [5, 10, 15, 20]
    a, _, _ = load_hf(result["export_dir"])
    b, _, _ = load_hf(resumed["export_dir"])
    for (name, x), y in zip(_leaves(a).items(), _leaves(b).values()):
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_resume_with_another_model_shape_names_the_key_and_the_array(pretrained, tmp_path, caplog):
    workdir, _ = pretrained
    resumed_dir = str(tmp_path / "run")
    shutil.copytree(workdir, resumed_dir)
    config = _pretrain_config(eval_examples=0)
    config.model.d_model = 64
    with caplog.at_level(logging.WARNING, logger="dultra_jax.checkpoint"):
        with pytest.raises(CheckpointError, match=r"checkpoint .*/checkpoints/20/state: trainable/\S+ is stored with "
                                                  r"shape \[\d+, 32\], but this run's is \[\d+, 64\]"):
            mdlm_sft.pretrain(config, resumed_dir)
    assert any("config.model.d_model: 32 -> 64" in r.getMessage() for r in caplog.records)


def test_sft_data_is_deterministic_and_covers_each_epoch():
    rows = {"x": np.arange(10)}
    data = sft_data.SFTData(rows, batch_size=4, seed=3)
    epoch = np.concatenate([data.batch(0)["x"], data.batch(1)["x"], data.batch(2)["x"][:2]])
    assert sorted(epoch.tolist()) == list(range(10))
    again = sft_data.SFTData(rows, batch_size=4, seed=3)
    np.testing.assert_array_equal(again.batch(7)["x"], data.batch(7)["x"])


@pytest.mark.parametrize("key, value, message", [
    ("data.bogus", 1, "data.bogus"),
    ("model.mask_token_id", 2, "model.mask_token_id"),
    # A resume at step 12 would log the mean of steps 11-15 as step 15's.
    ("checkpoint.every", 12, "checkpoint.every=12 must be a multiple of log_every=5"),
    ("checkpoint.keep", 0, "checkpoint.keep=0 must be >= 1"),
    ("mesh.fdsp", 2, r"unknown config key\(s\) mesh.fdsp"),
])
def test_config_errors_name_the_key(tmp_path, key, value, message):
    config = _pretrain_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        mdlm_sft.pretrain(config, str(tmp_path))


def test_launcher_rejects_unknown_keys(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "launch/pretrain.py", "--config=configs/demo_pretrain.py",
                           f"--workdir={tmp_path}", "--config.data.bogus=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "bogus" in proc.stderr


# ------------------------------------------------------------------- (c) planner initialisation


def _numpy_factor_rule(confidence, candidates, factor):
    """Fast-dLLM's factor rule written out: sort the candidates by confidence (ties: lower
    position first), accept k = 1, then k = 2, 3, ... while c(k) >= 1 - f / (k + 1)."""
    out = np.zeros(candidates.shape, bool)
    for b in range(candidates.shape[0]):
        idx = [i for i in np.argsort(-confidence[b], kind="stable") if candidates[b, i]]
        n = 0
        for k, i in enumerate(idx, start=1):
            if k > 1 and confidence[b, i] < 1.0 - factor / (k + 1):
                break
            n = k
        out[b, idx[:n]] = True
    return out


def _reference_collator(tokens, ends, t, scores, prompt_length, block_length, mask_id):
    """The reference's `dLLMDataCollator` (`mask_type="random"`) written out per row from its
    description (docs/algorithm.md section 7), with the random draws given."""
    canvas, candidates = tokens.copy(), np.zeros((len(tokens), tokens.shape[1] - prompt_length), bool)
    length = tokens.shape[1]
    for b in range(len(tokens)):
        lo, hi = sorted(ends[b])
        b0 = min(lo, length - block_length)
        b1 = max(hi, b0 + block_length)
        n = max(1, math.ceil((b1 - b0) * t[b]))
        span = np.arange(b0, b1)
        chosen = span[np.argsort(scores[b, span - prompt_length], kind="stable")[:n]]
        canvas[b, chosen] = mask_id
        canvas[b, b1:] = mask_id
        candidates[b, chosen - prompt_length] = True
    return canvas, candidates


def test_span_corruption_matches_the_reference_collator():
    rng = np.random.default_rng(0)
    batch, lp, lr, lb = 64, 6, 24, 8
    tokens = rng.integers(3, 60, size=(batch, lp + lr))
    ends = rng.integers(lp, lp + lr - 1, size=(batch, 2))
    ends[:4] = [[lp, lp], [lp + lr - 2, lp + lr - 2], [lp + 3, lp + 20], [lp + 20, lp + 3]]  # clamped / wide
    t = rng.uniform(size=batch).astype(np.float32)
    t[4] = 0.0  # still one masked position
    scores = rng.uniform(size=(batch, lr)).astype(np.float32)
    canvas, positions, candidates, in_block = jax.jit(functools.partial(
        planner_init.span_canvas, prompt_length=lp, block_length=lb, mask_id=1))(tokens, ends, t, scores)
    want_canvas, want_candidates = _reference_collator(tokens, ends, t, scores, lp, lb, 1)
    np.testing.assert_array_equal(canvas, want_canvas)
    np.testing.assert_array_equal(candidates, want_candidates)
    np.testing.assert_array_equal(positions, np.broadcast_to(np.arange(lp, lp + lr), (batch, lr)))
    np.testing.assert_array_equal(in_block, np.concatenate([np.zeros((batch, lp), bool), want_candidates], 1))
    # The edge rows: a span clamped to the end, one widened to block_length, a 17-token one.
    assert want_candidates[1].sum() >= 1 and np.all(canvas[1, lp + lr - lb:][~want_candidates[1, -lb:]] != 1)
    assert want_candidates[4].sum() == 1


@pytest.mark.parametrize("corruption", ["span", "aligned"])
@pytest.mark.parametrize("factor", [1.0, 2.5])
def test_planner_targets_equal_numpy_factor_rule(pretrained, factor, corruption):
    _, result = pretrained
    params, model, _ = load_hf(result["export_dir"])
    _, rows = _rows(16)
    decode = DecodeConfig(rule="factor", prompt_length=A.PROMPT_LENGTH, gen_length=A.GEN_LENGTH,
                          block_length=A.BLOCK_LENGTH, temperature=0.0, factor=factor)
    example = jax.jit(lambda p, b, k: planner_init.planner_example(p, b, k, model, decode, corruption))(
        params, {"tokens": rows["tokens"], "valid": rows["valid"]}, jax.random.key(3))
    ex = jax.tree.map(np.asarray, example)
    tokens = np.asarray(rows["tokens"])

    # The corruption: >= 1 masked candidate in the block (an aligned response block, or the whole
    # response holding the span's candidates), everything after the block masked, nothing else.
    assert np.all(ex.candidates.sum(axis=1) >= 1)
    width = A.BLOCK_LENGTH if corruption == "aligned" else A.GEN_LENGTH
    start = ex.positions[:, 0]
    assert ex.positions.shape == (len(tokens), width)
    assert np.all((start - A.PROMPT_LENGTH) % A.BLOCK_LENGTH == 0) and np.all(start >= A.PROMPT_LENGTH)
    for b in range(len(tokens)):
        s = start[b]
        np.testing.assert_array_equal(ex.canvas[b, :s], tokens[b, :s])
        block = ex.canvas[b, s:s + width]
        revealed = block != A.MASK_ID
        np.testing.assert_array_equal(block[revealed], tokens[b, s:s + width][revealed])
        np.testing.assert_array_equal(np.flatnonzero(ex.in_block[b]), s + np.flatnonzero(ex.candidates[b]))
        if corruption == "aligned":
            np.testing.assert_array_equal(~revealed, ex.candidates[b])
            assert np.all(ex.canvas[b, s + width:] == A.MASK_ID)
        else:  # the masked non-candidates are the suffix after the span: one run to the row's end
            assert np.all(~revealed[ex.candidates[b]])
            suffix = np.flatnonzero(~revealed & ~ex.candidates[b])
            if suffix.size:
                assert np.all(~revealed[suffix[0]:]) and suffix[0] > np.flatnonzero(ex.candidates[b])[0]

    # The targets: the factor rule on the backbone's own greedy confidences, recomputed in NumPy.
    logits, _ = policy.forward(params, jnp.asarray(ex.canvas), model, valid=rows["valid"])
    logits = np.asarray(logits, np.float64)
    block_logits = np.take_along_axis(logits, ex.positions[..., None], axis=1)
    block_logits[..., A.MASK_ID] = -np.inf
    probs = np.exp(block_logits - block_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    confidence = probs.max(-1)
    np.testing.assert_allclose(ex.confidence, confidence, rtol=1e-4, atol=1e-6)
    expected = _numpy_factor_rule(confidence, ex.candidates, factor)
    np.testing.assert_array_equal(ex.targets, expected)
    assert not np.any(ex.targets & ~ex.candidates)
    if factor > 1.0:  # the larger factor must accept more than the at-least-one token somewhere
        assert np.any(ex.targets.sum(axis=1) > 1)


def test_planner_bce_pos_weight():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 4)).astype(np.float32)
    candidates = np.array([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], bool)
    targets = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], bool)
    loss, pos_weight = planner_init.planner_bce(jnp.asarray(z), jnp.asarray(targets), jnp.asarray(candidates))
    pos, neg = np.sum(candidates & targets), np.sum(candidates & ~targets)
    assert float(pos_weight) == pytest.approx(neg / pos)  # 6 negatives / 3 positives
    log_sig = lambda x: -np.log1p(np.exp(-x))  # noqa: E731
    per = -(neg / pos * targets * log_sig(z) + (1 - targets) * log_sig(-z))
    assert float(loss) == pytest.approx(per[candidates].mean(), rel=1e-5)
    # One class empty: plain BCE.
    all_pos = candidates.copy()
    loss, pos_weight = planner_init.planner_bce(jnp.asarray(z), jnp.asarray(all_pos), jnp.asarray(candidates))
    assert float(pos_weight) == 1.0
    assert float(loss) == pytest.approx(-log_sig(z)[candidates].mean(), rel=1e-5)


def test_init_planner_trains_only_the_planner_and_exports_it(pretrained, tmp_path):
    _, result = pretrained
    base_dir = result["export_dir"]
    config = _pretrain_config()
    del config["mask_eps"]
    config.model = _tiny_model(planner=ml_collections.ConfigDict(dict(num_head_layers=1, freq_dim=256,
                                                                      adaln_eps=1e-4)))
    config.model.path = base_dir
    config.optim.update(train="planner", learning_rate=1e-3)
    config.data.block_length = A.BLOCK_LENGTH
    config.eval = dict(split="heldout", num_examples=0, start=0, batch_size=16, rules=(), agreement_batches=1)
    config.total_steps = 4
    config.factor = 1.0
    config.data.corruption = "blocks"
    with pytest.raises(ConfigError, match="data.corruption='blocks' is not one of span, aligned"):
        planner_init.init_planner(config, str(tmp_path / "bad"))
    del config.data["corruption"]  # the default: the reference's spans
    out = planner_init.init_planner(config, str(tmp_path))

    history = out["history"]
    assert {"loss", "pos_weight", "accuracy", "precision", "recall", "grad_norm"} <= set(history[-1])
    assert all(np.isfinite(row["loss"]) for row in history)
    assert set(out["agreement"]) >= {"accuracy", "precision", "recall", "loss"}
    params, model, hf = load_hf(out["export_dir"])
    assert model.has_planner and hf["architectures"] == ["LLaDOUModelLM"]
    assert os.path.exists(os.path.join(out["export_dir"], "tokenizer.json"))  # carried from the base dir
    base, _, _ = load_hf(base_dir)
    trained = _leaves({k: v for k, v in params.items() if k != "planner"})
    for name, leaf in _leaves(base).items():  # bit-identical backbone
        np.testing.assert_array_equal(trained[name], leaf, err_msg=name)
    fresh, _ = build_model({**config.model.to_dict()}, seed=0)  # the planner it started from
    moved = [not np.array_equal(a, b) for a, b in zip(_leaves(fresh["planner"]).values(),
                                                       _leaves(params["planner"]).values())]
    assert any(moved)
    # The workdir as a model source: the checkpoint holds the planner; the backbone comes from model.path.
    restored, restored_config, source_dir = load_model_source(str(tmp_path))
    assert restored_config == model and source_dir == base_dir
    jax.tree.map(np.testing.assert_array_equal, restored, params)
    with open(os.path.join(str(tmp_path), "planner_init_eval.json")) as f:
        assert json.load(f)["heldout_agreement"]["accuracy"] == pytest.approx(out["agreement"]["accuracy"])
