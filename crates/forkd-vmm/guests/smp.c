/*
 * smp: brings every CPU of the MP table up with INIT/SIPI; each reports in on the serial port
 * with what CPUID tells it (initial APIC id, x2APIC id from leaf 0xB, hypervisor bit), so the
 * host can check the per-vCPU CPUID normalization.
 */
#include "lib/forkd_guest.h"

static spinlock_t print_lock;
/* APs that have printed their line (updated under print_lock). smp_start_aps counts an AP as
 * arrived when it starts, before it prints, so main waits on this instead. */
static volatile int reported;

static void report(uint32_t apic_id, const char *role) {
    uint32_t a, b, c, d;
    cpuid(0, 0, &a, &b, &c, &d);
    uint32_t max_leaf = a;
    uint32_t x2apic = 0xffffffff;
    if (max_leaf >= 0xb) {
        cpuid(0xb, 0, &a, &b, &c, &d);
        x2apic = d;
    }
    cpuid(1, 0, &a, &b, &c, &d);
    spin_lock(&print_lock);
    serial_printf("cpu %u online%s x2apic %u hypervisor %u\n", apic_id, role, x2apic, c >> 31);
    if (role[0] == '\0') reported = reported + 1;
    spin_unlock(&print_lock);
}

static void ap_main(uint32_t apic_id) { report(apic_id, ""); }

int main(void *boot_params) {
    (void)boot_params;
    int cpus = mp_cpu_count();
    report(this_apic_id(), " (boot cpu)");
    int arrived = smp_start_aps(ap_main);
    /* Let every AP that arrived finish its line (bounded: a stuck AP must not hang the test). */
    for (long i = 0; i < 20000000 && reported < arrived; i++) cpu_relax();
    spin_lock(&print_lock);
    serial_printf("%d cpus in MP table, %d of %d application processors arrived\n", cpus, arrived,
                  cpus - 1);
    if (arrived == cpus - 1) serial_printf("all %d cpus online\n", cpus);
    spin_unlock(&print_lock);
    return arrived == cpus - 1 ? 0 : 3;
}
