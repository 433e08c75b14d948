//! ACPI tables for Linux guests: RSDP, XSDT, FADT (hardware-reduced, with the sleep control,
//! sleep status and reset registers of [`crate::devices::legacy::acpi_pm`]), MADT and a DSDT
//! that describes COM1, the PS/2 controller, every virtio-mmio slot, VMGenID and the S5 (soft
//! off) sleep state.
//!
//! Debian's stock kernels build virtio as modules and lack `virtio_mmio.device=` command-line
//! support, so ACPI is how they find our devices. Everything here is a pure function of an
//! [`AcpiLayout`]: [`build_tables`] returns the bytes to copy into guest memory and the RSDP
//! address for `boot_params.acpi_rsdp_addr`; the VMM does the writing.

mod dsdt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use crate::arch::x86_64::layout::ACPI_PM_PORT_BASE;
use crate::devices::legacy::acpi_pm::{
    RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};

/// OEM id written into every table (6 bytes, as the spec requires).
pub const OEM_ID: [u8; 6] = *b"FORKD ";
/// OEM table id written into every table (8 bytes).
pub const OEM_TABLE_ID: [u8; 8] = *b"FORKDVM ";
pub(crate) const OEM_REVISION: u32 = 1;

/// Default placement, inside the low area the e820 map reserves ([0x9fc00, 0x100000)). The MP
/// table starts at 0x9fc00 and grows with the vCPU count (about 5.3 KiB for 254 vCPUs, ending
/// below 0xa1100), so VMGenID and the tables start above it.
pub const DEFAULT_VMGENID_ADDR: u64 = 0xa_2000;
pub const DEFAULT_TABLES_START: u64 = 0xa_3000;
pub const DEFAULT_TABLES_END: u64 = 0xe_0000;
/// Where the RSDP goes: the start of the BIOS area Linux would also scan.
pub const DEFAULT_RSDP_ADDR: u64 = 0xe_0000;
/// The IOAPIC and local APIC MMIO bases every x86 VM uses.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Pins on the (single) KVM IOAPIC: GSIs 0..24.
pub const IOAPIC_PINS: u32 = 24;
/// Size of one virtio-mmio register window.
pub const VIRTIO_MMIO_WINDOW: u32 = 0x1000;
/// Size of the VMGenID generation id.
pub const VMGENID_LEN: usize = 16;
/// Legacy lines the DSDT gives the PS/2 controller and COM1.
pub const I8042_GSI: u32 = 1;
pub const COM1_GSI: u32 = 4;
/// Largest vCPU count: APIC ids are one byte and 0xff is the broadcast id.
pub const MAX_VCPUS: u32 = 254;
/// Bound on virtio-mmio slots: device names are `VRxx` with two hex digits.
pub const MAX_VIRTIO_SLOTS: usize = 256;

/// One virtio-mmio device window and its interrupt line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioSlot {
    /// Guest physical base of the 4 KiB register window; must lie below 4 GiB.
    pub base: u64,
    /// IOAPIC pin (GSI) the device raises, edge-triggered, active-high.
    pub gsi: u32,
}

/// Where the VMGenID generation id lives and which line notifies the guest of a new one.
/// Saved in a snapshot's vmstate.json: the guest's DSDT (in its memory) names both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmGenIdConfig {
    /// Guest physical address of the 16-byte id (8-byte aligned, outside the tables).
    pub addr: u64,
    /// GSI of the Generic Event Device that the VMM raises after writing a new id.
    pub gsi: u32,
}

/// Everything the tables describe, and where in guest memory they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiLayout {
    /// Number of vCPUs (APIC ids 0..vcpus).
    pub vcpus: u32,
    /// Virtio-mmio slots in the order they get `_UID` 0, 1, ...
    pub virtio_mmio: Vec<VirtioMmioSlot>,
    /// VMGenID, if the VM has one.
    pub vmgenid: Option<VmGenIdConfig>,
    /// Guest physical range [start, end) the DSDT, FADT, MADT and XSDT are packed into.
    pub tables_start: u64,
    pub tables_end: u64,
    /// Guest physical address of the RSDP (16-byte aligned, outside the tables range).
    pub rsdp_addr: u64,
}

impl AcpiLayout {
    /// A layout at the default addresses for `vcpus` vCPUs and no devices.
    pub fn new(vcpus: u32) -> Self {
        AcpiLayout {
            vcpus,
            virtio_mmio: Vec::new(),
            vmgenid: None,
            tables_start: DEFAULT_TABLES_START,
            tables_end: DEFAULT_TABLES_END,
            rsdp_addr: DEFAULT_RSDP_ADDR,
        }
    }
}

/// One table's bytes and the guest physical address to copy them to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePiece {
    /// The table's signature ("RSD PTR " is shortened to "RSDP").
    pub signature: [u8; 4],
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// The built tables: write every piece into guest memory, then put `rsdp_addr` into
/// `boot_params.acpi_rsdp_addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    pub pieces: Vec<TablePiece>,
    pub rsdp_addr: u64,
}

