"""The workload's byte hashes agree between what it sends and what a claim returns."""
import base64
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from chaoslib.workload import content_hash_files, content_hash_single, hash_claim_body  # noqa: E402


class HashTest(unittest.TestCase):
    def test_single(self):
        self.assertEqual(hash_claim_body({"content": "abc", "content_type": "text/plain"}), content_hash_single("abc"))
        self.assertNotEqual(hash_claim_body({"content": "abd"}), content_hash_single("abc"))

    def test_package_text_and_base64(self):
        raw = bytes(range(256))
        body = {"type": "kubbi_package", "files": [
            {"name": "a.txt", "content": "hello", "encoding": None},
            {"name": "b.bin", "content": base64.b64encode(raw).decode(), "encoding": "base64"}]}
        self.assertEqual(hash_claim_body(body), content_hash_files([("a.txt", b"hello"), ("b.bin", raw)]))
        # A text file returned base64-encoded still hashes to the same bytes.
        body["files"][0] = {"name": "a.txt", "content": base64.b64encode(b"hello").decode(), "encoding": "base64"}
        self.assertEqual(hash_claim_body(body), content_hash_files([("a.txt", b"hello"), ("b.bin", raw)]))
        body["files"][1]["content"] = base64.b64encode(raw[:-1]).decode()
        self.assertNotEqual(hash_claim_body(body), content_hash_files([("a.txt", b"hello"), ("b.bin", raw)]))


if __name__ == "__main__":
    unittest.main()
