//! `vigil-lab up --installed DIR`: the lab runs what the packages ship. DIR is a root the
//! .debs were installed or extracted into (`dpkg -x`); the lab then runs
//! DIR/usr/sbin/vigil-agent, DIR/usr/sbin/vigil-monitor and DIR/usr/bin/vigilctl, with the
//! command lines of the shipped units (ExecStartPre, ExecStart, ExecStopPost), and writes
//! each host's and monitor's config by editing the shipped DIR/etc/vigil/*.toml the way an
//! operator edits the one file under /etc: only the keys in [`AGENT_KEYS`] and
//! [`MONITOR_KEYS`] change (each with the reason), every other shipped value stays, and
//! [`edit_config`] refuses a result that differs from the shipped file anywhere else. So a
//! shipped default that cannot run (a detector too slow to fail over, a `listen` the agents
//! cannot reach, a unit that reads another file) fails the lab instead of being overridden.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::layout::Program;

/// The shipped configs and units, relative to DIR.
pub const AGENT_CONFIG: &str = "/etc/vigil/agent.toml";
pub const MONITOR_CONFIG: &str = "/etc/vigil/monitor.toml";
pub const AGENT_UNIT: &str = "vigil-agent.service";
pub const MONITOR_UNIT: &str = "vigil-monitor.service";
/// Where the packages put their units (cargo-deb: /lib; an rpm or a merged /usr: /usr/lib).
const UNIT_DIRS: [&str; 2] = ["lib/systemd/system", "usr/lib/systemd/system"];

/// A key the lab sets in a shipped config, and why an operator must set it too (or why the
/// lab, with every machine on one host, cannot keep the shipped value).
#[derive(Debug, Clone, Copy)]
pub struct LabKey {
    /// Dotted path (`tls.ca`); an array of tables (`raft.peers`) counts as one key.
    pub key: &'static str,
    pub why: &'static str,
}

const fn k(key: &'static str, why: &'static str) -> LabKey {
    LabKey { key, why }
}

/// What the lab changes in the shipped agent.toml. Everything else is the shipped value:
/// `host` (left out: the certificate's name), `zone`, `cluster`, `log_*`,
/// `systemd_watchdog`, `watchdog.timeout_secs` (the lab's fake watchdog gets the same
/// default timeout), and the storage heartbeat's default intervals.
pub const AGENT_KEYS: &[LabKey] = &[
    k(
        "monitors",
        "the lab's monitors and VIP instead of 127.0.0.1 (a hypervisor runs no monitor)",
    ),
    k(
        "libvirt_uri",
        "the host's own libvirtd (its sandbox's socket); qemu:///system is this machine's",
    ),
    k(
        "state_dir",
        "every lab host runs on this one machine: one state directory each",
    ),
    k("tls.ca", "the lab's CA, issued by `up`"),
    k(
        "tls.cert",
        "the host's certificate (its name is the agent's `host`)",
    ),
    k("tls.key", "the host's key"),
    k(
        "watchdog.device",
        "the host's fake watchdog (vigil-lab-watchdog): opening a real /dev/watchdog here would \
         reset the whole machine; removed with `--without watchdog` (the shipped way to run \
         without one)",
    ),
    k(
        "storage.pools",
        "the shared pool as this host sees it (its faultfs view); the shipped file has none",
    ),
];

/// What the lab changes in the shipped monitor.toml. Everything else is the shipped value:
/// `listen` (the wildcard, so the VIP answers), `log_*`, the whole `[detector]` and
/// `[lease]` (the lab's own configs use a faster detector; this one fails over at the
/// shipped speed), `vip.prefix`, `fencing.timeout_ms`, the storage cycle's defaults.
pub const MONITOR_KEYS: &[LabKey] = &[
    k("node_id", "one per monitor (mon J is node J)"),
    k(
        "data_dir",
        "every lab monitor runs on this one machine: one database each",
    ),
    k(
        "advertise",
        "the monitor's own address (the shipped file says: set it with several monitors or a [vip])",
    ),
    k("tls.ca", "the lab's CA, issued by `up`"),
    k(
        "tls.cert",
        "the monitor's certificate (its address as SAN)",
    ),
    k("tls.key", "the monitor's key"),
    k("raft.listen", "the monitor's own address, Raft port"),
    k(
        "raft.peers",
        "the other monitors, on mon1 only (read by --init: the cluster starts with every monitor)",
    ),
    k("vip.address", "the lab's VIP on the lab bridge"),
    k("vip.interface", "the namespace's NIC (eth0 on the lab bridge)"),
    k("recovery.ha_tag", "`up --ha-tag`: the operator's choice"),
    k(
        "fencing.hosts",
        "`up --fencing`: one fence_ipmilan entry per host, against the lab's BMCs",
    ),
    k(
        "storage.pools",
        "the shared pool (its backing directory: the monitor is no hypervisor)",
    ),
];

