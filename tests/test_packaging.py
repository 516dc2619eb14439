"""Packaging: the Dockerfile, and the Compose and Kubernetes examples, checked without a
container engine.

- The Dockerfile is linted for what hadolint would flag and for agreement with the config.
- Its own build steps run in a clean virtual environment, and its entrypoint starts with its
  environment, its config and its healthcheck (slow).
- The examples' YAML is read, the gateway config inside each is loaded with the same loader
  as ``gateway check``, and their ports, probes, mounts and paths are held against it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from processes import free_port

from gateway import cli
from gateway import config as config_module

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_DIR = ROOT / "examples" / "compose"
K8S_DIR = ROOT / "examples" / "kubernetes"


# --- reading a Dockerfile -------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str  # upper-case: FROM, RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form's list, or None for the shell form."""
        try:
            value = json.loads(self.args)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None

    def flags(self) -> tuple[dict[str, str], str]:
        """``--name=value`` flags at the start (COPY --from=build, HEALTHCHECK --interval=...),
        and what follows them."""
        found: dict[str, str] = {}
        rest = self.args
        while m := re.match(r"--([a-z-]+)(?:=(\S*))?\s+", rest):
            found[m.group(1)] = m.group(2) or ""
            rest = rest[m.end():]
        return found, rest


@dataclass
class Stage:
    image: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions as Docker reads them: comments dropped (also between continuation
    lines), lines ending in a backslash joined; then grouped into stages by FROM."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(p for p in pending if p)
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
        pending = []
    assert not pending, "the Dockerfile ends inside a continued line"
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ins.args, re.IGNORECASE)
            assert m, f"line {ins.line}: cannot read FROM {ins.args}"
            stages.append(Stage(image=m.group(1), name=m.group(2)))
        else:
            assert stages or ins.keyword == "ARG", f"line {ins.line}: {ins.keyword} before FROM"
            if stages:
                stages[-1].instructions.append(ins)
    return instructions, stages


def env_of(stage: Stage, base: dict[str, str]) -> dict[str, str]:
    """The stage's ENV, applied in order over ``base`` ($VAR and ${VAR} expanded as Docker
    does it, from what is set so far)."""
    env = dict(base)

    def expand(value: str) -> str:
        return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), ""), value)

    for ins in stage.all("ENV"):
        words = shlex.split(ins.args)
        if len(words) >= 2 and "=" not in words[0]:  # the legacy form: ENV NAME value
            env[words[0]] = expand(" ".join(words[1:]))
            continue
        for word in words:
            name, eq, value = word.partition("=")
            assert eq, f"line {ins.line}: ENV {word!r} is not NAME=value"
            env[name] = expand(value)
    return env


def labels_of(stage: Stage, args: dict[str, str]) -> dict[str, str]:
    out = {}
    for ins in stage.all("LABEL"):
        for word in shlex.split(ins.args):
            name, _, value = word.partition("=")
            out[name] = re.sub(r"\$\{([A-Za-z_]+)\}", lambda m: args.get(m.group(1), ""), value)
    return out


def arg_defaults(stage: Stage) -> dict[str, str]:
    out = {}
    for ins in stage.all("ARG"):
        name, _, value = ins.args.partition("=")
        out[name] = value
    return out


