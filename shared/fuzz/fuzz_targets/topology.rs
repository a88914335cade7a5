//! The topology parser, on any text a user might write: a topology or an error naming the
//! line and key, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_shared::topology::Topology;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Topology::parse(text, "fuzz.yml");
    }
});
