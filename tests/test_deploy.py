"""Deployment over real gRPC on loopback: TLS + SuperNode auth, an unenrolled node, a site crash, the compose file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from flwr.common.config import parse_config_args

from mome.common.config import parse_run_config
from mome.common.signing import enrolled_keys, load_signing_key
from mome.common.wire import SHARED_EXPERT
from mome.deploy.certs import write_certificates
from mome.deploy.compose import expand, render_compose
from mome.deploy.local import LocalDeployment, deploy_local
from mome.deploy.processes import alive
from mome.deploy.topology import RUN, SUPERLINK, Topology
from mome.sim.synth import generate_federation
from tests.conftest import tree_checksums

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# a tiny model and one epoch per phase: the point is the deployment, not the Dice
TINY = ('size=24 channels="8,16,32" stem-channels=4 warmup-rounds=1 warmup-epochs=1 expert-epochs=1 gate-steps=2 '
        'personalise-epochs=1 gate-rounds=1 min-cases=1')  # the tiny sites hold 2 held-out cases
slow = pytest.mark.slow  # starts real SuperLink/SuperNode processes (about 1.5 min each); still in the default run


@pytest.fixture(scope="module")
def own_home(tmp_path_factory):
    """flwr writes ~/.flwr: keep every Flower process of these tests out of the real home."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        mp.setenv("OMP_NUM_THREADS", "1")  # two sites training on two cores: no OpenMP oversubscription
        yield


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> list[Path]:
    return generate_federation(tmp_path_factory.mktemp("data"), sites=3, preset="mixed", seed=1, size=24,
                               cases=4, test_cases=2)


