//! Helpers shared by the tests and the bench.

pub mod data;
