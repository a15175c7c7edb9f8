//! kill -9 of the daemon in the middle of a stream of lifecycle requests, many times over the
//! same data directory. After each restart: every acknowledged creation is there, every
//! acknowledged deletion stays gone, and every listed volume, snapshot and template is served
//! over NBD (metadata and volume engine agree). Rounds: CAIRN_SERVICE_CRASH_ROUNDS (default 12);
//! the seed is printed and CAIRN_SERVICE_CRASH_SEED replays one.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{have_all, TestServer};
use serde_json::{json, Value};

/// xorshift64*: small, seedable, enough to pick operations and kill points.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What the client knows of a resource from the answers it got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    Exists,
    Deleted,
    /// The request was cut off by the kill: either outcome is correct.
    Unsure,
}

/// The client's view: (collection, name) → what it knows.
type Model = BTreeMap<(&'static str, String), Known>;

/// A request and, if it is answered 2xx, what that proves about which resource.
type Request = (&'static str, String, Option<Value>, (&'static str, String, Known));

struct Client {
    url: String,
    token: String,
    agent: ureq::Agent,
}

enum Outcome {
    Answered(u16, Value),
    /// No answer: the daemon is gone.
    Cut,
}

impl Client {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Outcome {
        let request = self
            .agent
            .request(method, &format!("{}{path}", self.url))
            .set("Authorization", &format!("Bearer {}", self.token));
        let result = match body {
            Some(b) => request.send_json(b),
            None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(_) => return Outcome::Cut,
        };
        let status = response.status();
        match response.into_string() {
            Ok(text) => Outcome::Answered(status, serde_json::from_str(&text).unwrap_or(Value::Null)),
            Err(_) => Outcome::Cut,
        }
    }
}

fn pick(model: &Model, rng: &mut Rng, collection: &str) -> Option<String> {
    let alive: Vec<&String> =
        model.iter().filter(|((c, _), k)| *c == collection && **k == Known::Exists).map(|((_, n), _)| n).collect();
    (!alive.is_empty()).then(|| alive[rng.below(alive.len() as u64) as usize].clone())
}

/// Sends random lifecycle requests until the daemon stops answering, recording what each
/// answer proves. `n` makes names unique across rounds.
fn drive(client: &Client, model: &mut Model, rng: &mut Rng, n: &mut u64, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        *n += 1;
        let name = format!("r{n}");
        let (method, path, body, effect): Request = match rng.below(8) {
            0 => (
                "POST",
                "/v1/volumes".into(),
                Some(json!({"name": name, "size": "1M"})),
                ("volumes", name, Known::Exists),
            ),
            1 => ("POST", "/v1/vms".into(), Some(json!({"name": name, "size": "1M"})), ("vms", name, Known::Exists)),
            2 => match pick(model, rng, "volumes") {
                Some(v) => (
                    "POST",
                    format!("/v1/volumes/{v}/snapshots"),
                    Some(json!({"name": name})),
                    ("snapshots", name, Known::Exists),
                ),
                None => continue,
            },
            3 => match pick(model, rng, "vms") {
                Some(vm) => (
                    "POST",
                    format!("/v1/vms/{vm}/snapshots"),
                    Some(json!({"name": name})),
                    ("snapshots", name, Known::Exists),
                ),
                None => continue,
            },
            4 => match pick(model, rng, "snapshots") {
                Some(s) => ("DELETE", format!("/v1/snapshots/{s}"), None, ("snapshots", s, Known::Deleted)),
                None => continue,
            },
            5 => match pick(model, rng, "vms") {
                Some(vm) => ("DELETE", format!("/v1/vms/{vm}"), None, ("vms", vm, Known::Deleted)),
                None => continue,
            },
            6 => match pick(model, rng, "volumes") {
                Some(v) => ("DELETE", format!("/v1/volumes/{v}"), None, ("volumes", v, Known::Deleted)),
                None => continue,
            },
            _ => match pick(model, rng, "snapshots") {
                // Root-disk snapshots refuse (409): that answer proves nothing is made.
                Some(s) => (
                    "POST",
                    format!("/v1/snapshots/{s}/restore"),
                    Some(json!({"name": name})),
                    ("volumes", name, Known::Exists),
                ),
                None => continue,
            },
        };
        let (collection, target, known) = effect;
        match client.call(method, &path, body) {
            Outcome::Answered(status, _) if (200..300).contains(&status) => {
                model.insert((collection, target), known);
            }
            Outcome::Answered(status, answer) => {
                assert!(status < 500, "{method} {path} answered {status}: {answer}");
            }
            Outcome::Cut => {
                model.insert((collection, target), Known::Unsure);
                return;
            }
        }
    }
}