/// A root with the packages' files.
#[derive(Debug, Clone)]
pub struct Installed {
    pub root: PathBuf,
}

impl Installed {
    /// Checks DIR holds what the lab runs: the three binaries, both configs, both units.
    pub fn open(dir: &Path) -> anyhow::Result<Installed> {
        if !dir.is_absolute() {
            bail!("--installed must be an absolute path: {}", dir.display());
        }
        let root = dir
            .canonicalize()
            .with_context(|| format!("--installed {}", dir.display()))?;
        let i = Installed { root };
        for p in [Program::Agent, Program::Monitor, Program::Vigilctl] {
            let b = i.bin(p)?;
            if !is_executable(&b) {
                bail!(
                    "--installed {}: no executable {} (install or extract the vigil-agent and \
                     vigil-monitor packages there: dpkg -x PKG.deb DIR)",
                    i.root.display(),
                    b.display()
                );
            }
        }
        for c in [AGENT_CONFIG, MONITOR_CONFIG] {
            let f = i.path(c);
            if !f.is_file() {
                bail!(
                    "--installed {}: no shipped config {}",
                    i.root.display(),
                    f.display()
                );
            }
        }
        for u in [AGENT_UNIT, MONITOR_UNIT] {
            i.unit(u)?;
        }
        Ok(i)
    }

    /// `p` (absolute, as on the installed machine) inside DIR.
    pub fn path(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// The installed binary of a program the packages ship.
    pub fn bin(&self, p: Program) -> anyhow::Result<PathBuf> {
        Ok(match p {
            Program::Agent => self.path("/usr/sbin/vigil-agent"),
            Program::Monitor => self.path("/usr/sbin/vigil-monitor"),
            Program::Vigilctl => self.path("/usr/bin/vigilctl"),
            other => bail!("{} is not in the packages", other.file_name()),
        })
    }

    pub fn shipped_config(&self, file: &str) -> anyhow::Result<String> {
        let p = self.path(file);
        std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    }

    /// The text of a shipped unit.
    pub fn unit(&self, name: &str) -> anyhow::Result<String> {
        for d in UNIT_DIRS {
            let p = self.root.join(d).join(name);
            if p.is_file() {
                return std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()));
            }
        }
        bail!(
            "--installed {}: no {name} in {}",
            self.root.display(),
            UNIT_DIRS.join(" or ")
        )
    }

    /// The command line `key` (ExecStart, ExecStartPre, ExecStopPost) of a shipped unit as
    /// the lab runs it: its program inside DIR, the shipped config `config` replaced by the
    /// lab's file `lab_config`, nothing else changed. Refuses what the lab could not run the
    /// same way (variables, quoting, prefixes other than `+`, other absolute paths, a command
    /// line that does not read `config`).
    pub fn command(
        &self,
        unit: &str,
        key: &str,
        config: &str,
        lab_config: &Path,
    ) -> anyhow::Result<Vec<String>> {
        let words = unit_command(&self.unit(unit)?, key).with_context(|| unit.to_string())?;
        let mut argv = Vec::with_capacity(words.len());
        let mut reads_config = false;
        for (n, w) in words.iter().enumerate() {
            if n == 0 {
                if !w.starts_with('/') {
                    bail!(
                        "{unit} {key}={}: the program is not an absolute path",
                        words.join(" ")
                    );
                }
                let p = self.path(w);
                if !is_executable(&p) {
                    bail!(
                        "{unit} {key}= runs {w}, which {} does not hold",
                        self.root.display()
                    );
                }
                argv.push(p.to_string_lossy().into_owned());
            } else if w == config {
                reads_config = true;
                argv.push(lab_config.to_string_lossy().into_owned());
            } else if w.starts_with('/') {
                bail!(
                    "{unit} {key}={}: the lab does not know what to put for {w}",
                    words.join(" ")
                );
            } else {
                argv.push(w.clone());
            }
        }
        if !reads_config {
            bail!(
                "{unit} {key}={} does not name {config}: the lab's edit of that file would not be what it reads",
                words.join(" ")
            );
        }
        Ok(argv)
    }
}

