//! HTTP-level tests of the REST API contract (docs/api.md) against a real `cairn serve`:
//! authentication, validation and error shape, tenant isolation, idempotency, ids and names,
//! and sizes.

mod common;

use common::*;
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// Checks the error shape every client relies on: a stable `code`, a one-line `message` and,
/// when given, the offending `field`.
fn assert_error(body: &Value, code: &str, field: Option<&str>) {
    let err = &body["error"];
    assert_eq!(err["code"], code, "error code in {body}");
    let message = err["message"].as_str().unwrap_or_else(|| panic!("no message in {body}"));
    assert!(!message.trim().is_empty() && !message.contains('\n'), "message is not one non-empty line: {body}");
    if let Some(f) = field {
        assert_eq!(err["field"], f, "error field in {body}");
    }
}

/// Whether an id has the documented form: the kind's prefix and 16 lowercase hex digits.
fn is_id(id: &str, prefix: &str) -> bool {
    id.strip_prefix(prefix)
        .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// Creates a tenant as the admin and returns its token.
fn tenant(srv: &TestServer, name: &str) -> String {
    let created = srv.expect("POST", "/v1/tenants", Some(json!({ "name": name })), 201);
    assert_eq!(created["tenant"]["name"], name);
    assert_eq!(created["tenant"]["admin"], false, "a created tenant is not an administrator: {created}");
    assert!(is_id(&id(&created["tenant"]), "ten-"), "tenant id: {created}");
    field(&created, "token")
}

#[test]
fn auth_and_public_endpoints() {
    let srv = TestServer::start();

    // No token, an unknown token, or a token in the wrong scheme: 401 with the error shape.
    for token in [None, Some("not-a-token")] {
        let (status, body) = srv.http("GET", "/v1/vms", None, token);
        assert_eq!(status, 401, "GET /v1/vms with token {token:?}: {body}");
        assert_error(&body, "unauthorized", None);
    }
    let (status, _) =
        srv.http_with("GET", "/v1/vms", None, None, &[("Authorization", &format!("Basic {}", srv.admin_token))]);
    assert_eq!(status, 401, "a Basic header carrying the token is not a bearer token");

    // A write without a token is refused and does nothing.
    let (status, body) = srv.http("POST", "/v1/volumes", Some(json!({"name": "sneaky", "size": "1M"})), None);
    assert_eq!(status, 401, "{body}");
    assert_error(&body, "unauthorized", None);
    assert_eq!(srv.expect("GET", "/v1/volumes", None, 200), json!([]), "the refused POST created a volume");

    // The admin token written on first start works and belongs to the admin tenant.
    assert_eq!(srv.expect("GET", "/v1/vms", None, 200), json!([]));
    let me = srv.expect("GET", "/v1/whoami", None, 200);
    assert_eq!(me["name"], "admin", "{me}");
    assert_eq!(me["admin"], true, "{me}");

    // The API description needs no token (clients fetch it before they have one).
    let (status, doc) = srv.http("GET", "/v1/openapi.json", None, None);
    assert_eq!(status, 200, "{doc}");
    let version = doc["openapi"].as_str().unwrap_or_else(|| panic!("no `openapi` version in {doc}"));
    assert!(version.starts_with("3.1"), "docs/api.md promises OpenAPI 3.1, got {version}");
    assert!(doc["paths"]["/v1/vms"].is_object(), "no /v1/vms in the document's paths");

    // Prometheus scrapes without a token.
    let (status, text) = srv.http_text("GET", "/metrics", None, None, &[]);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("cairn_"), "no cairn_ metric in /metrics:\n{text}");
}

