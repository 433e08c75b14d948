//! Recipes: small declarative TOML files (in `recipes/` at the repository root) describing a
//! guest root filesystem.
//!
//! ```toml
//! name = "python-numpy"
//! description = "Debian bookworm with Python 3 and numpy imported in the warm interpreter"
//! base = "debian"            # "busybox" | "debian"
//! memory_mib = 512           # guest memory the snapshot is taken with
//! size_mib = 1024            # ext4 image size; omitted: fitted to the content
//! packages = ["python3", "python3-numpy"]   # apt (debian base only)
//! pip = []                   # pip packages (debian base only; pulls in python3-pip)
//! npm = ["playwright@1.50.1"]  # npm packages, global under /usr/local (debian only; pulls in
//!                            # nodejs and npm; NODE_PATH=/usr/local/lib/node_modules)
//! run = ["python3 -c 'import numpy'"]       # build-time commands inside the image (debian only)
//!
//! [debian]                   # debian base only; all optional
//! suite = "bookworm"
//! variant = "minbase"
//! mirror = "http://deb.debian.org/debian"
//!
//! [env]                      # for the build's pip/npm/run commands and the guest's agent
//! PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD = "1"
//!
//! [[files]]                  # copied into the image; src is relative to the recipe file
//! src = "files/motd"
//! dest = "/etc/motd"
//! mode = 0o644
//!
//! [eval]                     # the agent's long-lived interpreter, warmed before the snapshot
//! interpreter = "python3"
//! warmup = ["import numpy"]
//!
//! [snapshot]                 # how the warmed parent is taken (scripts/hub-build.sh)
//! tag = "python-numpy"       # the tag users fork (default: the recipe's name)
//! warmup = ["pg_ctlcluster 15 main start"]  # shell commands run in the booted guest first
//! provides = ["/usr/bin/python3"]           # files the image must hold (checked by the tests)
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What the image starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Base {
    /// busybox-static from Debian and nothing else: a few MiB.
    Busybox,
    /// `debootstrap` of a Debian suite, plus apt and pip packages.
    Debian,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DebianBase {
    #[serde(default = "default_suite")]
    pub suite: String,
    #[serde(default = "default_variant")]
    pub variant: String,
    #[serde(default = "default_mirror")]
    pub mirror: String,
}

impl Default for DebianBase {
    fn default() -> Self {
        DebianBase {
            suite: default_suite(),
            variant: default_variant(),
            mirror: default_mirror(),
        }
    }
}

fn default_suite() -> String {
    "bookworm".into()
}
fn default_variant() -> String {
    "minbase".into()
}
fn default_mirror() -> String {
    "http://deb.debian.org/debian".into()
}
fn default_memory_mib() -> u32 {
    256
}
fn default_interpreter() -> String {
    "python3".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Host path, relative to the recipe file's directory.
    pub src: PathBuf,
    /// Absolute path inside the image.
    pub dest: String,
    /// Permission bits; default 0o644 (0o755 for executables).
    pub mode: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Interpreter command the agent keeps running for `eval`.
    #[serde(default = "default_interpreter")]
    pub interpreter: String,
    /// Code run in that interpreter before the snapshot (e.g. `import numpy`).
    #[serde(default)]
    pub warmup: Vec<String>,
}

/// How the image's warmed snapshot is taken and published; none of it changes the image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotSpec {
    /// The tag users fork (default: the recipe's name).
    pub tag: Option<String>,
    /// Shell commands the agent runs in the booted guest before the snapshot (start a server,
    /// open a browser tab): what children start with besides the warm interpreter.
    #[serde(default)]
    pub warmup: Vec<String>,
    /// Absolute paths the built image must hold (its promised binaries), checked by the suite.
    #[serde(default)]
    pub provides: Vec<String>,
    /// What every child forked from the published pack must answer, checked after a pull
    /// into a fresh data directory (`scripts/hub-check.sh`).
    pub check: Option<ChildCheckSpec>,
}

/// One question for a forked child: an `eval` in its warm interpreter or an `exec` of a shell
/// command, whose standard output (trimmed) must contain `expect`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildCheckSpec {
    pub eval: Option<String>,
    pub exec: Option<String>,
    pub expect: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub base: Base,
    pub debian: Option<DebianBase>,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub pip: Vec<String>,
    /// npm packages installed globally (`npm install -g --prefix /usr/local`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub npm: Vec<String>,
    /// Environment variables for the build's pip, npm and run commands and for the agent in
    /// the guest (so `exec` and `eval` see them).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub run: Vec<String>,
    #[serde(default)]
    pub files: Vec<FileSpec>,
    pub eval: Option<EvalSpec>,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    pub size_mib: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotSpec>,
}

