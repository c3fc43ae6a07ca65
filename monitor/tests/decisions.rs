//! Keeps docs/decisions.md true: every row of its "Who decides what" table names a file that
//! exists and functions defined in it, and every source path the page cites exists.
//!
//! The table's format is written at the top of the table in the page itself: four columns
//! (`decision | file | function | inputs it reads`), the file cell one backticked path relative
//! to the workspace root, the function cell one or more backticked bare names separated by
//! commas, each defined in that file as `fn name` (any visibility, generic or not).
//!
//! Run: `cargo test -p vigil-monitor --test decisions`.

use std::path::{Path, PathBuf};

/// The heading the table follows.
const SECTION: &str = "## Who decides what";
/// Its header row, exactly.
const HEADER: &str = "| decision | file | function | inputs it reads |";
/// An emptied or truncated table must not pass.
const MIN_ROWS: usize = 12;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn page() -> String {
    let path = workspace_root().join("docs/decisions.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One row of the table: its line number in the page (1-based), the decision, the file and
/// the functions.
#[derive(Debug)]
struct Row {
    line: usize,
    decision: String,
    file: String,
    functions: Vec<String>,
}

/// The backticked spans of `cell`, in order.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, s)| s.to_string())
        .collect()
}

/// Parses the table; a malformed row is an error naming its line.
fn table(page: &str) -> Result<Vec<Row>, String> {
    let lines: Vec<&str> = page.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == SECTION)
        .ok_or_else(|| format!("docs/decisions.md has no {SECTION:?} heading"))?;
    let header = (start..lines.len())
        .find(|&i| lines[i].trim() == HEADER)
        .ok_or_else(|| format!("no table with header {HEADER:?} after {SECTION:?}"))?;
    let mut rows = Vec::new();
    // Skip the header and its separator; the table ends at the first line not starting with '|'.
    for (i, line) in lines.iter().enumerate().skip(header + 2) {
        let line = line.trim();
        if !line.starts_with('|') {
            break;
        }
        let n = i + 1;
        let cells: Vec<&str> = line
            .strip_prefix('|')
            .and_then(|l| l.strip_suffix('|'))
            .ok_or_else(|| format!("line {n}: a row must start and end with '|': {line}"))?
            .split('|')
            .map(str::trim)
            .collect();
        let [decision, file, function, _inputs] = cells[..] else {
            return Err(format!(
                "line {n}: {} cells, expected 4 (a '|' inside a cell?): {line}",
                cells.len()
            ));
        };
        let files = code_spans(file);
        let [file] = &files[..] else {
            return Err(format!(
                "line {n} ({decision}): the file cell must hold exactly one backticked path, found {files:?}"
            ));
        };
        let functions = code_spans(function);
        if functions.is_empty() {
            return Err(format!(
                "line {n} ({decision}): the function cell names no backticked function"
            ));
        }
        for f in &functions {
            if f.is_empty() || !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "line {n} ({decision}): {f:?} is not a bare function name (no `Type::`, no parentheses)"
                ));
            }
        }
        rows.push(Row {
            line: n,
            decision: decision.to_string(),
            file: file.clone(),
            functions,
        });
    }
    Ok(rows)
}

/// Whether `source` defines `fn name`: `fn` starts a word, then whitespace, then `name`
/// followed by `(` or `<` (generics). Covers `pub fn`, `pub(super) fn`, `pub(crate) fn`,
/// `async fn`, `const fn` and methods in `impl` blocks.
fn defines(source: &str, name: &str) -> bool {
    let bytes = source.as_bytes();
    source.match_indices("fn").any(|(at, _)| {
        let starts_word = at == 0 || !is_ident(bytes[at - 1]);
        let rest = &source[at + 2..];
        let after_ws = rest.trim_start();
        let spaced = after_ws.len() < rest.len();
        starts_word
            && spaced
            && after_ws
                .strip_prefix(name)
                .is_some_and(|tail| tail.trim_start().starts_with(['(', '<']))
    })
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

#[test]
fn every_decision_names_a_function_that_exists() {
    let page = page();
    let rows = table(&page).unwrap_or_else(|e| panic!("docs/decisions.md: {e}"));
    assert!(
        rows.len() >= MIN_ROWS,
        "docs/decisions.md: the \"Who decides what\" table has {} rows, expected at least {MIN_ROWS}",
        rows.len()
    );
    let root = workspace_root();
    let mut problems = Vec::new();
    for row in &rows {
        let path = root.join(&row.file);
        let Ok(source) = std::fs::read_to_string(&path) else {
            problems.push(format!(
                "line {} ({}): file {} does not exist",
                row.line, row.decision, row.file
            ));
            continue;
        };
        for f in &row.functions {
            if !defines(&source, f) {
                problems.push(format!(
                    "line {} ({}): {} defines no `fn {f}`",
                    row.line, row.decision, row.file
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/decisions.md is out of date with the code:\n  {}",
        problems.join("\n  ")
    );
}

/// Every backticked workspace path the page cites (`monitor/src/…`, `common/src/…`,
/// `agent/src/…`, `docs/…`) exists, in the glossary as in the table.
#[test]
fn every_path_the_page_cites_exists() {
    let page = page();
    let root = workspace_root();
    let prefixes = ["monitor/", "common/", "agent/", "docs/", "tests/"];
    let missing: Vec<String> = page
        .lines()
        .enumerate()
        .flat_map(|(i, line)| code_spans(line).into_iter().map(move |s| (i + 1, s)))
        .filter(|(_, s)| prefixes.iter().any(|p| s.starts_with(p)) && !s.contains(' '))
        .filter(|(_, s)| !root.join(s).exists())
        .map(|(n, s)| format!("line {n}: {s}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/decisions.md cites paths that do not exist:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_checks_themselves_catch_what_they_must() {
    let src = "impl X {\n    pub(super) fn on_storage(\n    pub fn generic<T>(t: T) {}\n}\nfn plain() {}\nfn renamed_x() {}\n// a fn mention, a defines_on_storage()\n";
    assert!(defines(src, "on_storage"));
    assert!(defines(src, "generic"));
    assert!(defines(src, "plain"));
    assert!(
        !defines(src, "renamed"),
        "a prefix of a name is not the name"
    );
    assert!(!defines(src, "mention"));
    assert!(
        !defines(src, "storage"),
        "`defines_on_storage` is not `fn storage`"
    );

    let doc = format!(
        "{SECTION}\n\n{HEADER}\n| --- | --- | --- | --- |\n| a | `x.rs` | `f`, `g` | in |\n\nafter\n"
    );
    let rows = table(&doc).expect("parses");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].functions, ["f", "g"]);
    for bad in [
        "| a | `x.rs` `y.rs` | `f` | in |",
        "| a | `x.rs` | f | in |",
        "| a | `x.rs` | `Engine::f` | in |",
        "| a | `x.rs` | `f` | in | extra |",
    ] {
        let doc = format!("{SECTION}\n\n{HEADER}\n| --- | --- | --- | --- |\n{bad}\n");
        assert!(table(&doc).is_err(), "accepted {bad}");
    }
}
