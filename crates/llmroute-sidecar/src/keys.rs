//! The API keys of a route's models. A key comes from the file that `<VARIABLE>_FILE` names
//! when that variable is set, and from `<VARIABLE>` itself otherwise. The injection webhook
//! uses files: the kubelet rewrites them when the Secret changes, and the sidecar reads them
//! again every few seconds, so a rotated key needs no restart.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use llmroute_api::{ApiKeyRef, ModelEndpoint};

/// Age after which a key file is read again.
pub const KEY_FILE_REFRESH: Duration = Duration::from_secs(5);
/// Largest key file read, in bytes. API keys are far shorter, and a path that names a large
/// file by mistake is then not read into memory every few seconds.
pub const MAX_KEY_BYTES: u64 = 16 * 1024;

/// The API key of each model that has one, or why it is missing.
#[derive(Debug)]
pub struct ApiKeys {
    route: String,
    keys: BTreeMap<String, KeySource>,
    refresh: Duration,
}

/// The source of one model's key.
#[derive(Debug)]
enum KeySource {
    /// An environment variable, read once: a container's environment is fixed when it starts.
    Fixed(Result<String, String>),
    /// A file, read again when the last read is older than the refresh interval.
    File {
        path: PathBuf,
        reference: ApiKeyRef,
        cache: Mutex<Option<(Instant, Result<String, String>)>>,
    },
}

impl ApiKeys {
    /// Finds the key of every model of `models` that names one, through the process's
    /// environment, and logs each key that is missing.
    pub fn read(route: &str, models: &[ModelEndpoint]) -> Self {
        Self::read_with(
            route,
            models,
            |name| std::env::var(name).ok(),
            KEY_FILE_REFRESH,
        )
    }

    fn read_with(
        route: &str,
        models: &[ModelEndpoint],
        variable: impl Fn(&str) -> Option<String>,
        refresh: Duration,
    ) -> Self {
        let mut keys = BTreeMap::new();
        for model in models {
            let Some(reference) = &model.api_key else {
                continue;
            };
            let env = reference.env_var();
            let source = match variable(&format!("{env}_FILE")) {
                Some(path) => KeySource::File {
                    path: PathBuf::from(path),
                    reference: reference.clone(),
                    cache: Mutex::new(None),
                },
                None => KeySource::Fixed(match variable(env) {
                    Some(key) if !key.is_empty() => check_key(key.trim())
                        .map_err(|problem| format!("API key variable {env} {problem}")),
                    found => Err(missing_variable(reference, found.is_some())),
                }),
            };
            keys.insert(model.name.clone(), source);
        }
        let keys = Self {
            route: route.to_string(),
            keys,
            refresh,
        };
        // A missing key takes one model out of the pool, not the route: the injected pod
        // starts without the Secret, and the other models keep serving.
        for (model, source) in &keys.keys {
            match source {
                KeySource::Fixed(Err(reason)) => {
                    tracing::error!(route = %keys.route, model = %model, "{reason}; requests are routed to the other models");
                }
                KeySource::Fixed(Ok(_)) => {}
                // The first read logs a missing file.
                KeySource::File { .. } => {
                    keys.get(model);
                }
            }
        }
        keys
    }

    /// Returns the key of `model`: `None` when it needs none, else the key or why it is
    /// missing. A key file older than the refresh interval is read again first.
    pub fn get(&self, model: &str) -> Option<Result<String, String>> {
        match self.keys.get(model)? {
            KeySource::Fixed(key) => Some(key.clone()),
            KeySource::File {
                path,
                reference,
                cache,
            } => {
                let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((read_at, key)) = &*cache
                    && read_at.elapsed() < self.refresh
                {
                    return Some(key.clone());
                }
                let key = read_key_file(path, reference);
                self.log_change(model, cache.as_ref().map(|(_, old)| old), &key);
                *cache = Some((Instant::now(), key.clone()));
                Some(key)
            }
        }
    }

