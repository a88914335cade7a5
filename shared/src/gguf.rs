//! A reader for GGUF headers: metadata key/values and tensor descriptors. Tensor data is not
//! read here; callers read the byte ranges a [`GgufTensorInfo`] names, and only those they own.
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::error::ModelError;
use crate::ggml::GgmlType;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    /// An array of strings (a vocabulary, merges), packed: see [`StrArray`].
    StrArray(StrArray),
    /// An array of any other type.
    Array(Vec<GgufValue>),
}

/// An array of strings in one buffer. A vocabulary holds some 10^5 short strings; as one
/// `GgufValue::String` each they would take about five times their bytes (the value, the
/// `String`, the allocation's header and rounding).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StrArray {
    text: String,
    /// Where each string ends in `text`.
    ends: Vec<usize>,
}

impl StrArray {
    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        self.text.get(start..end)
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).unwrap_or_default())
    }
}

impl<'a> FromIterator<&'a str> for StrArray {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut a = StrArray::default();
        for s in iter {
            a.push(s);
        }
        a
    }
}

impl GgufValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is any number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The items of an array of any type but strings (see [`GgufValue::as_str_array`]).
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The items of an array of strings.
    pub fn as_str_array(&self) -> Option<&StrArray> {
        match self {
            GgufValue::StrArray(a) => Some(a),
            _ => None,
        }
    }

    /// The number of items of an array of any type.
    pub fn array_len(&self) -> Option<usize> {
        match self {
            GgufValue::Array(a) => Some(a.len()),
            GgufValue::StrArray(a) => Some(a.len()),
            _ => None,
        }
    }

    fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::StrArray(_) => "array of strings",
            GgufValue::Array(_) => "array",
        }
    }
}

/// One tensor's descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// The name as stored (`blk.3.attn_q.weight`).
    pub name: String,
    /// Row-major shape (GGUF stores dimensions innermost first; this is reversed).
    pub shape: Vec<usize>,
    pub dtype: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

/// A parsed GGUF header.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
}

/// Most items an array may hold (vocabularies have a few hundred thousand).
const MAX_ARRAY: usize = 1 << 22;

/// Longest string the reader accepts (a corrupt length must not allocate gigabytes).
const MAX_STRING: u64 = 1 << 26;

struct HeaderReader<R> {
    inner: R,
    pos: u64,
    file_len: u64,
    path: PathBuf,
}

