//! Loading and validation (filled in by the configuration work).

use super::Config;
use crate::error::Result;
use std::collections::HashMap;
use std::path::Path;

/// Where environment variables come from: the process, or a map in tests.
#[derive(Debug, Clone, Default)]
pub enum EnvSource {
    /// `std::env`.
    #[default]
    Process,
    /// A fixed map (tests).
    Map(HashMap<String, String>),
}

impl EnvSource {
    /// Look a variable up.
    pub fn get(&self, key: &str) -> Option<String> {
        match self {
            EnvSource::Process => std::env::var(key).ok(),
            EnvSource::Map(m) => m.get(key).cloned(),
        }
    }
}

/// Load a configuration: file (optional) + environment, validated.
pub fn load(path: Option<&Path>, env: &EnvSource) -> Result<Config> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).map_err(|e| crate::Error::Io {
            context: format!("cannot read configuration file {}", p.display()),
            source: e,
        })?,
        None => String::new(),
    };
    load_from_str(&text, env)
}

/// Load from YAML text + environment, validated.
pub fn load_from_str(text: &str, _env: &EnvSource) -> Result<Config> {
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    serde_saphyr::from_str(text).map_err(|e| crate::Error::invalid_config(e.to_string()))
}
