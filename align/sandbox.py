"""Running untrusted Python (e.g. model-written code for a reward) in a bubblewrap sandbox.

Each execution is a separate `bwrap` process tree with:

- **nothing of the host but a read-only runtime**: `runtime` paths (default `/usr`, the system's
  programs and libraries, plus the `/lib`, `/lib64`, `/bin` links) bound read-only; no `$HOME`, no
  project directory, no `/etc`; a fresh `/proc` of its own PID namespace, a minimal read-only `/dev`;
- a private, size-capped `/tmp` (tmpfs, `tmp_mb`) and `/dev/shm` (1 MiB) as the only writable places;
- new user, PID, network (no interface but loopback), IPC, UTS and cgroup namespaces; no nested user
  namespaces (`--disable-userns`); an empty environment; a new session (no terminal);
- limits set before the code runs: RLIMIT_AS (`memory_mb`), RLIMIT_FSIZE (`file_size_mb`: each file,
  stdout and stderr), RLIMIT_CPU, RLIMIT_NOFILE, RLIMIT_CORE 0 and RLIMIT_NPROC (`processes`, threads
  included). Root ignores RLIMIT_NPROC, and a root-started bwrap maps the sandbox back to root, so
  when Align runs as root each worker slot starts bwrap as its own unprivileged uid
  (`uid_base + slot`); as an ordinary user bwrap runs as that user (the kernel counts RLIMIT_NPROC per
  user namespace since Linux 5.14, so the cap still holds per execution);
- a wall-clock limit: the whole tree is killed (SIGKILL to bwrap's process group; `--die-with-parent`
  and the PID namespace take every descendant with it), also when the caller dies.

`Execution.finished` tells code that ran to its last line from code that stopped early with exit code 0
(`exit()`, `os._exit(0)`, a kill before the tests): the bootstrap writes a per-run token back only after
the last line. It guards a reward against that shortcut, not against code that searches its own
interpreter's memory for the token; the sandbox guards the host, not the score.

If the sandbox cannot be set up (no bwrap, user namespaces disabled, interpreter unusable) the first
use raises an AlignError saying what is missing; code is never run outside the sandbox.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import pwd
import queue
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence

from align.errors import AlignError

INSTALL = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap; "
           "Arch: pacman -S bubblewrap)")
USERNS = ("unprivileged user namespaces must be allowed: sysctl kernel.unprivileged_userns_clone=1 (Debian), "
          "kernel.apparmor_restrict_unprivileged_userns=0 or an AppArmor profile for bwrap (Ubuntu 23.10+), "
          "user.max_user_namespaces > 0; in Docker, a seccomp profile that allows clone/unshare of namespaces; ")

# Runs inside the sandbox as `python -I -c BOOT fd limits...`: sets the limits, reads `token\nsource`
# from fd (then empties it), runs the source as __main__, and writes the token back to fd only if the
# source ran to its end (no exception, no exit()): `Execution.finished`. The token is a local of a
# function, so the code under test cannot simply print it.
BOOT = """\
def _boot():
    import os, resource, sys, types
    fd, limits = int(sys.argv[1]), [int(v) for v in sys.argv[2:]]
    for name, value in zip(("AS", "FSIZE", "NOFILE", "NPROC", "CORE"), limits[1:]):
        resource.setrlimit(getattr(resource, "RLIMIT_" + name), (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (limits[0], limits[0] + 1))
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    os.ftruncate(fd, 0)
    token, _, source = data.partition(b"\\n")
    del data
    main = types.ModuleType("__main__")
    main.__file__, sys.argv = "main.py", ["main.py"]
    sys.modules["__main__"] = main
    exec(compile(source, "main.py", "exec"), main.__dict__)
    sys.stdout.flush()
    os.pwrite(fd, token, 0)
_boot()
"""


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one execution may use."""

    timeout_s: float = 10.0
    """Wall-clock seconds; the process tree is killed after that."""
    cpu_s: float | None = None
    """CPU seconds per process (RLIMIT_CPU); default: timeout_s."""
    memory_mb: int = 1024
    """Address space per process (RLIMIT_AS), MiB."""
    file_size_mb: int = 16
    """Largest file a process may write (RLIMIT_FSIZE), MiB; stdout and stderr are files too."""
    tmp_mb: int = 64
    """Size of the private /tmp, MiB."""
    processes: int = 16
    """Processes and threads at once, the first included (RLIMIT_NPROC)."""
    open_files: int = 256
    """Open file descriptors per process (RLIMIT_NOFILE)."""

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "file_size_mb", "tmp_mb", "processes", "open_files"):
            if not getattr(self, name) > 0:
                raise AlignError(f"sandbox limit {name} must be > 0, got {getattr(self, name)!r}")


@dataclasses.dataclass
class Execution:
    """What one execution did. `finished`: the code ran to its end (no exception, no exit(), no kill)."""

    returncode: int | None
    stdout: str
    stderr: str
    finished: bool
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