impl<R: Read> HeaderReader<R> {
    fn corrupt(&self, what: impl Into<String>) -> ModelError {
        ModelError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.corrupt(format!(
                    "file ends inside the header while reading {what} at byte {}",
                    self.pos
                ))
            } else {
                ModelError::io(&self.path, e)
            }
        })?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.bytes(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.bytes(what)?))
    }

    /// A count of items that each take at least `min_item` bytes, bounded by what is left.
    fn count(&mut self, what: &str, min_item: u64) -> Result<usize, ModelError> {
        let n = self.u64(what)?;
        let left = self.file_len.saturating_sub(self.pos);
        if n.saturating_mul(min_item) > left {
            return Err(self.corrupt(format!("{what} is {n}, more than the file can hold")));
        }
        usize::try_from(n).map_err(|_| self.corrupt(format!("{what} is {n}")))
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let len = self.u64(what)?;
        if len > MAX_STRING || len > self.file_len.saturating_sub(self.pos) {
            return Err(self.corrupt(format!(
                "{what}: string length {len} is past the end of the file"
            )));
        }
        let mut buf = vec![0u8; len as usize];
        self.inner.read_exact(&mut buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.corrupt(format!("file ends inside {what}"))
            } else {
                ModelError::io(&self.path, e)
            }
        })?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| self.corrupt(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<GgufValue, ModelError> {
        Ok(match ty {
            0 => GgufValue::U8(self.bytes::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.bytes(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.bytes(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.bytes(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.bytes(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.bytes(key)?)),
            7 => {
                let b = self.bytes::<1>(key)?[0];
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    _ => {
                        return Err(ModelError::meta(
                            &self.path,
                            key,
                            format!("invalid bool byte {b}"),
                        ));
                    }
                }
            }
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 2 {
                    return Err(ModelError::meta(
                        &self.path,
                        key,
                        "arrays nested too deeply",
                    ));
                }
                let elem_ty = self.u32(key)?;
                let n = self.count(key, 1)?;
                if n > MAX_ARRAY {
                    return Err(ModelError::meta(
                        &self.path,
                        key,
                        format!("array of {n} items (at most {MAX_ARRAY})"),
                    ));
                }
                if elem_ty == 8 {
                    let mut items = StrArray::default();
                    for _ in 0..n {
                        items.push(&self.string(key)?);
                    }
                    GgufValue::StrArray(items)
                } else {
                    let mut items = Vec::with_capacity(n.min(1 << 20));
                    for _ in 0..n {
                        items.push(self.value(elem_ty, key, depth + 1)?);
                    }
                    GgufValue::Array(items)
                }
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.bytes(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.bytes(key)?)),
            other => {
                return Err(ModelError::meta(
                    &self.path,
                    key,
                    format!("unknown value type {other}"),
                ));
            }
        })
    }
}

impl GgufFile {
    /// Reads the header of the GGUF file at `path` and checks that every tensor's data lies
    /// inside the file.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        Self::read(BufReader::with_capacity(1 << 16, file), file_len, path)
    }

    /// Reads a GGUF header from the whole file held in `bytes` (`path` names it in errors).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, ModelError> {
        Self::read(bytes, bytes.len() as u64, path)
    }

    /// Reads the header from `inner`, the start of a file of `file_len` bytes.
    fn read(inner: impl Read, file_len: u64, path: &Path) -> Result<Self, ModelError> {
        let mut r = HeaderReader {
            inner,
            pos: 0,
            file_len,
            path: path.to_path_buf(),
        };
        let magic: [u8; 4] = r.bytes("magic").map_err(|_| ModelError::NotGguf {
            path: path.to_path_buf(),
            magic: Vec::new(),
        })?;
        if &magic != b"GGUF" {
            return Err(ModelError::NotGguf {
                path: path.to_path_buf(),
                magic: magic.to_vec(),
            });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::GgufVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        // A tensor descriptor takes at least 8 (name len) + 4 + 8 + 4 + 8 bytes.
        let n_tensors = r.count("tensor count", 32)?;
        let n_kv = r.count("metadata count", 12)?;

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&key)?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }

        let mut raw = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = r.string(&format!("tensor name #{i}"))?;
            let n_dims = r.u32(&name)?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ModelError::tensor(
                    path,
                    &name,
                    format!("{n_dims} dimensions (expected 1 to 4)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                let d = r.u64(&name)?;
                let d = usize::try_from(d)
                    .ok()
                    .filter(|&d| d > 0 && d < (1 << 40))
                    .ok_or_else(|| {
                        ModelError::tensor(path, &name, format!("invalid dimension {d}"))
                    })?;
                dims.push(d);
            }
            dims.reverse();
            let type_id = r.u32(&name)?;
            let dtype = GgmlType::from_gguf_id(type_id).map_err(|t| {
                ModelError::tensor(path, &name, format!("unsupported tensor type {t}"))
            })?;
            let offset = r.u64(&name)?;
            raw.push((name, dims, dtype, offset));
        }

        let alignment = match metadata.get("general.alignment") {
            None => 32,
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| {
                    ModelError::meta(path, "general.alignment", "must be a power of two")
                })?,
        };
        let data_start = r.pos.div_ceil(alignment) * alignment;

        let mut tensors = Vec::with_capacity(raw.len());
        for (name, shape, dtype, rel) in raw {
            let n_bytes = dtype.bytes_for(&shape).ok_or_else(|| {
                ModelError::tensor(
                    path,
                    &name,
                    format!(
                        "shape {shape:?} does not split into {dtype} blocks of {}",
                        dtype.block_size()
                    ),
                )
            })?;
            let offset = data_start
                .checked_add(rel)
                .ok_or_else(|| ModelError::tensor(path, &name, "data offset overflows"))?;
            let end = offset.saturating_add(n_bytes);
            if end > file_len {
                return Err(ModelError::tensor(
                    path,
                    &name,
                    format!(
                        "data [{offset}, {end}) lies past the end of the file ({file_len} bytes): the file is truncated"
                    ),
                ));
            }
            tensors.push(GgufTensorInfo {
                name,
                shape,
                dtype,
                offset,
                n_bytes,
            });
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the metadata entries whose key `keep` accepts, and frees the others.
    pub fn retain_metadata(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.metadata.retain(|k, _| keep(k));
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn wrong_type(&self, key: &str, want: &str, v: &GgufValue) -> ModelError {
        ModelError::meta(
            &self.path,
            key,
            format!("expected {want}, found {}", v.type_name()),
        )
    }

    /// An optional unsigned integer key; present with another type is an error.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| self.wrong_type(key, "an unsigned integer", v))
            })
            .transpose()
    }

    /// A required unsigned integer key.
    pub fn req_u64(&self, key: &str) -> Result<u64, ModelError> {
        self.opt_u64(key)?
            .ok_or_else(|| ModelError::meta(&self.path, key, "missing"))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "a number", v))
            })
            .transpose()
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, ModelError> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| self.wrong_type(key, "a string", v))
            })
            .transpose()
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.get(key)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong_type(key, "a bool", v)))
            .transpose()
    }

    /// An optional array of strings.
    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v {
            GgufValue::StrArray(a) => Ok(Some(a.iter().collect())),
            // An empty array of another type.
            GgufValue::Array(a) if a.is_empty() => Ok(Some(Vec::new())),
            _ => Err(self.wrong_type(key, "an array of strings", v)),
        }
    }

    /// An optional array of numbers, as f64.
    pub fn opt_f64_array(&self, key: &str) -> Result<Option<Vec<f64>>, ModelError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.wrong_type(key, "an array of numbers", v))?;
        arr.iter()
            .map(|x| {
                x.as_f64()
                    .ok_or_else(|| self.wrong_type(key, "an array of numbers", x))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

/// Writes a minimal GGUF file (metadata + tensors given as raw bytes); used by tests to build
/// small models and corrupt files.
pub mod write {
    use super::GgufValue;
    use crate::ggml::GgmlType;

    fn type_id(dtype: GgmlType) -> u32 {
        match dtype {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q5_0 => 6,
            GgmlType::Q5_1 => 7,
            GgmlType::Q8_0 => 8,
            GgmlType::Q8_1 => 9,
            GgmlType::Q2K => 10,
            GgmlType::Q3K => 11,
            GgmlType::Q4K => 12,
            GgmlType::Q5K => 13,
            GgmlType::Q6K => 14,
            GgmlType::Q8K => 15,
            GgmlType::BF16 => 30,
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    fn value_type(v: &GgufValue) -> u32 {
        match v {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::StrArray(_) | GgufValue::Array(_) => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
        match v {
            GgufValue::U8(x) => out.push(*x),
            GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            GgufValue::Bool(x) => out.push(u8::from(*x)),
            GgufValue::String(s) => put_str(out, s),
            GgufValue::StrArray(items) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items.iter() {
                    put_str(out, it);
                }
            }
            GgufValue::Array(items) => {
                let elem = items.first().map(value_type).unwrap_or(4);
                out.extend_from_slice(&elem.to_le_bytes());
                out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for it in items {
                    put_value(out, it);
                }
            }
        }
    }

    /// A tensor to write: name as stored, row-major shape, type and raw little-endian bytes.
    pub struct RawTensor<'a> {
        pub name: &'a str,
        pub shape: &'a [usize],
        pub dtype: GgmlType,
        pub data: &'a [u8],
    }

    /// Serializes a GGUF v3 file with 32-byte alignment.
    pub fn to_bytes(metadata: &[(&str, GgufValue)], tensors: &[RawTensor<'_>]) -> Vec<u8> {
        const ALIGN: usize = 32;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&value_type(v).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                out.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            out.extend_from_slice(&type_id(t.dtype).to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(ALIGN) * ALIGN;
        }
        out.resize(out.len().div_ceil(ALIGN) * ALIGN, 0);
        let base = out.len();
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize(base + off, 0);
            out.extend_from_slice(t.data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::write::{RawTensor, to_bytes};
    use super::*;

    fn sample() -> Vec<u8> {
        let w: Vec<u8> = (0..4 * 6).map(|i| i as u8).collect();
        to_bytes(
            &[
                ("general.architecture", GgufValue::String("llama".into())),
                ("llama.block_count", GgufValue::U32(2)),
                (
                    "tokenizer.ggml.tokens",
                    GgufValue::Array(vec![
                        GgufValue::String("a".into()),
                        GgufValue::String("b".into()),
                    ]),
                ),
            ],
            &[
                RawTensor {
                    name: "w",
                    shape: &[2, 3],
                    dtype: GgmlType::F32,
                    data: &w,
                },
                RawTensor {
                    name: "n",
                    shape: &[3],
                    dtype: GgmlType::F32,
                    data: &w[..12],
                },
            ],
        )
    }

    #[test]
    fn reads_what_the_writer_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, sample()).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.opt_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(g.req_u64("llama.block_count").unwrap(), 2);
        assert_eq!(
            g.opt_str_array("tokenizer.ggml.tokens").unwrap(),
            Some(vec!["a", "b"])
        );
        let w = g.tensor("w").unwrap();
        assert_eq!(w.shape, vec![2, 3]);
        assert_eq!(w.n_bytes, 24);
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(
            &bytes[w.offset as usize..w.offset as usize + 4],
            &[0, 1, 2, 3]
        );
        let err = g.req_u64("llama.context_length").unwrap_err().to_string();
        assert!(
            err.contains("m.gguf")
                && err.contains("llama.context_length")
                && err.contains("missing"),
            "{err}"
        );
        let err = g.opt_str("llama.block_count").unwrap_err().to_string();
        assert!(err.contains("expected a string, found u32"), "{err}");
        // Arrays of strings are read packed, and read back what was written.
        let tokens = g.get("tokenizer.ggml.tokens").unwrap();
        let packed = tokens.as_str_array().unwrap();
        assert_eq!(
            (packed.len(), packed.get(1), packed.get(2)),
            (2, Some("b"), None)
        );
        assert_eq!(tokens.array_len(), Some(2));
        let err = g
            .opt_str_array("general.architecture")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("expected an array of strings, found string"),
            "{err}"
        );
        // What a worker keeps: everything but the tokenizer's entries, and every tensor.
        let mut g = g;
        g.retain_metadata(|k| !k.starts_with("tokenizer."));
        assert!(g.get("tokenizer.ggml.tokens").is_none());
        assert_eq!(g.req_u64("llama.block_count").unwrap(), 2);
        assert_eq!(g.tensors().len(), 2);
    }

    #[test]
    fn packed_string_arrays_round_trip_with_empty_and_multibyte_items() {
        let items = ["", "▁the", "", "é", "<|im_end|>"];
        let packed: StrArray = items.iter().copied().collect();
        assert_eq!(packed.iter().collect::<Vec<_>>(), items);
        let bytes = to_bytes(&[("k", GgufValue::StrArray(packed.clone()))], &[]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.gguf");
        std::fs::write(&p, bytes).unwrap();
        let g = GgufFile::open(&p).unwrap();
        assert_eq!(g.get("k"), Some(&GgufValue::StrArray(packed)));
        assert_eq!(g.opt_str_array("k").unwrap(), Some(items.to_vec()));
    }

    #[test]
    fn truncated_file_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gguf");
        let bytes = sample();
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        let err = GgufFile::open(&p).unwrap_err().to_string();
        assert!(
            err.contains("t.gguf") && err.contains("tensor `n`") && err.contains("truncated"),
            "{err}"
        );
        // Cut inside the header: still an error naming the file, never a panic.
        for cut in [3, 10, 30, 60, 100] {
            std::fs::write(&p, &bytes[..cut]).unwrap();
            let err = GgufFile::open(&p).unwrap_err().to_string();
            assert!(err.contains("t.gguf"), "{err}");
        }
    }

    #[test]
    fn not_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"PK\x03\x04 not a gguf").unwrap();
        let err = GgufFile::open(&p).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        let err = GgufFile::open(&dir.path().join("missing.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.gguf"), "{err}");
    }
}
