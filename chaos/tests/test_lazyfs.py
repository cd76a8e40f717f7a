"""lazyfs drops exactly the bytes that were not fsync'd when its daemon dies (root + FUSE only)."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from chaoslib.cluster import fusermount  # noqa: E402
from chaoslib.deps import have_fusepy  # noqa: E402

LAZYFS = os.path.join(HERE, "..", "chaoslib", "lazyfs.py")
CAN = os.geteuid() == 0 and os.path.exists("/dev/fuse") and have_fusepy()


def wait_for(pred, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@unittest.skipUnless(CAN, "needs root, /dev/fuse and fusepy")
class LazyFSTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.backing = os.path.join(self.tmp, "b")
        self.mnt = os.path.join(self.tmp, "m")
        os.makedirs(self.backing)
        os.makedirs(self.mnt)
        self.proc = None
        self.mount()

    def mount(self):
        py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        self.proc = subprocess.Popen([py, LAZYFS, self.backing, self.mnt], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: os.path.ismount(self.mnt), 10, "lazyfs mount")

    def power_cut(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        subprocess.run([fusermount(), "-uz", self.mnt], capture_output=True)
        wait_for(lambda: not os.path.ismount(self.mnt), 5, "unmount")

    def tearDown(self):
        if self.proc and self.proc.poll() is None:
            self.power_cut()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def test_unsynced_bytes_are_lost_synced_bytes_survive(self):
        p = os.path.join(self.mnt, "wal")
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"durable;")
        os.fdatasync(fd)
        os.write(fd, b"volatile")
        os.close(fd)
        with open(p, "rb") as f:
            self.assertEqual(f.read(), b"durable;volatile", "readers see unsynced bytes before the cut")
        self.power_cut()
        self.mount()
        with open(p, "rb") as f:
            self.assertEqual(f.read(), b"durable;")

    def test_rename_carries_pending_bytes_and_truncate(self):
        a, b = os.path.join(self.mnt, "tmp"), os.path.join(self.mnt, "CURRENT")
        with open(a, "wb") as f:
            f.write(b"0123456789")
        os.rename(a, b)
        os.truncate(b, 4)
        with open(b, "rb") as f:
            self.assertEqual(f.read(), b"0123")
        fd = os.open(b, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
        self.power_cut()
        self.mount()
        with open(b, "rb") as f:
            self.assertEqual(f.read(), b"0123")


if __name__ == "__main__":
    unittest.main()
