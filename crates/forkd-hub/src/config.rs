//! The user's hub setting: `$XDG_CONFIG_HOME/forkd/config.toml` (else
//! `~/.config/forkd/config.toml`), `hub = "URL"`, written by `forkd hub use URL`. forkd has no
//! compiled-in hub: a name nobody controls for certain must never receive pulls by default.

use std::path::{Path, PathBuf};

use crate::error::{HubError, Result};

/// The user's configuration directory: `$XDG_CONFIG_HOME`, else `~/.config`; None without
/// either variable.
pub fn config_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })
}

/// Where the user's forkd configuration lives.
pub fn config_path() -> Option<PathBuf> {
    Some(config_dir()?.join("forkd").join("config.toml"))
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> HubError {
    HubError::Invalid(format!("config {}: {what}", path.display()))
}

/// The whole file as a TOML table (empty when there is none).
fn read_table(path: &Path) -> Result<toml::Table> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.parse().map_err(|e: toml::de::Error| {
            let why: Vec<&str> = e.message().lines().map(str::trim).collect();
            invalid(path, format!("not valid TOML: {}", why.join("; ")))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(toml::Table::new()),
        Err(e) => Err(invalid(path, e)),
    }
}

/// The hub the configuration file names, if it names one.
pub fn configured_hub(path: &Path) -> Result<Option<String>> {
    match read_table(path)?.get("hub") {
        None => Ok(None),
        Some(toml::Value::String(hub)) if !hub.trim().is_empty() => Ok(Some(hub.trim().into())),
        Some(_) => Err(invalid(path, "`hub` must be a non-empty string")),
    }
}

/// Records `hub` in the configuration file, keeping its other settings; the file is replaced
/// whole (written beside it, then renamed), so a failure leaves the old one.
pub fn save_hub(path: &Path, hub: &str) -> Result<()> {
    let mut table = read_table(path)?;
    table.insert("hub".into(), toml::Value::String(hub.into()));
    let dir = path
        .parent()
        .ok_or_else(|| invalid(path, "has no parent directory"))?;
    std::fs::create_dir_all(dir).map_err(|e| invalid(path, e))?;
    let text = toml::to_string(&table).map_err(|e| invalid(path, e))?;
    let temp = dir.join(".config.toml.tmp");
    std::fs::write(&temp, text)
        .and_then(|()| std::fs::rename(&temp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&temp);
            invalid(path, e)
        })
}

/// The hub to use: `--hub`, else `FORKD_HUB_URL`, else the configuration file; with none of
/// them, an error that says how to choose one.
pub fn hub_from(flag: Option<&str>) -> Result<String> {
    if let Some(hub) = flag.filter(|h| !h.trim().is_empty()) {
        return Ok(hub.trim().to_string());
    }
    if let Some(hub) = std::env::var("FORKD_HUB_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        return Ok(hub.trim().to_string());
    }
    let path = config_path();
    if let Some(hub) = path.as_deref().map(configured_hub).transpose()?.flatten() {
        return Ok(hub);
    }
    let file = path.map_or_else(
        || "the configuration file".to_string(),
        |p| p.display().to_string(),
    );
    Err(HubError::Invalid(format!(
        "no hub chosen: pass --hub URL, set FORKD_HUB_URL, or run `forkd hub use URL` (saved in {file})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_is_saved_read_back_and_other_settings_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("forkd/config.toml");
        assert_eq!(configured_hub(&path).unwrap(), None, "no file: no hub");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "other = 3\n").unwrap();
        save_hub(&path, "http://127.0.0.1:8804/").unwrap();
        assert_eq!(
            configured_hub(&path).unwrap().as_deref(),
            Some("http://127.0.0.1:8804/")
        );
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("other = 3"));
        save_hub(&path, "https://hub.example/registry.json").unwrap();
        assert_eq!(
            configured_hub(&path).unwrap().as_deref(),
            Some("https://hub.example/registry.json")
        );
    }

    #[test]
    fn a_malformed_file_is_named_in_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "hub = [").unwrap();
        let e = configured_hub(&path).unwrap_err().to_string();
        assert!(
            e.contains("config.toml") && e.contains("not valid TOML"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
        std::fs::write(&path, "hub = 3").unwrap();
        let e = configured_hub(&path).unwrap_err().to_string();
        assert!(e.contains("non-empty string"), "{e}");
        // A file that cannot be read back is not overwritten by a save.
        std::fs::write(&path, "hub = [").unwrap();
        assert!(save_hub(&path, "http://x/").is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hub = [");
    }
}
