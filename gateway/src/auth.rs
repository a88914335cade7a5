//! Client authentication on the public API: API keys, sent as `authorization: Bearer KEY`
//! metadata, checked by an interceptor (a tower layer in front of `strata.v1.Strata`) against a
//! key file that is read again whenever it changes (a Kubernetes Secret updated in place), with
//! an optional limit on each key's concurrent streams.
//!
//! The key file has one key per line, `NAME KEY [MAX_STREAMS]`, separated by spaces; blank lines
//! and lines starting with `#` are ignored:
//!
//! ```text
//! # name      key                                   concurrent streams (optional)
//! alice       sk-2f9c41d3b8e07a6c5d1e4f3a2b9c8d7e   8
//! batch-jobs  sk-77aa0b1c2d3e4f5a6b7c8d9e0f1a2b3c
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;
use tonic::metadata::MetadataMap;

use crate::error::GatewayError;

/// Shortest key accepted: a key is a secret, not a name.
pub const MIN_KEY_LEN: usize = 16;

/// How often the key file is checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// One key of the file.
#[derive(Debug)]
struct Key {
    name: String,
    secret: Vec<u8>,
    limit: Option<usize>,
    open: Arc<Semaphore>,
}

/// The caller a request was authenticated as; the service admits its stream against the key's
/// limit.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: String,
    limit: Option<usize>,
    open: Arc<Semaphore>,
}

impl Caller {
    /// A permit for one more stream of this key (held until the stream ends), or
    /// RESOURCE_EXHAUSTED naming the limit.
    pub fn admit(&self) -> Result<Option<OwnedSemaphorePermit>, Status> {
        let Some(limit) = self.limit else {
            return Ok(None);
        };
        Arc::clone(&self.open)
            .try_acquire_owned()
            .map(Some)
            .map_err(|_| {
                Status::resource_exhausted(format!(
                    "API key `{}` already has {limit} streams open, its limit (max_streams); \
                     retry when one ends",
                    self.name
                ))
            })
    }
}

/// The API keys in force, read from a file and read again when it changes.
#[derive(Debug)]
pub struct ApiKeys {
    path: PathBuf,
    /// The keys in force and the file's text they came from.
    keys: RwLock<(Vec<Key>, String)>,
}

impl ApiKeys {
    /// Reads the key file; every error names the file and the line.
    pub fn load(path: &Path) -> Result<Arc<Self>, GatewayError> {
        let text = read_file(path)?;
        let keys = parse(path, &text, &[])?;
        tracing::info!(file = %path.display(), keys = keys.len(), "API keys loaded");
        Ok(Arc::new(ApiKeys {
            path: path.to_path_buf(),
            keys: RwLock::new((keys, text)),
        }))
    }

    /// Checks a call's `authorization` metadata.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this server needs an API key: send `authorization: Bearer <key>` metadata",
                )
            })?
            .to_str()
            .map_err(|_| Status::unauthenticated("the `authorization` metadata is not text"))?;
        let presented = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Status::unauthenticated("the `authorization` metadata must be `Bearer <key>`")
            })?
            .trim()
            .as_bytes();
        let keys = self
            .keys
            .read()
            .map_err(|_| Status::internal("the API keys' lock is poisoned"))?;
        // Every key is compared in full, whatever matches, so that timing tells nothing.
        let mut found = None;
        for k in &keys.0 {
            if constant_time_eq(&k.secret, presented) {
                found = Some(k);
            }
        }
        found
            .map(|k| Caller {
                name: k.name.clone(),
                limit: k.limit,
                open: Arc::clone(&k.open),
            })
            .ok_or_else(|| Status::unauthenticated("unknown API key"))
    }

    /// Reads the file again if it changed. A file that no longer parses keeps the keys in
    /// force (and says why in the log).
    fn reload(&self) {
        let text = match read_file(&self.path) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the API key file; the keys in force stay");
                return;
            }
        };
        let result = {
            let Ok(keys) = self.keys.read() else {
                return;
            };
            if keys.1 == text {
                return;
            }
            parse(&self.path, &text, &keys.0)
        };
        let Ok(mut in_force) = self.keys.write() else {
            return;
        };
        match result {
            Ok(keys) => {
                tracing::info!(file = %self.path.display(), keys = keys.len(), "API keys reloaded");
                *in_force = (keys, text);
            }
            Err(e) => {
                tracing::error!(error = %e, "the API key file changed but does not parse; the keys in force stay");
                in_force.1 = text;
            }
        }
    }

    /// Checks the file for changes every 2 seconds, for the life of the process.
    pub fn watch(self: &Arc<Self>) {
        let keys = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_EVERY).await;
                keys.reload();
            }
        });
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_file(path: &Path) -> Result<String, GatewayError> {
    std::fs::read_to_string(path)
        .map_err(|e| GatewayError::invalid("--api-keys", format!("{}: {e}", path.display())))
}