    /// Models whose key is missing, with the reason, sorted by name.
    pub fn missing(&self) -> BTreeMap<String, String> {
        self.keys
            .keys()
            .filter_map(|model| match self.get(model) {
                Some(Err(reason)) => Some((model.clone(), reason)),
                _ => None,
            })
            .collect()
    }

    /// Logs a key file that appeared, went missing or changed, without the key itself.
    fn log_change(
        &self,
        model: &str,
        old: Option<&Result<String, String>>,
        new: &Result<String, String>,
    ) {
        let route = &self.route;
        match (old, new) {
            (Some(Ok(old)), Ok(new)) if old != new => {
                tracing::info!(route = %route, model = %model, "read a rotated API key");
            }
            (Some(Err(_)) | None, Ok(_)) => {
                tracing::info!(route = %route, model = %model, "read the model's API key");
            }
            (Some(Ok(_)) | None, Err(reason)) => {
                tracing::error!(route = %route, model = %model, "{reason}; requests are routed to the other models");
            }
            _ => {}
        }
    }
}

/// Reads a key file, without the whitespace around the key (`kubectl create secret
/// --from-file` keeps a file's last newline).
fn read_key_file(path: &std::path::Path, reference: &ApiKeyRef) -> Result<String, String> {
    let fix = match reference {
        ApiKeyRef::Secret { name, key, .. } => format!(
            "create Secret {name:?} with the key {key:?} in the pod's namespace, and the kubelet writes the file within its sync period"
        ),
        ApiKeyRef::Env(env) => format!("write the key to the file that {env}_FILE names"),
    };
    use std::io::Read;
    let mut text = String::new();
    let read = std::fs::File::open(path)
        .and_then(|file| file.take(MAX_KEY_BYTES + 1).read_to_string(&mut text));
    let file = path.display();
    match read {
        Err(error) => Err(format!(
            "failed to read API key file {file}: {error}; {fix}"
        )),
        Ok(_) if text.len() as u64 > MAX_KEY_BYTES => Err(format!(
            "API key file {file} is larger than {MAX_KEY_BYTES} bytes, so it holds no API key; {fix}"
        )),
        Ok(_) if text.trim().is_empty() => Err(format!("API key file {file} is empty; {fix}")),
        Ok(_) => check_key(text.trim())
            .map_err(|problem| format!("API key file {file} {problem}; {fix}")),
    }
}

/// Checks that `key` can follow `Bearer ` in an `Authorization` header: visible ASCII only.
/// Returns the problem otherwise, without the key.
fn check_key(key: &str) -> Result<String, String> {
    match key.bytes().position(|b| !b.is_ascii_graphic()) {
        None => Ok(key.to_string()),
        Some(at) => Err(format!(
            "contains a character that an HTTP header cannot carry at byte {at} (only visible ASCII is allowed)"
        )),
    }
}