/// Where `npm` packages are installed (`npm install -g --prefix NPM_PREFIX`).
pub const NPM_PREFIX: &str = "/usr/local";
/// Where Node finds them: NODE_PATH in the image's environment when the recipe has `npm`
/// (Debian's Node does not look under /usr/local/lib/node_modules by itself).
pub const NPM_NODE_PATH: &str = "/usr/local/lib/node_modules";

impl Recipe {
    /// The Debian settings (defaults when the table is omitted).
    pub fn debian_base(&self) -> DebianBase {
        self.debian.clone().unwrap_or_default()
    }

    /// The tag the recipe's snapshot is taken (and published) under.
    pub fn snapshot_tag(&self) -> &str {
        self.snapshot
            .as_ref()
            .and_then(|s| s.tag.as_deref())
            .unwrap_or(&self.name)
    }

    /// What the image is built from, as a registry's `base_image` says it.
    pub fn base_image(&self) -> String {
        match self.base {
            Base::Busybox => "debian:busybox-static".into(),
            Base::Debian => format!("debian:{}", self.debian_base().suite),
        }
    }

    /// The apt packages the image gets: the recipe's, plus what its `pip` and `npm`
    /// need.
    pub fn apt_packages(&self) -> Vec<String> {
        let mut include = self.packages.clone();
        let mut need = |package: &str, wanted: bool| {
            if wanted && !include.iter().any(|p| p == package) {
                include.push(package.to_string());
            }
        };
        need("python3-pip", !self.pip.is_empty());
        need("nodejs", !self.npm.is_empty());
        need("npm", !self.npm.is_empty());
        include
    }

    /// The image's environment: NODE_PATH for `npm` packages (unless `env` sets it), then
    /// `env`.
    pub fn image_env(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if !self.npm.is_empty() {
            env.insert("NODE_PATH".to_string(), NPM_NODE_PATH.to_string());
        }
        env.extend(self.env.clone());
        env
    }
}

/// A parsed and validated recipe and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedRecipe {
    pub path: PathBuf,
    pub recipe: Recipe,
}

impl LoadedRecipe {
    /// The directory `files[].src` paths are relative to.
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    pub fn file_source(&self, spec: &FileSpec) -> PathBuf {
        self.dir().join(&spec.src)
    }
}

pub const MIN_MEMORY_MIB: u32 = 64;
pub const MAX_MEMORY_MIB: u32 = 1 << 20;
pub const MIN_SIZE_MIB: u32 = 16;
pub const MAX_SIZE_MIB: u32 = 1 << 20;

/// Finds a recipe by name (`recipes/<name>.toml` under `dirs`) or takes RECIPE as a path when
/// it contains a '/' or ends in `.toml`.
pub fn locate(recipe: &str, dirs: &[PathBuf]) -> Result<PathBuf> {
    if recipe.contains('/') || recipe.ends_with(".toml") {
        let path = PathBuf::from(recipe);
        if !path.is_file() {
            return Err(Error::Other(format!("recipe file {recipe} does not exist")));
        }
        return Ok(path);
    }
    if let Some(found) = dirs
        .iter()
        .map(|d| d.join(format!("{recipe}.toml")))
        .find(|p| p.is_file())
    {
        return Ok(found);
    }
    let mut known: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.strip_suffix(".toml").map(str::to_string)
        })
        .collect();
    known.sort();
    known.dedup();
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(Error::Other(format!(
        "unknown recipe `{recipe}`: no {recipe}.toml in {} (known: {})",
        if searched.is_empty() {
            "any recipes directory".to_string()
        } else {
            searched.join(", ")
        },
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )))
}

/// Where recipes are looked up by name: FORKD_RECIPES (colon-separated), else `recipes/` in the
/// current directory or any parent (so it works anywhere inside the repository).
pub fn recipe_dirs() -> Vec<PathBuf> {
    if let Some(v) = std::env::var_os("FORKD_RECIPES").filter(|v| !v.is_empty()) {
        return std::env::split_paths(&v).collect();
    }
    let Ok(cwd) = std::env::current_dir() else {
        return Vec::new();
    };
    cwd.ancestors()
        .map(|d| d.join("recipes"))
        .find(|d| d.is_dir())
        .into_iter()
        .collect()
}

