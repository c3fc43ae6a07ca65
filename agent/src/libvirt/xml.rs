//! Pure functions over libvirt domain XML: the disks a domain uses, Vigil's metadata element, and
//! the element string that [`super::Hypervisor`] hands to `virDomainSetMetadata`.
//!
//! Vigil's element lives in the domain's `<metadata>` in namespace [`METADATA_NS`]:
//!
//! ```xml
//! <metadata>
//!   <vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true" priority="10" generation="3"/>
//! </metadata>
//! ```
//!
//! Only the namespace URI counts when reading (any prefix is accepted); a malformed attribute
//! value reads as absent rather than failing the whole domain.

use vigil_common::domain::{VigilMeta, METADATA_NS};

/// Local name of Vigil's element inside `<metadata>`.
pub const METADATA_ELEMENT: &str = "vm";

/// The domain XML could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("domain XML: {0}")]
pub struct XmlError(pub String);

/// What Vigil reads from one domain XML document.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedDomain {
    /// Source paths of the disks, in document order, without duplicates.
    pub disks: Vec<String>,
    pub meta: VigilMeta,
}

/// Reads disks and Vigil metadata from a `<domain>` document in one parse.
pub fn parse_domain(xml: &str) -> Result<ParsedDomain, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" {
        return Err(XmlError(format!(
            "root element is <{}>, not <domain>",
            root.tag_name().name()
        )));
    }
    Ok(ParsedDomain {
        disks: disks_of(root),
        meta: meta_of(root),
    })
}

/// Source paths of the domain's disks: `<devices><disk><source file|dev|dir|name>`, and
/// `pool/volume` for `type='volume'` disks. Disks without a source (an empty CD-ROM) are skipped.
pub fn parse_disks(xml: &str) -> Result<Vec<String>, XmlError> {
    parse_domain(xml).map(|p| p.disks)
}

/// Vigil's metadata from a `<domain>` document (all `None` when the element is absent).
pub fn parse_meta(xml: &str) -> Result<VigilMeta, XmlError> {
    parse_domain(xml).map(|p| p.meta)
}

/// Reads a bare metadata element, as `virDomainGetMetadata` returns it (`<vm ha="true" .../>`,
/// without namespace), or a namespaced one.
pub fn parse_meta_element(xml: &str) -> Result<VigilMeta, XmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| XmlError(e.to_string()))?;
    Ok(meta_from_element(doc.root_element()))
}

/// The element to store with `virDomainSetMetadata(VIR_DOMAIN_METADATA_ELEMENT, key =
/// METADATA_PREFIX, uri = METADATA_NS)`: libvirt adds the prefix and namespace itself, so the
/// element is unqualified. Absent fields are left out; `None` when nothing is left to store (the
/// caller then removes the element).
pub fn meta_element(meta: &VigilMeta) -> Option<String> {
    if *meta == VigilMeta::default() {
        return None;
    }
    let mut s = format!("<{METADATA_ELEMENT}");
    if let Some(ha) = meta.ha {
        s.push_str(&format!(" ha=\"{ha}\""));
    }
    if let Some(p) = meta.priority {
        s.push_str(&format!(" priority=\"{p}\""));
    }
    if let Some(g) = meta.generation {
        s.push_str(&format!(" generation=\"{g}\""));
    }
    s.push_str("/>");
    Some(s)
}

/// The storage pools (by name) that the disks at `disks` (as [`parse_disks`] returns them)
/// are on, given each pool's mount path on this host: a disk whose absolute source path lies
/// under a pool's path (compared component by component, without touching the file system:
/// a hung NFS mount must not hang the listing) is on that pool; another absolute path is a
/// local disk. `None` when some disk is not a path (a network disk such as `rbd`, or a
/// `pool/volume` of a libvirt storage pool): then nobody can say, and the monitor treats the
/// domain as on every pool.
pub fn pools_of_disks(
    disks: &[String],
    pools: &[(String, std::path::PathBuf)],
) -> Option<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for d in disks {
        let path = std::path::Path::new(d);
        if !path.is_absolute() {
            return None;
        }
        for (name, mount) in pools {
            if path.starts_with(mount) && !out.contains(name) {
                out.push(name.clone());
            }
        }
    }
    Some(out)
}

fn disks_of(root: roxmltree::Node<'_, '_>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let devices = root.children().filter(|n| n.has_tag_name("devices"));
    for disk in devices.flat_map(|d| d.children().filter(|n| n.has_tag_name("disk"))) {
        let Some(source) = disk.children().find(|n| n.has_tag_name("source")) else {
            continue;
        };
        let path = ["file", "dev", "dir", "name"]
            .iter()
            .find_map(|a| source.attribute(*a))
            .map(str::to_string)
            .or_else(
                || match (source.attribute("pool"), source.attribute("volume")) {
                    (Some(p), Some(v)) => Some(format!("{p}/{v}")),
                    _ => None,
                },
            );
        if let Some(path) = path.filter(|p| !p.is_empty()) {
            if !out.contains(&path) {
                out.push(path);
            }
        }
    }
    out
}

fn meta_of(root: roxmltree::Node<'_, '_>) -> VigilMeta {
    root.children()
        .filter(|n| n.has_tag_name("metadata"))
        .flat_map(|m| m.children())
        .find(|n| n.is_element() && n.has_tag_name((METADATA_NS, METADATA_ELEMENT)))
        .map(meta_from_element)
        .unwrap_or_default()
}

