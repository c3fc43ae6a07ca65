//! The manual pages in packaging/man/ are rendered from the clap definitions (clap_mangen),
//! so that they cannot drift from `--help`: this test renders them and compares them with
//! the checked-in files, which the packages ship (cargo-deb gzips them). `VIGIL_BLESS=1`
//! rewrites the files:
//!
//! ```sh
//! VIGIL_BLESS=1 cargo test -p vigil-packaging --test man
//! ```
//!
//! No root needed. vigilctl's page lists every command with its usage and help in a COMMANDS
//! section (one page rather than one per subcommand).

use std::path::PathBuf;

use clap::CommandFactory;
use roff::{bold, italic, roman, Roff};

fn man_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../packaging/man")
}

/// One of clap_mangen's section renderers.
type Section = fn(&clap_mangen::Man, &mut dyn std::io::Write) -> std::io::Result<()>;

/// The sections of `cmd`'s page, up to and including its options, as clap_mangen renders them.
fn head(man: &clap_mangen::Man, out: &mut Vec<u8>) {
    let parts: [Section; 5] = [
        clap_mangen::Man::render_title,
        clap_mangen::Man::render_name_section,
        clap_mangen::Man::render_synopsis_section,
        clap_mangen::Man::render_description_section,
        clap_mangen::Man::render_options_section,
    ];
    for part in parts {
        part(man, out).unwrap_or_else(|e| panic!("rendering a manual page: {e}"));
    }
}

/// FILES and SEE ALSO, the same for the three pages but for the files.
fn tail(files: &[(&str, &str)], out: &mut Vec<u8>) {
    let mut r = Roff::new();
    r.control("SH", ["FILES"]);
    for (path, what) in files {
        r.control("TP", [])
            .text([italic(*path)])
            .text([roman(*what)]);
    }
    r.control("SH", ["SEE ALSO"]);
    r.text([
        bold("vigil-agent"),
        roman("(8), "),
        bold("vigil-monitor"),
        roman("(8), "),
        bold("vigilctl"),
        roman("(1); /usr/share/doc/vigil-agent/packaging.md or /usr/share/doc/vigil-monitor/packaging.md (installation, units, the host watchdog, upgrades)."),
    ]);
    out.extend_from_slice(r.render().as_bytes());
}

/// Every leaf command of vigilctl: its full name, usage and help.
fn commands(cmd: &clap::Command, path: &str, r: &mut Roff) {
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        let name = format!("{path} {}", sub.get_name());
        if sub.has_subcommands() {
            commands(sub, &name, r);
            continue;
        }
        let usage = sub.clone().render_usage().to_string();
        let usage = usage.trim().trim_start_matches("Usage:").trim().to_string();
        r.control("TP", []).text([bold(usage)]);
        let help = sub
            .get_long_about()
            .or_else(|| sub.get_about())
            .map(|h| h.to_string())
            .unwrap_or_default();
        for (i, para) in help.split("\n\n").enumerate() {
            if i > 0 {
                r.control("IP", []);
            }
            r.text([roman(para.split_whitespace().collect::<Vec<_>>().join(" "))]);
        }
        let args: Vec<String> = sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set() && a.get_id() != "help")
            .filter_map(|a| {
                let help = a.get_help()?.to_string();
                let flag = match (a.get_long(), a.get_value_names()) {
                    (Some(l), _) => format!("--{l}"),
                    (None, Some(v)) => v
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                    (None, None) => a.get_id().to_string().to_uppercase(),
                };
                Some(format!("{flag}: {help}"))
            })
            .collect();
        for a in args {
            r.control("IP", []);
            r.text([roman(a)]);
        }
    }
}

fn render(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    match name {
        "vigil-agent.8" => {
            let man = clap_mangen::Man::new(vigil_agent::cli::Args::command()).section("8");
            head(&man, &mut out);
            tail(
                &[
                    (
                        "/etc/vigil/agent.toml",
                        "The configuration (every key: docs/configuration.md upstream).",
                    ),
                    (
                        "/etc/vigil/tls/",
                        "ca.crt, agent.crt, agent.key: the host's certificate from the cluster CA.",
                    ),
                    (
                        "/var/lib/vigil/agent/",
                        "Lease, activation generations, lock.",
                    ),
                ],
                &mut out,
            );
        }
        "vigil-monitor.8" => {
            let man = clap_mangen::Man::new(vigil_monitor::cli::Args::command()).section("8");
            head(&man, &mut out);
            tail(
                &[
                    (
                        "/etc/vigil/monitor.toml",
                        "The configuration (every key: docs/configuration.md upstream).",
                    ),
                    (
                        "/etc/vigil/tls/",
                        "ca.crt, monitor.crt, monitor.key, optionally ca.crl.",
                    ),
                    (
                        "/var/lib/vigil/monitor/raft.redb",
                        "The Raft log, vote and state machine.",
                    ),
                ],
                &mut out,
            );
        }
        "vigilctl.1" => {
            let mut cmd = vigil_monitor::ctl::Args::command();
            cmd.build();
            let man = clap_mangen::Man::new(cmd.clone()).section("1");
            head(&man, &mut out);
            let mut r = Roff::new();
            r.control("SH", ["COMMANDS"]);
            commands(&cmd, "vigilctl", &mut r);
            out.extend_from_slice(r.render().as_bytes());
            tail(
                &[
                    (
                        "/etc/vigil/tls/admin.crt, /etc/vigil/tls/admin.key",
                        "The operator's certificate (--cert, --key).",
                    ),
                    ("/etc/vigil/tls/ca.crt", "The cluster CA (--ca)."),
                ],
                &mut out,
            );
        }
        other => panic!("no manual page {other}"),
    }
    out
}

#[test]
fn manual_pages_match_the_clap_definitions() {
    let mut stale = Vec::new();
    for name in ["vigil-agent.8", "vigil-monitor.8", "vigilctl.1"] {
        let page = render(name);
        let path = man_dir().join(name);
        if std::env::var_os("VIGIL_BLESS").is_some() {
            std::fs::write(&path, &page)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            continue;
        }
        if std::fs::read(&path).ok().as_deref() != Some(page.as_slice()) {
            stale.push(name);
        }
    }
    assert!(
        stale.is_empty(),
        "packaging/man/{stale:?} differ from the clap definitions (agent/src/cli.rs, \
         monitor/src/cli.rs, monitor/src/ctl/mod.rs); rerun with VIGIL_BLESS=1 to regenerate:\n  \
         VIGIL_BLESS=1 cargo test -p vigil-packaging --test man"
    );
}
