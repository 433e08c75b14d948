//! ACPI power management the hardware-reduced way: the FADT's sleep control and sleep status
//! registers and its reset register, three byte-wide I/O ports
//! ([`ACPI_PM_PORT_BASE`](crate::arch::x86_64::layout::ACPI_PM_PORT_BASE) + 0, 1, 2).
//!
//! A hardware-reduced platform has no PM1 control block, so an OS enters a sleep state by
//! writing `SLP_EN | SLP_TYP << 2` to the sleep control register (ACPI 6.x, "Sleep Control and
//! Status Registers"), SLP_TYP being the first value of the DSDT's `\_Sx_` package. Linux's
//! `poweroff` does this for S5 (`acpi_power_off` → `acpi_hw_extended_sleep`), and its default
//! x86 `reboot` writes the FADT's reset value to the reset register. This device turns the
//! first into [`StopReason::PowerOff`] and the second into [`StopReason::Reset`]. It only
//! offers S5 (the DSDT has no other `\_Sx_`); a request for any other state is ignored, and
//! the status register always reads WAK_STS set, so an OS waiting for the wake-up after an
//! ignored request carries on at once. Nothing here is state a snapshot needs.

use std::sync::Arc;

use crate::devices::BusDevice;
use crate::vstate::control::{StopReason, VmControl};

/// Offsets of the registers inside the device's port range.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
pub const SLEEP_STATUS_OFFSET: u64 = 1;
pub const RESET_OFFSET: u64 = 2;
/// Ports the device covers.
pub const PORT_COUNT: u64 = 3;

/// Sleep control register: SLP_EN starts the transition into the state in SLP_TYP.
pub const SLP_EN: u8 = 1 << 5;
pub const SLP_TYP_SHIFT: u8 = 2;
pub const SLP_TYP_MASK: u8 = 0b111 << SLP_TYP_SHIFT;
/// Sleep status register: the platform has woken up.
pub const WAK_STS: u8 = 1 << 7;
/// The SLP_TYP value of S5 (soft off), as the DSDT's `\_S5_` package gives it.
pub const S5_SLP_TYP: u8 = 5;
/// What the guest writes to the sleep control register to power off.
pub const S5_SLEEP_CONTROL: u8 = SLP_EN | (S5_SLP_TYP << SLP_TYP_SHIFT);
/// The FADT's RESET_VALUE: written to the reset register, it resets the machine. The same
/// byte as the i8042's reset command.
pub const RESET_VALUE: u8 = 0xfe;

/// The sleep control, sleep status and reset registers.
pub struct AcpiPm(Arc<VmControl>);

impl AcpiPm {
    pub fn new(control: Arc<VmControl>) -> AcpiPm {
        AcpiPm(control)
    }

    fn sleep_control(&self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let slp_typ = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
        if slp_typ == S5_SLP_TYP {
            self.0.request_stop(StopReason::PowerOff);
        } else {
            tracing::debug!(
                slp_typ,
                "guest asked for a sleep state other than S5: ignored"
            );
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (SLEEP_STATUS_OFFSET, Some(first)) = (offset, data.first_mut()) {
            *first = WAK_STS;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET => self.sleep_control(value),
            // Write-1-to-clear WAK_STS: there is nothing to clear.
            SLEEP_STATUS_OFFSET => {}
            RESET_OFFSET if value == RESET_VALUE => self.0.request_stop(StopReason::Reset),
            _ => tracing::debug!(offset, value, "ACPI PM write ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (Arc<VmControl>, AcpiPm) {
        let control = Arc::new(VmControl::new(1).unwrap());
        (control.clone(), AcpiPm::new(control))
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        assert_eq!(S5_SLEEP_CONTROL, 0x34);
        let (control, mut dev) = device();
        dev.write(SLEEP_CONTROL_OFFSET, &[S5_SLEEP_CONTROL]);
        assert_eq!(control.stop_reason(), Some(StopReason::PowerOff));
    }

    #[test]
    fn the_reset_value_resets() {
        let (control, mut dev) = device();
        dev.write(RESET_OFFSET, &[RESET_VALUE]);
        assert_eq!(control.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn other_sleep_states_and_values_are_ignored() {
        let (control, mut dev) = device();
        // S5's type without SLP_EN; S0..S4 with it; SLP_EN alone (S0).
        dev.write(SLEEP_CONTROL_OFFSET, &[S5_SLP_TYP << SLP_TYP_SHIFT]);
        for typ in 0..5u8 {
            dev.write(SLEEP_CONTROL_OFFSET, &[SLP_EN | (typ << SLP_TYP_SHIFT)]);
        }
        // The Linux sequence's first write: clear WAK_STS in the status register.
        dev.write(SLEEP_STATUS_OFFSET, &[WAK_STS]);
        // S5's value anywhere but the control register; the reset register with other values.
        dev.write(SLEEP_STATUS_OFFSET, &[S5_SLEEP_CONTROL]);
        dev.write(RESET_OFFSET, &[S5_SLEEP_CONTROL]);
        for value in [0u8, 1, 6, 0x0e, 0xff] {
            dev.write(RESET_OFFSET, &[value]);
        }
        // The reset value anywhere but the reset register; past the device's ports.
        dev.write(SLEEP_CONTROL_OFFSET, &[RESET_VALUE]); // SLP_EN with SLP_TYP 7
        dev.write(SLEEP_STATUS_OFFSET, &[RESET_VALUE]);
        dev.write(PORT_COUNT, &[RESET_VALUE]);
        dev.write(RESET_OFFSET, &[]);
        assert_eq!(control.stop_reason(), None);
    }

    #[test]
    fn the_status_register_reads_awake() {
        let (_control, mut dev) = device();
        let mut byte = [0u8];
        dev.read(SLEEP_STATUS_OFFSET, &mut byte);
        assert_eq!(byte[0], WAK_STS);
        for offset in [SLEEP_CONTROL_OFFSET, RESET_OFFSET] {
            let mut wide = [0xaau8; 4];
            dev.read(offset, &mut wide);
            assert_eq!(wide, [0; 4], "offset {offset}");
        }
    }
}
