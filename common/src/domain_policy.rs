//! Which libvirt domain definitions Vigil stores and defines on other hypervisors.
//!
//! An HA VM's inactive XML travels from its agent to the monitors and is defined verbatim on
//! whichever host restarts the VM. Whoever controls one hypervisor (and so its agent
//! certificate) must not be able to plant a definition that reaches the *host* where it is
//! defined: `<qemu:commandline>` runs any QEMU option (so any program) there, a custom
//! `<emulator>` is a program of the definer's choosing, `<hostdev>`/`<filesystem>`/a
//! `file` or `unix` character device reach the host's devices, files and sockets, and
//! `<seclabel type='none'>` turns off the confinement that limits all of the above.
//!
//! So [`check`] is an allow-list: a document is refused unless every part is known to stay
//! inside the guest. The list and the reasons are in docs/domain-policy.md; change both
//! together. The check is pure (no I/O), bounded (size checked before parsing, a node limit,
//! no DTD), and its error names what is wrong.

use roxmltree::{Document, Node, ParsingOptions};

/// The largest definition accepted, checked before parsing (the same as the replicated
/// state's own limit on a stored definition).
pub const MAX_DOMAIN_XML_BYTES: usize = 256 * 1024;

/// The most XML nodes (elements, text, attributes do not count) parsed in one definition.
pub const MAX_DOMAIN_XML_NODES: u32 = 20_000;

/// The namespace of Vigil's own element inside `<metadata>`.
pub use crate::domain::METADATA_NS;

/// Emulators a definition may name: the paths where distributions install QEMU. Anything
/// else is a program chosen by whoever wrote the XML.
pub const EMULATORS: &[&str] = &[
    "/usr/libexec/qemu-kvm",
    "/usr/bin/qemu-kvm",
    "/usr/bin/kvm",
    "/usr/bin/kvm-spice",
];

/// Emulator paths accepted by prefix: `/usr/bin/qemu-system-ARCH`.
const EMULATOR_PREFIX: &str = "/usr/bin/qemu-system-";

/// Directories firmware (`<loader>`, an NVRAM `template`) may come from.
pub const FIRMWARE_DIRS: &[&str] = &[
    "/usr/share/OVMF/",
    "/usr/share/edk2/",
    "/usr/share/edk2-ovmf/",
    "/usr/share/AAVMF/",
    "/usr/share/qemu/",
    "/usr/share/seabios/",
];

/// Where libvirt keeps NVRAM files (and picks them when the XML names none).
pub const NVRAM_DIR: &str = "/var/lib/libvirt/qemu/nvram/";

/// Where a character device may log (libvirt's own log directory).
pub const CHARDEV_LOG_DIR: &str = "/var/log/libvirt/";

/// Entropy sources an `<rng model='virtio'><backend model='random'>` may read.
pub const RNG_SOURCES: &[&str] = &["/dev/random", "/dev/urandom", "/dev/hwrng"];

/// What the operator configured for the check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainPolicy {
    /// Absolute directories (or device prefixes such as `/dev/vg_vms/`) that `file` and
    /// `block` disks must lie under, as the hypervisors see them. Empty: disk paths are not
    /// checked (see docs/domain-policy.md: a disk can name any host file qemu may open).
    pub disk_roots: Vec<String>,
}

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the domain XML is {len} bytes, above the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("the domain XML has a DOCTYPE or entity declaration, refused outright (entity expansion attacks; libvirt never writes one)")]
    Doctype,
    #[error("the domain XML is malformed: {0}")]
    Malformed(String),
    #[error("{what} is not allowed: {why}")]
    Refused { what: String, why: String },
}

fn refused(what: impl Into<String>, why: impl Into<String>) -> PolicyError {
    PolicyError::Refused {
        what: what.into(),
        why: why.into(),
    }
}

