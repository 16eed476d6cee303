//! `xdpvs import`: an existing LVS configuration translated to xdpvs TOML, so that switching
//! starts from the operator's own config. What cannot be translated is a [`Warning`] naming its
//! file and line; the TOML produced always passes `xdpvs check` ([`Import::validate`]).

pub mod keepalived;
pub mod ldirectord;

use std::path::Path;

/// A setting left out or changed, where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub file: String,
    /// 1-based; 0 = not about one line.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(f, "{}:{}: {}", self.file, self.line, self.message)
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

/// A translation: the TOML text and what did not carry over.
#[derive(Debug, Clone)]
pub struct Import {
    pub toml: String,
    pub warnings: Vec<Warning>,
}

impl Import {
    /// Parses the produced TOML as `xdpvs check` does: an error here is a bug of the importer.
    pub fn validate(&self) -> Result<crate::config::Config, crate::config::ConfigError> {
        crate::config::Config::parse(&self.toml, Path::new("(imported)"))
    }
}

/// A TOML basic string.
pub(crate) fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}
