"""Code rewards: extract the program from a completion and run it against the task's tests in a sandbox.

Sandbox design (what is enforced, and how)
------------------------------------------
Each program runs in a fresh process tree started with `subprocess.Popen` (no `preexec_fn`, so it is
safe from the multi-threaded trainer): `python -I -c <_sandbox_child.py> <config>`, in a new session
(`start_new_session`), in a new temporary directory (removed afterwards), with an environment that
holds only fixed values (PATH, HOME/TMPDIR = the work directory, UTF-8 locale, one BLAS thread), so
nothing of the parent's environment is inherited. The child sets, before the program runs:

- resource limits: CPU seconds (`RLIMIT_CPU`, ~timeout), address space (`RLIMIT_AS`, `memory_mb`),
  processes (`RLIMIT_NPROC`, `nproc`), file size (`RLIMIT_FSIZE`, `fsize_mb`), open files
  (`RLIMIT_NOFILE`, `nofile`), no core dumps; `no_new_privs` (no setuid binaries).
- `mode="ns"` (Linux, used when available; detected once by a probe): new mount, network, PID, IPC
  and UTS namespaces (plus a user namespace when not root). The network namespace has no usable
  interface (no network). /tmp, /var/tmp and /dev/shm are one private tmpfs of `disk_mb` (total
  disk use is bounded; whatever is written there vanishes with the namespace), every other mount is
  read-only, and /proc shows only the sandbox's own processes (the trainer's environment and
  command line cannot be read, and its PID cannot even be named). The program's ancestors are PID 1
  of the namespace and the launcher outside it; when PID 1 exits the kernel kills every process
  left in the namespace, daemonised or not.
- When the trainer runs as root, the program also runs as an unprivileged per-slot uid/gid (from
  a range derived from the trainer's PID; no supplementary groups, no capabilities). That makes
  `RLIMIT_NPROC` meaningful (it never applies to root) and signals to the trainer fail with EPERM.
  If the interpreter lives under a directory the sandbox uid cannot enter (e.g. /root/.pyenv),
  `ns` mode bind-mounts its directories back read-only under a tmpfs that hides the rest.
- The parent enforces the wall-clock limit (`timeout_s`): past it, it kills the whole process group
  with SIGKILL (status `timeout`). Output is read from pipes while the program runs; only the last
  `capture_bytes` of stdout and stderr are kept, and a program that writes more than
  `max_output_mb` in total is killed (status `killed`). Afterwards the parent kills anything left
  in the session or owned by the sandbox uid, waits until no such process remains, and removes the
  temporary directory.
- A bounded pool: at most `max_concurrency()` sandboxes run at once in the whole process (each takes
  a slot, which also picks its uid); `check_programs` runs a batch on a thread pool of that size.

The result is reported by the program process on a private pipe, with a random nonce, only after
the program and all tests ran; early exits (`sys.exit`, `os._exit`), forks and printed fake reports
cannot produce a pass.

APPS problems (`check_apps_program`) run in one such sandbox per program: its process forks a fresh
process for every test case, with the per-case wall-clock and CPU limit of the reference's grader
(10 s) and the result pipe closed, and judges each case itself (call-based: the pickled return
value, read back with an allowlist of types; standard input: the case's stdout). That keeps the
reference's semantics (a fresh process per case, a time limit per case) at the cost of a fork
(a few ms) instead of a new sandbox (~0.1 s) per case.

What is not possible or not enforced:
- `mode="plain"` (no namespaces: not Linux, or namespaces are not permitted) keeps the limits, the
  session kill, the stripped environment and the temporary directory, but not the network ban, the
  read-only filesystem or the private /proc. As root it still switches to the sandbox uid when the
  interpreter is reachable by it, which keeps writes outside world-writable directories, signals to
  the trainer and /proc/<pid>/environ of the trainer out of reach, and afterwards it deletes what
  that uid left in /tmp, /var/tmp and /dev/shm; otherwise (root with an unreachable interpreter, or
  a non-root trainer) the program runs with the trainer's identity, `RLIMIT_NPROC` counts the
  user's other processes, and processes that leave the session are not tracked.
- Without root, `ns` mode uses a user namespace: the program keeps the trainer's uid outside the
  namespace, but it has no capabilities, the filesystem is read-only and /proc is private.
- The tests run in the same interpreter as the program (as in the HumanEval and APPS harnesses), so
  a program written to introspect the harness's frames could find the nonce and forge a report.
- A hard memory limit on RSS is not available without cgroups; `RLIMIT_AS` bounds virtual memory.

Statuses: `passed`, `failed` (an assertion failed or an APPS case gave a wrong answer, the entry
point is missing, the program exited early without a report), `syntax_error` (the program does
not compile), `runtime_error` (any other exception, in the program or the tests), `timeout` (wall
clock or CPU limit), `killed` (a signal, or a resource limit: memory, file size, disk, output
volume).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import re
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Sequence

import numpy as np

from dultra_jax.data.tasks import apps_test_shape
from dultra_jax.rewards.registry import RewardInputs, register

logger = logging.getLogger(__name__)

STATUSES = ("passed", "failed", "syntax_error", "runtime_error", "timeout", "killed")

_CHILD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_SETUP_ERROR_EXIT = 121
_UID_BASE = 2_000_000_000
_UID_SLOTS = 64
_WORLD_WRITABLE = ("/tmp", "/var/tmp", "/dev/shm")


class SandboxError(RuntimeError):
    """The sandbox itself could not be set up (not a property of the program under test)."""


@dataclasses.dataclass
class CodeResult:
    """Outcome of running one program against its tests.

    `stdout` and `stderr` are the last `capture_bytes` of each stream; `error` is the exception the
    harness saw (type and message), if any (for APPS programs: the first problem met, prefixed with
    its case number); `cases` is `(passed, total)` test cases for APPS programs, else None; `info`
    describes the sandbox (mode, launcher pid = session id, uid, work directory), for debugging and
    tests.
    """

    passed: bool
    status: str
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0
    error: str = ""
    cases: tuple[int, int] | None = None
    info: dict = dataclasses.field(default_factory=dict, repr=False)


# --------------------------------------------------------------------------------------------------
# Program extraction

_FENCE = re.compile(r"```([^\n`]*)\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_program(completion: str) -> str:
    """The program in a completion: the last ```python fenced block, else the last fenced block of
    any language, else the whole text. An unclosed final fence runs to the end of the text."""
    blocks = [(m.group(1).strip().lower(), m.group(2)) for m in _FENCE.finditer(completion)]
    python = [body for lang, body in blocks if lang in ("python", "python3", "py")]
    if python:
        return python[-1].strip("\n")
    if blocks:
        return blocks[-1][1].strip("\n")
    return completion.strip("\n")


# --------------------------------------------------------------------------------------------------
# Concurrency slots (bounded pool) and sandbox uids


class _Slots:
    def __init__(self, n: int):
        self._lock = threading.Lock()
        self._resize(n)

    def _resize(self, n: int):
        if not 1 <= n <= _UID_SLOTS:
            raise ValueError(f"max_concurrency={n} must be in [1, {_UID_SLOTS}]")
        self.size = n
        self._queue: queue.Queue[int] = queue.Queue()
        for i in range(n):
            self._queue.put(i)

    def acquire(self) -> tuple[int, queue.Queue]:
        q = self._queue
        return q.get(), q

    @staticmethod
    def release(slot: int, q: queue.Queue):
        q.put(slot)


_SLOTS = _Slots(max(1, min(_UID_SLOTS, os.cpu_count() or 1)))


def max_concurrency() -> int:
    """How many sandboxes may run at once in this process."""
    return _SLOTS.size


def set_max_concurrency(n: int) -> None:
    """Change the process-wide bound on concurrent sandboxes (call while none is running)."""
    _SLOTS._resize(int(n))


def _slot_uid(slot: int) -> int:
    # Distinct per trainer process (with high probability) and per slot; below 2**31.
    return _UID_BASE + (os.getpid() % 500_000) * _UID_SLOTS + slot


# --------------------------------------------------------------------------------------------------
# Platform detection


def _child_source() -> str:
    with open(_CHILD_PATH) as f:
        return f.read()


_CHILD_SOURCE = _child_source()


def _interpreter_dirs() -> list[str]:
    import site
    dirs = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
            os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.path.abspath(sys.executable))}
    try:
        dirs.update(site.getsitepackages())
    except AttributeError:
        pass
    return sorted({os.path.realpath(d) for d in dirs if d and os.path.isdir(d)})


def _blocked_ancestor(path: str) -> str | None:
    """The first directory on `path` (from /) that other users cannot enter, or None."""
    current = "/"
    for part in path.strip("/").split("/"):
        if not part:
            continue
        current = os.path.join(current, part)
        try:
            mode = os.stat(current).st_mode
        except OSError:
            return None
        if stat.S_ISDIR(mode) and not mode & stat.S_IXOTH:
            return current
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if (mode & stat.S_IROTH and mode & stat.S_IXOTH) else path


@functools.lru_cache(maxsize=None)
def _expose_groups_cached() -> tuple:
    return tuple((anc, tuple(paths)) for anc, paths in _expose_groups())


def _expose_groups() -> list[list]:
    """[[ancestor, [interpreter dirs under it]], ...] for dirs the sandbox uid cannot reach."""
    dirs = _interpreter_dirs()
    # Keep only top-most directories (binding a directory also exposes what is below it).
    tops = [d for d in dirs if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in dirs)]
    groups: dict[str, list[str]] = {}
    for d in tops:
        anc = _blocked_ancestor(d)
        if anc is not None:
            if anc == d:
                raise SandboxError(f"{d} is not readable by other users; the sandbox uid cannot run Python")
            groups.setdefault(anc, []).append(d)
    # An ancestor inside another one would be covered by the outer tmpfs: merge into the outer.
    merged: dict[str, list[str]] = {}
    for anc in sorted(groups, key=len):
        outer = next((o for o in merged if anc.startswith(o.rstrip("/") + "/")), None)
        merged.setdefault(outer or anc, []).extend(groups[anc])
    return [[anc, paths] for anc, paths in merged.items()]


_MODE_LOCK = threading.Lock()
_MODE: str | None = None


def sandbox_mode() -> str:
    """`"ns"` when this platform allows the namespace sandbox (probed once), else `"plain"`."""
    global _MODE
    with _MODE_LOCK:
        if _MODE is None:
            _MODE = "plain"
            if sys.platform.startswith("linux"):
                try:
                    probe = check_program("x = 1", "assert x == 1", timeout_s=20.0, mode="ns")
                except Exception as exc:  # noqa: BLE001 - any failure means: not available
                    probe = CodeResult(False, "killed", error=repr(exc))
                if probe.passed:
                    _MODE = "ns"
                else:
                    logger.warning("code sandbox: namespaces unavailable (%s %s); using plain mode without "
                                   "network isolation or a read-only filesystem", probe.status,
                                   probe.error or probe.stderr[-500:])
        return _MODE


@functools.lru_cache(maxsize=None)
def _plain_uid_ok() -> bool:
    try:
        ok = not _expose_groups()
    except SandboxError:
        ok = False
    if not ok and os.geteuid() == 0:
        logger.warning("code sandbox: plain mode as root without a separate uid (the interpreter is not "
                       "reachable by other users); programs run as root")
    return ok


# --------------------------------------------------------------------------------------------------
# Process bookkeeping


def _scan_processes(sid: int | None, uid: int | None) -> list[int]:
    """Live (not zombie) PIDs whose session id is `sid` or whose real uid is `uid`."""
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
            # Fields after the command name (which may contain spaces and parentheses).
            fields = data[data.rindex(b")") + 2:].split()
            if fields[0] in (b"Z", b"X"):
                continue  # dead; its parent reaps it
            if sid is not None and int(fields[3]) == sid:
                found.append(int(name))
                continue
            if uid is not None:
                with open(f"/proc/{name}/status", "rb") as f:
                    for line in f:
                        if line.startswith(b"Uid:"):
                            if int(line.split()[1]) == uid:
                                found.append(int(name))
                            break
        except (OSError, ValueError, IndexError):
            continue
    return found


def _terminate(proc: subprocess.Popen) -> None:
    """SIGKILL the sandbox: first everything in its session but the launcher, so that the launcher
    reaps its child (no zombie is orphaned to init), then the whole process group."""
    if proc.poll() is None and os.path.isdir("/proc"):
        for pid in _scan_processes(proc.pid, None):
            if pid != proc.pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)


def _kill_leftovers(sid: int, uid: int | None, deadline_s: float = 5.0) -> list[int]:
    """Kill what is left of a sandbox; returns PIDs still alive after `deadline_s` (normally none)."""
    if not os.path.isdir("/proc"):
        return []
    end = time.monotonic() + deadline_s
    used_kill_all = False
    while True:
        pids = _scan_processes(sid, uid)
        if not pids:
            return []
        if uid is not None and not used_kill_all and os.geteuid() == 0 and shutil.which("kill"):
            # kill(-1) as the sandbox uid: every process of that uid at once (no fork race).
            try:
                subprocess.run([shutil.which("kill"), "-s", "KILL", "--", "-1"], user=uid, group=uid,
                               extra_groups=[], env={}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, timeout=5, cwd="/")
            except (OSError, subprocess.SubprocessError):
                pass
            used_kill_all = True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > end:
            return _scan_processes(sid, uid)
        time.sleep(0.01)


def _remove_owned(uid: int) -> None:
    """Delete entries owned by `uid` at the top of the world-writable directories."""
    for base in _WORLD_WRITABLE:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            path = os.path.join(base, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_uid != uid:
                continue
            if stat.S_ISDIR(st.st_mode):
                _rmtree(path)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _rmtree(path: str) -> None:
    def onerror(func, p, exc_info):
        try:  # a program may have removed permissions from its own files
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)


# --------------------------------------------------------------------------------------------------
# Running one program


class _Tail:
    """Keeps the last `cap` bytes written, and the total."""

    def __init__(self, cap: int):
        self.cap, self.total, self.data = cap, 0, bytearray()

    def add(self, chunk: bytes):
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.cap:
            del self.data[:len(self.data) - self.cap]

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", errors="replace")


def _child_env(workdir: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


def check_program(program: str, tests: str, timeout_s: float = 10.0, *, entry_point: str | None = None,
                  memory_mb: int = 1024, nproc: int = 32, fsize_mb: int = 32, disk_mb: int = 64, nofile: int = 64,
                  capture_bytes: int = 8192, max_output_mb: float = 4.0, mode: str | None = None) -> CodeResult:
    """Runs `program` and then `tests` (Python source, usually asserts) in a sandbox.

    Args:
      program: the candidate program.
      tests: test code run in the program's namespace; an `AssertionError` means failure. With
        `entry_point`, a `check(candidate)` function defined by the tests (HumanEval style) is then
        called with the program's function of that name.
      timeout_s: wall-clock limit for the whole run (the CPU limit is about the same).
      memory_mb, nproc, fsize_mb, disk_mb, nofile: address space, processes, largest file, total
        size of the private /tmp (namespace mode), open files.
      capture_bytes: how much of the end of stdout / stderr to keep.
      max_output_mb: more output than this (stdout + stderr) kills the program.
      mode: "ns" or "plain" (default: the best this platform allows, see `sandbox_mode`).
    Returns:
      A `CodeResult`; never raises because of what the program does.
    Raises:
      ValueError: `tests` do not compile, or an argument is out of range.
      SandboxError: the sandbox could not be set up.
    """
    if not isinstance(program, str) or not isinstance(tests, str):
        raise TypeError("program and tests must be strings")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s={timeout_s!r} must be positive")
    try:
        compile(tests, "<tests>", "exec")
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"tests do not compile: {exc}") from exc
    if not program.strip():
        return CodeResult(False, "failed", error="empty program")
    return _in_slot(dict(program=program, tests=tests, entry_point=entry_point), timeout_s, mode, dict(
        memory_mb=memory_mb, nproc=nproc, fsize_mb=fsize_mb, disk_mb=disk_mb, nofile=nofile),
        capture_bytes, int(max_output_mb * 2**20))


# chinsengi/dUltra-os diffu_grpo/reward_func.py APPS_TIMEOUT: the wall-clock limit of one test case.
APPS_CASE_TIMEOUT_S = 10.0


def check_apps_program(program: str, input_output: str, case_timeout_s: float = APPS_CASE_TIMEOUT_S, *,
                       memory_mb: int = 1024, nproc: int = 32, fsize_mb: int = 32, disk_mb: int = 64,
                       nofile: int = 64, capture_bytes: int = 8192, max_output_mb: float = 4.0,
                       mode: str | None = None) -> CodeResult:
    """Runs an APPS program on every test case of its `input_output`, as the reference grades APPS.

    Each case runs in a fresh process (a fork of the sandboxed runner, in its own process group)
    with a wall-clock limit of `case_timeout_s` seconds and as many CPU seconds: the program is
    executed anew, then
      - call-based problems (`fn_name`): the function (or `Solution().<fn_name>` when the program
        text contains `class Solution`) is called with the case's input list as positional
        arguments (a dict with `args`/`kwargs` is spread); its return value, read back with
        pickle, must equal the expected output's first element (APPS wraps each output in a list)
        after NumPy arrays and tuples become lists. The program runs without `__name__`, as the
        reference's `exec(code, {"__builtins__": ...})` does.
      - standard-input problems: the program runs as `__main__` with the case's input (a list of
        lines is joined with newlines) on stdin; its stdout must equal the expected output token
        by token (whitespace and line layout ignored; decimals within 1e-8 + 1e-5 |b|).
    A wrong answer moves on to the next case; an exception, a timeout or a kill stops the run.

    Args:
      program: the candidate program.
      input_output: APPS's JSON string `{"inputs": [...], "outputs": [...], "fn_name"?: str}`.
      case_timeout_s: wall-clock seconds per case (the reference's 10 s).
      memory_mb, nproc, fsize_mb, disk_mb, nofile, capture_bytes, mode: as `check_program`.
      max_output_mb: the most a case may print (stdout), and the cap on stdout + stderr of the run.
    Returns:
      A `CodeResult`: `passed` when every case passed; status `failed` (some case gave a wrong
      answer), `syntax_error`, `runtime_error`, `timeout` or `killed` (the case that stopped the
      run); `cases` = (passed, total); `error` the first problem met. `failed` with no cases.
    Raises:
      ValueError: `input_output` is not an APPS test description.
      SandboxError: the sandbox could not be set up.
    """
    if not isinstance(program, str):
        raise TypeError("program must be a string")
    if not case_timeout_s > 0:
        raise ValueError(f"case_timeout_s={case_timeout_s!r} must be positive")
    _, n_cases = apps_test_shape(input_output)
    if not n_cases:
        return CodeResult(False, "failed", error="no test cases", cases=(0, 0))
    if not program.strip():
        return CodeResult(False, "failed", error="empty program", cases=(0, n_cases))
    # Each case may use its whole limit and the runner needs a moment per fork; the total is a backstop.
    timeout_s = n_cases * (case_timeout_s + 0.5) + 5.0
    max_output = int(max_output_mb * 2**20)
    apps = dict(input_output=input_output, case_timeout_s=float(case_timeout_s), max_output_bytes=max_output)
    result = _in_slot(dict(program=program, tests="", entry_point=None, apps=apps), timeout_s, mode, dict(
        memory_mb=memory_mb, nproc=nproc, fsize_mb=fsize_mb, disk_mb=disk_mb, nofile=nofile),
        capture_bytes, max_output)
    if result.cases is None:  # it did not compile, or the whole run was stopped: no case counted
        result = dataclasses.replace(result, cases=(0, n_cases))
    return result


def _in_slot(job: dict, timeout_s: float, mode: str | None, limits: dict, capture_bytes: int,
             max_output: int) -> CodeResult:
    """`_run_sandboxed` in a concurrency slot, in `mode` (default: the best this platform allows)."""
    mode = mode or sandbox_mode()
    if mode not in ("ns", "plain"):
        raise ValueError(f"mode={mode!r} must be 'ns' or 'plain'")
    slot, slot_queue = _SLOTS.acquire()
    try:
        return _run_sandboxed(job, timeout_s, mode, slot, limits, capture_bytes, max_output)
    finally:
        _Slots.release(slot, slot_queue)


def _run_sandboxed(job, timeout_s, mode, slot, limits, capture_bytes, max_output) -> CodeResult:
    start = time.monotonic()
    root = os.geteuid() == 0
    uid = None
    expose = []
    if root and (mode == "ns" or _plain_uid_ok()):
        uid = _slot_uid(slot)
        if mode == "ns":
            expose = [[anc, list(paths)] for anc, paths in _expose_groups_cached()]
    workdir = tempfile.mkdtemp(prefix="dultra_sbx_")
    result_r, result_w = os.pipe()
    nonce = secrets.token_hex(16)
    info = {"mode": mode, "uid": uid, "workdir": workdir, "pid": None}
    proc = None
    try:
        if uid is not None and mode == "plain":
            os.chown(workdir, uid, uid)
        cfg = dict(nonce=nonce, result_fd=result_w, mode=mode, uid=uid, gid=uid, workdir=workdir, expose=expose,
                   cpu_s=math.ceil(timeout_s) + 1, nproc_shared=(mode == "plain" and uid is None), **job, **limits)
        cfg_path = os.path.join(workdir, ".sandbox_config.json")
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(cfg, f)
        proc = subprocess.Popen([sys.executable, "-I", "-c", _CHILD_SOURCE, cfg_path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(result_w,), cwd=workdir,
                                env=_child_env(workdir), start_new_session=True, close_fds=True)
        info["pid"] = proc.pid
        os.close(result_w)
        result_w = -1
        out, err, res = _Tail(capture_bytes), _Tail(capture_bytes), _Tail(65536)
        timed_out, flooded = _pump(proc, {proc.stdout.fileno(): out, proc.stderr.fileno(): err, result_r: res},
                                   start + timeout_s, max_output)
    finally:
        try:
            if result_w >= 0:
                os.close(result_w)
            os.close(result_r)
            if proc is not None:
                _cleanup_processes(proc, uid)
        finally:  # the directory goes even if something above failed
            try:
                if uid is not None and mode == "plain":
                    _remove_owned(uid)
            finally:
                _rmtree(workdir)
    status, error, cases = _status(proc.returncode, res.text(), nonce, timed_out, flooded)
    return CodeResult(passed=status == "passed", status=status, stdout=out.text(), stderr=err.text(),
                      duration_s=time.monotonic() - start, error=error, cases=cases, info=info)


def _cleanup_processes(proc: subprocess.Popen, uid: int | None) -> None:
    _terminate(proc)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdout, proc.stderr):
        stream.close()
    left = _kill_leftovers(proc.pid, uid)
    if left:
        logger.error("code sandbox: processes %s survived the cleanup", left)


def _kill_group(pgid: int):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(proc, sinks: dict, deadline: float, max_output: int) -> tuple[bool, bool]:
    """Reads the pipes into `sinks` until they close. Returns (timed_out, output_flood)."""
    sel = selectors.DefaultSelector()
    for fd in sinks:
        sel.register(fd, selectors.EVENT_READ)
    result_fd = list(sinks)[-1]
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True, False
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.2:
                break  # the launcher is gone; something it left holds the pipes open
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                try:
                    chunk = os.read(key.fd, 65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                sink = sinks[key.fd]
                if key.fd == result_fd:
                    if sink.total < sink.cap:
                        sink.add(chunk)
                    continue
                sink.add(chunk)
                if sum(s.total for fd, s in sinks.items() if fd != result_fd) > max_output:
                    return False, True
        return False, False
    finally:
        sel.close()


def _status(returncode, report: str, nonce: str, timed_out: bool,
            flooded: bool) -> tuple[str, str, tuple[int, int] | None]:
    """`(status, error, cases)` of a finished sandbox from its report line (the one with `nonce`)."""
    if timed_out:
        return "timeout", "wall-clock limit", None
    if flooded:
        return "killed", "output limit", None
    for line in report.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and msg.get("nonce") == nonce:
            status, error = msg.get("status"), str(msg.get("error", ""))
            if status == "setup_error":
                raise SandboxError(f"code sandbox could not start: {error}")
            if status in STATUSES:
                cases = msg.get("cases")
                return status, error, (int(cases[0]), int(cases[1])) if cases else None
    if returncode == _SETUP_ERROR_EXIT:
        raise SandboxError("code sandbox could not start (no report)")
    if returncode is not None and (returncode < 0 or returncode > 128):
        sig = -returncode if returncode < 0 else returncode - 128
        if sig == signal.SIGXCPU:
            return "timeout", "CPU limit", None
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return "killed", f"killed by {name}", None
    return "failed", f"exited with code {returncode} before reporting", None


def check_programs(programs: Sequence[str], tests: Sequence[str], *, entry_points: Sequence[str | None] | None = None,
                   max_workers: int | None = None, **kwargs) -> list[CodeResult]:
    """`check_program` for each (program, tests) pair, at most `max_workers` at a time (default and
    upper bound: `max_concurrency()`). Results are in input order; `kwargs` go to `check_program`."""
    if len(programs) != len(tests):
        raise ValueError(f"{len(programs)} programs but {len(tests)} test suites")
    entry_points = list(entry_points) if entry_points is not None else [None] * len(programs)
    if len(entry_points) != len(programs):
        raise ValueError(f"{len(programs)} programs but {len(entry_points)} entry points")
    return _map_bounded(lambda p, t, e: check_program(p, t, entry_point=e, **kwargs),
                        list(zip(programs, tests, entry_points)), max_workers)


def check_apps_programs(programs: Sequence[str], input_outputs: Sequence[str], *, max_workers: int | None = None,
                        **kwargs) -> list[CodeResult]:
    """`check_apps_program` for each (program, input_output) pair, as `check_programs` runs them."""
    if len(programs) != len(input_outputs):
        raise ValueError(f"{len(programs)} programs but {len(input_outputs)} input_output descriptions")
    return _map_bounded(lambda p, io: check_apps_program(p, io, **kwargs), list(zip(programs, input_outputs)),
                        max_workers)


def _map_bounded(run, jobs: list[tuple], max_workers: int | None) -> list[CodeResult]:
    """`run(*job)` for every job on at most `max_workers` threads (bounded by `max_concurrency()`)."""
    if not jobs:
        return []
    workers = max(1, min(max_workers or max_concurrency(), max_concurrency(), len(jobs)))
    if workers == 1:
        return [run(*job) for job in jobs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        futures = [pool.submit(run, *job) for job in jobs]
        return [f.result() for f in futures]


# --------------------------------------------------------------------------------------------------
# Rewards


def _tests_of(example: dict) -> str | None:
    """The test source of a row (`tests`, a string or a list of lines), or None when it has none."""
    tests = example.get("tests")
    if isinstance(tests, (list, tuple)):
        tests = "\n".join(str(t) for t in tests)
    if tests is not None and str(tests).strip():
        return str(tests)
    return None


def _apps_io_of(example: dict) -> str | None:
    """APPS's `input_output` of a row without `tests` when it describes tests, else None."""
    io = example.get("input_output")
    if _tests_of(example) is not None or not io:
        return None
    try:
        apps_test_shape(io)
    except ValueError:
        return None
    return io if isinstance(io, str) else json.dumps(io)


def program_of(completion: str, example: dict) -> str:
    """The program to run: `extract_program(completion)` after the row's `program_prefix` (the
    HumanEval prompt's imports and signature, as the reference assembles `prompt + "\n" + code`)."""
    program = extract_program(completion)
    prefix = example.get("program_prefix")
    return f"{prefix}\n{program}" if prefix else program


PENALIZED_STATUSES = ("runtime_error", "timeout", "killed")
# The reference's test on the first error message (lower-cased) that keeps a crash at 0 reward.
SYNTAX_ERROR_WORDS = ("syntax", "indentation")


def code_reward_value(result: CodeResult, penalized: Sequence[str] = PENALIZED_STATUSES) -> float:
    """1 if every test passed, -0.05 for an execution error that is not a syntax error, else 0.

    As the reference's APPS reward (chinsengi/dUltra-os diffu_grpo/reward_func.py
    `apps_reward_func`): a timeout or a worker that dies without a result counts as a runtime error
    (the default `penalized` statuses are `runtime_error`, `timeout` and `killed`), and such an
    error is not penalised when its message mentions a syntax or indentation error (e.g. a
    `SyntaxError` raised by `eval` at run time); a wrong answer (`failed`) and a program that does
    not compile (`syntax_error`) give 0.
    """
    if result.passed:
        return 1.0
    if result.status in penalized and not any(w in result.error.lower() for w in SYNTAX_ERROR_WORDS):
        return -0.05
    return 0.0


def code_correct_values(completions: Sequence[str], examples: Sequence[dict], *, timeout_s: float = 10.0,
                        apps_case_timeout_s: float = APPS_CASE_TIMEOUT_S, max_workers: int | None = None,
                        penalized: Sequence[str] = PENALIZED_STATUSES, **sandbox_kwargs) -> np.ndarray:
    """Per row: `code_reward_value` of the completion's program (`extract_program`, after the row's
    `program_prefix`) run concurrently against its tests: `example["tests"]` (+ `entry_point`)
    within `timeout_s`, or else, for APPS rows, every case of `example["input_output"]`
    (`check_apps_program`, `apps_case_timeout_s` per case; a row without cases gives 0, as in the
    reference). NaN for rows with neither."""
    out = np.full(len(completions), np.nan, np.float32)
    tests = [_tests_of(ex) for ex in examples]
    test_rows = [i for i, t in enumerate(tests) if t is not None]
    apps_io = [_apps_io_of(ex) for ex in examples]
    apps_rows = [i for i, io in enumerate(apps_io) if io is not None]
    if test_rows:
        results = check_programs([program_of(completions[i], examples[i]) for i in test_rows],
                                 [tests[i] for i in test_rows],
                                 entry_points=[examples[i].get("entry_point") for i in test_rows],
                                 max_workers=max_workers, timeout_s=timeout_s, **sandbox_kwargs)
        for i, res in zip(test_rows, results):
            out[i] = code_reward_value(res, penalized)
    if apps_rows:
        # The reference dedents and strips the extracted code (`_prepare_candidate_code`).
        programs = [textwrap.dedent(program_of(completions[i], examples[i])).strip() for i in apps_rows]
        results = check_apps_programs(programs, [apps_io[i] for i in apps_rows], max_workers=max_workers,
                                      case_timeout_s=apps_case_timeout_s, **sandbox_kwargs)
        for i, res in zip(apps_rows, results):
            out[i] = code_reward_value(res, penalized)
    return out


@register("code_correct")
def code_correct(inputs: RewardInputs, *, timeout_s: float = 10.0, apps_case_timeout_s: float = APPS_CASE_TIMEOUT_S,
                 max_workers: int | None = None, penalized: Sequence[str] = PENALIZED_STATUSES,
                 **sandbox_kwargs) -> np.ndarray:
    """1 if all tests pass, -0.05 on an execution error that is not a syntax error (`penalized`
    statuses, see `code_reward_value`), else 0; NaN without tests. Options: `timeout_s` (10 s for
    a row's `tests`), `apps_case_timeout_s` (10 s per APPS test case, the reference's limit),
    `max_workers`, `penalized`, and `check_program`'s limits."""
    return code_correct_values(inputs.completions, inputs.examples, timeout_s=timeout_s,
                               apps_case_timeout_s=apps_case_timeout_s, max_workers=max_workers,
                               penalized=penalized, **sandbox_kwargs)