#[test]
fn validation_errors() {
    let srv = TestServer::start();
    let post_volume = |body: Value| srv.http("POST", "/v1/volumes", Some(body), Some(&srv.admin_token));

    // Malformed JSON is a client error with the stable code, not a 500 or a framework page.
    let (status, body) =
        srv.http_with("POST", "/v1/volumes", Some(r#"{"name": "x", "size": "#), Some(&srv.admin_token), &[]);
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "invalid", None);

    // Bad sizes name the field. 1000 is not a multiple of 512; 16 TiB + 512 is above the limit.
    for size in [json!(1000), json!("abc"), json!("17T"), json!(16 * TIB + 512), json!(-512), json!("")] {
        let (status, body) = post_volume(json!({"name": "v", "size": size}));
        assert_eq!(status, 400, "size {size}: {body}");
        assert_error(&body, "invalid", Some("size"));
    }
    // The limit itself is allowed (volumes are thin, so this costs nothing).
    let big = srv.expect("POST", "/v1/volumes", Some(json!({"name": "big", "size": "16T"})), 201);
    assert_eq!(big["size"], 16 * TIB);

    // Missing fields are named too.
    let (status, body) = post_volume(json!({"size": "1M"}));
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "invalid", Some("name"));
    let (status, body) = post_volume(json!({"name": "nosize"}));
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "invalid", Some("size"));

    // Names: 1–63 of [A-Za-z0-9._-], starting with a letter or digit, not shaped like an id
    // (a name that looks like an id would make "id or name" lookups ambiguous).
    let long = "a".repeat(64);
    for name in ["a b", "", "-lead", ".hidden", "semi;colon", "vol-0123456789abcdef", "vm-00000000000000ff", &long] {
        let (status, body) = post_volume(json!({"name": name, "size": "1M"}));
        assert_eq!(status, 400, "name {name:?}: {body}");
        assert_error(&body, "invalid", Some("name"));
    }
    let ok_name = format!("A{}", "z.9_-".repeat(12)); // 61 characters of every allowed kind
    srv.expect("POST", "/v1/volumes", Some(json!({"name": ok_name, "size": "1M"})), 201);
    let max_name = "b".repeat(63);
    srv.expect("POST", "/v1/volumes", Some(json!({"name": max_name, "size": "1M"})), 201);
    let (status, body) =
        srv.http("POST", "/v1/vms", Some(json!({"name": "a b", "size": "1M"})), Some(&srv.admin_token));
    assert_eq!(status, 400, "{body}");
    assert_error(&body, "invalid", Some("name"));

    // A VM needs exactly one source for its root disk.
    let (status, body) = srv.http("POST", "/v1/vms", Some(json!({"name": "nosrc"})), Some(&srv.admin_token));
    assert_eq!(status, 400, "a VM without size, template or image: {body}");
    assert_error(&body, "invalid", None);

    // Unknown ids and names are 404 not_found, for every kind.
    for path in [
        "/v1/vms/nosuch",
        "/v1/vms/vm-0000000000000000",
        "/v1/volumes/nosuch",
        "/v1/volumes/vol-0000000000000000",
        "/v1/snapshots/snap-0000000000000000",
        "/v1/templates/nosuch",
        "/v1/vms/nosuch/snapshots",
        "/v1/volumes/nosuch/snapshots",
        "/v1/jobs/job-0000000000000000",
    ] {
        let (status, body) = srv.http("GET", path, None, Some(&srv.admin_token));
        assert_eq!(status, 404, "GET {path}: {body}");
        assert_error(&body, "not_found", None);
    }
    let (status, body) = srv.http("DELETE", "/v1/volumes/nosuch", None, Some(&srv.admin_token));
    assert_eq!(status, 404, "{body}");
    assert_error(&body, "not_found", None);

    // A name already taken is a conflict, and the first resource is left as it was.
    let first = srv.expect("POST", "/v1/volumes", Some(json!({"name": "dup", "size": "1M"})), 201);
    let (status, body) = post_volume(json!({"name": "dup", "size": "2M"}));
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "conflict", None);
    assert_eq!(srv.expect("GET", "/v1/volumes/dup", None, 200)["size"], first["size"]);
    srv.expect("POST", "/v1/vms", Some(json!({"name": "vdup", "size": "1M"})), 201);
    let (status, body) =
        srv.http("POST", "/v1/vms", Some(json!({"name": "vdup", "size": "1M"})), Some(&srv.admin_token));
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "conflict", None);
}

