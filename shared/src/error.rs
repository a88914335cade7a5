//! Errors about model files: every variant names the file, and the key or tensor concerned.

use std::path::PathBuf;

/// An error reading or interpreting a model's files (metadata only: no tensor math here).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a GGUF file (it starts with {magic:02x?}, expected \"GGUF\")", path.display())]
    NotGguf { path: PathBuf, magic: Vec<u8> },
    #[error("{}: unsupported GGUF version {version} (supported: 2 and 3)", path.display())]
    GgufVersion { path: PathBuf, version: u32 },
    #[error("{}: truncated or corrupt file: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("{}: metadata key `{key}`: {problem}", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{}: tensor `{tensor}`: {problem}", path.display())]
    Tensor {
        path: PathBuf,
        tensor: String,
        problem: String,
    },
    #[error("{}: tensor `{tensor}` is missing", path.display())]
    MissingTensor { path: PathBuf, tensor: String },
    #[error(
        "{}: unsupported architecture `{arch}` (supported: llama, mistral, qwen2 and their GGUF forms)",
        path.display()
    )]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("model `{spec}`: {problem}")]
    Source { spec: String, problem: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn meta(path: impl Into<PathBuf>, key: &str, problem: impl Into<String>) -> Self {
        ModelError::Metadata {
            path: path.into(),
            key: key.to_string(),
            problem: problem.into(),
        }
    }

    pub(crate) fn tensor(
        path: impl Into<PathBuf>,
        tensor: &str,
        problem: impl Into<String>,
    ) -> Self {
        ModelError::Tensor {
            path: path.into(),
            tensor: tensor.to_string(),
            problem: problem.into(),
        }
    }
}
