//! Kernel modules in an unpacked kernel package: finding them by name and ordering a set of
//! them so every module loads after the modules it depends on.
//!
//! Debian's kernel package does not ship `modules.dep` (its postinst runs depmod), so the
//! dependencies come from each module's `.modinfo` `depends=` field, which modpost writes from
//! the same symbol resolution depmod repeats.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::error::{Error, IoContext, Result};

/// One module file in the tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleFile {
    /// Canonical name (dashes become underscores, as the kernel does).
    pub name: String,
    /// Path relative to `lib/modules/<release>/`, e.g. `kernel/drivers/virtio/virtio.ko`.
    pub rel_path: PathBuf,
}

/// The modules of one kernel release, indexed by name.
pub struct ModuleTree {
    root: PathBuf,
    by_name: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
}

/// Module names treat '-' and '_' alike.
pub fn canonical_name(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name_of(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".ko")?;
    Some(canonical_name(stem))
}

impl ModuleTree {
    /// Indexes `root` (a `lib/modules/<release>` directory). Compressed modules are refused:
    /// the initramfs init uses busybox insmod, which loads plain .ko files.
    pub fn open(root: &Path) -> Result<Self> {
        let mut by_name = HashMap::new();
        let mut stack = vec![root.join("kernel")];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).at(&dir)? {
                let path = entry.at(&dir)?.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Some(name) = module_name_of(&path) {
                    let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
                    by_name.insert(name, rel);
                }
            }
        }
        if by_name.is_empty() {
            return Err(Error::Other(format!(
                "{}: no uncompressed .ko modules found",
                root.display()
            )));
        }
        let builtin = std::fs::read_to_string(root.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| module_name_of(Path::new(l)))
            .collect();
        Ok(ModuleTree {
            root: root.to_path_buf(),
            by_name,
            builtin,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the module is compiled into the kernel (and so needs no loading).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(&canonical_name(name))
    }

    fn file(&self, name: &str) -> Option<ModuleFile> {
        let name = canonical_name(name);
        self.by_name.get(&name).map(|rel| ModuleFile {
            name,
            rel_path: rel.clone(),
        })
    }

    /// The modules `name` depends on, from its `.modinfo` section.
    pub fn depends(&self, module: &ModuleFile) -> Result<Vec<String>> {
        let path = self.root.join(&module.rel_path);
        let data = std::fs::read(&path).at(&path)?;
        let bad = |why: String| Error::Module {
            module: module.name.clone(),
            why,
        };
        let elf =
            object::File::parse(&*data).map_err(|e| bad(format!("not an ELF object: {e}")))?;
        let section = elf
            .section_by_name(".modinfo")
            .ok_or_else(|| bad("no .modinfo section".into()))?;
        let info = section
            .data()
            .map_err(|e| bad(format!("unreadable .modinfo: {e}")))?;
        let depends = info
            .split(|&b| b == 0)
            .find_map(|field| field.strip_prefix(b"depends="))
            .unwrap_or_default();
        Ok(String::from_utf8_lossy(depends)
            .split(',')
            .filter(|d| !d.is_empty())
            .map(canonical_name)
            .collect())
    }

    /// `wanted` and everything they depend on, dependencies first, each once. Built-in modules
    /// are dropped; a name that is neither a module nor built in is an error.
    pub fn load_order(&self, wanted: &[&str]) -> Result<Vec<ModuleFile>> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in wanted {
            self.visit(name, &mut Vec::new(), &mut done, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        path: &mut Vec<String>,
        done: &mut HashSet<String>,
        order: &mut Vec<ModuleFile>,
    ) -> Result<()> {
        let name = canonical_name(name);
        if done.contains(&name) {
            return Ok(());
        }
        if path.contains(&name) {
            return Err(Error::Module {
                module: name,
                why: format!("dependency cycle through {}", path.join(" -> ")),
            });
        }
        let Some(module) = self.file(&name) else {
            if self.is_builtin(&name) {
                done.insert(name);
                return Ok(());
            }
            let needed_by = path
                .last()
                .map(|p| format!(" (needed by {p})"))
                .unwrap_or_default();
            return Err(Error::Module {
                module: name,
                why: format!("not in {} and not built in{needed_by}", self.root.display()),
            });
        };
        path.push(name.clone());
        for dep in self.depends(&module)? {
            self.visit(&dep, path, done, order)?;
        }
        path.pop();
        done.insert(name);
        order.push(module);
        Ok(())
    }
}
