/* reset: prints a line and resets the machine through the i8042, as Linux's reboot=k does. */
#include "lib/forkd_guest.h"

int main(void *boot_params) {
    (void)boot_params;
    serial_puts("resetting via i8042\n");
    guest_reset();
}
