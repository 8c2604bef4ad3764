//! The event parser, full and projected through the 20-segment benchmark plan.
#![no_main]
use herald_operators::event::{parse_message, Limits};
use herald_operators::lang::parse::parse_segments;
use herald_operators::plan::Plan;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    let _ = parse_message(data, Some(1_700_000_000_000), limits);
    thread_local! {
        static PLAN: Plan = Plan::compile(
            &parse_segments(include_str!("../../benches/segments20.sql")).unwrap(),
        );
    }
    PLAN.with(|plan| {
        let _ = plan.parse_projected(data, limits, &|_| false);
        let _ = plan.parse_projected(data, limits, &|_| true);
    });
});
