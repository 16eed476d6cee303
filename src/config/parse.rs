//! Parsing and validation (in progress).
use super::Config;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub fn io(path: &Path, e: &std::io::Error) -> Self {
        ConfigError(format!("{}: {e}", path.display()))
    }
}

pub fn parse(_text: &str, path: &Path) -> Result<Config, ConfigError> {
    Err(ConfigError(format!("{}: not implemented", path.display())))
}
