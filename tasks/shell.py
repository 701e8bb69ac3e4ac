"""Run a command in a subprocess and stream its output, line by line, into the Prefect log."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import get_run_logger


class CommandFailed(RuntimeError):
    """A streamed command exited non-zero; the message carries its last lines."""


def venv_env() -> dict[str, str]:
    """This interpreter's bin/ first on PATH, so `python` and `dvc` in dvc.yaml commands are ours."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the log as they are printed
    return env


def stream(cmd: list[str], cwd: str | Path, tail: int = 20) -> list[str]:
    """Run `cmd` in `cwd`, log every line as it arrives, raise CommandFailed on a non-zero exit."""
    log = get_run_logger()
    log.info("$ %s  (in %s)", " ".join(cmd), cwd)
    lines: list[str] = []
    with subprocess.Popen(cmd, cwd=cwd, env=venv_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                log.info(line)
                lines.append(line)
    if proc.returncode != 0:
        raise CommandFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n" + "\n".join(lines[-tail:]))
    return lines
