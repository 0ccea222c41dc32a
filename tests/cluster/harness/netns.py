"""Network namespaces: the cluster's network, built from the kernel's own parts.

One *node* namespace holds a bridge; every pod gets its own namespace joined
to the bridge by a veth pair, so each pod has a private `lo` (its own
127.0.0.1, where sidecars meet) and a pod IP in 127.0.0.0/16 on `eth0`,
reachable from every other pod. Addresses in 127/8 normally never leave
`lo`: each namespace narrows the local route to 127.0.0.1 and sets
`route_localnet`, which lets 127.0.x.y travel over the veths and the bridge
(the same switch kube-proxy uses for NodePorts on localhost). Nothing is
changed in the machine's own namespace: the whole network disappears with the
namespaces.

The harness process stays in the machine's namespace and reaches into the
node namespace by creating sockets there (`socket_in`): `setns` switches only
the calling thread, and a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
# One file per live cluster, named by its prefix, holding the harness's pid.
OWNERS = Path("/run/lbcluster")
BRIDGE = "br0"
BRIDGE_MAC = "02:00:7f:00:ff:fe"
# Cluster addressing (all inside 127.0.0.0/16, private to the cluster's namespaces).
NODE_IP = "127.0.255.254"
POD_PREFIX = 16

T = TypeVar("T")


class NetnsError(RuntimeError):
    pass


def ip_batch(commands: Iterable[str], netns: str | None = None) -> None:
    """Runs `ip` commands in one process (`ip [-n NETNS] -batch`); NetnsError on failure."""
    text = "\n".join(commands) + "\n"
    where = ["-n", netns] if netns else []
    result = subprocess.run(
        ["ip", *where, "-batch", "-"], input=text, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise NetnsError(f"ip -batch failed: {result.stderr.strip()}\n{text}")


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def call_in(netns: str, fn: Callable[[], T]) -> T:
    """Calls `fn` with this thread in network namespace `netns`, then switches back."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(NETNS_DIR / netns, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            return fn()
        finally:
            _setns(own)
    finally:
        os.close(own)


def socket_in(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A new socket that lives in `netns` (usable from any thread)."""
    return call_in(netns, lambda: socket.socket(family, kind))


def set_sysctls(netns: str, values: dict[str, str]) -> None:
    """Writes /proc/sys entries as seen from `netns` (net.* is per namespace)."""

    def write() -> None:
        for key, value in values.items():
            Path("/proc/sys", *key.split(".")).write_text(value)

    call_in(netns, write)


def _localnet_sysctls(*interfaces: str) -> dict[str, str]:
    values = {
        "net.ipv4.conf.all.route_localnet": "1",
        "net.ipv4.conf.default.route_localnet": "1",
    }
    for name in interfaces:
        values[f"net.ipv4.conf.{name}.route_localnet"] = "1"
    return values


# 127.0.0.0/8 is "local" on lo by default: only 127.0.0.1 stays local.
_NARROW_LOCAL_ROUTE = (
    "route del local 127.0.0.0/8 dev lo table local",
    "route replace local 127.0.0.1 dev lo table local",
)


def existing() -> list[str]:
    return sorted(p.name for p in NETNS_DIR.glob("*")) if NETNS_DIR.is_dir() else []


def delete(netns: str) -> None:
    """Kills what still runs in `netns` and deletes it (no error if gone)."""
    if not (NETNS_DIR / netns).exists():
        return
    pids = subprocess.run(
        ["ip", "netns", "pids", netns], capture_output=True, text=True, check=False
    ).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    subprocess.run(["ip", "netns", "del", netns], capture_output=True, check=False)


class ClusterNetwork:
    """The node namespace with its bridge, and one namespace per pod."""

    def __init__(self, prefix: str) -> None:
        # Interface names are at most 15 characters: keep the prefix short.
        if len(prefix) > 6:
            raise ValueError(f"prefix {prefix!r} is longer than 6 characters")
        self.prefix = prefix
        self.node = f"{prefix}-node"
        self._pods: dict[str, str] = {}  # pod netns -> host veth name
        self._counter = 0

    def create(self) -> None:
        remove_stale_clusters()
        OWNERS.mkdir(parents=True, exist_ok=True)
        (OWNERS / self.prefix).write_text(str(os.getpid()))
        delete(self.node)
        subprocess.run(["ip", "netns", "add", self.node], check=True, capture_output=True)
        ip_batch(
            [
                "link set lo up",
                f"link add {BRIDGE} type bridge",
                # A fixed address: a bridge otherwise takes the lowest MAC of
                # its ports, which changes as pods come and go, and pods'
                # ARP entries for the node (DNS, Service IPs) go stale.
                f"link set {BRIDGE} address {BRIDGE_MAC}",
                f"link set {BRIDGE} up",
                *_NARROW_LOCAL_ROUTE,
            ],
            self.node,
        )
        set_sysctls(self.node, _localnet_sysctls(BRIDGE))
        ip_batch([f"addr add {NODE_IP}/{POD_PREFIX} dev {BRIDGE}"], self.node)

    def add_local_address(self, address: str) -> None:
        """An address the node itself answers on (Service IPs, DNS)."""
        ip_batch([f"addr add {address}/32 dev lo"], self.node)

    def add_pod(self, pod_ip: str) -> str:
        """A new pod namespace with `pod_ip` on eth0; returns its name."""
        self._counter += 1
        netns = f"{self.prefix}-p{self._counter}"
        veth = f"{self.prefix}v{self._counter}"
        delete(netns)
        subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
        ip_batch(
            [
                f"link add {veth} type veth peer name eth0 netns {netns}",
                f"link set {veth} netns {self.node}",
            ]
        )
        ip_batch([f"link set {veth} master {BRIDGE}", f"link set {veth} up"], self.node)
        ip_batch(["link set lo up", "link set eth0 up", *_NARROW_LOCAL_ROUTE], netns)
        set_sysctls(netns, _localnet_sysctls("eth0", "lo"))
        ip_batch([f"addr add {pod_ip}/{POD_PREFIX} dev eth0"], netns)
        self._pods[netns] = veth
        return netns

    def remove_pod(self, netns: str) -> None:
        self._pods.pop(netns, None)
        delete(netns)

    def close(self) -> None:
        for netns in list(self._pods):
            self.remove_pod(netns)
        delete(self.node)
        (OWNERS / self.prefix).unlink(missing_ok=True)


def remove_stale_clusters() -> None:
    """Deletes the namespaces of clusters whose harness process is gone (a
    test run that was killed): each cluster records its owner's pid."""
    if not OWNERS.is_dir():
        return
    for record in OWNERS.iterdir():
        try:
            os.kill(int(record.read_text()), 0)
            continue
        except (ProcessLookupError, ValueError):
            pass
        except PermissionError:
            continue
        for name in existing():
            if name.startswith(f"{record.name}-"):
                delete(name)
        record.unlink(missing_ok=True)
