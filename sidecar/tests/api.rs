//! API tests against the real binary (SQLite by default, PostgreSQL when DATABASE_URL is set).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{assert_error, is_pg, Server};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;

const VAULT_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="; // base64 of bytes 0..32

const PROVIDERS: &str = r#"{"providers":[
  {"name":"openai-gpt3.5","supportedProvider":"OPENAI","apiKey":"sk-openai-key-one-AAAA","models":["gpt-3.5-turbo-0125"]},
  {"name":"openai-gpt4+","supportedProvider":"OPENAI","apiKey":"sk-openai-key-two-BBBB","models":["gpt-4o-2024-05-13","gpt-4-0613"]},
  {"name":"azure-provider","supportedProvider":"AZURE","url":"https://something-azure-openai.openai.azure.com",
   "apiKey":"azure-key-CCCC","apiVersion":"2024-02-01","models":["gpt-3.5-turbo-0125","gpt-4o"],"isHosted":true}
]}"#;

fn names(v: &Value, field: &str) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| p[field].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn bootstrap_health_openapi_and_restart() {
    let s = Server::start();
    assert!(
        s.admin.starts_with("lgw_"),
        "admin key printed once: {:?}",
        s.stdout
    );
    for f in ["vault.key", "internal.token"] {
        let mode = std::fs::metadata(s.dir.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    assert_eq!(s.request("GET", "/healthz", &[], None).status, 200);
    let r = s.request("GET", "/readyz", &[], None);
    assert_eq!((r.status, r.body["status"].as_str()), (200, Some("ready")));
    let r = s.request("GET", "/openapi.json", &[], None);
    assert_eq!(r.status, 200);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    for p in [
        "/v1/llm/providers",
        "/v1/llm/providers/{name}",
        "/config",
        "/config/{config_id}",
        "/v1/llm/api-keys",
        "/v1/llm/api-keys/{id}",
        "/v1/llm/api-keys/{id}/settings",
        "/v1/llm/settings",
        "/ai-optimizer/v1beta/hosted-model-specs",
        "/internal/v1/resolve",
        "/healthz",
        "/readyz",
    ] {
        assert!(r.body["paths"].get(p).is_some(), "openapi lacks {p}");
    }
    assert_error(&s.get("/nope", &s.admin), 404, "not_found");
    assert_eq!(s.get("/v1/llm/providers", &s.admin).status, 200);
    // A restart reuses the organization and does not print a new key.
    let admin = s.admin.clone();
    let s = s.restart();
    assert!(
        !s.stdout.iter().any(|l| l.contains("admin API key")),
        "{:?}",
        s.stdout
    );
    assert_eq!(s.get("/v1/llm/providers", &admin).status, 200);
}

#[test]
fn authentication_is_required() {
    let s = Server::start();
    let r = s.request("GET", "/v1/llm/providers", &[], None);
    assert_error(&r, 401, "invalid_api_key");
    assert_error(
        &s.get("/v1/llm/providers", "lgw_not_a_key"),
        401,
        "invalid_api_key",
    );
    let bearer = format!("Bearer {}", s.admin);
    assert_eq!(
        s.request(
            "GET",
            "/v1/llm/providers",
            &[("Authorization", &bearer)],
            None
        )
        .status,
        200
    );
    assert_eq!(s.get("/config", &s.admin).status, 200);
    assert_error(
        &s.request("GET", "/ai-optimizer/v1beta/hosted-model-specs", &[], None),
        401,
        "invalid_api_key",
    );
}

#[test]
fn providers_crud_and_validation() {
    let s = Server::start();
    let a = &s.admin;
    let r = s.post("/v1/llm/providers", a, PROVIDERS);
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(
        names(&r.body["providers"], "name"),
        ["openai-gpt3.5", "openai-gpt4+", "azure-provider"]
    );
    assert_eq!(r.body["providers"][0]["apiKeyLast4"], "AAAA");
    assert!(
        !r.raw.contains("sk-openai-key"),
        "keys never returned: {}",
        r.raw
    );

    let r = s.get("/v1/llm/providers", a);
    assert_eq!(names(&r.body["providers"], "name").len(), 3);
    assert!(!r.raw.contains("sk-openai-key") && !r.raw.contains("azure-key-CCCC"));
    let r = s.get("/v1/llm/providers/openai-gpt4+", a);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["supportedProvider"], "OPENAI");
    assert_eq!(r.body["models"], json!(["gpt-4o-2024-05-13", "gpt-4-0613"]));
    assert_eq!(r.body["apiVersion"], Value::Null);
    let r = s.get("/v1/llm/providers/azure-provider", a);
    assert_eq!(
        (r.body["isHosted"].as_bool(), r.body["apiVersion"].as_str()),
        (Some(true), Some("2024-02-01"))
    );
    assert_error(&s.get("/v1/llm/providers/nope", a), 404, "not_found");

    // Duplicates, bad input.
    let one =
        r#"{"providers":[{"name":"openai-gpt3.5","supportedProvider":"OPENAI","models":["m"]}]}"#;
    assert_error(&s.post("/v1/llm/providers", a, one), 409, "provider_exists");
    assert_error(
        &s.post("/v1/llm/providers", a, "{\"providers\":["),
        400,
        "invalid_json",
    );
    let r = s.post("/v1/llm/providers", a, r#"{"providers":[{"name":"x","supportedProvider":"OPENAI","models":["m"],"colour":"red"}]}"#);
    assert_error(&r, 400, "unknown_field");
    assert_eq!(r.body["error"]["param"], "colour");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("colour"));
    assert_error(
        &s.post("/v1/llm/providers", a, r#"{"providers":[]}"#),
        400,
        "invalid_value",
    );
    assert_error(
        &s.post("/v1/llm/providers", a, r#"{}"#),
        400,
        "missing_field",
    );
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"x","supportedProvider":"NOPE","models":["m"]}]}"#,
    );
    assert_error(&r, 400, "unknown_provider_type");
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"x","supportedProvider":"AZURE","models":["m"]}]}"#,
    );
    assert_error(&r, 400, "invalid_provider");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("url is required"));
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"x","supportedProvider":"OPENAI","models":[]}]}"#,
    );
    assert_error(&r, 400, "invalid_provider");
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"x","supportedProvider":"OPENAI","models":["m"],"clusterId":"c1"}]}"#,
    );
    assert_error(&r, 400, "invalid_value");
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"x","supportedProvider":"OPENAI","models":["m"],"fallback":"ghost"}]}"#,
    );
    assert_error(&r, 400, "invalid_provider");
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"a/b","supportedProvider":"OPENAI","models":["m"]}]}"#,
    );
    assert_error(&r, 400, "invalid_name");
    let r = s.post("/v1/llm/providers", a, r#"{"providers":[{"name":"x","supportedProvider":"OPENAI","models":["m"],"apiKeyEnv":"HOME"}]}"#);
    assert_error(&r, 400, "unknown_field");
    // A failing batch stores nothing.
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"ok1","supportedProvider":"OPENAI","models":["m"]},{"name":"bad","supportedProvider":"NOPE","models":["m"]}]}"#,
    );
    assert_eq!(r.status, 400);
    assert_error(&s.get("/v1/llm/providers/ok1", a), 404, "not_found");

    // Update: the key is kept when absent, replaced when given; renaming is refused.
    let r = s.put(
        "/v1/llm/providers/openai-gpt3.5",
        a,
        r#"{"supportedProvider":"OPENAI","models":["gpt-3.5-turbo-0125","gpt-4o-mini"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["apiKeyLast4"], "AAAA");
    assert_eq!(r.body["models"].as_array().unwrap().len(), 2);
    let id = s.resolve(a);
    let p = id.body["identity"]["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "openai-gpt3.5")
        .unwrap()
        .clone();
    assert_eq!(p["apiKey"], "sk-openai-key-one-AAAA");
    let r = s.put(
        "/v1/llm/providers/openai-gpt3.5",
        a,
        r#"{"supportedProvider":"OPENAI","models":["gpt-4o-mini"],"apiKey":"sk-new-ZZZZ"}"#,
    );
    assert_eq!(r.body["apiKeyLast4"], "ZZZZ");
    let r = s.put(
        "/v1/llm/providers/openai-gpt3.5",
        a,
        r#"{"name":"other","supportedProvider":"OPENAI","models":["m"]}"#,
    );
    assert_error(&r, 400, "invalid_value");
    assert_error(
        &s.put(
            "/v1/llm/providers/ghost",
            a,
            r#"{"supportedProvider":"OPENAI","models":["m"]}"#,
        ),
        404,
        "not_found",
    );
    assert_error(
        &s.put(
            "/v1/llm/providers/openai-gpt3.5",
            a,
            r#"{"supportedProvider":"OPENAI","models":["m"],"x":1}"#,
        ),
        400,
        "unknown_field",
    );

    // Delete: refused while a config or a fallback uses the provider.
    let r = s.post(
        "/config",
        a,
        r#"{"inherits":"default","providers":[{"name":"openai-gpt4+"}]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let cfg = r.body["config_id"].as_str().unwrap().to_string();
    assert_error(
        &s.delete("/v1/llm/providers/openai-gpt4+", a),
        409,
        "provider_in_use",
    );
    let hosted = r#"{"providers":[{"name":"local","supportedProvider":"OPENAI_COMPATIBLE","url":"http://10.0.0.1:8000/v1",
        "isHosted":true,"clusterId":"c1","models":["llama3.1:8b"],"fallback":["openai-gpt3.5"]}]}"#;
    assert_eq!(s.post("/v1/llm/providers", a, hosted).status, 201);
    assert_error(
        &s.delete("/v1/llm/providers/openai-gpt3.5", a),
        409,
        "provider_in_use",
    );
    // A model narrowed by a config cannot disappear from its provider.
    let r = s.put(
        &format!("/config/{cfg}"),
        a,
        r#"{"inherits":"default","providers":[{"name":"openai-gpt4+","models":["gpt-4-0613"]}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    let r = s.put(
        "/v1/llm/providers/openai-gpt4+",
        a,
        r#"{"supportedProvider":"OPENAI","models":["gpt-4o-2024-05-13"]}"#,
    );
    assert_error(&r, 400, "invalid_provider");
    assert_eq!(s.delete(&format!("/config/{cfg}"), a).status, 204);
    assert_eq!(s.delete("/v1/llm/providers/openai-gpt4+", a).status, 204);
    assert_error(
        &s.get("/v1/llm/providers/openai-gpt4+", a),
        404,
        "not_found",
    );
    assert_error(
        &s.delete("/v1/llm/providers/openai-gpt4+", a),
        404,
        "not_found",
    );
}

