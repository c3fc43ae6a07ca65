//! docs/configuration.md is generated from the configuration types, so that it cannot rot.
//!
//! The structure (tables, keys, types) and the meanings (`///` doc comments) are read from
//! `common/src/config.rs` and `common/src/tls.rs` with `syn`; the defaults are the real ones:
//! `MonitorConfig` and `AgentConfig` are deserialised from an empty file and serialised back,
//! and a table that is absent by default (`[vip]`, `[[fencing.hosts]]`, ...) is deserialised
//! from its required keys alone. The test fails when a field has no doc comment, and when
//! docs/configuration.md differs from what it renders; `VIGIL_BLESS=1` rewrites the file.
//!
//! ```sh
//! VIGIL_BLESS=1 cargo test -p vigil-common --test config_reference
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::{de::DeserializeOwned, Serialize};
use vigil_common::config::{
    AgentConfig, DetectorConfig, FenceHostConfig, FencingConfig, LeaseConfig, MonitorConfig,
    PoolConfig, RaftConfig, RaftPeer, RecoveryConfig, StorageConfig, VipConfig, WatchdogConfig,
};
use vigil_common::tls::TlsPaths;

/// Everything above this line in docs/configuration.md is hand-written and kept.
const MARKER: &str = "<!-- Generated below this line by common/tests/config_reference.rs from common/src/config.rs: do not edit; rerun with VIGIL_BLESS=1 cargo test -p vigil-common --test config_reference -->";

const SOURCES: &[&str] = &["src/config.rs", "src/tls.rs"];
const ROOTS: &[(&str, &str)] = &[
    ("MonitorConfig", "monitor.toml"),
    ("AgentConfig", "agent.toml"),
];

/// Deserialises `table` into the real type named `name` and serialises it back: its real
/// defaults. `None` when the type is not listed here (the test then says to add it).
fn real_defaults(name: &str, table: toml::Table) -> Option<Result<toml::Table, String>> {
    fn round_trip<T: DeserializeOwned + Serialize>(
        table: toml::Table,
    ) -> Result<toml::Table, String> {
        let value: T = toml::Value::Table(table)
            .try_into()
            .map_err(|e| format!("deserialise: {e}"))?;
        match toml::Value::try_from(&value).map_err(|e| format!("serialise: {e}"))? {
            toml::Value::Table(t) => Ok(t),
            other => Err(format!("serialised to {other}, not a table")),
        }
    }
    macro_rules! registry {
        ($($t:ident),* $(,)?) => {
            match name {
                $(stringify!($t) => Some(round_trip::<$t>(table)),)*
                _ => None,
            }
        };
    }
    registry!(
        MonitorConfig,
        AgentConfig,
        DetectorConfig,
        RecoveryConfig,
        StorageConfig,
        PoolConfig,
        LeaseConfig,
        RaftConfig,
        RaftPeer,
        VipConfig,
        FencingConfig,
        FenceHostConfig,
        WatchdogConfig,
        TlsPaths,
    )
}

struct Field {
    key: String,
    ty: syn::Type,
    doc: String,
    /// No serde default at field or struct level and not an `Option`.
    required: bool,
}

struct StructDef {
    doc: String,
    fields: Vec<Field>,
}

struct EnumDef {
    values: Vec<String>,
}

#[derive(Default)]
struct Model {
    structs: BTreeMap<String, StructDef>,
    enums: BTreeMap<String, EnumDef>,
}

