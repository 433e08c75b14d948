/* smp: brings every CPU of the MP table up with INIT/SIPI; each reports in on the serial port. */
#include "lib/forkd_guest.h"

static spinlock_t print_lock;

static void ap_main(uint32_t apic_id) {
    spin_lock(&print_lock);
    serial_printf("cpu %u online\n", apic_id);
    spin_unlock(&print_lock);
}

int main(void *boot_params) {
    (void)boot_params;
    int cpus = mp_cpu_count();
    spin_lock(&print_lock);
    serial_printf("cpu %u online (boot cpu), %d cpus in MP table\n", this_apic_id(), cpus);
    spin_unlock(&print_lock);
    int arrived = smp_start_aps(ap_main);
    /* Let the last AP finish its line. */
    for (int i = 0; i < 100000 && print_lock.locked; i++) cpu_relax();
    spin_lock(&print_lock);
    serial_printf("%d of %d application processors arrived\n", arrived, cpus - 1);
    if (arrived == cpus - 1) serial_printf("all %d cpus online\n", cpus);
    spin_unlock(&print_lock);
    return arrived == cpus - 1 ? 0 : 3;
}