/// Checks a domain definition against the allow-list; `Ok` if it may be stored and defined
/// on other hypervisors.
pub fn check(xml: &str, policy: &DomainPolicy) -> Result<(), PolicyError> {
    if xml.len() > MAX_DOMAIN_XML_BYTES {
        return Err(PolicyError::TooLarge {
            len: xml.len(),
            max: MAX_DOMAIN_XML_BYTES,
        });
    }
    if xml.contains("<!DOCTYPE") || xml.contains("<!ENTITY") {
        return Err(PolicyError::Doctype);
    }
    let opts = ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_DOMAIN_XML_NODES,
    };
    let doc = Document::parse_with_options(xml, opts)
        .map_err(|e| PolicyError::Malformed(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().namespace().is_some() || root.tag_name().name() != "domain" {
        return Err(refused(
            format!("root element <{}>", display(root)),
            "a definition is one libvirt <domain>",
        ));
    }
    walk(root, policy)
}

/// The element's name as written (`qemu:commandline`).
fn display(n: Node) -> String {
    let name = n.tag_name().name();
    match n.tag_name().namespace().and_then(|ns| n.lookup_prefix(ns)) {
        Some(p) if !p.is_empty() => format!("{p}:{name}"),
        _ => name.to_string(),
    }
}

fn el(n: Node) -> String {
    format!("<{}>", display(n))
}

fn under(path: &str, dirs: &[&str]) -> bool {
    !path.split('/').any(|c| c == "..") && dirs.iter().any(|d| path.starts_with(d))
}

fn walk(node: Node, policy: &DomainPolicy) -> Result<(), PolicyError> {
    for child in node.children().filter(|c| c.is_element()) {
        if let Some(ns) = child.tag_name().namespace() {
            return Err(refused(
                el(child),
                format!("elements of another namespace ({ns}) pass options straight to the hypervisor (qemu:commandline runs any QEMU option on the host that defines the domain); only libvirt's own elements are accepted outside <metadata>"),
            ));
        }
        let name = child.tag_name().name();
        match name {
            // Opaque to libvirt (Vigil's own element lives here).
            "metadata" => continue,
            "seclabel" => seclabel(child)?,
            "devices" => devices(child, policy)?,
            "os" => os(child)?,
            "sysinfo" => {
                if let Some(e) = child
                    .descendants()
                    .find(|d| d.is_element() && d.has_attribute("file"))
                {
                    return Err(refused(
                        format!(
                            "{} with file={:?} in <sysinfo>",
                            el(e),
                            e.attribute("file").unwrap_or_default()
                        ),
                        "it loads a file of the host into the guest",
                    ));
                }
            }
            _ => {}
        }
        // Nested seclabels (in disk sources) and namespaced elements anywhere.
        if name != "devices" {
            nested(child)?;
        }
    }
    Ok(())
}

/// Checks what every subtree must respect: no foreign namespace, no weakened seclabel.
fn nested(node: Node) -> Result<(), PolicyError> {
    for d in node.descendants().skip(1).filter(|d| d.is_element()) {
        if let Some(ns) = d.tag_name().namespace() {
            return Err(refused(
                el(d),
                format!("elements of another namespace ({ns}) are accepted only inside <metadata>"),
            ));
        }
        if d.tag_name().name() == "seclabel" {
            seclabel(d)?;
        }
    }
    Ok(())
}

fn seclabel(n: Node) -> Result<(), PolicyError> {
    let ty = n.attribute("type").unwrap_or("dynamic");
    if ty != "dynamic" {
        return Err(refused(
            format!("<seclabel type={ty:?}>"),
            "only libvirt's dynamic labelling confines QEMU (type='none' runs it unconfined, type='static' with a label of the definer's choosing)",
        ));
    }
    if n.attribute("relabel") == Some("no") {
        return Err(refused(
            "<seclabel relabel='no'>",
            "without relabelling, QEMU keeps access the dynamic label would withdraw",
        ));
    }
    if n.attribute("model") == Some("none") {
        return Err(refused(
            "<seclabel model='none'>",
            "it turns confinement off",
        ));
    }
    Ok(())
}

fn os(n: Node) -> Result<(), PolicyError> {
    for c in n.descendants().skip(1).filter(|c| c.is_element()) {
        let text = c.text().unwrap_or_default().trim();
        match c.tag_name().name() {
            "kernel" | "initrd" | "dtb" => {
                return Err(refused(
                    format!("{} {text:?}", el(c)),
                    "direct kernel boot loads a file of the host into the guest (boot from the guest's disks)",
                ))
            }
            "table" => {
                return Err(refused(
                    format!("<acpi><table> {text:?}"),
                    "it loads a file of the host into the guest",
                ))
            }
            "loader" if !text.is_empty() && !under(text, FIRMWARE_DIRS) => {
                return Err(refused(
                    format!("<loader> {text:?}"),
                    format!("firmware must come from the distribution's firmware directories ({})", FIRMWARE_DIRS.join(", ")),
                ))
            }
            "nvram" => {
                if let Some(t) = c.attribute("template") {
                    if !under(t, FIRMWARE_DIRS) {
                        return Err(refused(
                            format!("<nvram template={t:?}>"),
                            "an NVRAM template must come from the firmware directories",
                        ));
                    }
                }
                if !text.is_empty() && !under(text, &[NVRAM_DIR]) {
                    return Err(refused(
                        format!("<nvram> {text:?}"),
                        format!("NVRAM files live in {NVRAM_DIR} (libvirt picks one when none is named)"),
                    ));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn devices(n: Node, policy: &DomainPolicy) -> Result<(), PolicyError> {
    for d in n.children().filter(|c| c.is_element()) {
        if d.tag_name().namespace().is_some() {
            return Err(refused(
                el(d),
                "elements of another namespace are accepted only inside <metadata>",
            ));
        }
        let ty = d.attribute("type");
        match d.tag_name().name() {
            "emulator" => {
                let path = d.text().unwrap_or_default().trim();
                let standard = EMULATORS.contains(&path)
                    || (path.starts_with(EMULATOR_PREFIX)
                        && path.len() > EMULATOR_PREFIX.len()
                        && path[EMULATOR_PREFIX.len()..]
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_'));
                if !standard {
                    return Err(refused(
                        format!("<emulator> {path:?}"),
                        format!("the emulator is a program run on the host: only the standard QEMU paths are accepted ({EMULATOR_PREFIX}ARCH, {})", EMULATORS.join(", ")),
                    ));
                }
            }
            "disk" => disk(d, policy)?,
            "interface" => {
                let t = ty.unwrap_or("");
                if !matches!(t, "network" | "bridge" | "ethernet" | "user") {
                    return Err(refused(
                        format!("<interface type={t:?}>"),
                        "only network, bridge, ethernet and user interfaces are accepted (direct, hostdev and vdpa hand a host device to the guest; vhostuser, server, client, mcast and udp open host sockets)",
                    ));
                }
                if let Some(s) = d.children().find(|c| {
                    c.is_element() && matches!(c.tag_name().name(), "script" | "downscript")
                }) {
                    return Err(refused(
                        format!("<interface><{}>", s.tag_name().name()),
                        "it runs a program of the definer's choosing on the host",
                    ));
                }
            }
            "serial" | "console" | "parallel" | "channel" => chardev(d)?,
            "input" => {
                if matches!(ty, Some("passthrough") | Some("evdev")) {
                    return Err(refused(
                        format!("<input type={:?}>", ty.unwrap_or_default()),
                        "it hands a host input device to the guest",
                    ));
                }
            }
            "audio" => {
                if ty == Some("file") {
                    return Err(refused(
                        "<audio type='file'>",
                        "it writes a file on the host",
                    ));
                }
            }
            "rng" => {
                for b in d.children().filter(|c| c.has_tag_name("backend")) {
                    let model = b.attribute("model").unwrap_or("random");
                    let src = b.text().unwrap_or_default().trim();
                    let ok = match model {
                        "random" => src.is_empty() || RNG_SOURCES.contains(&src),
                        "builtin" => true,
                        _ => false,
                    };
                    if !ok {
                        return Err(refused(
                            format!("<rng><backend model={model:?}> {src:?}"),
                            format!(
                                "only the host's entropy devices ({}) or the builtin backend",
                                RNG_SOURCES.join(", ")
                            ),
                        ));
                    }
                }
            }
            "tpm" => {
                for b in d.children().filter(|c| c.has_tag_name("backend")) {
                    let t = b.attribute("type").unwrap_or_default();
                    if t != "emulator" {
                        return Err(refused(
                            format!("<tpm><backend type={t:?}>"),
                            "only an emulated TPM (passthrough hands the host's TPM to the guest)",
                        ));
                    }
                }
            }
            "redirdev" => {
                if ty != Some("spicevmc") {
                    return Err(refused(
                        format!("<redirdev type={:?}>", ty.unwrap_or_default()),
                        "only spicevmc USB redirection (other types open host sockets)",
                    ));
                }
            }
            "memory" => {
                let model = d.attribute("model").unwrap_or_default();
                if matches!(model, "nvdimm" | "virtio-pmem") {
                    return Err(refused(
                        format!("<memory model={model:?}>"),
                        "it maps a file of the host into the guest",
                    ));
                }
            }
            "graphics" => {
                if d.has_attribute("socket")
                    || d.children()
                        .any(|c| c.has_tag_name("listen") && c.has_attribute("socket"))
                {
                    return Err(refused(
                        "<graphics socket=...>",
                        "a socket path of the definer's choosing on the host",
                    ));
                }
            }
            "controller" | "video" | "sound" | "memballoon" | "watchdog" | "panic" | "hub"
            | "iommu" | "vsock" | "crypto" | "pstore" => {}
            other => {
                return Err(refused(
                    format!("<{other}>"),
                    match other {
                        "hostdev" => {
                            "it hands a host device (PCI, USB, SCSI, mediated) to the guest"
                        }
                        "filesystem" => "it exposes a host directory to the guest",
                        "smartcard" => {
                            "it hands the host's smartcard or a host socket to the guest"
                        }
                        "shmem" => "it shares host memory with the guest",
                        "lease" => "it names a lock file on the host",
                        _ => "this device is not on Vigil's allow-list (docs/domain-policy.md)",
                    },
                ));
            }
        }
        nested(d)?;
    }
    Ok(())
}

fn disk(d: Node, policy: &DomainPolicy) -> Result<(), PolicyError> {
    let ty = d.attribute("type").unwrap_or("file");
    if !matches!(ty, "file" | "block" | "network" | "volume") {
        return Err(refused(
            format!("<disk type={ty:?}>"),
            "only file, block, network and volume disks (type='dir' exposes a host directory)",
        ));
    }
    if d.attribute("rawio") == Some("yes") {
        return Err(refused(
            "<disk rawio='yes'>",
            "it gives QEMU raw I/O capability on the host",
        ));
    }
    if d.attribute("sgio") == Some("unfiltered") {
        return Err(refused(
            "<disk sgio='unfiltered'>",
            "it passes any SCSI command to the host device",
        ));
    }
    if policy.disk_roots.is_empty() {
        return Ok(());
    }
    let roots: Vec<&str> = policy.disk_roots.iter().map(String::as_str).collect();
    for s in d.descendants().filter(|s| s.has_tag_name("source")) {
        for attr in ["file", "dev"] {
            if let Some(p) = s.attribute(attr) {
                if !under(p, &roots) {
                    return Err(refused(
                        format!("<disk> source {attr}={p:?}"),
                        format!(
                            "disks must lie under the configured roots ({})",
                            roots.join(", ")
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn chardev(d: Node) -> Result<(), PolicyError> {
    let kind = d.tag_name().name();
    let ty = d.attribute("type").unwrap_or("pty");
    let libvirt_socket = kind == "channel"
        && ty == "unix"
        && d.children()
            .filter(|c| c.has_tag_name("source"))
            .all(|s| !s.has_attribute("path"));
    let ok = matches!(
        ty,
        "pty" | "null" | "vc" | "spicevmc" | "spiceport" | "qemu-vdagent" | "dbus"
    ) || libvirt_socket;
    if !ok {
        return Err(refused(
            format!("<{kind} type={ty:?}>"),
            "a character device may not reach host resources (file, pipe, dev, tcp, udp, unix with a path, stdio); pty, null, vc, spice and (for channels) a unix socket libvirt places itself are accepted",
        ));
    }
    if let Some(log) = d.children().find(|c| c.has_tag_name("log")) {
        let f = log.attribute("file").unwrap_or_default();
        if !under(f, &[CHARDEV_LOG_DIR]) {
            return Err(refused(
                format!("<{kind}><log file={f:?}>"),
                format!("a character device logs only under {CHARDEV_LOG_DIR}"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
