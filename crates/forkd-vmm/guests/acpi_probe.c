/*
 * acpi_probe: finds the machine through ACPI the way a kernel does, from the zero page's
 * acpi_rsdp_addr (boot_params offset 0x70): validates the RSDP (both checksums), the XSDT and
 * every table it lists plus the DSDT the FADT points at, counts the local APICs in the MADT,
 * and reads from the DSDT's AML each virtio-mmio device (LNRO0005: window base and GSI), the
 * VMGenID id's address (VMGENCTR's ADDR package) and the Generic Event Device's GSI
 * (ACPI0013). Prints all of it and the 16-byte VMGenID id over serial.
 *
 * With `wait` on the command line it then routes the GED's GSI through the IOAPIC to a vector
 * and idles in HLT; every interrupt prints the id again (`acpi_probe: notified <n> id <hex>`),
 * which is how a restored child shows that its new VMGenID was announced. Without `wait` it
 * exits 0 once everything checked out.
 */
#include "lib/acpi.h"

#define IOAPIC_BASE 0xfec00000UL
#define GED_VECTOR 0x41
#define MAX_VIRTIO 32

/* The GSI of the first Extended Interrupt descriptor (0x89) in [p, end), or -1. */
static int64_t ext_irq_gsi(const uint8_t *p, const uint8_t *end) {
    static const uint8_t tag[] = {0x89, 0x06, 0x00};
    const uint8_t *d = find(p, end, tag, sizeof(tag));
    if (!d || d + 9 > end || d[4] != 1) return -1;
    return rd32(d + 5);
}

static void print_hex(const uint8_t *p, int n) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < n; i++) {
        serial_putc(digits[p[i] >> 4]);
        serial_putc(digits[p[i] & 15]);
    }
}

static const uint8_t *vmgenid_ptr;
static volatile uint32_t ged_events, stray_events;

__attribute__((interrupt)) static void ged_isr(struct interrupt_frame *frame) {
    (void)frame;
    ged_events++;
    lapic_eoi();
}

__attribute__((interrupt)) static void stray_isr(struct interrupt_frame *frame) {
    (void)frame;
    stray_events++;
    lapic_eoi();
}

static void ioapic_write(uint32_t reg, uint32_t value) {
    mmio_write32(IOAPIC_BASE, reg);
    mmio_write32(IOAPIC_BASE + 0x10, value);
}

/* Routes `gsi` (edge, active high, as the DSDT declares it) to GED_VECTOR on this CPU and
 * idles; never returns. */
__attribute__((noreturn)) static void wait_for_notifications(uint32_t gsi) {
    pic_mask_all();
    idt_init(stray_isr);
    idt_set_gate(GED_VECTOR, ged_isr);
    lapic_enable();
    ioapic_write(0x11 + 2 * gsi, this_apic_id() << 24);
    ioapic_write(0x10 + 2 * gsi, GED_VECTOR);
    serial_puts("acpi_probe: waiting id ");
    print_hex(vmgenid_ptr, 16);
    serial_puts("\n");
    uint32_t seen = 0;
    for (;;) {
        /* sti's one-instruction shadow makes "sti; hlt" race-free. */
        __asm__ volatile("sti; hlt; cli" ::: "memory");
        if (ged_events != seen) {
            seen = ged_events;
            serial_printf("acpi_probe: notified %u id ", seen);
            print_hex(vmgenid_ptr, 16);
            serial_puts("\n");
        }
    }
}

static void print_sig(const char *what, const uint8_t *t, uint64_t addr, uint32_t len) {
    serial_printf("acpi_probe: %s %c%c%c%c at %lx len %u checksum ok\n", what, t[0], t[1], t[2], t[3],
                  addr, len);
}

