"""docker-compose.yml, the Dockerfile and .env.example, checked as files: the docker engine does
not run here (docs/operations.md says what this does and does not exercise).

Services and their images pinned, healthchecks everywhere, scale-out services without fixed
names or host ports, every METERSTREAM_* variable a service sets known to the configuration's
table (config.ENV_VARS), every variable of .env.example used and every one used listed, the
topics created the pipeline's own, and the environment table doing what it says.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from meterstream.errors import UserError
from meterstream.pipeline.config import (
    ENV_BY_NAME,
    ENV_VARS,
    WorkerConfig,
    broker_of,
    env_value,
    load_worker_config,
    worker_env,
)
from meterstream.pipeline.runner import all_topics

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCALE_OUT = ("worker", "collector")
BUILT = "meterstream"  # the image built from the Dockerfile


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def env_example() -> dict[str, str]:
    out = {}
    for n, line in enumerate((ROOT / ".env.example").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Z][A-Z0-9_]*)=(\S*)(\s+#.*)?", line)
        assert m, f".env.example:{n}: not NAME=value: {line!r}"
        out[m[1]] = m[2]
    return out


def test_the_services_are_there() -> None:
    s = services()
    assert {"kafka", "kafka-init", "influxdb", "grafana", "prometheus", "worker", "collector",
            "field"} <= set(s)
    assert s["field"]["profiles"] == ["staging"]
    assert all("profiles" not in s[n] for n in s if n != "field")


def test_images_are_pinned() -> None:
    for name, svc in services().items():
        image = svc.get("image", "")
        assert image, f"{name}: no image"
        if "@sha256:" in image:
            continue
        repo, _, tag = image.rpartition(":")
        assert repo and tag and "/" not in tag, f"{name}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
        if "build" in svc:
            assert repo == BUILT, name
    kafka = services()["kafka"]["image"]
    assert kafka.startswith("apache/kafka:")
    assert services()["influxdb"]["image"].startswith("influxdb:2.")
    dockerfile = (ROOT / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base), base
    assert re.search(r"^USER\s+(?!root)\S+", dockerfile, re.MULTILINE), "runs as root"
    assert "pip install" in dockerfile


def test_every_service_has_a_healthcheck() -> None:
    for name, svc in services().items():
        hc = svc.get("healthcheck")
        assert hc and not hc.get("disable"), f"{name}: no healthcheck"
        test = hc["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_scale_out_services_have_no_fixed_name_or_host_port() -> None:
    for name in SCALE_OUT:
        svc = services()[name]
        assert "container_name" not in svc, name
        assert "ports" not in svc, f"{name}: host ports clash under --scale"
        assert "build" in svc, name
        assert "hostname" not in svc, name
    # nor does anything else pin a container name
    assert all("container_name" not in s for s in services().values())


def _environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def test_meterstream_variables_exist_in_the_config_table() -> None:
    used = set()
    for name, svc in services().items():
        for var in _environment(svc):
            if var.startswith("METERSTREAM_"):
                assert var in ENV_BY_NAME, f"{name}: {var} is not in config.ENV_VARS"
                used.add(var)
    # the ones the app services set apply to the process they run
    for name in ("worker", "collector"):
        for var in _environment(services()[name]):
            if var.startswith("METERSTREAM_"):
                assert name in ENV_BY_NAME[var].processes, f"{name}: {var} is not read by it"
    assert {"METERSTREAM_BROKER", "METERSTREAM_INFLUX_TOKEN", "METERSTREAM_METRICS_PORT",
            "METERSTREAM_LOG_FORMAT"} <= used


def test_env_example_lists_exactly_the_variables_used() -> None:
    text = COMPOSE.read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)(?::?-[^}]*)?\}", text))
    listed = set(env_example())
    assert listed - used == set(), f".env.example lists unused {sorted(listed - used)}"
    assert used - listed == set(), f"docker-compose.yml uses unlisted {sorted(used - listed)}"


def test_no_secret_is_written_in_the_compose_file() -> None:
    for name, svc in services().items():
        for var, value in _environment(svc).items():
            if re.search(r"TOKEN|PASSWORD|SECRET|CODE", var):
                assert re.fullmatch(r"\$\{[A-Z_]+\}", value), f"{name}: {var} must come from .env"


def test_the_topics_created_are_the_pipelines() -> None:
    env = _environment(services()["kafka-init"])
    created = set(env["TOPICS"].split()) | {env["CHANGELOG"]}
    assert created == set(all_topics("meterstream-worker"))
    assert env["PARTITIONS"] == _environment(services()["worker"])["METERSTREAM_PARTITIONS"]
    deps = services()["worker"]["depends_on"]
    assert deps["kafka-init"]["condition"] == "service_completed_successfully"


def test_the_provisioning_and_configs_are_mounted() -> None:
    s = services()
    mounts = " ".join(s["grafana"]["volumes"])
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in mounts
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards" in mounts
    mounts += " " + " ".join(s["prometheus"]["volumes"])
    for path in re.findall(r"\./(deploy/\S+?):", mounts):
        assert (ROOT / path).exists(), path
    for name in SCALE_OUT:
        cmd = " ".join(s[name]["command"])
        for f in re.findall(r"/etc/meterstream/([\w.-]+\.toml)", cmd):
            assert (ROOT / "config" / f).is_file(), f
    staging = s["field"]["command"]
    (cfg,) = [a.split("=", 1)[1] for a in staging if a.startswith("--config=")]
    assert (ROOT / cfg.removeprefix("/app/")).is_file()


def test_the_staging_field_is_the_demo_field_with_container_addresses() -> None:
    from meterfield.config import load_config

    demo = load_config(ROOT / "config" / "field-demo.toml")
    staging = load_config(ROOT / "deploy" / "staging" / "field.toml")
    assert (staging.host, staging.collector_host) == ("field", "collector")
    import dataclasses

    assert dataclasses.replace(staging, host=demo.host, collector_host=demo.collector_host,
                               source=demo.source) == demo


# --- the environment table ------------------------------------------------------------------

def test_env_overrides_the_worker_toml() -> None:
    cfg = load_worker_config(ROOT / "config" / "worker.toml")
    env = {"METERSTREAM_HTTP_PORT": "8181", "METERSTREAM_PARTITIONS": "24",
           "METERSTREAM_METRICS_PORT": "9100", "METERSTREAM_INFLUX_ORG": "county",
           "METERSTREAM_INFLUX_BUCKET": "b2", "METERSTREAM_INFLUX_SPOOL_DIR": "/tmp/s"}
    got = worker_env(cfg, env)
    assert (got.http_port, got.partitions, got.metrics_port) == (8181, 24, 9100)
    assert (got.influx.org, got.influx.bucket, str(got.influx.spool_dir)) == ("county", "b2",
                                                                               "/tmp/s")
    assert got.influx.url == cfg.influx.url  # not set: the file's
    assert worker_env(cfg, {}) == cfg


def test_influx_from_the_environment_alone() -> None:
    env = {"METERSTREAM_INFLUX_URL": "http://influxdb:8086", "METERSTREAM_INFLUX_ORG": "o",
           "METERSTREAM_INFLUX_BUCKET": "b"}
    got = worker_env(WorkerConfig(), env)
    assert (got.influx.url, got.influx.org, got.influx.bucket) == ("http://influxdb:8086", "o",
                                                                   "b")
    with pytest.raises(UserError, match="METERSTREAM_INFLUX_BUCKET: required"):
        worker_env(WorkerConfig(), {k: v for k, v in env.items() if "BUCKET" not in k})


@pytest.mark.parametrize("name,value,reason", [
    ("METERSTREAM_HTTP_PORT", "80a", "is not an integer"),
    ("METERSTREAM_METRICS_PORT", "70000", "out of range: give 0..65535"),
    ("METERSTREAM_PARTITIONS", "0", "out of range"),
    ("METERSTREAM_LOG_FORMAT", "xml", "give one of text, json"),
    ("METERSTREAM_INFLUX_URL", "influxdb:8086", "base URL"),
    ("METERSTREAM_BROKER", "kafka:9092", "expected kafka://"),
])
def test_a_bad_value_names_the_variable(name: str, value: str, reason: str) -> None:
    with pytest.raises(UserError) as e:
        env_value(name, {name: value})
    assert str(e.value).startswith(f"environment variable {name}: ") and reason in str(e.value)


def test_broker_from_the_environment() -> None:
    assert broker_of(None, {"METERSTREAM_BROKER": "kafka://kafka:9092,k2:9093"}) == \
        "kafka:9092,k2:9093"
    assert broker_of("kafka://a:1", {"METERSTREAM_BROKER": "kafka://b:2"}) == "a:1"
    with pytest.raises(UserError, match="environment variable METERSTREAM_BROKER"):
        broker_of(None, {"METERSTREAM_BROKER": "kafka://kafka:port"})
    with pytest.raises(UserError, match="--broker: give --broker"):
        broker_of(None, {})


def test_the_table_is_documented() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for var in ENV_VARS:
        assert f"`{var.name}`" in doc, f"{var.name} is not in docs/operations.md"


def test_the_cli_reports_a_bad_variable_in_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "METERSTREAM_BROKER": "kafka://127.0.0.1:9",
           "METERSTREAM_METRICS_PORT": "x"}
    p = subprocess.run([sys.executable, "-m", "meterstream", "collector", "--archive", "a.csv",
                        "--config", "c.toml"], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=60, check=False)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("meterstream collector: error: environment variable "
                                "METERSTREAM_METRICS_PORT: 'x' is not an integer")
