"""dultra_jax/cli.py and the launchers as a user runs them: one-line errors with exit status 2 that
name the culprit, errors that name flags, and the shared command-line behaviour of sample.py,
score.py, export.py and evaluate.py (inline JSON ids, model sources, dtypes, knob flags), plus
sample.py on eight devices."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from dultra_jax import cli
from dultra_jax.errors import (CheckpointError, ConfigError, DataError, DistributedError, ShardingError, TokensError,
                               UserError)
from tests.helpers import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "demo")
TEMPLATE = "??##?dc????d???c????b##?##???b??"  # a demo-task prompt (its tokenizer's characters only)


def _run(script: str, *args: str, env=None, cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", script), *args], cwd=cwd,
                          env=env or one_device_env(), capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, script: str) -> str:
    """The launcher's error line; asserts exit status 2, no traceback, and a single error line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if f"{script}: error:" in line]
    assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
    return lines[0]


# -------------------------------------------------------------------------------- the library


def test_every_user_error_has_one_base_and_stays_a_value_error():
    for kind in (ConfigError, CheckpointError, ShardingError, DataError, TokensError, DistributedError):
        assert issubclass(kind, UserError) and issubclass(kind, ValueError), kind
    # The old homes re-export the same classes.
    from dultra_jax import config, distributed, sharding
    from dultra_jax.data import sources
    from dultra_jax.interop import logit_check, safetensors_io
    assert (config.ConfigError, safetensors_io.CheckpointError, sharding.ShardingError, sources.DataError,
            logit_check.TokensError, distributed.DistributedError) == (
        ConfigError, CheckpointError, ShardingError, DataError, TokensError, DistributedError)


@pytest.mark.parametrize("message, want", [
    ("decode.gen_length=30 is not a multiple of decode.block_length=8",
     "--gen_length / --block_length: decode.gen_length=30 is not a multiple of decode.block_length=8"),
    ("model: /x: no such file or directory", "--model: /x: no such file or directory"),
    ("data=/x.jsonl: no such file or directory", "--data=/x.jsonl: no such file or directory"),
    ("task / task_options: unknown option(s)", "--task / --task_option: unknown option(s)"),
    ("out_dir=/o: not empty (pass `overwrite=True` to replace it)", "--out=/o: not empty (pass --overwrite to "
                                                                       "replace it)"),
    ("prompt has characters the tokenizer of d does not know: 'W'", "prompt has characters the tokenizer of d "
                                                                     "does not know: 'W'"),
    ("seeds=[1, 1]: give one or more distinct seeds", "seeds=[1, 1]: give one or more distinct seeds"),
])
def test_name_flags(message, want):
    names = {**cli.decode_flag_names("gen_length", "block_length"), "model": "--model", "data": "--data",
             "task": "--task", "task_options": "--task_option", "out_dir": "--out", "overwrite": "--overwrite"}
    assert cli.name_flags(message, names) == want


def test_config_override_error_names_the_override_and_the_close_key(monkeypatch):
    from ml_collections import config_flags

    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
    argv = ["train.py", f"--config={ROOT}/configs/tiny.py", "--config.optim.learning_rat=0.1"]
    monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the overrides from sys.argv
    with pytest.raises((AttributeError, KeyError)) as raised:
        flag_values(argv)
    assert cli.config_override_error(raised.value, argv, flag_values) == (
        "--config.optim.learning_rat=0.1: the config has no key optim.learning_rat; did you mean "
        "optim.learning_rate?")
    assert cli.config_override_error(AttributeError("'NoneType' object has no attribute 'x'"), argv,
                                     flag_values) is None


def test_a_prompt_with_unknown_characters_names_them():
    from dultra_jax.data.tokenizer import encode_prompt, load_tokenizer

    tokenizer = load_tokenizer(DEMO)
    assert encode_prompt(tokenizer, "??##ab") == [10, 10, 11, 11, 2, 3]
    with pytest.raises(DataError, match=r"prompt has characters the tokenizer of .*demo does not know: "
                                        r"'W', 't', ' ', 'i', 's', '7', '\+', '5'$"):
        encode_prompt(tokenizer, "What is 7+5?")


