"""The README's "On a Ray cluster" commands, run verbatim by bash up to the first `ray job submit`, on a
fresh home directory and on one where a local run left ``~/.ray/auth_token``. With that file `ray start
--head` turns token auth on, and a client without ``RAY_AUTH_MODE=token`` is refused; nothing here sets
the variable (unlike the ``ray_head`` fixture): the README's own lines have to. The first submit
comes right after the head is up: that is where ``ray start`` returning before the job agent bites.

The commands use Ray's default ports, so the test owns 6379/8265 while it runs; its own ``RAY_TMPDIR``
keeps its session apart (tests/ray_session.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from infra_manifests import REPO
from ray_session import ray_tmpdir

AUTH_ERROR = "Token authentication is enabled but no authentication token was found"
DEFAULT_PORTS = (6379, 8265)
SUBMITTED = "submitted successfully"
TAILING = "Tailing logs until the job exits"


def readme_cluster_commands() -> list[str]:
    """The README's cluster block, from its first line through the first `ray job submit`."""
    section = (REPO / "README.md").read_text().split("## On a Ray cluster", 1)[1].split("\n## ", 1)[0]
    lines = section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    first_submit = next(i for i, line in enumerate(lines) if line.startswith("ray job submit"))
    return lines[: first_submit + 1]


def _clean_env(home: Path, ray_tmp: Path) -> dict[str, str]:
    """This machine's environment minus every Ray setting a test run may have left in it (a local
    ``ray.init()`` sets RAY_AUTH_MODE in its own process), with its own home and Ray temp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    return {**env, "HOME": str(home), "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0"}


def _leave_token_like_a_local_run(env: dict[str, str]) -> Path:
    """What a local ``ray.init()`` does to a home without a token (Ray's own function)."""
    code = ("from ray._private.authentication.authentication_token_setup import generate_and_save_token; "
            "generate_and_save_token()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    token = Path(env["HOME"]) / ".ray" / "auth_token"
    assert token.is_file()
    return token


def _read_until(proc: subprocess.Popen, done, timeout: float) -> str:
    """Output of ``proc`` until ``done(output)`` holds, the process exits, or ``timeout`` passes."""
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not done("".join(chunks)):
        time.sleep(0.5)
    time.sleep(0.5)
    return "".join(chunks)


def _job_list_without_auth_mode(env: dict[str, str]) -> subprocess.CompletedProcess:
    ray_bin = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray_bin, "job", "list", "--address", f"http://127.0.0.1:{DEFAULT_PORTS[1]}"],
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def readme_env() -> Iterator[dict[str, str]]:
    """A fresh home and Ray temp dir, the default ports free; the session's processes stopped afterwards."""
    import ray

    ray.shutdown()
    for port in DEFAULT_PORTS:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken: the README's `ray start --head` needs Ray's default ports")
    with ray_tmpdir() as ray_tmp, tempfile.TemporaryDirectory() as home:
        yield _clean_env(Path(home), ray_tmp)


@pytest.mark.slow
@pytest.mark.parametrize("home", ["fresh", "after_local_run"])
def test_readme_cluster_commands_work_verbatim(readme_env, home):
    commands = readme_cluster_commands()
    assert "platform cluster up" in {line.split("#")[0].strip() for line in commands}
    assert commands[-1].split("#")[0].split() == ["ray", "job", "submit", "--working-dir", ".", "--",
                                                   "python", "jobs/pretrain.py"]
    token = Path(readme_env["HOME"]) / ".ray" / "auth_token"
    if home == "after_local_run":
        before = _leave_token_like_a_local_run(readme_env).read_text()
    proc = subprocess.Popen(["bash", "-c", "set -e\n" + "\n".join(commands)], cwd=REPO, env=readme_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # Accepted, and the log stream (an authenticated websocket) delivers the driver's first line.
        out = _read_until(proc, lambda text: TAILING in text and text.split(TAILING, 1)[1].strip(), timeout=240)
        unauthenticated = _job_list_without_auth_mode(readme_env)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert AUTH_ERROR not in out, out[-3000:]
    assert SUBMITTED in out and out.split(TAILING, 1)[1].strip(), out[-3000:]
    # Auth stayed on: the same client without RAY_AUTH_MODE=token is refused by this head.
    refusal = unauthenticated.stdout + unauthenticated.stderr
    assert unauthenticated.returncode != 0 and re.search(r"InvalidAuthToken|no authentication token", refusal), refusal
    assert token.is_file()
    if home == "after_local_run":
        assert token.read_text() == before, "the README's lines must keep an existing token"


def test_cluster_up_refuses_a_shell_whose_clients_would_not_send_the_token(monkeypatch):
    from imp_platform.cli import app
    from typer.testing import CliRunner

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    result = CliRunner().invoke(app, ["cluster", "up"])
    assert result.exit_code == 2 and "export RAY_AUTH_MODE=token" in result.output


def test_cluster_up_reads_ray_start_flags_in_both_spellings():
    from imp_platform.cli.cluster import _flag_value

    assert _flag_value(["--num-cpus=4"], "--port") is None
    assert _flag_value(["--port=7000"], "--port") == "7000"
    assert _flag_value(["--dashboard-agent-listen-port", "6001", "--num-cpus", "2"],
                       "--dashboard-agent-listen-port") == "6001"
