//! Reading the binaries' TOML config files (`relay.toml`, `edge.toml`):
//! strict about typos, tolerant of files written for a newer version.
//!
//! An unknown key is an error: a misspelt `dial_timout` silently ignored
//! would leave an operator believing a setting is in force. But during a
//! rolling upgrade a ConfigMap is often updated before every pod runs the
//! new binary, and an older binary refusing the newer file crash-loops
//! exactly when the fleet is half upgraded. So a file may say which format
//! it was written for, `config_version = N` at the top: when `N` is newer
//! than this build's [`CONFIG_VERSION`], unknown keys are settings of that
//! newer version, ignored with a warning each, and the keys this build
//! knows are still checked as strictly as ever. Without `config_version`
//! (or with this build's), unknown keys are refused, naming each.

use serde::de::DeserializeOwned;

/// The config format version this build understands.
pub const CONFIG_VERSION: u32 = 1;

/// What [`parse`] read.
#[derive(Debug)]
pub struct Parsed<T> {
    /// The file's contents.
    pub value: T,
    /// Keys ignored because the file declares a newer `config_version`
    /// (dotted paths, e.g. `limits.new_knob`), each already logged.
    pub ignored: Vec<String>,
}

/// Parses `text` as `T`. `version` reads the file's `config_version` from
/// the parsed value (each file type has the key at its top level). Errors
/// are one line: TOML syntax and type errors with their position, unknown
/// keys by their dotted path.
pub fn parse<T: DeserializeOwned>(
    text: &str,
    version: impl Fn(&T) -> Option<u32>,
) -> Result<Parsed<T>, String> {
    let de = toml::Deserializer::parse(text).map_err(|e| e.to_string().trim_end().to_string())?;
    let mut unknown = Vec::new();
    let value: T = match serde_ignored::deserialize(de, |path| unknown.push(path.to_string())) {
        Ok(v) => v,
        // Name the unknown keys met before the error too: a misspelt key
        // is often why a required one is "missing".
        Err(e) if unknown.is_empty() => return Err(e.to_string().trim_end().to_string()),
        Err(e) => {
            let keys: Vec<String> = unknown.iter().map(|k| format!("`{k}`")).collect();
            return Err(format!(
                "{} (unknown: {})",
                e.to_string().trim_end(),
                keys.join(", ")
            ));
        }
    };
    let ignored = judge(version(&value), unknown)?;
    Ok(Parsed { value, ignored })
}

/// Refuses unknown keys in a file of this build's version (or none); lets
/// them pass, logged, in a file of a newer version.
fn judge(version: Option<u32>, unknown: Vec<String>) -> Result<Vec<String>, String> {
    match version {
        Some(0) => Err("config_version: must be at least 1".into()),
        Some(v) if v > CONFIG_VERSION => {
            for key in &unknown {
                tracing::warn!(
                    key = %key,
                    config_version = v,
                    understood = CONFIG_VERSION,
                    "ignoring a key of a newer config version"
                );
            }
            Ok(unknown)
        }
        _ if unknown.is_empty() => Ok(unknown),
        _ => {
            let keys: Vec<String> = unknown.iter().map(|k| format!("`{k}`")).collect();
            Err(format!(
                "unknown key{} {}: a typo, or a setting of a newer version (a file written for one declares `config_version` above {CONFIG_VERSION}, and this binary then ignores what it does not know)",
                if keys.len() == 1 { "" } else { "s" },
                keys.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct File {
        config_version: Option<u32>,
        #[serde(default)]
        limits: Limits,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    struct Limits {
        timeout: Option<u32>,
    }

    fn parse_file(text: &str) -> Result<Parsed<File>, String> {
        parse(text, |f: &File| f.config_version)
    }

    #[test]
    fn typos_are_refused_by_path_in_a_file_of_this_version() {
        let e = parse_file("[limits]\ntimout = 3\n").unwrap_err();
        assert!(e.contains("unknown key `limits.timout`"), "{e}");
        let e = parse_file("config_version = 1\nbogus = 1\n[limits]\nx = 2\n").unwrap_err();
        assert!(
            e.contains("unknown keys") && e.contains("`bogus`") && e.contains("`limits.x`"),
            "{e}"
        );
    }

    #[test]
    fn a_newer_file_keeps_known_keys_strict_and_ignores_new_ones() {
        let p =
            parse_file("config_version = 2\nnew_top = true\n[limits]\ntimeout = 3\nnew_knob = 1\n")
                .unwrap();
        assert_eq!(p.value.limits.timeout, Some(3));
        let mut ignored = p.ignored;
        ignored.sort();
        assert_eq!(ignored, vec!["limits.new_knob", "new_top"]);
        // A known key with a bad value is still an error, with its place.
        let e = parse_file("config_version = 2\n[limits]\ntimeout = \"x\"\n").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
    }

    #[test]
    fn version_zero_and_syntax_errors_are_refused() {
        assert!(parse_file("config_version = 0\n")
            .unwrap_err()
            .contains("at least 1"));
        assert!(parse_file("[limits\n").is_err());
    }
}
