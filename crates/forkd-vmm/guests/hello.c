/* hello: prints a greeting with facts from the zero page, then exits with code 0. */
#include "lib/forkd_guest.h"

int main(void *boot_params) {
    const uint8_t *zp = boot_params;
    uint32_t cmdline_ptr;
    memcpy(&cmdline_ptr, zp + 0x228, 4);
    serial_puts("Hello from forkd guest!\n");
    serial_printf("e820 entries: %u\n", zp[0x1e8]);
    serial_printf("cmdline: %s\n", (const char *)(uint64_t)cmdline_ptr);
    serial_printf("cpus in MP table: %d\n", mp_cpu_count());
    return 0;
}
