"""The code_tests reward and its sandbox (align.sandbox): mechanics, then hostile code that must score 0
and leave the host as it was. Without bwrap the sandboxed tests skip, unless ALIGN_REQUIRE_SANDBOX=1
(CI), where they fail."""

from __future__ import annotations

import hashlib
import os
import secrets
import select
import socket
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from align.errors import AlignError
from align.sandbox import Limits, Sandbox
from align_rewards.code import _sandbox, code_tests, extract_code, outputs_match, parse_test_cases

ROOT = Path(__file__).resolve().parents[1]
LIMITS = dict(timeout_s=2.0, memory_mb=256)  # code_tests kwargs of every sandboxed call here
ADD = "```python\ndef add(a, b):\n    return a + b\n```"
ECHO_SUM = "```python\nprint(sum(map(int, input().split())))\n```"


@pytest.fixture(scope="module")
def sandbox():
    """The sandbox code_tests uses with LIMITS (checked once); skip or, under ALIGN_REQUIRE_SANDBOX=1, fail."""
    try:
        return _sandbox(Limits(**LIMITS), "/usr/bin/python3", None)
    except AlignError as error:
        if os.environ.get("ALIGN_REQUIRE_SANDBOX") == "1":
            pytest.fail(f"ALIGN_REQUIRE_SANDBOX=1 but the sandbox does not work: {error}")
        pytest.skip(f"no working code sandbox here (set ALIGN_REQUIRE_SANDBOX=1 to fail instead): {error}")


def score(code: str, tests=None, test_cases=None, **kwargs) -> float:
    body = code if "```" in code else f"```python\n{code}\n```"
    return code_tests([body], tests=[tests] if tests is not None else None,
                      test_cases=[test_cases] if test_cases is not None else None, **{**LIMITS, **kwargs})[0]


# ------------------------------------------------------------------------------------ no sandbox needed

