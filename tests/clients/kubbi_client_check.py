"""Drives the published Python client `kubbi` 0.1.0, unchanged, against a kubbi node.

Usage: python kubbi_client_check.py BASE_URL API_KEY
Exits non-zero (with a traceback) on the first mismatch.
"""
import base64
import os
import sys

import kubbi
from kubbi import KubbiClient

base, key = sys.argv[1], sys.argv[2]
client = KubbiClient(api_key=key, base_url=base)


def record(kind, value):
    """Records a secret for scripts/scan-test-logs when the test asks for it."""
    path = os.environ.get("KUBBI_TEST_SECRETS")
    if path:
        if isinstance(value, str):
            value = value.encode()
        with open(path, "a") as f:
            f.write(f"{kind} {value.hex()}\n")


record("payload", "db-password-123")

# send + inspect + claim (burn after read)
sent = client.send(content="db-password-123", content_type="text/plain", ttl_seconds=300, max_retrievals=1,
                   metadata={"from": "agent-a"})
assert sent.status == "active" and sent.content_type == "text/plain", sent
assert sent.claim_url == f"{base}/r/{sent.claim_token}", sent.claim_url
record("claim-token", sent.claim_token)
info = kubbi.inspect(sent.claim_url)
assert info.status == "active" and info.retrieval_count == 0 and not info.is_package, info
assert info.metadata == {"from": "agent-a"}, info
got = kubbi.claim(sent.claim_url)
assert got.content == "db-password-123" and got.content_type == "text/plain", got
try:
    kubbi.claim(sent.claim_url)
    raise AssertionError("second claim succeeded")
except kubbi.KubbiGoneError:
    pass

# JSON content
sent = client.send(content={"rows": 3, "ok": True}, content_type="application/json", ttl_seconds=600)
record("claim-token", sent.claim_token)
assert kubbi.claim(sent.claim_token, base_url=base).content == {"rows": 3, "ok": True}

# send_files + inspect + claim
binary = bytes(range(256)) * 4
record("payload", binary)
record("payload", base64.b64encode(binary))
pkg = client.send_files(
    files=[
        {"name": "config.json", "content": '{"a":1}', "content_type": "application/json", "role": "config"},
        {"name": "artifact.bin", "content": base64.b64encode(binary).decode(), "content_type": "application/octet-stream",
         "encoding": "base64", "role": "attachment"},
    ],
    ttl_seconds=900,
    max_retrievals=2,
)
record("claim-token", pkg.claim_token)
assert pkg.file_count == 2 and pkg.total_size_bytes == 7 + 1024, pkg
info = kubbi.inspect(pkg.claim_url)
assert info.is_package and [f.name for f in info.files] == ["config.json", "artifact.bin"], info
assert info.remaining_reads == 2, info
got = kubbi.claim(pkg.claim_url)
assert got.is_package and got.file_count == 2, got
assert got.files[0].content == '{"a":1}' and got.files[0].encoding is None
assert got.files[1].encoding == "base64" and base64.b64decode(got.files[1].content) == binary

# get / list / delete
detail = client.get(pkg.id)
assert detail.status == "active" and detail.retrieval_count == 1 and detail.file_count == 2, detail
page = client.list(page=1, limit=2)
assert page.pagination.total == 3 and page.pagination.limit == 2 and len(page.kubbis) == 2, page
assert page.kubbis[0].id == pkg.id, "newest first"
deleted = client.delete(pkg.id)
assert deleted["status"] == "deleted", deleted
try:
    kubbi.claim(pkg.claim_url)
    raise AssertionError("claim after delete succeeded")
except kubbi.KubbiGoneError:
    pass
try:
    client.get("00000000-0000-4000-8000-000000000000")
    raise AssertionError("unknown id found")
except kubbi.KubbiNotFoundError:
    pass
try:
    client.send(content="x", content_type="text/plain", ttl_seconds=0)
    raise AssertionError("ttl 0 accepted")
except kubbi.KubbiValidationError as e:
    assert any("ttl_seconds" in m for m in e.messages), e.messages
try:
    KubbiClient(api_key="kb_wrong", base_url=base).list()
    raise AssertionError("bad key accepted")
except kubbi.KubbiAuthenticationError:
    pass
print("python client ok")