impl AcpiTables {
    /// The piece with this signature (e.g. `b"DSDT"`), if present.
    pub fn piece(&self, signature: &[u8; 4]) -> Option<&TablePiece> {
        self.pieces.iter().find(|p| &p.signature == signature)
    }
}

/// Why a layout cannot be turned into tables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("vCPU count {0} is out of range (1..={MAX_VCPUS})")]
    VcpuCount(u32),
    #[error("{count} virtio-mmio slots is more than the {MAX_VIRTIO_SLOTS} the DSDT can name")]
    TooManySlots { count: usize },
    #[error("virtio-mmio slot {index}: base {base:#x} is not a 4 KiB-aligned address below 4 GiB")]
    SlotBase { index: usize, base: u64 },
    #[error("{what}: GSI {gsi} is not an IOAPIC pin (0..{IOAPIC_PINS})")]
    GsiOutOfRange { what: String, gsi: u32 },
    #[error("{what}: GSI {gsi} is already used by {other}")]
    GsiInUse {
        what: String,
        gsi: u32,
        other: String,
    },
    #[error("virtio-mmio slots {a} and {b} overlap (base {base:#x})")]
    SlotOverlap { a: usize, b: usize, base: u64 },
    #[error("tables range [{start:#x}, {end:#x}) is empty or not 8-byte aligned")]
    TablesRange { start: u64, end: u64 },
    #[error("the tables need {needed} bytes but [{start:#x}, {end:#x}) holds only {available}")]
    TablesDoNotFit {
        needed: u64,
        available: u64,
        start: u64,
        end: u64,
    },
    #[error("RSDP address {0:#x} is not 16-byte aligned or not below 4 GiB")]
    RsdpAddr(u64),
    #[error("RSDP at {0:#x} overlaps the tables range")]
    RsdpOverlap(u64),
    #[error("VMGenID address {0:#x} is not 8-byte aligned or not below 4 GiB")]
    VmGenIdAddr(u64),
    #[error("VMGenID id at {0:#x} overlaps the ACPI tables or the RSDP")]
    VmGenIdOverlap(u64),
    #[error("cannot read random bytes for a VMGenID: {0}")]
    Random(String),
}

/// Builds every table for `layout`. Pure: the same layout always yields the same bytes.
pub fn build_tables(layout: &AcpiLayout) -> Result<AcpiTables, AcpiError> {
    validate(layout)?;
    let mut placer = Placer::new(layout.tables_start, layout.tables_end);

    let dsdt = dsdt::build(layout);
    let dsdt_addr = placer.place(dsdt.len())?;

    let fadt = bytes_of(&build_fadt(dsdt_addr));
    let fadt_addr = placer.place(fadt.len())?;

    let madt = bytes_of(&build_madt(layout.vcpus));
    let madt_addr = placer.place(madt.len())?;

    // The XSDT lists FADT and MADT; the DSDT is reached through the FADT.
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes_of(&xsdt);
    let xsdt_addr = placer.place(xsdt.len())?;

    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));

    let pieces = vec![
        TablePiece {
            signature: *b"DSDT",
            addr: dsdt_addr,
            bytes: dsdt,
        },
        TablePiece {
            signature: *b"FACP",
            addr: fadt_addr,
            bytes: fadt,
        },
        TablePiece {
            signature: *b"APIC",
            addr: madt_addr,
            bytes: madt,
        },
        TablePiece {
            signature: *b"XSDT",
            addr: xsdt_addr,
            bytes: xsdt,
        },
        TablePiece {
            signature: *b"RSDP",
            addr: layout.rsdp_addr,
            bytes: rsdp,
        },
    ];
    Ok(AcpiTables {
        pieces,
        rsdp_addr: layout.rsdp_addr,
    })
}