/// Parses the key file's `text`. A key whose name and limit are unchanged from `previous` keeps
/// its count of open streams.
fn parse(path: &Path, text: &str, previous: &[Key]) -> Result<Vec<Key>, GatewayError> {
    let at = |line: usize, what: String| {
        GatewayError::invalid("--api-keys", format!("{}:{line}: {what}", path.display()))
    };
    let mut keys: Vec<Key> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (name, secret, limit) = match fields.as_slice() {
            [name, secret] => (*name, *secret, None),
            [name, secret, limit] => {
                let l: usize = limit.parse().ok().filter(|&l| l > 0).ok_or_else(|| {
                    at(
                        n,
                        format!("max streams `{limit}` is not a positive integer"),
                    )
                })?;
                (*name, *secret, Some(l))
            }
            _ => return Err(at(n, "expected `NAME KEY [MAX_STREAMS]`".into())),
        };
        if secret.len() < MIN_KEY_LEN {
            return Err(at(
                n,
                format!(
                    "the key of `{name}` has {} characters; keys need at least {MIN_KEY_LEN}",
                    secret.len()
                ),
            ));
        }
        if keys.iter().any(|k| k.name == name) {
            return Err(at(n, format!("the name `{name}` is given twice")));
        }
        if keys.iter().any(|k| k.secret == secret.as_bytes()) {
            return Err(at(n, format!("`{name}` has the same key as another entry")));
        }
        let open = previous
            .iter()
            .find(|k| k.name == name && k.limit == limit)
            .map_or_else(
                || Arc::new(Semaphore::new(limit.unwrap_or(0))),
                |k| Arc::clone(&k.open),
            );
        keys.push(Key {
            name: name.to_string(),
            secret: secret.as_bytes().to_vec(),
            limit,
            open,
        });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn bearer(key: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {key}").parse().unwrap());
        m
    }

    const ALICE: &str = "sk-alice-0123456789abcdef";
    const BOB: &str = "sk-bob-fedcba9876543210";

    #[test]
    fn keys_authenticate_their_callers_and_nothing_else() {
        let (_d, path) = file(&format!("# comment\n\nalice {ALICE} 2\nbob {BOB}\n"));
        let keys = ApiKeys::load(&path).unwrap();
        assert_eq!(keys.check(&bearer(ALICE)).unwrap().name, "alice");
        assert_eq!(keys.check(&bearer(BOB)).unwrap().name, "bob");
        let e = keys.check(&bearer("sk-nobody-000000000000")).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert_eq!(e.message(), "unknown API key");
        let e = keys.check(&MetadataMap::new()).unwrap_err();
        assert!(e.message().contains("authorization: Bearer"), "{e:?}");
        let mut basic = MetadataMap::new();
        basic.insert("authorization", "Basic abc".parse().unwrap());
        assert!(keys.check(&basic).is_err());
    }

    #[test]
    fn a_key_with_a_limit_admits_that_many_streams_at_once() {
        let (_d, path) = file(&format!("alice {ALICE} 2\nbob {BOB}\n"));
        let keys = ApiKeys::load(&path).unwrap();
        let alice = keys.check(&bearer(ALICE)).unwrap();
        let a = alice.admit().unwrap();
        let b = alice.admit().unwrap();
        let e = alice.admit().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("`alice` already has 2 streams open"),
            "{e:?}"
        );
        drop(a);
        assert!(alice.admit().is_ok());
        drop(b);
        // No limit: always admitted, nothing held.
        assert!(keys.check(&bearer(BOB)).unwrap().admit().unwrap().is_none());
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_broken_one_keeps_the_keys_in_force() {
        let (_d, path) = file(&format!("alice {ALICE} 1\n"));
        let keys = ApiKeys::load(&path).unwrap();
        let held = keys.check(&bearer(ALICE)).unwrap().admit().unwrap();
        std::fs::write(&path, format!("alice {ALICE} 1\nbob {BOB}\n")).unwrap();
        keys.reload();
        assert_eq!(keys.check(&bearer(BOB)).unwrap().name, "bob");
        // alice's open stream still counts against her unchanged limit.
        assert!(keys.check(&bearer(ALICE)).unwrap().admit().is_err());
        drop(held);
        std::fs::write(&path, "alice short\n").unwrap();
        keys.reload();
        assert_eq!(keys.check(&bearer(BOB)).unwrap().name, "bob");
    }

    #[test]
    fn a_bad_key_file_is_refused_naming_the_file_and_line() {
        for (text, want) in [
            (format!("alice {ALICE} 0\n"), ":1: max streams `0`"),
            (
                "alice\n".to_string(),
                ":1: expected `NAME KEY [MAX_STREAMS]`",
            ),
            (
                "\nalice short\n".to_string(),
                ":2: the key of `alice` has 5 characters",
            ),
            (
                format!("alice {ALICE}\nalice {BOB}\n"),
                ":2: the name `alice` is given twice",
            ),
            (
                format!("alice {ALICE}\nbob {ALICE}\n"),
                ":2: `bob` has the same key",
            ),
        ] {
            let (_d, path) = file(&text);
            let e = ApiKeys::load(&path).unwrap_err().to_string();
            assert!(e.contains("--api-keys") && e.contains(want), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        let e = ApiKeys::load(Path::new("/nonexistent/keys")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/keys"), "{e}");
    }
}
