//! docs/runbook.md has one `### <kind>` entry per event kind, and none for a kind that does
//! not exist, so that the runbook cannot rot.
//!
//! The kinds are read from `EventKind` in `monitor/src/state/mod.rs` with `syn` (variant names
//! in serde's snake_case, honouring a variant's `#[serde(rename)]`), and each name is checked
//! against the real type: deserialising `{"kind": NAME}` must not fail with "unknown variant".

use std::collections::BTreeSet;
use std::path::PathBuf;

use vigil_monitor::state::EventKind;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn snake_case(ident: &str) -> String {
    let mut out = String::new();
    for (i, c) in ident.chars().enumerate() {
        if c.is_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// `#[serde(name = "value")]` pairs of one item.
fn serde_pairs(attrs: &[syn::Attribute]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for attr in attrs.iter().filter(|a| a.path().is_ident("serde")) {
        attr.parse_nested_meta(|meta| {
            let name = meta
                .path
                .get_ident()
                .map(|i| i.to_string())
                .unwrap_or_default();
            if meta.input.peek(syn::Token![=]) {
                let lit: syn::LitStr = meta.value()?.parse()?;
                out.push((name, lit.value()));
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cannot read a #[serde(...)] attribute: {e}"));
    }
    out
}

/// The event kinds as `vigilctl events --json` prints them (`"kind": "..."`).
fn event_kinds() -> BTreeSet<String> {
    let path = manifest().join("src/state/mod.rs");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let file =
        syn::parse_file(&text).unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()));
    let kind = file
        .items
        .iter()
        .find_map(|item| match item {
            syn::Item::Enum(e) if e.ident == "EventKind" => Some(e),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no enum EventKind in {}", path.display()));
    let attrs = serde_pairs(&kind.attrs);
    assert!(
        attrs.contains(&("rename_all".into(), "snake_case".into()))
            && attrs.contains(&("tag".into(), "kind".into())),
        "EventKind's serde attributes changed ({attrs:?}): update tests/runbook.rs"
    );
    kind.variants
        .iter()
        .map(|v| {
            serde_pairs(&v.attrs)
                .into_iter()
                .find(|(k, _)| k == "rename")
                .map(|(_, v)| v)
                .unwrap_or_else(|| snake_case(&v.ident.to_string()))
        })
        .collect()
}

/// `### name` headings under `## Event kinds`, up to the next `## ` heading.
fn runbook_entries() -> Vec<String> {
    let path = manifest().join("../docs/runbook.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut inside = false;
    let mut entries = Vec::new();
    for line in text.lines() {
        if let Some(h2) = line.strip_prefix("## ") {
            inside = h2.trim() == "Event kinds";
        } else if let Some(h3) = line.strip_prefix("### ") {
            if inside {
                entries.push(h3.trim().trim_matches('`').to_string());
            }
        }
    }
    assert!(
        !entries.is_empty(),
        "docs/runbook.md has no `### kind` entries under `## Event kinds`"
    );
    entries
}

#[test]
fn every_event_kind_name_is_the_real_one() {
    for kind in event_kinds() {
        let err = serde_json::from_value::<EventKind>(serde_json::json!({ "kind": kind }))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            !err.contains("unknown variant"),
            "{kind:?}, read from the source, is not an EventKind the real type accepts: {err}"
        );
    }
}

#[test]
fn runbook_has_one_entry_per_event_kind() {
    let kinds = event_kinds();
    let entries = runbook_entries();
    let mut seen = BTreeSet::new();
    let twice: Vec<_> = entries
        .iter()
        .filter(|e| !seen.insert(e.as_str()))
        .collect();
    let listed: BTreeSet<String> = entries.iter().cloned().collect();
    let missing: Vec<_> = kinds.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&kinds).collect();
    assert!(
        missing.is_empty() && unknown.is_empty() && twice.is_empty(),
        "docs/runbook.md and EventKind (monitor/src/state/mod.rs) disagree:\n  \
         kinds without a `### kind` entry under `## Event kinds`: {missing:?}\n  \
         entries for kinds that do not exist: {unknown:?}\n  \
         entries given twice: {twice:?}"
    );
}
