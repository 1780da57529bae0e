//! Configuration loading and bad input: YAML and environment, secrets, the
//! property tests of configuration and headers, and what malformed messages,
//! headers, JSON and sizes do on the broker.

mod badinput_errors;
mod badinput_headers;
mod badinput_json;
mod badinput_size;
mod env;
mod errors;
mod file;
mod proptest_config;
mod proptest_headers;
mod secrets;
