"""The namespace topology, built for real (needs root and iproute2), under its own prefix so a
chaos run on the same machine is not touched."""
import os
import shutil
import subprocess
import unittest

from chaoslib import netns

CAN = os.geteuid() == 0 and shutil.which("ip") is not None


@unittest.skipUnless(CAN, "needs root and iproute2")
class NodeNamespaces(unittest.TestCase):
    def setUp(self):
        self.saved = (netns.PREFIX, netns.HUB)
        netns.PREFIX = f"kctest{os.getpid()}"
        netns.HUB = f"{netns.PREFIX}-hub"
        netns.teardown()
        netns.setup_hub()

    def tearDown(self):
        netns.teardown()
        netns.PREFIX, netns.HUB = self.saved

    def link_state(self, i):
        out = subprocess.run(["ip", "-n", netns.ns_name(i), "-o", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True)
        return out.returncode, out.stdout

    def test_a_node_added_again_at_once_gets_a_fresh_link(self):
        # The membership fault joins a spare, removes it and joins it again: its namespace is
        # recreated while the old veth pair may still be being freed by the kernel.
        for _ in range(5):
            netns.add_node(7)
            rc, out = self.link_state(7)
            self.assertEqual(rc, 0)
            self.assertIn(f"{netns.ip_of(7)}/24", out)
            self.assertTrue(netns.hub_has_link("vn7"))
        self.assertEqual(sorted(netns.existing()), sorted([netns.HUB, netns.ns_name(7)]))


if __name__ == "__main__":
    unittest.main()
