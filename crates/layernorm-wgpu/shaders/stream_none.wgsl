//! The streamed-row driver's stand-in where rows are cached in registers (K > 0): `stream` is
// never called there, and leaving the unrolled driver out keeps the pipeline small to compile.
var<private> s_base: u32;

fn stream(step: u32, lane: u32) {}
