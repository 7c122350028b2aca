"""`mome deploy-local`: the compose topology as local processes on loopback (SuperLink, SuperNodes, flwr run)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import tomli_w

from mome.common.atomic import write_json
from mome.common.config import COORDINATOR_KEYS, parse_run_config
from mome.common.sitedata import SiteDataError, find_site_dirs
from mome.common.wire import check_site_id
from mome.deploy.app import _app_config, app_for_run
from mome.deploy.certs import write_certificates
from mome.deploy.health import check_health, port_open
from mome.deploy.processes import DeployError, Proc, descendants, entry_point, free_ports, stop_tree, tee
from mome.deploy.topology import RUN, SUPERLINK, Ports, Service, Topology, format_node_config, worker_name

log = logging.getLogger("mome.deploy")
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LocalDeployment:
    """The topology's processes on this machine. Use as a context manager: every process stops on exit."""

    topology: Topology
    run_dir: Path
    overrides: dict[str, Any] = field(default_factory=dict)  # run config (without out-dir)
    project_dir: Path = PROJECT_ROOT
    echo: bool = False  # also copy `flwr run`'s stream to stdout
    procs: dict[str, Proc] = field(default_factory=dict)
    enrolled: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @classmethod
    def prepare(cls, site_dirs: list[Path], run_dir: Path, secure: bool = True, overrides: Mapping[str, Any] | None
                = None, certs_dir: Path | None = None, **kwargs: Any) -> "LocalDeployment":
        """Topology with free loopback ports; certificates and trial key pairs (secure) under <run>/certs, or the
        coordinator's own `certs_dir` (`mome certs`, the hospitals' public keys in place) as they are."""
        run_dir = Path(run_dir).resolve()
        overrides = dict(overrides or {})
        data_dirs = {Path(d).resolve().parent for d in site_dirs}
        if len(data_dirs) != 1:
            raise DeployError("all site folders must sit in one data folder (the compose file mounts <data>/<site>)")
        n = len(site_dirs)
        project = Path(kwargs.get("project_dir", PROJECT_ROOT))
        ports = free_ports(3 + 2 * n)
        topology = Topology(tuple(_site_id(Path(d).name) for d in site_dirs), str(data_dirs.pop()),
                            certs_dir=str(Path(certs_dir or run_dir / "certs").resolve()), out_dir=str(run_dir),
                            strategy=str(overrides.get("strategy", _app_config(project).get("strategy", "mome"))),
                            secure=secure, containers=False, state_dir=str(run_dir / "state"),
                            worker_root=_short_folder(run_dir / "state" / "workers"),
                            ports=Ports(ports[0], ports[1], ports[2],
                                        tuple((ports[3 + 2 * i], ports[4 + 2 * i]) for i in range(n))))
        for site in topology.site_ids:
            format_node_config(topology.node_config(site))  # fail early on paths a node config cannot carry
        if secure and certs_dir is None:
            write_certificates(Path(topology.certs_dir), list(topology.site_ids), site_keys=True)  # one machine
        return cls(topology, run_dir, overrides, **kwargs)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- processes ----------------------------------------------------------------------------
    def _env(self, service: Service) -> dict[str, str]:
        env = dict(os.environ)
        env.update(service.env)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # flower-superexec
        env["PYTHONUNBUFFERED"] = "1"
        if service.role == "worker" and "OMP_NUM_THREADS" not in os.environ:
            # every site trains on this one machine: share the cores instead of oversubscribing them
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(self.topology.site_ids)))
        Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
        return env

    def _start(self, service: Service, pipe: bool = False) -> Proc:
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_path = logs / f"{service.name}.log"
        argv = [entry_point(service.command[0]), *service.command[1:]]
        out = open(log_path, "ab")
        out.write(f"$ {' '.join(service.command)}\n".encode())
        out.flush()
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if pipe else out,
                                 stderr=subprocess.STDOUT, env=self._env(service), cwd=self.run_dir,
                                 start_new_session=True)  # its own group: stopped as a unit, not by Ctrl-C
        proc = Proc(service.name, popen, log_path, list(service.command))
        if pipe:
            proc.echo_thread = threading.Thread(target=tee, args=(popen, out, self.echo), daemon=True)
            proc.echo_thread.start()
        else:
            out.close()
        self.procs[service.name] = proc
        self._event("started", service.name, pid=popen.pid)
        return proc

    def _event(self, what: str, name: str, **extra: Any) -> None:
        self.events.append({"t": round(time.time(), 3), "event": what, "process": name, **extra})
        log.info("%s %s %s", name, what, " ".join(f"{k}={v}" for k, v in extra.items()))

    def _wait_until(self, proc: Proc, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.returncode is not None:
                raise DeployError(f"{proc.name} exited with code {proc.returncode} before {what}; "
                                  f"see {proc.log_path}")
            if time.monotonic() > deadline:
                raise DeployError(f"{proc.name}: no {what} within {timeout:.0f} s; see {proc.log_path}")
            time.sleep(0.2)

    def start_superlink(self, timeout: float = 60.0) -> Proc:
        top = self.topology
        proc = self._start(top.superlink())
        Path(top.state_dir).mkdir(parents=True, exist_ok=True)
        self._wait_until(proc, lambda: check_health(f"127.0.0.1:{top.ports.health}", 1.0)
                         and port_open(top.ports.control) and port_open(top.ports.fleet), timeout, "readiness")
        cli_home = Path(top.flwr_home(RUN))
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(top.flower_config())
        return proc

    def _cli_env(self) -> dict[str, str]:
        return {**os.environ, "FLWR_HOME": self.topology.flwr_home(RUN), "FLWR_TELEMETRY_ENABLED": "0",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def enrol(self, site_ids: Iterable[str] | None = None) -> None:
        """Register each site's public key with the SuperLink (what the coordinator does per hospital)."""
        top = self.topology
        if not top.secure:
            return
        for site in site_ids if site_ids is not None else top.site_ids:
            service = top.enrol(top.site_ids.index(site))
            log_path = self.run_dir / "logs" / f"{service.name}.log"
            done = subprocess.run([entry_point(service.command[0]), *service.command[1:]], capture_output=True,
                                  text=True, env=self._cli_env(), cwd=self.run_dir, timeout=120)
            log_path.write_text(f"$ {' '.join(service.command)}\n{done.stdout}{done.stderr}")
            if done.returncode != 0 and "already in use" not in done.stdout + done.stderr:
                raise DeployError(f"enrolling {site} failed (exit {done.returncode}); see {log_path}")
            self.enrolled.append(site)
            self._event("enrolled", site)

    def start_worker(self, site: str, timeout: float = 120.0) -> Proc:
        """The site's own worker (`mome site serve`), ready once its health service answers on its socket."""
        top = self.topology
        service = top.worker(top.site_ids.index(site))
        Path(top.site_out(site)).mkdir(parents=True, exist_ok=True)
        Path(top.worker_dir(site)).mkdir(parents=True, exist_ok=True, mode=0o700)
        proc = self._start(service)
        self._wait_until(proc, lambda: check_health(top.worker_socket(site), 1.0), timeout, "readiness")
        return proc

    def start_site(self, site: str, timeout: float = 60.0) -> Proc:
        top = self.topology
        index = top.site_ids.index(site)
        service = top.site(index)
        if worker_name(site) not in self.procs:
            self.start_worker(site)
        proc = self._start(service)
        # liveness only: a SuperNode whose key is refused exits by itself, the run goes on without it
        health = f"127.0.0.1:{top.ports.site(index)[1]}"
        deadline = time.monotonic() + timeout
        while not check_health(health, 1.0) and proc.returncode is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.returncode is None:  # the SuperExec that runs the coordinator's app for this SuperNode
            self._start(top.superexec(index))
        return proc

    def up(self, enrol: Iterable[str] | None = None) -> None:
        """SuperLink, enrolment of `enrol` (default: every site), then every site's worker and SuperNode."""
        self.start_superlink()
        self.enrol(enrol)
        for site in self.topology.site_ids:
            self.start_worker(site)
        for site in self.topology.site_ids:
            self.start_site(site)

    def run_config(self) -> dict[str, Any]:
        """The deployment's own overrides (out-dir, start-sites = enrolled sites) plus the caller's."""
        expected = len(self.enrolled) if self.topology.secure else len(self.topology.site_ids)
        return {**self.topology.run_config(), "start-sites": expected,
                **{k: v for k, v in self.overrides.items() if k not in COORDINATOR_KEYS}}

    def submit(self) -> Proc:
        """`flwr run <app> coordinator --stream --run-config <run>/run-config.toml`."""
        values = self.run_config()
        config_path = self.run_dir / "run-config.toml"
        config_path.write_text(tomli_w.dumps(values))
        top = self.topology
        private = [Path(top.data_dir), Path(top.certs_dir), self.run_dir]
        app = app_for_run(self.project_dir, values, self.run_dir / "app", private)
        return self._start(self.topology.run(str(app), str(config_path)), pipe=True)

    def wait_run(self, timeout: float | None = None) -> int:
        """Until `flwr run` returns (the run finished or failed); fails early if the SuperLink dies."""
        run, link = self.procs[RUN], self.procs[SUPERLINK]
        deadline = time.monotonic() + timeout if timeout else None
        while run.returncode is None:
            self._note_exits()
            if link.returncode is not None:
                raise DeployError(f"the SuperLink exited with code {link.returncode}; see {link.log_path}")
            if deadline and time.monotonic() > deadline:
                raise DeployError(f"the run did not finish within {timeout:.0f} s; see {run.log_path}")
            time.sleep(0.5)
        if run.echo_thread:
            run.echo_thread.join(timeout=10)
        self._event("finished", RUN, exit_code=run.returncode)
        return run.returncode

    def _note_exits(self) -> None:
        """Log a SuperNode or worker that stopped on its own (refused key, crash) once; the run goes on without it."""
        for proc in self.procs.values():
            if proc.returncode is not None and not proc.stopped_by_us and proc.name != RUN and \
                    not any(e["process"] == proc.name and e["event"] == "exited" for e in self.events):
                reason = "refused by the SuperLink (key not enrolled)" if proc.refused else f"see {proc.log_path}"
                self._event("exited", proc.name, exit_code=proc.returncode, reason=reason)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one process and its children now (tests use SIGKILL to mimic a site crashing)."""
        proc = self.procs[name]
        proc.stopped_by_us = True
        stop_tree(proc.popen, grace=5.0, sig=sig)
        self._event("killed", name, signal=signal.Signals(sig).name)

    def stop(self) -> None:
        """Stop every process still running, the run first and the SuperLink last."""
        for proc in reversed(list(self.procs.values())):
            if proc.returncode is None or descendants(proc.popen.pid):
                proc.stopped_by_us = proc.stopped_by_us or proc.returncode is None
                stop_tree(proc.popen)
            elif proc.returncode is not None:
                proc.popen.wait()
        if Path(self.topology.worker_root).name.startswith(SHORT_PREFIX):  # the workers' sockets, now closed
            shutil.rmtree(self.topology.worker_root, ignore_errors=True)
        self.write_record()

    # -- results ------------------------------------------------------------------------------
    def metrics_path(self) -> Path:
        return self.run_dir / self.topology.strategy / "metrics.json"

    def write_record(self) -> Path:
        """<run>/deployment.json: topology, ports, node configs, processes and their exit codes."""
        top = self.topology
        record = {
            "secure": top.secure, "strategy": top.strategy, "sites": list(top.site_ids), "enrolled": self.enrolled,
            "ports": {"fleet": top.ports.fleet, "control": top.ports.control, "health": top.ports.health},
            "node_configs": {s: top.node_config(s) for s in top.site_ids},
            "run_config": self.run_config(), "processes": {n: p.summary() for n, p in self.procs.items()},
            "refused": [n for n, p in self.procs.items() if p.refused], "events": self.events,
            "wall_time_s": round(time.time() - self.started, 1)}
        path = self.run_dir / "deployment.json"
        write_json(path, record)
        return path

    def collect(self) -> dict[str, Any]:
        """<run>/metrics.json in the shape `mome sim` writes: {"sites": [...], "strategies": {name: ...}}."""
        path = self.metrics_path()
        if not path.exists():
            run = self.procs.get(RUN)
            raise DeployError(f"the run ended without writing {path}; see {run.log_path if run else self.run_dir}")
        metrics = json.loads(path.read_text())
        combined = {"sites": list(self.topology.site_ids), "strategies": {self.topology.strategy: metrics},
                    "deployment": "local"}
        write_json(self.run_dir / "metrics.json", combined)
        return combined


def site_folders(data_dir: Path, n_sites: int) -> list[Path]:
    """The first n site folders (those holding a dataset.json) of a data folder, by name."""
    try:
        found = find_site_dirs(data_dir)
    except SiteDataError as exc:
        raise DeployError(str(exc)) from exc
    if len(found) < n_sites:
        raise DeployError(f"{data_dir} holds {len(found)} site folder(s) with a dataset.json; {n_sites} requested")
    return found[:n_sites]


def deploy_local(n_sites: int, run_dir: Path, data_dir: Path, insecure: bool = False,
                 run_config: str | Mapping[str, Any] | None = None, enrol: Iterable[str] | None = None,
                 timeout: float | None = None, echo: bool = False) -> dict[str, Any]:
    """Run one federation as local processes over loopback gRPC; return the combined metrics.

    data_dir holds one folder per site (those with a dataset.json; the first n_sites by name). `enrol` limits
    which sites' keys are registered (default: all); an unenrolled site's SuperNode is refused by the SuperLink."""
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = parse_run_config(run_config) if isinstance(run_config, str) or run_config is None else dict(run_config)
    sites = site_folders(Path(data_dir), n_sites)
    previous = _sigterm_as_interrupt()
    try:
        with LocalDeployment.prepare(sites, run_dir, secure=not insecure, overrides=overrides, echo=echo) as dep:
            dep.up(enrol)
            dep.submit()
            code = dep.wait_run(timeout)
            result = dep.collect()
            if code != 0:
                log.warning("flwr run exited with %d although metrics were written", code)
            return result
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, interrupt)


SOCKET_PATH_MAX = 100  # a Unix socket path longer than about 107 bytes cannot be bound
SHORT_PREFIX = "mome-workers-"


def _short_folder(folder: Path) -> str:
    """Where the workers' sockets go: under the run folder, or a fresh private folder in /tmp where that path would
    be too long for a socket."""
    if len(f"{folder}/site-a-long-name/worker.sock") <= SOCKET_PATH_MAX:
        return str(folder)
    return tempfile.mkdtemp(prefix=SHORT_PREFIX)


def _site_id(folder_name: str) -> str:
    """Each SuperNode is told its folder name as its site id: it must already be a valid one."""
    try:
        return check_site_id(folder_name)
    except ValueError as exc:
        raise DeployError(f"site folder {folder_name!r}: {exc}; rename the folder") from None
