//! The backend's tests against the reference and its contract, in one binary: every test shares
//! one device per configuration (the default, without subgroups, with capped bindings and grids),
//! and with it the pipelines each compiles. Compiling pipelines is most of what these tests cost
//! on lavapipe, and most shapes recur from one file to the next.

#[path = "../common/mod.rs"]
mod common;

mod accuracy;
mod api;
mod family;
