#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    seb_agent_fuzz::frames(data);
});
