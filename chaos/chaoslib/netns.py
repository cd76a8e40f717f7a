"""Network namespaces for a chaos run.

Topology: a hub namespace `kchaos-hub` holds a bridge `br0` (10.77.0.254/24); node i lives in
namespace `kchaos-n<i>` with `eth0` = 10.77.0.<i>, a veth into the bridge. The orchestrator
(workload, nemesis) moves itself into the hub namespace with setns(2) before it starts any
thread, so the host's firewall (e.g. Docker's FORWARD DROP with br_netfilter) never sees the
traffic and the host's network is never touched.

Partitions are nftables rules in the node namespaces (table `inet kchaos`): drops of input
from and/or output to other nodes' addresses, so they can be symmetric or one-way. Clients
(10.77.0.254) are never cut off.
"""
import ctypes
import os
import subprocess
import time

# Every name starts with PREFIX, so a test can build its own topology beside a run's.
PREFIX = "kchaos"
HUB = f"{PREFIX}-hub"
SUBNET = "10.77.0"
CLIENT_IP = f"{SUBNET}.254"
CLONE_NEWNET = 0x40000000


def ns_name(i):
    return f"{PREFIX}-n{i}"


def ip_of(i):
    return f"{SUBNET}.{i}"


def sh(*args, check=True, inp=None):
    r = subprocess.run(list(args), input=inp, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
    return r


def existing():
    r = sh("ip", "netns", "list", check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(f"{PREFIX}-")]


def teardown():
    for ns in existing():
        sh("ip", "netns", "del", ns, check=False)


def setup_hub():
    sh("ip", "netns", "add", HUB)
    sh("ip", "-n", HUB, "link", "set", "lo", "up")
    sh("ip", "-n", HUB, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", HUB, "addr", "add", f"{CLIENT_IP}/24", "dev", "br0")
    sh("ip", "-n", HUB, "link", "set", "br0", "up")


def hub_has_link(name):
    return sh("ip", "-n", HUB, "link", "show", name, check=False).returncode == 0


def add_node(i):
    """(Re)creates node i's namespace and its veth into the bridge.

    A node that joins again (the membership fault joins, removes and joins the same spare)
    finds its old namespace. Deleting a namespace frees its veth pair asynchronously, in the
    kernel's netns cleanup work, so the hub-side end `vn<i>` can outlive `ip netns del` for a
    moment and the new `link add` would answer "File exists". The hub end is deleted first,
    explicitly (that deletes the pair at once), and its absence is waited for with a deadline.
    """
    ns = ns_name(i)
    veth = f"vn{i}"
    if hub_has_link(veth):
        sh("ip", "-n", HUB, "link", "del", veth, check=False)
    if ns in existing():
        sh("ip", "netns", "del", ns, check=False)
    deadline = time.monotonic() + 10
    while hub_has_link(veth):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{veth} is still in {HUB} 10 s after it was deleted")
        time.sleep(0.05)
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", HUB, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "-n", HUB, "link", "set", veth, "master", "br0")
    sh("ip", "-n", HUB, "link", "set", veth, "up")
    sh("ip", "-n", ns, "addr", "add", f"{ip_of(i)}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")


def enter_hub():
    """Moves the calling thread (call before starting threads) into the hub namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{HUB}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the hub namespace")
    finally:
        os.close(fd)


def nft(i, script):
    return sh("ip", "netns", "exec", ns_name(i), "nft", "-f", "-", inp=script)


def block(i, drop_in_from=(), drop_out_to=()):
    """Replaces node i's chaos rules: drop input from / output to the given node ids."""
    rules = [f"table inet kchaos {{"]
    rules.append("  chain input { type filter hook input priority -10; policy accept;")
    if drop_in_from:
        rules.append("    ip saddr { " + ", ".join(ip_of(j) for j in drop_in_from) + " } drop")
    rules.append("  }")
    rules.append("  chain output { type filter hook output priority -10; policy accept;")
    if drop_out_to:
        rules.append("    ip daddr { " + ", ".join(ip_of(j) for j in drop_out_to) + " } drop")
    rules.append("  }")
    rules.append("}")
    clear(i)
    nft(i, "\n".join(rules) + "\n")


def clear(i):
    sh("ip", "netns", "exec", ns_name(i), "nft", "delete", "table", "inet", "kchaos", check=False)
