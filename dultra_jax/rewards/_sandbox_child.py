"""Child side of the code sandbox (`dultra_jax.rewards.code`). Not imported by the package.

The parent runs this file's source as `python -I -c <source> <config.json>` in a new session, with
an empty environment apart from a few fixed variables. Standard library only: it must not import
anything from the project (the program under test must not see it either).

Steps, each in a fresh single-threaded process (so no `preexec_fn` is needed in the multi-threaded
trainer):

1. Read the JSON config written by the parent (then delete it). It holds the program, the tests,
   the limits, a random nonce and the number of the pipe for the result.
2. In `ns` mode: `unshare` new mount, network, PID, IPC and UTS namespaces (plus a user namespace
   when not root), then fork. The child is PID 1 of the new PID namespace; it makes every mount
   private, mounts a size-limited tmpfs on /tmp (bound to /var/tmp and /dev/shm too), makes the
   interpreter's directories reachable for the sandbox uid (bind mounts, when the interpreter
   lives under a directory such as /root that other users cannot enter), remounts every other
   mount read-only and mounts a fresh /proc that shows only the namespace's processes. It then
   forks the program process and reaps until that one ends; when PID 1 exits the kernel kills
   every process left in the namespace.
3. The program process drops privileges (root: a per-slot unprivileged uid/gid and no
   supplementary groups; user namespace: all capabilities dropped), sets `no_new_privs`, lowers
   the resource limits (CPU, address space, processes, file size, open files, core dumps), enters
   the work directory and runs the program and then the tests in one namespace dict.
4. Only the original program process reports, once, on the result pipe: a JSON line with the
   nonce and a status. A program that exits early (`sys.exit`, `os._exit`), prints fake reports
   or forks copies of itself cannot produce a pass.

APPS mode (`apps` in the config: the `input_output` JSON, the per-case limit): step 3's process
compiles the program and becomes a runner that forks one process per test case (its own process
group, CPU limit and wall-clock limit; the result pipe closed). The case process runs the program
afresh and then calls `fn_name` (its return value comes back pickled and is read with an allowlist
of types) or, for a standard-input problem, runs it as `__main__` with the input on a pipe as stdin
and its stdout on another. The runner judges the case, kills the case's process group, and after
the last case (or the first error or timeout) reports once with the counts.
"""

import ctypes
import errno
import json
import os
import resource
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

SETUP_ERROR_EXIT = 121
_PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                    "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
_PRIVATE_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm")

_libc = ctypes.CDLL(None, use_errno=True)


def _call(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _b(s):
    return None if s is None else s.encode()


def _unshare(flags):
    _call(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(source, target, fstype, flags, data=None):
    _call(_libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)), f"mount {target}")


def _umount(target, flags=0):
    _call(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def _prctl(option, arg):
    _call(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)), f"prctl {option}")


def _unescape(path):
    # /proc/self/mountinfo writes space, tab, newline and backslash as octal escapes.
    for code in ("\\040", "\\011", "\\012", "\\134"):
        path = path.replace(code, chr(int(code[1:], 8)))
    return path


def _mountinfo():
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            flags = 0
            for opt in fields[5].split(","):
                flags |= _PER_MOUNT_FLAGS.get(opt, 0)
            mounts.append((_unescape(fields[4]), flags))
    return mounts


def _write_file(path, text):
    with open(path, "w") as f:
        f.write(text)


def _expose(groups):
    """Make directories the sandbox uid cannot reach (e.g. under /root) reachable, read-only.

    `groups` is a list of `[ancestor, [paths]]`: the first ancestor of each path that other users
    cannot enter. Each path is bind-mounted to a staging directory, a tmpfs (mode 755) covers the
    ancestor (hiding the rest of it), and the paths are bound back at their own names.
    """
    for g, (ancestor, paths) in enumerate(groups):
        stages = []
        for i, path in enumerate(paths):
            stage = f"/tmp/.stage{g}_{i}"
            os.mkdir(stage)
            _mount(path, stage, None, MS_BIND | MS_REC)
            stages.append(stage)
        _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
        for path, stage in zip(paths, stages):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(stage, path, None, MS_BIND | MS_REC)
            _umount(stage, MNT_DETACH)
            os.rmdir(stage)