def _leftovers(run_dir: Path) -> list[int]:
    """Live processes whose command line or environment mentions the run folder (ours, and their children)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and alive(proc.pid) and (
                    str(run_dir) in " ".join(proc.cmdline()) or any(str(run_dir) in v for v in proc.environ().values())):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture(scope="module")
def secure_run(own_home, federation, tmp_path_factory):
    """Three SuperNodes, only site-a and site-b enrolled: site-c must be refused, the run must go on."""
    run_dir = tmp_path_factory.mktemp("deploy")
    before = {d.name: tree_checksums(d) for d in federation}
    start = time.perf_counter()
    combined = deploy_local(3, run_dir, federation[0].parent, run_config=TINY, enrol=["site-a", "site-b"],
                            timeout=420)
    seconds = time.perf_counter() - start
    after = {d.name: tree_checksums(d) for d in federation}
    record = json.loads((run_dir / "deployment.json").read_text())
    return run_dir, combined, record, before, after, seconds


@slow
def test_enrolled_sites_complete_a_federation_over_tls_with_node_auth(secure_run):
    run_dir, combined, record, _, _, seconds = secure_run
    metrics = combined["strategies"]["mome"]
    assert sorted(metrics["sites"]) == ["site-a", "site-b"]
    assert metrics["dropped"] == []
    assert sorted(metrics["experts"]) == [SHARED_EXPERT, "site-a", "site-b"]
    assert [r["phase"] for r in metrics["rounds"]] == ["warmup", "expert", "gate", "evaluate"]
    assert all(metrics["traffic"][s]["up"] > 0 and metrics["traffic"][s]["down"] > 0 for s in ("site-a", "site-b"))
    # the coordinator's outputs, and each site's own bundle written through its node config's out-dir
    assert (run_dir / "mome" / "metrics.json").exists() and (run_dir / "metrics.json").exists()
    assert (run_dir / "mome" / "model" / "metadata.json").exists()
    assert (run_dir / "mome" / "checkpoints" / "latest").exists()
    for site in ("site-a", "site-b"):
        assert (run_dir / "mome" / "sites" / site / "model" / "metadata.json").exists()
    # security was on: TLS on the SuperLink, node auth, every SuperNode verifying the CA; no --insecure anywhere
    assert record["secure"] is True
    procs = record["processes"]
    assert {"--enable-supernode-auth", "--ssl-certfile", "--ssl-keyfile"} <= set(procs[SUPERLINK]["argv"])
    for site in ("site-a", "site-b", "site-c"):
        assert {"--root-certificates", "--auth-supernode-private-key"} <= set(procs[site]["argv"])
    # no --insecure on any link between machines; a SuperExec reaches its own SuperNode's runtime API, at the site
    assert not any("--insecure" in p["argv"] for name, p in procs.items() if not name.startswith("superexec-"))
    assert all(procs[f"superexec-{s}"]["argv"][2].startswith("127.0.0.1:") for s in ("site-a", "site-b"))
    assert record["run_config"]["start-sites"] == 2
    # the SuperNodes (and the coordinator's app they run) were told only where their worker listens
    assert all(set(c) == {"site-id", "worker", "worker-token-file"} for c in record["node_configs"].values())
    assert "code sha256" in (run_dir / "logs" / "worker-site-a.log").read_text()
    bound = [e for e in metrics["identity"] if e["event"] == "bound"]  # each site's worker, as it told the server
    assert len(bound) == 2 and all("mome.site.Worker/v1 sha256:" in e["worker"] for e in bound)
    # every reply the coordinator accepted was signed by a worker's key enrolled under run_dir/certs/signing
    assert record["run_config"]["site-keys"] == str(run_dir / "certs" / "signing")
    assert "replies signed with" in (run_dir / "logs" / "worker-site-b.log").read_text()
    for name in (SUPERLINK, "site-a", "site-b", "site-c", RUN, "enrol-site-a", "enrol-site-b"):
        assert (run_dir / "logs" / f"{name}.log").stat().st_size > 0
    # every process (and the SuperExec/ClientApp children Flower detaches) is gone
    assert not _leftovers(run_dir)
    print(f"secure 3-node deployment took {seconds:.0f} s")


@slow
def test_unenrolled_supernode_is_refused_and_the_run_goes_on(secure_run):
    run_dir, combined, record, *_ = secure_run
    assert record["enrolled"] == ["site-a", "site-b"]
    assert record["refused"] == ["site-c"]
    assert record["processes"]["site-c"]["exit_code"] not in (0, None)
    assert "Exit Code: 305" in (run_dir / "logs" / "site-c.log").read_text()
    assert "site-c" not in combined["strategies"]["mome"]["sites"]
    assert not (run_dir / "mome" / "sites" / "site-c" / "model").exists()


@slow
def test_site_data_is_unchanged_by_a_deployment(secure_run):
    _, _, _, before, after, _ = secure_run
    assert set(before) == {"site-a", "site-b", "site-c"}
    assert before == after


@slow
def test_site_killed_mid_run_is_dropped_and_the_run_completes(own_home, federation, tmp_path):
    run_dir = tmp_path / "run"
    # min-sites 1: the run is to go on with the one survivor (the default quorum is 2)
    overrides = parse_run_config(TINY.replace("warmup-rounds=1", "warmup-rounds=0") + " round-timeout=30 min-sites=1")
    with LocalDeployment.prepare(federation[:2], run_dir, overrides=overrides) as dep:
        dep.up()
        dep.submit()
        first = run_dir / "mome" / "checkpoints" / "step_001.npz"  # the expert round is done
        deadline = time.monotonic() + 240
        while not first.exists():
            assert dep.procs[RUN].returncode is None, (run_dir / "logs" / "run.log").read_text()
            assert time.monotonic() < deadline, "the first round never finished"
            time.sleep(0.5)
        dep.kill("site-b")  # SIGKILL to the SuperNode and the ClientApp processes below it: a crash
        assert dep.wait_run(timeout=300) == 0
        combined = dep.collect()
    metrics = combined["strategies"]["mome"]
    assert sorted(metrics["experts"]) == [SHARED_EXPERT, "site-a", "site-b"]  # site-b's expert arrived before the crash
    assert metrics["sites"]["site-a"]["status"] == "evaluated"  # only the survivor evaluated
    assert metrics["sites"]["site-b"]["status"] == "failed" and metrics["sites"]["site-b"]["model_saved"] == 0
    assert metrics["status"] == "ok" and metrics["summary"]["n_evaluated"] == 1
    dropped = metrics["dropped"]
    assert {d["site"] for d in dropped} == {"site-b"}  # the SuperLink's error replies are named by site
    assert all(d["step"] >= 1 for d in dropped)  # nothing was lost before the crash
    assert (run_dir / "mome" / "model" / "metadata.json").exists()
    assert not _leftovers(run_dir)


# -- one topology, two renderings ---------------------------------------------------------------
def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _volume(spec: str) -> tuple[str, str, bool]:
    """'source:target[:ro]' -> (source, target, read_only); the source may hold ${VAR:-default}."""
    read_only = spec.endswith(":ro")
    source, target = spec[: -3 if read_only else None].rsplit(":", 1)
    return source, target, read_only


def _flags(command) -> list[str]:
    return [c for c in command if str(c).startswith("--")]


def test_committed_compose_file_is_rendered_from_the_topology():
    assert (ROOT / "docker-compose.yml").read_text() == render_compose(Topology.for_compose(3, "./data"))


def test_compose_and_deploy_local_share_services_sites_node_configs_and_mounts(tmp_path):
    compose = _compose()["services"]
    local = Topology(("site-a", "site-b", "site-c"), str(tmp_path / "data"), certs_dir=str(tmp_path / "certs"),
                     out_dir=str(tmp_path / "run"), containers=False)
    services = {s.name: s for s in local.services()}
    assert set(compose) == set(services) == {SUPERLINK, RUN, *(f"enrol-site-{c}" for c in "abc"),
                                             *(f"{kind}site-{c}" for c in "abc"
                                               for kind in ("", "worker-", "superexec-"))}
    for name, svc in services.items():
        assert compose[name]["command"][0] == svc.command[0]
        assert _flags(compose[name]["command"]) == _flags(svc.command), name  # same options, own paths/ports
    for site in ("site-a", "site-b", "site-c"):
        command = compose[site]["command"]
        node = parse_config_args([command[command.index("--node-config") + 1]])  # as flower-supernode reads it
        assert node == {"site-id": site, "worker": "unix:///run/mome/worker.sock",
                        "worker-token-file": "/run/mome/worker.token"}
        assert set(node) == set(services[site].node_config) and services[site].node_config["site-id"] == site
        # only the site's own worker mounts a data folder, its own, read-only -- in both renderings
        worker = compose[f"worker-{site}"]
        data = [_volume(v) for v in worker["volumes"] if "MOME_DATA" in v]
        assert data == [(f"${{MOME_DATA:-./data}}/{site}", "/data", True)] and expand(data[0][0]) == f"./data/{site}"
        local_data = [m for m in services[f"worker-{site}"].mounts if m.source == str(tmp_path / "data" / site)]
        assert len(local_data) == 1 and local_data[0].read_only
        assert not any("sites/" in v and site not in v for v in compose[site]["volumes"])  # no other site's key
        assert "ports" not in compose[site] and "ports" not in worker  # a hospital opens no inbound port


def test_the_coordinators_app_runs_where_there_is_no_site_data_and_the_worker_has_no_network():
    """The FAB's ClientApp (the relay) runs in the site's SuperExec container (process isolation): no data folder,
    no site outputs, no key of any kind, only the worker's socket volume and a network to its own SuperNode. The
    SuperNode holds only its Flower node key; the worker joins no network. The ServerApp reads the enrolled
    signing keys (public) from the coordinator's certs."""
    compose = _compose()
    services = compose["services"]
    for site in ("site-a", "site-b", "site-c"):
        relay = services[f"superexec-{site}"]
        assert [_volume(v) for v in relay["volumes"]] == [(f"worker-{site}", "/run/mome", False)]
        assert relay["networks"] == [f"exec-{site}"] and relay["command"][0] == "flower-superexec"
        node = services[site]
        assert {_volume(v)[1] for v in node["volumes"]} == {"/certs/ca.crt", "/certs/auth.key"}
        assert node["networks"] == ["fleet", f"exec-{site}"] and "--isolation" in node["command"]
        assert node["command"][node["command"].index("--isolation") + 1] == "process"
        worker = services[f"worker-{site}"]
        assert worker["network_mode"] == "none" and "networks" not in worker
        assert (f"worker-{site}", "/run/mome", False) in [_volume(v) for v in worker["volumes"]]
        certs = [_volume(v) for v in worker["volumes"] if "MOME_CERTS" in v]  # only its own signing key
        assert certs == [(f"${{MOME_CERTS:-./certs}}/sites/{site}/sign.key", "/certs/sign.key", True)]
        assert services[site]["depends_on"][f"worker-{site}"] == {"condition": "service_healthy"}
        assert f"worker-{site}" in compose["volumes"]
    superlink = services[SUPERLINK]
    assert ("${MOME_CERTS:-./certs}/signing", "/certs/signing", True) in [_volume(v) for v in superlink["volumes"]]
    run = services[RUN]["command"]
    assert 'site-keys="/certs/signing"' in run[run.index("--run-config") + 1]


