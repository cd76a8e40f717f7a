"""Seeds a fresh kubbi node for tests/schemathesis/run and writes the schemathesis config.

    python seed.py BASE_URL CONFIG_OUT

Reads the admin token and the API key from KUBBI_SCHEMATHESIS_ADMIN_TOKEN and
KUBBI_SCHEMATHESIS_API_KEY. Random claim tokens and ids only ever reach 404, so this creates
kubbis in every state (single text, JSON, CSV with a limit, a package with a base64 file;
burned, deleted, expired) and spare API keys, and hands their tokens and ids to schemathesis
as dictionaries: the consumer, detail, delete and revoke routes then reach their real answers.
Credentials stay out of the file: it refers to the environment variables.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request

BASE, OUT = sys.argv[1], sys.argv[2]
ADMIN = os.environ["KUBBI_SCHEMATHESIS_ADMIN_TOKEN"]
KEY = os.environ["KUBBI_SCHEMATHESIS_API_KEY"]


def call(method, path, body=None, token=None, expect=(200, 201)):
    headers = {}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    if status not in expect:
        sys.exit(f"seed: {method} {path} answered {status}: {raw[:300]!r}")
    return json.loads(raw) if raw else None


def create(body):
    return call("POST", "/api/v1/kubbis", body, KEY)


# Read by the consumer routes only: the detail/delete dictionary never names them.
tokens = [
    create({"content": "hello", "metadata": {"k": "v"}})["claim_token"],
    create({"content": {"a": [1, 2, {"b": None}], "s": "x"}, "content_type": "application/json"})["claim_token"],
    create({"content": "a,b\n1,2", "content_type": "text/csv", "max_retrievals": 1000})["claim_token"],
    create({"files": [
        {"name": "README.md", "content": "# hi", "content_type": "text/markdown", "role": "instructions"},
        {"name": "blob.bin", "content": "AJ+Slg==", "content_type": "application/octet-stream", "encoding": "base64"},
    ], "metadata": {"run": "schemathesis"}})["claim_token"],
]
ids = []
# Terminal: burned, deleted, expired (410 on the consumer routes, 409 on a delete).
burned = create({"content": "once", "max_retrievals": 1})
call("POST", f"/r/{burned['claim_token']}/claim")
deleted = create({"content": "gone"})
call("DELETE", f"/api/v1/kubbis/{deleted['id']}", token=KEY)
expired = create({"content": "short", "ttl_seconds": 1})
for k in (burned, deleted, expired):
    tokens.append(k["claim_token"])
    ids.append(k["id"])
# For the producer's detail and delete.
for body in (
    {"content": "d1", "metadata": {"n": 1}},
    {"content": [1, 2], "content_type": "application/json", "max_retrievals": 5},
    {"files": [{"name": "a.txt", "content": "a", "content_type": "text/plain"}]},
):
    ids.append(create(body)["id"])
# API keys the operator pass may revoke (never the one in use).
key_ids = [call("POST", "/admin/v1/api-keys", {"label": f"revoke-me-{i}"}, ADMIN)["id"] for i in (1, 2)]
time.sleep(1.2)  # the ttl_seconds=1 kubbi expires

CONFIG = f"""\
# Written by tests/schemathesis/seed.py. Each security scheme gets its own credential, from the
# environment: producer routes the API key, /admin/v1/* the admin token.
[auth.openapi.apiKey]
bearer = "${{KUBBI_SCHEMATHESIS_API_KEY}}"

[auth.openapi.adminToken]
bearer = "${{KUBBI_SCHEMATHESIS_ADMIN_TOKEN}}"

[dictionaries.tokens]
values = {json.dumps(tokens)}

[dictionaries.kubbi_ids]
values = {json.dumps(ids)}

[dictionaries.key_ids]
values = {json.dumps(key_ids)}

[dictionaries.node_ids]
values = [1, 2]

[dictionaries.internal_addrs]
values = ["127.0.0.1:1", "[::1]:2", "kubbi-2.internal:7001"]

[parameters]
"path.token" = {{ dictionary = "tokens", probability = 0.7 }}

[[operations]]
include-operation-id = ["getKubbi", "deleteKubbi"]
parameters = {{ "path.id" = {{ dictionary = "kubbi_ids", probability = 0.7 }} }}

[[operations]]
include-operation-id = "revokeApiKey"
parameters = {{ "path.id" = {{ dictionary = "key_ids", probability = 0.5 }} }}

[[operations]]
include-operation-id = "addNode"
parameters = {{ "body.internal" = {{ dictionary = "internal_addrs", probability = 0.5 }} }}

[[operations]]
include-operation-id = "removeNode"
parameters = {{ "path.id" = {{ dictionary = "node_ids", probability = 0.2 }} }}
"""
with open(OUT, "w", encoding="utf-8") as f:
    f.write(CONFIG)
print(f"seeded {len(tokens)} claim tokens, {len(ids)} kubbi ids, {len(key_ids)} spare API keys")
