//! Usage ingestion, aggregation, cost and the savings report, against the real binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::{assert_error, Server};
use serde_json::{json, Value};

const DAY: i64 = 86_400_000;
/// 2025-11-24T16:00:00Z.
const T0: i64 = 1_764_000_000_000;

fn rec(id: &str, org: &str, extra: Value) -> Value {
    let mut r = json!({
        "id": id, "time": T0, "orgId": org, "clusterId": null, "apiKeyId": "key_a", "configId": "cfg_a",
        "provider": "openai-main", "providerType": "OPENAI", "providerKeyLast4": "AAAA",
        "modelRequested": "gpt-4o", "modelUsed": "gpt-4o-2024-08-06",
        "promptTokens": 12, "completionTokens": 30, "cachedTokens": 0, "estimated": false,
        "status": 200, "latencyMs": 850, "ttftMs": 120, "stream": true, "fallback": false, "truncated": false,
        "tags": {"team": "search"}, "prompt": null, "completion": null
    });
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

fn post_usage(s: &Server, records: &[Value]) -> common::Resp {
    let body = json!({ "records": records }).to_string();
    s.request(
        "POST",
        "/internal/v1/usage",
        &[("x-gateway-token", &s.token)],
        Some(&body),
    )
}

#[track_caller]
fn ingest_ok(s: &Server, records: &[Value]) -> (u64, u64) {
    let r = post_usage(s, records);
    assert_eq!(r.status, 200, "{}", r.raw);
    (
        r.body["accepted"].as_u64().unwrap(),
        r.body["duplicates"].as_u64().unwrap(),
    )
}

fn org_of(s: &Server) -> String {
    // The admin key resolves to its organization.
    s.resolve(&s.admin).body["identity"]["orgId"]
        .as_str()
        .unwrap()
        .to_string()
}

fn providers(s: &Server, key: &str) {
    let r = s.post(
        "/v1/llm/providers",
        key,
        r#"{"providers":[
      {"name":"openai-main","supportedProvider":"OPENAI","apiKey":"sk-test-AAAA","models":["gpt-4o","gpt-4o-mini"],
       "prices":{"gpt-4o-mini":{"input":0.1,"output":0.4,"cached":0.05}}},
      {"name":"groq","supportedProvider":"GROQ","apiKey":"gsk-BBBB","models":["llama-3.1-8b-instant"]},
      {"name":"llama-c1","supportedProvider":"OPENAI_COMPATIBLE","url":"http://vllm.ai.svc:8000/v1",
       "isHosted":true,"clusterId":"c1","models":["llama3.1:8b",{"name":"gpt-4o","upstreamName":"llama3.1:8b"}]}
    ]}"#,
    );
    assert_eq!(r.status, 201, "{}", r.raw);
}

fn usage(s: &Server, key: &str, query: &str) -> Value {
    let r = s.get(&format!("/v1/llm/usage{query}"), key);
    assert_eq!(r.status, 200, "{}", r.raw);
    r.body
}

fn row<'a>(body: &'a Value, dim: &str, key: &str) -> &'a Value {
    body["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"][dim] == key)
        .unwrap_or_else(|| panic!("no row {dim}={key} in {body}"))
}

/// The sidecar's arithmetic: USD per 1M tokens -> nano-USD, cached tokens part of the prompt.
fn nusd(prompt: u64, completion: u64, cached: u64, input: f64, output: f64, cached_p: f64) -> i64 {
    let uncached = prompt - cached;
    ((uncached as f64 * input + cached as f64 * cached_p + completion as f64 * output) * 1000.0)
        .round() as i64
}

