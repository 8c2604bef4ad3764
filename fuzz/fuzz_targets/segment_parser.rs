//! The segment parser, and the compiler for what parses.
#![no_main]
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(file) = parse_segments(&String::from_utf8_lossy(data)) {
        let _ = Plan::compile(&file);
    }
});
