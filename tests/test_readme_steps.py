"""The README's hospital and coordinator steps, run as written, on two synthetic hospitals and one coordinator on
this machine, through Flower's deployment engine (the coordinator's SuperLink as `mome deploy-local` starts it, in
place of the compose services).

What is changed in a command before it runs, and nothing else: the hospital's `/srv/mome` and `/run/mome` become
folders under the test's tmp folder, `site-a` the hospital's own id, the coordinator's address and the SuperNode's
runtime port free loopback ones. Lines that start containers (`docker`, `docker-compose`) and the install step are
not run: the compose path is `make compose-check`'s (tests/test_compose_run.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from mome.common.bundle import load_bundle
from mome.common.config import parse_run_config
from mome.deploy.health import check_health, port_open
from mome.deploy.local import LocalDeployment
from mome.deploy.processes import free_ports, stop_tree
from mome.sim.synth import generate_federation
from tests.test_deploy import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ("site-a", "site-b")  # two hospitals of the README's three: the third's keys never arrive
pytestmark = pytest.mark.slow  # real SuperLink, SuperNode, SuperExec and worker processes


def steps(section: str) -> list[list[str]]:
    """The README section's fenced bash blocks, each as its commands (continuation lines joined)."""
    text = (ROOT / "README.md").read_text().split(f"\n## {section}", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [[c.strip() for c in re.sub(r"\\\n\s*", "", block).splitlines() if c.strip()] for block in blocks]


def block_with(blocks: list[list[str]], marker: str, first: bool = False) -> list[str]:
    """The one block holding `marker` (in its first command, with `first`)."""
    found = [b for b in blocks if any(marker in c for c in (b[:1] if first else b))]
    assert len(found) == 1, f"the README has {len(found)} blocks with {marker!r}"
    return found[0]


class Shell:
    """Runs README commands with this test's substitutions, in one folder, with the project's `mome` on PATH."""

    def __init__(self, cwd: Path, substitutions: dict[str, str]):
        self.cwd, self.substitutions = cwd, substitutions
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    "FLWR_HOME": str(cwd / ".flwr"), "OMP_NUM_THREADS": "1"}

    def line(self, command: str) -> str:
        for old, new in self.substitutions.items():
            command = command.replace(old, new)
        return command

    def run(self, command: str) -> subprocess.CompletedProcess:
        done = subprocess.run(["bash", "-c", self.line(command)], cwd=self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, f"{self.line(command)}\n{done.stdout}\n{done.stderr}"
        return done

    def start(self, command: str, log: Path) -> subprocess.Popen:
        with open(log, "w") as out:
            return subprocess.Popen(["bash", "-c", f"exec {self.line(command)}"], cwd=self.cwd, env=self.env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def followed(tmp_path_factory):
    """Both sections followed to the end of a federation; returns the shells, the processes' logs and outputs."""
    tmp = tmp_path_factory.mktemp("readme")
    data = generate_federation(tmp / "data", sites=len(SITES), preset="mixed", seed=1, size=24, cases=4, test_cases=2)
    hospital, coordinator = steps("Hospital: join the federation"), steps("Coordinator: run the aggregation server")
    overrides = {**parse_run_config(TINY), "labels": str(tmp / "coordinator" / "runs" / "compose" / "labels.json")}
    dep = LocalDeployment.prepare(data, tmp / "coordinator" / "runs" / "compose", overrides=overrides,
                                  certs_dir=tmp / "coordinator" / "certs")  # the SuperLink's ports; no certs made
    fleet = f"127.0.0.1:{dep.topology.ports.fleet}"
    coord = Shell(tmp / "coordinator", {"coordinator.example.org:9092": fleet})
    coord.cwd.mkdir()
    sites = {}
    for site, folder, port in zip(SITES, data, free_ports(len(SITES))):
        root, run = tmp / site, Path(tempfile.mkdtemp(prefix="mome-run-"))  # a socket path stays short
        shell = Shell(root, {"/srv/mome": str(root / "srv"), "/run/mome": str(run), "site-a": site,
                             "coordinator.example.org:9092": fleet, "9095": str(port)})
        root.mkdir()
        shutil.copytree(folder, root / "srv" / site)
        for command in block_with(hospital, "mome check-data") + block_with(hospital, "mome site-key"):
            shell.run(command)
        sites[site] = shell
    for command in block_with(coordinator, "mome certs --out certs --sites 3 --server-name", first=True):
        coord.run(command)
    for site, shell in sites.items():  # each hospital's two .pub files arrive; the CA goes back
        (coord.cwd / "received" / site).mkdir(parents=True)
        for name in ("auth.key.pub", "sign.key.pub"):
            shutil.copy(shell.cwd / "srv" / name, coord.cwd / "received" / site / name)
        shutil.copy(coord.cwd / "certs" / "ca.crt", shell.cwd / "srv" / "ca.crt")
        for command in block_with(coordinator, "received/site-a"):
            said = coord.run(command.replace("site-a", site)).stdout
            assert f"{site}: waiting" not in said and f"{site}: unusable" not in said, said
    shutil.copy(data[0] / "dataset.json", coord.cwd / "dataset.json")
    for command in block_with(coordinator, "labels.json"):
        coord.run(command)
    procs, logs = [], tmp / "logs"
    logs.mkdir()
    with dep:
        dep.start_superlink()
        dep.enrol()
        try:
            for site, shell in sites.items():
                worker, supernode, superexec = block_with(hospital, "mome site serve")
                procs.append(shell.start(worker, logs / f"worker-{site}.log"))
                socket = f"unix://{shell.substitutions['/run/mome']}/worker.sock"
                _wait(lambda: check_health(socket, 1.0), procs[-1], "the worker")
                procs.append(shell.start(supernode, logs / f"supernode-{site}.log"))
                port = int(shell.substitutions["9095"])
                _wait(lambda: port_open(port), procs[-1], "the SuperNode's runtime API")
                procs.append(shell.start(superexec, logs / f"superexec-{site}.log"))
            dep.submit()
            code = dep.wait_run(timeout=600)
            status = coord.run(block_with(coordinator, "mome status")[0]).stdout
            watched = {site: [shell.run(c).stdout for c in block_with(hospital, "mome audit")]
                       for site, shell in sites.items()}
        finally:
            for proc in reversed(procs):
                stop_tree(proc)
            for shell in sites.values():
                shutil.rmtree(shell.substitutions["/run/mome"], ignore_errors=True)
    yield {"code": code, "status": status, "watched": watched, "sites": sites, "coord": coord, "logs": logs,
           "hospital": hospital, "coordinator": coordinator, "metrics": dep.metrics_path()}


def _wait(ready, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{what}: not ready within {timeout:.0f} s"
        time.sleep(0.2)


def test_the_coordinators_steps_run_a_federation_of_the_hospitals_that_followed_theirs(followed):
    assert followed["code"] == 0, sorted(p.name for p in followed["logs"].iterdir())
    metrics = json.loads(followed["metrics"].read_text())
    assert metrics["status"] == "ok" and set(metrics["sites"]) == set(SITES)
    assert all(metrics["sites"][s]["model_saved"] for s in SITES)
    assert "ended: ok" in followed["status"] and "sites bound (2): site-a" in followed["status"], followed["status"]


def test_each_hospital_watches_gets_its_model_and_segments_new_cases(followed):
    for site, shell in followed["sites"].items():
        health, audit = followed["watched"][site]
        assert health.strip() == "SERVING" and "run" in audit, audit
        assert "weights.npz" in shell.run(block_with(followed["hospital"], "ls /srv/mome/out/model")[0]).stdout
        new_cases = shell.cwd / "srv" / "new-cases"  # a held-out case, as loose files of the bundle's channels
        new_cases.mkdir()
        bundle = json.loads((shell.cwd / "srv" / "out" / "model" / "metadata.json").read_text())
        layout = json.loads((shell.cwd / "srv" / site / "dataset.json").read_text())
        case = sorted((shell.cwd / "srv" / site / "imagesTs").glob("*_0000.nii.gz"))[0].name[:-len("_0000.nii.gz")]
        names = bundle["modalities"]
        for index, name in layout["channel_names"].items():
            source = shell.cwd / "srv" / site / "imagesTs" / f"{case}_{int(index):04d}.nii.gz"
            if source.exists():
                shutil.copy(source, new_cases / f"{case}_{names.index(name):04d}.nii.gz")
        predict = block_with(followed["hospital"], "mome predict")[0]
        lacking = len(list(new_cases.iterdir())) < len(names)  # a sequence this site or case lacks: said, allowed
        shell.run(predict + (" --allow-missing" if lacking else ""))
        out = shell.cwd / "srv" / "segmentations"
        assert (out / f"{case}.nii.gz").exists() and (out / f"{case}.png").exists()


def test_a_hospital_that_took_no_part_adapts_the_federations_model(followed):
    shell = followed["sites"]["site-a"]
    shutil.copytree(followed["metrics"].parent / "model", shell.cwd / "srv" / "federation-model")  # from the coordinator
    shell.run(block_with(followed["hospital"], "mome adapt")[0])
    assert (shell.cwd / "srv" / "adapted" / "model" / "weights.npz").exists()
    given, adapted = (load_bundle(shell.cwd / "srv" / d) for d in ("federation-model", "adapted/model"))
    routing = [k for k in given.gate if k != "mlp.2.bias"]  # all but the prior: a late site fits the whole gate
    assert any(not np.array_equal(given.gate[k], adapted.gate[k]) for k in routing)
