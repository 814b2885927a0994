"""launch/sample.py: machine output with token ids, text mode with a tokenizer, bad input."""

import json
import os
import subprocess
import sys


from tests.helpers import task_model_dir, one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, "launch/sample.py", *args], cwd=ROOT, env=one_device_env(),
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_prompt_ids_to_json_and_text_prompt(tmp_path):
    model_dir = task_model_dir(str(tmp_path / "model"))

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[3, 4, 5], [6, 7]]))
    out = tmp_path / "out.json"
    _run(f"--model={model_dir}", f"--prompt_ids={prompts}", f"--out={out}", "--rule=factor", "--factor=1.0",
         "--gen_length=16", "--block_length=8")
    result = json.loads(out.read_text())
    assert set(result) == {"rows", "wall_s", "compile_s"} and result["wall_s"] > 0
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert len(row["tokens"]) == len(row["unmask_step"]) == 16
        assert 2 <= row["nfe"] <= 16 and max(row["unmask_step"]) == row["nfe"] - 1

    proc = _run(f"--model={model_dir}", "--prompt=12+34+5=", "--gen_length=16", "--block_length=8",
                "--rule=threshold", "--threshold=0.5")
    assert "NFE" in proc.stdout and "tokens per forward" in proc.stdout


def test_bad_input_is_named(tmp_path):
    proc = _run("--config=configs/tiny.py", "--prompt_ids=[[5, 6], [70]]", check=False)
    assert proc.returncode != 0 and "token id 70 is outside the vocabulary [0, 64)" in proc.stderr
    proc = _run("--config=configs/tiny.py", "--prompt_ids=[[5, 6]]", "--rule=factor", "--threshold=0.5",
                check=False)
    assert proc.returncode != 0 and "decode.threshold=0.5 does not apply to rule 'factor'" in proc.stderr
    proc = _run("--config=configs/tiny.py", "--prompt_ids=[[5, 6]]", "--gen_length=30", "--block_length=8",
                check=False)
    assert proc.returncode != 0 and "gen_length=30 is not a multiple of decode.block_length=8" in proc.stderr
