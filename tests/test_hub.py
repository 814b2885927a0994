"""Hub ids as model paths: resolved from a Hugging Face cache built here, offline (nothing downloads).

The cache layout is the one `huggingface_hub` writes: `models--ORG--NAME/refs/BRANCH` holding a
commit hash, `snapshots/COMMIT/FILE` symlinks into content-addressed `blobs/`.
"""

import hashlib
import os
import shutil
import types

import jax
import numpy as np
import pytest

from dultra_jax import hub
from dultra_jax.config import ConfigError, GRPOConfig, from_config
from dultra_jax.data.tokenizer import load_tokenizer
from dultra_jax.interop.build import build_model, model_config
from tests.helpers import one_device_env
from tests.test_cli import DEMO, TEMPLATE, _one_line_error, _run

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_to_cache(cache, repo_id: str, source_dir: str, *, commit: str = COMMIT, branch: str = "main") -> str:
    """Puts the files of `source_dir` into the HF cache `cache` as `repo_id` at `commit` (which
    `refs/BRANCH` names); returns the snapshot directory."""
    org, name = repo_id.split("/")
    repo = os.path.join(str(cache), f"models--{org}--{name}")
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(snapshot, exist_ok=True)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    with open(os.path.join(repo, "refs", branch), "w") as f:
        f.write(commit)
    for file in sorted(os.listdir(source_dir)):
        with open(os.path.join(source_dir, file), "rb") as f:
            data = f.read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        os.symlink(os.path.relpath(blob, snapshot), os.path.join(snapshot, file))
    return snapshot


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An HF cache holding the demo model as `dultra/demo`, read offline; `huggingface_hub`
    must never try the network (`snapshot_download` is checked to be called cache-only)."""
    cache = tmp_path / "hub"
    snapshot = add_to_cache(cache, "dultra/demo", DEMO)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub

    real = huggingface_hub.snapshot_download
    calls = []

    def cache_only(*args, **kwargs):
        assert kwargs["local_files_only"] is True and kwargs["cache_dir"] == str(cache), kwargs
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cache_only)
    return cache, snapshot, calls


@pytest.mark.parametrize("path, want", [
    ("GSAI-ML/LLaDA-8B-Instruct", ("GSAI-ML/LLaDA-8B-Instruct", None)),
    ("Qwen/Qwen2.5-Math-7B-Instruct@main", ("Qwen/Qwen2.5-Math-7B-Instruct", "main")),
    (f"org/name@{COMMIT}", ("org/name", COMMIT)),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    ("/abs/org/name", None),
    ("./org/name", None),
    ("~/org/name", None),
    ("org", None),
    ("org/name/extra", None),
    ("org/../name", None),
    ("tests/not_here", None),  # `tests/` exists here: a local path, never a hub id
])
def test_parse_hub_id(path, want, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert hub.parse_hub_id(path) == want


def test_a_hub_id_resolves_to_its_snapshot_with_and_without_revision(offline_cache):
    cache, snapshot, calls = offline_cache
    assert hub.resolve_model_dir("dultra/demo", "model.path") == snapshot
    assert hub.resolve_model_dir(f"dultra/demo@{COMMIT}", "model.path") == snapshot
    assert hub.resolve_model_dir("dultra/demo@main", "model.path") == snapshot
    assert [c[1]["revision"] for c in calls] == [None, COMMIT, "main"]
    # An existing directory is never looked up.
    assert hub.resolve_model_dir(DEMO, "model.path") == DEMO and len(calls) == 3


def test_model_and_tokenizer_from_a_hub_id_equal_those_from_the_directory(offline_cache):
    from configs import demo

    section = {**demo.get_config().model.to_dict(), "path": "dultra/demo"}
    params, config = build_model(section, seed=0)
    want_params, want_config = build_model({**section, "path": DEMO}, seed=0)
    assert config == want_config == model_config(section)
    jax.tree.map(np.testing.assert_array_equal, params, want_params)
    text = TEMPLATE
    assert load_tokenizer("dultra/demo").encode(text) == load_tokenizer(DEMO).encode(text)


def test_a_training_config_records_the_id_and_the_snapshot(offline_cache):
    from configs import demo
    from dultra_jax.training.grpo import resolve_model_paths

    _, snapshot, _ = offline_cache
    config = demo.get_config()
    config.model.path = "dultra/demo@main"
    cfg, sources = resolve_model_paths(from_config(GRPOConfig, config))
    assert cfg.model["path"] == snapshot and cfg.data.tokenizer is None and cfg.rewards.teacher_path is None
    assert sources == {"model.path": {"id": "dultra/demo@main", "dir": snapshot}}
    config.model.path = DEMO  # a directory: nothing to record
    assert resolve_model_paths(from_config(GRPOConfig, config))[1] == {}


def test_errors_name_the_key_and_the_id(offline_cache, tmp_path, monkeypatch):
    cache, _, calls = offline_cache
    with pytest.raises(ConfigError) as e:
        hub.resolve_model_dir("GSAI-ML/LLaDA-8B-Instruct", "model.path")
    assert str(e.value) == (f"model.path='GSAI-ML/LLaDA-8B-Instruct' is neither a directory nor in the Hugging Face "
                            f"cache ({cache}, HF_HUB_OFFLINE=1): not cached; download it where the hub is reachable "
                            f"(hf download GSAI-ML/LLaDA-8B-Instruct)")
    with pytest.raises(ConfigError, match=r"^rewards.teacher_path='dultra/demo@v2' is neither a directory nor in the "
                                          r"Hugging Face cache .*: not cached at revision 'v2'"):
        hub.resolve_model_dir("dultra/demo@v2", "rewards.teacher_path")
    assert len(calls) == 2
    # Paths that look local are never looked up on the hub.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("/no/such/model", "./model", "~/no_such_model_dir", "runs/typo", "a/b/c"):
        with pytest.raises(ConfigError, match=rf"^data.tokenizer={path!r}: no such file or directory$"):
            hub.resolve_model_dir(path, "data.tokenizer")
    assert len(calls) == 2


def test_online_resolution_may_download_only_model_files(monkeypatch, tmp_path):
    """Without HF_HUB_OFFLINE the hub is asked (here a stand-in: tests never reach the network)
    for the files a model directory needs, into the configured cache."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    seen = {}

    def fake_download(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    assert hub.resolve_model_dir("GSAI-ML/LLaDA-8B-Instruct@main", "model.path") == str(tmp_path)
    assert seen == {"repo_id": "GSAI-ML/LLaDA-8B-Instruct", "revision": "main", "local_files_only": False,
                    "cache_dir": str(tmp_path / "home" / "hub"), "allow_patterns": list(hub.MODEL_FILE_PATTERNS)}

    def not_found(repo_id, **kwargs):
        from huggingface_hub.errors import RepositoryNotFoundError

        response = types.SimpleNamespace(headers={}, request=None, status_code=404)
        raise RepositoryNotFoundError("404 Client Error.\n\nRepository Not Found for url: ...", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(ConfigError, match=r"^model.path='org/typo' is neither a directory nor a hub repository this "
                                          r"machine can read \(RepositoryNotFoundError: 404 Client Error.\)$"):
        hub.resolve_model_dir("org/typo", "model.path")


def test_teacher_from_a_hub_id(offline_cache, tmp_path):
    """The distillation teacher's path takes a hub id too (config, weights and tokenizer)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from dultra_jax.interop.hf_teacher import load_teacher
    from dultra_jax.rewards.distill import Teacher

    cache, _, _ = offline_cache
    directory = tmp_path / "teacher"
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=24)).save_pretrained(str(directory))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(DEMO, name), directory / name)
    snapshot = add_to_cache(cache, "qwen/tiny-teacher", str(directory))
    params, config = load_teacher("qwen/tiny-teacher")
    want_params, want_config = load_teacher(str(directory))
    assert config == want_config
    jax.tree.map(np.testing.assert_array_equal, params, want_params)
    assert Teacher.check_dir("qwen/tiny-teacher", dtype="float32") == snapshot
    with pytest.raises(ConfigError, match=r"^rewards.teacher_path='qwen/other' is neither a directory nor in the "
                                          r"Hugging Face cache"):
        Teacher.check_dir("qwen/other")


# ------------------------------------------------------------------------------------ launchers


def test_launchers_take_a_hub_id(tmp_path):
    cache = tmp_path / "hub"
    add_to_cache(cache, "dultra/demo", DEMO)
    env = dict(one_device_env(), HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    out = tmp_path / "scores.npz"
    proc = _run("score.py", "--model=dultra/demo", "--tokens=[[9, 1, 7]]", f"--out={out}", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(out)["token_logits"].shape == (1, 3, 12)
    line = _one_line_error(_run("sample.py", "--model=dultra/missing", f"--prompt={TEMPLATE}", env=env), "sample.py")
    assert line == (f"sample.py: error: --model='dultra/missing' is neither a directory nor in the Hugging Face "
                    f"cache ({cache}, HF_HUB_OFFLINE=1): not cached; download it where the hub is reachable "
                    f"(hf download dultra/missing)")