fn nbd_opens(uri: &str) -> bool {
    Command::new("qemu-img").args(["info", "-f", "raw", uri]).output().is_ok_and(|o| o.status.success())
}

/// Checks the restarted daemon against what the client was told, and metadata against engine.
fn check(server: &TestServer, model: &Model) {
    for ((collection, name), known) in model {
        let (status, body) = server.http("GET", &format!("/v1/{collection}/{name}"), None, Some(&server.admin_token));
        match known {
            Known::Exists => assert_eq!(status, 200, "{collection}/{name} was acknowledged: {body}"),
            Known::Deleted => assert_eq!(status, 404, "{collection}/{name} was deleted: {body}"),
            Known::Unsure => assert!(status == 200 || status == 404, "{collection}/{name}: {status} {body}"),
        }
    }
    for collection in ["volumes", "snapshots", "templates"] {
        let list = server.expect("GET", &format!("/v1/{collection}"), None, 200);
        for item in list.as_array().unwrap() {
            let uri = item["nbd"]["unix_uri"].as_str().unwrap();
            assert!(nbd_opens(uri), "{collection} {} is listed but its export {uri} does not open", item["id"]);
        }
    }
    for vm in server.expect("GET", "/v1/vms", None, 200).as_array().unwrap() {
        let root = vm["root_volume"].as_str().unwrap();
        server.expect("GET", &format!("/v1/volumes/{root}"), None, 200);
    }
}

#[test]
fn kill_9_during_lifecycle_requests_loses_nothing_acknowledged() {
    if !have_all(&["qemu-img"]) {
        return;
    }
    let rounds: u64 = std::env::var("CAIRN_SERVICE_CRASH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(12);
    let seed: u64 = std::env::var("CAIRN_SERVICE_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1
    });
    eprintln!("CAIRN_SERVICE_CRASH_SEED={seed}");
    let mut rng = Rng(seed);
    let mut server = TestServer::start();
    let mut model = Model::new();
    let mut n = 0;
    for round in 0..rounds {
        let client = Client {
            url: server.url.clone(),
            token: server.admin_token.clone(),
            agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(30)).build(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        // The kill lands at a random moment of the request stream: that moment is the test's
        // input, not a wait for something to happen.
        let kill_after = Duration::from_millis(20 + rng.below(300));
        let worker_seed = rng.next() | 1;
        let (model_after, n_after) = std::thread::scope(|scope| {
            let worker = scope.spawn(|| {
                let mut rng = Rng(worker_seed);
                let mut model = model.clone();
                let mut n = n;
                drive(&client, &mut model, &mut rng, &mut n, &stop);
                (model, n)
            });
            std::thread::sleep(kill_after);
            server.kill9();
            stop.store(true, Ordering::Relaxed);
            worker.join().expect("the request stream")
        });
        model = model_after;
        n = n_after;
        server.restart();
        check(&server, &model);
        // What was unsure is now settled by what the restarted daemon says.
        for ((collection, name), known) in model.iter_mut() {
            if *known == Known::Unsure {
                let (status, _) =
                    server.http("GET", &format!("/v1/{collection}/{name}"), None, Some(&server.admin_token));
                *known = if status == 200 { Known::Exists } else { Known::Deleted };
            }
        }
        eprintln!("round {round}: {} resources known after {kill_after:?}", model.len());
    }
    assert!(model.values().any(|k| *k == Known::Exists), "the stream made something");
}
