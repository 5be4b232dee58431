"""Podman for tests/test_image.py: the base image, the build, and a pod of the rendered Helm
chart turned into `podman run` flags.

Podman here runs as root, daemonless, with runc and cgroupfs (crun cannot handle this
machine's hybrid cgroups) and with lower rlimits than its defaults (the runtime may not raise
RLIMIT_NOFILE that far). No image registry is reachable, so the base image is made from
Debian's packages by docker/bookworm-base.sh and passed as PYTHON_IMAGE, pinned by digest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE_SCRIPT = REPO / "docker" / "bookworm-base.sh"
BASE_REPOSITORY = "localhost/shardworker-base"
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs", "--events-backend", "file")
RLIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")
BUILD_TIMEOUT_S = 900.0


class PodmanError(AssertionError):
    pass


def podman(
    *args: str, timeout_s: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run podman with this machine's runtime flags; a failure names the command and its stderr."""
    if shutil.which("podman") is None:
        raise PodmanError(
            "podman is not installed (make test installs it: scripts/install-deps.sh)"
        )
    proc = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if check and proc.returncode != 0:
        raise PodmanError(
            f"podman {' '.join(args[:3])} … exited {proc.returncode}:\n{proc.stderr[-4000:]}"
        )
    return proc


def base_image_tag() -> str:
    """The base image's tag names its recipe: an edited docker/bookworm-base.sh makes a new one."""
    recipe = hashlib.sha256(BASE_SCRIPT.read_bytes()).hexdigest()[:12]
    return f"{BASE_REPOSITORY}:bookworm-python3.11-{recipe}"


def image_digest(ref: str) -> str:
    return podman("image", "inspect", "--format", "{{.Digest}}", ref).stdout.strip()


def ensure_base_image() -> tuple[str, float]:
    """The cached base image (made once per machine and recipe), as `tag@digest`; and the
    seconds spent here (about 0 when cached, a minute or two for debootstrap)."""
    tag = base_image_tag()
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(BASE_SCRIPT), tag], capture_output=True, text=True,
        timeout=BUILD_TIMEOUT_S, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise PodmanError(f"docker/bookworm-base.sh failed ({proc.returncode}):\n{proc.stderr}")
    return f"{tag}@{image_digest(tag)}", time.monotonic() - started


def build_image(tag: str, python_image: str) -> tuple[str, float]:
    """`podman build` of the repository's Dockerfile, unchanged but for PYTHON_IMAGE: the
    image id and the seconds taken. Docker format keeps the HEALTHCHECK (the OCI format has no
    field for it).

    --layers=false: podman 4.3's builder mishandles `RUN --mount=type=bind,from=STAGE` with its
    layer cache. A cached stage mounts without the files of its later steps (buildah#4375),
    and a cached RUN step is not rebuilt when the stage it mounts changed (buildah#4522), so a
    cached build could test stale code. Without layers each build is complete (half a minute);
    the cached base image is what makes it cheap. --pull=never: the base is local, and a
    missing one fails at once instead of after retries against a registry."""
    started = time.monotonic()
    proc = podman(
        "build", "--quiet", "--pull=never", "--layers=false", "--format", "docker",
        "--network", "host", *RLIMITS,
        "--build-arg", f"PYTHON_IMAGE={python_image}", "--tag", tag, str(REPO),
        timeout_s=BUILD_TIMEOUT_S,
    )  # fmt: skip
    return proc.stdout.split()[-1], time.monotonic() - started


def image_config(ref: str) -> dict[str, Any]:
    data = json.loads(podman("image", "inspect", ref).stdout)
    return dict(data[0])


# ---------------------------------------------------------------- Helm pod -> podman run


