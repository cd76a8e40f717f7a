//! The OpenAPI 3.1 document of the public API, built from the same route table that builds the
//! router ([`super::ROUTES`]): every route has an operation here by construction (the match in
//! [`operation`] is exhaustive over [`Handler`]).

use serde_json::{Map, Value, json};

use super::Handler;

fn err(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok(desc: &str, schema: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}})
}

fn token_param() -> Value {
    json!({"name": "token", "in": "path", "required": true, "description": "The claim token from the claim URL.",
           "schema": {"type": "string", "minLength": 46, "maxLength": 46, "pattern": "^[A-Za-z0-9_-]{46}$"}})
}

fn id_param(what: &str) -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": format!("The {what}'s id."),
           "schema": {"type": "string", "format": "uuid"}})
}

fn idem_header() -> Value {
    json!({"name": "Idempotency-Key", "in": "header", "required": false,
           "description": "Retries with the same key get the first result and count once.",
           "schema": {"type": "string", "minLength": 1, "maxLength": 255}})
}

fn common_errors(op: &mut Value, codes: &[(&str, &str)]) {
    let responses = op["responses"]
        .as_object_mut()
        .map(std::mem::take)
        .unwrap_or_default();
    let mut r: Map<String, Value> = responses;
    for (code, desc) in codes {
        r.insert((*code).to_string(), err(desc));
    }
    // Per-client limits run before routing: any operation can answer 429.
    r.insert(
        "429".into(),
        err("rate_limited: too many requests or failed authentications from this client address; see Retry-After"),
    );
    r.insert("500".into(), err("internal_error"));
    op["responses"] = Value::Object(r);
}