def _setup_mounts(cfg):
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below may propagate to the host
    os.umask(0o022)
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={int(cfg['disk_mb'])}m,mode=1777")
    for path in _PRIVATE_MOUNTS[1:]:
        if os.path.isdir(path):
            _mount("/tmp", path, None, MS_BIND)
    if cfg.get("expose"):
        _expose(cfg["expose"])
    for mount_point, flags in _mountinfo():
        if mount_point in _PRIVATE_MOUNTS or mount_point == "/proc" or mount_point.startswith(("/proc/", "/tmp/")):
            continue
        try:
            _mount(None, mount_point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError:
            pass  # e.g. a mount hidden under another one; the visible ones are what matters
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    except OSError:
        # No fresh /proc (e.g. a user namespace under a masked /proc): hide the host's instead.
        _mount("tmpfs", "/proc", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k")
    os.makedirs(cfg["workdir"], mode=0o700, exist_ok=True)
    if cfg.get("uid") is not None:
        os.chown(cfg["workdir"], cfg["uid"], cfg["gid"])


def _exit_like(status):
    """Exit with the wait status `status` of a child: its exit code, or 128 + its signal."""
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


def _reap(child):
    """PID 1 of the namespace: reap everything, return when `child` (the program) is gone."""
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            os._exit(1)
        if pid == child:
            _exit_like(status)  # PID 1 exiting makes the kernel kill the whole namespace


def _enter_namespaces(cfg):
    root = os.geteuid() == 0
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if not root:
        uid, gid = os.getuid(), os.getgid()
        _unshare(flags | CLONE_NEWUSER)
        _write_file("/proc/self/setgroups", "deny")
        _write_file("/proc/self/uid_map", f"0 {uid} 1")
        _write_file("/proc/self/gid_map", f"0 {gid} 1")
    else:
        _unshare(flags)
    pid = os.fork()
    if pid:  # still outside the PID namespace: wait for its PID 1, then exit like it
        _, status = os.waitpid(pid, 0)
        _exit_like(status)
    _prctl(PR_SET_PDEATHSIG, 9)


def _drop_privileges(cfg):
    uid = cfg.get("uid")
    if uid is not None and os.geteuid() == 0:
        gid = cfg["gid"]
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaves no capabilities
    elif cfg["mode"] == "ns" and os.geteuid() == 0:
        # Root inside our own user namespace: drop the bounding set, then every capability.
        for cap in range(64):
            try:
                _prctl(PR_CAPBSET_DROP, cap)
            except OSError:
                break

        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

        class Data(ctypes.Structure):
            _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                        ("inheritable", ctypes.c_uint32)]

        _call(_libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()), "capset")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


def _count_own_processes():
    uid, n = os.getuid(), 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def _set_limits(cfg):
    cpu = int(cfg["cpu_s"])
    memory = int(cfg["memory_mb"]) * 2**20
    fsize = int(cfg["fsize_mb"]) * 2**20
    nproc = int(cfg["nproc"])
    if cfg.get("nproc_shared"):  # plain mode, own uid: the limit counts all this user's processes
        nproc += _count_own_processes()
    limits = [(resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory, memory),
              (resource.RLIMIT_NPROC, nproc, nproc), (resource.RLIMIT_FSIZE, fsize, fsize),
              (resource.RLIMIT_NOFILE, int(cfg["nofile"]), int(cfg["nofile"])), (resource.RLIMIT_CORE, 0, 0)]
    for which, soft, hard in limits:
        _, old_hard = resource.getrlimit(which)
        if old_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(which, (soft, hard))


# ----------------------------------------------------------------------------------------------
# APPS: every test case in its own fork, with its own time limit

def _apps_arguments(case_input):
    """`(args, kwargs)` of one call-based case, as the reference's `_apps_worker` reads them."""
    if isinstance(case_input, dict) and ("args" in case_input or "kwargs" in case_input):
        raw_args = case_input.get("args", [])
        args = tuple(raw_args) if isinstance(raw_args, (list, tuple)) else () if raw_args is None else (raw_args,)
        raw_kwargs = case_input.get("kwargs", {})
        return args, (raw_kwargs if isinstance(raw_kwargs, dict) else {})
    if isinstance(case_input, (list, tuple)):
        return tuple(case_input), {}
    return ((), {}) if case_input is None else ((case_input,), {})


def _apps_normalize(value, seen=None):
    """NumPy arrays and tuples become lists, recursively (the reference's `_normalize_output`)."""
    seen = set() if seen is None else seen
    kind = type(value)
    if kind.__name__ == "ndarray" and kind.__module__ == "numpy":
        return value.tolist()
    if isinstance(value, (list, tuple, dict)):
        if id(value) in seen:
            return "<recursion>"
        seen.add(id(value))
        if isinstance(value, dict):
            out = {k: _apps_normalize(v, seen) for k, v in value.items()}
        else:
            out = [_apps_normalize(v, seen) for v in value]
        seen.discard(id(value))
        return out
    return value