def test_sample_follows_the_checkpoint_dtype(tmp_path):
    """An HF directory's weights run in its config.json's torch_dtype unless a dtype is given."""
    import jax

    from dultra_jax.model_source import load_policy

    def dtypes(policy):
        return policy.model.dtype, policy.model.param_dtype, {str(x.dtype) for x in jax.tree.leaves(policy.params)}

    assert dtypes(load_policy(DEMO)) == ("float32", "float32", {"float32"})
    assert dtypes(load_policy(DEMO, dtype="bfloat16")) == ("bfloat16", "float32", {"float32"})
    assert dtypes(load_policy(DEMO, param_dtype="bfloat16")) == ("float32", "bfloat16", {"bfloat16"})
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for name in os.listdir(DEMO):
        if name != "config.json":
            os.symlink(os.path.join(DEMO, name), bf16 / name)
    config = json.loads(open(os.path.join(DEMO, "config.json")).read())
    (bf16 / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    assert dtypes(load_policy(str(bf16))) == ("bfloat16", "bfloat16", {"bfloat16"})


# ------------------------------------------------------------------ one-line errors, exit 2


def test_mistyped_config_override_is_one_line(tmp_path):
    proc = _run("train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}",
                "--config.optim.learning_rat=0.1")
    line = _one_line_error(proc, "train.py")
    assert line == ("train.py: error: --config.optim.learning_rat=0.1: the config has no key optim.learning_rat; "
                    "did you mean optim.learning_rate?")
    proc = _run("train.py", "--config=configs/no_such_config.py", f"--workdir={tmp_path / 'w'}")
    assert "--config=configs/no_such_config.py: cannot load the config file: no such file" in _one_line_error(
        proc, "train.py")
    proc = _run("pretrain.py", "--config=configs/demo_pretrain.py", f"--workdir={tmp_path / 'w'}", "--bogus=1")
    assert "Unknown command line flag 'bogus'" in _one_line_error(proc, "pretrain.py")
    assert not (tmp_path / "w").exists()


def test_malformed_config_json_is_one_line(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(DEMO):
        if name != "config.json":
            os.symlink(os.path.join(DEMO, name), model / name)
    (model / "config.json").write_text("{not json")
    line = _one_line_error(_run("sample.py", f"--model={model}", f"--prompt={TEMPLATE}"), "sample.py")
    assert line.startswith("sample.py: error: --model: ") and f"{model}/config.json" in line
    line = _one_line_error(_run("score.py", f"--model={model}", "--tokens=[[2, 3]]", f"--out={tmp_path / 'o.npz'}"),
                           "score.py")
    assert line.startswith("score.py: error: --model: cannot read ") and f"{model}/config.json" in line


def test_export_to_an_existing_file_or_full_directory_names_the_flags(tmp_path):
    file = tmp_path / "file"
    file.write_text("x")
    line = _one_line_error(_run("export.py", f"--model={DEMO}", f"--out={file}"), "export.py")
    assert line == f"export.py: error: --out={file}: exists and is not a directory"
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    line = _one_line_error(_run("export.py", f"--model={DEMO}", f"--out={full}"), "export.py")
    assert line == (f"export.py: error: --out={full}: the export directory exists and is not empty "
                    f"(pass --overwrite to replace it)")


def test_sample_errors_name_the_prompt_characters_and_the_flags():
    line = _one_line_error(_run("sample.py", "--model=assets/demo", "--prompt=What is 7+5?"), "sample.py")
    assert line == ("sample.py: error: prompt has characters the tokenizer of assets/demo does not know: "
                    "'W', 't', ' ', 'i', 's', '7', '+', '5'")
    line = _one_line_error(_run("sample.py", "--model=assets/demo", f"--prompt={TEMPLATE}", "--gen_length=30",
                                "--block_length=8"), "sample.py")
    assert line.startswith("sample.py: error: --gen_length / --block_length: decode.gen_length=30")
    line = _one_line_error(_run("sample.py", "--model=assets/demo", f"--prompt={TEMPLATE}", "--eoser_gamma_min=0.5"),
                           "sample.py")
    assert line.startswith("sample.py: error: --eoser_gamma_min / --eoser: ")
    line = _one_line_error(_run("sample.py", "--model=assets/demo", f"--prompt={TEMPLATE}", "--prompt_ids=[[2]]"),
                           "sample.py")
    assert line == "sample.py: error: --prompt / --prompt_ids: give exactly one"


# ---------------------------------------------------------------- data before weights


_DATA_CONFIG = """
import ml_collections
from configs import demo


def get_config(arg=None):
    config = demo.get_config()
    config.model.path = {model!r}
    config.final_eval = None
    str_ref = lambda: ml_collections.FieldReference(None, field_type=str)  # noqa: E731
    config.data = ml_collections.ConfigDict(dict(task="fill", path=str_ref(), data_dir=str_ref(), tokenizer=str_ref(),
                                                 prompts_per_step=4, shuffle_seed=0))
    return config
"""


def test_train_checks_config_data_and_tokenizer_before_reading_weights(tmp_path):
    """Mistakes in the data, the tokenizer or the config are reported before any weight is read:
    with a model directory whose safetensors file is garbage, each still gets its own one-line
    error, and no workdir is created; only with everything else right do the weights fail."""
    from dultra_jax.data import fill

    model = tmp_path / "model"
    model.mkdir()
    for name in os.listdir(DEMO):
        if name != "model.safetensors":
            os.symlink(os.path.join(DEMO, name), model / name)
    (model / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(100))
    config = tmp_path / "config.py"
    config.write_text(_DATA_CONFIG.format(model=str(model)))
    records = fill.write_jsonl(str(tmp_path / "train.jsonl"), "train", 8)
    workdir = tmp_path / "w"
    cases = [
        (["--config.data.path=/nonexistent/train.jsonl"], "data.path: /nonexistent/train.jsonl: no such file"),
        (["--config.data.path=tfds:nonexistent_ds:train", f"--config.data.data_dir={tmp_path}"],
         f"data.path: tfds:nonexistent_ds:train (data_dir={tmp_path}): no prepared TFDS dataset 'nonexistent_ds' in "
         f"{tmp_path} (prepare it there with file_format='array_record', or pass its data_dir)"),
        ([f"--config.data.path={records}", "--config.data.tokenizer=/nonexistent"],
         "data.tokenizer='/nonexistent': no such file or directory"),
        ([f"--config.data.path={records}", "--config.decode.gen_length=256"],
         "decode.prompt_length + decode.gen_length = 288 exceeds model.max_sequence_length=64"),
    ]
    for args, message in cases:
        proc = _run("train.py", f"--config={config}", f"--workdir={workdir}", *args)
        assert _one_line_error(proc, "train.py") == f"train.py: error: {message}"
        assert "loaded" not in proc.stderr and not workdir.exists(), proc.stderr[-3000:]
    proc = _run("train.py", f"--config={config}", f"--workdir={workdir}", f"--config.data.path={records}")
    line = _one_line_error(proc, "train.py")
    assert line.startswith(f"train.py: error: safetensors file {model}/model.safetensors: its header size ")


def test_tfds_paths_that_do_not_exist_are_one_data_error(tmp_path, caplog):
    """A dataset name, config, version, split or data_dir that does not exist: one DataError
    naming the path, and none of TFDS's own log lines about it."""
    import logging

    from dultra_jax.data.sources import load_records
    from tests.test_data_sources import _prepare_tfds

    data_dir = str(tmp_path / "tfds")
    _prepare_tfds(data_dir)
    cases = [
        ("tfds:dultra_tiny_qa/main:dev", data_dir, rf"^tfds:dultra_tiny_qa/main:dev \(data_dir={data_dir}\): cannot "
                                                   r"open TFDS split 'dev' .*Unknown split 'dev'. Should be one of "
                                                   r"\['train', 'test'\]"),
        ("tfds:dultra_tiny_qa/main:9.9.9:train", data_dir, r"no prepared TFDS dataset 'dultra_tiny_qa/main:9.9.9' in "),
        ("tfds:dultra_tiny_qa/other:train", data_dir, r"no prepared TFDS dataset 'dultra_tiny_qa/other' in "),
        ("tfds:dultra_tiny_qa/main:train", str(tmp_path), rf"no prepared TFDS dataset 'dultra_tiny_qa/main' in "
                                                          rf"{tmp_path} "),
        ("tfds:dultra_tiny_qa/main:train", str(tmp_path / "nope"), rf"no such data directory {tmp_path}/nope$"),
        ("tfds:no_such_set:train", data_dir, r"^tfds:no_such_set:train .*no prepared TFDS dataset 'no_such_set'"),
    ]
    caplog.set_level(logging.DEBUG)
    for path, directory, message in cases:
        caplog.clear()
        with pytest.raises(DataError, match=message):
            load_records(path, data_dir=directory)
        assert not [r for r in caplog.records if "tensorflow_datasets" in r.pathname], caplog.text


# ------------------------------------------------------------------------ command-line features


def _sample_rows(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("[")]


def test_sample_knob_flags_and_dtypes(tmp_path):
    common = ["--model=assets/demo", f"--prompt={TEMPLATE}", "--gen_length=32", "--block_length=32"]
    proc = _run("sample.py", *common, "--rule=entropy_bound", "--entropy_bound=0.5")
    assert len(_sample_rows(proc)) == 1 and "float32 parameters, float32 compute" in proc.stderr
    proc = _run("sample.py", *common, "--rule=threshold", "--eoser", "--eoser_gamma_min=0.5", "--dtype=bfloat16")
    assert len(_sample_rows(proc)) == 1 and "float32 parameters, bfloat16 compute" in proc.stderr
    out = tmp_path / "out.json"
    proc = _run("sample.py", "--model=assets/demo", "--gen_length=32", "--block_length=32", "--rule=factor",
                "--param_dtype=bfloat16", "--prompt_ids=[[10, 10, 2]]", f"--out={out}")
    assert len(_sample_rows(proc)) == 1 and "bfloat16 parameters, float32 compute" in proc.stderr
    assert len(json.loads(out.read_text())["rows"][0]["tokens"]) == 32


def test_demo_config_works_from_another_directory(tmp_path):
    """configs/demo.py's model.path (the shipped asset) resolves from the config file, not the
    working directory."""
    proc = _run("sample.py", f"--config={ROOT}/configs/demo.py", f"--prompt={TEMPLATE}", "--gen_length=32",
                "--block_length=32", cwd=str(tmp_path))
    assert len(_sample_rows(proc)) == 1


def test_score_takes_inline_token_ids_like_sample(tmp_path):
    out = tmp_path / "o.npz"
    proc = _run("score.py", "--model=assets/demo", "--tokens=[[9, 1, 7], [2, 3, 1]]", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = np.load(out)
    assert scores["tokens"].tolist() == [[9, 1, 7], [2, 3, 1]] and scores["token_logits"].shape == (2, 3, 12)
    line = _one_line_error(_run("score.py", "--model=assets/demo", "--tokens=[[9, 1], [2]]", f"--out={out}"),
                           "score.py")
    assert line.startswith("score.py: error: --tokens: inline JSON: row 1 has length 1")


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory):
    """A two-step pretrain run of the demo backbone: a workdir with a checkpoint and `tokenizer/`."""
    from configs import demo_pretrain
    from dultra_jax.training.mdlm_sft import pretrain

    config = demo_pretrain.get_config()
    config.total_steps = 2
    config.log_every = 1
    config.checkpoint.every = 2
    config.data.batch_size = 8
    config.data.num_examples = 64
    config.eval.num_examples = 0
    config.eval.every = 0
    config.eval.rules = ()
    workdir = tmp_path_factory.mktemp("pretrain")
    pretrain(config, str(workdir))
    return workdir


def test_sample_and_evaluate_take_a_training_workdir(pretrain_workdir, tmp_path):
    from dultra_jax.data import fill

    proc = _run("export.py", f"--model={pretrain_workdir}", f"--out={tmp_path / 'hf'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint_manager.py" not in proc.stderr and "checkpointer.py" not in proc.stderr  # Orbax is quiet
    proc = _run("sample.py", f"--model={pretrain_workdir}", f"--prompt={TEMPLATE}", "--rule=factor",
                "--gen_length=32", "--block_length=32")
    [row] = _sample_rows(proc)
    assert len(row.rsplit(": ", 1)[1]) <= 32  # decoded text (letters), not ids
    records = fill.write_jsonl(str(tmp_path / "heldout.jsonl"), "heldout", 4)
    proc = _run("evaluate.py", f"--model={pretrain_workdir}", "--task=fill", f"--data={records}",
                "--rules=entropy_bound,threshold", "--entropy_bounds=0.5,2", "--thresholds=0.9", "--eoser",
                "--seeds=0", "--gen_length=32", "--block_length=32", "--prompt_length=32", "--batch_size=4",
                f"--out={tmp_path / 'eval'}", "--noprogress")
    assert proc.returncode == 2  # EOSER applies to every rule evaluated; entropy_bound is not a confidence rule
    assert "--eoser: decode.eoser=True does not apply to rule 'entropy_bound'" in proc.stderr
    proc = _run("evaluate.py", f"--model={pretrain_workdir}", "--task=fill", f"--data={records}",
                "--rules=entropy_bound", "--entropy_bounds=0.5,2", "--seeds=0", "--gen_length=32",
                "--block_length=32", "--prompt_length=32", "--batch_size=4", f"--out={tmp_path / 'eval'}",
                "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "eval" / "summary.json").read_text())["rows"]
    assert [(r["rule"], r["sweep_value"]) for r in rows] == [("entropy_bound", 0.5), ("entropy_bound", 2.0)]
    assert "| sweep entropy_bound |" in proc.stdout and "entropy_bound entropy_bound=0.5" in proc.stdout


def test_sample_on_eight_devices_does_not_hang():
    """The rollout's trajectory is sliced inside its jitted program: sample.py on eight fake CPU
    devices (parameters sharded over them) finishes, where slicing the sharded outputs eagerly
    could deadlock XLA:CPU's collectives."""
    flags_ = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env = dict(one_device_env(), XLA_FLAGS=" ".join(flags_ + ["--xla_force_host_platform_device_count=8"]))
    ids = json.dumps([[10, 10, 11, 11, 2, 3, 4], [2, 2, 2, 10, 10, 10, 10]] * 4)
    for rule in ("planner_bernoulli", "threshold"):
        proc = _run("sample.py", "--model=assets/demo", f"--prompt_ids={ids}", f"--rule={rule}", "--gen_length=32",
                    "--block_length=8", env=env, timeout=300)
        assert len(_sample_rows(proc)) == 8


@pytest.mark.parametrize("script, shared", [("evaluate.py", ("--cache", "--cache_refresh", "--factors", "--task_option")),
                                            ("sample.py", ("--cache", "--cache_refresh"))])
def test_help_lists_the_flags_the_shared_helpers_define(script, shared):
    """Flags made by `cli.DEFINE_*` belong to the launcher that calls them, so its `--help` lists
    them (absl's `--help` shows the main module's flags only)."""
    result = _run(script, "--help", env=one_device_env())  # absl's usage exits with status 1
    listed = {line.split(":")[0].strip() for line in result.stdout.splitlines() if line.startswith("  --")}
    assert set(shared) <= listed, sorted(listed)
