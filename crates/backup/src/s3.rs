//! Repositories on S3-compatible object storage. An [`S3Location`] says where (endpoint, bucket,
//! prefix) and as whom; it comes from config or from `s3://BUCKET[/PREFIX]` plus the standard
//! AWS environment variables, and is checked before any request is made, so a typo fails with
//! its field's name instead of as a strange answer from the server.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::backend::{BackendError, ObjectStoreBackend};

/// The region when none is configured: AWS's first, and what most S3-compatible servers accept.
pub const DEFAULT_REGION: &str = "us-east-1";

/// Where a repository lives on S3-compatible storage, and the credentials to reach it.
/// Debug output leaves the secrets out.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Location {
    /// `http(s)://HOST[:PORT]` of an S3-compatible service; `None` for AWS itself.
    pub endpoint: Option<String>,
    pub bucket: String,
    /// Every object of the repository lives under `PREFIX/`; `None` for the bucket's root.
    pub prefix: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// For temporary credentials.
    pub session_token: Option<String>,
    /// Allows a plain-HTTP endpoint (a test server, a store on a trusted network).
    pub allow_http: bool,
}

impl S3Location {
    /// Parses `s3://BUCKET[/PREFIX]` and takes the rest from the process environment:
    /// `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` (unset: AWS itself; an `http://` one is
    /// allowed), `AWS_REGION` or `AWS_DEFAULT_REGION` (unset: [`DEFAULT_REGION`]),
    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (required), `AWS_SESSION_TOKEN`.
    pub fn from_url(url: &str) -> Result<Self, BackendError> {
        Self::from_url_with(url, |name| std::env::var(name).ok())
    }