/// The words of a unit's `KEY=` line in `[Service]` (exactly one such line), without a `+`
/// prefix (full privileges: the lab runs everything as root anyway).
pub fn unit_command(unit: &str, key: &str) -> anyhow::Result<Vec<String>> {
    let mut section = "";
    let mut found = Vec::new();
    for line in unit.lines() {
        let l = line.trim();
        if l.starts_with('#') || l.starts_with(';') || l.is_empty() {
            continue;
        }
        if l.starts_with('[') {
            section = l;
            continue;
        }
        if section != "[Service]" {
            continue;
        }
        if let Some((k, v)) = l.split_once('=') {
            if k.trim() == key {
                found.push(v.trim().to_string());
            }
        }
    }
    let line = match found.as_slice() {
        [one] => one.clone(),
        [] => bail!("no {key}= in [Service]"),
        more => bail!("{} {key}= lines in [Service]; the lab runs one", more.len()),
    };
    if line.ends_with('\\') {
        bail!("{key}={line}: a continued line");
    }
    let line = line.strip_prefix('+').unwrap_or(&line);
    if line.starts_with(['-', '@', ':', '!', '|']) {
        bail!("{key}={line}: a prefix the lab does not run the same way");
    }
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    if let Some(w) = words
        .iter()
        .find(|w| w.contains(['$', '%', '"', '\'', '\\', ';']))
    {
        bail!(
            "{key}={line}: {w:?} needs systemd's expansion or quoting, which the lab does not do"
        );
    }
    if words.is_empty() {
        bail!("{key}= is empty");
    }
    Ok(words)
}

/// One change to a shipped config: a value, an array of tables, or the key removed.
pub enum Set {
    Value(toml_edit::Value),
    Tables(Vec<toml_edit::Table>),
    Remove,
}

impl Set {
    pub fn str(s: impl Into<String>) -> Set {
        Set::Value(toml_edit::Value::from(s.into()))
    }
    pub fn int(n: i64) -> Set {
        Set::Value(toml_edit::Value::from(n))
    }
    pub fn strs(v: &[String]) -> Set {
        Set::Value(toml_edit::Value::Array(
            v.iter().map(String::as_str).collect(),
        ))
    }
}

/// A table of string values (a fence entry's options, a pool) for [`Set::Tables`].
pub fn table(pairs: &[(&str, toml_edit::Value)]) -> toml_edit::Table {
    let mut t = toml_edit::Table::new();
    for (k, v) in pairs {
        t.insert(k, toml_edit::Item::Value(v.clone()));
    }
    t
}

/// Edits the shipped config `shipped` (named `file` in errors): each of `sets` must be one
/// of `allowed`; every other key keeps its shipped value and the shipped comments stay. The
/// result is then compared with the shipped file, key by key: any difference outside
/// `allowed` is an error naming the key.
pub fn edit_config(
    file: &str,
    shipped: &str,
    allowed: &[LabKey],
    sets: Vec<(&str, Set)>,
) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = shipped
        .parse()
        .with_context(|| format!("the shipped {file} is not TOML"))?;
    for (key, set) in sets {
        if !allowed.iter().any(|a| a.key == key) {
            bail!("the lab sets {key} in {file}, which is not among the keys it declares");
        }
        let (parents, last) = match key.rsplit_once('.') {
            Some((p, l)) => (p.split('.').collect::<Vec<_>>(), l),
            None => (Vec::new(), key),
        };
        let mut t: &mut toml_edit::Table = doc.as_table_mut();
        for p in parents {
            let item = t.entry(p).or_insert_with(|| {
                let mut n = toml_edit::Table::new();
                n.set_implicit(true);
                toml_edit::Item::Table(n)
            });
            t = item
                .as_table_mut()
                .with_context(|| format!("{file}: {p} (in {key}) is not a table"))?;
        }
        match set {
            Set::Value(mut v) => match t.get_mut(last) {
                // In place: the key's leading comments and the value's own comment stay.
                Some(item) => {
                    if let Some(old) = item.as_value() {
                        *v.decor_mut() = old.decor().clone();
                    }
                    *item = toml_edit::Item::Value(v);
                }
                None => {
                    t.insert(last, toml_edit::Item::Value(v));
                }
            },
            Set::Tables(tables) => {
                let mut a = toml_edit::ArrayOfTables::new();
                for x in tables {
                    a.push(x);
                }
                t.insert(last, toml_edit::Item::ArrayOfTables(a));
            }
            Set::Remove => {
                t.remove(last);
            }
        }
    }
    let text = format!(
        "# {file} as shipped, edited by vigil-lab up --installed: only {}\n{doc}",
        allowed.iter().map(|a| a.key).collect::<Vec<_>>().join(", ")
    );
    let stray: Vec<String> = changed_keys(shipped, &text)?
        .into_iter()
        .filter(|c| !covered(c, allowed))
        .collect();
    if !stray.is_empty() {
        bail!("the lab's edit of {file} changed {stray:?}, which it does not declare");
    }
    Ok(text)
}

