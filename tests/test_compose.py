"""docker-compose.yml and the Dockerfile, checked without a Docker engine (none runs here).

Everything the files name that the project defines is checked against the project itself: the
`KDLAB_*` variables against `Settings`, each `kdlab ...` command against the CLI parser, the
service URLs against the services and ports they point at, the build targets and arguments
against the Dockerfile's stages. When a `docker-compose`/`docker compose` client is installed
(no engine needed) the file is also validated by `docker-compose config`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from kdlab.backend.cli import build_parser
from kdlab.backend.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# what a deployer must set (in .env); every other variable has a default
REQUIRED_VARIABLES = {"KDLAB_TOKEN", "POSTGRES_PASSWORD"}
ENV = {"KDLAB_TOKEN": "t0ken" * 8, "POSTGRES_PASSWORD": "pw"}  # check_bind: 32+ characters
# services that keep state, and where it lives in the container (Ray keeps none worth keeping:
# the database is the source of truth, and a restarted head starts a fresh session)
STATE_PATHS = {
    "postgres": "/var/lib/postgresql/data",
    "mlflow": "/mlartifacts",
    "backend": "/data",
}
HEALTH_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}

# --- compose-style variable interpolation ---------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(LookupError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `$$` as Compose does."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if present:
            return env[name]
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            raise MissingVariable(f"{name}: {arg}")
        return ""

    return _VARIABLE.sub(substitute, value)


def variables(value: Any) -> set[str]:
    """Every variable named anywhere in `value`."""
    if isinstance(value, dict):
        return set().union(*(variables(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(variables(v) for v in value), set())
    if not isinstance(value, str):
        return set()
    return {m.group("braced") or m.group("bare") for m in _VARIABLE.finditer(value)} - {None}


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # PyYAML resolves the `<<:` merge keys
    return interpolate(raw, ENV if env is None else env)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def as_list(value: Any) -> list[str]:
    """A compose command/entrypoint (a list, or a string split like a shell would)."""
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, list) else shlex.split(value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


# --- the Dockerfile -------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    args: set[str] = field(default_factory=set)
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, instruction: str) -> str | None:
        found = [rest for name, rest in self.instructions if name == instruction]
        return found[-1] if found else None

    def exec_form(self, instruction: str) -> list[str]:
        rest = self.last(instruction)
        assert rest is not None, f"stage {self.name} has no {instruction}"
        value = json.loads(rest)  # exec form: a JSON array, so no shell reinterprets it
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
        return value


def parse_dockerfile(text: str) -> tuple[set[str], dict[str, Stage]]:
    """(ARGs before the first FROM, stages by name) from the Dockerfile's logical lines."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    global_args: set[str] = set()
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        instruction, _, rest = line.partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name=name, base=words[0])
        elif instruction == "ARG" and current is None:
            global_args.add(rest.split("=", 1)[0])
        elif current is not None:
            if instruction == "ARG":
                current.args.add(rest.split("=", 1)[0])
            current.instructions.append((instruction, rest))
    return global_args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[set[str], dict[str, Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def resolved_base(base: str, global_args: set[str], text: str) -> str:
    """FROM ${PYTHON_IMAGE} → the global ARG's default."""
    match = re.fullmatch(r"\$\{?(\w+)\}?", base)
    if not match:
        return base
    assert match.group(1) in global_args
    default = re.search(rf"^ARG {match.group(1)}=(\S+)$", text, re.MULTILINE)
    assert default, f"ARG {match.group(1)} has no default"
    return default.group(1)


def parse_kdlab(argv: list[str]) -> Any:
    """Parse with the real CLI parser; a bad command fails the test with argparse's message."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse exits on an unknown command or option
        pytest.fail(f"`kdlab {shlex.join(argv)}` does not parse (exit {exit_.code})")


def image_stage(service: dict[str, Any], stages: dict[str, Stage]) -> Stage | None:
    build = service.get("build")
    if build is None:
        return None
    target = build.get("target") if isinstance(build, dict) else None
    return stages[target] if target else list(stages.values())[-1]


def runs(service: dict[str, Any], stages: dict[str, Stage]) -> list[str]:
    """The argv a service's container runs: its entrypoint + command, or the image's."""
    stage = image_stage(service, stages)
    if "entrypoint" in service:
        entrypoint = as_list(service["entrypoint"])
    else:
        entrypoint = stage.exec_form("ENTRYPOINT") if stage and stage.last("ENTRYPOINT") else []
    if "command" in service:
        command = as_list(service["command"])
    else:
        command = stage.exec_form("CMD") if stage and stage.last("CMD") else []
    return entrypoint + command


def option(argv: list[str], name: str) -> str:
    """The value of `--name value` or `--name=value` in argv."""
    for i, word in enumerate(argv):
        if word == name:
            return argv[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


# --- tests: Dockerfile ----------------------------------------------------------------------------


def test_dockerfile_stages_users_and_commands(dockerfile):
    global_args, stages = dockerfile
    text = DOCKERFILE.read_text()
    assert list(stages) == ["mlflow", "kdlab"], "kdlab last: a plain `docker build .` builds it"
    for stage in stages.values():
        assert resolved_base(stage.base, global_args, text) == "python:3.11-slim"
        user = stage.last("USER")
        assert user and user not in ("root", "0"), f"stage {stage.name} must not run as root"

    kdlab = stages["kdlab"]
    installs = " ".join(rest for name, rest in kdlab.instructions if name == "RUN")
    assert 'pip install -e ".[ray]"' in installs
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in installs
    assert "TORCH_VARIANT" in kdlab.args
    # every path the image copies exists here (a missing one fails `docker build`)
    for name, rest in kdlab.instructions:
        if name == "COPY":
            sources = [w for w in rest.split() if not w.startswith("--")][:-1]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
    assert kdlab.exec_form("ENTRYPOINT") == ["kdlab"]
    args = parse_kdlab(kdlab.exec_form("CMD"))
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8000)
    assert str(args.data_dir) == "/data"
    assert re.search(r"\bKDLAB_DATA_DIR=/data\b", text)  # the setting `data_dir`

    health = kdlab.last("HEALTHCHECK")
    assert health and f"127.0.0.1:{args.port}/api/health" in health
    mlflow = stages["mlflow"]
    assert mlflow.exec_form("ENTRYPOINT") == ["mlflow"]
    assert "/health" in (mlflow.last("HEALTHCHECK") or "")


def test_dockerignore_keeps_what_the_image_copies():
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (
        "pyproject.toml",
        "README.md",
        "kdlab",
        "backend",
        "worker",
        "frontend",
        "migrations",
        "examples",
    ):
        assert needed not in ignored
    assert {".git", ".env", "tests"} <= ignored


# --- tests: docker-compose.yml --------------------------------------------------------------------


def test_required_variables_and_defaults():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    required = {
        m.group("braced")
        for m in _VARIABLE.finditer(COMPOSE_FILE.read_text())
        if (m.group("op") or "").endswith("?")
    }
    assert required == REQUIRED_VARIABLES
    for name in REQUIRED_VARIABLES:
        with pytest.raises(MissingVariable, match=name):
            interpolate(raw, {k: v for k, v in ENV.items() if k != name})
    # every other variable has a default: nothing is silently empty
    for name in variables(raw) - REQUIRED_VARIABLES:
        assert re.search(rf"\$\{{{name}:?-", COMPOSE_FILE.read_text()), f"${name} has no default"


def test_the_services(services):
    assert set(services) == {"postgres", "mlflow", "ray-head", "ray-worker", "backend"}


def test_every_image_exists_or_is_built(services, dockerfile):
    global_args, stages = dockerfile
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name}: no image and no build"
        build = service.get("build")
        if build is None:
            assert ":" in service["image"], f"{name}: pin the image's tag"
            continue
        context = ROOT / (build["context"] if isinstance(build, dict) else build)
        assert context.resolve() == ROOT
        assert (context / build.get("dockerfile", "Dockerfile")).is_file()
        stage = image_stage(service, stages)
        assert stage is not None and build.get("target", stage.name) in stages
        for arg in build.get("args") or {}:
            assert arg in stage.args | global_args, f"{name}: build arg {arg} not declared"
    # one tag, one build: services sharing a tag build it identically
    by_tag: dict[str, Any] = {}
    for service in services.values():
        if service.get("build"):
            assert by_tag.setdefault(service["image"], service["build"]) == service["build"]
    assert services["postgres"]["image"] == "postgres:15"


def test_kdlab_settings_are_real_and_valid(services, monkeypatch):
    fields = set(Settings.model_fields)
    seen = set()
    for name, service in services.items():
        for key in environment(service):
            if key.startswith("KDLAB_"):
                seen.add(key)
                assert key.removeprefix("KDLAB_").lower() in fields, (
                    f"{name}: {key} is not a setting of kdlab.backend.settings.Settings"
                )
    assert {"KDLAB_EXECUTOR", "KDLAB_DATABASE_URL", "KDLAB_TOKEN"} <= seen
    # the backend's environment gives valid settings (types, literals), read like `kdlab serve`
    for key in list(os.environ):
        if key.startswith("KDLAB_"):
            monkeypatch.delenv(key)
    for key, value in environment(services["backend"]).items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.executor == "ray"
    assert settings.token == ENV["KDLAB_TOKEN"]
    settings.check_bind()  # serving on 0.0.0.0 needs the token, which is set


def test_kdlab_commands_parse(services, dockerfile):
    _, stages = dockerfile
    parsed = 0
    for service in services.values():
        argv = runs(service, stages)
        if argv and argv[0] == "kdlab":
            parse_kdlab(argv[1:])
            parsed += 1
        # a kdlab command hidden in a shell string is checked too
        for match in re.finditer(r"\bkdlab ([^;&|\n]+)", " ".join(argv[1:])):
            parse_kdlab(shlex.split(match.group(1)))
    assert parsed >= 1
    args = parse_kdlab(runs(services["backend"], stages)[1:])
    assert (args.command, args.host) == ("serve", "0.0.0.0")
    backend_env = environment(services["backend"])
    assert str(args.data_dir) == backend_env["KDLAB_DATA_DIR"]


def test_service_urls_point_at_services_and_ports(services, dockerfile):
    _, stages = dockerfile
    env = environment(services["backend"])

    database = urlsplit(env["KDLAB_DATABASE_URL"])
    postgres = environment(services["postgres"])
    assert database.scheme == "postgresql+psycopg"  # the driver the project installs
    assert (database.hostname, database.port) == ("postgres", 5432)
    assert (database.username, database.password) == (
        postgres["POSTGRES_USER"],
        postgres["POSTGRES_PASSWORD"],
    )
    assert database.path == "/" + postgres["POSTGRES_DB"]

    ray_head = runs(services["ray-head"], stages)
    assert ray_head[:3] == ["ray", "start", "--head"] and "--block" in ray_head
    ray_api = urlsplit(env["KDLAB_RAY_ADDRESS"])
    assert (ray_api.scheme, ray_api.hostname) == ("http", "ray-head")
    assert str(ray_api.port) == option(ray_head, "--dashboard-port")
    assert option(ray_head, "--dashboard-host") == "0.0.0.0"
    ray_worker = runs(services["ray-worker"], stages)
    assert ray_worker[:2] == ["ray", "start"] and "--block" in ray_worker
    assert option(ray_worker, "--address") == f"ray-head:{option(ray_head, '--port')}"

    mlflow = runs(services["mlflow"], stages)
    assert mlflow[:2] == ["mlflow", "server"]
    tracking = urlsplit(env["KDLAB_MLFLOW_TRACKING_URI"])
    assert (tracking.scheme, tracking.hostname) == ("http", "mlflow")
    assert str(tracking.port) == option(mlflow, "--port")
    assert option(mlflow, "--host") == "0.0.0.0"
    assert tracking.hostname in option(mlflow, "--allowed-hosts").split(",")  # Host header check
    store = urlsplit(option(mlflow, "--backend-store-uri"))
    assert (store.scheme, store.hostname, store.port) == ("postgresql+psycopg", "postgres", 5432)
    assert store.username == database.username and store.path != database.path
    init = (ROOT / "docker" / "postgres-init.sql").read_text()
    assert f"CREATE DATABASE {store.path.lstrip('/')} OWNER {database.username};" in init

    public = urlsplit(env["KDLAB_PUBLIC_URL"])
    serve = parse_kdlab(runs(services["backend"], stages)[1:])
    assert (public.hostname, public.port) == ("backend", serve.port)
    assert env["KDLAB_MLFLOW_UI_URL"].startswith("http")


def test_ray_cluster_resources(services):
    devices = services["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert services["ray-worker"]["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    for name in ("ray-head", "ray-worker"):
        assert services[name].get("shm_size"), f"{name}: Ray needs a larger /dev/shm"
    assert "deploy" not in services["ray-head"]  # the head schedules; GPUs live on the workers


def test_stateful_services_have_named_volumes(compose, services):
    declared = set(compose.get("volumes") or {})
    used: set[str] = set()
    state: dict[str, str] = {}  # service -> the named volume at its state path
    for name, service in services.items():
        for mount in service.get("volumes") or []:
            if isinstance(mount, str):
                source, target = mount.split(":")[:2]
            else:
                source, target = mount["source"], mount["target"]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
                continue
            assert source in declared, f"{name}: volume {source} is not declared at top level"
            assert source not in used, f"volume {source} is mounted by two services"
            used.add(source)
            if STATE_PATHS.get(name) == target:
                state[name] = source
    assert set(state) == set(STATE_PATHS), "a stateful service keeps no named volume"
    assert declared == used, f"declared but unused: {declared - used}"
    # the services' own idea of where their state lives matches the mounts
    assert environment(services["backend"])["KDLAB_DATA_DIR"] == STATE_PATHS["backend"]
    mlflow = as_list(services["mlflow"]["command"])
    assert option(mlflow, "--artifacts-destination") == STATE_PATHS["mlflow"]


def test_healthchecks(services):
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"{name}: {test}"
        if test[1:3] == ["python", "-c"]:
            compile(test[3], f"{name} healthcheck", "exec")
            assert "urlopen('http://127.0.0.1:" in test[3]
    env = environment(services["backend"])
    serve = parse_kdlab(as_list(services["backend"]["command"]))
    assert f"127.0.0.1:{serve.port}/api/health" in services["backend"]["healthcheck"]["test"][3]
    assert "/health" in services["mlflow"]["healthcheck"]["test"][3]
    assert "8265/api/version" in services["ray-head"]["healthcheck"]["test"][3]
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    assert env["KDLAB_EXECUTOR"] == "ray"


def test_depends_on_conditions(services):
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: give depends_on conditions"
        for other, spec in depends.items():
            assert other in services and other != name, f"{name} depends on unknown {other}"
            assert spec["condition"] in HEALTH_CONDITIONS
            if spec["condition"] == "service_healthy":
                assert services[other].get("healthcheck"), f"{other} has no healthcheck"
    backend = services["backend"]["depends_on"]
    assert {k: v["condition"] for k, v in backend.items()} == {
        "postgres": "service_healthy",
        "mlflow": "service_healthy",
        "ray-head": "service_healthy",
    }

    def reaches(start: str, seen: tuple[str, ...]) -> None:
        for other in services[start].get("depends_on") or {}:
            assert other not in seen, f"depends_on cycle: {' → '.join((*seen, other))}"
            reaches(other, (*seen, other))

    for name in services:
        reaches(name, (name,))


def test_ray_start_commands_parse_with_rays_cli(services, dockerfile):
    """`ray start ...` against Ray's own click command (click raises UsageError when wrong)."""
    scripts = pytest.importorskip("ray.scripts.scripts")
    _, stages = dockerfile
    for name in ("ray-head", "ray-worker"):
        argv = runs(services[name], stages)
        scripts.start.make_context("ray start", argv[2:])


def test_mlflow_server_command_parses_with_mlflows_cli(services, dockerfile):
    cli = pytest.importorskip("mlflow.cli")
    _, stages = dockerfile
    cli.server.make_context("mlflow server", runs(services["mlflow"], stages)[2:])


def test_docker_compose_config_accepts_the_file(tmp_path):
    """The Compose client's own schema check (`config` needs no engine)."""
    if shutil.which("docker-compose"):
        command = ["docker-compose"]
    elif (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        command = ["docker", "compose"]
    else:
        pytest.skip("no docker-compose client (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KDLAB_", "POSTGRES_"))}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        env={**env, **ENV},
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "-q"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert missing.returncode != 0
    assert "(in .env)" in missing.stderr + missing.stdout  # the message of a `${VAR:?...}`
