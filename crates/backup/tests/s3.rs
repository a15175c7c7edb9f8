//! Repositories on S3, against a real S3 server (s3s-fs) on loopback: the backend conformance
//! suite, a repository's whole life, prefixes that keep repositories apart, and failures that
//! say what is wrong without stalling on retries.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cairn_backup::*;
use cairn_testkit::pattern as noise;
use cairn_testkit::s3::{start_s3_server, S3Server, ACCESS_KEY_ID, SECRET_ACCESS_KEY};
use common::{conforms, full, incremental, restored, Disk};

/// The environment a user would set for this server.
fn server_env(server: &S3Server) -> HashMap<&'static str, String> {
    HashMap::from([
        ("AWS_ENDPOINT_URL", server.endpoint()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_string()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_string()),
    ])
}

/// `url` on `server`, built the way the daemon will: from the URL and the environment.
fn location(server: &S3Server, url: &str) -> S3Location {
    let env = server_env(server);
    S3Location::from_url_with(url, |name| env.get(name).cloned()).unwrap()
}

fn backend(location: &S3Location) -> Arc<dyn Backend> {
    Arc::new(ObjectStoreBackend::s3(location).unwrap())
}

fn keys(backend: &dyn Backend, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = backend.list(prefix).unwrap().into_iter().map(|o| o.key).collect();
    keys.sort();
    keys
}

#[test]
fn the_s3_backend_conforms_at_the_bucket_root_and_under_a_prefix() {
    let server = start_s3_server();
    server.create_bucket("root");
    server.create_bucket("prefixed");
    conforms(&*backend(&location(&server, "s3://root")));
    conforms(&*backend(&location(&server, "s3://prefixed/cairn/repo-1/")));
}

#[test]
fn a_listing_longer_than_one_page_is_whole() {
    // S3 lists at most 1000 keys a request; the rest come by continuation token.
    let server = start_s3_server();
    server.create_bucket("many");
    let backend = backend(&location(&server, "s3://many/repo"));
    let expected: Vec<String> = (0..1003).map(|i| format!("packs/{:02x}/{i:05}", i % 7)).collect();
    for key in &expected {
        backend.put(key, Bytes::from_static(b"x")).unwrap();
    }
    let mut expected = expected;
    expected.sort();
    assert_eq!(keys(&*backend, "packs/"), expected);
}

#[test]
fn a_repository_on_s3_backs_up_restores_verifies_and_reopens() {
    let server = start_s3_server();
    server.create_bucket("backups");
    let location = location(&server, "s3://backups/cairn");
    let repo = Repository::init(backend(&location), Some("s3 passphrase"), KdfParams::cheap()).unwrap();
    // 3 MiB and a short last chunk, with a hole in the middle.
    let disk = Disk::new((3 << 20) + 1000);
    disk.write(0, &noise(1 << 20, 21));
    disk.write((2 << 20) + 5, &noise((1 << 20) + 995, 22));
    let base = full(&repo, &disk);
    assert_eq!(restored(&repo, &base), disk.bytes());
    let before = disk.bytes();
    disk.write(100_000, &noise(10, 23));
    disk.write(3 << 20, &noise(10, 24));
    let next = incremental(&repo, &disk, &base, &[100_000..100_010, 3 << 20..(3 << 20) + 10]);
    assert_eq!(next.stats.chunks_read, 2, "only the two chunks that changed are read");
    // A new client, as after a restart, finds both through what is stored on the server.
    let reopened = Repository::open(backend(&location), Some("s3 passphrase")).unwrap();
    assert_eq!(reopened.list_backups().unwrap().len(), 2);
    assert_eq!(restored(&reopened, &next), disk.bytes());
    assert_eq!(restored(&reopened, &base), before);
    let report = reopened.verify(None, None).unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
}

#[test]
fn a_prefix_keeps_repositories_apart() {
    let server = start_s3_server();
    server.create_bucket("shared");
    let root = backend(&location(&server, "s3://shared"));
    let a = backend(&location(&server, "s3://shared/tenants/a"));
    // A sibling whose name starts with the other's: a prefix is whole path parts, not text.
    let ab = backend(&location(&server, "s3://shared/tenants/ab"));
    a.put("config", Bytes::from_static(b"a")).unwrap();
    ab.put("config", Bytes::from_static(b"ab")).unwrap();
    ab.put("packs/00/p", Bytes::from_static(b"ab pack")).unwrap();
    assert_eq!(keys(&*a, ""), ["config"]);
    assert_eq!(&a.get("config").unwrap()[..], b"a");
    assert_eq!(keys(&*ab, ""), ["config", "packs/00/p"]);
    assert_eq!(keys(&*root, ""), ["tenants/a/config", "tenants/ab/config", "tenants/ab/packs/00/p"]);
    // Deleting through one prefix leaves the other's object of the same name.
    a.delete("config").unwrap();
    assert_eq!(&ab.get("config").unwrap()[..], b"ab");
    // Two repositories in one bucket.
    let one = Repository::init(backend(&location(&server, "s3://shared/repos/one")), None, KdfParams::cheap()).unwrap();
    let two = Repository::init(backend(&location(&server, "s3://shared/repos/two")), None, KdfParams::cheap()).unwrap();
    let disk = Disk::new(1 << 20);
    disk.write(0, &noise(1 << 20, 25));
    full(&one, &disk);
    assert_eq!(one.list_backups().unwrap().len(), 1);
    assert!(two.list_backups().unwrap().is_empty());
}

