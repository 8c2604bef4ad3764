//! The journey YAML parser, and the compiler for what parses.
#![no_main]
use herald_operators::journey::{compile_journeys, parse_journeys};
use herald_operators::lang::parse::parse_segments;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let segments = parse_segments(
        "CREATE SEGMENT buyers AS count(*) FILTER (WHERE event = 'Order Completed') >= 1;\n\
         CREATE SEGMENT pro AS plan = 'pro';\n",
    )
    .unwrap();
    if let Ok(defs) = parse_journeys(&String::from_utf8_lossy(data)) {
        let _ = compile_journeys(&segments, &defs);
    }
});