fn meta_from_element(el: roxmltree::Node<'_, '_>) -> VigilMeta {
    VigilMeta {
        ha: el.attribute("ha").and_then(parse_bool),
        priority: el.attribute("priority").and_then(|v| v.trim().parse().ok()),
        generation: el
            .attribute("generation")
            .and_then(|v| v.trim().parse().ok()),
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "on" => Some(true),
        "false" | "no" | "0" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"<domain type='kvm'>
  <name>web1</name>
  <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
  <metadata>
    <other:thing xmlns:other="urn:example:other" ha="false"/>
    <vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true" priority="10" generation="3"/>
  </metadata>
  <memory unit='KiB'>65536</memory>
  <devices>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vda'/></disk>
    <disk type='block' device='disk'><source dev='/dev/vg0/web1-data'/><target dev='vdb'/></disk>
    <disk type='network' device='disk'><source protocol='rbd' name='rbd/web1-extra'/><target dev='vdc'/></disk>
    <disk type='volume' device='disk'><source pool='nfs1' volume='web1-scratch'/><target dev='vdd'/></disk>
    <disk type='file' device='cdrom'><target dev='hdc'/><readonly/></disk>
    <disk type='file' device='disk'><source file='/var/lib/libvirt/images/web1.qcow2'/><target dev='vde'/></disk>
  </devices>
</domain>"#;

    #[test]
    fn a_domain_is_on_the_pools_its_disks_are_under_and_unknown_for_network_disks() {
        let pools = vec![
            (
                "primary".to_string(),
                std::path::PathBuf::from("/var/lib/vigil/primary"),
            ),
            (
                "second".to_string(),
                std::path::PathBuf::from("/mnt/second"),
            ),
        ];
        let on = |d: &[&str]| {
            pools_of_disks(&d.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &pools)
        };
        assert_eq!(
            on(&[
                "/var/lib/vigil/primary/vm1.qcow2",
                "/var/lib/libvirt/images/scratch.img"
            ]),
            Some(vec!["primary".to_string()])
        );
        assert_eq!(on(&["/var/lib/libvirt/images/a.img"]), Some(vec![]));
        // A sibling directory whose name starts like the mount is not under it.
        assert_eq!(on(&["/mnt/second-copy/a.img"]), Some(vec![]));
        assert_eq!(
            on(&["/mnt/second/a.img", "/var/lib/vigil/primary/b.img"]),
            Some(vec!["second".to_string(), "primary".to_string()])
        );
        assert_eq!(on(&["rbd/vm1-disk"]), None, "a network disk: unknown");
        assert_eq!(on(&[]), Some(vec![]));
    }

    #[test]
    fn parses_disks_of_every_source_kind() {
        let disks = parse_disks(FULL).expect("parse");
        assert_eq!(
            disks,
            vec![
                "/var/lib/libvirt/images/web1.qcow2",
                "/dev/vg0/web1-data",
                "rbd/web1-extra",
                "nfs1/web1-scratch",
            ]
        );
    }

    #[test]
    fn parses_vigil_metadata_by_namespace_not_prefix() {
        let meta = parse_meta(FULL).expect("parse");
        assert_eq!(
            meta,
            VigilMeta {
                ha: Some(true),
                priority: Some(10),
                generation: Some(3)
            }
        );
        let other_prefix =
            r#"<domain><metadata><v:vm xmlns:v="urn:vigil:vm:1" ha="no"/></metadata></domain>"#;
        assert_eq!(parse_meta(other_prefix).expect("parse").ha, Some(false));
        // Right local name, wrong namespace: not ours.
        let foreign =
            r#"<domain><metadata><x:vm xmlns:x="urn:not:vigil" ha="true"/></metadata></domain>"#;
        assert_eq!(parse_meta(foreign).expect("parse"), VigilMeta::default());
    }

    #[test]
    fn missing_or_malformed_metadata_reads_as_absent() {
        let none = r#"<domain><name>a</name></domain>"#;
        assert_eq!(parse_meta(none).expect("parse"), VigilMeta::default());
        assert!(parse_disks(none).expect("parse").is_empty());
        let bad = r#"<domain><metadata><vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="maybe" priority="x" generation="-1"/></metadata></domain>"#;
        assert_eq!(parse_meta(bad).expect("parse"), VigilMeta::default());
        let neg = r#"<domain><metadata><vigil:vm xmlns:vigil="urn:vigil:vm:1" priority=" -5 "/></metadata></domain>"#;
        assert_eq!(parse_meta(neg).expect("parse").priority, Some(-5));
    }

    #[test]
    fn rejects_non_domain_documents() {
        assert!(parse_domain("<network/>").is_err());
        assert!(parse_domain("not xml").is_err());
        assert!(parse_domain("").is_err());
    }

    #[test]
    fn element_round_trips() {
        let meta = VigilMeta {
            ha: Some(false),
            priority: Some(-3),
            generation: Some(u64::MAX),
        };
        let el = meta_element(&meta).expect("element");
        assert_eq!(
            el,
            format!(
                r#"<vm ha="false" priority="-3" generation="{}"/>"#,
                u64::MAX
            )
        );
        assert_eq!(parse_meta_element(&el).expect("parse"), meta);
        let only_gen = VigilMeta {
            generation: Some(7),
            ..Default::default()
        };
        assert_eq!(
            meta_element(&only_gen).as_deref(),
            Some(r#"<vm generation="7"/>"#)
        );
        assert_eq!(meta_element(&VigilMeta::default()), None);
        // As libvirt stores it inside a domain document.
        let doc = format!(
            r#"<domain><metadata><vigil:vm xmlns:vigil="{METADATA_NS}" ha="false" priority="-3" generation="{}"/></metadata></domain>"#,
            u64::MAX
        );
        assert_eq!(parse_meta(&doc).expect("parse"), meta);
    }
}
