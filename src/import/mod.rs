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

/// The `persistence` (and `persistence_mask`) lines for an LVS persistence timeout in seconds
/// and an optional granularity (a netmask such as `255.255.255.0`, or a prefix length); `Err`
/// says why they cannot be translated.
pub(crate) fn persistence_lines(
    timeout: &str,
    mask: Option<&str>,
    v6: bool,
) -> Result<String, String> {
    let secs: u64 = timeout
        .trim()
        .parse()
        .map_err(|_| format!("persistence timeout {timeout:?} is not a number of seconds"))?;
    if secs == 0 || secs > 7 * 86_400 {
        return Err(format!(
            "persistence timeout {secs} s is outside 1..=604800 s"
        ));
    }
    let mut out = format!("persistence = \"{secs}s\"\n");
    if let Some(m) = mask {
        let max = if v6 { 128 } else { 32 };
        let prefix = match m.trim().parse::<std::net::Ipv4Addr>() {
            Ok(ip) if !v6 => {
                let bits = u32::from(ip);
                if bits.leading_ones() + bits.trailing_zeros() != 32 {
                    return Err(format!("netmask {m} is not contiguous"));
                }
                bits.leading_ones()
            }
            _ => match m.trim().trim_start_matches('/').parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => n,
                _ => {
                    return Err(format!(
                        "netmask {m:?} is not a netmask or prefix of 1..={max}"
                    ))
                }
            },
        };
        if prefix != max {
            out.push_str(&format!("persistence_mask = {prefix}\n"));
        }
    }
    Ok(out)
}

/// A TOML basic string.
pub(crate) fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod persistence_tests {
    use super::persistence_lines;

    #[test]
    fn lvs_persistence_translates() {
        assert_eq!(
            persistence_lines("600", None, false).unwrap(),
            "persistence = \"600s\"\n"
        );
        assert_eq!(
            persistence_lines("300", Some("255.255.255.0"), false).unwrap(),
            "persistence = \"300s\"\npersistence_mask = 24\n"
        );
        assert_eq!(
            persistence_lines("300", Some("255.255.255.255"), false).unwrap(),
            "persistence = \"300s\"\n",
            "a host mask is the default"
        );
        assert_eq!(
            persistence_lines("300", Some("64"), true).unwrap(),
            "persistence = \"300s\"\npersistence_mask = 64\n"
        );
        assert!(persistence_lines("300", Some("255.0.255.0"), false).is_err());
        assert!(persistence_lines("0", None, false).is_err());
        assert!(persistence_lines("ten", None, false).is_err());
        assert!(persistence_lines("300", Some("129"), true).is_err());
    }
}
