//! The OpenAPI document and the router agree: every documented operation is routed (a request
//! without a token reaches authentication, not a 404 or 405), every route is documented, every
//! reference in the document resolves, and the document is the one served.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cairn_control::{Control, Settings};
use serde_json::Value;
use tower::ServiceExt;

/// The methods a path item can hold; its other members ("parameters", "summary") are not.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn router(dir: &std::path::Path) -> axum::Router {
    let (control, recovery) = Control::open_dir(Settings::in_dir(dir)).await.unwrap();
    assert!(recovery.admin_token.is_some(), "a new data directory gets an admin token");
    cairn_api::router(cairn_api::AppState::new(control))
}

#[tokio::test]
async fn every_documented_operation_is_routed() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(dir.path()).await;
    let doc: Value = serde_json::from_str(cairn_api::OPENAPI).unwrap();
    let mut operations = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            // Path items also hold "parameters" and "summary", which are not methods.
            if !METHODS.contains(&method.as_str()) {
                continue;
            }
            let method: Method = method.to_uppercase().parse().unwrap();
            // Fill path parameters with a plausible id; authentication comes first anyway.
            let uri = path.replace('{', "x-").replace('}', "");
            let request = Request::builder().method(method.clone()).uri(&uri).body(Body::empty()).unwrap();
            let status = app.clone().oneshot(request).await.unwrap().status();
            let open = op.get("security").and_then(Value::as_array).is_some_and(|s| s.is_empty());
            let expected = if open { StatusCode::OK } else { StatusCode::UNAUTHORIZED };
            assert_eq!(status, expected, "{method} {path} ({})", op["operationId"]);
            operations += 1;
        }
    }
    assert!(operations >= 63, "the document lists {operations} operations");
}

#[tokio::test]
async fn unknown_paths_answer_json_404() {
    let dir = tempfile::tempdir().unwrap();
    let app = router(dir.path()).await;
    let response = app.oneshot(Request::get("/v2/nothing").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["error"]["code"], "not_found");
}

/// The routes in the router's source, as (path as served, methods): each `.route("PATH", get(a).post(b))`.
/// Parsing the source rather than asking axum, which cannot list a router's routes.
fn routes_in_source() -> Vec<(String, Vec<String>)> {
    const ROUTE: &str = ".route(\"";
    let source = include_str!("../src/routes.rs");
    // Routes before the nest are the /v1 router's; routes after it are on the root router.
    let nest = source.find(".nest(\"/v1\"").expect("the router nests its routes under /v1");
    let mut routes = Vec::new();
    for (at, _) in source.match_indices(ROUTE) {
        let (path, rest) = source[at + ROUTE.len()..].split_once('"').expect("a route's path is a string literal");
        // The method router runs to the parenthesis that closes `.route(`; its methods are the
        // words called at the top level, so a handler's own arguments are not taken for one.
        let mut methods = Vec::new();
        let mut word = String::new();
        let mut depth = 0;
        for c in rest.chars() {
            match c {
                '(' => {
                    if depth == 0 {
                        methods.push(std::mem::take(&mut word));
                    }
                    depth += 1;
                }
                ')' if depth == 0 => break,
                ')' => depth -= 1,
                c if depth == 0 && (c.is_alphanumeric() || c == '_') => word.push(c),
                _ if depth == 0 => word.clear(),
                _ => {}
            }
        }
        let served = if at > nest { path.to_string() } else { format!("/v1{path}") };
        routes.push((served, methods));
    }
    routes
}

#[test]
fn every_route_is_documented() {
    let doc: Value = serde_json::from_str(cairn_api::OPENAPI).unwrap();
    let routes = routes_in_source();
    assert!(routes.iter().any(|(path, _)| path == "/metrics"), "/metrics is routed on the root router");
    let mut undocumented = Vec::new();
    for (path, methods) in &routes {
        assert!(!methods.is_empty(), "no method found for the route {path}");
        for method in methods {
            assert!(METHODS.contains(&method.as_str()), "{path}: {method:?} is not a method the parser knows");
            if doc["paths"][path.as_str()][method.as_str()].is_null() {
                undocumented.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    assert!(undocumented.is_empty(), "routed but missing from openapi.json: {undocumented:?}");
    // Equal counts make the two directions one: a route the parser missed (or a parser that
    // finds nothing) shows here instead of passing unnoticed.
    let routed: usize = routes.iter().map(|(_, methods)| methods.len()).sum();
    let documented: usize = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().keys().filter(|key| METHODS.contains(&key.as_str())).count())
        .sum();
    assert_eq!(routed, documented, "operations found in routes.rs and in openapi.json");
}

/// Collects every reference under `value`: each `$ref`, and each discriminator mapping's target.
fn references<'a>(value: &'a Value, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                match (key.as_str(), member) {
                    ("$ref", Value::String(target)) => found.push(target),
                    _ => references(member, found),
                }
            }
            if let Some(mapping) = value.pointer("/discriminator/mapping").and_then(Value::as_object) {
                found.extend(mapping.values().filter_map(Value::as_str));
            }
        }
        Value::Array(items) => {
            for item in items {
                references(item, found);
            }
        }
        _ => {}
    }
}

#[test]
fn every_reference_resolves() {
    let doc: Value = serde_json::from_str(cairn_api::OPENAPI).unwrap();
    let mut found = Vec::new();
    references(&doc, &mut found);
    assert!(found.iter().any(|r| r.starts_with("#/components/schemas/")), "the document references no schema");
    // Only references into this document's components: a client may not follow any other.
    let resolves =
        |r: &str| r.starts_with("#/components/") && r.strip_prefix('#').and_then(|p| doc.pointer(p)).is_some();
    let unresolved: Vec<&str> = found.into_iter().filter(|&r| !resolves(r)).collect();
    assert!(unresolved.is_empty(), "references to nothing in openapi.json: {unresolved:?}");
}