def _short(value, limit=200):
    try:
        text = repr(value)
    except BaseException:
        text = "<unprintable>"
    return text if len(text) <= limit else text[:limit] + "..."


def _float_token(token):
    """The value of a token written with a decimal point or an exponent, else None."""
    if not any(c in token for c in ".eE"):
        return None
    try:
        value = float(token)
    except ValueError:
        return None
    return value if value - value == 0 else None  # finite only


def _stdout_matches(got, expected):
    """Whether the printed text answers the case: equal whitespace-separated tokens (so line ends,
    trailing spaces and blank lines do not matter, as in the APPS harness's stripped comparisons),
    where a pair of tokens written as decimals may also differ by the APPS harness's float
    tolerance (|a - b| <= 1e-8 + 1e-5 |b|); integers and words must match exactly."""
    if isinstance(expected, list):
        expected = "\n".join(str(line) for line in expected)
    got_tokens, want_tokens = got.split(), str(expected).split()
    if len(got_tokens) != len(want_tokens):
        return False
    for a, b in zip(got_tokens, want_tokens):
        if a == b:
            continue
        fa, fb = _float_token(a), _float_token(b)
        if fa is None or fb is None or abs(fa - fb) > 1e-8 + 1e-5 * abs(fb):
            return False
    return True


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _apps_case_child(code, fn_name, wrap_solution, case_input, cpu_s, close_fds, stdin_fd, stdout_fd, report_fd,
                     describe):
    """The forked process of one case: run the program, then call `fn_name` or let it read stdin.
    Reports on `report_fd`: b"R" + the pickled return value, b"O" (a stdin program ended), or
    b"E" + the error. Never returns."""
    import builtins
    import pickle

    report = b"E"
    try:
        os.setpgid(0, 0)
        for fd in close_fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))  # each case gets the full CPU budget
        if stdin_fd >= 0:
            os.dup2(stdin_fd, 0)
            os.dup2(stdout_fd, 1)
            os.close(stdin_fd)
            os.close(stdout_fd)
        stdout = sys.stdout
        sys.setrecursionlimit(5000)  # as the reference's worker
        try:
            if fn_name is None:  # a script: run as __main__ on its input
                exec(code, {"__name__": "__main__", "__builtins__": builtins})
                report = b"O"
            else:  # no __name__, as the reference's exec(candidate_code, {"__builtins__": ...})
                namespace = {"__builtins__": builtins}
                exec(code, namespace)
                if wrap_solution:  # the reference exposes a LeetCode-style class's method
                    if "Solution" not in namespace:
                        raise NameError("name 'Solution' is not defined")
                    target = getattr(namespace["Solution"](), fn_name)
                else:
                    target = namespace.get(fn_name)
                    if target is None or not callable(target):
                        raise ValueError(f"Function {fn_name!r} not defined or not callable.")
                args, kwargs = _apps_arguments(case_input)
                report = b"R" + pickle.dumps(target(*args, **kwargs))
        except SystemExit as exc:
            # A script may end with sys.exit(0); a function that exits returns nothing (the
            # reference's worker then reports no result: a runtime error).
            if fn_name is None and exc.code in (None, 0):
                report = b"O"
            else:
                report = b"E" + f"SystemExit: {_short(exc.code)}".encode()
        except BaseException as exc:
            report = b"E" + describe(exc).encode("utf-8", "replace")
        for stream in (stdout, sys.stdout):
            try:
                stream.flush()
            except BaseException:
                pass
        _write_all(report_fd, report)
    except BaseException:
        pass
    os._exit(0)



