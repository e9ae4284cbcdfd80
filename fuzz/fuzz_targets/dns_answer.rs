#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    scaleout_dns::zone::fuzzing::answer(data);
});
