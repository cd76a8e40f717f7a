"""The driver's pieces that need no cluster: flags, the node layout, the evidence that faults bit."""
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chaoslib import main  # noqa: E402


class Flags(unittest.TestCase):
    def test_nemesis_timing_and_every_fault(self):
        a = main.parse(["--seed", "1", "--duration", "10", "--quiet", "1,2", "--hold", "2.5,4",
                        "--require-every-fault"])
        self.assertEqual(a.nemesis_timing, {"quiet": (1.0, 2.0), "hold": (2.5, 4.0)})
        self.assertTrue(a.require_every_fault)
        self.assertIn("hot_leader", a.faults)
        self.assertIn("overlap", a.faults)
        self.assertEqual(a.skew, 10)

    def test_bad_timing_is_refused(self):
        for bad in (["--quiet", "3,1"], ["--hold", "x"], ["--hold", "-1,2"]):
            with self.assertRaises(SystemExit, msg=bad):
                main.parse(["--seed", "1", "--duration", "10"] + bad)


class Layout(unittest.TestCase):
    def test_two_lazyfs_nodes_even_on_three(self):
        lazy, small, skewed = main.layout(3)
        self.assertEqual(lazy, {1, 2})
        self.assertFalse(lazy & small)
        self.assertEqual(main.layout(5), ({1, 2}, {3}, {5}))


class Evidence(unittest.TestCase):
    def test_overlaps_steps_back_and_hot_hits_are_counted(self):
        entries = [
            {"nemesis": "power_loss", "phase": "start", "unsynced_dropped": {"1": {"bytes": 10}, "2": None}},
            {"nemesis": "power_loss", "phase": "start", "unsynced_dropped": {"1": {"bytes": 5}}},
            {"nemesis": "clock_skew", "phase": "start", "nodes": [3], "seconds": 10, "took_effect": True},
            {"nemesis": "clock_skew", "phase": "kill_leader", "nodes": [1]},
            {"nemesis": "clock_skew", "phase": "step", "nodes": [3], "seconds": -10, "took_effect": True},
            {"nemesis": "clock_skew", "phase": "step", "nodes": [3], "seconds": 0, "took_effect": False},
            {"nemesis": "hot_leader", "phase": "start", "nodes": [2]},
            {"nemesis": "overlap", "phase": "kill_leader", "nodes": [2]},
        ]
        d = main.fault_details(entries)
        self.assertEqual(d["power_loss_node_cuts"], 3)
        self.assertEqual(d["power_loss_unsynced_bytes_dropped"], 15)
        self.assertEqual(d["power_loss_of_two_nodes_at_once"], 1)
        self.assertEqual((d["clock_steps_seen"], d["clock_steps_back"]), (2, 1))
        self.assertEqual(d["clock_skew_leader_kills"], 1)
        self.assertEqual((d["hot_leader_hits"], d["overlap_leader_kills_while_split"]), (1, 1))

    def test_splits_and_moves_are_counted_by_how_they_were_hit(self):
        entries = [
            {"nemesis": "split", "phase": "kill_leader", "nodes": [1]},
            {"nemesis": "split", "phase": "end", "status": 200},
            {"nemesis": "move", "phase": "start", "group": 0},
            {"nemesis": "move", "phase": "isolate_target", "nodes": [3]},
            {"nemesis": "move", "phase": "end", "status": 200},
            {"nemesis": "move", "phase": "kill_leader", "nodes": [2]},
            {"nemesis": "move", "phase": "end", "status": 503},
            {"nemesis": "split", "phase": "power_loss_target", "nodes": [3], "unsynced_dropped": {"3": None}},
            {"nemesis": "move", "phase": "power_loss_target", "nodes": [3], "unsynced_dropped": {"3": None}},
        ]
        d = main.fault_details(entries)
        self.assertEqual((d["group_splits_answered"], d["group_splits_with_leader_killed"]), (1, 1))
        self.assertEqual(d["group_moves_answered"], 1)
        self.assertEqual((d["group_moves_with_leader_killed"], d["group_moves_with_target_isolated"]), (1, 1))
        self.assertEqual((d["group_splits_with_replica_power_loss"], d["group_moves_with_target_power_loss"]), (1, 1))


if __name__ == "__main__":
    unittest.main()