#[test]
fn rule_breaks_are_conflicts() {
    let srv = TestServer::start();
    let vm = srv.expect("POST", "/v1/vms", Some(json!({"name": "host", "size": "4M"})), 201);
    let data = srv.expect("POST", "/v1/volumes", Some(json!({"name": "disk", "size": "1M", "vm": "host"})), 201);
    assert_eq!(data["vm"], vm["id"]);

    // An attached volume is in use: deleting it would pull it from under the VM.
    let (status, body) = srv.http("DELETE", "/v1/volumes/disk", None, Some(&srv.admin_token));
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "conflict", None);
    // A root volume never becomes standalone.
    let root = field(&vm, "root_volume");
    let (status, body) = srv.http("POST", &format!("/v1/volumes/{root}/detach"), None, Some(&srv.admin_token));
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "conflict", None);
    // Shrinking would cut data off.
    let (status, body) =
        srv.http("POST", "/v1/volumes/disk/grow", Some(json!({"size": "512K"})), Some(&srv.admin_token));
    assert_eq!(status, 409, "{body}");
    assert_error(&body, "conflict", None);

    // Once detached, it can go.
    let detached = srv.expect("POST", "/v1/volumes/disk/detach", None, 200);
    assert_eq!(detached["vm"], Value::Null);
    assert_eq!(srv.expect("GET", "/v1/vms/host", None, 200)["data_volumes"], json!([]));
    srv.expect("DELETE", "/v1/volumes/disk", None, 200);
    srv.expect("GET", "/v1/volumes/disk", None, 404);
}

