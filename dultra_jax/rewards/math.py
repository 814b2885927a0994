"""Math rewards: extract the final answer and check it against the reference.

`extract_answer` takes the last `\\boxed{...}` (balanced braces; also `\\boxed x` and `\\fbox{...}`),
else the last `#### n` line. `is_correct` compares it with the reference answer (itself reduced
with `extract_answer` when it holds a box or `####`, as GSM8K solutions do):

1. a normalised string / numeric comparison (`normalize_answer`, in the spirit of the MATH
   `is_equiv`: spaces, `\\left`, `\\dfrac`, units, `%`, `$`, thousands separators, `a/b`, ...) answers
   True directly;
2. otherwise `math-verify` parses both (each wrapped in `\\boxed{}`) and verifies equivalence.

Timeouts. math-verify bounds its own work with `signal.alarm`, which only works in the main thread
of the main interpreter, and sympy cannot be interrupted from another thread. So math-verify runs
in a small pool of worker processes (`_math_worker.py`, started on first use and kept): each
request gets math-verify's own per-operation alarm there *and* a wall-clock bound here; a worker
that misses the bound is killed (a new one is started when needed) and the answer counts as
wrong. `is_correct` is therefore safe to call from any thread, and never takes (much) longer than
`timeout_s` once a worker is up. Without math-verify installed, only step 1 is used.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from typing import Sequence

import numpy as np

from dultra_jax.rewards.registry import RewardInputs, register

logger = logging.getLogger(__name__)

_WORKER_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")
DEFAULT_TIMEOUT_S = 5.0
MAX_ANSWER_CHARS = 1000
_STARTUP_TIMEOUT_S = 120.0


# --------------------------------------------------------------------------------------------------
# Extraction


def _last_braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at or after `start` (balanced), or None."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_HASH = re.compile(r"####\s*([^\n]*)")


def extract_answer(text: str) -> str | None:
    """The final answer in `text`: the last `\\boxed{...}` / `\\fbox{...}` with balanced braces (or
    `\\boxed 5`), else what follows the last `####` on its line; None when there is neither."""
    if not isinstance(text, str):
        return None
    for m in reversed(list(_BOX.finditer(text))):
        content = _last_braced(text, m.end())
        if content is not None:
            return content.strip()
        rest = text[m.end():]
        if rest[:1] == " ":  # `\boxed 5`: up to the next `$` or end of line
            value = re.split(r"[$\n]", rest.strip(), maxsplit=1)[0].strip()
            if value:
                return value
    hashes = _HASH.findall(text)
    if hashes:
        value = hashes[-1].strip()
        return value or None
    return None


# --------------------------------------------------------------------------------------------------
# Normalisation (fallback comparison)


def _fix_fracs(s: str) -> str:
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + ("{" + b + "}" + rest if b != "{" else b + rest)
    return out


def _fix_sqrt(s: str) -> str:
    parts = s.split("\\sqrt")
    out = parts[0]
    for part in parts[1:]:
        if part and part[0] not in "{[":
            part = "{" + part[0] + "}" + part[1:]
        out += "\\sqrt" + part
    return out


# Words after a number that are mathematics, not a unit (see `normalize_answer`).
_MATH_WORDS = frozenset({"pi", "sqrt", "ln", "log", "exp", "sin", "cos", "tan", "cot", "sec", "csc"})


def normalize_answer(s: str) -> str:
    """A canonical string for simple answers (MATH-style `strip_string` plus numbers)."""
    s = str(s).strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\ ", " ")
    s = s.replace("\\\\", "\\").replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\(?:text|mbox)\{\s*([^{}]*)\}", r" \1", s).strip()
    # A number followed by a unit (`18 dollars`, `5 cm`, `12inches`) keeps the number. Single
    # letters (`2x`, `3 x`, `2 i`) and constant or function names (`2 pi`, `3sqrt`) are algebra,
    # not units: dropping them would equate `2 pi` with 2. A glued unit needs 3 letters or more
    # (`12inches` is 12; `2ab` stays algebra).
    unit = re.fullmatch(r"(-?[\d,]*\.?\d+)(\s*)([A-Za-z]+(?:\s+[A-Za-z]+)*)\.?", s)
    if unit:
        words = unit.group(3).split()
        if (all(len(w) >= 2 and w.lower() not in _MATH_WORDS for w in words)
                and (unit.group(2) or len(unit.group(3)) >= 3)):
            s = unit.group(1)
    s = s.replace("\\%", "").replace("%", "")
    s = s.strip().rstrip(".").strip()
    # A variable assignment with a short left side (`x = 5`) keeps its value.
    if s.count("=") == 1 and len(s.split("=")[0].strip()) <= 2:
        s = s.split("=")[1].strip()
    s = s.replace(" ", "")
    s = _fix_sqrt(s)
    s = _fix_fracs(s)
    # Thousands separators in plain numbers: 1,234,567 -> 1234567.
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    number = _as_number(s)
    if number is not None:
        return _format_number(number)
    return s


def _as_number(s: str) -> float | None:
    s = s.strip()
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        return (-1 if m.group(1) else 1) * num / den
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    if m:
        den = int(m.group(2))
        return int(m.group(1)) / den if den else None
    if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", s):
        try:
            return float(s)
        except (ValueError, OverflowError):
            return None
    return None


def _format_number(x: float) -> str:
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if abs(x - round(x)) < 1e-9 * max(1.0, abs(x)):
        return str(int(round(x)))
    return repr(round(x, 9))


def is_equiv(a: str | None, b: str | None) -> bool:
    """The fallback comparison: equal after `normalize_answer` (numbers compared with tolerance)."""
    if a is None or b is None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    xa, xb = _as_number(na), _as_number(nb)
    return xa is not None and xb is not None and abs(xa - xb) <= 1e-6 * max(1.0, abs(xa), abs(xb))


# --------------------------------------------------------------------------------------------------
# math-verify worker pool


class _Worker:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-P", _WORKER_PATH], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd="/",
                                     close_fds=True, start_new_session=True)
        self._buf = b""
        line = self._read_line(time.monotonic() + _STARTUP_TIMEOUT_S)
        msg = json.loads(line) if line else {}
        if not msg.get("ready"):
            self.kill()
            raise RuntimeError(f"math-verify worker did not start: {msg.get('error', 'no answer')}")

    def _read_line(self, deadline: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ask(self, gold: str, pred: str, timeout_s: float, style: str = "boxed") -> bool | str | None:
        """True/False (or "unparsed" for `style="official"`, see `verify_official`), or None when the
        worker missed the deadline or died."""
        inner = max(1, int(timeout_s // 3))  # math-verify's own alarm per parse / comparison
        try:
            request = {"gold": gold, "pred": pred, "t": inner, "style": style}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        if line is None:
            return None
        try:
            ok = json.loads(line)["ok"]
            return ok if ok == "unparsed" else bool(ok)
        except (ValueError, KeyError, TypeError):
            return None

    def kill(self):
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


class _VerifierPool:
    """Up to `max_workers` worker processes, each used by one thread at a time."""

    def __init__(self, max_workers: int):
        self.max_workers = max_workers
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._alive = 0
        self.unavailable: str | None = None

    def _acquire(self) -> _Worker | None:
        with self._cond:
            while True:
                if self.unavailable:
                    return None
                if self._idle:
                    return self._idle.pop()
                if self._alive < self.max_workers:
                    self._alive += 1
                    break
                self._cond.wait()
        try:
            return _Worker()
        except Exception as exc:  # noqa: BLE001
            with self._cond:
                self._alive -= 1
                self.unavailable = str(exc)
                self._cond.notify_all()
            logger.warning("math-verify unavailable, using the string/numeric comparison only: %s", exc)
            return None

    def _release(self, worker: _Worker, healthy: bool):
        if not healthy:
            worker.kill()
        with self._cond:
            if healthy:
                self._idle.append(worker)
            else:
                self._alive -= 1
            self._cond.notify()

    def verify(self, gold: str, pred: str, timeout_s: float, style: str = "boxed") -> bool | str | None:
        worker = self._acquire()
        if worker is None:
            return None
        result = None
        try:
            result = worker.ask(gold, pred, timeout_s, style)
        finally:
            self._release(worker, healthy=result is not None)
        if result is None:
            logger.warning("math-verify timed out after %.1f s (answer %.80r)", timeout_s, pred)
        return result

    def close(self):
        with self._cond:
            idle, self._idle = self._idle, []
            self._alive -= len(idle)
        for worker in idle:
            worker.kill()


_POOL = _VerifierPool(max_workers=2)
atexit.register(_POOL.close)


def set_verifier_workers(n: int) -> None:
    """How many math-verify worker processes may run at once (default 2)."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    _POOL.max_workers = int(n)


