//! The allow-list against the domain XMLs the project really uses, and hostile ones.

use super::*;

fn ok(xml: &str) {
    if let Err(e) = check(xml, &DomainPolicy::default()) {
        panic!("refused: {e}\n{xml}");
    }
}

/// Refused, with an error that names `needle`.
fn refused_naming(xml: &str, needle: &str) -> PolicyError {
    let e = check(xml, &DomainPolicy::default()).expect_err("should be refused");
    assert!(
        e.to_string().contains(needle),
        "error {e:?} should name {needle:?}"
    );
    e
}

/// A domain with `devices` inside `<devices>` and `extra` at the top level.
fn with(extra: &str, devices: &str) -> String {
    format!(
        "<domain type='kvm'><name>g</name><memory unit='KiB'>65536</memory>\
         <os><type arch='x86_64'>hvm</type></os>{extra}<devices>\
         <emulator>/usr/bin/qemu-system-x86_64</emulator>{devices}</devices></domain>"
    )
}

/// What agent/src/libvirt/tests.rs defines (the test driver), with Vigil's metadata.
#[test]
fn the_agents_test_domains_pass() {
    ok(r#"<domain type='test'>
  <name>vigil-x</name>
  <memory unit='KiB'>131072</memory>
  <vcpu>2</vcpu>
  <os><type>hvm</type></os>
  <metadata><vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true" priority="10" generation="3"/></metadata>
  <devices>
    <disk type='file' device='disk'><source file='/srv/vm/x.qcow2'/><target dev='vda'/></disk>
    <disk type='block' device='disk'><source dev='/dev/vg/x'/><target dev='vdb'/></disk>
  </devices>
</domain>"#);
    ok("<domain type='qemu'>\n  <name>n</name>\n  <memory unit='KiB'>65536</memory>\n  <os><type arch='x86_64'>hvm</type></os>\n</domain>");
}

/// `scripts/libvirt-sandbox.sh domain-xml NAME 64 DISK` (the e2e and lab domains).
#[test]
fn the_sandbox_and_lab_domain_passes() {
    ok(r#"<domain type='qemu'>
  <name>t1</name>
  <memory unit='MiB'>64</memory>
  <currentMemory unit='MiB'>64</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' error_policy='stop'/>
      <source file='/srv/x.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>"#);
}

/// The sandbox domain as libvirt 10 writes it back (`virsh dumpxml --inactive`, captured
/// from `scripts/libvirt-sandbox.sh`): what an agent really ships.
#[test]
fn a_real_libvirt_dump_of_the_sandbox_domain_passes() {
    ok(r#"<domain type='qemu'>
  <name>polt1</name>
  <uuid>b334fcb9-ec38-4d55-b259-83c0f3fb76e9</uuid>
  <memory unit='KiB'>65536</memory>
  <currentMemory unit='KiB'>65536</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
  </features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='forbid'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' error_policy='stop'/>
      <source file='/srv/x.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='none'/>
    <controller type='pci' index='0' model='pci-root'/>
    <serial type='pty'>
      <target type='isa-serial' port='0'>
        <model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <audio id='1' type='none'/>
    <memballoon model='none'/>
  </devices>
</domain>"#);
}

/// A fuller domain in the shape `virsh dumpxml --inactive` writes it back (what agents ship), with a
/// guest-agent channel, a bridge NIC, VNC, an emulated TPM and UEFI firmware.
#[test]
fn a_full_libvirt_dump_passes() {
    ok(r#"<domain type='kvm'>
  <name>web1</name>
  <uuid>6d3f1a52-8c1e-4d8b-9a57-1f0e2b3c4d5e</uuid>
  <metadata>
    <vigil:vm xmlns:vigil="urn:vigil:vm:1" ha="true" generation="2"/>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1"><nova:name>x</nova:name></nova:instance>
  </metadata>
  <memory unit='KiB'>2097152</memory>
  <currentMemory unit='KiB'>2097152</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <sysinfo type='smbios'><system><entry name='manufacturer'>Vigil</entry></system></sysinfo>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram>
    <boot dev='hd'/>
    <smbios mode='host'/>
  </os>
  <features><acpi/><apic/></features>
  <cpu mode='host-model' check='partial'/>
  <clock offset='utc'><timer name='rtc' tickpolicy='catchup'/></clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <pm><suspend-to-mem enabled='no'/></pm>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' discard='unmap'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='vms/web1-data'><host name='10.0.0.5' port='6789'/></source>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>
    <controller type='usb' index='0' model='qemu-xhci' ports='15'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='virtio-serial' index='0'/>
    <interface type='bridge'>
      <mac address='52:54:00:12:34:56'/>
      <source bridge='br0'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'><source network='default'/><model type='virtio'/></interface>
    <serial type='pty'><target type='isa-serial' port='0'><model name='isa-serial'/></target></serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>
    <input type='tablet' bus='usb'/>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <tpm model='tpm-crb'><backend type='emulator' version='2.0'/></tpm>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics>
    <audio id='1' type='none'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <watchdog model='itco' action='reset'/>
    <memballoon model='virtio'/>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'/>
</domain>"#);
}

#[test]
fn qemu_namespace_elements_are_refused_anywhere() {
    let e = refused_naming(
        "<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>g</name>\
         <qemu:commandline><qemu:arg value='-fw_cfg'/><qemu:arg value='name=opt/x,file=/etc/shadow'/></qemu:commandline></domain>",
        "<qemu:commandline>",
    );
    assert!(e.to_string().contains("namespace"), "{e}");
    for inner in [
        "<qemu:capabilities><qemu:add capability='blockdev'/></qemu:capabilities>",
        "<qemu:override><qemu:device alias='x'/></qemu:override>",
        "<qemu:deprecation behavior='crash'/>",
    ] {
        let xml = format!("<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>g</name>{inner}</domain>");
        refused_naming(&xml, "qemu:");
    }
    // Nested inside a device, or in another namespace, or with a default namespace.
    refused_naming(
        &with(
            "",
            "<disk type='file' xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'><q:x/></disk>",
        ),
        "<q:x>",
    );
    refused_naming(
        "<domain xmlns='http://libvirt.org/schemas/domain/qemu/1.0'><name>g</name></domain>",
        "root element",
    );
    // Anything goes inside <metadata> (opaque to libvirt).
    ok("<domain type='kvm'><name>g</name><metadata><q:commandline xmlns:q='http://libvirt.org/schemas/domain/qemu/1.0'/></metadata></domain>");
}

#[test]
fn a_custom_emulator_is_refused() {
    refused_naming(
        &with("", "").replace("/usr/bin/qemu-system-x86_64", "/tmp/evil"),
        "\"/tmp/evil\"",
    );
    refused_naming(
        &with("", "").replace(
            "/usr/bin/qemu-system-x86_64",
            "/usr/bin/qemu-system-x86_64/../../tmp/evil",
        ),
        "<emulator>",
    );
    for good in [
        "/usr/libexec/qemu-kvm",
        "/usr/bin/qemu-system-aarch64",
        "/usr/bin/kvm",
    ] {
        ok(&with("", "").replace("/usr/bin/qemu-system-x86_64", good));
    }
}

#[test]
fn host_resources_are_refused() {
    let cases: &[(&str, &str, &str)] = &[
        ("", "<hostdev mode='subsystem' type='pci'><source><address bus='0x03'/></source></hostdev>", "<hostdev>"),
        ("", "<filesystem type='mount'><source dir='/'/><target dir='root'/></filesystem>", "<filesystem>"),
        ("", "<interface type='direct'><source dev='eth0' mode='passthrough'/></interface>", "type=\"direct\""),
        ("", "<interface type='hostdev'><source><address type='pci'/></source></interface>", "type=\"hostdev\""),
        ("", "<interface type='ethernet'><script path='/bin/evil'/></interface>", "<script>"),
        ("", "<serial type='file'><source path='/etc/cron.d/x'/></serial>", "<serial type=\"file\">"),
        ("", "<console type='pipe'><source path='/tmp/p'/></console>", "<console type=\"pipe\">"),
        ("", "<serial type='tcp'><source mode='connect' host='10.0.0.1' service='22'/></serial>", "type=\"tcp\""),
        ("", "<serial type='udp'><source mode='connect' service='53'/></serial>", "type=\"udp\""),
        ("", "<serial type='dev'><source path='/dev/ttyS0'/></serial>", "type=\"dev\""),
        ("", "<console type='unix'><source mode='bind' path='/run/x'/></console>", "type=\"unix\""),
        ("", "<channel type='unix'><source mode='bind' path='/var/run/docker.sock'/><target type='virtio'/></channel>", "<channel type=\"unix\">"),
        ("", "<serial type='pty'><log file='/etc/passwd'/></serial>", "<log file="),
        ("", "<disk type='dir'><source dir='/etc'/><target dev='hda'/></disk>", "type=\"dir\""),
        ("", "<disk type='block' device='lun' rawio='yes'><source dev='/dev/sda'/></disk>", "rawio"),
        ("", "<smartcard mode='host'/>", "<smartcard>"),
        ("", "<shmem name='x'/>", "<shmem>"),
        ("", "<input type='evdev'><source dev='/dev/input/event0'/></input>", "type=\"evdev\""),
        ("", "<tpm model='tpm-tis'><backend type='passthrough'><device path='/dev/tpm0'/></backend></tpm>", "passthrough"),
        ("", "<rng model='virtio'><backend model='egd' type='tcp'/></rng>", "egd"),
        ("", "<memory model='nvdimm'><source><path>/etc/shadow</path></source></memory>", "nvdimm"),
        ("", "<redirdev bus='usb' type='tcp'><source mode='connect' host='h' service='1'/></redirdev>", "redirdev"),
        ("", "<audio id='1' type='file' path='/etc/x'/>", "audio"),
        ("", "<unknowndevice/>", "<unknowndevice>"),
        ("<seclabel type='none'/>", "", "type=\"none\""),
        ("<seclabel type='static' model='selinux'><label>unconfined_u</label></seclabel>", "", "type=\"static\""),
        ("<seclabel type='dynamic' relabel='no'/>", "", "relabel='no'"),
        ("", "<disk type='file'><source file='/srv/a.qcow2'><seclabel relabel='no'/></source></disk>", "relabel='no'"),
        ("<sysinfo type='fwcfg'><entry name='opt/x' file='/etc/shadow'/></sysinfo>", "", "<sysinfo>"),
    ];
    for (extra, devices, needle) in cases {
        refused_naming(&with(extra, devices), needle);
    }
    refused_naming(
        "<domain><name>g</name><os><type>hvm</type><kernel>/etc/shadow</kernel></os></domain>",
        "<kernel>",
    );
    refused_naming(
        "<domain><name>g</name><os><type>hvm</type><loader>/tmp/fw.bin</loader></os></domain>",
        "<loader>",
    );
}

#[test]
fn disks_outside_the_configured_roots_are_refused_when_roots_are_configured() {
    let policy = DomainPolicy {
        disk_roots: vec!["/srv/vm/".into(), "/dev/vg_vms/".into()],
    };
    let disk = |src: &str| {
        with(
            "",
            &format!("<disk type='file'><source file='{src}'/><target dev='vda'/></disk>"),
        )
    };
    assert!(check(&disk("/srv/vm/a.qcow2"), &policy).is_ok());
    let e = check(&disk("/etc/shadow"), &policy).expect_err("outside");
    assert!(e.to_string().contains("/etc/shadow"), "{e}");
    assert!(check(&disk("/srv/vm/../../etc/shadow"), &policy).is_err());
    // Not configured: not checked (docs/domain-policy.md).
    assert!(check(&disk("/etc/shadow"), &DomainPolicy::default()).is_ok());
}

#[test]
fn a_huge_document_is_refused_before_parsing() {
    let pad = "<!-- x -->".repeat(MAX_DOMAIN_XML_BYTES / 10 + 1);
    let xml = format!("<domain><name>g</name>{pad}</domain>");
    let e = refused_naming(&xml, "above the limit");
    assert!(matches!(e, PolicyError::TooLarge { .. }), "{e:?}");
    // Many small nodes within the size limit hit the node limit instead.
    let many = "<a/>".repeat(MAX_DOMAIN_XML_NODES as usize + 10);
    let xml = format!("<domain><name>g</name><metadata>{many}</metadata></domain>");
    assert!(xml.len() < MAX_DOMAIN_XML_BYTES);
    assert!(matches!(
        check(&xml, &DomainPolicy::default()),
        Err(PolicyError::Malformed(_))
    ));
}

#[test]
fn a_billion_laughs_is_refused_outright() {
    let xml = r#"<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol9 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
]>
<domain><name>&lol9;</name></domain>"#;
    let e = refused_naming(xml, "DOCTYPE");
    assert_eq!(e, PolicyError::Doctype);
}

#[test]
fn malformed_xml_is_refused_saying_so() {
    for bad in [
        "<domain><name>g</name>",
        "",
        "not xml",
        "<domain><a></b></domain>",
    ] {
        refused_naming(bad, "malformed");
    }
    refused_naming(
        "<network><name>n</name></network>",
        "root element <network>",
    );
}
