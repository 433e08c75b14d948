/* serial_echo: reads one line from the serial port (host input) and echoes it back, then exits. */
#include "lib/forkd_guest.h"

int main(void *boot_params) {
    (void)boot_params;
    char line[128];
    size_t n = 0;
    serial_puts("ready for input\n");
    for (;;) {
        int c = serial_getc_nonblock();
        if (c < 0) {
            cpu_relax();
            continue;
        }
        if (c == '\n' || n == sizeof(line) - 1) break;
        line[n++] = (char)c;
    }
    line[n] = 0;
    serial_printf("echo: %s\n", line);
    return 0;
}