def _apps_case(code, fn_name, wrap_solution, case_input, expected, timeout_s, cpu_s, max_output, result_fd, describe):
    """Runs one case in a fork and judges it. Returns (status, detail): status is passed, failed
    (wrong answer), runtime_error, timeout or killed."""
    import select
    import signal
    import time

    stdin_mode = fn_name is None
    report_r, report_w = os.pipe()
    in_r = in_w = out_r = out_w = -1
    pending = b""
    if stdin_mode:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        text = "\n".join(str(line) for line in case_input) if isinstance(case_input, list) else str(case_input)
        pending = text.encode("utf-8", "surrogatepass")
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    pid = os.fork()
    if pid == 0:
        close_fds = [fd for fd in (result_fd, report_r, in_w, out_r) if fd >= 0]
        _apps_case_child(code, fn_name, wrap_solution, case_input, cpu_s, close_fds, in_r, out_w, report_w, describe)
    try:
        os.setpgid(pid, pid)
    except OSError:
        pass  # the child already did it (or is gone)
    for fd in (report_w, in_r, out_w):
        if fd >= 0:
            os.close(fd)
    if in_w >= 0:
        os.set_blocking(in_w, False)
    report, output = bytearray(), bytearray()
    readers = {report_r: report}
    if stdin_mode:
        readers[out_r] = output
    writer = in_w if pending else -1
    if in_w >= 0 and writer < 0:
        os.close(in_w)
    deadline = time.monotonic() + timeout_s
    wait_status = exited_at = verdict = None
    try:
        while readers or writer >= 0:
            now = time.monotonic()
            if now >= deadline:
                verdict = ("timeout", f"time limit ({timeout_s:g} s)")
                break
            if wait_status is None:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    wait_status, exited_at = status, now
            if exited_at is not None and now - exited_at > 0.2:
                break  # something the program started holds the pipes open
            ready_r, ready_w, _ = select.select(list(readers), [writer] if writer >= 0 else [], [],
                                                min(0.05, deadline - now))
            for fd in ready_r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del readers[fd]
                    os.close(fd)
                    continue
                readers[fd] += chunk
            if len(output) > max_output or len(report) > max_output:
                verdict = ("killed", "output limit")
                break
            if ready_w:
                try:
                    pending = pending[os.write(writer, pending[:65536]):]
                except BlockingIOError:
                    pass
                except OSError:  # the program stopped reading its input
                    pending = b""
                if not pending:
                    os.close(writer)
                    writer = -1
    finally:
        try:
            os.killpg(pid, signal.SIGKILL)  # the case's process and whatever it started in its group
        except OSError:
            pass
        if wait_status is None:
            try:
                os.kill(pid, signal.SIGKILL)  # in case it left its group
            except OSError:
                pass
            wait_status = os.waitpid(pid, 0)[1]
        for fd in list(readers) + ([writer] if writer >= 0 else []):
            os.close(fd)
    if verdict is not None:
        return verdict
    kind, body = bytes(report[:1]), bytes(report[1:])
    if kind == b"E":
        return "runtime_error", body.decode("utf-8", "replace")
    if kind == b"R":
        try:
            value = _load_result(body)
        except BaseException as exc:
            return "runtime_error", "the result cannot be returned: " + describe(exc)
        return _judge_call(value, expected)
    if kind == b"O" or (stdin_mode and os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0):
        got = output.decode("utf-8", "replace")
        if _stdout_matches(got, expected):
            return "passed", ""
        return "failed", f"expected output {_short(expected)}, got {_short(got)}"
    if os.WIFSIGNALED(wait_status):
        sig = os.WTERMSIG(wait_status)
        if sig == signal.SIGXCPU:
            return "timeout", "CPU limit"
        return "killed", f"killed by signal {sig}"
    return "runtime_error", "the program exited without returning a result"


# What a call-based case may return (besides the types pickle builds without a global lookup: None,
# bool, int, float, str, bytes, list, tuple, dict, set, frozenset). Anything else, e.g. a class the
# program defines (which the reference cannot pickle back either), is a runtime error; and nothing
# the program sends can make the runner call an arbitrary function while reading it.
_RESULT_TYPES = {
    "builtins": {"complex", "bytearray", "range", "slice", "set", "frozenset", "list", "dict", "tuple", "int",
                 "float", "str", "bytes", "bool"},
    "collections": {"Counter", "OrderedDict", "defaultdict", "deque"},
    "fractions": {"Fraction"},
    "decimal": {"Decimal"},
    "datetime": {"date", "datetime", "time", "timedelta", "timezone"},
    "numpy": {"ndarray", "dtype"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
}


def _load_result(data):
    """Unpickles a case's return value, looking up only `_RESULT_TYPES`."""
    import io
    import pickle

    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if name in _RESULT_TYPES.get(module, ()):
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"a {module}.{name} cannot be returned")

    return Restricted(io.BytesIO(data)).load()


def _judge_call(value, expected):
    """A call-based case as the reference judges it: the return value against the expected
    output's first element (APPS wraps every output in a list), both normalised."""
    want = expected[0] if isinstance(expected, list) and expected else expected
    try:
        if _apps_normalize(value) != _apps_normalize(want):
            return "failed", f"expected {_short(want)}, got {_short(value)}"
    except BaseException as exc:
        return "failed", f"the result cannot be compared: {type(exc).__name__}"
    return "passed", ""