    /// [`S3Location::from_url`] with the variables looked up by `var` instead of in the
    /// environment. An empty value counts as unset.
    pub fn from_url_with(url: &str, var: impl Fn(&str) -> Option<String>) -> Result<Self, BackendError> {
        let var = |name: &str| var(name).filter(|value| !value.is_empty());
        let (bucket, prefix) = parse_url(url).map_err(|why| invalid(url, why))?;
        let endpoint = var("AWS_ENDPOINT_URL_S3").or_else(|| var("AWS_ENDPOINT_URL"));
        // Requiring keys keeps the client from falling back to instance metadata, which off a
        // cloud machine means a long wait for an address that does not answer.
        let (Some(access_key_id), Some(secret_access_key)) = (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(invalid(url, "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into()));
        };
        let location = S3Location {
            allow_http: endpoint.as_deref().is_some_and(|e| e.starts_with("http://")),
            endpoint,
            bucket,
            prefix,
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")).unwrap_or_else(|| DEFAULT_REGION.into()),
            access_key_id,
            secret_access_key,
            session_token: var("AWS_SESSION_TOKEN"),
        };
        location.check()?;
        Ok(location)
    }

    /// Checks every field as S3 would, so a bad one is named here rather than failing a request.
    pub fn check(&self) -> Result<(), BackendError> {
        let fail = |why: String| Err(invalid(&self.to_string(), why));
        if let Err(why) = check_bucket(&self.bucket) {
            return fail(why);
        }
        if let Some(prefix) = &self.prefix {
            if let Err(why) = check_prefix(prefix) {
                return fail(why);
            }
        }
        if let Some(endpoint) = &self.endpoint {
            let Some(host) = endpoint.strip_prefix("https://").or_else(|| endpoint.strip_prefix("http://")) else {
                return fail(format!("endpoint {endpoint:?} is not an http:// or https:// URL"));
            };
            if host.trim_end_matches('/').is_empty() || host.contains(char::is_whitespace) {
                return fail(format!("endpoint {endpoint:?} is not a URL: no host, or spaces"));
            }
            if endpoint.starts_with("http://") && !self.allow_http {
                return fail(format!("endpoint {endpoint:?} is plain HTTP, and allow_http is not set"));
            }
        }
        if self.region.is_empty() || !self.region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return fail(format!("region {:?} is not a region name", self.region));
        }
        if self.access_key_id.is_empty() || self.secret_access_key.is_empty() {
            return fail("the access key id and the secret access key must both be given".into());
        }
        Ok(())
    }

    /// The prefix without a trailing `/`; `None` when there is none.
    fn key_prefix(&self) -> Option<&str> {
        self.prefix.as_deref().map(|p| p.trim_end_matches('/')).filter(|p| !p.is_empty())
    }
}

/// `s3://BUCKET[/PREFIX]`: where, without the endpoint or credentials (for messages and logs).
impl fmt::Display for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}", self.bucket)?;
        if let Some(prefix) = self.key_prefix() {
            write!(f, "/{prefix}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for S3Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Location")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

fn invalid(location: &str, why: String) -> BackendError {
    BackendError::Other(format!("S3 location {location}: {why}"))
}

/// Splits `s3://BUCKET[/PREFIX]`; a trailing `/` is dropped.
fn parse_url(url: &str) -> Result<(String, Option<String>), String> {
    let Some(rest) = url.strip_prefix("s3://") else {
        return Err("not an S3 URL: expected s3://BUCKET[/PREFIX]".into());
    };
    if rest.contains(['?', '#']) {
        return Err(
            "an S3 URL takes no query or fragment: the endpoint and credentials come from the environment".into()
        );
    }
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    check_bucket(bucket)?;
    let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
    if prefix.is_empty() {
        return Ok((bucket.to_string(), None));
    }
    check_prefix(prefix)?;
    Ok((bucket.to_string(), Some(prefix.to_string())))
}

/// S3's rules for new buckets: 3 to 63 lowercase letters, digits, dots and hyphens, beginning
/// and ending with a letter or digit.
fn check_bucket(bucket: &str) -> Result<(), String> {
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if bucket.is_empty() {
        return Err("no bucket: expected s3://BUCKET[/PREFIX]".into());
    }
    if !(3..=63).contains(&bucket.len())
        || !bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        || !edge_ok(bucket.bytes().next())
        || !edge_ok(bucket.bytes().last())
        || bucket.contains("..")
    {
        return Err(format!(
            "bucket name {bucket:?} is not valid: 3 to 63 lowercase letters, digits, '.' and '-', \
             beginning and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// A prefix is `/`-separated parts, none empty, `.` or `..` (object keys never have those, and
/// object_store would reject or rewrite them); a trailing `/` is allowed, and an empty prefix
/// is none.
fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.is_empty() {
        return Ok(());
    }
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if trimmed.split('/').any(|part| part.is_empty() || part == "." || part == "..")
        || prefix.contains(|c: char| c.is_control())
    {
        return Err(format!("prefix {prefix:?} is not valid: '/'-separated names, none empty, '.' or '..'"));
    }
    Ok(())
}

/// Three retries, 100 ms growing to at most 2 s apart, none after 30 s: enough to ride out a
/// dropped connection or a `SlowDown`, short enough that a wrong address or a server that is down
/// fails within seconds, not the three minutes of object_store's default.
fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    }
}

/// A pack is 16 MiB: object_store's 30 s request timeout would fail its upload on a link
/// slower than about 5 Mbit/s, so a request gets 5 minutes; connecting still gets 5 s.
/// (`allow_http` lives here too: the builder's own setter would be undone by setting these.)
fn client_options(allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(300))
        .with_allow_http(allow_http)
}

impl ObjectStoreBackend {
    /// A repository on S3-compatible storage, every key under the location's prefix. Makes no
    /// request: a wrong endpoint or key fails the first call (after the retries above).
    pub fn s3(location: &S3Location) -> Result<Self, BackendError> {
        location.check()?;
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&location.bucket)
            .with_region(&location.region)
            .with_access_key_id(&location.access_key_id)
            .with_secret_access_key(&location.secret_access_key)
            .with_retry(retry_config())
            .with_client_options(client_options(location.allow_http));
        if let Some(endpoint) = &location.endpoint {
            builder = builder.with_endpoint(endpoint.trim_end_matches('/'));
        }
        if let Some(token) = &location.session_token {
            builder = builder.with_token(token);
        }
        let store = builder.build().map_err(|e| invalid(&location.to_string(), e.to_string()))?;
        let store: Arc<dyn ObjectStore> = match location.key_prefix() {
            Some(prefix) => Arc::new(PrefixStore::new(store, prefix)),
            None => Arc::new(store),
        };
        Self::new(store)
    }
}
