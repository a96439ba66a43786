"""A flat pod network on one machine, as a kind node has: a network namespace per pod.

Each pod gets its own network namespace (its own ``lo``, so ``--host 0.0.0.0`` and fixed ports
such as Ray's 6379 or the operator's 8080 never collide) with a veth on one bridge; the bridge
has no uplink, so nothing here is reachable from off the machine. Service DNS names resolve
through one hosts file that every pod sees at /etc/hosts (bind-mounted in the pod's own mount
namespace), rewritten in place as Services and pods come and go. Needs root and iproute2.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

LOCALHOST = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n"
# The pod's start, in its own mount namespace: the cluster's /etc/hosts; an empty /tmp of its own (a
# container's, where Ray keeps its sessions and its current-cluster file), with the machine's paths
# under /tmp that the pod runs from (a checkout, a virtualenv) bound back; its working directory; exec.
POD_INIT = (
    'hosts=$1 side=$2 workdir=$3; shift 3; '
    'mount --bind "$hosts" /etc/hosts && mount --bind /tmp "$side" && mount -t tmpfs -o size=1g tmpfs /tmp || exit 125; '
    'while [ "$1" != -- ]; do mkdir -p "$1" && mount --bind "$side${1#/tmp}" "$1" || exit 125; shift; done; shift; '
    'mkdir -p "$workdir" && cd "$workdir" && exec "$@"')


def unavailable() -> str:
    """Why pods cannot run here ('' when they can)."""
    if os.geteuid() != 0:
        return "the process kubelet needs root (network and mount namespaces)"
    missing = [tool for tool in ("ip", "mount") if shutil.which(tool) is None]
    return f"the process kubelet needs {', '.join(missing)} (iproute2, util-linux)" if missing else ""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class PodNetwork:
    """One bridge ``djb<tag>`` with address <prefix>.1 (the node: the API server and S3 listen there)."""

    root: Path
    keep: tuple[str, ...] = ()  # the machine's paths under /tmp that pods need (bound into their own /tmp)
    tag: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    names: dict[str, str] = field(default_factory=dict)  # DNS name -> address
    _next: int = 2
    _pods: dict[str, str] = field(default_factory=dict)  # netns -> its veth on the bridge

    def __post_init__(self) -> None:
        self.prefix = f"10.{random.randrange(200, 250)}.{int(self.tag[:2], 16)}"
        self.node_ip = f"{self.prefix}.1"
        self.bridge = f"djb{self.tag}"
        self.hosts = self.root / "hosts"
        self.host_tmp = self.root / "host-tmp"  # where a pod still sees the machine's /tmp

    def up(self) -> "PodNetwork":
        self.host_tmp.mkdir(parents=True, exist_ok=True)
        (self.root / "owner").write_text(f"{os.getpid()} {self.tag}")
        self._write_hosts()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.node_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        return self

    def add_pod(self) -> tuple[str, str]:
        """A new network namespace wired to the bridge: (netns name, pod IP)."""
        if self._next > 254:
            raise RuntimeError("pod network exhausted (253 pods)")
        n, self._next = self._next, self._next + 1
        netns, veth, ip = f"djb-{self.tag}-{n}", f"djb{self.tag}v{n}", f"{self.prefix}.{n}"
        _ip("netns", "add", netns)
        self._pods[netns] = veth
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", netns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "route", "add", "default", "via", self.node_ip)
        return netns, ip

    def argv(self, netns: str, workdir: str, argv: list[str]) -> list[str]:
        """``argv`` run inside the pod: its network namespace, the cluster's hosts file, ``workdir``."""
        return ["ip", "netns", "exec", netns, "sh", "-c", POD_INIT, "pod-init", str(self.hosts), str(self.host_tmp),
                workdir, *self.keep, "--", *argv]

    def pids(self, netns: str) -> list[int]:
        """Every process of the pod (all of a process tree inherits the namespace: Ray's workers too)."""
        out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True, timeout=10)
        return [int(p) for p in out.stdout.split()]

    def signal_pod(self, netns: str, sig: int) -> int:
        pids = self.pids(netns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)

    def remove_pod(self, netns: str) -> None:
        """Kill whatever is left of the pod and delete its namespace (its veth goes with it)."""
        deadline = time.monotonic() + 10
        while self.signal_pod(netns, signal.SIGKILL) and time.monotonic() < deadline:
            time.sleep(0.05)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=10)
        # the kernel frees a namespace (and the veth's peer with it) lazily; the bridge side goes now
        subprocess.run(["ip", "link", "delete", self._pods.pop(netns)], capture_output=True, timeout=10)

    def set_names(self, names: dict[str, str]) -> None:
        """DNS name -> address, all of them (what cluster DNS answers now)."""
        self.names = dict(names)
        self._write_hosts()

    def _write_hosts(self) -> None:
        """In place: the pods' bind mounts hold this inode, so a rename would leave them the old file."""
        lines = LOCALHOST + "".join(f"{ip} {name}\n" for name, ip in sorted(self.names.items()))
        with open(self.hosts, "w") as f:
            f.write(lines)

    def down(self) -> None:
        for netns in list(self._pods):
            self.remove_pod(netns)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True, timeout=10)


def reap_abandoned(base: Path) -> None:
    """Pods and networks of harness runs whose process is gone (a killed test run) stop and go."""
    for owner in base.glob("djinn-cluster-*/owner"):
        pid, tag = owner.read_text().split()
        if Path(f"/proc/{pid}").exists():
            continue
        net = PodNetwork(owner.parent, tag=tag)
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        net._pods = {ns: f"djb{tag}v{ns.rsplit('-', 1)[1]}" for ns in re.findall(rf"^(djb-{tag}-\d+)", out, re.M)}
        net.down()
        shutil.rmtree(owner.parent, ignore_errors=True)


def service_names(name: str, namespace: str) -> list[str]:
    """What cluster DNS answers for a Service."""
    return [f"{name}.{namespace}", f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local"]