def _judge_apps(code, source, job, result_fd, describe):
    """Runs an APPS program on each test case of `job["input_output"]`, each in a fresh fork with
    a wall-clock limit of `job["case_timeout_s"]` (and as much CPU time), as the reference's
    `apps_reward_func` runs one process per case. A wrong answer moves on to the next case; a
    runtime error, a timeout or a kill stops there. Returns `(status, error, [passed, total])`
    where status is the last outcome that is not a pass (passed when every case passes) and
    error is the first problem met."""
    import math

    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # APPS has integers longer than 4300 digits, as the reference allows
    io = json.loads(job["input_output"])
    fn_name = io.get("fn_name") or None
    cases = list(zip(io.get("inputs", []), io.get("outputs", [])))
    if not cases:
        return "failed", "no test cases", [0, 0]
    timeout_s = float(job["case_timeout_s"])
    cpu_s = int(math.ceil(timeout_s))
    wrap_solution = fn_name is not None and "class Solution" in source  # the reference's test
    passed, status, error = 0, "passed", ""
    for index, (case_input, expected) in enumerate(cases):
        outcome, detail = _apps_case(code, fn_name, wrap_solution, case_input, expected, timeout_s, cpu_s,
                                     int(job["max_output_bytes"]), result_fd, describe)
        if outcome == "passed":
            passed += 1
            continue
        error = error or f"case {index}: {detail}"
        status = outcome
        if outcome != "failed":
            break
    return status, error, [passed, len(cases)]


def _run(cfg, nonce, result_fd):
    """Run program then tests; report once from this process. Never returns."""
    import builtins

    write, exit_, dumps, getpid, main_pid = os.write, os._exit, json.dumps, os.getpid, os.getpid()
    stdout, stderr = sys.stdout, sys.stderr

    def finish(status, error="", cases=None):
        if getpid() != main_pid:  # a fork of the program reached the end: it does not report
            exit_(0)
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        report = {"nonce": nonce, "status": status, "error": error[:2000]}
        if cases is not None:
            report["cases"] = cases
        try:
            write(result_fd, (dumps(report) + "\n").encode())
        except BaseException:
            pass
        exit_(0)

    def describe(exc):
        try:
            return f"{type(exc).__name__}: {exc}"
        except BaseException:
            return type(exc).__name__

    program, tests, entry_point = cfg.pop("program"), cfg.pop("tests"), cfg.pop("entry_point")
    try:
        code = compile(program, "<solution>", "exec")
    except MemoryError:
        finish("killed", "MemoryError while compiling")
    except BaseException as exc:  # SyntaxError, IndentationError, null bytes, too deeply nested
        finish("syntax_error", describe(exc))
    apps = cfg.pop("apps", None)
    if apps is not None:
        try:
            verdict = _judge_apps(code, program, apps, result_fd, describe)
        except MemoryError:
            finish("killed", "MemoryError in the APPS runner (memory limit)")
        except BaseException as exc:  # the runner's own failure: no verdict on the program
            finish("failed", "APPS runner: " + describe(exc))
        finish(*verdict)
    try:
        test_code = compile(tests, "<tests>", "exec")
    except BaseException as exc:
        finish("setup_error", "tests do not compile: " + describe(exc))
    namespace = {"__name__": "__solution__", "__builtins__": builtins}
    try:
        exec(code, namespace)
        program_check = namespace.get("check")
        exec(test_code, namespace)
        if entry_point:
            check = namespace.get("check")
            # only a `check` the tests define (HumanEval); the program's own helper is not a test
            if callable(check) and check is not program_check:
                if entry_point not in namespace:
                    finish("failed", f"entry point {entry_point!r} is not defined")
                check(namespace[entry_point])
    except AssertionError as exc:
        finish("failed", describe(exc))
    except MemoryError:
        finish("killed", "MemoryError: memory limit")
    except OSError as exc:
        if exc.errno in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT):
            finish("killed", describe(exc) + " (disk limit)")
        finish("runtime_error", describe(exc))
    except BaseException as exc:
        finish("runtime_error", describe(exc))
    finish("passed")


def main():
    path = sys.argv[1]
    with open(path, "rb") as f:
        cfg = json.loads(f.read())
    os.unlink(path)
    nonce, result_fd = cfg.pop("nonce"), int(cfg["result_fd"])
    try:
        if cfg["mode"] == "ns":
            _enter_namespaces(cfg)
            _setup_mounts(cfg)
            child = os.fork()
            if child:
                _reap(child)
        _drop_privileges(cfg)
        _set_limits(cfg)
        os.chdir(cfg["workdir"])
    except BaseException as exc:
        try:
            os.write(result_fd, (json.dumps({"nonce": nonce, "status": "setup_error",
                                             "error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
        finally:
            os._exit(SETUP_ERROR_EXIT)
    _run(cfg, nonce, result_fd)


if __name__ == "__main__":
    main()