fn setup_providers(s: &Server, key: &str) {
    let r = s.post("/v1/llm/providers", key, PROVIDERS);
    assert_eq!(r.status, 201, "{}", r.raw);
}

fn create_config(s: &Server, key: &str, body: &str) -> String {
    let r = s.post("/config", key, body);
    assert_eq!(r.status, 201, "{}", r.raw);
    r.body["config_id"].as_str().unwrap().to_string()
}

#[test]
fn configs_inheritance_depth_loops_and_conflicts() {
    let s = Server::start();
    let a = &s.admin;
    setup_providers(&s, a);
    let c1 = create_config(
        &s,
        a,
        r#"{"name":"prod","inherits":"default","providers":[
            {"name":"openai-gpt4+","models":["gpt-4o-2024-05-13"],"api_key":"sk-config-override-DDDD"}],
            "only":["openai-gpt4+","azure-provider"]}"#,
    );
    let r = s.get(&format!("/config/{c1}"), a);
    assert_eq!(r.status, 200);
    assert_eq!(r.body["name"], "prod");
    assert_eq!(r.body["inherits"], "default");
    assert_eq!(r.body["providers"][0]["api_key_last4"], "DDDD");
    assert!(!r.raw.contains("sk-config-override"), "{}", r.raw);
    assert_eq!(
        r.body["resolved_providers"][1]["models"],
        json!(["gpt-3.5-turbo-0125", "gpt-4o"])
    );
    let c2 = create_config(
        &s,
        a,
        &format!(r#"{{"inherits":"{c1}","restrictTo":["openai-gpt4+"]}}"#),
    );
    let c3 = create_config(&s, a, &format!(r#"{{"parent":"{c2}"}}"#));
    // c3 → c2 → c1 → default is three levels: fine; a fourth is refused.
    let r = s.post("/config", a, &format!(r#"{{"inherits":"{c3}"}}"#));
    assert_error(&r, 400, "inheritance_too_deep");
    let msg = r.body["error"]["message"].as_str().unwrap();
    // The refused config is named as sent (it has no id yet), not by an id generated for it.
    assert!(
        msg.contains("3 levels") && msg.contains("the new config"),
        "{msg}"
    );
    let r = s.post(
        "/config",
        a,
        &format!(r#"{{"name":"deep","inherits":"{c3}"}}"#),
    );
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("the new config 'deep'"), "{msg}");
    // Loops (including a config naming itself) are refused.
    let r = s.patch(
        &format!("/config/{c1}"),
        a,
        &format!(r#"{{"inherits":"{c3}"}}"#),
    );
    assert_error(&r, 400, "inheritance_loop");
    let r = s.patch(
        &format!("/config/{c2}"),
        a,
        &format!(r#"{{"inherits":"{c2}"}}"#),
    );
    assert_error(&r, 400, "inheritance_loop");
    // Unknown parent / provider / model; missing providers and parent; unknown fields; bad JSON.
    assert_error(
        &s.post("/config", a, r#"{"inherits":"cfg_nope"}"#),
        400,
        "unknown_parent",
    );
    assert_error(
        &s.post(
            "/config",
            a,
            r#"{"inherits":"default","providers":[{"name":"ghost"}]}"#,
        ),
        400,
        "unknown_provider",
    );
    let r = s.post(
        "/config",
        a,
        r#"{"inherits":"default","providers":[{"name":"azure-provider","models":["claude"]}]}"#,
    );
    assert_error(&r, 400, "invalid_config");
    // Without a parent a config builds on the default config (all providers).
    let r = s.post("/config", a, r#"{"name":"Production"}"#);
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(r.body["inherits"], "default");
    assert_eq!(r.body["resolved_providers"].as_array().unwrap().len(), 3);
    let empty = r.body["config_id"].as_str().unwrap().to_string();
    assert_eq!(s.delete(&format!("/config/{empty}"), a).status, 204);
    // `only` must name providers the merged list has.
    let r = s.post("/config", a, r#"{"only":["ghost"]}"#);
    assert_error(&r, 400, "invalid_config");
    assert!(r.raw.contains("ghost"), "{}", r.raw);
    assert_error(
        &s.post("/config", a, r#"{"inherits":"default","colour":1}"#),
        400,
        "unknown_field",
    );
    assert_error(
        &s.post(
            "/config",
            a,
            r#"{"inherits":"default","providers":[{"name":"azure-provider","x":1}]}"#,
        ),
        400,
        "unknown_field",
    );
    assert_error(&s.post("/config", a, "not json"), 400, "invalid_json");
    assert_error(
        &s.post(
            "/config",
            a,
            r#"{"providers":[{"name":"azure-provider"},{"name":"azure-provider"}]}"#,
        ),
        400,
        "invalid_value",
    );

    // List: the built-in default first, then the org's configs.
    let r = s.get("/config", a);
    assert_eq!(
        names(&r.body["configs"], "config_id"),
        ["default", c1.as_str(), c2.as_str(), c3.as_str()]
    );
    let r = s.get("/config/default", a);
    assert_eq!(r.body["builtin"], true);
    assert_eq!(names(&r.body["providers"], "name").len(), 3);
    assert_error(
        &s.put("/config/default", a, r#"{"inherits":"default"}"#),
        400,
        "builtin_config",
    );
    assert_error(&s.delete("/config/default", a), 400, "builtin_config");
    assert_error(&s.get("/config/cfg_nope", a), 404, "not_found");

    // A key on c3 sees c1's narrowing and key override through inheritance.
    let (kid, secret) = s.new_key(a, &format!(r#"{{"config_id":"{c3}","name":"ci"}}"#));
    let id = s.resolve(&secret);
    assert_eq!(id.status, 200, "{}", id.raw);
    let provs = &id.body["identity"]["providers"];
    assert_eq!(names(provs, "name"), ["openai-gpt4+"]);
    assert_eq!(provs[0]["apiKey"], "sk-config-override-DDDD");
    assert_eq!(
        provs[0]["models"],
        json!([{"name":"gpt-4o-2024-05-13","upstream":"gpt-4o-2024-05-13"}])
    );
    assert_eq!(id.body["identity"]["configId"], c3.as_str());

    // PATCH only the name: the stored key override survives. PUT replaces.
    let r = s.patch(&format!("/config/{c1}"), a, r#"{"name":"production"}"#);
    assert_eq!(
        (r.status, r.body["name"].as_str()),
        (200, Some("production")),
        "{}",
        r.raw
    );
    assert_eq!(r.body["providers"][0]["api_key_last4"], "DDDD");
    assert_eq!(
        s.resolve(&secret).body["identity"]["providers"][0]["apiKey"],
        "sk-config-override-DDDD"
    );
    assert_error(
        &s.patch(&format!("/config/{c1}"), a, r#"{"bogus":true}"#),
        400,
        "unknown_field",
    );
    assert_error(
        &s.patch(&format!("/config/{c1}"), a, r#"[1]"#),
        400,
        "invalid_value",
    );
    let r = s.put(
        &format!("/config/{c2}"),
        a,
        r#"{"inherits":"default","providers":[{"name":"openai-gpt3.5","api_key":"sk-c2-EEEE"}],"only":["openai-gpt3.5"]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    let id = s.resolve(&secret);
    assert_eq!(
        names(&id.body["identity"]["providers"], "name"),
        ["openai-gpt3.5"]
    );
    assert_eq!(id.body["identity"]["providers"][0]["apiKey"], "sk-c2-EEEE");
    assert_error(
        &s.put("/config/cfg_nope", a, r#"{"inherits":"default"}"#),
        404,
        "not_found",
    );

    // Delete: refused while inherited from or bound to a key.
    let r = s.put(
        &format!("/config/{c2}"),
        a,
        &format!(r#"{{"inherits":"{c1}"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_error(
        &s.delete(&format!("/config/{c1}"), a),
        409,
        "config_inherited",
    );
    assert_error(&s.delete(&format!("/config/{c3}"), a), 409, "config_in_use");
    assert_eq!(s.delete(&format!("/v1/llm/api-keys/{kid}"), a).status, 204);
    assert_eq!(s.delete(&format!("/config/{c3}"), a).status, 204);
    assert_error(&s.get(&format!("/config/{c3}"), a), 404, "not_found");
    assert_eq!(s.delete(&format!("/config/{c2}"), a).status, 204);
    assert_eq!(s.delete(&format!("/config/{c1}"), a).status, 204);
}

#[test]
fn api_keys_resolve_and_revocation() {
    let s = Server::start_with(&[("LLM_GATEWAY_CACHE_TTL", "7")]);
    let a = &s.admin;
    setup_providers(&s, a);
    assert_error(
        &s.post("/v1/llm/api-keys", a, r#"{"name":"x"}"#),
        400,
        "missing_field",
    );
    let r = s.post("/v1/llm/api-keys", a, r#"{"name":"x"}"#);
    assert_eq!(r.body["error"]["param"], "config_id");
    assert_error(
        &s.post("/v1/llm/api-keys", a, r#"{"config_id":"cfg_nope"}"#),
        400,
        "unknown_config",
    );
    assert_error(
        &s.post(
            "/v1/llm/api-keys",
            a,
            r#"{"config_id":"default","scope":"galaxy"}"#,
        ),
        400,
        "invalid_value",
    );
    assert_error(
        &s.post(
            "/v1/llm/api-keys",
            a,
            r#"{"config_id":"default","scope":"cluster"}"#,
        ),
        400,
        "missing_field",
    );
    assert_error(
        &s.post(
            "/v1/llm/api-keys",
            a,
            r#"{"config_id":"default","scope":"organization","cluster_id":"c1"}"#,
        ),
        400,
        "invalid_value",
    );
    assert_error(
        &s.post(
            "/v1/llm/api-keys",
            a,
            r#"{"config_id":"default","expires":1}"#,
        ),
        400,
        "unknown_field",
    );
    assert_error(&s.post("/v1/llm/api-keys", a, "{"), 400, "invalid_json");
    assert_error(
        &s.post(
            "/v1/llm/api-keys",
            a,
            r#"{"config_id":"default","settings":{"provider":"ghost"}}"#,
        ),
        400,
        "unknown_provider",
    );

    let r = s.post(
        "/v1/llm/api-keys",
        a,
        r#"{"config_id":"default","scope":"organization","name":"app","settings":{"provider":"azure-provider","model":"gpt-4o"}}"#,
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    let secret = r.body["key"].as_str().unwrap().to_string();
    let kid = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["scope"], "organization");
    assert!(secret.starts_with("lgw_") && secret.len() > 40);

    // The secret is shown once: never listed.
    let r = s.get("/v1/llm/api-keys", a);
    assert!(!r.raw.contains(&secret));
    assert!(r.body["api_keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k.get("key").is_none()));
    assert_eq!(r.body["api_keys"].as_array().unwrap().len(), 2);
    let r = s.get(&format!("/v1/llm/api-keys/{kid}"), a);
    assert_eq!((r.status, r.body["name"].as_str()), (200, Some("app")));
    assert_error(&s.get("/v1/llm/api-keys/key_nope", a), 404, "not_found");

    // The new key works for the API and resolves through the internal endpoint.
    assert_eq!(s.get("/v1/llm/providers", &secret).status, 200);
    let r = s.resolve(&secret);
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(r.body["ttlSeconds"], 7);
    let id = &r.body["identity"];
    assert_eq!(id["keyId"], kid.as_str());
    assert!(id["orgId"].as_str().unwrap().starts_with("org_"));
    assert_eq!(id["configId"], "default");
    assert_eq!(id["clusterId"], Value::Null);
    assert_eq!(
        id["keySettings"],
        json!({"provider":"azure-provider","model":"gpt-4o"})
    );
    assert_eq!(
        names(&id["providers"], "name"),
        ["openai-gpt3.5", "openai-gpt4+", "azure-provider"]
    );
    assert_eq!(id["providers"][2]["apiKey"], "azure-key-CCCC");
    assert_eq!(id["providers"][2]["kind"], "AZURE");
    // The body deserializes into the filter's own Identity.
    let parsed: llm_gateway::config::Identity = serde_json::from_value(id.clone()).unwrap();
    assert_eq!(
        parsed.provider("openai-gpt4+").unwrap().api_key.as_deref(),
        Some("sk-openai-key-two-BBBB")
    );

    // Per-key settings.
    let r = s.get(&format!("/v1/llm/api-keys/{kid}/settings"), a);
    assert_eq!(
        r.body,
        json!({"provider":"azure-provider","model":"gpt-4o"})
    );
    let r = s.put(
        &format!("/v1/llm/api-keys/{kid}/settings"),
        a,
        r#"{"model":"gpt-4-0613"}"#,
    );
    assert_eq!(
        (r.status, &r.body),
        (200, &json!({"model":"gpt-4-0613"})),
        "{}",
        r.raw
    );
    assert_eq!(
        s.resolve(&secret).body["identity"]["keySettings"],
        json!({"model":"gpt-4-0613"})
    );
    assert_error(
        &s.put(
            &format!("/v1/llm/api-keys/{kid}/settings"),
            a,
            r#"{"model":"nope"}"#,
        ),
        400,
        "unknown_model",
    );
    assert_error(
        &s.put(
            &format!("/v1/llm/api-keys/{kid}/settings"),
            a,
            r#"{"provider":"openai-gpt3.5","model":"gpt-4o"}"#,
        ),
        400,
        "unknown_model",
    );
    assert_error(
        &s.put(
            &format!("/v1/llm/api-keys/{kid}/settings"),
            a,
            r#"{"temperature":1}"#,
        ),
        400,
        "unknown_field",
    );
    assert_error(
        &s.put("/v1/llm/api-keys/key_nope/settings", a, r#"{}"#),
        404,
        "not_found",
    );

    // Internal endpoint guard and input checks.
    let body = format!(
        "{{\"keySha256\":\"{}\"}}",
        llm_gateway::config::hash_key(&secret)
    );
    assert_error(
        &s.request("POST", "/internal/v1/resolve", &[], Some(&body)),
        401,
        "invalid_api_key",
    );
    assert_error(
        &s.request(
            "POST",
            "/internal/v1/resolve",
            &[("x-gateway-token", "wrong")],
            Some(&body),
        ),
        401,
        "invalid_api_key",
    );
    let tok = [("x-gateway-token", s.token.as_str())];
    assert_error(
        &s.request(
            "POST",
            "/internal/v1/resolve",
            &tok,
            Some(r#"{"keySha256":"abc"}"#),
        ),
        400,
        "invalid_value",
    );
    assert_error(
        &s.request("POST", "/internal/v1/resolve", &tok, Some("{")),
        400,
        "invalid_json",
    );
    assert_error(
        &s.request("POST", "/internal/v1/resolve", &tok, Some(r#"{"key":"x"}"#)),
        400,
        "unknown_field",
    );
    assert_error(&s.resolve("lgw_unknown"), 404, "not_found");
    let upper = body.to_uppercase().replace("KEYSHA256", "keySha256");
    assert_eq!(
        s.request("POST", "/internal/v1/resolve", &tok, Some(&upper))
            .status,
        200
    );

    // Revocation: resolve 404, API 401; a key cannot revoke itself.
    assert_error(
        &s.delete(&format!("/v1/llm/api-keys/{kid}"), &secret),
        409,
        "own_key",
    );
    assert_eq!(s.delete(&format!("/v1/llm/api-keys/{kid}"), a).status, 204);
    assert_error(&s.resolve(&secret), 404, "not_found");
    assert_error(&s.get("/v1/llm/providers", &secret), 401, "invalid_api_key");
    let r = s.get(&format!("/v1/llm/api-keys/{kid}"), a);
    assert_eq!(r.body["revoked"], true);
    assert!(r.body["revoked_at"].is_string());
}

#[test]
fn organizations_are_isolated() {
    let s = Server::start();
    let a = &s.admin;
    setup_providers(&s, a);
    let c1 = create_config(
        &s,
        a,
        r#"{"inherits":"default","providers":[{"name":"azure-provider"}]}"#,
    );
    let (kid, _) = s.new_key(a, r#"{"config_id":"default"}"#);
    let (org_b, b) = s.new_org("beta");
    assert!(org_b.starts_with("org_"));
    let r = s.get("/v1/llm/providers", &b);
    assert_eq!(r.body["providers"], json!([]));
    assert_error(
        &s.get("/v1/llm/providers/azure-provider", &b),
        404,
        "not_found",
    );
    assert_error(
        &s.put(
            "/v1/llm/providers/azure-provider",
            &b,
            r#"{"supportedProvider":"OPENAI","models":["m"]}"#,
        ),
        404,
        "not_found",
    );
    assert_error(
        &s.delete("/v1/llm/providers/azure-provider", &b),
        404,
        "not_found",
    );
    assert_error(&s.get(&format!("/config/{c1}"), &b), 404, "not_found");
    assert_error(
        &s.patch(&format!("/config/{c1}"), &b, r#"{"name":"x"}"#),
        404,
        "not_found",
    );
    assert_error(&s.delete(&format!("/config/{c1}"), &b), 404, "not_found");
    assert_eq!(
        names(&s.get("/config", &b).body["configs"], "config_id"),
        ["default"]
    );
    assert_error(
        &s.get(&format!("/v1/llm/api-keys/{kid}"), &b),
        404,
        "not_found",
    );
    assert_error(
        &s.delete(&format!("/v1/llm/api-keys/{kid}"), &b),
        404,
        "not_found",
    );
    assert_error(
        &s.get(&format!("/v1/llm/api-keys/{kid}/settings"), &b),
        404,
        "not_found",
    );
    assert_error(
        &s.post(
            "/v1/llm/api-keys",
            &b,
            &format!(r#"{{"config_id":"{c1}"}}"#),
        ),
        400,
        "unknown_config",
    );
    assert_error(
        &s.post("/config", &b, &format!(r#"{{"inherits":"{c1}"}}"#)),
        400,
        "unknown_parent",
    );
    assert_error(
        &s.put("/v1/llm/settings", &b, r#"{"provider":"azure-provider"}"#),
        400,
        "unknown_provider",
    );
    // The same provider name may exist in both orgs, with different keys.
    setup_providers(&s, &b);
    let r = s.put("/v1/llm/providers/azure-provider", &b, r#"{"supportedProvider":"AZURE","url":"https://b.openai.azure.com","models":["gpt-4o"],"apiKey":"b-azure-FFFF"}"#);
    assert_eq!(r.status, 200, "{}", r.raw);
    let ida = s.resolve(a);
    let idb = s.resolve(&b);
    assert_ne!(ida.body["identity"]["orgId"], idb.body["identity"]["orgId"]);
    assert_eq!(idb.body["identity"]["orgId"], org_b.as_str());
    assert_eq!(
        ida.body["identity"]["providers"][2]["apiKey"],
        "azure-key-CCCC"
    );
    assert_eq!(
        idb.body["identity"]["providers"][2]["apiKey"],
        "b-azure-FFFF"
    );
    assert_error(
        &s.request(
            "POST",
            "/internal/v1/organizations",
            &[("x-gateway-token", "bad")],
            Some("{}"),
        ),
        401,
        "invalid_api_key",
    );
}

#[test]
fn cluster_scoped_tokens_and_settings() {
    let s = Server::start();
    let a = &s.admin;
    let body = r#"{"providers":[
      {"name":"saas","supportedProvider":"OPENAI","apiKey":"sk-saas-1111","models":["gpt-4o"]},
      {"name":"h1","supportedProvider":"OPENAI_COMPATIBLE","url":"http://llm.c1.svc:8000/v1","isHosted":true,"clusterId":"c1",
       "models":["llama3.1:8b"],"fallback":"saas"},
      {"name":"h2","supportedProvider":"OPENAI_COMPATIBLE","url":"http://llm.c2.svc:8000/v1","isHosted":true,"clusterId":"c2",
       "models":["mistral:7b"]}]}"#;
    assert_eq!(s.post("/v1/llm/providers", a, body).status, 201);
    assert_error(
        &s.post(
            "/v1/llm/api-keys",
            a,
            r#"{"config_id":"default","cluster_id":"c1","settings":{"provider":"h2"}}"#,
        ),
        400,
        "unknown_provider",
    );
    let r = s.post(
        "/v1/llm/api-keys",
        a,
        r#"{"config_id":"default","scope":"cluster","clusterId":"c1"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.raw);
    assert_eq!(
        (r.body["scope"].as_str(), r.body["cluster_id"].as_str()),
        (Some("cluster"), Some("c1"))
    );
    let ck = r.body["key"].as_str().unwrap().to_string();

    // Lists are filtered; other clusters' and SaaS providers are not reachable.
    assert_eq!(
        names(&s.get("/v1/llm/providers", &ck).body["providers"], "name"),
        ["h1"]
    );
    assert_eq!(
        names(&s.get("/v1/llm/providers", a).body["providers"], "name"),
        ["saas", "h1", "h2"]
    );
    assert_eq!(s.get("/v1/llm/providers/h1", &ck).status, 200);
    assert_error(&s.get("/v1/llm/providers/h2", &ck), 404, "not_found");
    assert_error(&s.get("/v1/llm/providers/saas", &ck), 404, "not_found");
    // Management needs an organization-scoped key.
    assert_error(
        &s.post("/v1/llm/providers", &ck, body),
        403,
        "insufficient_scope",
    );
    assert_error(
        &s.delete("/v1/llm/providers/h1", &ck),
        403,
        "insufficient_scope",
    );
    assert_error(&s.get("/config", &ck), 403, "insufficient_scope");
    assert_error(
        &s.post("/v1/llm/api-keys", &ck, r#"{"config_id":"default"}"#),
        403,
        "insufficient_scope",
    );
    assert_error(&s.get("/v1/llm/api-keys", &ck), 403, "insufficient_scope");
    assert_eq!(
        s.get("/ai-optimizer/v1beta/hosted-model-specs", &ck).status,
        200
    );

    // Settings: org level for org keys, the cluster context for cluster keys.
    let r = s.put(
        "/v1/llm/settings",
        a,
        r#"{"provider":"saas","model":"gpt-4o"}"#,
    );
    assert_eq!(
        (r.status, &r.body),
        (
            200,
            &json!({"provider":"saas","model":"gpt-4o","storePrompts":false})
        ),
        "{}",
        r.raw
    );
    assert_eq!(s.get("/v1/llm/settings", &ck).body, json!({}));
    assert_error(
        &s.put("/v1/llm/settings", &ck, r#"{"provider":"h2"}"#),
        400,
        "unknown_provider",
    );
    assert_error(
        &s.put("/v1/llm/settings", &ck, r#"{"model":"gpt-4o"}"#),
        400,
        "unknown_model",
    );
    assert_error(
        &s.put("/v1/llm/settings", &ck, r#"{"temperature":1}"#),
        400,
        "unknown_field",
    );
    assert_error(&s.put("/v1/llm/settings", &ck, "nope"), 400, "invalid_json");
    let r = s.put("/v1/llm/settings", &ck, r#"{"provider":"h1"}"#);
    assert_eq!(
        (r.status, &r.body),
        (200, &json!({"provider":"h1"})),
        "{}",
        r.raw
    );
    assert_eq!(
        s.get("/v1/llm/settings", &ck).body,
        json!({"provider":"h1"})
    );
    assert_eq!(
        s.get("/v1/llm/settings", a).body,
        json!({"provider":"saas","model":"gpt-4o","storePrompts":false})
    );

    // Resolve: only the cluster's hosted providers; settings = cluster context over the org's.
    let r = s.resolve(&ck);
    assert_eq!(r.status, 200, "{}", r.raw);
    let id = &r.body["identity"];
    assert_eq!(id["clusterId"], "c1");
    assert!(names(&id["providers"], "name").contains(&"h1".to_string()));
    assert!(!names(&id["providers"], "name").contains(&"h2".to_string()));
    assert_eq!(id["orgSettings"], json!({"provider":"h1","model":"gpt-4o"}));
    let r = s.resolve(a);
    assert_eq!(
        r.body["identity"]["orgSettings"],
        json!({"provider":"saas","model":"gpt-4o"})
    );
    assert_eq!(
        names(&r.body["identity"]["providers"], "name"),
        ["saas", "h1", "h2"]
    );
}

#[test]
fn vault_keeps_provider_keys_out_of_the_database() {
    let s = Server::start();
    let a = &s.admin;
    setup_providers(&s, a);
    create_config(
        &s,
        a,
        r#"{"inherits":"default","providers":[{"name":"azure-provider","api_key":"sk-config-secret-GGGG"}]}"#,
    );
    let secrets = [
        "sk-openai-key-one-AAAA",
        "sk-openai-key-two-BBBB",
        "azure-key-CCCC",
        "sk-config-secret-GGGG",
    ];
    // The keys are usable (the vault opens them) ...
    let raw = s.resolve(a).raw;
    for k in &secrets[..3] {
        assert!(raw.contains(k), "{k} missing from resolve");
    }
    // ... but never returned by the public API ...
    for path in [
        "/v1/llm/providers",
        "/config",
        "/v1/llm/api-keys",
        "/v1/llm/providers/azure-provider",
    ] {
        let r = s.get(path, a).raw;
        assert!(secrets.iter().all(|k| !r.contains(k)), "{path}: {r}");
    }
    if is_pg() {
        eprintln!("vault file check: SQLite only (running against PostgreSQL)");
        return;
    }
    // ... and not in any file of the data dir (database, WAL, shared memory); the admin key neither.
    let mut files = 0;
    for entry in std::fs::read_dir(&s.dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        files += 1;
        for k in secrets.iter().chain([&s.admin.as_str()]) {
            assert!(
                !text.contains(k),
                "{} contains {k} in clear",
                path.display()
            );
        }
    }
    assert!(files >= 3);
    let db = std::fs::read(s.dir.join("sidecar.db")).unwrap();
    let wal = std::fs::read(s.dir.join("sidecar.db-wal")).unwrap_or_default();
    let all = String::from_utf8_lossy(&[db, wal].concat()).to_string();
    assert!(
        all.contains("AAAA") || all.contains("last4"),
        "sanity: the database was written"
    );
    assert!(
        all.contains(&llm_gateway::config::hash_key(&s.admin)),
        "keys are stored as SHA-256 hex"
    );
}

#[test]
fn environment_overrides_and_replicas() {
    let admin = "lgw_from_env_0123456789abcdef0123456789abcdef";
    let s = Server::start_with(&[
        ("LLM_GATEWAY_VAULT_KEY", VAULT_KEY),
        ("LLM_GATEWAY_ADMIN_KEY", admin),
        ("LLM_GATEWAY_INTERNAL_TOKEN", "internal-token-for-tests"),
    ]);
    assert!(
        s.stdout
            .iter()
            .any(|l| l.contains("taken from LLM_GATEWAY_ADMIN_KEY")),
        "{:?}",
        s.stdout
    );
    assert!(!s.stdout.iter().any(|l| l.contains(admin)));
    assert!(!s.dir.join("vault.key").exists() && !s.dir.join("internal.token").exists());
    setup_providers(&s, admin);
    assert_eq!(s.resolve(admin).status, 200);
    // A second replica on the same database (and vault key) serves the same data.
    let r2 = s.replica();
    assert!(
        !r2.stdout.iter().any(|l| l.contains("created organization")),
        "{:?}",
        r2.stdout
    );
    assert_eq!(
        names(
            &r2.get("/v1/llm/providers", admin).body["providers"],
            "name"
        )
        .len(),
        3
    );
    let (_, k) = r2.new_key(admin, r#"{"config_id":"default"}"#);
    let id = s.resolve(&k);
    assert_eq!(id.status, 200, "{}", id.raw);
    assert_eq!(
        id.body["identity"]["providers"][0]["apiKey"],
        "sk-openai-key-one-AAAA"
    );
    assert_eq!(r2.resolve(&k).body, id.body);
}

#[test]
fn bad_vault_key_refuses_to_start() {
    let dir = std::env::temp_dir().join(common::unique("llm-sidecar-badvault"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway-sidecar"))
        .args([
            "--data-dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("LLM_GATEWAY_VAULT_KEY", "c2hvcnQ=")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("32 bytes"));
}

#[test]
fn hosted_model_specs_catalog() {
    let s = Server::start();
    let r = s.get("/ai-optimizer/v1beta/hosted-model-specs", &s.admin);
    assert_eq!(r.status, 200);
    let items = r.body["items"].as_array().unwrap();
    assert!(items.len() >= 4);
    let first = items.iter().find(|m| m["model"] == "llama3.1:8b").unwrap();
    assert_eq!(first["quantization"], "Q4_K_M");
    assert_eq!(first["memoryMib"], 16384);
    assert_eq!(first["regions"][0]["gpuName"], "nvidia-tesla-t4");
    for m in items {
        for f in [
            "model",
            "description",
            "cpu",
            "memoryMib",
            "provider",
            "tokensPerSecond",
            "createTime",
            "quantization",
            "regions",
        ] {
            assert!(m.get(f).is_some(), "{f} missing in {m}");
        }
        let q = m["quantization"].as_str().unwrap();
        assert!(
            q.starts_with('Q') || q.starts_with("IQ") || q.starts_with('F') || q == "BF16",
            "{q}"
        );
        for reg in m["regions"].as_array().unwrap() {
            for f in [
                "name",
                "pricePerHour",
                "cloud",
                "instanceType",
                "gpuCount",
                "gpuName",
            ] {
                assert!(reg.get(f).is_some(), "{f} missing in {reg}");
            }
            assert!(reg["pricePerHour"].as_str().unwrap().parse::<f64>().is_ok());
        }
    }
}

/// Issue 9.4 / 9.10: forbidden destinations and registrations the gateway cannot use are refused with 400.
#[test]
fn destinations_and_unusable_registrations_are_refused() {
    // The default harness allow-list is `127.0.0.1`; this server allows one private port for SaaS.
    let s = Server::start_with(&[(
        "LLM_GATEWAY_ALLOWED_DESTINATIONS",
        "127.0.0.1 10.9.0.0/16:8000",
    )]);
    let a = &s.admin;
    let one = |url: &str, hosted: bool| {
        let body = json!({"providers": [{"name": "p", "supportedProvider": "OPENAI_COMPATIBLE", "url": url,
            "isHosted": hosted, "models": ["m"]}]});
        s.post("/v1/llm/providers", a, &body.to_string())
    };
    for url in [
        "http://169.254.169.254/latest",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://0.0.0.0:9901",
        "http://[::1]:9901",
        "http://localhost:8081/internal",
        "http://2130706433",
        "http://0x7f.0.0.1",
        "http://127.1",
        "http://[::ffff:127.0.0.1]",
        "http://169.254.1.1",
        "http://api.example.com/v1\r\nX-Injected: 1",
        "http://api.example.com/v 1",
    ] {
        let r = one(url, true);
        assert_error(&r, 400, "forbidden_destination");
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
    }
    // Private ranges: hosted providers yes, SaaS only when allow-listed.
    assert_error(
        &one("http://192.168.1.5/v1", false),
        400,
        "forbidden_destination",
    );
    assert_eq!(one("http://192.168.1.5/v1", true).status, 201);
    assert_eq!(s.delete("/v1/llm/providers/p", a).status, 204);
    assert_eq!(one("http://10.9.1.1:8000/v1", false).status, 201);
    assert_eq!(s.delete("/v1/llm/providers/p", a).status, 204);
    assert_eq!(one("http://127.0.0.1:9/v1", false).status, 201);
    // Updates meet the same policy.
    let r = s.put(
        "/v1/llm/providers/p",
        a,
        r#"{"supportedProvider":"OPENAI_COMPATIBLE","url":"http://169.254.169.254","models":["m"]}"#,
    );
    assert_error(&r, 400, "forbidden_destination");
    // So do a config's api_base overrides.
    let r = s.post(
        "/config",
        a,
        r#"{"inherits":"default","providers":[{"name":"p","api_base":"http://[fe80::1]/v1"}]}"#,
    );
    assert_error(&r, 400, "forbidden_destination");

    // Azure without a key, or with an apiVersion that would break the query string.
    let azure = |extra: &str| {
        format!(
            r#"{{"providers":[{{"name":"az","supportedProvider":"AZURE","url":"https://x.openai.azure.com","models":["gpt-4o"]{extra}}}]}}"#
        )
    };
    assert_error(
        &s.post("/v1/llm/providers", a, &azure("")),
        400,
        "missing_api_key",
    );
    assert_error(
        &s.post(
            "/v1/llm/providers",
            a,
            &azure(r#","apiKey":"k-1234","apiVersion":"2024-02-01\r\nx: y""#),
        ),
        400,
        "invalid_value",
    );
    let r = s.post(
        "/v1/llm/providers",
        a,
        r#"{"providers":[{"name":"m","supportedProvider":"OPENAI_COMPATIBLE","url":"https://x.example","models":["gpt 4o\n"]}]}"#,
    );
    assert_error(&r, 400, "invalid_value");
    assert!(r.raw.contains("model names"), "{}", r.raw);
    assert_eq!(
        s.post("/v1/llm/providers", a, &azure(r#","apiKey":"k-1234""#))
            .status,
        201
    );
    // Removing the key of an Azure provider is refused too.
    let r = s.put(
        "/v1/llm/providers/az",
        a,
        r#"{"supportedProvider":"AZURE","url":"https://x.openai.azure.com","models":["gpt-4o"],"apiKey":""}"#,
    );
    assert_error(&r, 400, "missing_api_key");

    // An invalid allow-list refuses to start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway-sidecar"))
        .args([
            "--data-dir",
            s.dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("LLM_GATEWAY_ALLOWED_DESTINATIONS", "10.0.0.0/99")
        .env_remove("DATABASE_URL")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LLM_GATEWAY_ALLOWED_DESTINATIONS"));
}

/// Issue 16: the OpenAPI document is generated from the types and handlers; the committed file, the
/// `openapi` command and `GET /openapi.json` are the same document.
#[test]
fn openapi_document_is_generated_and_committed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway-sidecar"))
        .arg("openapi")
        .output()
        .unwrap();
    assert!(out.status.success());
    let generated = String::from_utf8(out.stdout).unwrap();
    let committed = include_str!("../openapi.json");
    assert!(
        generated == committed,
        "sidecar/openapi.json is stale: regenerate it with \
         `cargo run -q -p llm-gateway-sidecar -- openapi > sidecar/openapi.json`"
    );
    let s = Server::start();
    let r = s.request("GET", "/openapi.json", &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.raw, committed);
    let doc: Value = serde_json::from_str(committed).unwrap();
    // Request types are as strict as the server: unknown members are refused in both.
    for t in [
        "ProviderIn",
        "ProvidersIn",
        "ConfigIn",
        "KeyIn",
        "Settings",
        "RecordIn",
    ] {
        assert_eq!(
            doc["components"]["schemas"][t]["additionalProperties"],
            json!(false),
            "{t}"
        );
    }
}

/// Issue 12: the sidecar as an operated service. `/internal` and `/metrics` on their own port, JSON logs
/// with a request log that never holds keys, the admin key from a secret file never printed, catalogs
/// reloaded on SIGHUP without a restart (a bad file keeps the previous catalog).
#[test]
fn operated_service_listeners_logs_metrics_and_reload() {
    let tmp = std::env::temp_dir().join(common::unique("llm-sidecar-ops"));
    std::fs::create_dir_all(&tmp).unwrap();
    let admin = "lgw_admin_from_a_secret_file_0123456789";
    let key_file = tmp.join("admin.key");
    std::fs::write(&key_file, format!("{admin}\n")).unwrap();
    let specs = tmp.join("specs.json");
    let catalog = |model: &str| {
        json!({"items": [{"model": model, "description": "d", "cpu": 1, "memoryMib": 1024,
            "provider": "ollama", "tokensPerSecond": 1, "createTime": "2024-11-08T12:36:45Z",
            "quantization": "Q4_K_M", "regions": []}]})
        .to_string()
    };
    std::fs::write(&specs, catalog("first-model")).unwrap();
    let s = Server::start_logged(
        &[
            ("LLM_GATEWAY_ADMIN_KEY_FILE", key_file.to_str().unwrap()),
            ("LLM_GATEWAY_MODEL_SPECS", specs.to_str().unwrap()),
            // Only SIGHUP reloads here (the file watch has its own test).
            ("LLM_GATEWAY_CATALOG_POLL_SECONDS", "0"),
        ],
        &["--internal-listen", "127.0.0.1:0"],
    );
    assert_ne!(s.port, s.internal_port);
    let a = admin;

    // Separate listeners: the public port refuses /internal and /metrics, the internal port serves only them.
    let provider = r#"{"providers":[{"name":"p","supportedProvider":"OPENAI","apiKey":"sk-secret-provider-key-9876","models":["m"]}]}"#;
    assert_eq!(s.post("/v1/llm/providers", a, provider).status, 201);
    let r = s.resolve(a);
    assert_eq!(r.status, 200, "{}", r.raw);
    let body = format!("{{\"keySha256\":\"{}\"}}", llm_gateway::config::hash_key(a));
    let public = s.request(
        "POST",
        "/internal/v1/resolve",
        &[("x-gateway-token", &s.token)],
        Some(&body),
    );
    assert_error(&public, 404, "not_found");
    assert_eq!(s.request("GET", "/metrics", &[], None).status, 404);
    let on_internal = s.request_on(
        s.internal_port,
        "GET",
        "/v1/llm/providers",
        &[("X-API-Key", a)],
        None,
    );
    assert_eq!(on_internal.status, 404);
    assert_eq!(
        s.request_on(s.internal_port, "GET", "/readyz", &[], None)
            .status,
        200
    );
    let unknown = format!("{{\"keySha256\":\"{}\"}}", "ab".repeat(32));
    let miss = s.request_on(
        s.internal_port,
        "POST",
        "/internal/v1/resolve",
        &[("x-gateway-token", &s.token)],
        Some(&unknown),
    );
    assert_eq!(miss.status, 404);

    // Usage ingestion: accepted, duplicate, refused (an invalid batch).
    let org = r.body["identity"]["orgId"].as_str().unwrap().to_string();
    let rec = |id: &str| {
        json!({"id": id, "time": 1_764_000_000_000i64, "orgId": org, "provider": "p", "modelUsed": "m",
               "promptTokens": 1, "completionTokens": 1, "status": 200})
    };
    let batch = |records: Vec<Value>| json!({ "records": records }).to_string();
    let ingest = |body: String| {
        s.request_on(
            s.internal_port,
            "POST",
            "/internal/v1/usage",
            &[("x-gateway-token", &s.token)],
            Some(&body),
        )
    };
    assert_eq!(ingest(batch(vec![rec("u1"), rec("u2")])).status, 200);
    assert_eq!(ingest(batch(vec![rec("u2")])).status, 200);
    let mut bad = rec("u3");
    bad["promptTokens"] = json!(-1);
    assert_eq!(ingest(batch(vec![rec("u4"), bad])).status, 400);

    // Metrics in Prometheus text.
    let m = s.request_on(s.internal_port, "GET", "/metrics", &[], None);
    assert_eq!(m.status, 200);
    for line in [
        "llmgw_sidecar_resolve_total{result=\"hit\"} 1",
        "llmgw_sidecar_resolve_total{result=\"miss\"} 1",
        "# TYPE llmgw_sidecar_db_duration_seconds histogram",
        "llmgw_sidecar_db_duration_seconds_count{operation=\"write\"} 1",
        "llmgw_sidecar_http_requests_total{method=\"POST\",route=\"/v1/llm/providers\",status=\"201\"} 1",
        "llmgw_sidecar_usage_records_total{outcome=\"accepted\"} 2",
        "llmgw_sidecar_usage_records_total{outcome=\"duplicate\"} 1",
        "llmgw_sidecar_usage_records_total{outcome=\"refused\"} 2",
        "llmgw_sidecar_usage_batches_total 3",
        "llmgw_sidecar_db_duration_seconds_count{operation=\"ingest\"} 2",
    ] {
        assert!(m.raw.contains(line), "metrics lack {line}:\n{}", m.raw);
    }

    // Catalog reload on SIGHUP; a broken file is refused and the last good catalog keeps serving.
    let model = |s: &Server| {
        s.get("/ai-optimizer/v1beta/hosted-model-specs", a).body["items"][0]["model"].clone()
    };
    assert_eq!(model(&s), "first-model");
    std::fs::write(&specs, catalog("second-model")).unwrap();
    let pid = s.pid().to_string();
    let hup = || {
        assert!(std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success());
    };
    hup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while model(&s) != "second-model" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(model(&s), "second-model");
    std::fs::write(&specs, "{not json").unwrap();
    hup();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !s.log().contains("catalog reload failed") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(model(&s), "second-model");

    // Structured JSON logs; the request log has routes and statuses, never keys.
    let log = s.log();
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["level"] == "INFO" && l["route"] == "/v1/llm/providers" && l["status"] == 201));
    assert!(lines.iter().any(|l| l["level"] == "ERROR"
        && l["message"]
            .as_str()
            .unwrap()
            .contains("catalog reload failed")));
    for secret in [admin, "sk-secret-provider-key-9876", &s.token] {
        assert!(!log.contains(secret), "the log holds a secret");
        assert!(
            !s.stdout.join("\n").contains(secret),
            "stdout holds a secret"
        );
    }
}

fn sidecar_cmd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_llm-gateway-sidecar"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env_remove("LLM_GATEWAY_VAULT_KEY")
        .env_remove("LLM_GATEWAY_ADMIN_KEY")
        .output()
        .unwrap()
}

async fn sqlite_exec(path: &std::path::Path, sql: &[&str]) {
    use sqlx::Connection;
    let mut c = sqlx::sqlite::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    for q in sql {
        sqlx::query(q).execute(&mut c).await.unwrap();
    }
    c.close().await.unwrap();
}

/// Issue 12: `migrate` (sqlx migrations with checksums; databases of the earlier runner are adopted; a
/// modified migration is refused), `backup` (online SQLite copy + vault.key) and restore: provider keys
/// still decrypt after a restore, and do not without the backed-up vault.key.
#[test]
fn migrations_backup_and_restore() {
    if is_pg() {
        return; // SQLite files; PostgreSQL is pg_dump's (docs/operations.md)
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::temp_dir().join(common::unique("llm-sidecar-migrate"));
    let d = dir.to_str().unwrap();
    for _ in 0..2 {
        let out = sidecar_cmd(&["migrate", "--data-dir", d]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("schema at version [1, 2, 3, 14]"));
    }
    // A database of the earlier runner (schema_migrations) is adopted, not migrated twice.
    rt.block_on(sqlite_exec(
        &dir.join("sidecar.db"),
        &[
            "DROP TABLE _sqlx_migrations",
            // The earlier runner knew migrations 1, 2 and 14 (recorded below); migration 3's tables did not
            // exist then, so adopting must run it.
            "DROP TABLE budgets",
            "DROP TABLE rate_limits",
            "DROP TABLE limit_holders",
            "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            "INSERT INTO schema_migrations VALUES (1, 0), (2, 0), (14, 0)",
        ],
    ));
    let out = sidecar_cmd(&["migrate", "--data-dir", d]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("schema at version [1, 2, 3, 14]"));
    // A migration changed after it ran is refused (checksums).
    rt.block_on(sqlite_exec(
        &dir.join("sidecar.db"),
        &["UPDATE _sqlx_migrations SET checksum = X'00' WHERE version = 1"],
    ));
    let out = sidecar_cmd(&["migrate", "--data-dir", d]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("modified"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);

    // Backup while serving, restore into a new data dir: provider keys still decrypt.
    let s = Server::start();
    let a = s.admin.clone();
    let body = r#"{"providers":[{"name":"p","supportedProvider":"OPENAI","apiKey":"sk-provider-secret-1234","models":["m"]}]}"#;
    assert_eq!(s.post("/v1/llm/providers", &a, body).status, 201);
    let backup = std::env::temp_dir().join(common::unique("llm-sidecar-backup"));
    let out = sidecar_cmd(&[
        "backup",
        "--to",
        backup.to_str().unwrap(),
        "--data-dir",
        s.dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(backup.join("sidecar.db").exists() && backup.join("vault.key").exists());
    drop(s);
    let lost = std::env::temp_dir().join(common::unique("llm-sidecar-nokey"));
    std::fs::create_dir_all(&lost).unwrap();
    std::fs::copy(backup.join("sidecar.db"), lost.join("sidecar.db")).unwrap();
    let restored = Server::start_in(backup.clone(), &[]);
    let r = restored.resolve(&a);
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.body["identity"]["providers"][0]["apiKey"],
        "sk-provider-secret-1234"
    );
    drop(restored);

    // The same database without its vault.key: the sidecar starts with a new key and cannot decrypt.
    let s = Server::start_in(lost.clone(), &[]);
    let r = s.resolve(&a);
    assert_error(&r, 500, "internal_error");
    drop(s);
    let _ = std::fs::remove_dir_all(&lost);
}

/// Issue 12 on PostgreSQL: `pg_dump` while serving → `pg_restore` into a new database → a sidecar with the
/// same vault key decrypts the provider keys. Runs in the PostgreSQL pass of sidecar/test.sh (pg_dump on
/// PATH there).
#[test]
fn postgres_pg_dump_backup_and_restore() {
    let Some(base) = common::pg_base() else {
        return;
    };
    let have = |tool: &str| {
        std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        have("pg_dump") && have("pg_restore"),
        "pg_dump/pg_restore must be on PATH for the PostgreSQL pass"
    );
    let s = Server::start_with(&[("LLM_GATEWAY_VAULT_KEY", VAULT_KEY)]);
    let a = s.admin.clone();
    let body = r#"{"providers":[{"name":"p","supportedProvider":"OPENAI","apiKey":"sk-pg-provider-5678","models":["m"]}]}"#;
    assert_eq!(s.post("/v1/llm/providers", &a, body).status, 201);
    let dump = s.dir.join("sidecar.dump");
    let src = s.db_url.clone().unwrap();
    let out = std::process::Command::new("pg_dump")
        .args([
            "--format=custom",
            "--no-owner",
            "--file",
            dump.to_str().unwrap(),
            &src,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let target = common::fresh_pg_database(&base);
    let out = std::process::Command::new("pg_restore")
        .args(["--no-owner", "--dbname", &target, dump.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = std::env::temp_dir().join(common::unique("llm-sidecar-pgrestore"));
    let restored = Server::start_on(dir, Some(target), &[("LLM_GATEWAY_VAULT_KEY", VAULT_KEY)]);
    let r = restored.resolve(&a);
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.body["identity"]["providers"][0]["apiKey"],
        "sk-pg-provider-5678"
    );
}

/// Issue 12: catalog files changed on disk (a ConfigMap update sends no signal) are picked up by the
/// file watch.
#[test]
fn catalogs_reload_when_their_files_change() {
    let tmp = std::env::temp_dir().join(common::unique("llm-sidecar-watch"));
    std::fs::create_dir_all(&tmp).unwrap();
    let specs = tmp.join("specs.json");
    let catalog = |model: &str| {
        json!({"items": [{"model": model, "description": "d", "cpu": 1, "memoryMib": 1024,
            "provider": "ollama", "tokensPerSecond": 1, "createTime": "2024-11-08T12:36:45Z",
            "quantization": "Q4_K_M", "regions": []}]})
        .to_string()
    };
    std::fs::write(&specs, catalog("before")).unwrap();
    let s = Server::start_with(&[
        ("LLM_GATEWAY_MODEL_SPECS", specs.to_str().unwrap()),
        ("LLM_GATEWAY_CATALOG_POLL_SECONDS", "1"),
    ]);
    let model = || {
        s.get("/ai-optimizer/v1beta/hosted-model-specs", &s.admin)
            .body["items"][0]["model"]
            .clone()
    };
    assert_eq!(model(), "before");
    std::fs::write(&specs, catalog("after-the-change")).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while model() != "after-the-change" && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(model(), "after-the-change");
    let _ = std::fs::remove_dir_all(&tmp);
}
