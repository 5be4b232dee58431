"""The image's install path, without a Docker engine.

The Dockerfile is read, not trusted: its build-stage COPY lines are replayed into a
scratch root (with what .dockerignore lets through), and its `wheels.sh` steps are run in
the same order with the same arguments, container paths mapped under that root. Then the
fresh venv must run `shardworker --help` and `shardworker print-config` from outside the
source tree. Building the dependency wheels uses the package index (pip's cache makes
later runs quicker), hence `slow`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
WHEELS_SH = REPO / "docker" / "wheels.sh"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@dataclass
class Stage:
    base: str
    workdir: str = "/"
    steps: list[tuple[str, str]] = field(default_factory=list)


def read_dockerfile() -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line.removesuffix("\\").strip() + " "
        if line.endswith("\\"):
            continue
        instruction, _, rest = logical.strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append(Stage(base=rest.split()[0]))
        elif stages:
            stages[-1].steps.append((instruction.upper(), rest.strip()))
    return stages


def wheels_sh_args(run: str) -> list[str] | None:
    words = shlex.split(run)
    if "wheels.sh" not in words:
        return None
    return words[words.index("wheels.sh") + 1 :]


def dockerignore_allows(path: str) -> bool:
    allowed = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.removeprefix("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


class ScratchRoot:
    """Container paths mapped under a directory: /src -> ROOT/src."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.workdir = "/"

    def host(self, container_path: str) -> Path:
        absolute = os.path.join(self.workdir, container_path)
        return self.root / os.path.normpath(absolute).lstrip("/")

    def copy(self, source: str, dest: str) -> None:
        assert dockerignore_allows(source), f".dockerignore drops {source}, the build needs it"
        src, target = REPO / source, self.host(dest)
        if dest.endswith("/"):
            target = target / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))
        else:
            shutil.copy2(src, target)

    def wheels_sh(self, args: list[str]) -> None:
        mapped = [args[0], *(str(self.host(a)) for a in args[1:])]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDWORKER_")}
        env["PYTHON"] = str(REPO / ".venv" / "bin" / "python")
        done = subprocess.run(
            ["sh", str(WHEELS_SH), *mapped],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
        )
        assert done.returncode == 0, f"wheels.sh {' '.join(args)}:\n{done.stderr[-3000:]}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Replays the Dockerfile's build and install steps; returns the venv."""
    root = ScratchRoot(tmp_path_factory.mktemp("image-root"))
    venv: Path | None = None
    for stage in read_dockerfile():
        root.workdir = "/"
        for instruction, rest in stage.steps:
            if instruction == "WORKDIR":
                root.workdir = rest
            elif instruction == "COPY" and not rest.startswith("--from"):
                *sources, dest = shlex.split(rest)
                for source in sources:
                    root.copy(source, dest)
            elif instruction == "RUN" and (args := wheels_sh_args(rest)):
                root.wheels_sh(args)
                if args[0] == "install":
                    venv = root.host(args[2])
    assert venv is not None, "the Dockerfile installs nothing with wheels.sh"
    return venv


def run_cli(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(venv), **env}
    return subprocess.run(
        [str(venv / "bin" / "shardworker"), *args],
        check=False,
        env=clean,
        cwd=venv,  # not the repository: the code must come from the installed wheel
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dockerfile_follows_the_image_contract() -> None:
    stages = read_dockerfile()
    assert len(stages) >= 2, "multi-stage build"
    runtime = stages[-1]
    assert all(s.base.startswith(("python:3.11-slim", "${PYTHON_IMAGE}")) for s in stages)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    steps = dict(runtime.steps)
    assert steps["USER"] == "10001:10001"
    assert json.loads(steps["ENTRYPOINT"]) == ["/usr/bin/tini", "--"]
    assert json.loads(steps["CMD"]) == ["shardworker", "run"]  # exec form
    assert "shardworker" in steps["HEALTHCHECK"] and "check-health" in steps["HEALTHCHECK"]
    env = dict(pair.split("=", 1) for pair in shlex.split(steps["ENV"]))
    assert env["PYTHONUNBUFFERED"] == "1"
    volume = json.loads(steps["VOLUME"])
    assert volume == [env["SHARDWORKER_METRICS_DIR"]]
    chart_values = yaml.safe_load((REPO / "helm" / "shardworker" / "values.yaml").read_text())
    assert chart_values["metricsDir"]["path"] == env["SHARDWORKER_METRICS_DIR"]
    # Dependencies are built before any source is copied (their own cached layer).
    build = [(i, r) for i, r in stages[0].steps if i in ("COPY", "RUN")]
    deps_at = next(n for n, (i, r) in enumerate(build) if (wheels_sh_args(r) or [""])[0] == "deps")
    source_at = next(n for n, (i, r) in enumerate(build) if i == "COPY" and "shardworker" in r)
    assert deps_at < source_at


def test_fresh_venv_runs_help(installed: Path) -> None:
    done = run_cli(installed, "--help")
    assert done.returncode == 0, done.stderr
    for command in ("run", "migrate", "print-config", "check-health", "keys"):
        assert command in done.stdout


def test_fresh_venv_prints_config_with_secrets_redacted(installed: Path) -> None:
    done = run_cli(
        installed,
        "print-config",
        SHARDWORKER_DATABASE_URL="postgresql://sw:hunter2@db:5432/alga",
        SHARDWORKER_WORKERS="4",
        POD_NAME="shardworker-0",
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["workers"] == 4 and printed["database_url"] == "***"
    assert "hunter2" not in done.stdout + done.stderr


def test_installed_package_is_complete(installed: Path) -> None:
    probe = "import pathlib, shardworker; print(pathlib.Path(shardworker.__file__).parent)"
    done = subprocess.run(
        [str(installed / "bin" / "python"), "-c", probe],
        check=False,
        cwd=installed,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    package = Path(done.stdout.strip())
    assert package.is_relative_to(installed)
    source = REPO / "shardworker"
    data = {
        p.relative_to(source)
        for p in source.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    missing = sorted(str(p) for p in data if not (package / p).is_file())
    assert not missing, f"package data missing from the wheel (pyproject package-data): {missing}"
