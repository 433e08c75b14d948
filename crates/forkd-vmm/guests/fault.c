/* fault: executes int3 with no IDT. Hardware KVM reports a triple fault; KVM's emulator on PVM
 * hosts reports an internal error. Either way the VMM must stop with a clear error. */
#include "lib/forkd_guest.h"

int main(void *boot_params) {
    (void)boot_params;
    serial_puts("about to fault\n");
    __asm__ volatile("int3");
    return 0;
}