fn covered(changed: &str, allowed: &[LabKey]) -> bool {
    allowed.iter().any(|a| {
        changed == a.key
            || changed
                .strip_prefix(a.key)
                .is_some_and(|r| r.starts_with('.'))
    })
}

/// Every dotted key whose value differs between two TOML documents (added, removed or
/// changed; tables are recursed into, an array of tables is one value).
pub fn changed_keys(a: &str, b: &str) -> anyhow::Result<Vec<String>> {
    let la = leaves(a).context("the first document")?;
    let lb = leaves(b).context("the second document")?;
    let mut keys: Vec<String> = la
        .keys()
        .chain(lb.keys())
        .filter(|k| la.get(*k) != lb.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    Ok(keys)
}

fn leaves(text: &str) -> anyhow::Result<BTreeMap<String, toml::Value>> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
        for (k, v) in t {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(sub) => walk(&key, sub, out),
                other => {
                    out.insert(key, other.clone());
                }
            }
        }
    }
    let t: toml::Table = toml::from_str(text).context("not TOML")?;
    let mut out = BTreeMap::new();
    walk("", &t, &mut out);
    Ok(out)
}

/// A value of the shipped file (`watchdog.timeout_secs`), if set there.
pub fn shipped_int(shipped: &str, key: &str) -> anyhow::Result<Option<i64>> {
    Ok(leaves(shipped)?.get(key).and_then(toml::Value::as_integer))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = "[Unit]\nExecStart=/nope\n[Service]\n# ExecStart=/old\nExecStartPre=+/usr/libexec/vigil/setup /etc/vigil/agent.toml\nExecStart=/usr/sbin/vigil-agent --config /etc/vigil/agent.toml\n";

    #[test]
    fn unit_command_lines_are_read_from_service_only() {
        assert_eq!(
            unit_command(UNIT, "ExecStart").expect("ExecStart"),
            ["/usr/sbin/vigil-agent", "--config", "/etc/vigil/agent.toml"]
        );
        assert_eq!(
            unit_command(UNIT, "ExecStartPre").expect("pre")[0],
            "/usr/libexec/vigil/setup"
        );
        assert!(unit_command(UNIT, "ExecStopPost").is_err());
        for bad in [
            "[Service]\nExecStart=/a $X\n",
            "[Service]\nExecStart=-/a\n",
            "[Service]\nExecStart=/a \"b c\"\n",
            "[Service]\nExecStart=/a\nExecStart=/b\n",
        ] {
            assert!(unit_command(bad, "ExecStart").is_err(), "{bad}");
        }
    }

    /// The repository's units (what the packages ship): every line the lab runs is one it
    /// can map, and reads the shipped config.
    #[test]
    fn the_repositorys_units_have_command_lines_the_lab_can_run() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/systemd");
        for (unit, key, config) in [
            (AGENT_UNIT, "ExecStartPre", AGENT_CONFIG),
            (AGENT_UNIT, "ExecStart", AGENT_CONFIG),
            (MONITOR_UNIT, "ExecStart", MONITOR_CONFIG),
            (MONITOR_UNIT, "ExecStopPost", MONITOR_CONFIG),
        ] {
            let text = std::fs::read_to_string(dir.join(unit)).expect(unit);
            let words = unit_command(&text, key).unwrap_or_else(|e| panic!("{unit} {key}: {e:#}"));
            assert!(words.iter().any(|w| w == config), "{unit} {key}: {words:?}");
        }
    }

    /// The repository's shipped configs with every key the lab declares set: still what the
    /// agent and the monitor accept, and still the shipped timings.
    #[test]
    fn the_shipped_configs_edited_as_the_lab_does_load() {
        let etc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../packaging/etc");
        let tmp =
            std::env::temp_dir().join(format!("vigil-lab-installed-unit-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).expect("tmp");
        let pool = || Set::Tables(vec![table(&[("name", "p".into()), ("path", "/x".into())])]);
        let shipped = std::fs::read_to_string(etc.join("agent.toml")).expect("agent.toml");
        let agent = edit_config(
            AGENT_CONFIG,
            &shipped,
            AGENT_KEYS,
            vec![
                ("monitors", Set::strs(&["198.18.0.1:7440".to_string()])),
                ("libvirt_uri", Set::str("qemu+unix:///system?socket=/x")),
                ("state_dir", Set::str("/x/state")),
                ("tls.ca", Set::str("/x/ca.crt")),
                ("tls.cert", Set::str("/x/hv1.crt")),
                ("tls.key", Set::str("/x/hv1.key")),
                ("watchdog.device", Set::str("/x/watchdog")),
                ("storage.pools", pool()),
            ],
        )
        .expect("edit agent.toml");
        std::fs::write(tmp.join("agent.toml"), agent).expect("write");
        let a = vigil_common::config::AgentConfig::load(&tmp.join("agent.toml")).expect("agent");
        assert_eq!((a.zone.as_str(), a.watchdog.timeout_secs), ("default", 10));
        assert_eq!(a.host, None, "the host name comes from the certificate");
        let shipped = std::fs::read_to_string(etc.join("monitor.toml")).expect("monitor.toml");
        let peer = table(&[("id", 2.into()), ("addr", "198.18.0.2:7441".into())]);
        let fence = table(&[("host", "hv1".into()), ("agent", "fence_ipmilan".into())]);
        let monitor = edit_config(
            MONITOR_CONFIG,
            &shipped,
            MONITOR_KEYS,
            vec![
                ("node_id", Set::int(1)),
                ("data_dir", Set::str("/x/data")),
                ("advertise", Set::str("198.18.0.1:7440")),
                ("tls.ca", Set::str("/x/ca.crt")),
                ("tls.cert", Set::str("/x/mon1.crt")),
                ("tls.key", Set::str("/x/mon1.key")),
                ("raft.listen", Set::str("198.18.0.1:7441")),
                ("raft.peers", Set::Tables(vec![peer])),
                ("vip.address", Set::str("198.18.0.250")),
                ("vip.interface", Set::str("eth0")),
                ("recovery.ha_tag", Set::str("ha")),
                ("fencing.hosts", Set::Tables(vec![fence])),
                ("storage.pools", pool()),
            ],
        )
        .expect("edit monitor.toml");
        std::fs::write(tmp.join("monitor.toml"), monitor).expect("write");
        let m =
            vigil_common::config::MonitorConfig::load(&tmp.join("monitor.toml")).expect("monitor");
        assert_eq!(m.detector.down_after_ms, 2500, "the shipped detector stays");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    const SHIPPED: &str = "# comment\nnode_id = 1\nlisten = \"0.0.0.0:7440\"\n[tls]\nca = \"/etc/a\"\n[detector]\ndown_after_ms = 2500\n";
    const KEYS: &[LabKey] = &[
        k("node_id", ""),
        k("tls.ca", ""),
        k("raft.peers", ""),
        k("vip.address", ""),
    ];

    #[test]
    fn an_edit_keeps_every_other_shipped_key_and_its_comments() {
        let peer = table(&[("id", 2.into()), ("addr", "x:1".into())]);
        let out = edit_config(
            "m.toml",
            SHIPPED,
            KEYS,
            vec![
                ("node_id", Set::int(3)),
                ("tls.ca", Set::str("/lab/ca")),
                ("raft.peers", Set::Tables(vec![peer])),
                ("vip.address", Set::str("1.2.3.4")),
            ],
        )
        .expect("edit");
        assert!(out.contains("# comment"), "{out}");
        assert_eq!(
            changed_keys(SHIPPED, &out).expect("diff"),
            ["node_id", "raft.peers", "tls.ca", "vip.address"]
        );
        let t: toml::Table = toml::from_str(&out).expect("toml");
        assert_eq!(t["detector"]["down_after_ms"].as_integer(), Some(2500));
        assert_eq!(t["raft"]["peers"][0]["id"].as_integer(), Some(2));
        // An undeclared key is refused.
        assert!(edit_config("m.toml", SHIPPED, KEYS, vec![("listen", Set::str("x"))]).is_err());
        // Removing a key is a change of that key.
        let out =
            edit_config("m.toml", SHIPPED, KEYS, vec![("tls.ca", Set::Remove)]).expect("remove");
        assert_eq!(changed_keys(SHIPPED, &out).expect("diff"), ["tls.ca"]);
    }
}
