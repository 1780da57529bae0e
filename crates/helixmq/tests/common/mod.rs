//! Helpers shared by the integration tests. Each test target uses a part of them.
#![allow(dead_code)]

pub mod conformance;
