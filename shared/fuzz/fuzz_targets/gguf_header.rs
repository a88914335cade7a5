//! The GGUF header reader, on any file: a header whose every tensor lies inside the file, or an
//! error, never a panic or a huge allocation from a corrupt count or length.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_shared::gguf::GgufFile;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = GgufFile::parse(data, std::path::Path::new("fuzz.gguf")) {
        for t in file.tensors() {
            assert!(t.offset + t.n_bytes <= data.len() as u64, "{} lies outside", t.name);
        }
    }
});