/// Fails `what` with a message containing one of `expected`, within a few seconds.
fn fails_quickly(what: &str, call: impl FnOnce() -> Result<Repository, Error>, expected: &[&str]) {
    let start = Instant::now();
    let message = match call() {
        Ok(_) => panic!("{what}: opened a repository"),
        Err(e) => e.to_string(),
    };
    assert!(start.elapsed() < Duration::from_secs(10), "{what}: took {:?}", start.elapsed());
    assert!(expected.iter().any(|e| message.contains(e)), "{what}: unclear error {message:?}");
}

#[test]
fn bad_credentials_and_an_unreachable_endpoint_fail_quickly_and_clearly() {
    let server = start_s3_server();
    server.create_bucket("guarded");
    let good = location(&server, "s3://guarded/repo");
    Repository::init(backend(&good), None, KdfParams::cheap()).unwrap();

    let wrong_secret = S3Location { secret_access_key: "not the secret".into(), ..good.clone() };
    fails_quickly("a wrong secret", || Repository::open(backend(&wrong_secret), None), &["403", "privileges"]);
    let unknown_key = S3Location { access_key_id: "nobody".into(), ..good.clone() };
    fails_quickly("an unknown key", || Repository::open(backend(&unknown_key), None), &["403", "privileges"]);

    // A port that was free a moment ago: nothing listens there, so connecting is refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let nowhere = S3Location { endpoint: Some(format!("http://127.0.0.1:{port}")), ..good.clone() };
    fails_quickly("an unreachable endpoint", || Repository::open(backend(&nowhere), None), &["error sending request"]);
}

#[test]
fn urls_and_the_environment_make_a_location() {
    let env = HashMap::from([
        ("AWS_ENDPOINT_URL", "https://s3.example.test".to_string()),
        ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:3900".to_string()),
        ("AWS_DEFAULT_REGION", "eu-west-1".to_string()),
        ("AWS_ACCESS_KEY_ID", "key".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "secret".to_string()),
        ("AWS_SESSION_TOKEN", String::new()),
    ]);
    let parse = |url: &str| S3Location::from_url_with(url, |name| env.get(name).cloned());
    let location = parse("s3://my-bucket/some/prefix/").unwrap();
    assert_eq!(
        location,
        S3Location {
            endpoint: Some("http://127.0.0.1:3900".into()),
            bucket: "my-bucket".into(),
            prefix: Some("some/prefix".into()),
            region: "eu-west-1".into(),
            access_key_id: "key".into(),
            secret_access_key: "secret".into(),
            session_token: None,
            allow_http: true,
        },
        "the S3-specific endpoint wins; an empty variable is unset"
    );
    assert_eq!(location.to_string(), "s3://my-bucket/some/prefix");
    assert!(!format!("{location:?}").contains("secret\""), "Debug leaves the secret out: {location:?}");
    assert_eq!(parse("s3://my-bucket/").unwrap().prefix, None);

    // AWS itself, over HTTPS only, in the default region.
    let keys_only = |name: &str| match name {
        "AWS_ACCESS_KEY_ID" => Some("key".to_string()),
        "AWS_SECRET_ACCESS_KEY" => Some("secret".to_string()),
        _ => None,
    };
    let aws = S3Location::from_url_with("s3://bucket", keys_only).unwrap();
    assert_eq!((aws.endpoint.as_deref(), aws.region.as_str(), aws.allow_http), (None, "us-east-1", false));

    for (url, why) in [
        ("https://bucket/prefix", "not an S3 URL"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://Bucket", "bucket name"),
        ("s3://ab", "bucket name"),
        ("s3://-bucket", "bucket name"),
        ("s3://bucket_1", "bucket name"),
        ("s3://bucket//prefix", "prefix"),
        ("s3://bucket/a/../b", "prefix"),
        ("s3://bucket/prefix?region=x", "no query"),
    ] {
        match parse(url) {
            Err(BackendError::Other(message)) => assert!(message.contains(why), "{url}: {message}"),
            other => panic!("{url}: {other:?}"),
        }
    }
    assert!(
        matches!(S3Location::from_url_with("s3://bucket", |_| None), Err(BackendError::Other(m)) if m.contains("AWS_ACCESS_KEY_ID"))
    );

    // A location from config is checked the same way before any request.
    let from_config =
        S3Location { endpoint: Some("http://s3.internal.test:9000".into()), allow_http: false, ..location.clone() };
    assert!(matches!(ObjectStoreBackend::s3(&from_config), Err(BackendError::Other(m)) if m.contains("plain HTTP")));
    let from_config = S3Location { endpoint: Some("ftp://host".into()), ..location.clone() };
    assert!(ObjectStoreBackend::s3(&from_config).is_err());
    let from_config = S3Location { region: String::new(), ..location };
    assert!(ObjectStoreBackend::s3(&from_config).is_err());
}
