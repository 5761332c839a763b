//! The size rules of docs/architecture.md#conventions, checked on the
//! sources: no function over 150 lines outside tests and no source file over
//! 900 lines. Test code (`tests/` directories, `tests.rs` files, `#[cfg(test)]`
//! items, fuzz targets) is exempt.

use std::path::{Path, PathBuf};

use syn::visit::Visit;

const MAX_FN_LINES: usize = 150;
const MAX_FILE_LINES: usize = 900;

/// The library and binary sources of every workspace package.
fn sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    let mut dirs = vec![root.join("src")];
    for entry in std::fs::read_dir(root).expect("the workspace root reads") {
        let path = entry.expect("a directory entry").path();
        if path.join("Cargo.toml").is_file() && path.join("src").is_dir() {
            dirs.push(path.join("src"));
        }
    }
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("a source directory reads") {
            let path = entry.expect("a directory entry").path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if path.is_dir() {
                if name != "tests" {
                    dirs.push(path);
                }
            } else if name.ends_with(".rs") && name != "tests.rs" && !name.ends_with("_tests.rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    assert!(out.len() > 50, "found only {} source files", out.len());
    out
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        (a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test")))
            || a.path().is_ident("test")
            || a.path().segments.last().is_some_and(|s| s.ident == "test")
    })
}

/// Functions longer than the limit: (name, first line, lines).
#[derive(Default)]
struct Long(Vec<(String, usize, usize)>);

impl Long {
    fn check(&mut self, name: &syn::Ident, span: proc_macro2::Span) {
        let (start, end) = (span.start().line, span.end().line);
        let lines = end - start + 1;
        if lines > MAX_FN_LINES {
            self.0.push((name.to_string(), start, lines));
        }
    }
}

impl<'ast> Visit<'ast> for Long {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }
    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test(&f.attrs) {
            let span = syn::spanned::Spanned::span(f);
            self.check(&f.sig.ident, span);
            syn::visit::visit_item_fn(self, f);
        }
    }
    fn visit_item_impl(&mut self, i: &'ast syn::ItemImpl) {
        if !is_test(&i.attrs) {
            syn::visit::visit_item_impl(self, i);
        }
    }
    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test(&f.attrs) {
            let span = syn::spanned::Spanned::span(f);
            self.check(&f.sig.ident, span);
            syn::visit::visit_impl_item_fn(self, f);
        }
    }
    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if f.default.is_some() {
            let span = syn::spanned::Spanned::span(f);
            self.check(&f.sig.ident, span);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

#[test]
fn no_function_is_over_150_lines() {
    let mut long = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).expect("a source file reads");
        let file = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", path.display()));
        let mut v = Long::default();
        v.visit_file(&file);
        for (name, line, lines) in v.0 {
            long.push(format!("{}:{line} {name}: {lines} lines", path.display()));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them at their seams):\n{}",
        long.join("\n")
    );
}

#[test]
fn no_file_is_over_900_lines() {
    let mut long = Vec::new();
    for path in sources() {
        let text = std::fs::read_to_string(&path).expect("a source file reads");
        // The whole file, its own test module included: a long test module
        // goes to a `tests.rs` of its own.
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            long.push(format!("{}: {lines} lines", path.display()));
        }
    }
    assert!(
        long.is_empty(),
        "files over {MAX_FILE_LINES} lines outside their tests:\n{}",
        long.join("\n")
    );
}

/// The checker itself: a long function is found, a test one is not.
#[test]
fn the_checker_finds_a_long_function() {
    let body = "    let x = 1;\n".repeat(MAX_FN_LINES);
    let text = format!(
        "fn long() {{\n{body}}}\nfn short() {{}}\n#[cfg(test)]\nmod tests {{\n    fn long_test() {{\n{body}    }}\n}}\n"
    );
    let mut v = Long::default();
    v.visit_file(&syn::parse_file(&text).unwrap());
    let names: Vec<&str> = v.0.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["long"]);
}
