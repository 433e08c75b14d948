//! Policy: an error renders its chain once.
//!
//! The CLI (and soon the daemon) print errors with `{:#}`, which appends every `source()` after
//! the message. An error whose `#[error("…")]` message also interpolates its own source prints
//! the cause twice (`kernel x: bad image: bad image`). This test parses every crate's sources and
//! fails on any `thiserror` message that names the field it marks as its source.

use std::path::{Path, PathBuf};

use syn::visit::Visit;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn derives_error(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("derive")
            && a.parse_args_with(
                syn::punctuated::Punctuated::<syn::Path, syn::Token![,]>::parse_terminated,
            )
            .is_ok_and(|paths| {
                paths
                    .iter()
                    .any(|p| p.segments.last().is_some_and(|s| s.ident == "Error"))
            })
    })
}

/// How the source field is spelled inside a format string and in format arguments.
enum SourceField {
    Named(String),
    Index(usize),
}

fn has_attr(attrs: &[syn::Attribute], name: &str) -> bool {
    attrs.iter().any(|a| a.path().is_ident(name))
}

fn source_field(fields: &syn::Fields) -> Option<SourceField> {
    for (i, field) in fields.iter().enumerate() {
        let marked = has_attr(&field.attrs, "source") || has_attr(&field.attrs, "from");
        match &field.ident {
            Some(ident) if marked || ident == "source" => {
                return Some(SourceField::Named(ident.to_string()))
            }
            None if marked => return Some(SourceField::Index(i)),
            _ => {}
        }
    }
    None
}

/// The names a format string interpolates: `{source}`, `{0:?}`, `{path}` → source, 0, path.
fn interpolated_names(fmt: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = fmt;
    while let Some(open) = rest.find('{') {
        rest = &rest[open + 1..];
        if let Some(stripped) = rest.strip_prefix('{') {
            rest = stripped; // `{{` is a literal brace
            continue;
        }
        let end = rest.find('}').unwrap_or(rest.len());
        let name = rest[..end].split(':').next().unwrap_or("").trim();
        names.push(name.trim_start_matches('.').to_string());
        rest = &rest[end..];
    }
    names
}

/// Whether the `#[error(...)]` attribute mentions the source field, in its format string or in
/// its extra arguments (`.0`, `source`, `.source`).
fn message_names_source(attr: &syn::Attribute, source: &SourceField) -> bool {
    let Ok(list) = attr.meta.require_list() else {
        return false;
    };
    let tokens: Vec<proc_macro2::TokenTree> = list.tokens.clone().into_iter().collect();
    let Some(proc_macro2::TokenTree::Literal(lit)) = tokens.first() else {
        return false; // `transparent`
    };
    let Ok(syn::Lit::Str(fmt)) = syn::parse_str::<syn::Lit>(&lit.to_string()) else {
        return false;
    };
    let wanted = match source {
        SourceField::Named(name) => name.clone(),
        SourceField::Index(i) => i.to_string(),
    };
    if interpolated_names(&fmt.value()).contains(&wanted) {
        return true;
    }
    let args = tokens[1..]
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>();
    args.contains(&wanted)
}

#[derive(Default)]
struct Finder {
    file: PathBuf,
    offenders: Vec<String>,
}

impl Finder {
    fn check(&mut self, name: &str, attrs: &[syn::Attribute], fields: &syn::Fields) {
        let Some(source) = source_field(fields) else {
            return;
        };
        for attr in attrs.iter().filter(|a| a.path().is_ident("error")) {
            if message_names_source(attr, &source) {
                self.offenders
                    .push(format!("{}: {name}", self.file.display()));
            }
        }
    }
}

impl<'ast> Visit<'ast> for Finder {
    fn visit_item_enum(&mut self, item: &'ast syn::ItemEnum) {
        if derives_error(&item.attrs) {
            for variant in &item.variants {
                let name = format!("{}::{}", item.ident, variant.ident);
                self.check(&name, &variant.attrs, &variant.fields);
            }
        }
        syn::visit::visit_item_enum(self, item);
    }

    fn visit_item_struct(&mut self, item: &'ast syn::ItemStruct) {
        if derives_error(&item.attrs) {
            self.check(&item.ident.to_string(), &item.attrs, &item.fields);
        }
        syn::visit::visit_item_struct(self, item);
    }
}

#[test]
fn no_error_message_repeats_its_own_source() {
    let mut files = Vec::new();
    rust_files(&workspace_root().join("crates"), &mut files);
    assert!(files.len() > 50, "found only {} Rust files", files.len());
    let mut offenders = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let mut finder = Finder {
            file,
            ..Finder::default()
        };
        finder.visit_file(&ast);
        offenders.extend(finder.offenders);
    }
    assert!(
        offenders.is_empty(),
        "these error messages interpolate the field they also mark as their source, so \
         `{{:#}}` prints the cause twice; name only this layer's problem in the message:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn interpolated_names_reads_format_strings() {
    assert_eq!(
        interpolated_names("{path}: {source:?} {{literal}} {0} {.1}"),
        ["path", "source", "0", "1"]
    );
}
