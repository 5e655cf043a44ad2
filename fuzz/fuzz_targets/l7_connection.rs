#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| loupe::fuzzing::l7_connection(data));
