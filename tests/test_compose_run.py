"""The committed docker-compose.yml run for real: the image is built, a 3-site federation runs to the end in
containers, and inside a running container that runs the coordinator's app (a site's SuperExec) there is no data
folder and no key. Needs a container engine (`make compose-check` starts one with ../shared/containers/engine.sh);
without one the test is skipped and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from mome.cli.main import main as mome
from mome.deploy.topology import IMAGE_UID

ROOT = Path(__file__).resolve().parents[1]
DOCKER, COMPOSE = "/usr/bin/docker", "/usr/bin/docker-compose"  # Debian's clients (another may come first on PATH)
PROJECT = "mometest"
TINY = ('size=24 channels="8,16,32" stem-channels=4 warmup-rounds=1 warmup-epochs=1 expert-epochs=1 gate-steps=2 '
        'personalise-epochs=1 gate-rounds=1 min-cases=1')
pytestmark = [pytest.mark.slow, pytest.mark.engine]


def _engine_up() -> bool:
    return Path(DOCKER).exists() and Path(COMPOSE).exists() and subprocess.run(
        [DOCKER, "info"], capture_output=True).returncode == 0


def _ok(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"{' '.join(done.args[3:])}: {(done.stdout + done.stderr)[-3000:]}"


@pytest.fixture(scope="module")
def compose_run(tmp_path_factory):
    if not _engine_up():
        pytest.skip("no container engine answers `docker info`: run `make compose-check` (it starts one)")
    root = tmp_path_factory.mktemp("compose")
    assert mome(["synth", "--out", str(root / "data"), "--sites", "3", "--size", "24", "--cases", "4",
                 "--test-cases", "2"]) == 0
    assert mome(["certs", "--out", str(root / "certs"), "--sites", "3", "--site-keys"]) == 0
    for site in ("site-a", "site-b", "site-c"):
        (root / "outputs" / "mome" / "sites" / site).mkdir(parents=True)
    for path in [root, *root.rglob("*")]:  # the containers run as the image's user, who must read the 0600 keys
        os.chown(path, IMAGE_UID, IMAGE_UID)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(root), "MOME_DATA": str(root / "data"),
           "MOME_CERTS": str(root / "certs"), "MOME_OUTPUTS": str(root / "outputs"), "MOME_RUN_CONFIG": TINY}
    compose = [COMPOSE, "-p", PROJECT, "-f", str(ROOT / "docker-compose.yml")]
    started = time.perf_counter()
    _ok(subprocess.run([*compose, "build"], cwd=ROOT, env=env, capture_output=True, text=True))
    built = time.perf_counter() - started
    try:
        _ok(subprocess.run([*compose, "up", "-d"], cwd=ROOT, env=env, capture_output=True, text=True))
        run = f"{PROJECT}_run_1"
        code = subprocess.run([DOCKER, "wait", run], capture_output=True, text=True, timeout=900).stdout.strip()
        took = time.perf_counter() - started
        look = "awk '$2 ~ /^\\/(data|certs|site-out|run)/ {print $2}' /proc/mounts | sort; ls /run/mome; true"
        inside = {name: subprocess.run([DOCKER, "exec", f"{PROJECT}_{name}_1", "sh", "-c", look],
                                       capture_output=True, text=True).stdout.split()
                  for name in ("superexec-site-a", "site-a", "worker-site-a")}
        probe = ("import socket\nfor port in (9092, 9093):\n    try:\n        socket.create_connection(('superlink', "
                 "port), timeout=3).close(); print(port, 'open')\n    except OSError: print(port, 'closed')")
        inside["control from site-a"] = subprocess.run([DOCKER, "exec", f"{PROJECT}_site-a_1", "python3", "-c", probe],
                                                       capture_output=True, text=True).stdout.split()
        logs = subprocess.run([DOCKER, "logs", run], capture_output=True, text=True).stdout
        yield root, int(code), inside, logs, built, took
    finally:
        subprocess.run([*compose, "down", "-v"], cwd=ROOT, env=env, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_the_compose_federation_runs_to_the_end(compose_run):
    root, code, _, logs, built, took = compose_run
    assert code == 0, logs[-3000:]
    metrics = json.loads((root / "outputs" / "mome" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and sorted(metrics["sites"]) == ["site-a", "site-b", "site-c"]
    assert all((root / "outputs" / "mome" / "sites" / s / "model" / "metadata.json").exists()
               for s in ("site-a", "site-b", "site-c"))
    print(f"compose: image built in {built:.0f} s, federation finished {took:.0f} s after the build started")


def test_the_container_running_the_coordinators_app_holds_no_data_and_no_key(compose_run):
    _, _, inside, *_ = compose_run
    # mounts, then what /run/mome holds: the SuperExec has the worker's socket and nothing else
    assert inside["superexec-site-a"] == ["/run/mome", "worker.sock", "worker.token"]
    assert inside["site-a"] == ["/certs/auth.key", "/certs/ca.crt"]  # the SuperNode: its Flower key and the CA
    assert inside["worker-site-a"] == ["/certs/sign.key", "/data", "/run/mome", "/site-out", "worker.sock",
                                       "worker.token"]


def test_a_site_reaches_the_fleet_api_but_not_the_control_api(compose_run):
    _, _, inside, *_ = compose_run
    assert inside["control from site-a"] == ["9092", "open", "9093", "closed"]
