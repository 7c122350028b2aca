"""docker-compose.yml rendered from the topology (with ${VAR:-default} host paths, as compose expands them)."""

from __future__ import annotations

import re
from typing import Any, Mapping

import yaml

from mome.deploy.topology import CONTROL_NAMESPACE, FLEET_NETWORK, IMAGE, STATE_VOLUME, SUPERLINK, Confinement, \
    Service, Topology, exec_network, worker_name

ENV_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def expand(text: str, env: Mapping[str, str] | None = None) -> str:
    """Resolve ${VAR:-default} as compose does (env first, then the default)."""
    env = env or {}
    return ENV_VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)


# -- docker-compose.yml ---------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Plain YAML (no &anchors for repeated values); commands as one-line [a, b] lists."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _flow_lists(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, str) for x in data) and sum(len(x) + 2 for x in data) < 90
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _flow_lists)


def _volumes(service: Service) -> list[str]:
    return [f"{m.source}:{m.target}{':ro' if m.read_only else ''}" for m in service.mounts]


def _confined(limits: Confinement, who: str = "SITE") -> dict[str, Any]:
    """A long-running container: read-only root, writable /tmp only (plus its mounts), no privileges, bounded
    (MOME_<who>_MEMORY, MOME_<who>_CPUS)."""
    return {"read_only": True, "tmpfs": [f"/tmp:size={limits.tmp_size},mode=1777"],
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges:true"],
            "mem_limit": f"${{MOME_{who}_MEMORY:-{limits.memory}}}", "cpus": f"${{MOME_{who}_CPUS:-{limits.cpus}}}"}


def compose_dict(top: Topology) -> dict[str, Any]:
    """The compose model of the topology (rendered to YAML by render_compose)."""
    if not top.containers or not top.secure:
        raise ValueError("the compose file describes the secure container deployment only")
    build = {"context": ".", "dockerfile": "Dockerfile"}
    healthy = {SUPERLINK: {"condition": "service_healthy"}}
    check = {"interval": "10s", "timeout": "5s", "retries": 5, "start_period": "20s"}
    services: dict[str, Any] = {}
    for svc in top.services():
        entry: dict[str, Any] = {"image": f"${{MOME_IMAGE:-{IMAGE}}}", "build": dict(build),
                                 "user": top.confinement.user,  # the image's non-root user, or the host's
                                 "command": list(svc.command), "environment": dict(svc.env),
                                 "volumes": _volumes(svc)}
        if svc.networks == (CONTROL_NAMESPACE,):  # the Control API's clients: the SuperLink's own loopback
            entry["network_mode"] = CONTROL_NAMESPACE
        else:
            entry.update({"networks": list(svc.networks)} if svc.networks else {"network_mode": "none"})
        if svc.health:
            entry["healthcheck"] = {"test": ["CMD", *svc.health], **check}
        if svc.role == "superlink":
            entry["ports"] = [f"${{MOME_FLEET_PORT:-{top.ports.fleet}}}:{top.ports.fleet}"]  # hospitals connect here
            entry["restart"] = "unless-stopped"
            entry.update(_confined(top.confinement, "COORDINATOR"))  # it runs the ServerApp: held in like a site
        elif svc.role == "site":
            entry["depends_on"] = {**healthy, worker_name(svc.site_id): {"condition": "service_healthy"}}
            entry["restart"] = "unless-stopped"  # also retries until the coordinator has enrolled the key
            entry.update(_confined(top.confinement))
        elif svc.role == "worker":  # the hospital's own process: no network at all, only its socket volume
            entry["restart"] = "unless-stopped"
            entry.update(_confined(top.confinement))
        elif svc.role == "superexec":  # runs the coordinator's app: its SuperNode's runtime API, the socket
            entry["depends_on"] = {svc.site_id: {"condition": "service_healthy"}}
            entry["restart"] = "unless-stopped"
            entry.update(_confined(top.confinement))
        else:  # enrol / run: one-shot coordinator commands
            entry["depends_on"] = dict(healthy)
            entry["restart"] = "no"
        services[svc.name] = entry
    # sites share only FLEET with the SuperLink; the Control API's clients (run, enrol-*) its network namespace
    volumes = {STATE_VOLUME: {}, **{worker_name(site): {} for site in top.site_ids}}
    # a SuperExec's network reaches its SuperNode only: `internal`, no route out of the host
    networks = {FLEET_NETWORK: {}, **{exec_network(s): {"internal": True} for s in top.site_ids}}
    return {"services": services, "networks": networks, "volumes": volumes}


def render_compose(top: Topology) -> str:
    """docker-compose.yml text; the committed file is this for Topology.for_compose(3, "./data")."""
    header = (f"# Generated by `mome compose --sites {len(top.site_ids)} --data {expand(top.data_dir)}` from "
              "deploy/topology.py: edit the topology, not this file.\n"
              "# Host paths: MOME_DATA (one folder per site), MOME_CERTS (`mome certs`), MOME_OUTPUTS; "
              "a hospital on its own machine\n"
              "# sets MOME_SUPERLINK=<coordinator>:9092. Containers run as MOME_UID:MOME_GID (default the image's "
              f"{top.confinement.uid}; uid 0 is refused),\n# who must read the 0600 keys and write MOME_OUTPUTS; sites "
              "are capped by MOME_SITE_MEMORY and MOME_SITE_CPUS,\n# the SuperLink by MOME_COORDINATOR_MEMORY and "
              "MOME_COORDINATOR_CPUS. MOME_RUN_CONFIG adds run-config\n# settings to the run (e.g. "
              "'warmup-rounds=2 size=32'). Set them in an .env file next to this one.\n")
    body = yaml.dump(compose_dict(top), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
    return header + body.replace("'no'", '"no"')