def warmup() -> bool:
    """Starts one math-verify worker now (importing math-verify takes a second or two); returns
    whether math-verify is available."""
    worker = _POOL._acquire()
    if worker is None:
        return False
    _POOL._release(worker, healthy=True)
    return True


# --------------------------------------------------------------------------------------------------
# Public API


def reference_answer(reference) -> str:
    """The reference's final answer: `extract_answer` when it holds a box or `####`, else itself."""
    text = str(reference)
    found = extract_answer(text)
    return (found if found is not None else text).strip()


def is_correct(completion: str, reference, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether the final answer of `completion` equals `reference` (see the module docstring).

    False when the completion has no final answer, or math-verify cannot decide within `timeout_s`.
    Safe to call from any thread.
    """
    pred = extract_answer(completion)
    gold = reference_answer(reference)
    if pred is None or not pred or not gold:
        return False
    if is_equiv(pred, gold):
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    return bool(_POOL.verify(gold, pred, timeout_s))


def verify_official(gold: str, pred: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """math-verify as the official MATH-500 scorer calls it (each side wrapped in `$...$`, its
    default extraction): True/False when it parsed both, None when it could not parse one, timed
    out or is not installed (the official scorer then falls back to the string comparison)."""
    result = _POOL.verify(gold, pred, timeout_s, style="official")
    return result if isinstance(result, bool) else None


def check_answers(completions: Sequence[str], references: Sequence, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                  max_workers: int | None = None) -> list[bool]:
    """`is_correct` for each pair, using up to `max_workers` threads (default: the verifier pool size)."""
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    workers = max(1, min(max_workers or _POOL.max_workers, len(completions) or 1))
    if workers == 1:
        return [is_correct(c, r, timeout_s=timeout_s) for c, r in zip(completions, references)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="math-verify") as pool:
        return list(pool.map(lambda cr: is_correct(cr[0], cr[1], timeout_s=timeout_s), zip(completions, references)))


@register("math_correct")
def math_correct(inputs: RewardInputs, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_workers: int | None = None,
                 value: float = 2.0) -> np.ndarray:
    """`value` (2.0) when the completion's final answer equals `example["answer"]`, else 0; NaN for
    rows without an answer."""
    rows = [i for i, ex in enumerate(inputs.examples) if ex.get("answer") is not None]
    out = np.full((inputs.batch_size,), np.nan, np.float32)
    ok = check_answers([inputs.completions[i] for i in rows], [inputs.examples[i]["answer"] for i in rows],
                       timeout_s=timeout_s, max_workers=max_workers)
    for i, good in zip(rows, ok):
        out[i] = value if good else 0.0
    return out
