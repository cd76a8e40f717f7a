"""Installs what the chaos suite needs when it is missing (Debian/Ubuntu, as root)."""
import os
import shutil
import subprocess
import sys

from .cluster import faketime_lib


def have_fusepy():
    for py in ("/usr/bin/python3", sys.executable):
        if not os.path.exists(py):
            continue
        r = subprocess.run([py, "-c", "import sys; sys.path.append('/usr/lib/python3/dist-packages')\n"
                                      "try:\n import fusepy\nexcept ImportError:\n import fuse"],
                           capture_output=True)
        if r.returncode == 0:
            return True
    return False


def ensure(need_faketime=True, need_fuse=True):
    if os.geteuid() != 0:
        sys.exit("chaos/run needs root (network namespaces, nft, mounts)")
    missing = []
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            missing.append(pkg)
    if need_faketime and faketime_lib() is None:
        missing += ["faketime", "libfaketime"]
    if need_fuse:
        if shutil.which("fusermount") is None and shutil.which("fusermount3") is None:
            missing.append("fuse3")
        if not have_fusepy():
            missing.append("python3-fusepy")
    if not missing:
        return
    print(f"chaos: installing {' '.join(missing)}", file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = subprocess.run(["apt-get", "install", "-y"] + missing, env=env, capture_output=True)
    if r.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y"] + missing, env=env, check=True, capture_output=True)