/// Reads, parses and validates a recipe file.
pub fn load(path: &Path) -> Result<LoadedRecipe> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Recipe {
        path: path.to_path_buf(),
        why: format!("cannot read: {e}"),
    })?;
    let recipe = parse(&text).map_err(|e| Error::Recipe {
        path: path.to_path_buf(),
        why: e.0,
    })?;
    let loaded = LoadedRecipe {
        path: path.to_path_buf(),
        recipe,
    };
    validate(&loaded).map_err(|why| Error::Recipe {
        path: path.to_path_buf(),
        why,
    })?;
    Ok(loaded)
}

/// A recipe that is not valid TOML or not a recipe: one line naming the line and field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RecipeSyntaxError(pub String);

/// Parses TOML into a recipe; errors are one line naming the line and field.
pub fn parse(text: &str) -> std::result::Result<Recipe, RecipeSyntaxError> {
    toml::from_str(text).map_err(|e| RecipeSyntaxError(describe_toml_error(text, &e)))
}

fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().replace('\n', " ");
    let Some(span) = err.span() else {
        return message;
    };
    let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    // Name the key on that line when the message does not already (e.g. a wrong type).
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"'))
        .filter(|k| !k.is_empty() && !message.contains(&format!("`{k}`")));
    match key {
        Some(k) => format!("line {line_no}: field `{k}`: {message}"),
        None => format!("line {line_no}: {message}"),
    }
}

fn field_err(field: &str, why: impl std::fmt::Display) -> String {
    format!("field `{field}`: {why}")
}

