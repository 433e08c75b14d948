/*
 * Reading ACPI tables and AML the way a kernel finds them: unaligned little-endian loads, table
 * checksums, a byte search, AML integers and package lengths, and the walk from the zero page's
 * acpi_rsdp_addr through the XSDT to a table; plus the command line's words. Header-only (static inline): guests that do not
 * include it carry none of it.
 */
#ifndef FORKD_GUEST_ACPI_H
#define FORKD_GUEST_ACPI_H

#include "forkd_guest.h"

/* Zero page (boot_params) offsets. */
#define BOOT_PARAMS_ACPI_RSDP_ADDR 0x70
#define BOOT_PARAMS_CMD_LINE_PTR 0x228

static inline uint64_t rd64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t rd32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline int checksum_ok(const uint8_t *p, uint32_t len) {
    uint8_t sum = 0;
    for (uint32_t i = 0; i < len; i++) sum += p[i];
    return sum == 0;
}

/* First occurrence of `needle` (n bytes) in [p, end), or 0. */
static inline const uint8_t *find(const uint8_t *p, const uint8_t *end, const void *needle, size_t n) {
    for (; p + n <= end; p++)
        if (memcmp(p, needle, n) == 0) return p;
    return 0;
}

/* An AML integer (ZeroOp, OneOp, OnesOp, Byte/Word/DWord/QWordConst) at *pp; advances *pp. */
static inline int aml_integer(const uint8_t **pp, uint64_t *out) {
    const uint8_t *p = *pp;
    switch (p[0]) {
    case 0x00: *out = 0; *pp = p + 1; return 0;
    case 0x01: *out = 1; *pp = p + 1; return 0;
    case 0xff: *out = ~0UL; *pp = p + 1; return 0;
    case 0x0a: *out = p[1]; *pp = p + 2; return 0;
    case 0x0b: *out = (uint64_t)p[1] | (uint64_t)p[2] << 8; *pp = p + 3; return 0;
    case 0x0c: *out = rd32(p + 1); *pp = p + 5; return 0;
    case 0x0e: *out = rd64(p + 1); *pp = p + 9; return 0;
    default: return -1;
    }
}

/* Skips an AML PkgLength at *pp. */
static inline void aml_skip_pkglength(const uint8_t **pp) {
    *pp += 1 + (**pp >> 6);
}

/* The kernel command line from the zero page. */
static inline const char *boot_cmdline(const void *boot_params) {
    return (const char *)(uint64_t)rd32((const uint8_t *)boot_params + BOOT_PARAMS_CMD_LINE_PTR);
}

/* Whether `arg` is one of the space-separated words of `cmdline`. */
static inline int cmdline_has_arg(const char *cmdline, const char *arg) {
    size_t n = strlen(arg);
    for (const char *p = cmdline; *p; p++)
        if ((p == cmdline || p[-1] == ' ') && memcmp(p, arg, n) == 0 && (p[n] == ' ' || !p[n]))
            return 1;
    return 0;
}

/* The table with signature `sig` listed in the XSDT (checksum verified), or 0 when there is no
 * ACPI 2.0 RSDP, no valid XSDT, or no such table. */
static inline const uint8_t *acpi_table(const void *boot_params, const char *sig) {
    const uint8_t *rsdp = (const uint8_t *)rd64((const uint8_t *)boot_params + BOOT_PARAMS_ACPI_RSDP_ADDR);
    if (!rsdp || memcmp(rsdp, "RSD PTR ", 8) != 0 || rsdp[15] < 2 || !checksum_ok(rsdp, rd32(rsdp + 20)))
        return 0;
    const uint8_t *xsdt = (const uint8_t *)rd64(rsdp + 24);
    uint32_t xsdt_len = rd32(xsdt + 4);
    if (memcmp(xsdt, "XSDT", 4) != 0 || xsdt_len < 36 || !checksum_ok(xsdt, xsdt_len)) return 0;
    for (uint32_t off = 36; off + 8 <= xsdt_len; off += 8) {
        const uint8_t *t = (const uint8_t *)rd64(xsdt + off);
        if (memcmp(t, sig, 4) == 0 && rd32(t + 4) >= 36 && checksum_ok(t, rd32(t + 4))) return t;
    }
    return 0;
}

/* The DSDT a FADT points at: X_DSDT (offset 140) when the FADT is long enough and sets it, else
 * DSDT (offset 40). */
static inline uint64_t fadt_dsdt_addr(const uint8_t *fadt) {
    uint32_t len = rd32(fadt + 4);
    return len >= 148 && rd64(fadt + 140) ? rd64(fadt + 140) : rd32(fadt + 40);
}

#endif