/// A fresh random VMGenID generation id, from the host's getrandom.
pub fn generate_vmgenid() -> Result<[u8; VMGENID_LEN], AcpiError> {
    let mut id = [0u8; VMGENID_LEN];
    getrandom::fill(&mut id).map_err(|e| AcpiError::Random(e.to_string()))?;
    Ok(id)
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// IA-PC boot architecture flags (FADT `iapc_boot_arch`).
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// A byte-wide register at I/O port `port`, as a generic address structure.
fn io_port_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

fn build_fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        // Hardware-reduced: no PM1/GPE blocks, no SCI; events come through the GED.
        .flag(Flags::HwReducedAcpi)
        // No fixed power/sleep buttons.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        // RESET_REG works: Linux's default x86 reboot (ACPI first) needs no `reboot=k`.
        .flag(Flags::ResetRegSup);
    // Sleep control and status registers: how a hardware-reduced OS enters S5 (Linux only
    // registers its ACPI power-off when both are present and the DSDT has \_S5_).
    fadt.sleep_control_reg = io_port_register(ACPI_PM_PORT_BASE + SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = io_port_register(ACPI_PM_PORT_BASE + SLEEP_STATUS_OFFSET);
    fadt.reset_reg = io_port_register(ACPI_PM_PORT_BASE + RESET_OFFSET);
    fadt.reset_value = RESET_VALUE;
    // The i8042 is there (Linux's `reboot=k` resets through it); no VGA, MSI or CMOS RTC, and
    // the OS must not touch PCIe ASPM (there is no PCIe): less probing at boot.
    fadt.iapc_boot_arch = (IAPC_8042
        | IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"FORKDVMM").into();
    fadt.finalize()
}

fn build_madt(vcpus: u32) -> MADT {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    for id in 0..vcpus {
        // validate() bounds vcpus to MAX_VCPUS, so the id fits a byte.
        let id = id as u8;
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    madt
}

/// Packs tables one after another, 16-byte aligned, inside [start, end).
struct Placer {
    next: u64,
    start: u64,
    end: u64,
}

impl Placer {
    fn new(start: u64, end: u64) -> Self {
        Placer {
            next: start,
            start,
            end,
        }
    }

    fn place(&mut self, len: usize) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(16);
        let table_end = addr + len as u64;
        if table_end > self.end {
            return Err(AcpiError::TablesDoNotFit {
                needed: table_end - self.start,
                available: self.end - self.start,
                start: self.start,
                end: self.end,
            });
        }
        self.next = table_end;
        Ok(addr)
    }
}

fn overlaps(a_start: u64, a_len: u64, b_start: u64, b_len: u64) -> bool {
    a_start < b_start.saturating_add(b_len) && b_start < a_start.saturating_add(a_len)
}

fn validate(layout: &AcpiLayout) -> Result<(), AcpiError> {
    if layout.vcpus == 0 || layout.vcpus > MAX_VCPUS {
        return Err(AcpiError::VcpuCount(layout.vcpus));
    }
    if layout.virtio_mmio.len() > MAX_VIRTIO_SLOTS {
        return Err(AcpiError::TooManySlots {
            count: layout.virtio_mmio.len(),
        });
    }
    let (start, end) = (layout.tables_start, layout.tables_end);
    if start >= end || !start.is_multiple_of(8) || end > u64::from(u32::MAX) {
        return Err(AcpiError::TablesRange { start, end });
    }
    let rsdp_len = acpi_tables::rsdp::Rsdp::len() as u64;
    if !layout.rsdp_addr.is_multiple_of(16) || layout.rsdp_addr + rsdp_len > u64::from(u32::MAX) {
        return Err(AcpiError::RsdpAddr(layout.rsdp_addr));
    }
    if overlaps(layout.rsdp_addr, rsdp_len, start, end - start) {
        return Err(AcpiError::RsdpOverlap(layout.rsdp_addr));
    }
    validate_slots(&layout.virtio_mmio)?;
    validate_gsis(layout)?;
    if let Some(vmgenid) = layout.vmgenid {
        let len = VMGENID_LEN as u64;
        if !vmgenid.addr.is_multiple_of(8) || vmgenid.addr + len > u64::from(u32::MAX) {
            return Err(AcpiError::VmGenIdAddr(vmgenid.addr));
        }
        if overlaps(vmgenid.addr, len, start, end - start)
            || overlaps(vmgenid.addr, len, layout.rsdp_addr, rsdp_len)
        {
            return Err(AcpiError::VmGenIdOverlap(vmgenid.addr));
        }
    }
    Ok(())
}

fn validate_slots(slots: &[VirtioMmioSlot]) -> Result<(), AcpiError> {
    let window = u64::from(VIRTIO_MMIO_WINDOW);
    for (index, slot) in slots.iter().enumerate() {
        if !slot.base.is_multiple_of(window) || slot.base + window > 1 << 32 {
            return Err(AcpiError::SlotBase {
                index,
                base: slot.base,
            });
        }
        if let Some(a) = slots[..index].iter().position(|s| s.base == slot.base) {
            return Err(AcpiError::SlotOverlap {
                a,
                b: index,
                base: slot.base,
            });
        }
    }
    Ok(())
}

/// Every line must be an IOAPIC pin and no two devices may share one (all are edge-triggered,
/// which cannot be shared).
fn validate_gsis(layout: &AcpiLayout) -> Result<(), AcpiError> {
    let mut users: Vec<(u32, String)> = vec![
        (I8042_GSI, "the PS/2 controller".to_string()),
        (COM1_GSI, "COM1".to_string()),
    ];
    let mut claims: Vec<(u32, String)> = layout
        .virtio_mmio
        .iter()
        .enumerate()
        .map(|(i, s)| (s.gsi, format!("virtio-mmio slot {i}")))
        .collect();
    if let Some(v) = layout.vmgenid {
        claims.push((v.gsi, "the VMGenID event device".to_string()));
    }
    for (gsi, what) in claims {
        if gsi >= IOAPIC_PINS {
            return Err(AcpiError::GsiOutOfRange { what, gsi });
        }
        if let Some((_, other)) = users.iter().find(|(g, _)| *g == gsi) {
            return Err(AcpiError::GsiInUse {
                what,
                gsi,
                other: other.clone(),
            });
        }
        users.push((gsi, what));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
