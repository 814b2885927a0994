"""notebooks/colab_tpu_demo.ipynb: a clean nbformat-4 notebook whose code runs top to bottom.

The notebook's code cells run in one namespace in a fresh interpreter, with tiny settings chosen
through its environment variables, a random stand-in for `assets/demo` (the shipped asset is not
needed) and a temporary work directory. Shell lines (`!pip ...`, `!git clone ...`) are recorded,
not run, and `%` magics are skipped; the test checks what the install cell would have run.
"""

import json
import os
import re
import subprocess
import sys

import pytest

from configs import demo
from dultra_jax.config import RULES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu_demo.ipynb")
ROWS = {"low_confidence", "threshold", "factor", "planner_init", "planner_rl"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DECODE = demo.get_config().decode
GEN, BLOCKS = DECODE.gen_length, DECODE.gen_length // DECODE.block_length  # NFE lies in [BLOCKS, GEN]
# Sweeps of one or two values each, most of them settings that the rows compile anyway.
SWEEPS = {"factor": [1.0, 4.0], "threshold": [0.9], "steps_per_block": [BLOCKS], "planner_rl": [1.0],
          "factor_rl_backbone": [1.0], "threshold_rl_backbone": [0.9]}

# Makes the stand-in model (here, where XLA compiles faster), runs the notebook's code cells in order
# in one namespace, then writes what the test checks.
RUNNER = r'''
import json, os, re, sys

from dultra_jax.data import fill
from tests.helpers import task_model_dir

notebook_path, out_path = sys.argv[1], sys.argv[2]
task_model_dir(os.environ["DULTRA_MODEL_DIR"], fill)
with open(notebook_path) as f:
    notebook = json.load(f)
SHELL = []

def __shell__(command):  # a `!command` line: recorded (IPython would expand {...} like an f-string)
    SHELL.append(command)

namespace = {"__name__": "__main__", "__shell__": __shell__}
for number, cell in enumerate(c for c in notebook["cells"] if c["cell_type"] == "code"):
    lines = []
    for line in "".join(cell["source"]).split("\n"):
        indent, body = re.match(r"(\s*)(.*)", line).groups()
        if body.startswith("!"):
            line = f"{indent}__shell__(f{body[1:]!r})"
        elif body.startswith("%"):
            line = f"{indent}pass"
        lines.append(line)
    exec(compile("\n".join(lines), f"<notebook code cell {number}>", "exec"), namespace)

import matplotlib.pyplot as plt
with open(out_path, "w") as f:
    json.dump({"shell": SHELL, "samples": namespace["SAMPLES"], "pareto_rows": namespace["PARETO_ROWS"],
               "pareto_png": namespace["PARETO_PNG"], "root": str(namespace["ROOT"]),
               "small": namespace["SMALL"], "open_figures": len(plt.get_fignums())}, f, default=str)
'''


def _notebook() -> dict:
    with open(NOTEBOOK) as f:
        return json.load(f)


def test_notebook_is_clean_nbformat_4():
    nb = _notebook()
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3" and nb["metadata"]["accelerator"] == "TPU"
    assert set(nb) == {"nbformat", "nbformat_minor", "metadata", "cells"}
    kinds = [cell["cell_type"] for cell in nb["cells"]]
    assert set(kinds) == {"markdown", "code"} and kinds[0] == "markdown"
    for cell in nb["cells"]:
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        assert all(s.endswith("\n") for s in cell["source"][:-1])
        if cell["cell_type"] == "code":
            assert set(cell) == {"cell_type", "metadata", "source", "execution_count", "outputs"}
            assert not any(output["output_type"] == "error" for output in cell["outputs"])
        else:
            assert set(cell) == {"cell_type", "metadata", "source"}
    # It ships with the outputs of one real run, every code cell executed once, top to bottom.
    counts = [c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code"]
    assert counts == list(range(1, len(counts) + 1))
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    # The first code cell installs the package from REPO_URL (or the checkout it runs in).
    assert "REPO_URL = " in code[0] and "!pip install" in code[0] and "!git clone" in code[0]
    assert "jax.devices()" in code[1]
    assert "jax.tools.colab_tpu" not in "".join(code)  # TPU VM runtimes need no setup call
    for source in code:  # every line but the magics is Python
        compile(re.sub(r"(?m)^(\s*)[!%].*$", r"\1pass", source), "<cell>", "exec")


def test_notebook_runs_top_to_bottom_with_small_settings(tmp_path):
    asset = str(tmp_path / "asset")  # a random stand-in for assets/demo, written by the runner
    workdir = tmp_path / "demo"
    # One CPU device, as on a CPU runtime; no persistent compilation cache (nothing here is compiled twice).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAX_PERSISTENT_CACHE")
           and k != "JAX_COMPILATION_CACHE_DIR"}
    env.update({
        "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg", "DULTRA_NOTEBOOK_SMALL": "1", "DULTRA_MODEL_DIR": asset,
        "DULTRA_WORKDIR": str(workdir),
        "DULTRA_NOTEBOOK_OVERRIDES": json.dumps({"total_steps": 2, "final_eval.generator.n": 24,
                                                 "final_eval.batch_size": 12, "final_eval.seeds": [0],
                                                 **{f"final_eval.sweeps.{name}.values": values
                                                    for name, values in SWEEPS.items()}}),
        # The suite's fast-compile flags (conftest): programs are tiny, compiling dominates (51 s -> 32 s).
        "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
    })
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", RUNNER, NOTEBOOK, str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(out) as f:
        got = json.load(f)

    # Install cell: from this checkout, editable, no clone (the runtime here has no TPU / CUDA jax).
    assert got["root"] == ROOT and got["small"] is True
    assert got["shell"] == [f"pip install -q -e {ROOT}"]
    assert "backend 'cpu', 1 device(s)" in proc.stdout

    # Training ran with the overrides and wrote the final comparison.
    with open(workdir / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    with open(workdir / "results.json") as f:
        results = json.load(f)
    assert set(results) == ROWS | {"sweeps"} and set(results["sweeps"]) == set(SWEEPS)
    for row in [*(results[name] for name in ROWS), *(r for sweep in results["sweeps"].values() for r in sweep)]:
        assert 0 <= row["accuracy"] <= 100 and BLOCKS <= row["nfe"] <= GEN and row["n"] == 24
    with open(workdir / "pareto.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert "| planner_rl | trained |" in proc.stdout  # the comparison table, printed by the notebook

    # Samples: every rule decoded every sample problem, with its NFE.
    assert set(got["samples"]) == set(RULES)
    for rule, samples in got["samples"].items():
        assert len(samples) == 4
        for sample in samples:
            assert BLOCKS <= sample["nfe"] <= GEN and len(sample["tokens"]) == GEN
            assert max(sample["unmask_step"]) == sample["nfe"] - 1
        assert f"{rule}  (batch of 12: accuracy" in proc.stdout
    assert all(s["nfe"] == GEN for s in got["samples"]["low_confidence"])  # one token per step
    assert "step  1 +" in proc.stdout  # the step-by-step view of the planner's decoding

    # The Pareto curves: the headline rows and every sweep point of results.json, plotted and saved.
    settings = {(r["series"], r["sweep_value"]) for r in got["pareto_rows"]}
    assert settings == ({(name, results[name]["sweep_value"]) for name in ROWS}
                        | {(f"{name} sweep", value) for name, values in SWEEPS.items() for value in values})
    for row in got["pareto_rows"]:
        assert row["tpf"] == pytest.approx(GEN / row["nfe"]) and row["n"] == 24
    assert got["pareto_png"] == str(workdir / "pareto_sweep.png")
    with open(got["pareto_png"], "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert got["open_figures"] >= 3  # training curves, the run's pareto.png, the sweep
