#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loupe::fuzzing::http1_connection(data));
