"""One description of the deployed federation (coordinator + N sites): services, paths, ports, node configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mome.common.config import OUT_DIR_KEY, SITE_KEYS_KEY
from mome.common.sitedata import site_id
from mome.common.wire import SITE_ID_PATTERN
from mome.deploy.certs import CA_CERT, ENROLLED_SIGNING, SERVER_CERT, SERVER_KEY, SIGNING_KEY, SITE_KEY, SITE_PUBLIC_KEY

SUPERLINK = "superlink"  # compose service of the coordinator's SuperLink (also a name in its TLS certificate)
RUN = "run"  # one-shot service that submits the federation (`flwr run`) to the SuperLink
CLI_HOME = "cli"  # deploy-local's Flower home of the CLI (the run and the enrolments share its connection config)
WORKER, SUPEREXEC, ENROL, EXEC = "worker-", "superexec-", "enrol-", "exec-"  # + site id: its services, network
SERVICE_PREFIXES = (WORKER, SUPEREXEC, ENROL, EXEC)
CONNECTION = "coordinator"  # name of the SuperLink connection in the Flower CLI's config.toml
IMAGE = "mome-fl:0.1.0"
DEFAULT_DATA, DEFAULT_CERTS, DEFAULT_OUTPUTS = "./data", "./certs", "./runs/compose"
# What a process sees inside its container; local processes see the host paths themselves.
IN_CONTAINER = {"data": "/data", "site_out": "/site-out", "certs": "/certs", "outputs": "/outputs",
                "state": "/state", "app": "/app", "worker": "/run/mome"}
STATE_VOLUME = "superlink-state"
# Compose networks: sites reach the SuperLink only on FLEET (its Fleet API, the one port hospitals connect to).
FLEET_NETWORK = "fleet"
# The Control API (and the ServerApp's runtime API) listens on the SuperLink's loopback only: its clients (run,
# enrol-*) share the SuperLink's network namespace in compose (network_mode service:superlink), so no site can reach
# it on any network, and nothing publishes it on the host
CONTROL_NAMESPACE = "service:superlink"
IMAGE_UID = 10001  # the image's non-root user (Dockerfile `useradd --uid`)


@dataclass(frozen=True)
class Ports:
    """Ports of the SuperLink (fleet, control, health) and of each SuperNode (runtime API, health)."""

    fleet: int = 9092  # SuperNodes -> SuperLink: gRPC Fleet API (TLS); the only port hospitals connect to
    control: int = 9093  # coordinator CLI -> SuperLink: HTTPS Control API (also the ServerApp's runtime API)
    health: int = 9094  # SuperLink liveness: plain gRPC health service, carries no data
    node: tuple[tuple[int, int], ...] = ()  # per site (runtime API, health); empty: (9095, 9096) for every site

    def site(self, index: int) -> tuple[int, int]:
        return self.node[index] if self.node else (9095, 9096)


@dataclass(frozen=True)
class Confinement:
    """How each site's container is held in (compose only: deploy-local runs plain processes).

    Every value is a default that the host's .env can override (MOME_UID, MOME_SITE_MEMORY, ...)."""

    uid: int = IMAGE_UID  # MOME_UID/MOME_GID: set to the owner of the host's key and folders (key files are 0600)
    gid: int = IMAGE_UID
    memory: str = "8g"  # mem_limit per site (MOME_SITE_MEMORY); /tmp counts towards it
    cpus: str = "2"  # per site (MOME_SITE_CPUS); docker refuses a value above the host's core count
    tmp_size: str = "1g"  # the writable /tmp (tmpfs): Flower's installed app, HOME, caches

    @property
    def user(self) -> str:
        return f"${{MOME_UID:-{self.uid}}}:${{MOME_GID:-{self.gid}}}"


@dataclass(frozen=True)
class Mount:
    """A host path visible to a process at `target` (the same path when the process runs on the host)."""

    source: str
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class Service:
    """One process of the deployment: a compose service, or a local process of `mome deploy-local`."""

    name: str
    role: str  # superlink | enrol | site | run
    command: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    health: tuple[str, ...] | None = None  # a command that exits 0 while the process is alive
    site_id: str | None = None
    node_config: dict[str, str] | None = None
    networks: tuple[str, ...] = ()  # compose networks it joins (the local view has loopback only)


