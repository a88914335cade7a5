//! A reader for safetensors headers (the JSON table of tensor names, dtypes, shapes and byte
//! ranges), on the `safetensors` crate's own types and validation. Tensor data is not read here.
//!
//! Format: <https://github.com/huggingface/safetensors#format>.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use serde::Deserialize;

use crate::error::ModelError;
use crate::ggml::GgmlType;

/// One tensor's descriptor, with absolute file offsets.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsTensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    pub offset: u64,
    pub n_bytes: u64,
}

/// A parsed safetensors header.
#[derive(Debug, Clone)]
pub struct SafetensorsFile {
    path: PathBuf,
    tensors: Vec<SafetensorsTensorInfo>,
}

/// Largest header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// The element types Strata loads from safetensors.
fn ggml_type(dtype: Dtype) -> Result<GgmlType, String> {
    match dtype {
        Dtype::F32 => Ok(GgmlType::F32),
        Dtype::F16 => Ok(GgmlType::F16),
        Dtype::BF16 => Ok(GgmlType::BF16),
        other => Err(format!("dtype {other:?} (expected F32, F16 or BF16)")),
    }
}

impl SafetensorsFile {
    /// Reads and checks the header of `path`: every tensor's dtype, shape and byte range (each
    /// tensor's range holds exactly its shape, the ranges tile the data with no gap or
    /// overlap, and the data lies inside the file).
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let corrupt = |what: String| ModelError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let mut len_buf = [0u8; 8];
        file.read_exact(&mut len_buf).map_err(|_| {
            corrupt(format!(
                "{file_len} bytes is too short for a safetensors header"
            ))
        })?;
        let header_len = u64::from_le_bytes(len_buf);
        if header_len > MAX_HEADER || header_len + 8 > file_len {
            return Err(corrupt(format!(
                "header length {header_len} does not fit in the file ({file_len} bytes)"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)
            .map_err(|e| ModelError::io(path, e))?;
        // Entry by entry, so that an error names its tensor.
        let table: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| corrupt(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = file_len - data_start;
        let mut metadata: Option<HashMap<String, String>> = None;
        let mut infos: Vec<(String, TensorInfo, GgmlType)> = Vec::with_capacity(table.len());
        for (name, value) in table {
            if name == "__metadata__" {
                metadata = Some(serde_json::from_value(value).map_err(|e| {
                    corrupt(format!("`__metadata__` is not a map of strings: {e}"))
                })?);
                continue;
            }
            let info: TensorInfo = serde_json::from_value(value).map_err(|e| {
                ModelError::tensor(path, &name, format!("invalid header entry: {e}"))
            })?;
            let dtype = ggml_type(info.dtype)
                .map_err(|e| ModelError::tensor(path, &name, format!("unsupported {e}")))?;
            let shape = &info.shape;
            let (begin, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
            let want = shape
                .iter()
                .try_fold(dtype.block_bytes() as u64, |a, &d| a.checked_mul(d as u64))
                .ok_or_else(|| {
                    ModelError::tensor(path, &name, format!("shape {shape:?} is too large"))
                })?;
            if end < begin || end - begin != want {
                return Err(ModelError::tensor(
                    path,
                    &name,
                    format!(
                        "byte range [{begin}, {end}) does not hold a {dtype} tensor of shape {shape:?} ({want} bytes)"
                    ),
                ));
            }
            if end > data_len {
                return Err(ModelError::tensor(
                    path,
                    &name,
                    format!(
                        "data ends at byte {} but the file has {file_len} bytes: the file is truncated",
                        data_start + end
                    ),
                ));
            }
            infos.push((name, info, dtype));
        }
        // The crate's own check that the ranges, in offset order, tile the data.
        infos.sort_by_key(|(_, info, _)| info.data_offsets);
        let tensors = infos
            .iter()
            .map(|(name, info, dtype)| SafetensorsTensorInfo {
                name: name.clone(),
                shape: info.shape.clone(),
                dtype: *dtype,
                offset: data_start + info.data_offsets.0 as u64,
                n_bytes: (info.data_offsets.1 - info.data_offsets.0) as u64,
            })
            .collect();
        let infos = infos
            .into_iter()
            .map(|(name, info, _)| (name, info))
            .collect();
        Metadata::new(metadata, infos).map_err(|e| match e {
            safetensors::SafeTensorError::InvalidOffset(name) => ModelError::tensor(
                path,
                &name,
                "byte range leaves a gap after the previous tensor or overlaps it".to_string(),
            ),
            other => corrupt(format!("invalid header: {other}")),
        })?;
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &[SafetensorsTensorInfo] {
        &self.tensors
    }
}

/// The weight files of a sharded checkpoint, from `model.safetensors.index.json`.
pub fn shard_files(index: &Path) -> Result<Vec<PathBuf>, ModelError> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| ModelError::io(index, e))?;
    let idx: Index = serde_json::from_str(&text).map_err(|e| ModelError::Corrupt {
        path: index.to_path_buf(),
        what: format!("invalid index: {e}"),
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files = Vec::with_capacity(idx.weight_map.len());
    for (tensor, file) in &idx.weight_map {
        let rel = Path::new(file);
        // Shards live beside the index: a bare file name, nothing else.
        if rel.components().count() != 1
            || !matches!(
                rel.components().next(),
                Some(std::path::Component::Normal(_))
            )
        {
            return Err(ModelError::tensor(
                index,
                tensor,
                format!("shard `{file}` is not a file name beside the index"),
            ));
        }
        files.push(dir.join(rel));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data: &[u8]) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn reads_header_and_checks_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"BF16","shape":[3],"data_offsets":[16,22]}}"#;
        std::fs::write(&p, file_with(header, &[0u8; 22])).unwrap();
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.tensors().len(), 2);
        let a = &f.tensors()[0];
        assert_eq!(
            (a.name.as_str(), a.shape.clone(), a.dtype),
            ("a", vec![2, 2], GgmlType::F32)
        );
        assert_eq!(a.offset, 8 + header.len() as u64);

        std::fs::write(&p, file_with(header, &[0u8; 20])).unwrap();
        let err = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors")
                && err.contains("tensor `b`")
                && err.contains("truncated"),
            "{err}"
        );

        let bad = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#;
        std::fs::write(&p, file_with(bad, &[0u8; 16])).unwrap();
        let err = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("tensor `a`") && err.contains("[2, 3]"),
            "{err}"
        );

        let gap = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        std::fs::write(&p, file_with(gap, &[0u8; 12])).unwrap();
        let err = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(err.contains("tensor `b`") && err.contains("gap"), "{err}");
        let overlap = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        std::fs::write(&p, file_with(overlap, &[0u8; 8])).unwrap();
        let err = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("tensor `b`") && err.contains("overlaps"),
            "{err}"
        );

        std::fs::write(&p, &file_with(header, &[0u8; 22])[..20]).unwrap();
        let err = SafetensorsFile::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("header length"),
            "{err}"
        );
    }
}
