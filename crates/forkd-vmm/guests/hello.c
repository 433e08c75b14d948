/* hello: prints a greeting with facts from the zero page (e820 map, command line, the initrd
 * the VMM loaded, with a hash of its bytes) and the MP table, then exits with code 0. */
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
    uint32_t initrd_addr, initrd_size;
    memcpy(&initrd_addr, zp + 0x218, 4);
    memcpy(&initrd_size, zp + 0x21c, 4);
    if (initrd_size) {
        /* FNV-1a over the initrd as the guest sees it. */
        const uint8_t *p = (const uint8_t *)(uint64_t)initrd_addr;
        uint32_t h = 2166136261u;
        for (uint32_t i = 0; i < initrd_size; i++) h = (h ^ p[i]) * 16777619u;
        serial_printf("initrd: at %x size %u fnv1a %x\n", initrd_addr, initrd_size, h);
    }
    return 0;
}
