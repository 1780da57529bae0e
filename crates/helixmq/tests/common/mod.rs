//! Helpers shared by the integration tests. Each test target uses a part of them.
#![allow(dead_code, unreachable_pub)] // helpers of test binaries: `pub` for their test files, never exported

pub mod conformance;
