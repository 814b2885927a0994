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


def _run(cfg, nonce, result_fd):
    """Run program then tests; report once from this process. Never returns."""
    import builtins

    write, exit_, dumps, getpid, main_pid = os.write, os._exit, json.dumps, os.getpid, os.getpid()
    stdout, stderr = sys.stdout, sys.stderr

    def finish(status, error=""):
        if getpid() != main_pid:  # a fork of the program reached the end: it does not report
            exit_(0)
        for stream in (stdout, stderr):
            try:
                stream.flush()
            except BaseException:
                pass
        try:
            write(result_fd, (dumps({"nonce": nonce, "status": status, "error": error[:2000]}) + "\n").encode())
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
