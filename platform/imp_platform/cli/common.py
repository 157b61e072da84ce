"""Helpers shared by the CLI sub-modules: turn library errors into one clear line and exit code 2."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

import typer

from imp_platform.config import ConfigError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print config/input errors as a message (no traceback) and exit with status 2."""
    try:
        yield
    except (ConfigError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None


def job_exit_code(fn: Callable[..., object], *args: object) -> int:
    """Run a ``jobs/*.py`` body: 0 on success; a user error prints one line and gives 2 (no traceback)."""
    try:
        fn(*args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
