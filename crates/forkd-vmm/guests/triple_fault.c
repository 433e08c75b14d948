/* triple_fault: loads an empty IDT (limit 0) and executes ud2. The #UD cannot be delivered
 * (the IDT has no gate for it: #GP), nor can the #GP (#DF), nor the #DF: the CPU shuts down,
 * which KVM reports as KVM_EXIT_SHUTDOWN. Prints the address of the ud2 first so the host can
 * compare it with the RIP the VMM reports. */
#include "lib/forkd_guest.h"

extern const char triple_fault_ud2[];

static const struct __attribute__((packed)) {
    uint16_t limit;
    uint64_t base;
} empty_idt = {0, 0};

int main(void *boot_params) {
    (void)boot_params;
    serial_printf("triple_fault: ud2 at %lx\n", (uint64_t)triple_fault_ud2);
    __asm__ volatile("lidt %0\n"
                     ".globl triple_fault_ud2\n"
                     "triple_fault_ud2: ud2" ::"m"(empty_idt));
    return 0;
}