int main(void *boot_params) {
    const uint8_t *zp = boot_params;
    uint64_t rsdp_addr = rd64(zp + BOOT_PARAMS_ACPI_RSDP_ADDR);
    const char *cmdline = boot_cmdline(boot_params);
    if (rsdp_addr == 0) {
        serial_puts("acpi_probe: FAILED acpi_rsdp_addr is 0\n");
        return 10;
    }
    const uint8_t *rsdp = (const uint8_t *)rsdp_addr;
    if (memcmp(rsdp, "RSD PTR ", 8) != 0 || rsdp[15] < 2) {
        serial_puts("acpi_probe: FAILED no ACPI 2.0 RSDP at acpi_rsdp_addr\n");
        return 11;
    }
    if (!checksum_ok(rsdp, 20) || !checksum_ok(rsdp, rd32(rsdp + 20))) {
        serial_puts("acpi_probe: FAILED RSDP checksum\n");
        return 12;
    }
    serial_printf("acpi_probe: RSDP at %lx revision %u checksums ok\n", rsdp_addr, rsdp[15]);

    uint64_t xsdt_addr = rd64(rsdp + 24);
    const uint8_t *xsdt = (const uint8_t *)xsdt_addr;
    uint32_t xsdt_len = rd32(xsdt + 4);
    if (memcmp(xsdt, "XSDT", 4) != 0 || xsdt_len < 36 || !checksum_ok(xsdt, xsdt_len)) {
        serial_puts("acpi_probe: FAILED XSDT signature or checksum\n");
        return 13;
    }
    print_sig("table", xsdt, xsdt_addr, xsdt_len);

    uint64_t dsdt_addr = 0;
    uint32_t lapics = 0;
    for (uint32_t off = 36; off + 8 <= xsdt_len; off += 8) {
        uint64_t addr = rd64(xsdt + off);
        const uint8_t *t = (const uint8_t *)addr;
        uint32_t len = rd32(t + 4);
        if (len < 36 || !checksum_ok(t, len)) {
            serial_printf("acpi_probe: FAILED table at %lx: bad length or checksum\n", addr);
            return 14;
        }
        print_sig("table", t, addr, len);
        if (memcmp(t, "FACP", 4) == 0) {
            dsdt_addr = fadt_dsdt_addr(t);
        } else if (memcmp(t, "APIC", 4) == 0) {
            for (uint32_t e = 44; e + 2 <= len && t[e + 1] >= 2; e += t[e + 1])
                if (t[e] == 0 && (rd32(t + e + 4) & 1)) lapics++;
        }
    }
    serial_printf("acpi_probe: MADT local APICs %u\n", lapics);
    if (!dsdt_addr) {
        serial_puts("acpi_probe: FAILED no FADT with a DSDT\n");
        return 15;
    }
    const uint8_t *dsdt = (const uint8_t *)dsdt_addr;
    uint32_t dsdt_len = rd32(dsdt + 4);
    if (memcmp(dsdt, "DSDT", 4) != 0 || dsdt_len < 36 || !checksum_ok(dsdt, dsdt_len)) {
        serial_puts("acpi_probe: FAILED DSDT signature or checksum\n");
        return 16;
    }
    print_sig("table", dsdt, dsdt_addr, dsdt_len);
    const uint8_t *end = dsdt + dsdt_len;

    /* Each virtio device: _HID "LNRO0005", then its _CRS with Memory32Fixed (0x86) and an
     * Extended Interrupt (0x89). */
    int virtio = 0;
    for (const uint8_t *p = find(dsdt + 36, end, "LNRO0005", 8); p; p = find(p + 8, end, "LNRO0005", 8)) {
        static const uint8_t mem32[] = {0x86, 0x09, 0x00};
        const uint8_t *next = find(p + 8, end, "LNRO0005", 8);
        const uint8_t *dev_end = next ? next : end;
        const uint8_t *m = find(p, dev_end, mem32, sizeof(mem32));
        int64_t gsi = ext_irq_gsi(p, dev_end);
        if (!m || gsi < 0) {
            serial_puts("acpi_probe: FAILED virtio device without a window or interrupt\n");
            return 17;
        }
        serial_printf("acpi_probe: virtio-mmio %d base %x size %x gsi %u\n", virtio, rd32(m + 4),
                      rd32(m + 8), (uint32_t)gsi);
        virtio++;
    }
    serial_printf("acpi_probe: LNRO0005 devices %d\n", virtio);

    /* VMGenID: Name (ADDR, Package (2) {low, high}) after _HID "VMGENCTR". */
    const uint8_t *vg = find(dsdt + 36, end, "VMGENCTR", 8);
    const uint8_t *pkg = vg ? find(vg, end, "ADDR\x12", 5) : 0;
    const uint8_t *ged = find(dsdt + 36, end, "ACPI0013", 8);
    if (!pkg || !ged) {
        serial_puts("acpi_probe: FAILED no VMGenID device or no GED in the DSDT\n");
        return 18;
    }
    const uint8_t *q = pkg + 5;
    aml_skip_pkglength(&q);
    uint64_t lo, hi;
    if (*q++ != 2 || aml_integer(&q, &lo) || aml_integer(&q, &hi)) {
        serial_puts("acpi_probe: FAILED VMGenID ADDR is not a package of two integers\n");
        return 19;
    }
    int64_t ged_gsi = ext_irq_gsi(ged, end);
    if (ged_gsi < 0 || ged_gsi >= 24) {
        serial_puts("acpi_probe: FAILED GED without a usable interrupt\n");
        return 20;
    }
    vmgenid_ptr = (const uint8_t *)(lo | hi << 32);
    serial_printf("acpi_probe: vmgenid addr %lx ged gsi %u id ", (uint64_t)vmgenid_ptr, (uint32_t)ged_gsi);
    print_hex(vmgenid_ptr, 16);
    serial_puts("\n");

    if (cmdline_has_arg(cmdline, "wait")) wait_for_notifications((uint32_t)ged_gsi);
    serial_puts("acpi_probe: ok\n");
    return 0;
}
