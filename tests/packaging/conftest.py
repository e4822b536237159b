"""The built wheel, installed into a clean venv: what `pip install kdlab` gives a user.

`wheel_venv` (session): builds the wheel of this repository (from a copy of its tracked and
untracked-but-not-ignored files, so no stale `build/` of the checkout leaks in), creates a venv
with the base interpreter (it sees neither the CI venv's packages nor the repository), installs
torch, torchvision and the wheel with its dependencies, then installs the wheel once more with
`--no-deps` over a snapshot of site-packages to learn exactly what the wheel itself adds.

Building or installing failing fails every test that uses it, with pip's output tail; it never
skips. The first use costs two to three minutes (torch and torchvision come from local disk).
The venv (about 6 GB) is removed at the end of the session; KDLAB_KEEP_WHEEL_VENV=1 keeps it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# torch and torchvision of the machine's local wheels (pip's config points at them)
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
TAIL_LINES = 60


@dataclass
class WheelVenv:
    """A venv holding the installed wheel. `run` executes in it with a clean environment."""

    wheel: Path
    root: Path
    site_packages: Path
    # what installing the wheel alone (`--no-deps`) added: names in site-packages and in bin/
    added_site_packages: set[str] = field(default_factory=set)
    added_bin: set[str] = field(default_factory=set)

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ without anything pointing at the repository or the CI venv."""
        drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CONDA_PREFIX"}
        env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("KDLAB_")}
        ci_bin = str(Path(sys.prefix) / "bin")
        path = [p for p in env.get("PATH", "").split(os.pathsep) if p and p != ci_bin]
        env["PATH"] = os.pathsep.join([str(self.bin), *path])
        env["VIRTUAL_ENV"] = str(self.root)
        env["PYTHONNOUSERSITE"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def run(
        self, *argv: str | Path, cwd: Path, timeout: float, **extra_env: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in argv],
            cwd=cwd,
            env=self.env(**extra_env),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


class _Progress:
    """Lines on the terminal even while pytest captures output (the install takes minutes)."""

    def __init__(self, config: pytest.Config) -> None:
        self._reporter = config.pluginmanager.get_plugin("terminalreporter")
        self._capture = config.pluginmanager.get_plugin("capturemanager")

    def __call__(self, line: str) -> None:
        if self._reporter is None or self._capture is None:
            print(f"[packaging] {line}", flush=True)
            return
        with self._capture.global_and_fixture_disabled():
            self._reporter.write_line(f"[packaging] {line}", flush=True)


def _step(
    progress: _Progress, what: str, argv: list[str], *, env: dict[str, str], cwd: Path
) -> str:
    """Run one build/install command, echoing pip's milestones; fail the tests on error."""
    progress(f"{what}: {' '.join(argv)}")
    start = time.monotonic()
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    for line in process.stdout:
        output.append(line)
        direct = line.startswith("Collecting ") and "(from " not in line
        if direct or line.startswith(("Installing collected", "Successfully ")):
            progress(f"  {line.rstrip()[:200]}")
    code = process.wait()
    text = "".join(output)
    if code != 0:
        pytest.fail(
            f"{what} failed (exit {code}): {' '.join(argv)}\n--- output tail ---\n{_tail(text)}",
            pytrace=False,
        )
    progress(f"  {what} took {time.monotonic() - start:.0f} s")
    return text


def _copy_source(destination: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files (links kept as links)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:  # not a git checkout: everything but the usual build leftovers
        ignore = shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "node_modules", "__pycache__", ".venv"
        )
        shutil.copytree(REPO, destination, symlinks=True, ignore=ignore)
        return destination
    for name in listed.stdout.decode().split("\0"):
        if not name:
            continue
        source = REPO / name
        if not source.is_symlink() and not source.exists():  # deleted, not yet committed
            continue
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)
    return destination


def _site_entries(venv: WheelVenv) -> tuple[set[str], set[str]]:
    site = {p.name for p in venv.site_packages.iterdir() if p.name != "__pycache__"}
    return site, {p.name for p in venv.bin.iterdir()}


@pytest.fixture(scope="session")
def wheel_venv(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> WheelVenv:
    progress = _Progress(request.config)
    root = tmp_path_factory.mktemp("wheel-venv")
    build_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    source = _copy_source(root / "src")
    wheelhouse = root / "wheelhouse"
    _step(
        progress,
        "building the wheel",
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheelhouse),
            str(source),
        ],
        env=build_env,
        cwd=root,
    )
    wheels = sorted(wheelhouse.glob("kdlab-*.whl"))
    if len(wheels) != 1:
        pytest.fail(f"expected one kdlab wheel in {wheelhouse}, found {wheels}", pytrace=False)
    wheel = wheels[0]
    progress(f"built {wheel.name} ({wheel.stat().st_size // 1024} KiB)")

    base = Path(getattr(sys, "_base_executable", sys.executable))
    venv_dir = root / "venv"
    if os.environ.get("KDLAB_KEEP_WHEEL_VENV") != "1":  # 6 GB; pytest keeps its last 3 temp roots
        request.addfinalizer(lambda: shutil.rmtree(venv_dir, ignore_errors=True))
    clean = WheelVenv(wheel=wheel, root=venv_dir, site_packages=venv_dir)  # env() only
    _step(
        progress,
        "creating the venv",
        [str(base), "-m", "venv", str(venv_dir)],
        env=clean.env(),
        cwd=root,
    )
    purelib = subprocess.run(
        [
            str(clean.python),
            "-I",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        env=clean.env(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    venv = WheelVenv(wheel=wheel, root=venv_dir, site_packages=Path(purelib))
    # --no-compile: no bytecode for the 6 GB of torch and friends (a minute on two cores)
    pip = [str(venv.python), "-m", "pip", "install", "--no-compile", "--progress-bar", "off"]
    _step(
        progress,
        f"installing {', '.join(TORCH_PINS)} and {wheel.name} with its dependencies",
        [*pip, *TORCH_PINS, str(wheel)],
        env=venv.env(),
        cwd=root,
    )
    # What the wheel alone adds: uninstall it, snapshot, install it again without dependencies.
    _step(
        progress,
        "uninstalling kdlab",
        [*pip[:3], "uninstall", "-y", "kdlab"],
        env=venv.env(),
        cwd=root,
    )
    site_before, bin_before = _site_entries(venv)
    _step(
        progress,
        f"installing {wheel.name} alone",
        [*pip, "--no-deps", "--no-index", str(wheel)],
        env=venv.env(),
        cwd=root,
    )
    site_after, bin_after = _site_entries(venv)
    venv.added_site_packages = site_after - site_before
    venv.added_bin = bin_after - bin_before
    progress(f"the wheel added {sorted(venv.added_site_packages)} and bin/{sorted(venv.added_bin)}")
    return venv