#[test]
fn tenants_are_isolated() {
    let srv = TestServer::start();
    let alice = tenant(&srv, "alice");
    let bob = tenant(&srv, "bob");
    assert_ne!(alice, bob);
    let (status, body) = srv.http("POST", "/v1/tenants", Some(json!({"name": "alice"})), Some(&srv.admin_token));
    assert_eq!(status, 409, "a second tenant named alice: {body}");
    let names: Vec<Value> =
        srv.expect("GET", "/v1/tenants", None, 200).as_array().unwrap().iter().map(|t| t["name"].clone()).collect();
    for name in ["admin", "alice", "bob"] {
        assert!(names.contains(&json!(name)), "{name} missing from {names:?}");
    }
    assert_eq!(srv.expect_as(&alice, "GET", "/v1/whoami", None, 200)["name"], "alice");

    // Only administrators make or list tenants.
    let (status, body) = srv.http("POST", "/v1/tenants", Some(json!({"name": "mallory"})), Some(&alice));
    assert_eq!(status, 403, "{body}");
    assert_error(&body, "forbidden", None);
    let (status, _) = srv.http("GET", "/v1/tenants", None, Some(&bob));
    assert_eq!(status, 403);

    // Alice's resources.
    let vm = srv.expect_as(&alice, "POST", "/v1/vms", Some(json!({"name": "web", "size": "4M"})), 201);
    let vm_id = id(&vm);
    let vol = srv.expect_as(&alice, "POST", "/v1/volumes", Some(json!({"name": "data", "size": "1M"})), 201);
    let vol_id = id(&vol);
    let snap =
        srv.expect_as(&alice, "POST", &format!("/v1/volumes/{vol_id}/snapshots"), Some(json!({"name": "s1"})), 201);
    let snap_id = id(&snap);
    let vm_snaps = srv.expect_as(&alice, "POST", &format!("/v1/vms/{vm_id}/snapshots"), Some(json!({})), 201);
    assert_eq!(vm_snaps.as_array().map(Vec::len), Some(1), "{vm_snaps}");

    // Bob sees nothing of hers: every list is empty.
    for path in ["/v1/vms", "/v1/volumes", "/v1/snapshots", "/v1/templates", "/v1/jobs"] {
        assert_eq!(srv.expect_as(&bob, "GET", path, None, 200), json!([]), "bob's GET {path}");
    }
    // Her resources answer 404 to him, exactly like ones that do not exist, by id and by name.
    for path in [
        format!("/v1/vms/{vm_id}"),
        "/v1/vms/web".to_string(),
        format!("/v1/volumes/{vol_id}"),
        "/v1/volumes/data".to_string(),
        format!("/v1/snapshots/{snap_id}"),
        "/v1/snapshots/s1".to_string(),
    ] {
        let (status, body) = srv.http("GET", &path, None, Some(&bob));
        assert_eq!(status, 404, "bob GET {path}: {body}");
        assert_error(&body, "not_found", None);
    }
    // Her VM's snapshot list shows him nothing: the same answer as for a VM that never
    // existed (a deleted VM's id still lists what is left, so an id alone is not enough).
    let (status, body) = srv.http("GET", &format!("/v1/vms/{vm_id}/snapshots"), None, Some(&bob));
    let (missing_status, missing) = srv.http("GET", "/v1/vms/vm-0000000000000000/snapshots", None, Some(&bob));
    assert_eq!((status, &body["error"]["code"]), (missing_status, &missing["error"]["code"]), "{body} vs {missing}");
    assert_error(&body, "not_found", None);
    // He cannot act on them either.
    for (method, path, body) in [
        ("POST", format!("/v1/vms/{vm_id}/snapshots"), Some(json!({}))),
        ("POST", format!("/v1/vms/{vm_id}/stop"), None),
        ("POST", format!("/v1/volumes/{vol_id}/snapshots"), Some(json!({}))),
        ("POST", format!("/v1/volumes/{vol_id}/grow"), Some(json!({"size": "2M"}))),
        ("DELETE", format!("/v1/snapshots/{snap_id}"), None),
        ("DELETE", format!("/v1/volumes/{vol_id}"), None),
        ("DELETE", format!("/v1/vms/{vm_id}"), None),
        ("DELETE", "/v1/vms/web".to_string(), None),
    ] {
        let (status, answer) = srv.http(method, &path, body, Some(&bob));
        assert_eq!(status, 404, "bob {method} {path}: {answer}");
    }
    // Attaching across tenants, in both directions, is 404 too.
    srv.expect_as(&bob, "POST", "/v1/vms", Some(json!({"name": "bobvm", "size": "4M"})), 201);
    srv.expect_as(&bob, "POST", "/v1/volumes", Some(json!({"name": "bobvol", "size": "1M"})), 201);
    let (status, body) =
        srv.http("POST", &format!("/v1/volumes/{vol_id}/attach"), Some(json!({"vm": "bobvm"})), Some(&bob));
    assert_eq!(status, 404, "bob attaches alice's volume: {body}");
    let (status, body) = srv.http("POST", "/v1/volumes/bobvol/attach", Some(json!({"vm": vm_id})), Some(&bob));
    assert_eq!(status, 404, "bob attaches to alice's vm: {body}");
    // Referring to her snapshot in a body answers what a missing snapshot answers.
    for (path, body) in [
        (format!("/v1/snapshots/{snap_id}/restore"), json!({})),
        ("/v1/templates".to_string(), json!({"name": "stolen", "snapshot": snap_id})),
    ] {
        let (status, answer) = srv.http("POST", &path, Some(body.clone()), Some(&bob));
        let missing_path = path.replace(&snap_id, "snap-0000000000000000");
        let missing_body: Value =
            serde_json::from_str(&body.to_string().replace(&snap_id, "snap-0000000000000000")).unwrap();
        let (missing_status, missing) = srv.http("POST", &missing_path, Some(missing_body), Some(&bob));
        assert!((400..500).contains(&status), "bob POST {path}: {status} {answer}");
        assert_eq!((status, &answer["error"]["code"]), (missing_status, &missing["error"]["code"]), "bob POST {path}");
    }

    // Nothing of hers changed, and nothing of his leaked into her lists.
    assert_eq!(srv.expect_as(&alice, "GET", "/v1/vms/web", None, 200)["state"], "running");
    srv.expect_as(&alice, "GET", &format!("/v1/snapshots/{snap_id}"), None, 200);
    assert_eq!(srv.expect_as(&alice, "GET", &format!("/v1/volumes/{vol_id}"), None, 200)["vm"], Value::Null);
    assert_eq!(ids(&srv.expect_as(&alice, "GET", "/v1/vms", None, 200)), vec![vm_id.clone()]);
    assert_eq!(ids(&srv.expect_as(&alice, "GET", "/v1/volumes", None, 200)).len(), 2, "her root and data volumes");

    // Names are per tenant: bob may use hers, and each sees their own behind it.
    let bob_web = srv.expect_as(&bob, "POST", "/v1/vms", Some(json!({"name": "web", "size": "4M"})), 201);
    srv.expect_as(&bob, "POST", "/v1/volumes", Some(json!({"name": "data", "size": "1M"})), 201);
    assert_ne!(id(&bob_web), vm_id);
    assert_eq!(id(&srv.expect_as(&alice, "GET", "/v1/vms/web", None, 200)), vm_id);
    assert_eq!(id(&srv.expect_as(&bob, "GET", "/v1/vms/web", None, 200)), id(&bob_web));
    assert_eq!(srv.expect_as(&bob, "GET", "/v1/vms", None, 200).as_array().unwrap().len(), 2);
    // The admin is a tenant like the others: it does not see theirs in its own lists.
    assert_eq!(srv.expect("GET", "/v1/vms", None, 200), json!([]));
}