/// Describes why a model's key variable gives no key and how to fix it. `empty` is true when
/// the variable is set to the empty string.
fn missing_variable(reference: &ApiKeyRef, empty: bool) -> String {
    let env = reference.env_var();
    let state = if empty { "is empty" } else { "is not set" };
    match reference {
        ApiKeyRef::Env(_) => format!(
            "API key variable {env} {state}; set it or {env}_FILE, or remove the model's `apiKey`"
        ),
        ApiKeyRef::Secret { name, key, .. } => format!(
            "API key variable {env} {state}: Secret {name:?} or its key {key:?} was missing when the sidecar started; create it, then restart the pod, because the kubelet sets a container's environment when it starts"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models(references: &[Option<ApiKeyRef>]) -> Vec<ModelEndpoint> {
        references
            .iter()
            .enumerate()
            .map(|(k, reference)| {
                serde_json::from_value::<ModelEndpoint>(serde_json::json!({
                    "name": format!("m{k}"),
                    "endpoint": "http://127.0.0.1:9/v1",
                    "upstreamModel": "u",
                    "pricing": {"inputUsdPerMillionTokens": 1.0, "outputUsdPerMillionTokens": 1.0},
                }))
                .map(|mut model| {
                    model.api_key = reference.clone();
                    model
                })
                .unwrap()
            })
            .collect()
    }

    fn secret(env: &str) -> Option<ApiKeyRef> {
        Some(ApiKeyRef::Secret {
            name: "llm-keys".into(),
            key: "openai".into(),
            env: env.into(),
        })
    }

    #[test]
    fn variables_give_fixed_keys() {
        let models = models(&[
            None,
            Some(ApiKeyRef::Env("SET".into())),
            Some(ApiKeyRef::Env("EMPTY".into())),
            secret("UNSET"),
        ]);
        let variable = |name: &str| match name {
            "SET" => Some("sk-1".to_string()),
            "EMPTY" => Some(String::new()),
            _ => None,
        };
        let keys = ApiKeys::read_with("chat", &models, variable, KEY_FILE_REFRESH);
        assert_eq!(keys.get("m0"), None);
        assert_eq!(keys.get("m1"), Some(Ok("sk-1".into())));
        let empty = keys.get("m2").unwrap().unwrap_err();
        assert!(empty.contains("EMPTY is empty"), "{empty}");
        let unset = keys.get("m3").unwrap().unwrap_err();
        assert!(
            unset.contains("UNSET is not set") && unset.contains("restart the pod"),
            "{unset}"
        );
        let missing: Vec<String> = keys.missing().into_keys().collect();
        assert_eq!(missing, ["m2", "m3"]);
    }

    #[test]
    fn key_file_is_read_again_after_refresh() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("key");
        let path_text = path.display().to_string();
        let models = models(&[secret("KEY")]);
        let variable = |name: &str| (name == "KEY_FILE").then(|| path_text.clone());
        let keys = ApiKeys::read_with("chat", &models, variable, Duration::from_millis(50));

        // No file yet: the Secret did not exist when the pod started.
        let missing = keys.get("m0").unwrap().unwrap_err();
        assert!(missing.contains(&path_text), "{missing}");
        assert!(missing.contains("create Secret \"llm-keys\""), "{missing}");

        std::fs::write(&path, "sk-old\n").unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(keys.get("m0"), Some(Ok("sk-old".into())));

        // A rotated key is seen after the refresh interval, not before.
        std::fs::write(&path, "sk-new").unwrap();
        assert_eq!(keys.get("m0"), Some(Ok("sk-old".into())));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(keys.get("m0"), Some(Ok("sk-new".into())));

        std::fs::write(&path, "  \n").unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let empty = keys.get("m0").unwrap().unwrap_err();
        assert!(empty.contains("is empty"), "{empty}");
        assert_eq!(keys.missing().len(), 1);
    }

    #[test]
    fn unusable_key_files_are_rejected() {
        let folder = tempfile::tempdir().unwrap();
        let reference = secret("KEY").unwrap();
        let path = folder.path().join("key");
        let cases: [(Vec<u8>, &str); 3] = [
            (
                vec![b'k'; MAX_KEY_BYTES as usize + 1],
                "is larger than 16384 bytes",
            ),
            (b"sk-1\nsk-2".to_vec(), "HTTP header cannot carry at byte 4"),
            (b"sk-\x01".to_vec(), "at byte 3"),
        ];
        for (content, expected) in cases {
            std::fs::write(&path, &content).unwrap();
            let error = read_key_file(&path, &reference).unwrap_err();
            assert!(error.contains(expected), "{error}");
            assert!(!error.contains("sk-"), "the message shows the key: {error}");
        }
        std::fs::write(&path, "sk-ok\r\n").unwrap();
        assert_eq!(read_key_file(&path, &reference), Ok("sk-ok".into()));
    }
}
