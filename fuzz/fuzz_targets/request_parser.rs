//! Feeds arbitrary bytes, split into path, headers and body by [`llmroute_fuzz::split_input`],
//! to the sidecar's request parser and panics when an invariant of
//! [`llmroute_fuzz::check_input`] fails.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(failure) = llmroute_fuzz::check_input(data) {
        panic!("{failure}");
    }
});
