"""docker-compose.yml: valid for docker-compose, and wired to the repository's files.

There is no Docker engine in the test environment, so nothing is started. What is
checked instead:

- ``docker-compose config`` (Debian's docker-compose 1.29, which rejects unknown
  options) accepts the file, and refuses it with a message naming the variable when a
  required secret is missing;
- every file or directory the services mount exists in the repository, and sits where
  the program inside reads it (Prometheus and Alertmanager ``--config.file``, the paths
  Grafana's provisioning files name, the config path of the image's ``CMD``);
- the Prometheus config mounted into the compose Prometheus scrapes the ``metergate``
  service on the port Metergate's compose config listens on, loads the mounted rules,
  and sends alerts to the ``alertmanager`` service; Grafana's data source is the
  ``prometheus`` service;
- config/compose/metergate.yaml loads through Metergate's own settings parser with the
  environment compose gives it, and uses the ``redis`` service as its store;
- healthchecks, restart policies, named volumes, and only the needed ports published.

Fails, never skips, when ``docker-compose`` is missing (``apt-get install -y
docker-compose``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from proxy.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "config" / "compose" / "env.example"
SERVICES = {"metergate", "redis", "prometheus", "alertmanager", "grafana"}
#: Dummy values for the variables docker-compose.yml requires (``${VAR:?...}``).
SECRETS = {
    "METERGATE_APP_KEY": "mg-compose-test-key",
    "METERGATE_ADMIN_TOKEN": "compose-test-admin-token",
    "GRAFANA_ADMIN_PASSWORD": "compose-test-password",
}


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # type: ignore[no-any-return]


def service(name: str) -> dict[str, Any]:
    return compose()["services"][name]  # type: ignore[no-any-return]


def docker_compose(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[int, str]:
    """Run docker-compose on the repository's file with exactly ``env`` as its variables
    (an empty ``--env-file``, so a developer's own ``.env`` cannot change the outcome)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: apt-get install -y docker-compose")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    base_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [exe, "--env-file", str(empty), "-f", str(COMPOSE_FILE), *args],
        cwd=ROOT,
        env={**base_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


def mounts(name: str) -> dict[str, Path | str]:
    """Container path → host path (a bind mount, resolved in the repo) or volume name."""
    out: dict[str, Path | str] = {}
    for spec in service(name).get("volumes", []):
        assert isinstance(spec, str), f"{name}: use the short volume syntax: {spec!r}"
        source, target, *_ = spec.split(":")
        out[target] = (ROOT / source).resolve() if source.startswith(".") else source
    return out


def host_file(name: str, container_path: str) -> Path:
    """The repository file mounted at ``container_path`` in service ``name`` (directly,
    or inside a mounted directory)."""
    want = PurePosixPath(container_path)
    for target, source in mounts(name).items():
        if not isinstance(source, Path):
            continue
        if want == PurePosixPath(target):
            return source
        if PurePosixPath(target) in want.parents:
            return source / want.relative_to(target)
    raise AssertionError(f"{name}: nothing from the repository is mounted at {container_path}")


def flag(name: str, option: str) -> str:
    """The value of ``--option=value`` in the service's command."""
    for arg in service(name)["command"]:
        if arg.startswith(f"--{option}="):
            return str(arg.split("=", 1)[1])
    raise AssertionError(f"{name}: no --{option} in its command")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------ docker-compose
def test_docker_compose_accepts_the_file(tmp_path: Path) -> None:
    rc, out = docker_compose(tmp_path, SECRETS, "config")
    assert rc == 0, out
    resolved = yaml.safe_load(out)
    assert set(resolved["services"]) == SERVICES
    rc, out = docker_compose(tmp_path, SECRETS, "config", "--quiet")
    assert rc == 0 and out.strip() == "", out


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_a_missing_secret_stops_docker_compose_with_its_name(tmp_path: Path, missing: str) -> None:
    env = {k: v for k, v in SECRETS.items() if k != missing}
    rc, out = docker_compose(tmp_path, env, "config", "--quiet")
    assert rc != 0
    assert f"set {missing} in .env" in out, out


def test_env_example_lists_every_variable_compose_reads() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    listed = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    assert used == listed, f"only in compose: {used - listed}; only in env.example: {listed - used}"


# ---------------------------------------------------------------------- the wiring
def test_every_mounted_file_exists_in_the_repository() -> None:
    declared = set(compose()["volumes"])
    for name in SERVICES:
        for target, source in mounts(name).items():
            if isinstance(source, Path):
                assert source.is_relative_to(ROOT), f"{name}: {source} is outside the repo"
                assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    used = {s for name in SERVICES for s in mounts(name).values() if isinstance(s, str)}
    assert used == declared


def test_compose_prometheus_scrapes_the_metergate_service() -> None:
    config_path = host_file("prometheus", flag("prometheus", "config.file"))
    config = yaml.safe_load(config_path.read_text())
    metergate = load_settings(host_file("metergate", "/etc/metergate/metergate.yaml"), SECRETS)
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "metergate"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"metergate:{metergate.server.port}"]
    # The rules it loads are the repository's, mounted next to the config.
    config_dir = PurePosixPath(flag("prometheus", "config.file")).parent
    for rule_file in config["rule_files"]:
        mounted = host_file("prometheus", str(config_dir / rule_file))
        assert mounted == ROOT / "config" / "prometheus" / "rules.yml"
    (am,) = [t for a in config["alerting"]["alertmanagers"] for sc in a["static_configs"]
             for t in sc["targets"]]  # fmt: skip
    host, port = host_port(am)
    assert host == "alertmanager" and port == 9093


def test_compose_alertmanager_loads_the_example_config() -> None:
    mounted = host_file("alertmanager", flag("alertmanager", "config.file"))
    assert mounted == ROOT / "config" / "prometheus" / "alertmanager.yml"
    assert flag("alertmanager", "storage.path") in mounts("alertmanager")


def test_compose_grafana_provisions_the_dashboards_and_the_data_source() -> None:
    prov = yaml.safe_load(
        host_file("grafana", "/etc/grafana/provisioning/dashboards/metergate.yaml").read_text()
    )
    (provider,) = prov["providers"]
    dashboards_dir = host_file("grafana", provider["options"]["path"])
    assert sorted(p.name for p in dashboards_dir.glob("*.json")) == sorted(
        p.name for p in (ROOT / "dashboards").glob("*.json")
    )
    assert len(list(dashboards_dir.glob("*.json"))) == 3
    ds = yaml.safe_load(
        host_file("grafana", "/etc/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    (source,) = ds["datasources"]
    url = urlsplit(source["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    home = service("grafana")["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_file("grafana", home).is_file()


def test_compose_metergate_uses_redis_and_its_secrets_from_the_environment() -> None:
    svc = service("metergate")
    assert svc["build"] == "."
    # The image's CMD reads /etc/metergate/metergate.yaml; compose mounts its config there.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert '"--config", "/etc/metergate/metergate.yaml"' in dockerfile
    assert "command" not in svc and "entrypoint" not in svc
    config_path = host_file("metergate", "/etc/metergate/metergate.yaml")
    assert config_path == ROOT / "config" / "compose" / "metergate.yaml"
    # Every variable the config needs without a default is passed in by compose.
    text = config_path.read_text()
    required = set(re.findall(r"\$\{([A-Za-z_]\w*)\}", text))
    optional = set(re.findall(r"\$\{([A-Za-z_]\w*):-", text))
    assert {"METERGATE_APP_KEY", "METERGATE_ADMIN_TOKEN"} <= required
    assert {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"} <= optional
    assert required | optional <= set(svc["environment"])

    settings = load_settings(config_path, {**SECRETS, "OPENAI_API_KEY": "sk-test"})
    url = urlsplit(settings.store)
    assert url.scheme == "redis" and url.hostname == "redis"
    assert settings.server.host == "0.0.0.0"
    assert settings.admin_token == SECRETS["METERGATE_ADMIN_TOKEN"]
    assert [k.key for k in settings.keys] == [SECRETS["METERGATE_APP_KEY"]]
    assert settings.upstreams["openai"].api_key == "sk-test"
    assert settings.upstreams["anthropic"].api_key is None
    # The journal lives on the named volume, not in the container's writable layer.
    assert settings.journal_dir is not None
    assert PurePosixPath(settings.journal_dir).is_relative_to("/var/lib/metergate")
    assert isinstance(mounts("metergate")["/var/lib/metergate"], str)
    assert svc["ports"] == [f"{settings.server.port}:{settings.server.port}"]
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    # The same readiness check as the image's HEALTHCHECK.
    image_check = re.search(r"HEALTHCHECK .*?CMD (\[.*\])", dockerfile.replace("\\\n", ""))
    assert image_check and svc["healthcheck"]["test"] == ["CMD", *json.loads(image_check[1])]
    assert int(svc["stop_grace_period"].rstrip("s")) > settings.server.shutdown_grace_s


def test_healthchecks_restart_policies_and_published_ports() -> None:
    for name in SERVICES:
        svc = service(name)
        assert svc["restart"] == "unless-stopped", name
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD" and len(test) > 1, name
    # Published to everyone: the proxy and Grafana. Prometheus and Alertmanager: this
    # host only. Redis: never.
    assert service("grafana")["ports"] == ["3000:3000"]
    assert service("prometheus")["ports"] == ["127.0.0.1:9090:9090"]
    assert service("alertmanager")["ports"] == ["127.0.0.1:9093:9093"]
    assert "ports" not in service("redis")
    assert "--appendonly" in service("redis")["command"]
