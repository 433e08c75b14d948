//! The DSDT: the AML namespace under `\_SB` that tells the guest which devices exist, and the
//! `\_S5_` object that names the soft-off sleep state.

use acpi_tables::aml::{
    Arg, Device, EISAName, Equal, If, Interrupt, Memory32Fixed, Method, Name, Notify, Package,
    Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use crate::devices::legacy::acpi_pm::S5_SLP_TYP;

use super::{
    AcpiLayout, VirtioMmioSlot, VmGenIdConfig, COM1_GSI, I8042_GSI, OEM_ID, OEM_REVISION,
    OEM_TABLE_ID, VIRTIO_MMIO_WINDOW,
};

/// DSDT revision 2 and up means 64-bit AML integers.
const DSDT_REVISION: u8 = 6;
/// ACPI notification value meaning "device-specific change"; Linux's vmgenid driver reacts to it.
const NOTIFY_DEVICE_CHECK_VALUE: u8 = 0x80;
/// Name of the VMGenID device, which the GED's _EVT notifies.
const VMGENID_PATH: &str = "\\_SB_.VGEN";

/// An edge-triggered, active-high, exclusive interrupt the device consumes.
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// The complete DSDT (header included) for `layout`; the layout is already validated.
pub(super) fn build(layout: &AcpiLayout) -> Vec<u8> {
    let mut aml = Vec::new();
    let com1 = com1();
    let ps2 = ps2();
    let virtio: Vec<VirtioDevice> = layout
        .virtio_mmio
        .iter()
        .enumerate()
        .map(|(uid, slot)| VirtioDevice { uid, slot: *slot })
        .collect();
    let vmgenid = layout.vmgenid.map(VmGenId);
    let mut children: Vec<&dyn Aml> = vec![&com1, &ps2];
    children.extend(virtio.iter().map(|d| d as &dyn Aml));
    if let Some(v) = &vmgenid {
        children.push(v);
    }
    Scope::new(Path::new("\\_SB_"), children).to_aml_bytes(&mut aml);
    // \_S5_: {SLP_TYPa, SLP_TYPb}. A hardware-reduced OS writes SLP_TYPa to the FADT's sleep
    // control register; Linux offers ACPI power-off only when this object exists.
    Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP]),
    )
    .to_aml_bytes(&mut aml);

    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}

/// COM1: the 8250 at 0x3f8, IRQ 4.
fn com1() -> impl Aml {
    AmlBytes::of(&Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0501")),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &IO::new(0x3f8, 0x3f8, 1, 8),
                    &edge_interrupt(COM1_GSI),
                ]),
            ),
        ],
    ))
}

/// The PS/2 (i8042) controller: data port 0x60, command port 0x64, IRQ 1.
fn ps2() -> impl Aml {
    AmlBytes::of(&Device::new(
        Path::new("PS2K"),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new("PNP0303")),
            &Name::new(
                Path::new("_CRS"),
                &ResourceTemplate::new(vec![
                    &IO::new(0x60, 0x60, 1, 1),
                    &IO::new(0x64, 0x64, 1, 1),
                    &edge_interrupt(I8042_GSI),
                ]),
            ),
        ],
    ))
}

/// One virtio-mmio slot, named `VRxx` (xx = the slot index in hex).
struct VirtioDevice {
    uid: usize,
    slot: VirtioMmioSlot,
}

impl Aml for VirtioDevice {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        // validate() keeps bases below 4 GiB and the index below 256.
        let base = self.slot.base as u32;
        let uid = self.uid as u32;
        Device::new(
            Path::new(&format!("VR{:02X}", self.uid)),
            vec![
                &Name::new(Path::new("_HID"), &"LNRO0005"),
                &Name::new(Path::new("_UID"), &uid),
                // Cache-coherent DMA: the device reads guest memory directly.
                &Name::new(Path::new("_CCA"), &1u8),
                &Name::new(
                    Path::new("_CRS"),
                    &ResourceTemplate::new(vec![
                        &Memory32Fixed::new(true, base, VIRTIO_MMIO_WINDOW),
                        &edge_interrupt(self.slot.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// VMGenID (the 16-byte id's address in an `ADDR` package, as Microsoft's spec and Linux's
/// vmgenid driver expect) plus the Generic Event Device whose interrupt makes the guest re-read it.
struct VmGenId(VmGenIdConfig);

impl Aml for VmGenId {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        let addr_low = (self.0.addr & 0xffff_ffff) as u32;
        let addr_high = (self.0.addr >> 32) as u32;
        Device::new(
            Path::new("VGEN"),
            vec![
                &Name::new(Path::new("_HID"), &"VMGENCTR"),
                &Name::new(Path::new("_CID"), &"VM_Gen_Counter"),
                &Name::new(Path::new("_DDN"), &"VM_Gen_Counter"),
                &Name::new(
                    Path::new("ADDR"),
                    &Package::new(vec![&addr_low, &addr_high]),
                ),
            ],
        )
        .to_aml_bytes(sink);

        let gsi = self.0.gsi;
        let vmgenid_path = Path::new(VMGENID_PATH);
        let notify_vmgenid = Notify::new(&vmgenid_path, &NOTIFY_DEVICE_CHECK_VALUE);
        let is_our_line = Equal::new(&Arg(0), &gsi);
        Device::new(
            Path::new("GED0"),
            vec![
                &Name::new(Path::new("_HID"), &"ACPI0013"),
                &Name::new(Path::new("_UID"), &0u8),
                &Name::new(
                    Path::new("_CRS"),
                    &ResourceTemplate::new(vec![&edge_interrupt(gsi)]),
                ),
                // Linux's GED driver calls _EVT with the GSI that fired.
                &Method::new(
                    Path::new("_EVT"),
                    1,
                    true,
                    vec![&If::new(&is_our_line, vec![&notify_vmgenid])],
                ),
            ],
        )
        .to_aml_bytes(sink);
    }
}

/// Pre-serialized AML, so helpers can return a device without borrowing temporaries.
struct AmlBytes(Vec<u8>);

impl AmlBytes {
    fn of(aml: &dyn Aml) -> Self {
        let mut bytes = Vec::new();
        aml.to_aml_bytes(&mut bytes);
        AmlBytes(bytes)
    }
}

impl Aml for AmlBytes {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}