/// The operation object of one route.
pub fn operation(h: Handler) -> Value {
    let producer = json!([{"apiKey": []}]);
    let admin = json!([{"adminToken": []}]);
    let mut op = match h {
        Handler::Create => json!({
            "operationId": "createKubbi", "tags": ["producer"], "summary": "Create a kubbi (single content or package)",
            "security": producer, "parameters": [idem_header()],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CreateRequest"}}}},
            "responses": {"201": ok("Created; the claim URL and token are shown only here", "Created")}}),
        Handler::List => json!({
            "operationId": "listKubbis", "tags": ["producer"], "summary": "List own kubbis, newest first", "security": producer,
            "parameters": [
                {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000000, "default": 1}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
                {"name": "status", "in": "query", "schema": {"$ref": "#/components/schemas/Status"}}],
            "responses": {"200": ok("A page of kubbis", "List")}}),
        Handler::Detail => json!({
            "operationId": "getKubbi", "tags": ["producer"], "summary": "One own kubbi", "security": producer,
            "parameters": [id_param("kubbi")], "responses": {"200": ok("The kubbi", "Detail")}}),
        Handler::Delete => json!({
            "operationId": "deleteKubbi", "tags": ["producer"], "summary": "Delete an active kubbi; its payload is wiped at once",
            "security": producer, "parameters": [id_param("kubbi")], "responses": {"200": ok("Deleted", "Detail")}}),
        Handler::Preview => json!({
            "operationId": "previewKubbi", "tags": ["consumer"], "summary": "What is waiting (never consumes); HTML for browsers",
            "parameters": [token_param()],
            "responses": {"200": {"description": "The preview", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Preview"}},
                "text/html": {"schema": {"type": "string"}}}}}}),
        Handler::Inspect => json!({
            "operationId": "inspectKubbi", "tags": ["consumer"], "summary": "The preview without the claim hint",
            "parameters": [token_param()], "responses": {"200": ok("The preview", "Preview")}}),
        Handler::Claim => json!({
            "operationId": "claimKubbi", "tags": ["consumer"], "summary": "Claim one retrieval; the last allowed one burns the payload",
            "parameters": [token_param(), idem_header()],
            "responses": {"200": {"description": "The payload", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/Claim"}},
                "text/html": {"schema": {"type": "string"}}}}}}),
        Handler::Health => json!({
            "operationId": "health", "tags": ["operations"], "summary": "Whether this node can serve",
            "responses": {"200": ok("ok", "Health"), "503": ok("degraded", "Health")}}),
        Handler::Live => json!({
            "operationId": "live", "tags": ["operations"], "summary": "The process is up",
            "responses": {"200": ok("ok", "Liveness")}}),
        Handler::Ready => json!({
            "operationId": "ready", "tags": ["operations"], "summary": "Every group this node needs has a leader",
            "responses": {"200": ok("ready", "Liveness"), "503": err("unavailable")}}),
        Handler::Metrics => json!({
            "operationId": "metrics", "tags": ["operations"], "summary": "Prometheus metrics",
            "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}}),
        Handler::OpenApi => json!({
            "operationId": "openapi", "tags": ["operations"], "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}),
        Handler::KeyCreate => json!({
            "operationId": "createApiKey", "tags": ["operator"], "summary": "Create an API key (shown once)", "security": admin,
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ApiKeyRequest"}}}},
            "responses": {"201": ok("The new key", "ApiKeyCreated")}}),
        Handler::KeyList => json!({
            "operationId": "listApiKeys", "tags": ["operator"], "summary": "API keys (never the keys)", "security": admin,
            "responses": {"200": ok("Keys", "ApiKeyList")}}),
        Handler::KeyRevoke => json!({
            "operationId": "revokeApiKey", "tags": ["operator"], "summary": "Revoke an API key", "security": admin,
            "parameters": [id_param("API key")], "responses": {"200": ok("Revoked", "ApiKey")}}),
        Handler::Cluster => json!({
            "operationId": "clusterStatus", "tags": ["operator"], "summary": "Nodes, raft groups (with the logical shard ranges each serves), leaders, replicas, lag", "security": admin,
            "responses": {"200": ok("The cluster", "Cluster")}}),
        Handler::Digest => json!({
            "operationId": "replicaDigest", "tags": ["operator"], "summary": "This node's replicas: applied index and state digest (local, not forwarded)", "security": admin,
            "responses": {"200": ok("This node's replicas", "Digest")}}),
        Handler::NodeAdd => json!({
            "operationId": "addNode", "tags": ["operator"], "summary": "Pre-register a node", "security": admin,
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeRequest"}}}},
            "responses": {"201": ok("Registered", "NodeState")}}),
        Handler::NodeRemove => json!({
            "operationId": "removeNode", "tags": ["operator"], "summary": "Drain and retire a node", "security": admin,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 1}}],
            "responses": {"200": ok("Leaving", "NodeState")}}),
        Handler::GroupSplit => json!({
            "operationId": "splitGroup", "tags": ["operator"],
            "summary": "Split a data group online: [at, end) of its range holding `at`, or the upper half of its widest range, moves to a new group on the same replicas; answers once the new group serves it",
            "security": admin,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 0, "maximum": 65533}}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SplitRequest"}}}},
            "responses": {"200": ok("Split", "SplitDone")}}),
        Handler::GroupMove => json!({
            "operationId": "moveGroup", "tags": ["operator"],
            "summary": "Place a data group on the given nodes (its leader first, or `leader`) and pin it there: the rebalancer then only replaces a replica whose node leaves; answers once the group has those voters and leader. `{\"auto\": true}` gives the group back to the rebalancer",
            "security": admin,
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "integer", "minimum": 0, "maximum": 65533}}],
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MoveRequest"}}}},
            "responses": {"200": ok("Placed", "MoveDone")}}),
    };
    let codes: &[(&str, &str)] = match h {
        Handler::Create => &[
            ("400", "validation_error"),
            ("401", "unauthorized"),
            ("408", "request_timeout"),
            ("409", "conflict"),
            ("413", "payload_too_large"),
            ("415", "unsupported_media_type"),
            ("503", "unavailable"),
        ],
        Handler::List | Handler::KeyList | Handler::Cluster | Handler::Digest => &[
            ("400", "validation_error"),
            ("401", "unauthorized"),
            ("503", "unavailable"),
        ],
        Handler::Detail | Handler::KeyRevoke => &[
            ("401", "unauthorized"),
            ("404", "not_found"),
            ("503", "unavailable"),
        ],
        Handler::Delete | Handler::NodeRemove => &[
            ("401", "unauthorized"),
            ("404", "not_found"),
            ("409", "conflict"),
            ("503", "unavailable"),
        ],
        Handler::Preview | Handler::Inspect => &[
            ("404", "not_found"),
            ("410", "expired or gone"),
            ("503", "unavailable"),
        ],
        Handler::Claim => &[
            ("400", "validation_error"),
            ("404", "not_found"),
            ("410", "expired or gone"),
            ("503", "unavailable"),
        ],
        Handler::GroupSplit | Handler::GroupMove => &[
            ("400", "validation_error"),
            ("401", "unauthorized"),
            ("404", "not_found"),
            ("408", "request_timeout"),
            ("409", "conflict"),
            ("413", "payload_too_large"),
            ("415", "unsupported_media_type"),
            ("503", "unavailable"),
        ],
        Handler::KeyCreate | Handler::NodeAdd => &[
            ("400", "validation_error"),
            ("401", "unauthorized"),
            ("408", "request_timeout"),
            ("409", "conflict"),
            ("413", "payload_too_large"),
            ("415", "unsupported_media_type"),
            ("503", "unavailable"),
        ],
        Handler::Health | Handler::Live | Handler::Ready | Handler::Metrics | Handler::OpenApi => {
            &[]
        }
    };
    common_errors(&mut op, codes);
    if matches!(h, Handler::Preview | Handler::Claim) {
        // A browser (Accept prefers text/html) gets its errors as a page too (`page::error`).
        for (code, r) in op["responses"].as_object_mut().into_iter().flatten() {
            if code != "200" {
                r["content"]["text/html"] = json!({"schema": {"type": "string"}});
            }
        }
    }
    op
}

