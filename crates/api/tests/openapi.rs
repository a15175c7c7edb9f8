//! The OpenAPI document and the router agree: every documented operation is routed (a request
//! without a token reaches authentication, not a 404 or 405), and the document is the one served.

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use cairn_control::{Control, Settings};
use serde_json::Value;
use tower::ServiceExt;

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
            if !["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
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
    assert!(operations >= 37, "the document lists {operations} operations");
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
