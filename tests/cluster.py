"""Test servers started and stopped by the tests themselves: an S3-compatible server (moto) and a
two-node Ray cluster on this machine, with token authentication.

Both are stopped by the process ids started here, never by name (`ray stop` would stop every Ray on
the machine, other users' included).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """An S3-compatible server (moto) on 127.0.0.1; yields the environment a client needs to reach it.

    The environment is the standard one (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL,
    AWS_DEFAULT_REGION) that boto3, s3fs and pyarrow read.
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield {
            **S3_CREDENTIALS,
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        server.stop()


def process_tree(pid: int) -> list[psutil.Process]:
    """The process `pid` and all its descendants (those still alive)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, grace: float = 0.0) -> None:
    """Stop `pid` and every descendant: SIGTERM, `grace` seconds, then SIGKILL (SIGKILL at once if 0)."""
    processes = process_tree(pid)
    if grace > 0:
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGTERM)
        _, processes = psutil.wait_procs(processes, timeout=grace)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=10)


@dataclass
class RayNode:
    """One `ray start --block` process; its children are the node's raylet, agents and workers."""

    name: str
    process: subprocess.Popen
    log: Path

    def tree(self) -> list[psutil.Process]:
        return process_tree(self.process.pid)

    def actor_pids(self, class_name: str, busy: bool = False) -> list[int]:
        """Worker processes of this node whose title names `class_name` (Ray titles an actor's worker
        `ray::ClassName...`, and `ray::ClassName...).method` while it runs a method); with `busy`, only
        those running a method other than the constructor now."""
        found = []
        for process in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                title = " ".join(process.cmdline())
                method = title.rsplit(")", 1)[-1]
                running = method.startswith(".") and method != ".__init__"
                if title.startswith("ray::") and class_name in title and (running or not busy):
                    found.append(process.pid)
        return found

    def kill(self) -> None:
        """SIGKILL the node's whole process tree at once, as a lost machine would vanish."""
        kill_tree(self.process.pid)

    def stop(self) -> None:
        kill_tree(self.process.pid, grace=5.0)


@dataclass
class TwoNodeCluster:
    """A head node and a worker node on this machine, token authentication on.

    Attributes:
        address: the GCS address (host:port) a driver passes to ray.init / `inversa run --address`.
        env: the environment of every process that joins it (token, temp dir, PYTHONPATH).
    """

    address: str
    env: dict[str, str]
    head: RayNode
    worker: RayNode
    temp_dir: Path


def _terminate_with_parent() -> None:
    """In the child before exec: SIGTERM when the test process dies, even by SIGKILL (Linux), so that
    `ray start --block` stops its node instead of outliving the tests."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _ray_start(name: str, arguments: list[str], env: dict[str, str], log: Path) -> RayNode:
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *arguments]
    with log.open("w") as handle:
        process = subprocess.Popen(
            command, env=env, stdout=handle, stderr=subprocess.STDOUT, preexec_fn=_terminate_with_parent
        )
    return RayNode(name, process, log)


def _node_ports() -> list[str]:
    """Ports of one node's own servers, each free, so two nodes on one machine do not collide."""
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--object-store-memory={300 * 2**20}",
    ]


def _wait_for_nodes(env: dict[str, str], address: str, nodes: list[RayNode], timeout: float) -> None:
    """Wait until the cluster at `address` has all `nodes` alive (asked from a fresh process)."""
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(node['Alive'] for node in ray.nodes()))"
    )
    count = len(nodes)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if node.process.poll() is not None:
                raise RuntimeError(
                    f"ray start of the {node.name} node failed:\n{node.log.read_text()[-3000:]}"
                )
        result = subprocess.run(
            [sys.executable, "-c", probe, address], env=env, capture_output=True, text=True, timeout=60
        )
        if result.returncode == 0 and result.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2.0)
    raise TimeoutError(f"the cluster at {address} did not reach {count} nodes in {timeout:.0f} s")


def generate_token(folder: Path) -> Path:
    """A fresh auth token from `ray get-auth-token --generate`, written under `folder`.

    HOME points into `folder`, so the command writes its token there instead of ~/.ray/auth_token.
    """
    env = {**os.environ, "HOME": str(folder)}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
        env=env,
        check=True,
        capture_output=True,
    )
    path = folder / ".ray" / "auth_token"
    assert path.read_text().strip(), "ray get-auth-token --generate wrote no token"
    return path


@contextlib.contextmanager
def two_node_cluster(
    folder: Path,
    *,
    head_cpus: int = 2,
    worker_cpus: int = 2,
    head_resources: dict[str, float] | None = None,
    worker_resources: dict[str, float] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[TwoNodeCluster]:
    """Start a head and a worker node (`ray start --block`), yield the cluster, stop both by pid.

    Args:
        folder: a fresh folder for the token and the nodes' logs.
        head_cpus / worker_cpus: logical CPUs of each node.
        head_resources / worker_resources: custom resources of each node.
        extra_env: more environment for the nodes (e.g. Ray system settings).
    """
    token = generate_token(folder)
    # Ray's own folder: short (its socket paths must fit 107 bytes) and not /tmp/ray, so that the
    # cluster's address file stays away from a bare ray.init() of anyone else on this machine.
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    port = free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    try:
        nodes.append(
            _ray_start(
                "head",
                [
                    "--head",
                    "--node-ip-address=127.0.0.1",
                    f"--port={port}",
                    f"--ray-client-server-port={free_port()}",
                    f"--num-cpus={head_cpus}",
                    f"--resources={json.dumps(head_resources or {})}",
                    "--include-dashboard=false",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={free_port()}",  # a headless dashboard still starts, on 8265 by default
                    f"--temp-dir={temp_dir}",
                    "--disable-usage-stats",
                    *_node_ports(),
                ],
                env,
                folder / "head.log",
            )
        )
        _wait_for_nodes(env, address, nodes, timeout=90)
        nodes.append(
            _ray_start(
                "worker",
                [
                    f"--address={address}",
                    "--node-ip-address=127.0.0.1",
                    f"--num-cpus={worker_cpus}",
                    f"--resources={json.dumps(worker_resources or {})}",
                    f"--temp-dir={temp_dir}",
                    *_node_ports(),
                ],
                env,
                folder / "worker.log",
            )
        )
        _wait_for_nodes(env, address, nodes, timeout=90)
        yield TwoNodeCluster(address, env, nodes[0], nodes[1], temp_dir)
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