class Sandbox:
    """Runs Python source in bubblewrap, `workers` executions at a time.

    python: the interpreter inside the sandbox; it must lie under a `runtime` path and be readable by an
    unprivileged uid (a venv or pyenv under /root is not: use the system's /usr/bin/python3). The code
    gets the standard library only.
    """

    def __init__(self, limits: Limits = Limits(), *, python: str = "/usr/bin/python3",
                 runtime: Sequence[str] = ("/usr",), workers: int | None = None, uid_base: int = 1_999_000_000):
        self.limits, self.python, self.runtime = limits, python, tuple(runtime)
        self.workers = workers or len(os.sched_getaffinity(0))
        self.as_root = os.geteuid() == 0
        self.uid_base = uid_base
        self._slots: queue.Queue[int] = queue.Queue()
        for slot in range(self.workers):
            self._slots.put(slot)
        self._bwrap = self._check_setup()

    # ------------------------------------------------------------------------------------- setup

    def _check_setup(self) -> str:
        """The bwrap path, after a `print(1)` ran in the sandbox; AlignError saying what is missing."""
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            raise AlignError(f"cannot run code in a sandbox: `bwrap` (bubblewrap) is not on PATH; {INSTALL}. "
                             "Align never runs such code unsandboxed")
        python = os.path.realpath(self.python)
        if not any(python == p or python.startswith(p.rstrip("/") + "/") for p in map(os.path.realpath, self.runtime)):
            raise AlignError(f"sandbox interpreter {self.python!r} ({python}) is not under the runtime paths "
                             f"bound into the sandbox ({', '.join(self.runtime)}); use /usr/bin/python3 or add "
                             "its installation prefix to `runtime`")
        if self.as_root:
            taken = [u for u in range(self.uid_base, self.uid_base + self.workers) if _has_account(u)]
            if taken:
                raise AlignError(f"sandbox uid {taken[0]} (uid_base {self.uid_base} + worker slot) belongs to an "
                                 "account; pick a uid_base whose next `workers` uids are unused")
        self._bwrap = bwrap
        try:
            result = self.run("print(1)")
        except OSError as error:
            raise AlignError(f"cannot start the code sandbox ({bwrap}): {error}; it must be executable by uid "
                             f"{self.uid_base if self.as_root else os.geteuid()}") from None
        if not (result.finished and result.ok and result.stdout == "1\n"):
            detail = (result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}")[-600:]
            hint = USERNS if "namespace" in detail or "uid map" in detail or "Operation not permitted" in detail \
                else (f"check that {self.python} runs for an unprivileged user (a world-readable path); "
                      if "python" in detail or "No such file" in detail else "")
            raise AlignError(f"the code sandbox does not work on this machine: running print(1) in bwrap gave: "
                             f"{detail}; {hint}Align never runs such code unsandboxed")
        return bwrap

    def _command(self, fd: int) -> list[str]:
        mb, lim = 1 << 20, self.limits
        cmd = [self._bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
               "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin", "--setenv", "HOME", "/tmp",
               "--setenv", "LANG", "C.UTF-8", "--hostname", "sandbox", "--cap-drop", "ALL"]
        for path in self.runtime:
            cmd += ["--ro-bind", path, path]
        for link in ("lib", "lib64", "bin"):
            if os.path.islink(f"/{link}") and f"/{link}" not in self.runtime:
                cmd += ["--symlink", os.readlink(f"/{link}"), f"/{link}"]
        cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(mb), "--tmpfs", "/dev/shm",
                "--size", str(lim.tmp_mb * mb), "--tmpfs", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/",
                "--chdir", "/tmp", self.python, "-I", "-c", BOOT, str(fd)]
        cpu = math.ceil(lim.cpu_s if lim.cpu_s is not None else lim.timeout_s)
        return cmd + [str(v) for v in (cpu, lim.memory_mb * mb, lim.file_size_mb * mb, lim.open_files,
                                       lim.processes + 1, 0)]  # +1: bwrap's init in the PID namespace

    # ------------------------------------------------------------------------------------- running

    def run(self, source: str, stdin: str = "") -> Execution:
        """Run `source` as a program with `stdin`; its stdout, stderr and how it ended."""
        slot = self._slots.get()
        try:
            return self._run(source, stdin, slot)
        finally:
            self._slots.put(slot)

    def map(self, jobs: Sequence[tuple[str, str]]) -> list[Execution]:
        """Run (source, stdin) jobs, `workers` at a time; results in order."""
        if len(jobs) <= 1:
            return [self.run(*job) for job in jobs]
        with concurrent.futures.ThreadPoolExecutor(min(self.workers, len(jobs)), "align-sandbox") as pool:
            return list(pool.map(lambda job: self.run(*job), jobs))

    def _run(self, source: str, stdin: str, slot: int) -> Execution:
        token = secrets.token_hex(16).encode()
        user = dict(user=self.uid_base + slot, group=self.uid_base + slot, extra_groups=[]) if self.as_root else {}
        cap = self.limits.file_size_mb << 20
        with tempfile.TemporaryFile() as channel, tempfile.TemporaryFile() as inp, \
                tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            channel.write(token + b"\n" + source.encode("utf-8", "surrogatepass"))
            inp.write(stdin.encode())
            for f in (channel, inp):
                f.flush()
                f.seek(0)
            start = time.monotonic()
            process = subprocess.Popen(self._command(channel.fileno()), stdin=inp, stdout=out, stderr=err,
                                       pass_fds=(channel.fileno(),), env={}, cwd="/", start_new_session=True,
                                       **user)
            timed_out = False
            try:
                process.wait(self.limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if process.returncode is None:  # timed out or interrupted; not reaped, so its pgid is still ours
                    _kill_group(process.pid)
                    process.wait()
            seconds = time.monotonic() - start
            channel.seek(0)
            finished = not timed_out and channel.read(len(token) + 1) == token
            out.seek(0)
            err.seek(0)
            return Execution(process.returncode, out.read(cap).decode(errors="replace"),
                             err.read(cap).decode(errors="replace"), finished, timed_out, seconds)


def _kill_group(pgid: int) -> None:
    """SIGKILL bwrap's process group (the sandbox's own session dies with it: die-with-parent, PID ns)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _has_account(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True