fn schemas() -> Value {
    let ts = json!({"type": "string", "format": "date-time"});
    let nts = json!({"type": ["string", "null"], "format": "date-time"});
    let meta = json!({"type": ["object", "null"], "description": "Producer metadata (at most 1 KiB serialized)"});
    let mut schemas = json!({
        "Error": {"type": "object", "required": ["error", "message"], "properties": {
            "error": {"type": "string", "enum": ["validation_error", "unauthorized", "not_found", "conflict", "expired", "gone",
                "payload_too_large", "unsupported_media_type", "rate_limited", "quota_exceeded", "internal_error",
                "not_implemented", "unavailable", "method_not_allowed", "request_timeout"]},
            "message": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "string"}, "description": "One per problem (validation_error only)"},
            "status": {"$ref": "#/components/schemas/Status"}}},
        "Status": {"type": "string", "enum": ["active", "expired", "burned", "deleted"]},
        "Role": {"type": "string", "enum": ["instructions", "data", "context", "config", "attachment"]},
        "FileInput": {"type": "object", "additionalProperties": false, "required": ["name", "content", "content_type"], "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$"},
            "content": {"type": "string", "description": "UTF-8 text, or base64 with encoding: base64"},
            "content_type": {"type": "string"},
            "role": {"$ref": "#/components/schemas/Role"},
            "encoding": {"type": "string", "enum": ["base64"]}}},
        "CreateRequest": {"type": "object", "additionalProperties": false, "properties": {
            "content": {"description": "Single content: a string, or any JSON value with content_type application/json"},
            "content_type": {"type": "string", "default": "text/plain"},
            "files": {"type": "array", "minItems": 1, "maxItems": 16, "items": {"$ref": "#/components/schemas/FileInput"}},
            "ttl_seconds": {"type": "integer", "minimum": 1, "maximum": 604800, "default": 900},
            "max_retrievals": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
            "metadata": meta}},
        "Created": {"type": "object", "required": ["id", "claim_url", "claim_token", "status", "created_at", "expires_at"], "properties": {
            "id": {"type": "string", "format": "uuid"}, "claim_url": {"type": "string"}, "claim_token": {"type": "string"},
            "status": {"$ref": "#/components/schemas/Status"}, "content_type": {"type": "string"},
            "file_count": {"type": "integer"}, "total_size_bytes": {"type": "integer"},
            "max_retrievals": {"type": ["integer", "null"]}, "metadata": meta, "created_at": ts, "expires_at": ts}},
        "Detail": {"type": "object", "required": ["id", "status", "retrieval_count", "created_at", "expires_at"], "properties": {
            "id": {"type": "string", "format": "uuid"}, "status": {"$ref": "#/components/schemas/Status"},
            "content_type": {"type": "string"}, "file_count": {"type": "integer"}, "total_size_bytes": {"type": "integer"},
            "max_retrievals": {"type": ["integer", "null"]}, "retrieval_count": {"type": "integer"},
            "first_retrieved_at": nts, "last_retrieved_at": nts, "metadata": meta, "created_at": ts, "expires_at": ts}},
        "List": {"type": "object", "required": ["kubbis", "pagination"], "properties": {
            "kubbis": {"type": "array", "items": {"$ref": "#/components/schemas/Detail"}},
            "pagination": {"type": "object", "required": ["page", "limit", "total", "total_pages"], "properties": {
                "page": {"type": "integer"}, "limit": {"type": "integer"}, "total": {"type": "integer"}, "total_pages": {"type": "integer"}}}}},
        "FileDescriptor": {"type": "object", "required": ["name", "content_type", "size_bytes"], "properties": {
            "name": {"type": "string"}, "content_type": {"type": "string"}, "size_bytes": {"type": "integer"},
            "role": {"oneOf": [{"$ref": "#/components/schemas/Role"}, {"type": "null"}]}}},
        "Preview": {"type": "object", "required": ["status", "retrieval_count", "created_at", "expires_at"], "properties": {
            "type": {"type": "string", "enum": ["kubbi_package"]}, "kubbi_id": {"type": "string"},
            "status": {"$ref": "#/components/schemas/Status"}, "content_type": {"type": "string"},
            "file_count": {"type": "integer"}, "total_size_bytes": {"type": "integer"},
            "max_retrievals": {"type": ["integer", "null"]}, "retrieval_count": {"type": "integer"},
            "remaining_reads": {"type": ["integer", "null"]}, "metadata": meta, "created_at": ts, "expires_at": ts,
            "files": {"type": "array", "items": {"$ref": "#/components/schemas/FileDescriptor"}},
            "claim": {"type": "object", "properties": {"url": {"type": "string"}, "method": {"type": "string"},
                "description": {"type": "string"}, "message": {"type": "string"}}}}},
        "ClaimFile": {"type": "object", "required": ["name", "content_type", "size_bytes", "content"], "properties": {
            "name": {"type": "string"}, "content_type": {"type": "string"}, "size_bytes": {"type": "integer"},
            "role": {"oneOf": [{"$ref": "#/components/schemas/Role"}, {"type": "null"}]},
            "content": {"type": "string"}, "encoding": {"type": "string", "enum": ["base64"]}}},
        "Claim": {"type": "object", "required": ["created_at", "expires_at", "retrieval_count", "burned"], "properties": {
            "type": {"type": "string", "enum": ["kubbi_package"]}, "content": {"description": "Parsed JSON for application/json, else a string"},
            "content_type": {"type": "string"}, "file_count": {"type": "integer"},
            "files": {"type": "array", "items": {"$ref": "#/components/schemas/ClaimFile"}},
            "metadata": meta, "created_at": ts, "expires_at": ts, "retrieval_count": {"type": "integer"},
            "remaining_reads": {"type": ["integer", "null"]}, "burned": {"type": "boolean"}}},
        "Health": {"type": "object", "required": ["status"], "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"]}, "version": {"type": "string"},
            "node_id": {"type": "integer"}, "groups": {"type": "integer"}, "groups_with_leader": {"type": "integer"},
            "now_ms": {"type": "integer", "description": "This node's wall clock, milliseconds since the epoch (compare nodes for skew)"}}},
        "Liveness": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}},
        "ApiKeyRequest": {"type": "object", "additionalProperties": false, "properties": {
            "label": {"type": ["string", "null"], "maxLength": 128},
            "limits": {"oneOf": [{"$ref": "#/components/schemas/KeyLimitsRequest"}, {"type": "null"}]}}},
        "ApiKeyCreated": {"type": "object", "required": ["id", "api_key", "key_prefix", "label", "created_at", "limits"], "properties": {
            "id": {"type": "string", "format": "uuid"}, "api_key": {"type": "string"}, "key_prefix": {"type": "string"},
            "label": {"type": "string"}, "created_at": ts, "revoked_at": nts, "limits": {"$ref": "#/components/schemas/KeyLimits"}}},
        "ApiKey": {"type": "object", "required": ["id", "key_prefix", "label", "created_at", "limits"], "properties": {
            "id": {"type": "string", "format": "uuid"}, "key_prefix": {"type": "string"}, "label": {"type": "string"},
            "created_at": ts, "revoked_at": nts, "limits": {"$ref": "#/components/schemas/KeyLimits"},
            "usage": {"$ref": "#/components/schemas/KeyUsage"}}},
        "ApiKeyList": {"type": "object", "required": ["keys"], "properties": {"keys": {"type": "array", "items": {"$ref": "#/components/schemas/ApiKey"}}}},
        "Cluster": {"type": "object", "required": ["node_id", "nodes", "shards"], "properties": {
            "node_id": {"type": "integer"},
            "nodes": {"type": "array", "items": {"type": "object", "properties": {"id": {"type": "integer"}, "http": {"type": "string"},
                "internal": {"type": "string"}, "zone": {"type": "string"}, "state": {"type": "string"}}}},
            "map_version": {"type": "integer", "description": "Version of the shard map this node routes by"},
            "shards": {"type": "array", "description": "Raft groups: every data group, then the system group", "items": {"type": "object", "properties": {"id": {},
                "ranges": {"type": "array", "description": "Half-open ranges [lo, hi) of logical shards (0..65536) the group serves", "items": {"type": "array", "items": {"type": "integer"}}},
                "desired": {"type": ["array", "null"], "items": {"type": "integer"}, "description": "The replicas the shard map wants a data group on, its preferred leader first (the group moves there)"},
                "pinned": {"type": ["boolean", "null"], "description": "A data group placed by an operator (moveGroup): the rebalancer only replaces a replica whose node leaves"},
                "leader": {"type": ["integer", "null"]},
                "term": {"type": "integer"}, "replicas": {"type": "array", "items": {"type": "integer"}},
                "learners": {"type": "array", "items": {"type": "integer"}}, "applied_index": {"type": ["integer", "null"]},
                "last_log_index": {"type": ["integer", "null"]}, "replication_lag": {"type": "object"},
                "quiet": {"type": "boolean", "description": "The group is quiet on its leader: no writes for a while, every replica caught up, no heartbeats (a liveness ping per node pair instead)"},
                "error": {"type": "string"}}}}}},
        "NodeRequest": {"type": "object", "additionalProperties": false, "required": ["id", "internal"], "properties": {
            "id": {"type": "integer", "minimum": 1}, "internal": {"type": "string"}, "http": {"type": "string"}, "zone": {"type": "string"}}},
        "SplitRequest": {"type": "object", "additionalProperties": false, "properties": {
            "at": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535, "description": "The first logical shard to move (default: the middle of the group's widest range)"}}},
        "SplitDone": {"type": "object", "required": ["source", "target", "ranges", "map_version"], "properties": {
            "source": {"type": "integer"}, "target": {"type": "integer"},
            "ranges": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2}},
            "map_version": {"type": "integer"}}},
        "MoveRequest": {"type": "object", "additionalProperties": false, "properties": {
            "replicas": {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 16, "description": "The nodes to hold the group: as many as the replication factor (every active member when there are fewer), distinct, active and registered"},
            "leader": {"type": ["integer", "null"], "minimum": 1, "description": "The node to lead it (default: the first replica)"},
            "auto": {"type": ["boolean", "null"], "description": "true: give the group back to the rebalancer (no replicas or leader with it)"}}},
        "MoveDone": {"type": "object", "required": ["group", "pinned", "map_version"], "properties": {
            "group": {"type": "integer"}, "replicas": {"type": "array", "items": {"type": "integer"}},
            "leader": {"type": ["integer", "null"]}, "pinned": {"type": "boolean"},
            "map_version": {"type": "integer"}}},
        "NodeState": {"type": "object", "properties": {"id": {"type": "integer"}, "internal": {"type": "string"}, "state": {"type": "string"}}}
    });
    // Apart from the literal above: serde_json's macro recursion limit.
    // Key limits (kept out of the literal above: one json! literal has a recursion limit).
    schemas["KeyLimitsRequest"] = json!({"type": "object", "additionalProperties": false,
        "description": "Per-key quotas and rate limit over the whole cluster; null or absent = the node's default",
        "properties": {
        "max_active_kubbis": {"type": ["integer", "null"], "minimum": 1, "maximum": 4294967295_u64},
        "max_stored_bytes": {"type": ["integer", "null"], "minimum": 1, "maximum": 9223372036854775807_u64},
        "max_creates_per_day": {"type": ["integer", "null"], "minimum": 1, "maximum": 4294967295_u64},
        "requests_per_second": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000000}}});
    schemas["KeyLimits"] = json!({"type": "object", "required": ["max_active_kubbis", "max_stored_bytes", "max_creates_per_day", "requests_per_second"], "properties": {
        "max_active_kubbis": {"type": ["integer", "null"]}, "max_stored_bytes": {"type": ["integer", "null"]},
        "max_creates_per_day": {"type": ["integer", "null"]}, "requests_per_second": {"type": ["integer", "null"]}}});
    schemas["KeyUsage"] = json!({"type": "object", "required": ["active_kubbis", "stored_bytes", "creates_today"], "properties": {
        "active_kubbis": {"type": "integer"}, "stored_bytes": {"type": "integer"}, "creates_today": {"type": "integer"}}});
    schemas["Digest"] = json!({"type": "object", "required": ["node_id", "groups"], "properties": {
        "node_id": {"type": "integer"},
        "groups": {"type": "array", "items": {"type": "object", "required": ["id", "applied_index", "digest"], "properties": {
            "id": {"type": ["integer", "string"]}, "applied_index": {"type": ["integer", "null"]},
            "digest": {"type": "string", "description": "SHA-256 (hex) of the group's state and blob key/values in key order"}}}}}});
    schemas
}

/// The whole document.
pub fn document(public_url: &str) -> Value {
    let mut paths: Map<String, Value> = Map::new();
    for (method, path, h) in super::ROUTES {
        let item = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        item[method.to_ascii_lowercase()] = operation(*h);
    }
    let schemas = schemas();
    json!({
        "openapi": "3.1.0",
        "info": {"title": "kubbi", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Self-hosted claim-check service: store a payload with a TTL and a retrieval limit, hand over a claim URL, claim it exactly once.",
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "servers": [{"url": public_url}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "An API key, kb_..."},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "The operator's admin token"}}}
    })
}
