//! The OpenAPI 3.1 document the server serves at `/api/v1/openapi.json`,
//! made from the one list of methods ([`cordon_api::Call`]): each method's
//! request body is its variant's JSON Schema, so the document cannot
//! drift from what the server accepts.

use serde_json::{Map, Value, json};

use cordon_api::{Access, METHODS, PREFIX, SNAPSHOTS};

/// `#/$defs/X` (schemars) → `#/components/schemas/X` (OpenAPI), everywhere in `value`.
fn rebase(value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(Value::String(r)) = map.get_mut("$ref")
                && let Some(name) = r.strip_prefix("#/$defs/")
            {
                *r = format!("#/components/schemas/{name}");
            }
            map.values_mut().for_each(rebase);
        }
        Value::Array(items) => items.iter_mut().for_each(rebase),
        _ => {}
    }
}

fn access_text(access: Access) -> &'static str {
    match access {
        Access::Read => "any token; results limited to the token's applications (an agent's: the deployments it holds)",
        Access::Deploy => "role deployer or above (approver for an approval)",
        Access::Agent => "an agent's token, holding the deployment's lease",
        Access::Admin => "role admin",
    }
}

pub fn document() -> Value {
    let mut root = serde_json::to_value(schemars::schema_for!(cordon_api::Call)).expect("schemas serialise");
    rebase(&mut root);
    let mut schemas = root.get("$defs").cloned().unwrap_or_else(|| json!({}));
    schemas["Error"] = json!({
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["code", "message"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}
    });
    let refusal = |what: &str| json!({"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    let mut paths = Map::new();
    for variant in root["oneOf"].as_array().expect("a call is one of its methods") {
        let name = variant["properties"]["method"]["const"].as_str().expect("each method is named");
        let (access, writes) = METHODS.iter().find(|(n, ..)| *n == name).map(|&(_, a, w)| (a, w)).expect("every method is in the table");
        let args = variant["properties"].get("args").cloned().unwrap_or_else(|| json!({"type": "object"}));
        paths.insert(
            format!("{PREFIX}/{name}"),
            json!({"post": {
                "operationId": name,
                "description": format!("Who: {}.{}", access_text(access), if writes { " Audited." } else { "" }),
                "security": [{"bearer": []}],
                "requestBody": {"required": true, "content": {"application/json": {"schema": args}}},
                "responses": {
                    "200": {"description": "the method's result", "content": {"application/json": {"schema": {}}}},
                    "400": refusal("the body is not the method's arguments"),
                    "401": refusal("no token, or one unknown, revoked or expired"),
                    "403": refusal("the token's role or applications do not allow it"),
                    "404": refusal("no such deployment or application"),
                    "409": refusal("exists already, or the lease was taken over (code `fenced`)"),
                    "413": refusal("the body is too large"),
                }
            }}),
        );
    }
    paths.insert(
        format!("{SNAPSHOTS}/{{reference}}"),
        json!({
            "parameters": [{"name": "reference", "in": "path", "required": true, "schema": {"type": "string", "pattern": "^sha256:[0-9a-f]{64}$"}}],
            "get": {"operationId": "snapshot_get", "security": [{"bearer": []}],
                "description": "A snapshot archive (tar) the token reaches.",
                "responses": {"200": {"description": "the archive", "content": {"application/x-tar": {}}},
                    "401": refusal("no valid token"), "404": refusal("no such snapshot within reach")}},
            "put": {"operationId": "snapshot_put", "security": [{"bearer": []}],
                "description": "Stores a snapshot archive under its own digest. Who: role deployer or above. Audited.",
                "requestBody": {"required": true, "content": {"application/x-tar": {}}},
                "responses": {"200": {"description": "stored"}, "400": refusal("the digest does not match"),
                    "401": refusal("no valid token"), "403": refusal("role too low"), "413": refusal("larger than 128 MiB")}}
        }),
    );
    for (path, what) in [("/healthz", "the process is up"), ("/readyz", "the state store answers")] {
        paths.insert(path.into(), json!({"get": {"responses": {"200": {"description": what}, "503": refusal("not ready")}}}));
    }
    json!({
        "openapi": "3.1.0",
        "info": {"title": "Cordon", "version": env!("CARGO_PKG_VERSION"),
            "description": "Every state-store method is POST /api/v1/<method> with its arguments as a JSON object."},
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_method_is_documented_and_every_reference_resolves() {
        let doc = super::document();
        assert_eq!(doc["paths"].as_object().unwrap().len(), cordon_api::METHODS.len() + 3);
        let text = doc.to_string();
        assert!(!text.contains("#/$defs/"), "references left unrebased");
        for name in text.split("#/components/schemas/").skip(1).map(|rest| rest.split('"').next().unwrap()) {
            assert!(doc["components"]["schemas"].get(name).is_some(), "{name} is referenced but not defined");
        }
    }
}
