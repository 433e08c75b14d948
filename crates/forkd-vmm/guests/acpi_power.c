/*
 * acpi_power: powers off or resets the machine the way Linux does on a hardware-reduced ACPI
 * platform, using only what the tables say (zero page -> RSDP -> XSDT -> FADT, FADT -> DSDT):
 *
 *   poweroff   SLP_TYP from the DSDT's \_S5_ package; writes WAK_STS to the FADT's sleep status
 *              register, then SLP_EN | SLP_TYP << 2 to its sleep control register
 *              (acpi_hw_extended_sleep);
 *   reboot     writes the FADT's RESET_VALUE to its reset register (acpi_reboot), which the
 *              FADT must flag as supported (RESET_REG_SUP);
 *   s1         first asks for S1, which the VMM does not offer: the request must be ignored and
 *              the status register must read WAK_STS (awake); then powers off as above.
 *
 * The action is a word on the command line. Exits with a non-zero code when the tables lack
 * what is needed or the machine is still running after the write.
 */
#include "lib/acpi.h"

#define FADT_FLAGS 112
#define FADT_RESET_REG 116
#define FADT_RESET_VALUE 128
#define FADT_SLEEP_CONTROL_REG 244
#define FADT_SLEEP_STATUS_REG 256
#define FADT_FLAG_RESET_REG_SUP (1u << 10)
#define FADT_FLAG_HW_REDUCED_ACPI (1u << 20)

#define GAS_SYSTEM_IO 1
#define SLP_EN 0x20
#define SLP_TYP_SHIFT 2
#define WAK_STS 0x80

/* The I/O port of a byte-wide generic address structure in system I/O space, or -1. */
static int32_t io_port_of(const uint8_t *gas) {
    if (gas[0] != GAS_SYSTEM_IO || gas[1] != 8 || rd64(gas + 4) == 0 || rd64(gas + 4) > 0xffff) return -1;
    return (int32_t)rd64(gas + 4);
}

/* SLP_TYPa of \_Sx_ (`name` is e.g. "_S5_"): Name (_S5_, Package (n) {SLP_TYPa, ...}). */
static int sleep_type(const uint8_t *fadt, const char *name, uint64_t *slp_typ) {
    const uint8_t *dsdt = (const uint8_t *)fadt_dsdt_addr(fadt);
    uint32_t len = rd32(dsdt + 4);
    if (memcmp(dsdt, "DSDT", 4) != 0 || !checksum_ok(dsdt, len)) return -1;
    uint8_t needle[6] = {0x08 /* NameOp */, name[0], name[1], name[2], name[3], 0x12 /* PackageOp */};
    const uint8_t *p = find(dsdt + 36, dsdt + len, needle, sizeof(needle));
    if (!p) return -1;
    p += sizeof(needle);
    aml_skip_pkglength(&p);
    if (*p++ < 1) return -1;
    return aml_integer(&p, slp_typ);
}

static int poweroff(const uint8_t *fadt, int32_t control, int32_t status) {
    uint64_t slp_typ;
    if (sleep_type(fadt, "_S5_", &slp_typ) || slp_typ > 7) {
        serial_puts("acpi_power: FAILED no usable \\_S5_ in the DSDT\n");
        return 22;
    }
    serial_printf("acpi_power: S5 SLP_TYP %lu, powering off\n", slp_typ);
    outb((uint16_t)status, WAK_STS);
    outb((uint16_t)control, SLP_EN | (uint8_t)(slp_typ << SLP_TYP_SHIFT));
    serial_puts("acpi_power: FAILED still running after the S5 write\n");
    return 23;
}

int main(void *boot_params) {
    const char *cmdline = boot_cmdline(boot_params);
    const uint8_t *fadt = acpi_table(boot_params, "FACP");
    if (!fadt || rd32(fadt + 4) < 268) {
        serial_puts("acpi_power: FAILED no ACPI 6 FADT\n");
        return 20;
    }
    uint32_t flags = rd32(fadt + FADT_FLAGS);
    int32_t control = io_port_of(fadt + FADT_SLEEP_CONTROL_REG);
    int32_t status = io_port_of(fadt + FADT_SLEEP_STATUS_REG);
    int32_t reset = io_port_of(fadt + FADT_RESET_REG);
    uint8_t reset_value = fadt[FADT_RESET_VALUE];
    serial_printf("acpi_power: hw-reduced %d sleep control io %x status io %x reset io %x value %x supported %d\n",
                  !!(flags & FADT_FLAG_HW_REDUCED_ACPI), control, status, reset, reset_value,
                  !!(flags & FADT_FLAG_RESET_REG_SUP));

    if (cmdline_has_arg(cmdline, "reboot")) {
        if (reset < 0 || !(flags & FADT_FLAG_RESET_REG_SUP)) {
            serial_puts("acpi_power: FAILED no supported I/O reset register\n");
            return 24;
        }
        serial_puts("acpi_power: resetting\n");
        outb((uint16_t)reset, reset_value);
        serial_puts("acpi_power: FAILED still running after the reset write\n");
        return 25;
    }
    if (control < 0 || status < 0) {
        serial_puts("acpi_power: FAILED no I/O sleep control and status registers\n");
        return 21;
    }
    if (cmdline_has_arg(cmdline, "s1")) {
        outb((uint16_t)status, WAK_STS);
        outb((uint16_t)control, SLP_EN | (1 << SLP_TYP_SHIFT));
        uint8_t st = inb((uint16_t)status);
        serial_printf("acpi_power: S1 request ignored, status %x\n", st);
        if (!(st & WAK_STS)) {
            serial_puts("acpi_power: FAILED status register does not read WAK_STS\n");
            return 26;
        }
        return poweroff(fadt, control, status);
    }
    if (cmdline_has_arg(cmdline, "poweroff")) return poweroff(fadt, control, status);
    serial_puts("acpi_power: FAILED no action (poweroff, reboot or s1) on the command line\n");
    return 27;
}