@dataclass
class PodRun:
    """One container of a rendered pod spec, as podman runs it."""

    args: list[str]
    env: dict[str, str]
    flags: list[str] = field(default_factory=list)
    grace_s: float = 30.0
    readiness_path: str = "/readyz"
    liveness_path: str = "/healthz"

    def write_env_file(self, path: Path) -> Path:
        """Secrets go through a 0600 file, not podman's argv."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            for name, value in self.env.items():
                if "\n" in value:
                    raise ValueError(f"{name}: a newline cannot pass through an env file")
                out.write(f"{name}={value}\n")
        return path


_SIZE_UNITS = {"Ki": "k", "Mi": "m", "Gi": "g"}


def _tmpfs_size(limit: str) -> str:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", limit)
    if match is None:
        raise ValueError(f"emptyDir sizeLimit {limit!r}: not a size this test can map")
    return match.group(1) + _SIZE_UNITS.get(match.group(2) or "", "")


def _security_flags(pod_ctx: Mapping[str, Any], ctx: Mapping[str, Any]) -> list[str]:
    """The securityContext as podman flags; a key this mapping does not know fails the test,
    so a new chart setting cannot silently go untested."""
    merged = {**pod_ctx, **ctx}
    known = {"runAsNonRoot", "runAsUser", "runAsGroup", "fsGroup", "seccompProfile",
             "allowPrivilegeEscalation", "readOnlyRootFilesystem", "capabilities"}  # fmt: skip
    unknown = set(merged) - known
    if unknown:
        raise ValueError(f"securityContext keys without a podman mapping: {sorted(unknown)}")
    uid, gid = merged["runAsUser"], merged.get("runAsGroup", merged["runAsUser"])
    if merged.get("runAsNonRoot") and uid == 0:
        raise ValueError("runAsNonRoot with runAsUser 0")
    flags = ["--user", f"{uid}:{gid}"]
    if "fsGroup" in merged:
        flags += ["--group-add", str(merged["fsGroup"])]
    if merged.get("readOnlyRootFilesystem"):
        # Only the pod's own volumes are writable: no tmpfs of podman's on /tmp, /run, /var/tmp.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    if merged.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    caps = merged.get("capabilities", {})
    flags += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
    flags += [f"--cap-add={c.lower()}" for c in caps.get("add", [])]
    seccomp = merged.get("seccompProfile", {}).get("type", "RuntimeDefault")
    if seccomp != "RuntimeDefault":  # podman's default profile is the runtime default
        raise ValueError(f"seccompProfile {seccomp!r}: no podman mapping")
    return flags


def _volume_flags(spec: Mapping[str, Any], container: Mapping[str, Any]) -> list[str]:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    flags = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" not in volume:
            raise ValueError(f"volume {mount['name']}: only emptyDir has a podman mapping here")
        # An emptyDir (disk or Memory) as a tmpfs of the same size limit: private to the pod,
        # gone with it. Podman gives a tmpfs the mode of the image's directory (0750 for the
        # metrics directory) but root's ownership, whatever mode= says; U makes it the
        # container user's, as Kubernetes makes an emptyDir writable by the pod (fsGroup).
        size = volume["emptyDir"].get("sizeLimit")
        options = f"rw,nosuid,nodev{',size=' + _tmpfs_size(size) if size else ''},U"
        flags += ["--tmpfs", f"{mount['mountPath']}:{options}"]
    return flags


def _secret_data(docs: Sequence[Mapping[str, Any]], name: str) -> dict[str, str]:
    for doc in docs:
        if doc["kind"] == "Secret" and doc["metadata"]["name"] == name:
            data = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
            return {**data, **doc.get("stringData", {})}
    raise ValueError(f"Secret {name!r} is not among the rendered manifests")


def _config_map(docs: Sequence[Mapping[str, Any]], name: str) -> dict[str, str]:
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
            return dict(doc.get("data", {}))
    raise ValueError(f"ConfigMap {name!r} is not among the rendered manifests")


def _env(
    docs: Sequence[Mapping[str, Any]], container: Mapping[str, Any], pod: str
) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_config_map(docs, source["configMapRef"]["name"]))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "fieldRef" in ref and ref["fieldRef"]["fieldPath"] == "metadata.name":
            env[item["name"]] = pod
        elif "secretKeyRef" in ref:
            key_ref = ref["secretKeyRef"]
            data = _secret_data(docs, key_ref["name"])
            if key_ref["key"] in data:
                env[item["name"]] = data[key_ref["key"]]
            elif not key_ref.get("optional"):
                raise ValueError(f"{item['name']}: key {key_ref['key']!r} missing from the Secret")
        else:
            raise ValueError(f"{item['name']}: valueFrom {sorted(ref)} has no podman mapping")
    return env


def pod_run(docs: Sequence[Mapping[str, Any]], kind: str, pod_name: str) -> PodRun:
    """The first container of the one `kind` (StatefulSet, Job) among the rendered manifests."""
    (workload,) = [d for d in docs if d["kind"] == kind]
    spec = workload["spec"]["template"]["spec"]
    container = spec["containers"][0]
    run = PodRun(
        args=list(container.get("args", [])),
        env=_env(docs, container, pod_name),
        flags=_security_flags(spec.get("securityContext", {}), container.get("securityContext", {}))
        + _volume_flags(spec, container),
        grace_s=float(spec.get("terminationGracePeriodSeconds", 30)),
    )
    if "command" in container:
        raise ValueError("the chart overrides the image ENTRYPOINT: map `command` here first")
    for probe, attr in (("readinessProbe", "readiness_path"), ("livenessProbe", "liveness_path")):
        if probe in container:
            setattr(run, attr, container[probe]["httpGet"]["path"])
    return run


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from /proc (children files of every thread)."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return out