def test_extract_code_takes_the_last_closed_python_block():
    text = "```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n```python\nunclosed"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\nx = 1\n```") is None and extract_code("no code") is None
    assert extract_code([{"role": "assistant", "content": "```python3\ny = 3\n```"}]) == "y = 3\n"


def test_outputs_compare_stripped_lines():
    assert outputs_match("3 \n4\n\n", "3\n 4")
    assert not outputs_match("3\n4", "3\n5") and not outputs_match("3", "3\n4")


def test_test_case_formats():
    assert parse_test_cases([{"input": "1 2", "output": "3"}], 0) == [("1 2", "3")]
    apps = '{"inputs": ["1\\n", ["2", "3"]], "outputs": ["1", "5"]}'
    assert parse_test_cases(apps, 0) == [("1\n", "1"), ("2\n3", "5")]
    verification_info = {"language": "python", "test_cases": [
        {"input": "a", "output": "b", "type": "stdin_stdout", "fn_name": None},
        {"input": "[1]", "output": "[2]", "type": "function_call", "fn_name": "f"},
        {"input": "c", "output": "d", "type": None, "fn_name": None}]}  # a hub struct's missing fields
    assert parse_test_cases(verification_info, 0) == [("a", "b"), ("c", "d")]
    with pytest.raises(AlignError, match="row 2: `test_cases` must be a list .* got keys \\['cases'\\]"):
        parse_test_cases({"cases": []}, 2)
    with pytest.raises(AlignError, match="row 3: a test case must be"):
        parse_test_cases([{"stdin": "1"}], 3)


def test_bad_settings_and_missing_columns_are_clear_errors():
    with pytest.raises(AlignError, match="needs a `tests` column .* the batch has answer"):
        code_tests([ADD], answer=["3"])
    with pytest.raises(AlignError, match="mode must be"):
        code_tests([ADD], tests=["assert 1"], mode="any")
    with pytest.raises(AlignError, match="language 'cpp' is not supported"):
        code_tests([ADD], tests=["assert 1"], language="cpp")


def test_rows_without_tests_are_not_scored_and_run_nothing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no bwrap: any execution would raise
    assert code_tests([ADD, "no code"], tests=[None, []]) == [None, None]
    assert code_tests(["no code"], tests=["assert True"]) == [0.0]


def test_no_bwrap_is_an_error_never_an_unsandboxed_run(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(AlignError, match="bwrap.*apt-get install bubblewrap.*never runs such code unsandboxed"):
        code_tests([ADD], tests=["assert add(1, 2) == 3"], timeout_s=1.5)


def test_a_broken_sandbox_is_an_error_naming_the_cause(monkeypatch):
    folder = Path(tempfile.mkdtemp(prefix="align-fake-bwrap-", dir="/tmp"))  # executable by the sandbox's uid
    try:
        folder.chmod(0o755)
        fake = folder / "bwrap"  # what bwrap says where user namespaces are off
        fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", str(folder))
        with pytest.raises(AlignError, match="does not work on this machine.*No permissions.*unprivileged_userns"):
            Sandbox(Limits(timeout_s=2))
        with pytest.raises(AlignError, match="not under the runtime paths"):
            Sandbox(python=sys.executable, runtime=("/nonexistent",))
    finally:
        shutil.rmtree(folder)


# ------------------------------------------------------------------------------------ mechanics

def test_assert_tests_fraction_and_all(sandbox):
    wrong = "```python\ndef add(a, b):\n    return a * b\n```"
    tests = [["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 5) == 5"]] * 3
    assert code_tests([ADD, wrong, "none"], tests=tests, **LIMITS) == [1.0, pytest.approx(1 / 3), 0.0]
    assert code_tests([ADD, wrong, "none"], tests=tests, mode="all", **LIMITS) == [1.0, 0.0, 0.0]
    assert score(ADD, "assert add(1, 2) == 3\nassert add(1, 1) == 3") == 0.0  # one string is one test


def test_stdin_stdout_cases(sandbox):
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "1 1", "output": "3"}]
    assert score(ECHO_SUM, test_cases=cases) == pytest.approx(2 / 3)
    assert score(ECHO_SUM, test_cases=cases, mode="all") == 0.0
    assert score("import sys\nprint(3)\nsys.exit(0)", test_cases=cases[:1]) == 1.0  # exit(0) after output is fine
    assert score("print(3)\nraise SystemExit(1)", test_cases=cases[:1]) == 0.0
    read_all = "import sys\nprint(sum(map(int, sys.stdin.read().split())))"
    assert score(read_all, tests=["assert True", "assert False"], test_cases=cases[:2]) == 0.75  # both columns


def test_stopping_before_the_tests_does_not_pass(sandbox):
    for stop in ("import sys; sys.exit(0)", "exit()", "import os; os._exit(0)",
                 "import os, signal; os.kill(os.getpid(), 9)"):
        assert score(stop, "assert False") == 0.0, stop
    assert score("x = 1", "assert x == 1") == 1.0


def test_timeout_kills_and_scores_zero(sandbox):
    start = time.monotonic()
    assert score("while True:\n    pass", "assert True", timeout_s=1.0) == 0.0
    assert time.monotonic() - start < 5


def test_many_executions_run_in_parallel(sandbox):
    assert code_tests([ADD] * 24, tests=[["assert add(1, 2) == 3"]] * 24, **LIMITS) == [1.0] * 24
    start = time.monotonic()
    runs = Sandbox(Limits(timeout_s=5), workers=4).map([("import time; time.sleep(0.5)", "")] * 4)
    assert all(r.finished for r in runs) and time.monotonic() - start < 1.5  # one after another: > 2 s


# ------------------------------------------------------------------------------------ hostile code

def _processes(sandbox: Sandbox) -> set[int]:
    """Live processes among our descendants and (as root) of the sandbox's uids, wherever they were reparented."""
    uids = range(sandbox.uid_base, sandbox.uid_base + sandbox.workers) if sandbox.as_root else range(0)
    children: dict[int, list[int]] = {}
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            if state == "Z":  # dead, waiting to be reaped by init
                continue
            ppid = int(ppid)
            if os.stat(f"/proc/{entry}").st_uid in uids:
                found.add(int(entry))
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    todo = [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.fixture
def host(sandbox, tmp_path, monkeypatch):
    """Secrets planted where hostile code must not reach, a canary process, a loopback and an abstract
    unix listener; after the test: no sandbox process left, secrets intact, no file written, nothing heard."""
    secret = "ALIGN-SECRET-" + secrets.token_hex(8)
    home_secret = Path.home() / f".align-sandbox-secret-{secrets.token_hex(4)}"
    project = tmp_path / "project"  # a project directory as the cwd, with a secret in it
    project.mkdir()
    (project / "secret.txt").write_text(secret)
    home_secret.write_text(secret)
    monkeypatch.chdir(project)
    monkeypatch.setenv("ALIGN_SANDBOX_TEST_SECRET", secret)
    tcp = socket.create_server(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX)
    unix.bind("\0align-sandbox-test-" + secrets.token_hex(4))
    unix.listen()
    canary = subprocess.Popen(["sleep", "60"])
    before = _processes(sandbox)
    targets = {"home": str(Path.home() / "pwned"), "project": str(project / "pwned"), "repo": str(ROOT / "pwned"),
               "tmp": f"/tmp/align-pwned-{secrets.token_hex(4)}", "usr": "/usr/pwned", "dev": "/dev/pwned",
               "root": "/pwned"}
    facts = dict(secret_sha=hashlib.sha256(secret.encode()).hexdigest(), home_secret=str(home_secret),
                 project=str(project), repo_file=str(ROOT / "pyproject.toml"), port=tcp.getsockname()[1],
                 unix=unix.getsockname(), pid=os.getpid(), canary=canary.pid, targets=targets,
                 pyproject_sha=hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest())
    try:
        yield facts
        deadline = time.monotonic() + 5
        while _processes(sandbox) - before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _processes(sandbox) - before, "sandbox processes outlived their run"
        assert canary.poll() is None, "the canary process was killed"
        assert home_secret.read_text() == secret and (project / "secret.txt").read_text() == secret
        assert not [p for p in targets.values() if os.path.lexists(p)], "a file was written outside the sandbox"
        tcp.setblocking(False)
        unix.setblocking(False)
        assert not select.select([tcp, unix], [], [], 0.1)[0], "a listener on the host got a connection"
    finally:
        canary.kill()
        canary.wait()
        tcp.close()
        unix.close()
        home_secret.unlink(missing_ok=True)
        for path in targets.values():
            if os.path.isfile(path) and not path.startswith("/usr"):
                os.unlink(path)


# Each attack's test passes only if the attack worked: the reward must be 0.
ATTACKS = {
    "infinite_loop": ("while True:\n    pass", "assert True"),
    "loop_ignoring_signals_in_children": (
        "import os, signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nos.fork(); os.fork()\nwhile True:\n    pass",
        "assert True"),
    "fork_bomb_unbounded": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                            "assert True"),
    "fork_200_sleepers": ("import os, time\nn = 0\nfor _ in range(200):\n    if os.fork() == 0:\n"
                          "        time.sleep(60)\n        os._exit(0)\n    n += 1", "assert n == 200"),
    "threads_200": ("import threading, time\nts = [threading.Thread(target=time.sleep, args=(5,), daemon=True) "
                    "for _ in range(200)]\nfor t in ts:\n    t.start()", "assert len(ts) == 200"),
    "memory_bomb": ("x = bytearray(600 << 20)\nx[-1] = 1", "assert len(x) == 600 << 20"),
    "huge_file": ("with open('/tmp/big', 'wb') as f:\n    for _ in range(64):\n        f.write(b'x' * (1 << 20))",
                  "import os\nassert os.path.getsize('/tmp/big') == 64 << 20"),
    "fill_tmp_with_files": ("n = 0\nfor i in range(12):\n    with open(f'/tmp/f{{i}}', 'wb') as f:\n"
                            "        f.write(b'x' * (15 << 20))\n    n += 1", "assert n == 12"),
    "output_flood": ("while True:\n    print('x' * 100000)", "assert True"),
    "write_outside_tmp": ("targets = {targets}\nopen(targets.pop('tmp'), 'w').write('its own /tmp')\n"
                          "wrote = []\nfor path in targets.values():\n    try:\n"
                          "        open(path, 'w').write('pwned')\n        wrote.append(path)\n"
                          "    except OSError:\n        pass", "assert wrote"),
    "read_planted_secrets": (
        "import hashlib, os\nfound = set()\n"
        "for path in [{home_secret!r}, {project!r} + '/secret.txt', 'secret.txt',\n"
        "             os.path.expanduser('~/secret.txt')]:\n"
        "    try:\n        found.add(open(path).read())\n    except OSError:\n        pass\n"
        "for top in ['/', '/root', '/home', '/work', '/tmp', '/etc']:\n"
        "    for d, subdirs, files in os.walk(top):\n"
        "        subdirs[:] = [s for s in subdirs if os.path.join(d, s) not in ('/usr', '/proc', '/sys', '/dev')]\n"
        "        for name in files:\n            try:\n"
        "                text = open(os.path.join(d, name), errors='ignore').read(1 << 20)\n"
        "            except OSError:\n                continue\n"
        "            found.update(w for w in text.split() if w.startswith('ALIGN-SECRET-'))\n"
        "hashes = {{hashlib.sha256(s.encode()).hexdigest() for s in found}}",
        "assert {secret_sha!r} in hashes"),
    "read_project_file": ("import hashlib\ndata = open({repo_file!r}, 'rb').read()",
                          "assert hashlib.sha256(data).hexdigest() == {pyproject_sha!r}"),
    "read_environment": (
        "import glob, hashlib, os\ntexts = [repr(dict(os.environ))]\n"
        "for path in glob.glob('/proc/*/environ') + glob.glob('/proc/*/cmdline'):\n"
        "    try:\n        texts.append(open(path, 'rb').read().decode(errors='ignore'))\n"
        "    except OSError:\n        pass\n"
        "import re\nfound = {{hashlib.sha256(s.encode()).hexdigest() for t in texts "
        "for s in re.findall(r'ALIGN-SECRET-[0-9a-f]+', t)}}", "assert {secret_sha!r} in found"),
    "network": ("import socket\nreached = []\n"
                "for family, address in [(socket.AF_INET, ('127.0.0.1', {port})), (socket.AF_UNIX, {unix!r}),"
                " (socket.AF_INET, ('1.1.1.1', 53)), (socket.AF_INET, ('8.8.8.8', 443))]:\n"
                "    try:\n        s = socket.socket(family)\n        s.settimeout(1)\n        s.connect(address)\n"
                "        s.sendall(b'pwned')\n        reached.append(address)\n    except OSError:\n        pass",
                "assert reached"),
    "kill_parent_and_everyone": (
        "import os, signal\nkilled = []\nfor pid in ({pid}, {canary}, os.getppid(), 1):\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        killed.append(pid)\n"
        "    except OSError:\n        pass\n"
        "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass",
        "assert {pid} in killed or {canary} in killed"),
}


RUN_TO_THE_TEST = {"write_outside_tmp", "read_planted_secrets", "read_project_file", "read_environment", "network",
                   "kill_parent_and_everyone", "threads_200", "fork_200_sleepers"}
"""Attacks that must fail by themselves (an error or their assert), not by a timeout that could hide a success."""


@pytest.mark.parametrize("attack", ATTACKS)
def test_hostile_code_scores_zero_and_leaves_the_host_unchanged(attack, host, sandbox):
    code, test = (part.format(**host) for part in ATTACKS[attack])
    start = time.monotonic()
    assert score(code, test) == 0.0
    assert time.monotonic() - start < 10
    if attack in RUN_TO_THE_TEST:
        run = sandbox.run(f"{code}\n{test}\n")
        assert not run.timed_out and run.returncode != 0 and "Error" in run.stderr, run.stderr[-500:]


def test_the_attacks_would_pass_without_their_obstacle(sandbox, tmp_path):
    """The hostile tests can fail: the same attack code passes where the thing it needs is allowed."""
    assert score("n = 0\nfor _ in range(3):\n    open('/tmp/x', 'a').write('y')\n    n += 1", "assert n == 3") == 1.0
    assert score("x = bytearray(8 << 20)\nx[-1] = 1", "assert len(x) == 8 << 20") == 1.0
    assert score("import os\nn = 0\nfor _ in range(5):\n    if os.fork() == 0:\n        os._exit(0)\n    n += 1",
                 "assert n == 5") == 1.0
    assert score("import socket\ns = socket.create_server(('127.0.0.1', 0))\nc = socket.create_connection("
                 "s.getsockname())\nreached = [1]", "assert reached") == 1.0
    assert score(f"import os\nopen('/tmp/s', 'w').write('ALIGN-SECRET-1')\n"
                 "found = {open('/tmp/s').read()}", "assert 'ALIGN-SECRET-1' in found") == 1.0


def test_output_is_capped(sandbox):
    run = sandbox.run("while True:\n    print('x' * 100000)")
    assert not run.finished and run.returncode != 0 and len(run.stdout) <= 16 << 20