#[test]
fn ingestion_is_idempotent_and_loses_nothing() {
    let s = Server::start();
    let org = org_of(&s);
    // 500 records in 5 batches posted concurrently, then 2 batches retried concurrently with new ones.
    let records: Vec<Value> = (0..500)
        .map(|i| {
            rec(
                &format!("r{i}"),
                &org,
                json!({"promptTokens": 100 + i, "completionTokens": i % 37, "time": T0 + i * 1000}),
            )
        })
        .collect();
    let results: Vec<(u64, u64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = records
            .chunks(100)
            .map(|c| sc.spawn(|| ingest_ok(&s, c)))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().map(|r| r.0).sum::<u64>(), 500);
    assert_eq!(results.iter().map(|r| r.1).sum::<u64>(), 0);
    let retried: Vec<(u64, u64)> = std::thread::scope(|sc| {
        let a = sc.spawn(|| ingest_ok(&s, &records[0..100]));
        let b = sc.spawn(|| ingest_ok(&s, &records[250..350]));
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    assert_eq!(retried, vec![(0, 100), (0, 100)]);
    // Duplicates inside one batch count once.
    let dup = rec("dup-1", &org, json!({}));
    assert_eq!(ingest_ok(&s, &[dup.clone(), dup]), (1, 1));
    let t = &usage(&s, &s.admin, "")["totals"];
    assert_eq!(t["requests"], 501);
    let prompt: i64 = (0..500).map(|i| 100 + i).sum::<i64>() + 12;
    let completion: i64 = (0..500).map(|i| i % 37).sum::<i64>() + 30;
    assert_eq!(t["promptTokens"], prompt);
    assert_eq!(t["completionTokens"], completion);
    assert_eq!(t["totalTokens"], prompt + completion);
    let r = s.get("/v1/llm/usage/records?limit=1000", &s.admin);
    assert_eq!(r.body["records"].as_array().unwrap().len(), 501);

    // An empty batch is fine; the batch size is bounded.
    assert_eq!(ingest_ok(&s, &[]), (0, 0));
    let big: Vec<Value> = (0..501)
        .map(|i| rec(&format!("big{i}"), &org, json!({})))
        .collect();
    assert_error(&post_usage(&s, &big), 400, "invalid_value");

    // Malformed records: 400 naming the record, nothing of the batch stored.
    let mut bad = rec("bad-1", &org, json!({}));
    bad.as_object_mut().unwrap().remove("promptTokens");
    let r = post_usage(&s, &[rec("ok-1", &org, json!({})), bad]);
    assert_error(&r, 400, "invalid_record");
    assert_eq!(r.body["error"]["param"], "records[1]");
    assert!(
        r.raw.contains("bad-1") && r.raw.contains("promptTokens"),
        "{}",
        r.raw
    );
    for extra in [
        json!({"promptTokens": -1}),
        json!({"time": "yesterday"}),
        json!({"tags": {"team": 3}}),
        json!({"id": ""}),
        json!({"surprise": 1}),
    ] {
        let r = post_usage(&s, &[rec("bad-2", &org, extra.clone())]);
        assert_error(&r, 400, "invalid_record");
        assert_eq!(r.body["error"]["param"], "records[0]", "{extra}");
    }
    assert_error(&post_usage(&s, &[json!(1)]), 400, "invalid_record");
    assert_error(
        &s.request(
            "POST",
            "/internal/v1/usage",
            &[("x-gateway-token", &s.token)],
            Some("{"),
        ),
        400,
        "invalid_json",
    );
    assert_eq!(usage(&s, &s.admin, "")["totals"]["requests"], 501);

    // Token guard.
    let body = json!({"records": [rec("x", &org, json!({}))]}).to_string();
    for h in [vec![], vec![("x-gateway-token", "nope")]] {
        assert_error(
            &s.request("POST", "/internal/v1/usage", &h, Some(&body)),
            401,
            "invalid_api_key",
        );
    }
    // A gateway API key is not the internal token.
    assert_error(
        &s.request(
            "POST",
            "/internal/v1/usage",
            &[("x-gateway-token", &s.admin)],
            Some(&body),
        ),
        401,
        "invalid_api_key",
    );

    // Records of an organization the sidecar does not know are kept (and priced from the catalog).
    assert_eq!(
        ingest_ok(&s, &[rec("orphan-1", "org_unknown", json!({}))]),
        (1, 0)
    );
    assert_eq!(
        ingest_ok(&s, &[rec("orphan-1", "org_unknown", json!({}))]),
        (0, 1)
    );
    assert_eq!(usage(&s, &s.admin, "")["totals"]["requests"], 501);

    // Records survive a restart.
    let admin = s.admin.clone();
    let s = s.restart();
    assert_eq!(usage(&s, &admin, "")["totals"]["requests"], 501);
}

#[test]
fn group_by_filters_and_csv() {
    let s = Server::start();
    let a = s.admin.clone();
    let org = org_of(&s);
    let mut recs = Vec::new();
    // 3 days x (openai gpt-4o, groq llama) x teams; a cluster record; an error; an estimated one.
    for d in 0..3 {
        for (i, team) in ["search", "support"].iter().enumerate() {
            recs.push(rec(
                &format!("oa-{d}-{i}"),
                &org,
                json!({"time": T0 + d * DAY, "tags": {"team": team, "env": "prod"}, "promptTokens": 1000, "completionTokens": 100}),
            ));
            recs.push(rec(
                &format!("gq-{d}-{i}"),
                &org,
                json!({"time": T0 + d * DAY, "provider": "groq", "providerType": "GROQ",
                       "modelRequested": "gpt-4o", "modelUsed": "llama-3.1-8b-instant", "apiKeyId": "key_b",
                       "configId": "cfg_b", "tags": {"team": team}, "promptTokens": 2000, "completionTokens": 200}),
            ));
        }
    }
    recs.push(rec(
        "cl-1",
        &org,
        json!({"clusterId": "c1", "provider": "llama-c1", "providerType": "OPENAI_COMPATIBLE",
               "modelUsed": "llama3.1:8b", "tags": {}, "status": 502, "promptTokens": 0, "completionTokens": 0}),
    ));
    recs.push(rec(
        "est-1",
        &org,
        json!({"estimated": true, "tags": {"team": "search"}}),
    ));
    assert_eq!(ingest_ok(&s, &recs), (14, 0));

    let b = usage(&s, &a, "?group_by=provider");
    assert_eq!(b["groupBy"], json!(["provider"]));
    assert_eq!(b["rows"].as_array().unwrap().len(), 3);
    let oa = row(&b, "provider", "openai-main");
    assert_eq!(
        (&oa["requests"], &oa["promptTokens"], &oa["estimated"]),
        (&json!(7), &json!(6012), &json!(1))
    );
    assert_eq!(row(&b, "provider", "groq")["promptTokens"], 12000);
    assert_eq!(row(&b, "provider", "llama-c1")["errors"], 1);
    assert_eq!(b["totals"]["requests"], 14);
    assert_eq!(b["totals"]["errors"], 1);

    let b = usage(&s, &a, "?group_by=model");
    assert_eq!(row(&b, "model", "llama-3.1-8b-instant")["requests"], 6);
    let b = usage(&s, &a, "?group_by=api_key");
    assert_eq!(row(&b, "api_key", "key_b")["requests"], 6);
    assert_eq!(row(&b, "api_key", "key_a")["requests"], 8);
    let b = usage(&s, &a, "?group_by=config");
    assert_eq!(row(&b, "config", "cfg_b")["requests"], 6);
    let b = usage(&s, &a, "?group_by=cluster");
    assert_eq!(row(&b, "cluster", "c1")["requests"], 1);
    let n = b["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"]["cluster"].is_null())
        .unwrap();
    assert_eq!(n["requests"], 13);
    let b = usage(&s, &a, "?group_by=tag:team");
    assert_eq!(row(&b, "tag:team", "search")["requests"], 7);
    assert_eq!(row(&b, "tag:team", "support")["requests"], 6);
    let b = usage(&s, &a, "?group_by=day");
    let days: Vec<&str> = b["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["group"]["day"].as_str().unwrap())
        .collect();
    assert_eq!(days, ["2025-11-24", "2025-11-25", "2025-11-26"]);
    assert_eq!(b["rows"][0]["requests"], 6);
    let b = usage(&s, &a, "?group_by=day,provider");
    assert_eq!(b["rows"].as_array().unwrap().len(), 7);

    // Filters.
    let t = |q: &str| usage(&s, &a, q)["totals"]["requests"].clone();
    assert_eq!(t("?provider=groq"), 6);
    assert_eq!(t("?model=gpt-4o-2024-08-06"), 7);
    assert_eq!(t("?apiKeyId=key_b"), 6);
    assert_eq!(t("?clusterId=c1"), 1);
    assert_eq!(t("?configId=cfg_a"), 8);
    assert_eq!(t("?tag=team=support"), 6);
    assert_eq!(t("?tag=team%3Dsearch&tag=env=prod"), 3);
    assert_eq!(t("?tag=team=support&provider=groq"), 3);
    assert_eq!(t(&format!("?from={}", T0 + DAY)), 8);
    assert_eq!(t(&format!("?from={}&to={}", T0 + DAY, T0 + 2 * DAY)), 4);
    assert_eq!(t("?from=2025-11-25&to=2025-11-26T00:00:00Z"), 4);
    assert_eq!(t("?from=2025-11-25T01:00:00%2B01:00&to=2025-11-26"), 4);
    assert_eq!(t("?provider=nope"), 0);

    // CSV.
    let r = s.get("/v1/llm/usage?group_by=provider&format=csv", &a);
    assert_eq!(r.status, 200);
    let lines: Vec<&str> = r.raw.lines().collect();
    assert_eq!(
        lines[0],
        "provider,requests,prompt_tokens,completion_tokens,cached_tokens,total_tokens,cost_usd,list_cost_usd,\
         savings_usd,savings_percent,errors,estimated,unpriced,fallbacks"
    );
    assert_eq!(lines.len(), 4);
    let groq = lines.iter().find(|l| l.starts_with("groq,")).unwrap();
    assert!(groq.starts_with("groq,6,12000,1200,0,13200,"), "{groq}");
    // Formula injection (issue 9.7): user-controlled cells never start a spreadsheet formula.
    let evil = [
        rec(
            "ev-1",
            &org,
            json!({"tags": {"team": "=cmd|'/C calc'!A0"}, "modelUsed": "@SUM(A1)"}),
        ),
        rec(
            "ev-2",
            &org,
            json!({"tags": {"team": "+HYPERLINK(\"http://x\",\"y\")"}}),
        ),
        rec("ev-3", &org, json!({"tags": {"team": "-1+2"}})),
    ];
    assert_eq!(ingest_ok(&s, &evil), (3, 0));
    let r = s.get("/v1/llm/usage?group_by=tag:team,model&format=csv", &a);
    assert_eq!(r.status, 200, "{}", r.raw);
    for line in r.raw.lines().skip(1) {
        for cell in line.split(',').take(2) {
            let cell = cell.trim_start_matches('"');
            assert!(
                !cell.starts_with(['=', '+', '-', '@', '\t', '\r']),
                "{line}"
            );
        }
    }
    assert!(r.raw.contains("'=cmd|'/C calc'!A0,'@SUM(A1),"), "{}", r.raw);
    assert!(r.raw.contains("'-1+2,"), "{}", r.raw);
    let r = s.get("/v1/llm/usage?format=csv", &a);
    assert_eq!(r.raw.lines().count(), 2);
    assert!(
        r.raw.lines().nth(1).unwrap().starts_with("17,"),
        "{}",
        r.raw
    );

    // Bad parameters.
    assert_error(
        &s.get("/v1/llm/usage?group_by=colour", &a),
        400,
        "invalid_value",
    );
    assert_error(&s.get("/v1/llm/usage?tag=team", &a), 400, "invalid_value");
    assert_error(&s.get("/v1/llm/usage?from=soon", &a), 400, "invalid_value");
    // Strict dates (issue 12): no rolling over into the next month.
    for bad in [
        "2025-02-31",
        "2025-11-31",
        "2025-13-01",
        "2025-11-24T25:00:00Z",
    ] {
        let r = s.get(&format!("/v1/llm/usage?from={bad}"), &a);
        assert_error(&r, 400, "invalid_value");
        assert_eq!(r.body["error"]["param"], "from", "{bad}");
    }
    assert_error(&s.get("/v1/llm/usage?format=xml", &a), 400, "invalid_value");
    assert_error(&s.get("/v1/llm/usage?colour=red", &a), 400, "unknown_field");
    assert_error(
        &s.get("/v1/llm/usage?from=2025-11-26&to=2025-11-25", &a),
        400,
        "invalid_value",
    );
    assert_error(&s.get("/v1/llm/usage", "lgw_nope"), 401, "invalid_api_key");
}

#[test]
fn cost_from_catalog_override_and_hosted_specs() {
    let s = Server::start();
    let a = s.admin.clone();
    let org = org_of(&s);
    providers(&s, &a);
    let prices = s.get("/v1/llm/prices", &a);
    assert_eq!(prices.status, 200);
    assert!(prices.body["version"].as_str().unwrap().len() >= 4);
    assert_eq!(prices.body["models"]["gpt-4o"]["input"], 2.5);
    let p = s.get("/v1/llm/providers/openai-main", &a);
    assert_eq!(
        p.body["prices"],
        json!({"gpt-4o-mini":{"input":0.1,"output":0.4,"cached":0.05}})
    );
    let recs = vec![
        // Catalog: gpt-4o snapshot, 2.5 / 10 / cached 1.25.
        rec(
            "c1",
            &org,
            json!({"modelUsed": "gpt-4o-2024-08-06", "promptTokens": 1200, "completionTokens": 345, "cachedTokens": 200}),
        ),
        // Override (public name of the provider's model) vs list price of gpt-4o.
        rec(
            "c2",
            &org,
            json!({"modelUsed": "gpt-4o-mini", "promptTokens": 5000, "completionTokens": 700, "cachedTokens": 1000}),
        ),
        // Hosted: llama3.1:8b at 0.24082 USD/h (cheapest region) and 50 tokens/s, asked as gpt-4o.
        rec(
            "c3",
            &org,
            json!({"provider": "llama-c1", "providerType": "OPENAI_COMPATIBLE", "clusterId": "c1",
                   "modelUsed": "llama3.1:8b", "promptTokens": 800, "completionTokens": 400}),
        ),
        // Unknown model: zero, flagged, no savings.
        rec(
            "c4",
            &org,
            json!({"provider": "groq", "providerType": "GROQ", "modelUsed": "mystery-model",
                   "promptTokens": 1000, "completionTokens": 1000}),
        ),
        // Requested model unknown to the catalog: list cost = actual cost.
        rec(
            "c5",
            &org,
            json!({"provider": "groq", "providerType": "GROQ", "modelRequested": "my-alias",
                   "modelUsed": "llama-3.1-8b-instant", "promptTokens": 10000, "completionTokens": 5000}),
        ),
    ];
    assert_eq!(ingest_ok(&s, &recs), (5, 0));
    let r = s.get("/v1/llm/usage/records", &a);
    let by_id = |id: &str| -> Value {
        r.body["records"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()
            .clone()
    };
    let list_4o = |p, c, ca| nusd(p, c, ca, 2.5, 10.0, 1.25);
    let c1 = by_id("c1");
    assert_eq!(c1["costNanoUsd"], list_4o(1200, 345, 200));
    assert_eq!(c1["listCostNanoUsd"], c1["costNanoUsd"]);
    assert_eq!(c1["priceSource"], "catalog");
    assert_eq!(c1["costNanoUsd"], 6_200_000); // 1000*2.5 + 200*1.25 + 345*10 = 6200 per 1M
    let c2 = by_id("c2");
    assert_eq!(c2["priceSource"], "override");
    assert_eq!(c2["costNanoUsd"], nusd(5000, 700, 1000, 0.1, 0.4, 0.05));
    assert_eq!(c2["listCostNanoUsd"], list_4o(5000, 700, 1000));
    let c3 = by_id("c3");
    let per_m = 0.24082 / (50.0 * 3600.0) * 1e6;
    assert_eq!(c3["priceSource"], "hosted");
    assert_eq!(c3["costNanoUsd"], nusd(800, 400, 0, per_m, per_m, per_m));
    assert_eq!(c3["listCostNanoUsd"], list_4o(800, 400, 0));
    let c4 = by_id("c4");
    assert_eq!(
        (
            &c4["priceSource"],
            &c4["costNanoUsd"],
            &c4["listCostNanoUsd"]
        ),
        (&json!("unpriced"), &json!(0), &json!(0))
    );
    let c5 = by_id("c5");
    assert_eq!(c5["costNanoUsd"], nusd(10000, 5000, 0, 0.05, 0.08, 0.05));
    assert_eq!(c5["listCostNanoUsd"], c5["costNanoUsd"]);
    assert!(c5["catalogVersion"].as_str().unwrap().starts_with("20"));

    // Sums and savings.
    let t = &usage(&s, &a, "")["totals"];
    let cost: i64 = ["c1", "c2", "c3", "c4", "c5"]
        .iter()
        .map(|i| by_id(i)["costNanoUsd"].as_i64().unwrap())
        .sum();
    let list: i64 = ["c1", "c2", "c3", "c4", "c5"]
        .iter()
        .map(|i| by_id(i)["listCostNanoUsd"].as_i64().unwrap())
        .sum();
    assert_eq!(t["costNanoUsd"], cost);
    assert_eq!(t["listCostNanoUsd"], list);
    assert!((t["savings"].as_f64().unwrap() - (list - cost) as f64 / 1e9).abs() < 1e-12);
    assert_eq!(t["unpriced"], 1);
    let csv = s.get("/v1/llm/usage?format=csv", &a).raw;
    let line = csv.lines().nth(1).unwrap();
    let cost_field = line.split(',').nth(5).unwrap();
    assert_eq!(
        cost_field,
        format!("{}.{:09}", cost / 1_000_000_000, cost % 1_000_000_000)
    );

    // Overrides are validated and replaced with the registration; the filter never sees them.
    assert_error(
        &s.put(
            "/v1/llm/providers/groq",
            &a,
            r#"{"supportedProvider":"GROQ","models":["llama-3.1-8b-instant"],"prices":{"gpt-4o":{"input":1,"output":1}}}"#,
        ),
        400,
        "unknown_model",
    );
    assert_error(
        &s.put(
            "/v1/llm/providers/groq",
            &a,
            r#"{"supportedProvider":"GROQ","models":["llama-3.1-8b-instant"],"prices":{"llama-3.1-8b-instant":{"input":-1,"output":1}}}"#,
        ),
        400,
        "invalid_value",
    );
    assert_error(
        &s.put(
            "/v1/llm/providers/groq",
            &a,
            r#"{"supportedProvider":"GROQ","models":["llama-3.1-8b-instant"],"prices":{"llama-3.1-8b-instant":{"input":1}}}"#,
        ),
        400,
        "missing_field",
    );
    let r = s.put(
        "/v1/llm/providers/groq",
        &a,
        r#"{"supportedProvider":"GROQ","models":["llama-3.1-8b-instant"],"prices":{"llama-3.1-8b-instant":{"input":1,"output":2}}}"#,
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        r.body["prices"],
        json!({"llama-3.1-8b-instant":{"input":1.0,"output":2.0}})
    );
    let id = s.resolve(&a).body["identity"].clone();
    assert!(!id.to_string().contains("prices"), "{id}");
    assert_eq!(
        ingest_ok(
            &s,
            &[rec(
                "c6",
                &org,
                json!({"provider": "groq", "modelRequested": "llama-3.1-8b-instant",
                       "modelUsed": "llama-3.1-8b-instant", "promptTokens": 1000, "completionTokens": 1000})
            )]
        ),
        (1, 0)
    );
    let b = usage(
        &s,
        &a,
        "?provider=groq&model=llama-3.1-8b-instant&from=2025-11-24",
    );
    // c5 (old prices, stored at ingestion) + c6 (override: 1000*1 + 1000*2 = 3000 per 1M).
    assert_eq!(
        b["totals"]["costNanoUsd"],
        nusd(10000, 5000, 0, 0.05, 0.08, 0.05) + 3_000_000
    );
    // c6 was asked for as itself at list price (0.05 / 0.08): the override costs more than list.
    assert!(b["totals"]["savings"].as_f64().unwrap() < 0.0);
}

#[test]
fn store_prompts_setting_controls_prompt_storage() {
    let s = Server::start();
    let a = s.admin.clone();
    let org = org_of(&s);
    providers(&s, &a);
    let (kid, key) = s.new_key(&a, r#"{"config_id":"default","name":"app"}"#);
    assert_eq!(
        s.get("/v1/llm/settings", &a).body,
        json!({"storePrompts": false})
    );
    assert_eq!(s.resolve(&key).body["storePrompts"], false);
    let with_text = |id: &str| {
        rec(
            id,
            &org,
            json!({"apiKeyId": kid, "prompt": "secret question", "completion": "secret answer"}),
        )
    };
    // Off (default): text sent anyway is dropped before storing.
    assert_eq!(ingest_ok(&s, &[with_text("p1")]), (1, 0));
    // On at the organization.
    let r = s.put("/v1/llm/settings", &a, r#"{"storePrompts":true}"#);
    assert_eq!(
        (r.status, &r.body),
        (200, &json!({"storePrompts": true})),
        "{}",
        r.raw
    );
    assert_eq!(s.resolve(&key).body["storePrompts"], true);
    assert!(s.resolve(&key).body["identity"]
        .get("storePrompts")
        .is_none());
    assert_eq!(ingest_ok(&s, &[with_text("p2")]), (1, 0));
    // The key overrides the organization.
    let r = s.put(
        &format!("/v1/llm/api-keys/{kid}/settings"),
        &a,
        r#"{"storePrompts":false}"#,
    );
    assert_eq!(r.status, 200, "{}", r.raw);
    assert_eq!(
        s.get(&format!("/v1/llm/api-keys/{kid}/settings"), &a).body,
        json!({"storePrompts": false})
    );
    assert_eq!(s.resolve(&key).body["storePrompts"], false);
    assert_eq!(s.resolve(&a).body["storePrompts"], true);
    assert_eq!(ingest_ok(&s, &[with_text("p3")]), (1, 0));
    // Structured prompts (message arrays) are stored as JSON text.
    assert_eq!(
        ingest_ok(
            &s,
            &[rec(
                "p4",
                &org,
                json!({"apiKeyId": "key_other", "prompt": [{"content":"hi"}], "completion": "yo"})
            )]
        ),
        (1, 0)
    );
    let r = s.get("/v1/llm/usage/records", &a);
    let get = |id: &str| {
        r.body["records"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == id)
            .unwrap()
            .clone()
    };
    assert_eq!(
        (&get("p1")["prompt"], &get("p1")["completion"]),
        (&Value::Null, &Value::Null)
    );
    assert_eq!(get("p2")["prompt"], "secret question");
    assert_eq!(get("p2")["completion"], "secret answer");
    assert_eq!(get("p3")["prompt"], Value::Null);
    assert_eq!(get("p4")["prompt"], r#"[{"content":"hi"}]"#);
    // Back off: routing settings are unaffected.
    let r = s.put(
        "/v1/llm/settings",
        &a,
        r#"{"provider":"openai-main","storePrompts":false}"#,
    );
    assert_eq!(
        r.body,
        json!({"provider":"openai-main","storePrompts":false})
    );
    assert_eq!(
        s.resolve(&a).body["identity"]["orgSettings"],
        json!({"provider":"openai-main"})
    );
    assert_error(
        &s.put("/v1/llm/settings", &a, r#"{"storePrompts":"yes"}"#),
        400,
        "invalid_value",
    );
}

#[test]
fn organizations_and_clusters_are_isolated() {
    let s = Server::start();
    let a = s.admin.clone();
    let org_a = org_of(&s);
    let (org_b, b) = s.new_org("beta");
    providers(&s, &a);
    let (_, ck) = s.new_key(&a, r#"{"config_id":"default","cluster_id":"c1"}"#);
    let mut recs = Vec::new();
    for i in 0..5 {
        recs.push(rec(&format!("a{i}"), &org_a, json!({"promptTokens": 100})));
    }
    for i in 0..3 {
        recs.push(rec(
            &format!("ac{i}"),
            &org_a,
            json!({"clusterId": "c1", "provider": "llama-c1", "modelUsed": "llama3.1:8b", "promptTokens": 7}),
        ));
    }
    for i in 0..2 {
        recs.push(rec(&format!("b{i}"), &org_b, json!({"promptTokens": 1})));
    }
    assert_eq!(ingest_ok(&s, &recs), (10, 0));
    assert_eq!(usage(&s, &a, "")["totals"]["requests"], 8);
    assert_eq!(usage(&s, &b, "")["totals"]["requests"], 2);
    assert_eq!(usage(&s, &b, "")["totals"]["promptTokens"], 2);
    // Filters never reach beyond the caller's organization.
    assert_eq!(
        usage(&s, &b, "?provider=openai-main&apiKeyId=key_a")["totals"]["requests"],
        2
    );
    assert_eq!(usage(&s, &b, "?clusterId=c1")["totals"]["requests"], 0);
    // The cluster-scoped key sees its cluster only, whatever it asks for.
    let c = usage(&s, &ck, "?group_by=cluster");
    assert_eq!(c["totals"]["requests"], 3);
    assert_eq!(c["rows"].as_array().unwrap().len(), 1);
    assert_eq!(usage(&s, &ck, "?clusterId=c2")["totals"]["requests"], 0);
    let r = s.get("/v1/llm/usage/records", &ck);
    assert!(r.body["records"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x["clusterId"] == "c1"));
    let r = s.get("/v1/llm/usage/records", &b);
    assert_eq!(r.body["records"].as_array().unwrap().len(), 2);
    // Reports too.
    let rb = s.get("/v1/llm/report?from=2025-11-01&to=2025-12-01", &b);
    assert_eq!(rb.status, 200);
    assert!(
        rb.raw.contains(r#"data-metric="requests">2<"#),
        "{}",
        rb.raw
    );
    let rc = s.get("/v1/llm/report?from=2025-11-01&to=2025-12-01", &ck);
    assert!(rc.raw.contains(r#"data-metric="requests">3<"#));
}

#[test]
fn report_authentication_and_links() {
    let s = Server::start();
    let a = s.admin.clone();
    let org = org_of(&s);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(
        ingest_ok(
            &s,
            &[
                rec(
                    "n1",
                    &org,
                    json!({"time": now - 1000, "promptTokens": 1000000, "completionTokens": 0})
                ),
                rec(
                    "n2",
                    &org,
                    json!({"time": now - 2 * DAY, "modelUsed": "gpt-4o-mini", "promptTokens": 1000000,
                           "completionTokens": 0})
                )
            ]
        ),
        (2, 0)
    );
    // Header authentication.
    let r = s.get("/v1/llm/report", &a);
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(r.raw.starts_with("<!doctype html>"));
    assert!(r.raw.contains(r#"data-metric="requests">2<"#), "{}", r.raw);
    assert!(r.raw.contains(r#"data-metric="tokens">2,000,000<"#));
    // 1M at 2.5 + 1M at 0.15 = 2.65; list price 2 x 2.5 = 5.00.
    assert!(r.raw.contains(r#"data-metric="cost">$2.65<"#), "{}", r.raw);
    assert!(r.raw.contains(r#"data-metric="list-cost">$5.00<"#));
    assert!(r.raw.contains(r#"data-metric="savings">$2.35<"#));
    assert!(r.raw.contains(r#"data-metric="savings-pct">47.0%<"#));
    assert!(r.raw.contains("<svg") && !r.raw.contains("<script"));
    assert!(!r.raw.contains("http://") && !r.raw.contains("https://"));
    // Without credentials: 401 (an HTML page).
    let r = s.request("GET", "/v1/llm/report", &[], None);
    assert_eq!(r.status, 401);
    assert!(r.raw.contains("Report unavailable"));
    // Keys are never accepted in the URL.
    let r = s.request("GET", &format!("/v1/llm/report?key={a}"), &[], None);
    assert_eq!(r.status, 400);
    // Signed links.
    let l = s.post("/v1/llm/report/link", &a, "");
    assert_eq!(l.status, 201, "{}", l.raw);
    let url = l.body["url"].as_str().unwrap().to_string();
    assert!(url.starts_with("/v1/llm/report?token=") && !url.contains(&a));
    let r = s.request("GET", &format!("{url}&days=7"), &[], None);
    assert_eq!(r.status, 200, "{}", r.raw);
    assert!(r.raw.contains(r#"data-metric="requests">2<"#));
    let r = s.request("GET", &format!("{url}&days=1"), &[], None);
    assert!(r.raw.contains(r#"data-metric="requests">1<"#));
    // Tampered token.
    let token = l.body["token"].as_str().unwrap();
    let mut t = token.as_bytes().to_vec();
    t[20] = if t[20] == b'A' { b'B' } else { b'A' };
    let r = s.request(
        "GET",
        &format!("/v1/llm/report?token={}", String::from_utf8(t).unwrap()),
        &[],
        None,
    );
    assert_eq!(r.status, 401);
    assert_error(
        &s.post("/v1/llm/report/link", &a, r#"{"ttlSeconds":0}"#),
        400,
        "invalid_value",
    );
    // Expiry.
    let short = s.post("/v1/llm/report/link", &a, r#"{"ttlSeconds":1}"#);
    std::thread::sleep(std::time::Duration::from_millis(1300));
    let r = s.request("GET", short.body["url"].as_str().unwrap(), &[], None);
    assert_eq!(r.status, 401);
    // Revoking the key that made a link kills the link.
    let (kid, key) = s.new_key(&a, r#"{"config_id":"default"}"#);
    let l2 = s.post("/v1/llm/report/link", &key, "");
    let u2 = l2.body["url"].as_str().unwrap().to_string();
    assert_eq!(s.request("GET", &u2, &[], None).status, 200);
    assert_eq!(s.delete(&format!("/v1/llm/api-keys/{kid}"), &a).status, 204);
    assert_eq!(s.request("GET", &u2, &[], None).status, 401);
    // Empty state.
    let (_, b) = s.new_org("empty");
    let r = s.get("/v1/llm/report", &b);
    assert_eq!(r.status, 200);
    assert!(r.raw.contains("No usage in this period"));
    // The OpenAPI description lists the new endpoints.
    let o = s.request("GET", "/openapi.json", &[], None);
    for p in [
        "/v1/llm/usage",
        "/v1/llm/usage/records",
        "/v1/llm/prices",
        "/v1/llm/report",
        "/v1/llm/report/link",
        "/internal/v1/usage",
    ] {
        assert!(o.body["paths"].get(p).is_some(), "openapi lacks {p}");
    }
}

/// Issue 12: two sidecar processes on one database (SQLite file or PostgreSQL) ingesting at the same time
/// lose nothing: SQLite writers wait (BEGIN IMMEDIATE + busy timeout) instead of failing "database is locked".
#[test]
fn two_processes_ingest_concurrently_without_lost_writes() {
    let s = Server::start();
    let r = s.replica();
    let org = org_of(&s);
    const BATCHES: usize = 40;
    const PER_BATCH: usize = 25;
    std::thread::scope(|scope| {
        for (w, server) in [&s, &r].into_iter().enumerate() {
            let org = org.clone();
            scope.spawn(move || {
                for b in 0..BATCHES {
                    let recs: Vec<Value> = (0..PER_BATCH)
                        .map(|i| rec(&format!("w{w}-b{b}-r{i}"), &org, json!({})))
                        .collect();
                    assert_eq!(ingest_ok(server, &recs), (PER_BATCH as u64, 0));
                }
            });
        }
    });
    let total = (2 * BATCHES * PER_BATCH) as u64;
    for server in [&s, &r] {
        assert_eq!(usage(server, &s.admin, "")["totals"]["requests"], total);
    }
}
