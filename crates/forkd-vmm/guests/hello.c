/* hello: prints a greeting with facts from the zero page (e820 map, command line) and the MP
 * table, then exits with code 0. */
#include "lib/forkd_guest.h"

int main(void *boot_params) {
    const uint8_t *zp = boot_params;
    uint32_t cmdline_ptr;
    memcpy(&cmdline_ptr, zp + 0x228, 4);
    serial_puts("Hello from forkd guest!\n");
    serial_printf("e820 entries: %u\n", zp[0x1e8]);
    for (unsigned i = 0; i < zp[0x1e8]; i++) {
        const uint8_t *e = zp + 0x2d0 + 20 * i;
        uint64_t addr, size;
        uint32_t type;
        memcpy(&addr, e, 8);
        memcpy(&size, e + 8, 8);
        memcpy(&type, e + 16, 4);
        serial_printf("e820: %lx-%lx type %u\n", addr, addr + size, type);
    }
    serial_printf("cmdline: %s\n", (const char *)(uint64_t)cmdline_ptr);
    serial_printf("cpus in MP table: %d\n", mp_cpu_count());
    return 0;
}