fn doc_of(attrs: &[syn::Attribute]) -> String {
    let mut lines = Vec::new();
    for attr in attrs {
        if !attr.path().is_ident("doc") {
            continue;
        }
        if let syn::Meta::NameValue(nv) = &attr.meta {
            if let syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) = &nv.value
            {
                lines.push(s.value());
            }
        }
    }
    lines
        .iter()
        .map(|l| l.strip_prefix(' ').unwrap_or(l).trim_end().to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The serde attributes we honour: `rename`, `rename_all`, `default`, `skip`, `flatten`.
#[derive(Default)]
struct Serde {
    rename: Option<String>,
    rename_all: Option<String>,
    default: bool,
    skip: bool,
    flatten: bool,
}

fn serde_of(attrs: &[syn::Attribute]) -> Serde {
    let mut out = Serde::default();
    for attr in attrs {
        if !attr.path().is_ident("serde") {
            continue;
        }
        attr.parse_nested_meta(|meta| {
            let name = meta
                .path
                .get_ident()
                .map(|i| i.to_string())
                .unwrap_or_default();
            let value = if meta.input.peek(syn::Token![=]) {
                let lit: syn::LitStr = meta.value()?.parse()?;
                Some(lit.value())
            } else {
                None
            };
            match name.as_str() {
                "rename" => out.rename = value,
                "rename_all" => out.rename_all = value,
                "default" => out.default = true,
                "skip" | "skip_deserializing" => out.skip = true,
                "flatten" => out.flatten = true,
                _ => {}
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("cannot read a #[serde(...)] attribute: {e}"));
    }
    out
}

fn rename(ident: &str, rule: Option<&str>) -> String {
    let words: Vec<String> = {
        // Split CamelCase and snake_case alike into lowercase words.
        let mut words = Vec::new();
        let mut cur = String::new();
        for c in ident.chars() {
            if c == '_' {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            } else if c.is_uppercase() && !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
                cur.extend(c.to_lowercase());
            } else {
                cur.extend(c.to_lowercase());
            }
        }
        if !cur.is_empty() {
            words.push(cur);
        }
        words
    };
    match rule {
        None => ident.to_string(),
        Some("lowercase") => ident.to_lowercase(),
        Some("snake_case") => words.join("_"),
        Some("kebab-case") => words.join("-"),
        Some("SCREAMING_SNAKE_CASE") => words.join("_").to_uppercase(),
        Some(other) => panic!("rename_all = {other:?}: teach tests/config_reference.rs this rule"),
    }
}

fn parse_model() -> Model {
    let mut model = Model::default();
    for src in SOURCES {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(src);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let file = syn::parse_file(&text)
            .unwrap_or_else(|e| panic!("cannot parse {}: {e}", path.display()));
        for item in file.items {
            match item {
                syn::Item::Struct(s) => {
                    let serde = serde_of(&s.attrs);
                    let syn::Fields::Named(named) = &s.fields else {
                        continue;
                    };
                    let mut fields = Vec::new();
                    for f in &named.named {
                        let fs = serde_of(&f.attrs);
                        let ident = f.ident.as_ref().map(|i| i.to_string()).unwrap_or_default();
                        assert!(
                            !fs.flatten,
                            "{}.{ident}: #[serde(flatten)] is not supported by the generator",
                            s.ident
                        );
                        if fs.skip {
                            continue;
                        }
                        let key = fs
                            .rename
                            .clone()
                            .unwrap_or_else(|| rename(&ident, serde.rename_all.as_deref()));
                        let is_option = outer(&f.ty).is_some_and(|(n, _)| n == "Option");
                        fields.push(Field {
                            key,
                            ty: f.ty.clone(),
                            doc: doc_of(&f.attrs),
                            required: !fs.default && !serde.default && !is_option,
                        });
                    }
                    model.structs.insert(
                        s.ident.to_string(),
                        StructDef {
                            doc: doc_of(&s.attrs),
                            fields,
                        },
                    );
                }
                syn::Item::Enum(e) => {
                    let serde = serde_of(&e.attrs);
                    let values = e
                        .variants
                        .iter()
                        .filter(|v| !serde_of(&v.attrs).skip)
                        .map(|v| {
                            serde_of(&v.attrs).rename.unwrap_or_else(|| {
                                rename(&v.ident.to_string(), serde.rename_all.as_deref())
                            })
                        })
                        .collect();
                    model.enums.insert(e.ident.to_string(), EnumDef { values });
                }
                _ => {}
            }
        }
    }
    model
}

/// `Option<T>` -> ("Option", [T]); `PathBuf` -> ("PathBuf", []).
fn outer(ty: &syn::Type) -> Option<(String, Vec<syn::Type>)> {
    let syn::Type::Path(p) = ty else {
        return None;
    };
    let last = p.path.segments.last()?;
    let args = match &last.arguments {
        syn::PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|a| match a {
                syn::GenericArgument::Type(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Some((last.ident.to_string(), args))
}

/// What a field's type means to whoever writes the TOML file.
enum Kind {
    Value(String),
    Table(String),
    OptionalTable(String),
    ArrayOfTables(String),
}

fn kind(model: &Model, ty: &syn::Type, at: &str) -> Kind {
    let Some((name, args)) = outer(ty) else {
        panic!("{at}: unsupported type; teach tests/config_reference.rs about it");
    };
    let arg = |i: usize| {
        args.get(i)
            .unwrap_or_else(|| panic!("{at}: {name} without a type argument"))
    };
    match name.as_str() {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => Kind::Value("integer".into()),
        "bool" => Kind::Value("boolean".into()),
        "String" => Kind::Value("string".into()),
        "PathBuf" => Kind::Value("path".into()),
        "SocketAddr" => Kind::Value("address `IP:PORT`".into()),
        "IpAddr" => Kind::Value("IP address".into()),
        "Option" => match kind(model, arg(0), at) {
            Kind::Value(v) => Kind::Value(v),
            Kind::Table(t) => Kind::OptionalTable(t),
            _ => panic!("{at}: Option of a table array is not supported"),
        },
        "Vec" => match kind(model, arg(0), at) {
            Kind::Value(v) => Kind::Value(format!("list of {v}")),
            Kind::Table(t) => Kind::ArrayOfTables(t),
            _ => panic!("{at}: Vec of an optional table is not supported"),
        },
        "BTreeMap" | "HashMap" => match kind(model, arg(1), at) {
            Kind::Value(v) => Kind::Value(format!("table of {v} values (any keys)")),
            _ => panic!("{at}: a map of tables is not supported"),
        },
        other if model.structs.contains_key(other) => Kind::Table(other.to_string()),
        other => match model.enums.get(other) {
            Some(e) => Kind::Value(format!(
                "one of {}",
                e.values
                    .iter()
                    .map(|v| format!("`\"{v}\"`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => panic!("{at}: type {other} is neither a config struct nor an enum of {SOURCES:?}; teach tests/config_reference.rs about it"),
        },
    }
}

/// One line of Markdown from a doc comment: paragraphs joined, rustdoc links made code.
fn one_line(doc: &str) -> String {
    let joined = doc
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    joined
        .replace("[`", "`")
        .replace("`]", "`")
        .replace('|', "\\|")
}

/// The first paragraph of a struct's doc comment (its examples stay in the source).
fn first_paragraph(doc: &str) -> String {
    one_line(doc.split("\n\n").next().unwrap_or(""))
}

/// A table value for the required keys of `name` (placeholders: they are not shown).
fn placeholders(model: &Model, name: &str) -> toml::Table {
    let mut t = toml::Table::new();
    for f in &model.structs[name].fields {
        if !f.required {
            continue;
        }
        let v = match kind(model, &f.ty, &format!("{name}.{}", f.key)) {
            Kind::Value(v) if v == "integer" => toml::Value::Integer(1),
            Kind::Value(v) if v == "boolean" => toml::Value::Boolean(false),
            Kind::Value(v) if v.starts_with("address") => toml::Value::String("127.0.0.1:1".into()),
            Kind::Value(v) if v == "path" => toml::Value::String("/placeholder".into()),
            Kind::Value(_) => toml::Value::String("placeholder".into()),
            Kind::Table(t) => toml::Value::Table(placeholders(model, &t)),
            Kind::OptionalTable(_) => continue,
            Kind::ArrayOfTables(_) => toml::Value::Array(Vec::new()),
        };
        t.insert(f.key.clone(), v);
    }
    t
}

/// The real defaults of a table that is absent by default: its required keys (filled with
/// placeholders to deserialise it) are left out.
fn defaults_of(model: &Model, name: &str) -> toml::Table {
    match real_defaults(name, placeholders(model, name)) {
        Some(Ok(mut t)) => {
            for f in &model.structs[name].fields {
                if f.required {
                    t.remove(&f.key);
                }
            }
            t
        }
        Some(Err(e)) => panic!("{name}: cannot evaluate its defaults through the real type: {e}"),
        None => panic!(
            "{name} is reachable from the configuration but not listed in real_defaults() of \
             common/tests/config_reference.rs: add it there"
        ),
    }
}

struct Render<'a> {
    model: &'a Model,
    out: String,
    missing_docs: Vec<String>,
}

impl Render<'_> {
    /// One section for the table `path` (`""`: the file's top level) of struct `name`.
    fn section(
        &mut self,
        file: &str,
        name: &str,
        path: &str,
        header: &str,
        intro: &str,
        defaults: &toml::Table,
    ) {
        let model = self.model;
        let def = &model.structs[name];
        let title = if path.is_empty() {
            "top level".to_string()
        } else {
            format!("`{header}`")
        };
        let _ = writeln!(self.out, "### {file}: {title}\n");
        if !intro.is_empty() {
            let _ = writeln!(self.out, "{intro}\n");
        }
        // The type's own doc adds to the field's unless it is one short sentence.
        let first = first_paragraph(&def.doc);
        if !path.is_empty() && (first.len() > 80 || def.doc.contains("\n\n")) {
            let _ = writeln!(self.out, "{first}\n");
        }
        let _ = writeln!(self.out, "| key | type | default | meaning |");
        let _ = writeln!(self.out, "| --- | --- | --- | --- |");
        let mut subtables = Vec::new();
        for f in &def.fields {
            let at = format!("{name}.{} ({file} `{}`)", f.key, join(path, &f.key));
            if f.doc.trim().is_empty() {
                self.missing_docs.push(at.clone());
            }
            let meaning = one_line(&f.doc);
            let shown = defaults.get(&f.key);
            match kind(model, &f.ty, &at) {
                Kind::Value(ty) => {
                    let default = match (shown, f.required) {
                        (Some(v), false) => format!("`{}`", inline(v)),
                        (Some(v), true) => {
                            format!("`{}` (required when the table is written)", inline(v))
                        }
                        (None, true) => "required".to_string(),
                        (None, false) => "unset".to_string(),
                    };
                    let _ = writeln!(self.out, "| `{}` | {ty} | {default} | {meaning} |", f.key);
                }
                Kind::Table(t) => {
                    let sub = match shown {
                        Some(toml::Value::Table(sub)) => sub.clone(),
                        _ => defaults_of(model, &t),
                    };
                    subtables.push((f, t, format!("[{}]", join(path, &f.key)), sub));
                }
                Kind::OptionalTable(t) => {
                    let sub = defaults_of(model, &t);
                    let header = format!("[{}]", join(path, &f.key));
                    subtables.push((f, t, header, sub));
                }
                Kind::ArrayOfTables(t) => {
                    let sub = defaults_of(model, &t);
                    let header = format!("[[{}]]", join(path, &f.key));
                    subtables.push((f, t, header, sub));
                }
            }
        }
        self.out.push('\n');
        for (f, t, header, sub) in subtables {
            let key_path = join(path, &f.key);
            let mut intro = one_line(&f.doc);
            let absent = match kind(model, &f.ty, &key_path) {
                Kind::OptionalTable(_) => Some("Absent by default."),
                Kind::ArrayOfTables(_) => Some("None by default; one table per entry."),
                _ => None,
            };
            if let Some(a) = absent {
                if !intro.is_empty() {
                    intro.push(' ');
                }
                intro.push_str(a);
            }
            self.section(file, &t, &key_path, &header, &intro, &sub);
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A TOML value on one line.
fn inline(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(t) if t.is_empty() => "{}".to_string(),
        other => other.to_string(),
    }
}

fn render(model: &Model) -> (String, Vec<String>) {
    let mut r = Render {
        model,
        out: String::new(),
        missing_docs: Vec::new(),
    };
    for (root, file) in ROOTS {
        let _ = writeln!(r.out, "## {file}\n");
        let defaults = defaults_of(model, root);
        r.section(file, root, "", "", "", &defaults);
    }
    let out = r.out.trim_end().to_string() + "\n";
    (out, r.missing_docs)
}

#[test]
fn configuration_reference_is_current() {
    let model = parse_model();
    let (generated, missing) = render(&model);
    assert!(
        missing.is_empty(),
        "configuration fields without a /// doc comment in common/src/config.rs or tls.rs \
         (docs/configuration.md is made from them):\n  {}",
        missing.join("\n  ")
    );

    let doc_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let current = std::fs::read_to_string(&doc_path).unwrap_or_default();
    let intro = match current.find(MARKER) {
        Some(at) => current[..at].to_string(),
        None => "# Configuration reference\n\n".to_string(),
    };
    let expected = format!("{intro}{MARKER}\n\n{generated}");
    if std::env::var_os("VIGIL_BLESS").is_some() {
        std::fs::write(&doc_path, &expected)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", doc_path.display()));
        return;
    }
    if current != expected {
        let diff = current
            .lines()
            .zip(expected.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| {
                format!(
                    "first difference at line {}:\n  file:      {a}\n  generated: {b}",
                    i + 1
                )
            })
            .unwrap_or_else(|| {
                format!(
                    "the file has {} lines, the generated text {}",
                    current.lines().count(),
                    expected.lines().count()
                )
            });
        panic!(
            "docs/configuration.md is out of date with common/src/config.rs ({diff})\n\
             rerun with VIGIL_BLESS=1 to regenerate it:\n  \
             VIGIL_BLESS=1 cargo test -p vigil-common --test config_reference"
        );
    }
}

#[test]
fn every_enum_default_is_one_of_its_values() {
    // The enum values shown are read from the source; the defaults come from the real types.
    // A serde rename the generator misread would show here as a default outside the list.
    let model = parse_model();
    for (root, _) in ROOTS {
        let defaults = defaults_of(&model, root);
        for f in &model.structs[*root].fields {
            let Some((name, _)) = outer(&f.ty) else {
                continue;
            };
            if let (Some(e), Some(toml::Value::String(v))) =
                (model.enums.get(&name), defaults.get(&f.key))
            {
                assert!(
                    e.values.contains(v),
                    "{root}.{}: default {v:?} is not among {:?} read from the source",
                    f.key,
                    e.values
                );
            }
        }
    }
}