#[test]
fn idempotency_key_replays_the_first_answer() {
    let srv = TestServer::start();
    let token = srv.admin_token.clone();
    let post = |body: &str, key: &str| {
        srv.http_with("POST", "/v1/volumes", Some(body), Some(&token), &[("Idempotency-Key", key)])
    };

    let body = r#"{"name": "idem", "size": "1M"}"#;
    let (s1, a1) = post(body, "key-1");
    assert_eq!(s1, 201, "{a1}");
    // A client retrying after a lost answer gets the same answer, and no second volume.
    let (s2, a2) = post(body, "key-1");
    assert_eq!((s2, &a2), (s1, &a1), "the retry's answer differs from the first");
    let named_idem =
        srv.expect("GET", "/v1/volumes", None, 200).as_array().unwrap().iter().filter(|v| v["name"] == "idem").count();
    assert_eq!(named_idem, 1);
    // The same body without the key is a new request, so the name is now taken.
    let (s3, a3) = srv.http("POST", "/v1/volumes", Some(serde_json::from_str(body).unwrap()), Some(&token));
    assert_eq!(s3, 409, "{a3}");

    // Reusing the key for another request is a conflict, and that request is not done.
    let (s4, a4) = post(r#"{"name": "idem2", "size": "1M"}"#, "key-1");
    assert_eq!(s4, 409, "{a4}");
    assert_error(&a4, "conflict", None);
    srv.expect("GET", "/v1/volumes/idem2", None, 404);

    // Other tenants' keys are their own.
    let carol = tenant(&srv, "carol");
    let (s5, a5) = srv.http_with("POST", "/v1/volumes", Some(body), Some(&carol), &[("Idempotency-Key", "key-1")]);
    assert_eq!(s5, 201, "carol's key-1 is not the admin's: {a5}");
    assert_ne!(id(&a5), id(&a1));
}

#[test]
fn ids_and_names_are_interchangeable() {
    let srv = TestServer::start();
    let vm = srv.expect("POST", "/v1/vms", Some(json!({"name": "web", "size": "4M"})), 201);
    let vm_id = id(&vm);
    assert!(is_id(&vm_id, "vm-"), "{vm}");
    let root_id = field(&vm, "root_volume");
    assert!(is_id(&root_id, "vol-"), "{vm}");

    // A VM by id and by name is the same answer.
    let by_id = srv.expect("GET", &format!("/v1/vms/{vm_id}"), None, 200);
    let by_name = srv.expect("GET", "/v1/vms/web", None, 200);
    assert_eq!(by_id, by_name);
    // Its root volume is named after it and answers to that name.
    let root = srv.expect("GET", "/v1/volumes/web-root", None, 200);
    assert_eq!(id(&root), root_id);
    assert_eq!(root, srv.expect("GET", &format!("/v1/volumes/{root_id}"), None, 200));

    // A snapshot by id and by name; without a name it is named by its id.
    let snap = srv.expect("POST", "/v1/volumes/web-root/snapshots", Some(json!({"name": "before"})), 201);
    let snap_id = id(&snap);
    assert!(is_id(&snap_id, "snap-"), "{snap}");
    assert_eq!(snap["volume"], root_id.as_str());
    assert_eq!(
        srv.expect("GET", &format!("/v1/snapshots/{snap_id}"), None, 200),
        srv.expect("GET", "/v1/snapshots/before", None, 200)
    );
    let unnamed = srv.expect("POST", &format!("/v1/volumes/{root_id}/snapshots"), Some(json!({})), 201);
    assert_eq!(unnamed["name"], unnamed["id"], "a snapshot's name defaults to its id");

    // Names work in bodies too, and actions take names in the path.
    let data = srv.expect("POST", "/v1/volumes", Some(json!({"name": "d1", "size": "1M", "vm": "web"})), 201);
    assert_eq!(data["vm"], vm_id.as_str());
    let tpl = srv.expect("POST", "/v1/templates", Some(json!({"name": "gold", "snapshot": "before"})), 201);
    assert_eq!(tpl["source"], json!({"kind": "snapshot", "id": snap_id}));
    assert!(is_id(&id(&tpl), "tpl-"), "{tpl}");
    assert_eq!(
        srv.expect("GET", "/v1/templates/gold", None, 200),
        srv.expect("GET", &format!("/v1/templates/{}", id(&tpl)), None, 200)
    );
    assert_eq!(srv.expect("POST", "/v1/vms/web/stop", None, 200)["state"], "stopped");
    assert_eq!(srv.expect("POST", &format!("/v1/vms/{vm_id}/start"), None, 200)["state"], "running");
    let listed = srv.expect("GET", "/v1/snapshots?volume=web-root", None, 200);
    assert_eq!(ids(&listed), ids(&srv.expect("GET", &format!("/v1/snapshots?volume={root_id}"), None, 200)));
    assert_eq!(listed.as_array().unwrap().len(), 2);
}

#[test]
fn sizes_accept_suffixes_and_answer_integers() {
    let srv = TestServer::start();
    let cases = [
        (json!("1G"), GIB),
        (json!("512M"), 512 * MIB),
        (json!(1048576), MIB),
        (json!("1GiB"), GIB),
        (json!("4096"), 4096),
        (json!("2m"), 2 * MIB),
        (json!("3MB"), 3 * MIB),
        (json!("64K"), 64 * 1024),
        (json!("1T"), TIB),
    ];
    for (n, (size, bytes)) in cases.iter().enumerate() {
        let name = format!("v{n}");
        let made = srv.expect("POST", "/v1/volumes", Some(json!({"name": name, "size": size})), 201);
        // An integer in the answer, never the string the client sent.
        assert_eq!(made["size"].as_u64(), Some(*bytes), "size {size} answered {}", made["size"]);
        assert_eq!(srv.expect("GET", &format!("/v1/volumes/{name}"), None, 200)["size"].as_u64(), Some(*bytes));
    }
    // VMs and grow take the same forms.
    let vm = srv.expect("POST", "/v1/vms", Some(json!({"name": "vm1", "size": "8MiB"})), 201);
    let root = srv.expect("GET", &format!("/v1/volumes/{}", field(&vm, "root_volume")), None, 200);
    assert_eq!(root["size"].as_u64(), Some(8 * MIB));
    let grown = srv.expect("POST", "/v1/volumes/v0/grow", Some(json!({"size": "2GiB"})), 200);
    assert_eq!(grown["size"].as_u64(), Some(2 * GIB));
}
