//! Checks of the codebase itself, run as tests: every Rust file starts with a `//!` line, no
//! stubs (the todo and unimplemented macros), every ignored test says why, docs name real files.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn files(dir: &Path, ext: &str, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name == "target" || name.starts_with('.') {
            continue;
        }
        if p.is_dir() {
            files(&p, ext, out);
        } else if p.extension().is_some_and(|x| x == ext) {
            out.push(p);
        }
    }
}

fn rust_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for d in ["crates", "xtask", "benches"] {
        files(&root().join(d), "rs", &mut v);
    }
    v
}

#[test]
fn every_rust_file_starts_with_a_doc_line() {
    let bad: Vec<_> = rust_files()
        .into_iter()
        .filter(|p| !std::fs::read_to_string(p).unwrap_or_default().starts_with("//!"))
        .collect();
    assert!(bad.is_empty(), "files without a leading `//!` line: {bad:?}");
}

#[test]
fn no_stubs_and_no_silent_ignores() {
    let (todo, unimpl, ignore) =
        (concat!("todo", "!("), concat!("unimplemented", "!("), concat!("#[", "ignore]"));
    let mut bad = Vec::new();
    for p in rust_files() {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            if line.contains(todo) || line.contains(unimpl) || line.contains(ignore) {
                bad.push(format!("{}:{}: {}", p.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(bad.is_empty(), "stubs or ignored tests without a reason:\n{}", bad.join("\n"));
}

#[test]
fn docs_exist_and_the_readme_names_both_commands() {
    for d in ["README.md", "docs/math.md", "docs/architecture.md", "docs/conformance.md"] {
        assert!(root().join(d).is_file(), "{d} is missing");
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap_or_default();
    assert!(readme.contains("cargo xtask conformance"));
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap_or_default();
    let test_cmd = readme
        .lines()
        .find(|l| l.trim_start().starts_with("cargo test"))
        .expect("README names a `cargo test` command")
        .trim();
    assert!(ci.contains(test_cmd), ".ci/run must run the README's test command `{test_cmd}`");
}

#[test]
fn paths_named_in_docs_exist() {
    // Every `crates/…`, `xtask/…`, `benches/…` or `docs/…` path in backticks in the README and
    // docs/ must exist, so the docs cannot drift from the tree silently.
    let mut docs = vec![root().join("README.md")];
    files(&root().join("docs"), "md", &mut docs);
    let mut missing = Vec::new();
    for d in docs {
        let text = std::fs::read_to_string(&d).unwrap_or_default();
        for (i, chunk) in text.split('`').enumerate() {
            let is_code = i % 2 == 1;
            let named =
                ["crates/", "xtask/", "benches/", "docs/"].iter().any(|p| chunk.starts_with(p));
            if !is_code
                || !named
                || chunk.contains(' ')
                || chunk.contains('<')
                || chunk.contains('*')
            {
                continue;
            }
            let path = chunk.trim_end_matches(['/', '.', ',', ':']);
            if !root().join(path).exists() {
                missing.push(format!("{}: {path}", d.display()));
            }
        }
    }
    assert!(missing.is_empty(), "docs name paths that do not exist:\n{}", missing.join("\n"));
}
