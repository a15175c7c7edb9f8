//! Where a repository is, as an operator writes it: a directory, or `s3://bucket/prefix`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::{Backend, BackendError, DirBackend, ObjectStoreBackend, RetryingBackend};
use crate::s3::S3Location;

/// A repository's place: a local directory (another disk) or S3-compatible storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    Dir(PathBuf),
    S3(S3Location),
}

impl RepoLocation {
    /// `s3://BUCKET[/PREFIX]` (endpoint and credentials from the AWS_* variables), or a path.
    pub fn parse(text: &str) -> Result<RepoLocation, BackendError> {
        if text.starts_with("s3://") {
            Ok(RepoLocation::S3(S3Location::from_url(text)?))
        } else if text.contains("://") {
            Err(BackendError::Other(format!("{text:?}: a repository is a directory or an s3:// URL")))
        } else if text.is_empty() {
            Err(BackendError::Other("an empty repository location".into()))
        } else {
            Ok(RepoLocation::Dir(PathBuf::from(text)))
        }
    }

    /// The backend serving this place (a directory is created on first use).
    pub fn backend(&self) -> Result<Arc<dyn Backend>, BackendError> {
        Ok(match self {
            // A directory is often a network share: ride over passing errors. (S3's client
            // retries on its own, with its own timeouts.)
            RepoLocation::Dir(dir) => {
                Arc::new(RetryingBackend::new(Arc::new(DirBackend::new(dir)?), 3, Duration::from_millis(100)))
            }
            RepoLocation::S3(location) => Arc::new(ObjectStoreBackend::s3(location)?),
        })
    }
}

impl std::fmt::Display for RepoLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoLocation::Dir(dir) => write!(f, "{}", dir.display()),
            RepoLocation::S3(location) => write!(f, "{location}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_s3_urls_parse_and_other_schemes_are_refused() {
        assert_eq!(RepoLocation::parse("/mnt/b").unwrap(), RepoLocation::Dir("/mnt/b".into()));
        assert_eq!(RepoLocation::parse("rel/dir").unwrap().to_string(), "rel/dir");
        assert!(RepoLocation::parse("gs://bucket").is_err());
        assert!(RepoLocation::parse("").is_err());
    }
}
