/* exit_code: exits with the number given as `exit=<n>` on the command line (default 7). */
#include "lib/forkd_guest.h"

static const char *find(const char *hay, const char *needle) {
    size_t n = strlen(needle);
    for (; *hay; hay++)
        if (memcmp(hay, needle, n) == 0) return hay + n;
    return 0;
}

int main(void *boot_params) {
    uint32_t cmdline_ptr;
    memcpy(&cmdline_ptr, (const uint8_t *)boot_params + 0x228, 4);
    const char *v = find((const char *)(uint64_t)cmdline_ptr, "exit=");
    int code = 7;
    if (v) {
        code = 0;
        while (*v >= '0' && *v <= '9') code = code * 10 + (*v++ - '0');
    }
    serial_printf("exiting with %d\n", code);
    return code;
}