def test_every_compose_command_is_a_real_entry_point():
    compose = _compose()["services"]
    for name, svc in compose.items():
        commands = [svc["command"]] + ([svc["healthcheck"]["test"][1:]] if "healthcheck" in svc else [])
        for command in commands:
            assert (BIN / command[0]).exists(), f"{name}: {command[0]}"  # mome is a console script here too
    # and the subcommands they call exist
    help_text = subprocess.run([str(BIN / "mome"), "--help"], capture_output=True, text=True).stdout
    assert "health" in help_text
    for binary in ("flower-superlink", "flower-supernode"):
        flags = subprocess.run([str(BIN / binary), "--help"], capture_output=True, text=True).stdout
        used = {f for svc in compose.values() if svc["command"][0] == binary for f in _flags(svc["command"])}
        assert used and all(f in flags for f in used), binary


def test_docker_compose_accepts_the_file(tmp_path):
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose is not installed (apt-get install docker-compose to check the file)")
    # a clean environment: after the federation tests in the same process, Debian's docker-compose failed with a
    # cryptography/pyOpenSSL mismatch (a variable left behind, most likely by Ray), yet ran fine from a shell
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    done = subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr


def test_certificates_and_site_keys_are_what_flower_reads(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key

    paths = write_certificates(tmp_path, ["site-a", "site-b"], site_keys=True)  # a one-machine trial's keys
    for site in ("site-a", "site-b"):  # each worker's signing key, and its public half where the ServerApp reads it
        enrolled = enrolled_keys(tmp_path / "signing")[site].public_bytes_raw()
        assert load_signing_key(paths.signing_key(site)).public_key().public_bytes_raw() == enrolled
        assert paths.signing_key(site).stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost", "superlink"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    for site in ("site-a", "site-b"):
        key = load_ssh_private_key(paths.site_key(site).read_bytes(), password=None)
        assert isinstance(key.curve, ec.SECP384R1)
        assert oct(paths.site_key(site).stat().st_mode & 0o777) == "0o600"
        assert try_load_public_key(paths.site_public_key(site))  # what `flwr supernode register` accepts
    first = paths.ca_cert.read_bytes()
    write_certificates(tmp_path, ["site-a", "site-b", "site-c"], site_keys=True)  # adding a site keeps the CA, old keys
    assert paths.ca_cert.read_bytes() == first and paths.site_key("site-c").exists()


def test_security_is_on_unless_insecure_is_named():
    from mome.cli.main import build_parser

    assert build_parser().parse_args(["deploy-local"]).insecure is False
    top = Topology.build(2, "/data", containers=False)
    assert "--insecure" not in top.superlink().command and "--enable-supernode-auth" in top.superlink().command
    plain = Topology.build(2, "/data", containers=False, secure=False)
    assert "--insecure" in plain.superlink().command and "--insecure" in plain.site(0).command
    assert [s.role for s in plain.services()].count("enrol") == 0
    with pytest.raises(ValueError):
        render_compose(Topology.build(2, secure=False))
