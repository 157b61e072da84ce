"""``platform cluster up``: a local Ray head that ``ray job submit`` can use, token auth on.

Two things make the bare ``ray start --head`` + ``ray job submit`` sequence fail for users:
- token auth: ``ray start`` turns it on whenever ``~/.ray/auth_token`` exists (any local ``ray.init()``
  writes it), but the job client sends the token only with ``RAY_AUTH_MODE=token``; with that variable
  and no token file, ``ray start`` refuses to start. ``up`` requires the variable (the client shell
  needs it anyway) and creates the token file if it is missing.
- ``ray start`` returns before the head's job agent is up; the dashboard waits only 10 s for it, so on a
  busy machine the first ``ray job submit`` fails with "No available agent to submit job". ``up``
  returns once the agent has registered with the head (what the dashboard looks up), and gives the
  agent a free port (see ``AGENT_PORT_FLAG``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True)

DEFAULT_GCS_PORT = 6379  # `ray start --head --port`'s default
# The head's job agent HTTP port. Ray's default (52365) is one fixed port per machine: a second Ray
# there (another user's, a test's) holds it, this head's agent then runs without HTTP and never takes
# a job. 0 lets the OS pick a free one; the dashboard finds it through the head's registry (GCS).
AGENT_PORT_FLAG = "--dashboard-agent-listen-port"


def _ray(*args: str) -> list[str]:
    """The `ray` CLI of this interpreter's environment (not whatever `ray` is first on PATH)."""
    return [str(Path(sys.executable).parent / "ray"), *args]


def _flag_value(args: list[str], flag: str) -> str | None:
    """The value given to ``flag`` in ``ray start`` arguments (``--flag=V`` or ``--flag V``), if any."""
    for i, arg in enumerate(args):
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _registered_agent_ports(client: Any) -> list[int]:
    """HTTP ports of the job agents registered with the head's GCS: the keys the dashboard looks up
    before it accepts a job (Ray has no public call for this; the GCS client is ``ray._raylet``'s)."""
    import json

    from ray._private import ray_constants
    from ray.dashboard import consts

    namespace = ray_constants.KV_NAMESPACE_DASHBOARD
    keys = client.internal_kv_keys(consts.DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX.encode(), namespace=namespace)
    values = [client.internal_kv_get(key, namespace=namespace) for key in keys]
    return [int(json.loads(value)[1]) for value in values if value]


def _wait_for_job_agent(gcs_address: str, timeout: float) -> None:
    from ray._raylet import GcsClient

    client = GcsClient(address=gcs_address)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(port > 0 for port in _registered_agent_ports(client)):
            return
        time.sleep(0.5)
    raise typer.BadParameter(f"the head's job agent did not register within {timeout:.0f} s; see "
                             "dashboard_agent.log in the session's logs folder (/tmp/ray/session_latest/logs)")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def up(
    ctx: typer.Context,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the head to take jobs.")] = 180.0,
) -> None:
    """`ray start --head [EXTRA ARGS]` with token auth on; returns once the head takes `ray job submit`."""
    if os.environ.get("RAY_AUTH_MODE") != "token":
        raise typer.BadParameter(
            "run `export RAY_AUTH_MODE=token` in this shell first: the head keeps token auth on, and "
            "`ray job submit` sends the token only when RAY_AUTH_MODE=token is set", param_hint="RAY_AUTH_MODE")
    # Creates ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH) only if no token exists; prints the token: drop it.
    subprocess.run(_ray("get-auth-token", "--generate"), check=True, stdout=subprocess.DEVNULL)
    args = list(ctx.args)
    if _flag_value(args, AGENT_PORT_FLAG) is None:
        args.append(f"{AGENT_PORT_FLAG}=0")
    started = subprocess.run(_ray("start", "--head", *args))
    if started.returncode != 0:
        raise typer.Exit(started.returncode)  # `ray start` has printed why
    _wait_for_job_agent(f"127.0.0.1:{_flag_value(args, '--port') or DEFAULT_GCS_PORT}", timeout)
    typer.echo("The head takes jobs: ray job submit --working-dir . -- python jobs/pretrain.py")