/// Debian package names: lowercase alphanumerics and + - . (policy 5.6.1), at least 2 chars.
fn valid_apt_name(name: &str) -> bool {
    name.len() >= 2
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

/// An npm package spec (`name`, `name@version`, `@scope/name@range`): no whitespace, not an
/// option, not a path or URL (packages come from the registry).
fn valid_npm_spec(spec: &str) -> bool {
    !spec.is_empty()
        && !spec.starts_with(['-', '.', '/'])
        && !spec.contains("://")
        && !spec.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// An environment variable name as a shell exports it.
fn valid_env_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A pip requirement: no whitespace, not an option, not empty.
fn valid_pip_requirement(req: &str) -> bool {
    !req.is_empty()
        && !req.starts_with('-')
        && !req.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn validate(loaded: &LoadedRecipe) -> std::result::Result<(), String> {
    let r = &loaded.recipe;
    if !valid_name(&r.name) {
        return Err(field_err(
            "name",
            format!(
                "\"{}\" must be 1-64 of [A-Za-z0-9._-], starting alphanumeric",
                r.name
            ),
        ));
    }
    if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&r.memory_mib) {
        return Err(field_err(
            "memory_mib",
            format!(
                "{} is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB}",
                r.memory_mib
            ),
        ));
    }
    if let Some(size) = r.size_mib {
        if !(MIN_SIZE_MIB..=MAX_SIZE_MIB).contains(&size) {
            return Err(field_err(
                "size_mib",
                format!("{size} is outside {MIN_SIZE_MIB}..={MAX_SIZE_MIB}"),
            ));
        }
    }
    if r.base == Base::Busybox {
        for (field, used) in [
            ("packages", !r.packages.is_empty()),
            ("pip", !r.pip.is_empty()),
            ("npm", !r.npm.is_empty()),
            ("run", !r.run.is_empty()),
            ("debian", r.debian.is_some()),
        ] {
            if used {
                return Err(field_err(
                    field,
                    "needs base = \"debian\" (a busybox image has no package manager)",
                ));
            }
        }
    }
    if let Some(bad) = r.packages.iter().find(|p| !valid_apt_name(p)) {
        return Err(field_err(
            "packages",
            format!("\"{bad}\" is not a Debian package name"),
        ));
    }
    if let Some(bad) = r.pip.iter().find(|p| !valid_pip_requirement(p)) {
        return Err(field_err(
            "pip",
            format!("\"{bad}\" is not a pip requirement"),
        ));
    }
    if let Some(bad) = r.npm.iter().find(|p| !valid_npm_spec(p)) {
        return Err(field_err(
            "npm",
            format!("\"{bad}\" is not an npm package (name, name@version or @scope/name@version)"),
        ));
    }
    for (name, value) in &r.env {
        if !valid_env_name(name) {
            return Err(field_err(
                &format!("env.{name}"),
                "is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
            ));
        }
        if value.contains('\0') {
            return Err(field_err(&format!("env.{name}"), "contains a NUL byte"));
        }
    }
    if let Some(bad) = r.run.iter().find(|c| c.trim().is_empty()) {
        return Err(field_err("run", format!("empty command \"{bad}\"")));
    }
    let debian = r.debian_base();
    for (field, value) in [
        ("debian.suite", &debian.suite),
        ("debian.variant", &debian.variant),
    ] {
        if !valid_name(value) {
            return Err(field_err(
                field,
                format!("\"{value}\" is not a suite/variant name"),
            ));
        }
    }
    if !(debian.mirror.starts_with("http://") || debian.mirror.starts_with("https://")) {
        return Err(field_err(
            "debian.mirror",
            format!("\"{}\" is not an http(s) URL", debian.mirror),
        ));
    }
    for (i, f) in r.files.iter().enumerate() {
        let field = format!("files[{i}]");
        validate_dest(&f.dest).map_err(|why| field_err(&format!("{field}.dest"), why))?;
        if f.mode.is_some_and(|m| m > 0o7777) {
            return Err(field_err(
                &format!("{field}.mode"),
                format!("{:#o} is not a permission mode", f.mode.unwrap()),
            ));
        }
        let src = loaded.file_source(f);
        if !src.is_file() {
            return Err(field_err(
                &format!("{field}.src"),
                format!("{} is not a file", src.display()),
            ));
        }
    }
    if let Some(snapshot) = &r.snapshot {
        validate_snapshot(snapshot)?;
    }
    if let Some(eval) = &r.eval {
        if eval.interpreter.trim().is_empty() {
            return Err(field_err("eval.interpreter", "is empty"));
        }
        if r.base == Base::Busybox {
            return Err(field_err(
                "eval",
                "needs base = \"debian\" (busybox has no interpreter to keep warm)",
            ));
        }
    }
    Ok(())
}

fn validate_snapshot(s: &SnapshotSpec) -> std::result::Result<(), String> {
    if let Some(tag) = &s.tag {
        let first_ok = tag
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        let rest_ok = tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !first_ok || !rest_ok || tag.len() > 64 {
            return Err(field_err(
                "snapshot.tag",
                format!("\"{tag}\" is not a tag ([A-Za-z0-9_][A-Za-z0-9._-]{{0,63}})"),
            ));
        }
    }
    if let Some(bad) = s.warmup.iter().find(|c| c.trim().is_empty()) {
        return Err(field_err(
            "snapshot.warmup",
            format!("empty command \"{bad}\""),
        ));
    }
    for p in &s.provides {
        validate_dest(p).map_err(|why| field_err("snapshot.provides", why))?;
    }
    if let Some(check) = &s.check {
        let given = |c: &Option<String>| c.as_ref().is_some_and(|c| !c.trim().is_empty());
        if given(&check.eval) == given(&check.exec) {
            return Err(field_err(
                "snapshot.check",
                "needs exactly one of `eval` (code) and `exec` (a shell command)",
            ));
        }
        if check.expect.trim().is_empty() {
            return Err(field_err(
                "snapshot.check.expect",
                "must name the output a child answers",
            ));
        }
    }
    Ok(())
}

fn validate_dest(dest: &str) -> std::result::Result<(), String> {
    if !dest.starts_with('/') || dest == "/" {
        return Err(format!("\"{dest}\" must be an absolute file path"));
    }
    if dest.split('/').any(|c| c == ".." || c == ".") || dest.contains('\0') {
        return Err(format!("\"{dest}\" must not contain . or .. components"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<LoadedRecipe> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(&path, text).unwrap();
        std::fs::write(dir.path().join("motd"), b"hi").unwrap();
        let r = load(&path);
        drop(dir);
        r
    }

    fn load_err(text: &str) -> String {
        let msg = load_text(text).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "error spans lines: {msg}");
        assert!(
            msg.contains("r.toml: "),
            "error does not name the file: {msg}"
        );
        msg
    }

    const MINIMAL: &str = "name = \"m\"\nbase = \"busybox\"\n";

    #[test]
    fn a_minimal_recipe_gets_defaults() {
        let r = load_text(MINIMAL).unwrap().recipe;
        assert_eq!(r.base, Base::Busybox);
        assert_eq!(r.memory_mib, 256);
        assert_eq!(r.size_mib, None);
        assert_eq!(r.debian_base().suite, "bookworm");
    }

    #[test]
    fn a_full_debian_recipe_parses() {
        let r = load_text(
            r#"
name = "py"
base = "debian"
memory_mib = 512
size_mib = 900
packages = ["python3", "python3-numpy"]
pip = ["requests==2.31.0"]
run = ["python3 -c 'import numpy'"]
[debian]
suite = "bookworm"
[[files]]
src = "motd"
dest = "/etc/motd"
mode = 0o600
[eval]
warmup = ["import numpy"]
"#,
        )
        .unwrap()
        .recipe;
        assert_eq!(r.files[0].mode, Some(0o600));
        assert_eq!(r.eval.unwrap().interpreter, "python3");
        assert_eq!(r.debian.unwrap().variant, "minbase");
    }

    #[test]
    fn npm_packages_bring_node_and_their_module_path() {
        let r = load_text(
            r#"
name = "js"
base = "debian"
packages = ["chromium"]
npm = ["playwright@1.50.1", "@scope/tool@^2", "left-pad"]
[env]
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD = "1"
[eval]
interpreter = "node"
"#,
        )
        .unwrap()
        .recipe;
        assert_eq!(r.apt_packages(), ["chromium", "nodejs", "npm"]);
        let image_env = r.image_env();
        let env: Vec<(&str, &str)> = image_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            env,
            [
                ("NODE_PATH", NPM_NODE_PATH),
                ("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
            ]
        );
        // Without npm: nothing added, and a recipe's own NODE_PATH wins.
        let plain = load_text(
            "name = \"p\"\nbase = \"debian\"\npip = [\"six\"]\n[env]\nNODE_PATH = \"/x\"\n",
        )
        .unwrap()
        .recipe;
        assert_eq!(plain.apt_packages(), ["python3-pip"]);
        assert_eq!(plain.image_env()["NODE_PATH"], "/x");
    }

    #[test]
    fn malformed_recipes_are_refused_naming_file_and_field() {
        let cases = [
            ("name = \"m\"\n", "missing field `base`"),
            ("name = \"m\"\nbase = \"alpine\"\n", "unknown variant `alpine`"),
            ("name = \"m\"\nbase = \"busybox\"\nmemory_mib = \"lots\"\n", "line 3: field `memory_mib`"),
            ("name = \"m\"\nbase = \"busybox\"\ncolour = 1\n", "unknown field `colour`"),
            ("name = \"m\"\nbase = \"busybox\"\nmemory_mib = 1\n", "field `memory_mib`: 1 is outside"),
            ("name = \"m\"\nbase = \"busybox\"\nsize_mib = 1\n", "field `size_mib`"),
            ("name = \"m\"\nbase = \"busybox\"\npackages = [\"python3\"]\n", "field `packages`: needs base = \"debian\""),
            ("name = \"m m\"\nbase = \"busybox\"\n", "field `name`"),
            ("name = \"m\"\nbase = \"debian\"\npackages = [\"Bad Name\"]\n", "\"Bad Name\" is not a Debian package name"),
            ("name = \"m\"\nbase = \"debian\"\npip = [\"--index-url=x\"]\n", "field `pip`"),
            ("name = \"m\"\nbase = \"debian\"\n[debian]\nmirror = \"ftp://x\"\n", "field `debian.mirror`"),
            ("name = \"m\"\nbase = \"busybox\"\n[[files]]\nsrc = \"motd\"\ndest = \"etc/motd\"\n", "field `files[0].dest`"),
            ("name = \"m\"\nbase = \"busybox\"\n[[files]]\nsrc = \"motd\"\ndest = \"/etc/../x\"\n", "files[0].dest"),
            ("name = \"m\"\nbase = \"busybox\"\n[[files]]\nsrc = \"nope\"\ndest = \"/x\"\n", "field `files[0].src`"),
            ("name = \"m\"\nbase = \"busybox\"\n[[files]]\nsrc = \"motd\"\ndest = \"/x\"\nmode = 0o17777\n", "files[0].mode"),
            ("name = \"m\"\nbase = \"busybox\"\n[eval]\nwarmup = []\n", "field `eval`"),
            ("name = \"m\"\nbase = \"busybox\"\n[eval\n", "line 3"),
            ("name = \"m\"\nbase = \"busybox\"\nnpm = [\"left-pad\"]\n", "field `npm`: needs base = \"debian\""),
            ("name = \"m\"\nbase = \"debian\"\nnpm = [\"--global\"]\n", "field `npm`: \"--global\" is not an npm package"),
            ("name = \"m\"\nbase = \"debian\"\nnpm = [\"./local\"]\n", "field `npm`"),
            ("name = \"m\"\nbase = \"debian\"\nnpm = [\"https://x/y.tgz\"]\n", "field `npm`"),
            ("name = \"m\"\nbase = \"debian\"\nnpm = [\"a b\"]\n", "field `npm`"),
            ("name = \"m\"\nbase = \"debian\"\nnpm = \"playwright\"\n", "line 3: field `npm`"),
            ("name = \"m\"\nbase = \"debian\"\n[env]\n\"BAD-NAME\" = \"1\"\n", "field `env.BAD-NAME`"),
            ("name = \"m\"\nbase = \"debian\"\n[env]\nX = 1\n", "line 4: field `X`"),
            ("name = \"m\"\nbase = \"busybox\"\n[snapshot.check]\nexpect = \"6\"\n", "field `snapshot.check`: needs exactly one"),
            ("name = \"m\"\nbase = \"busybox\"\n[snapshot.check]\neval = \"1\"\nexec = \"true\"\nexpect = \"1\"\n", "field `snapshot.check`: needs exactly one"),
            ("name = \"m\"\nbase = \"busybox\"\n[snapshot.check]\nexec = \"true\"\nexpect = \" \"\n", "field `snapshot.check.expect`"),
            ("name = \"m\"\nbase = \"busybox\"\n[snapshot.check]\nexec = \"true\"\n", "missing field `expect`"),
        ];
        for (text, expected) in cases {
            let msg = load_err(text);
            assert!(
                msg.contains(expected),
                "for {text:?}: got {msg:?}, expected {expected:?}"
            );
        }
    }

    #[test]
    fn unknown_recipes_list_the_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("minimal.toml"), MINIMAL).unwrap();
        let dirs = vec![dir.path().to_path_buf()];
        assert_eq!(
            locate("minimal", &dirs).unwrap(),
            dir.path().join("minimal.toml")
        );
        let msg = locate("nosuch", &dirs).unwrap_err().to_string();
        assert!(msg.starts_with("unknown recipe `nosuch`"), "{msg}");
        assert!(msg.contains("(known: minimal)"), "{msg}");
        assert!(locate("./missing.toml", &dirs)
            .unwrap_err()
            .to_string()
            .contains("missing.toml does not exist"));
    }

    #[test]
    fn the_repository_recipes_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "toml") {
                let loaded = load(&path).unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(
                    path.file_stem().unwrap().to_str(),
                    Some(loaded.recipe.name.as_str())
                );
                // Every published pack says what its forked children answer.
                assert!(
                    loaded.recipe.name == "minimal"
                        || loaded
                            .recipe
                            .snapshot
                            .as_ref()
                            .is_some_and(|s| s.check.is_some()),
                    "{}: no [snapshot.check]",
                    path.display()
                );
                names.push(loaded.recipe.name);
            }
        }
        names.sort();
        for name in [
            "minimal",
            "python-numpy",
            "postgres-fixture",
            "coding-agent",
            "nodejs",
            "e2b-codeinterpreter",
            "jupyter-kernel",
            "langgraph-react",
            "playwright-browser",
        ] {
            assert!(names.iter().any(|n| n == name), "{name} missing: {names:?}");
        }
        let node = load(&dir.join("nodejs.toml")).unwrap().recipe;
        assert_eq!(node.memory_mib, 512);
        assert_eq!(node.eval.unwrap().interpreter, "node");
        let pw = load(&dir.join("playwright-browser.toml")).unwrap().recipe;
        assert_eq!(pw.memory_mib, 2048);
        assert!(pw.npm.iter().any(|p| p.starts_with("playwright@")));
        assert!(pw.apt_packages().iter().any(|p| p == "chromium"));
        assert_eq!(pw.env["PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD"], "1");
        let warmup = pw.eval.unwrap().warmup.join("\n");
        for global in [
            "globalThis.browser",
            "globalThis.context",
            "globalThis.page",
        ] {
            assert!(warmup.contains(global), "{warmup}");
        }
    }
}
