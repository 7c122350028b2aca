"""Processes a local deployment starts: free ports, console scripts, process trees, stopping them."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import psutil

log = logging.getLogger("mome.deploy")
REFUSED = "Exit Code: 305"  # flower-supernode logs this (and exits non-zero) when the SuperLink refuses its key


class DeployError(RuntimeError):
    """A deployment step failed; the message names the process and its log."""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on loopback (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def entry_point(name: str) -> str:
    """A console script of this environment (the venv's bin first), as the compose image has it on PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise DeployError(f"{name} is not installed in this environment ({sys.executable})")
    return found


def descendants(pid: int) -> list[int]:
    """Every process below pid. Flower's SuperExec children start their own sessions, so a process group
    alone misses them."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False


def _signal(pids: Iterable[int], sig: int) -> None:
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups:  # groups of processes we started (each began its own session), never ours
        if group != os.getpgrp():
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_tree(popen: subprocess.Popen, grace: float = 5.0, sig: int = signal.SIGTERM) -> None:
    """Stop a process we started and everything it started: sig, then SIGKILL after `grace` seconds."""
    pids = [popen.pid, *descendants(popen.pid)]
    _signal(pids, sig)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        popen.poll()
        pids = list(dict.fromkeys([*pids, *(d for p in pids if alive(p) for d in descendants(p))]))
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.1)
    left = [p for p in pids if alive(p)]
    if left:
        _signal(left, signal.SIGKILL)
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("process %d did not exit after SIGKILL", popen.pid)


@dataclass
class Proc:
    """One process this deployment started, and where its output goes."""

    name: str
    popen: subprocess.Popen
    log_path: Path
    argv: list[str]
    stopped_by_us: bool = False
    echo_thread: threading.Thread | None = None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    @property
    def refused(self) -> bool:
        """A SuperNode that the SuperLink would not activate (unenrolled or wrong key)."""
        return bool(self.returncode) and REFUSED in self.log_path.read_text(errors="replace")

    def summary(self) -> dict[str, Any]:
        return {"pid": self.popen.pid, "argv": self.argv, "log": str(self.log_path), "exit_code": self.returncode,
                "stopped_by_deploy": self.stopped_by_us}


def tee(popen: subprocess.Popen, out, echo: bool) -> None:
    """Copy a process's output to its log (and to our stdout when echo)."""
    with out:
        for line in iter(popen.stdout.readline, b""):
            out.write(line)
            out.flush()
            if echo:
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()
