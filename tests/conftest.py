"""Test setup: 8 fake CPU devices and full-precision matmuls, fixed before jax is imported.

XLA's CPU backend runs without LLVM optimisations (`--xla_backend_optimization_level=0`) and
with its older loop emitters for fusions (`--xla_cpu_use_fusion_emitters=false`): the suite's
programs are tiny, so compiling dominates; the first roughly halves compile time, the second
takes another third off (tests/test_rollout.py alone: 100 s -> 55 s; the suite on 2 cores
737 s -> 446 s with the subprocesses below keeping them). The shortened demo run drops them: it
executes enough on the demo-sized model to be no faster with them (27 s at XLA's defaults, 29 s).

A persistent compilation cache shared by the whole session (and the subprocesses the tests
start, through the environment) lets repeated runs of the same programs skip XLA compilation.
"""

import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    + ["--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
       "--xla_cpu_use_fusion_emitters=false"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never download: a model path that reads as a hub id is looked up in the HF cache only.
os.environ["HF_HUB_OFFLINE"] = "1"
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dultra-jax-test-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# The slowest files first (their measured share of a 2-worker run, largest first), so that
# `-n auto --dist loadfile` does not end with one worker alone on a long file.
SLOW_FILES_FIRST = ("test_multihost.py", "test_demo.py", "test_train.py", "test_models.py", "test_rollout.py",
                    "test_grpo.py", "test_benchmarks_train_step.py", "test_notebook.py", "test_sft.py",
                    "test_sample.py", "test_cache.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise


def pytest_sessionfinish(session, exitstatus):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