@pytest.fixture(scope="module")
def dockerfile() -> tuple[list[Instruction], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _reference_config() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


# --- the Dockerfile, linted -----------------------------------------------------------------


def test_every_from_is_pinned_to_a_tag(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    """DL3006/DL3007: an image without a tag, or with `latest`, changes under the build."""
    _, stages = dockerfile
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.image in names:
            continue  # an earlier stage
        image = stage.image.split("@", 1)[0]
        repo, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
        assert tag or "@sha256:" in stage.image, f"FROM {stage.image}: pin a tag"
        assert tag != "latest", f"FROM {stage.image}: pin a tag other than latest"


def test_the_image_runs_as_a_user_that_is_not_root(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    """DL3002: the last USER before ENTRYPOINT/CMD is neither root nor uid 0, and numeric
    (Kubernetes' runAsNonRoot can only check a number)."""
    _, stages = dockerfile
    final = stages[-1]
    users = final.all("USER")
    assert users, "the final stage sets no USER: it would run as root"
    entry = final.last("ENTRYPOINT") or final.last("CMD")
    assert entry is not None
    user = users[-1]
    assert user.line < entry.line, "USER comes after ENTRYPOINT/CMD"
    uid = user.args.split(":", 1)[0]
    assert uid.isdigit(), f"USER {user.args}: give the uid as a number"
    assert int(uid) != 0 and uid != "root"
    # The RUN that makes the user makes it with that uid, and gives it /data.
    setup = " ".join(i.args for i in final.all("RUN"))
    assert f"--uid {uid}" in setup and f"chown {user.args} /data" in setup


def test_healthcheck_expose_and_labels(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    _, stages = dockerfile
    final = stages[-1]
    port = _reference_config()["listen"]["port"]
    health = final.last("HEALTHCHECK")
    assert health is not None and not health.args.upper().startswith("NONE")
    flags, command = health.flags()
    assert {"interval", "timeout", "retries"} <= set(flags)
    assert command.startswith("CMD ")
    probe = Instruction("CMD", command[4:], health.line).exec_form()
    assert probe is not None, "the HEALTHCHECK command is not in JSON form"
    assert f"http://127.0.0.1:{port}/healthz" in " ".join(probe)

    exposed = [p.split("/")[0] for ins in final.all("EXPOSE") for p in ins.args.split()]
    assert exposed == [str(port)], "EXPOSE the config's listen port, and only it"

    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    labels = labels_of(final, arg_defaults(final))
    for key in ("title", "description", "version", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"no org.opencontainers.image.{key} label"
    assert labels["org.opencontainers.image.version"] == version
    base = labels["org.opencontainers.image.base.name"]
    assert base.endswith(final.image), "the base.name label names another image than FROM"


def test_no_add_pip_without_cache_and_exec_form(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    instructions, stages = dockerfile
    for ins in instructions:
        # DL3020: COPY, not ADD (which fetches URLs and unpacks archives).
        assert ins.keyword != "ADD", f"line {ins.line}: use COPY, not ADD"
        assert not re.search(r"\bsudo\b", ins.args), f"line {ins.line}: sudo"  # DL3004
        if ins.keyword == "RUN":
            for command in re.split(r"&&|;|\|\|", ins.args):
                words = command.split()
                if "pip" in " ".join(words[:1]).rsplit("/", 1)[-1] and words[1:2] in (["install"], ["wheel"]):
                    assert "--no-cache-dir" in words, f"line {ins.line}: pip without --no-cache-dir"  # DL3042
            assert "apt-get upgrade" not in ins.args  # DL3005
        if ins.keyword == "WORKDIR":
            assert ins.args.startswith("/"), f"line {ins.line}: WORKDIR must be absolute"  # DL3000
    for stage in stages:
        for keyword in ("ENTRYPOINT", "CMD"):
            found = stage.all(keyword)
            assert len(found) <= 1, f"{keyword} given twice in one stage"  # DL4003/DL4004
            for ins in found:
                assert ins.exec_form() is not None, f"line {ins.line}: {keyword} in JSON form"  # DL3025
    final = stages[-1]
    entry, cmd = final.last("ENTRYPOINT"), final.last("CMD")
    assert entry is not None and cmd is not None
    assert entry.exec_form() == ["gateway"] and cmd.exec_form() == ["run"]


def test_copy_sources_exist_and_the_final_stage_copies_no_sources(
    dockerfile: tuple[list[Instruction], list[Stage]],
) -> None:
    _, stages = dockerfile
    stage_names = {s.name for s in stages if s.name}
    ignored = _dockerignore()
    for stage in stages:
        for ins in stage.all("COPY"):
            flags, rest = ins.flags()
            if "from" in flags:
                assert flags["from"] in stage_names, f"line {ins.line}: COPY --from an unknown stage"
                continue
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"line {ins.line}: COPY {source}: not in the repository"
                files = [ROOT / source] if (ROOT / source).is_file() else \
                    [f for f in (ROOT / source).rglob("*") if "__pycache__" not in f.parts]
                for file in files:
                    name = str(file.relative_to(ROOT))
                    assert not ignored(name), f"line {ins.line}: {name} is left out by .dockerignore"
    copied = [shlex.split(i.flags()[1])[:-1] for i in stages[-1].all("COPY") if "from" not in i.flags()[0]]
    assert copied == [["config/gateway.yaml"]], "the final stage takes only the config from the context"


def test_env_volume_and_paths_agree_with_the_config(dockerfile: tuple[list[Instruction], list[Stage]]) -> None:
    """The image's GATEWAY_CONFIG is the config it copies; its GATEWAY_STORE (which the
    reference config reads) is a SQLite file inside a VOLUME; bytecode is never written."""
    _, stages = dockerfile
    final = stages[-1]
    env = env_of(final, {"PATH": "/usr/local/bin:/usr/bin:/bin"})
    copies = {shlex.split(i.flags()[1])[-1]: shlex.split(i.flags()[1])[0]
              for i in final.all("COPY") if "from" not in i.flags()[0]}
    assert copies.get(env["GATEWAY_CONFIG"]) == "config/gateway.yaml"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert _reference_config()["store"] == "${GATEWAY_STORE:-sqlite:gateway.db}"
    store = env["GATEWAY_STORE"]
    assert store.startswith("sqlite:///")
    db = Path(store.removeprefix("sqlite://"))
    volumes = [v for ins in final.all("VOLUME") for v in (Instruction("VOLUME", ins.args, 0).exec_form() or [])]
    assert volumes == [str(db.parent)], "the SQLite file's directory, and only it, is a VOLUME"
    assert final.last("WORKDIR") is not None and final.last("WORKDIR").args == str(db.parent)  # type: ignore[union-attr]
    # The programs the image runs are the virtual environment's.
    venv = next(i for i in final.all("COPY") if i.flags()[0].get("from") == "build")
    assert env["PATH"].split(":")[0] == shlex.split(venv.flags()[1])[-1] + "/bin"


def _dockerignore() -> Any:
    """A predicate: does .dockerignore leave this path (relative to the context) out? Its
    patterns as Docker reads them: ``*`` within a segment, ``**`` across segments, a match of
    a directory leaving out everything below it (no ``!`` exceptions are used)."""
    patterns = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!"), "exceptions are not read here"
        regex = re.escape(line.strip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        patterns.append(re.compile(regex + "(?:/.*)?"))
    return lambda path: any(p.fullmatch(path) for p in patterns)


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    ignored = _dockerignore()
    for path in (".git/config", "gateway/__pycache__/app.cpython-312.pyc", "gateway.db", "gateway.db-wal",
                 "examples/compose/secrets/hs256.key", "k1.pem", ".venv/bin/python"):
        assert ignored(path), path
    for path in ("gateway/app.py", "examples/legacy-app/app.py", "config/gateway.yaml", "pyproject.toml"):
        assert not ignored(path), path


# --- the Dockerfile, run --------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in root.rglob("*")}


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.slow
def test_the_dockerfile_builds_and_starts_in_a_clean_venv(
    dockerfile: tuple[list[Instruction], list[Stage]], tmp_path: Path
) -> None:
    """The build stage's RUN steps, verbatim but for the image paths, in a fresh virtual
    environment standing in for the base image's Python (pip may use the configured local
    index); then the final stage's ENTRYPOINT + CMD with its ENV, its WORKDIR and its config
    (on a free port), and the HEALTHCHECK's own command as the probe. What a container engine
    would add and this does not: another Python minor version, the user, a read-only root
    (instead, nothing outside /data may change)."""
    _, stages = dockerfile
    build, final = stages[0], stages[-1]
    root = tmp_path / "root"  # the image's / for the paths the Dockerfile names

    def at(path: str) -> Path:
        return root / path.lstrip("/")

    def mapped(text: str) -> str:
        for image_path in ("/opt/gateway", "/wheels", "/src", "/data", "/etc/gateway"):
            # /data alone or as the start of a path (sqlite:///data/x), never inside a longer name
            text = re.sub(rf"(?<![\w.-]){re.escape(image_path)}(?=[/\s\"':]|$)", str(at(image_path)), text)
        return text

    # "python:3.12-slim": a bare Python with pip.
    base = tmp_path / "base"
    subprocess.run([sys.executable, "-m", "venv", str(base)], check=True)
    build_env = {**os.environ, "PATH": f"{base / 'bin'}:/usr/local/bin:/usr/bin:/bin"}
    build_env.pop("VIRTUAL_ENV", None)
    build_env.pop("PYTHONPATH", None)
    build_env = env_of(build, build_env)
    workdir = root
    for ins in build.instructions:
        if ins.keyword == "WORKDIR":
            workdir = at(ins.args)
            workdir.mkdir(parents=True, exist_ok=True)
        elif ins.keyword == "COPY":
            *sources, dest = shlex.split(ins.args)
            target = workdir / dest
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, target if not dest.endswith("/") else target / src.name,
                                    symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True) if dest.endswith("/") else None
                    shutil.copy2(src, target / src.name if dest.endswith("/") else target)
        elif ins.keyword == "RUN":
            done = subprocess.run(["/bin/sh", "-c", mapped(ins.args)], cwd=workdir, env=build_env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"RUN at line {ins.line} failed:\n{done.stderr[-3000:]}"

    # The final stage: the venv is already at /opt/gateway (COPY --from=build); its own RUN
    # only makes the user and the directories.
    port = free_port()
    etc, data = at("/etc/gateway"), at("/data")
    etc.mkdir(parents=True)
    data.mkdir(parents=True)
    for ins in final.all("COPY"):
        flags, rest = ins.flags()
        if "from" not in flags:
            source, dest = shlex.split(rest)
            text = (ROOT / source).read_text(encoding="utf-8")
            text, n = re.subn(r"(?m)^(\s*port:\s*)8080\b", rf"\g<1>{port}", text)
            assert n == 1
            at(dest).write_text(text, encoding="utf-8")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = env_of(final, {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                         "HOME": "/nonexistent", "TMPDIR": str(tmp),
                         # docker run -e GATEWAY_SECRET="$(openssl rand -base64 48)"
                         "GATEWAY_SECRET": secrets.token_urlsafe(48)})
    env = {name: mapped(value) for name, value in env.items()}
    assert env["GATEWAY_STORE"] == f"sqlite://{data}/gateway.db"
    workdir = at(final.last("WORKDIR").args)  # type: ignore[union-attr]
    entry = final.last("ENTRYPOINT").exec_form() + final.last("CMD").exec_form()  # type: ignore[union-attr,operator]
    program = shutil.which(entry[0], path=env["PATH"])
    assert program is not None and program.startswith(str(at("/opt/gateway/bin"))), program
    probe = Instruction("CMD", final.last("HEALTHCHECK").flags()[1][4:], 0).exec_form()  # type: ignore[union-attr]
    assert probe is not None
    probe = [word.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for word in probe]

    def healthcheck() -> int:
        return subprocess.run(probe, env=env, cwd=workdir, capture_output=True, timeout=10).returncode

    before = {"venv": _tree(at("/opt/gateway")), "etc": _tree(etc)}
    log = tmp_path / "gateway.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([program, *entry[1:]], env=env, cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"the gateway exited:\n{log.read_text()[-3000:]}"
            try:
                status, body = _get(f"http://127.0.0.1:{port}/healthz")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "no answer on /healthz within 20 s"
                time.sleep(0.05)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
        assert healthcheck() == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)
    assert code == 0, log.read_text()[-3000:]
    assert healthcheck() != 0, "the HEALTHCHECK passes with the gateway stopped"

    # A read-only root would have been enough: nothing outside /data (and /tmp) changed.
    assert _tree(at("/opt/gateway")) == before["venv"], "the gateway wrote into its installation"
    assert _tree(etc) == before["etc"]
    assert set(os.listdir(data)) <= {"gateway.db", "gateway.db-wal", "gateway.db-shm"}
    assert "gateway.db" in os.listdir(data)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("event") == "starting" and line.get("port") == port for line in lines)
    assert env["GATEWAY_SECRET"] not in log.read_text()


# --- the examples ---------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _secret_files(config_text: str) -> set[str]:
    """Every ``*_file`` value of a gateway config."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if str(key).endswith("_file") and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(yaml.safe_load(config_text))
    return found


def _load_as_mounted(config_text: str, mounted: set[str], env: dict[str, str], tmp_path: Path) \
        -> config_module.Config:
    """Load a config with the real loader, each mounted secret file standing at a temporary
    path holding a fresh secret. A ``*_file`` that is not mounted stays unreadable."""
    for path in sorted(mounted, key=len, reverse=True):
        local = tmp_path / "mounted" / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(secrets.token_urlsafe(48) + "\n", encoding="utf-8")
        config_text = config_text.replace(path, str(local))
    file = tmp_path / "gateway.yaml"
    file.write_text(config_text, encoding="utf-8")
    return config_module.load(file, env=env)


def _compose_env(environment: dict[str, str]) -> dict[str, str]:
    """A service's environment as the container sees it: ``${X:-default}`` resolved by
    Compose from an empty shell environment."""
    return {name: re.sub(r"\$\{[A-Za-z_]+:-([^}]*)\}", r"\1", str(value)) for name, value in environment.items()}


def _dockerfile_user() -> int:
    _, stages = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
    return int(stages[-1].last("USER").args.split(":")[0])  # type: ignore[union-attr]


def test_compose_example_agrees_with_its_config(tmp_path: Path) -> None:
    compose = _yaml_docs(COMPOSE_DIR / "docker-compose.yml")[0]
    services = compose["services"]
    assert set(services) == {"gateway", "app", "redis"}
    gw, app, redis = services["gateway"], services["app"], services["redis"]

    env = _compose_env(gw["environment"])
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gw["volumes"]}
    config_path = env["GATEWAY_CONFIG"]
    assert config_path in mounts and mounts[config_path].startswith("./")
    config_text = (COMPOSE_DIR / mounts[config_path]).read_text(encoding="utf-8")
    secret_targets = {s["target"] for s in gw["secrets"]}
    assert {s["source"] for s in gw["secrets"]} <= set(compose["secrets"])
    assert _secret_files(config_text) == secret_targets, "every *_file is a mounted secret, and back"
    cfg = _load_as_mounted(config_text, secret_targets, env, tmp_path)

    # Published: the gateway's listen port, and nothing of the app's or Redis'.
    assert [p.split(":")[-1] for p in gw["ports"]] == [str(cfg.listen.port)]
    assert "ports" not in app and "ports" not in redis
    assert compose["networks"]["backend"].get("internal") is True
    assert set(app["networks"]) == {"backend"} and "backend" in gw["networks"]

    # The upstream is the app service on the port it listens on; the store is the redis service.
    upstream = urlsplit(next(iter(cfg.upstreams.values())).url)
    argv = app["entrypoint"]
    assert upstream.hostname == "app" and upstream.port == int(argv[argv.index("--port") + 1])
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    store = urlsplit(cfg.store)
    assert (store.scheme, store.hostname, store.port) == ("redis", "redis", 6379)

    # Healthchecks everywhere; the gateway waits for healthy neighbours; its probe is its own.
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert all(c["condition"] == "service_healthy" for c in gw["depends_on"].values())
    probe = " ".join(gw["healthcheck"]["test"])
    assert f"http://127.0.0.1:{cfg.listen.port}/readyz" in probe
    app_probe = " ".join(app["healthcheck"]["test"])
    assert f"http://127.0.0.1:{upstream.port}/" in app_probe

    # A read-only root with a tmpfs /tmp, as the image allows; the secret never in git.
    assert gw["read_only"] is True and gw["tmpfs"] == ["/tmp"] and gw["cap_drop"] == ["ALL"]
    secret_file = compose["secrets"]["gateway_hs256"]["file"]
    assert secret_file.startswith("./secrets/")
    assert "secrets/" in (COMPOSE_DIR / ".gitignore").read_text(encoding="utf-8").split()
    assert gw["build"]["context"] == "../.." and (COMPOSE_DIR / gw["build"]["context"] / "Dockerfile").is_file()


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for file in sorted(K8S_DIR.glob("*.yaml")):
        for doc in _yaml_docs(file):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_kubernetes_example_agrees_with_its_config(tmp_path: Path) -> None:
    docs = _k8s()
    deployment = docs[("Deployment", "legacy-app")]
    pod = deployment["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    gw, app = containers["gateway"], containers["app"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in gw["volumeMounts"]}
    env = {e["name"]: e["value"] for e in gw.get("env", [])}

    # The config: the ConfigMap's key, mounted at GATEWAY_CONFIG.
    config_path = Path(env["GATEWAY_CONFIG"])
    config_volume = mounts[str(config_path.parent)]["configMap"]
    configmap = docs[("ConfigMap", config_volume["name"])]
    config_text = configmap["data"][config_path.name]

    # The secrets: files of the Secret's volume; exactly those the config reads.
    mounted = set()
    for mount_path, volume in mounts.items():
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] & 0o077 in (0, 0o040), "a secret readable by others"
            mounted |= {f"{mount_path}/{item['path']}" for item in volume["secret"]["items"]}
    assert mounted and _secret_files(config_text) == mounted, "every *_file is a mounted secret file, and back"
    cfg = _load_as_mounted(config_text, mounted, {}, tmp_path)

    # The command line is the gateway's, and an edited ConfigMap is reloaded.
    run = cli._parser().parse_args(gw["args"])
    assert run.func is cli._run and run.watch_config

    # Ports and probes are the config's.
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert list(ports.values()) == [cfg.listen.port]

    def port_of(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return ports[port] if isinstance(port, str) else int(port)

    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert port_of(gw["livenessProbe"]) == port_of(gw["readinessProbe"]) == cfg.listen.port

    # The app listens on the pod's loopback, on the upstream's port, and exposes no port.
    upstream = urlsplit(next(iter(cfg.upstreams.values())).url)
    argv = app["command"] + app.get("args", [])
    assert upstream.hostname == "127.0.0.1" == argv[argv.index("--host") + 1]
    assert upstream.port == int(argv[argv.index("--port") + 1])
    assert "ports" not in app

    # The Service reaches the gateway's port, never the app's.
    service = docs[("Service", "legacy-app")]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    for port in service["spec"]["ports"]:
        target = port["targetPort"]
        resolved = ports[target] if isinstance(target, str) else int(target)
        assert resolved == cfg.listen.port and resolved != upstream.port

    # Several replicas share one store: Redis (the redis Service), never a per-pod SQLite.
    assert deployment["spec"]["replicas"] > 1
    store = urlsplit(cfg.store)
    assert store.scheme == "redis" and ("Service", store.hostname) in docs
    assert docs[("Service", store.hostname)]["spec"]["ports"][0]["port"] == store.port

    # Locked down: non-root as the image's uid, read-only root, no capabilities, limits.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_user()
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
    # With a read-only root, the image's writable paths are volumes.
    assert {"/data", "/tmp"} <= set(mounts)


def test_examples_configs_pass_gateway_check(tmp_path: Path) -> None:
    """``gateway check`` itself on the Compose config, as the container would run it."""
    compose = _yaml_docs(COMPOSE_DIR / "docker-compose.yml")[0]
    gw = compose["services"]["gateway"]
    text = (COMPOSE_DIR / "gateway.yaml").read_text(encoding="utf-8")
    secret = tmp_path / "hs256"
    secret.write_text(secrets.token_urlsafe(48), encoding="utf-8")
    file = tmp_path / "gateway.yaml"
    file.write_text(text.replace("/run/secrets/gateway_hs256", str(secret)), encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "gateway", "check", "-c", str(file)],
                          env={**os.environ, **_compose_env(gw["environment"])},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{file}: ok (3 routes, 1 upstreams, store redis)"