@dataclass(frozen=True)
class Topology:
    """The coordinator (SuperLink + ServerApp) and one SuperNode per site, with every path and port.

    `containers=True` is the compose view (processes see IN_CONTAINER paths, sources are host paths that may
    hold ${VAR:-default}); `containers=False` is the local view (processes see host paths, loopback only)."""

    site_ids: tuple[str, ...]
    data_dir: str = DEFAULT_DATA  # host folder holding one nnU-Net folder per site, named by site id
    certs_dir: str = DEFAULT_CERTS  # output of `mome certs`
    out_dir: str = DEFAULT_OUTPUTS  # coordinator outputs; site bundles under <strategy>/sites/<site-id>
    strategy: str = "mome"
    secure: bool = True
    containers: bool = True
    ports: Ports = Ports()
    state_dir: str = ""  # local view: SuperLink database and Flower homes ("" = <out_dir>)
    worker_root: str = ""  # local view: the workers' socket folders ("" = <state_dir>/workers; a socket path has
    # to stay under ~100 characters)
    confinement: Confinement = Confinement()

    @classmethod
    def build(cls, sites: int | Sequence[str], data_dir: str | Path = DEFAULT_DATA, **kwargs: Any) -> "Topology":
        """The sites by id, or N sites named like `mome synth` names its folders (site-a, site-b, ...)."""
        ids = tuple(site_id(i) for i in range(sites)) if isinstance(sites, int) else tuple(sites)
        if not ids:
            raise ValueError("a federation needs at least one site")
        if bad := [s for s in ids if not SITE_ID_PATTERN.fullmatch(s)]:
            raise ValueError(f"site id(s) {', '.join(map(repr, bad))} not of the form {SITE_ID_PATTERN.pattern}")
        if len(set(ids)) != len(ids):
            raise ValueError(f"a site id is named twice: {', '.join(ids)}")
        if taken := [s for s in ids if s in (SUPERLINK, RUN, CLI_HOME) or s.startswith(SERVICE_PREFIXES)]:
            raise ValueError(f"site id(s) {', '.join(taken)}: the name of a coordinator or site service; "
                             "choose another")
        return cls(ids, str(data_dir), **kwargs)

    @classmethod
    def for_compose(cls, sites: int | Sequence[str], data_dir: str = DEFAULT_DATA,
                    strategy: str = "mome") -> "Topology":
        """Host paths are overridable from an .env file: MOME_DATA, MOME_CERTS, MOME_OUTPUTS."""
        return cls.build(sites, f"${{MOME_DATA:-{data_dir}}}", certs_dir=f"${{MOME_CERTS:-{DEFAULT_CERTS}}}",
                         out_dir=f"${{MOME_OUTPUTS:-{DEFAULT_OUTPUTS}}}", strategy=strategy)

    # -- where things are -------------------------------------------------------------------
    def _see(self, key: str, host: str) -> str:
        return IN_CONTAINER[key] if self.containers else host

    def site_data(self, site: str) -> str:
        return f"{self.data_dir}/{site}"

    def site_out(self, site: str) -> str:
        """Where a site writes its own final model bundle (never sent anywhere)."""
        return f"{self.out_dir}/{self.strategy}/sites/{site}"

    def worker_dir(self, site: str) -> str:
        """The folder the site worker and its SuperExec (the relay) share: the worker's socket and token, nothing
        else (compose: a named volume per site, named like the worker)."""
        return self._see("worker", f"{self.worker_root or (self.state_dir or self.out_dir) + '/workers'}/{site}")

    def worker_socket(self, site: str) -> str:
        return f"unix://{self.worker_dir(site)}/worker.sock"

    def worker_token(self, site: str) -> str:
        return f"{self.worker_dir(site)}/worker.token"

    def cert(self, name: str) -> str:
        return f"{self.certs_dir}/{name}"

    def signing_key(self, site: str) -> str:
        return f"{self.certs_dir}/sites/{site}/{SIGNING_KEY}"

    def site_key(self, site: str, public: bool = False) -> str:
        return f"{self.certs_dir}/sites/{site}/{SITE_PUBLIC_KEY if public else SITE_KEY}"

    def flwr_home(self, name: str) -> str:
        """Each process gets its own Flower home (installed app bundles, CLI config)."""
        cli = name == RUN or name.startswith(ENROL)  # the Flower CLI: holds the connection config
        if self.containers:
            return "/flwr" if cli else f"/tmp/flwr-{name}"
        return f"{self.state_dir or self.out_dir}/flwr-home/{CLI_HOME if cli else name}"

    @property
    def superlink_host(self) -> str:
        return SUPERLINK if self.containers else "127.0.0.1"

    @property
    def bind(self) -> str:
        return "0.0.0.0" if self.containers else "127.0.0.1"

    # -- what runs --------------------------------------------------------------------------
    def node_config(self, site: str) -> dict[str, str]:
        """The SuperNode's --node-config: the site id and where its worker listens (read by client/relay.py, the
        coordinator's app at the site, which learns nothing else about the site)."""
        return {"site-id": site, "worker": self.worker_socket(site), "worker-token-file": self.worker_token(site)}

    def run_config(self) -> dict[str, Any]:
        """Run-config overrides the deployment itself sets: where the coordinator writes, how many sites."""
        signing = {SITE_KEYS_KEY: self._see("certs", self.certs_dir) + f"/{ENROLLED_SIGNING}"} if self.secure else {}
        return {OUT_DIR_KEY: self._see("outputs", self.out_dir), "start-sites": len(self.site_ids), **signing}

    def flower_config(self) -> str:
        """The Flower CLI's config.toml: how `flwr run` / `flwr supernode register` reach the SuperLink."""
        lines = ["# Flower CLI connection to the MoME SuperLink (written by mome; see docs/deployment.md)",
                 "[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.ports.control}"']
        if self.secure:
            lines.append(f'root-certificates = "{self._see("certs", self.certs_dir)}/{CA_CERT}"')
        else:
            lines.append("insecure = true")
        return "\n".join(lines) + "\n"

    def _env(self, name: str) -> dict[str, str]:
        env = {"FLWR_TELEMETRY_ENABLED": "0",  # nothing leaves a site but the protocol's own messages
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # the image/venv already holds the app
               "FLWR_HOME": self.flwr_home(name)}
        if self.containers:  # any MOME_UID may run the container: a HOME it can write even on a read-only root
            env["HOME"] = "/tmp"
        return env

    def _cert_mounts(self, *names: str) -> tuple[Mount, ...]:
        return tuple(Mount(self.cert(n), self._see("certs", self.certs_dir) + f"/{n}") for n in names)

    def superlink(self) -> Service:
        certs = self._see("certs", self.certs_dir)
        state = self._see("state", self.state_dir or self.out_dir)
        cmd = ["flower-superlink", "--fleet-api-address", f"{self.bind}:{self.ports.fleet}",
               "--host", "127.0.0.1", "--port", str(self.ports.control)]
        if self.secure:
            cmd += ["--ssl-ca-certfile", f"{certs}/{CA_CERT}", "--ssl-certfile", f"{certs}/{SERVER_CERT}",
                    "--ssl-keyfile", f"{certs}/{SERVER_KEY}", "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        cmd += ["--disable-runtime-dependency-installation", "--database", f"{state}/superlink.db",
                "--health-server-address", f"{self.bind}:{self.ports.health}"]
        mounts = self._cert_mounts(CA_CERT, SERVER_CERT, SERVER_KEY, ENROLLED_SIGNING) if self.secure else ()
        mounts += (Mount(self.out_dir, self._see("outputs", self.out_dir), read_only=False),)
        if self.containers:
            mounts += (Mount(STATE_VOLUME, IN_CONTAINER["state"], read_only=False),)
        return Service(SUPERLINK, "superlink", tuple(cmd), self._env(SUPERLINK), mounts,
                       _health(f"127.0.0.1:{self.ports.health}"), networks=(FLEET_NETWORK,))

    def site(self, index: int) -> Service:
        site = self.site_ids[index]
        runtime, health = self.ports.site(index)
        certs = self._see("certs", self.certs_dir)
        fleet = f"{self.superlink_host}:{self.ports.fleet}"
        if self.containers:  # a hospital's own machine points its service at the coordinator's public address
            fleet = f"${{MOME_SUPERLINK:-{fleet}}}"
        cmd = ["flower-supernode", "--superlink", fleet]
        mounts: tuple[Mount, ...] = ()  # no site data, no site outputs, no signing key: only the Flower node key
        if self.secure:
            key = f"{certs}/{SITE_KEY}" if self.containers else self.site_key(site)
            cmd += ["--root-certificates", f"{certs}/{CA_CERT}", "--auth-supernode-private-key", key]
            mounts += self._cert_mounts(CA_CERT) + (Mount(self.site_key(site), key),)
        else:
            cmd += ["--insecure"]
        config = self.node_config(site)
        # the coordinator's app runs in the SuperExec beside it (process isolation), not next to the node key
        cmd += ["--isolation", "process", "--host", self.bind, "--port", str(runtime),
                "--health-server-address", f"127.0.0.1:{health}", "--node-config", format_node_config(config)]
        return Service(site, "site", tuple(cmd), self._env(site), mounts, _health(f"127.0.0.1:{health}"),
                       site_id=site, node_config=config, networks=(FLEET_NETWORK, exec_network(site)))

    def superexec(self, index: int) -> Service:
        """Flower's SuperExec for one site: it starts the per-message `flwr-clientapp` processes that run the
        coordinator's app (the relay), with no data, no outputs and no key: only the worker's socket. It reaches
        its SuperNode's runtime API over a network of their own, and nothing else."""
        site = self.site_ids[index]
        host = site if self.containers else "127.0.0.1"
        cmd = ("flower-superexec", "--runtime-api-address", f"{host}:{self.ports.site(index)[0]}", "--insecure")
        return Service(superexec_name(site), "superexec", cmd, self._env(superexec_name(site)),
                       (self._worker_mount(site),), site_id=site, networks=(exec_network(site),))

    def worker(self, index: int) -> Service:
        """The site worker (`mome site serve`): the hospital's own installed code, the only process that opens the
        site's data (read-only) and writes its outputs; no network, only the socket the relay in its SuperExec uses."""
        site = self.site_ids[index]
        data, out = self._see("data", self.site_data(site)), self._see("site_out", self.site_out(site))
        cmd = ("mome", "site", "serve", "--data", data, "--site-id", site, "--out", out,
               "--listen", self.worker_socket(site), "--token-file", self.worker_token(site))
        mounts = (Mount(self.site_data(site), data), Mount(self.site_out(site), out, read_only=False),
                  self._worker_mount(site))
        if self.secure:  # it signs every reply with the site's own key; the SuperNode never holds this one
            key = f"{IN_CONTAINER['certs']}/{SIGNING_KEY}" if self.containers else self.signing_key(site)
            cmd += ("--signing-key", key)
            mounts += (Mount(self.signing_key(site), key),)
        return Service(worker_name(site), "worker", cmd, self._env(worker_name(site)), mounts,
                       _health(self.worker_socket(site)), site_id=site)

    def _worker_mount(self, site: str) -> Mount:
        source = worker_name(site) if self.containers else self.worker_dir(site)
        return Mount(source, self.worker_dir(site), read_only=False)

    def enrol(self, index: int) -> Service:
        """Coordinator side: register a site's public key so the SuperLink accepts that SuperNode."""
        site = self.site_ids[index]
        name = ENROL + site
        pub = f"{self._see('certs', self.certs_dir)}/{site}.pub" if self.containers else self.site_key(site, True)
        mounts = (Mount(self.site_key(site, public=True), pub),) + self._cert_mounts(CA_CERT)
        return Service(name, "enrol", ("flwr", "supernode", "register", pub, CONNECTION, "--name", site),
                       self._env(name), mounts + self._cli_config_mount(), site_id=site,
                       networks=(CONTROL_NAMESPACE,))

    def run(self, app: str | None = None, overrides: str | None = None) -> Service:
        """Submit the federation; `overrides` replaces the inline run config (e.g. a TOML file path)."""
        config = overrides or " ".join(f"{k}={_toml_value(v)}" for k, v in self.run_config().items())
        if self.containers and not overrides:  # the coordinator's own settings, from .env (e.g. a smaller budget)
            config += " ${MOME_RUN_CONFIG:-}"
        cmd = ("flwr", "run", app or IN_CONTAINER["app"], CONNECTION, "--stream", "--run-config", config)
        mounts = self._cert_mounts(CA_CERT) if self.secure else ()
        return Service(RUN, "run", cmd, self._env(RUN), mounts + self._cli_config_mount(),
                       networks=(CONTROL_NAMESPACE,))

    def _cli_config_mount(self) -> tuple[Mount, ...]:
        if not self.containers:
            return ()
        return (Mount(f"{self.certs_dir}/flwr/config.toml", "/flwr/config.toml"),)

    def services(self) -> list[Service]:
        """In start order: SuperLink, enrolments (secure only), site workers, sites, their SuperExecs, the run."""
        n = range(len(self.site_ids))
        enrol = [self.enrol(i) for i in n] if self.secure else []
        return [self.superlink(), *enrol, *(self.worker(i) for i in n), *(self.site(i) for i in n),
                *(self.superexec(i) for i in n), self.run()]


def worker_name(site: str) -> str:
    return WORKER + site


def superexec_name(site: str) -> str:
    return SUPEREXEC + site


def exec_network(site: str) -> str:
    """Compose network of one site's SuperNode and its SuperExec (the runtime API), which nothing else joins."""
    return EXEC + site


def format_node_config(config: Mapping[str, str]) -> str:
    """`--node-config 'k="v" ...'` as flower-supernode parses it (TOML values, space separated)."""
    for value in config.values():
        if '"' in str(value) or " " in str(value):
            raise ValueError(f"node config value {value!r} may not contain quotes or spaces")
    return " ".join(f"{k}={_toml_value(v)}" for k, v in config.items())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return f'"{value}"'


def _health(address: str) -> tuple[str, ...]:
    return ("mome", "health", "--address", address)
