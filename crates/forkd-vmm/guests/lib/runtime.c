/* forkd test-guest runtime: see forkd_guest.h. */
#include "forkd_guest.h"

/* ---- libc bits ----
 * String instructions, not byte loops: an emulating KVM (PVM) runs a `rep` instruction as one
 * emulated instruction, where a loop costs several per byte (about a microsecond each). */
void *memset(void *dst, int c, size_t n) {
    void *d = dst;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n) {
    void *d = dst;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, size_t n) {
    if (n == 0) return 0;
    const uint8_t *x = a, *y = b;
    /* repe cmpsb stops after the first difference, each pointer one past it. */
    __asm__ volatile("repe cmpsb" : "+S"(x), "+D"(y), "+c"(n) : : "memory", "cc");
    if (x[-1] == y[-1]) return 0;
    return x[-1] < y[-1] ? -1 : 1;
}

void *memchr(const void *s, int c, size_t n) {
    if (n == 0) return 0;
    const uint8_t *p = s;
    /* repne scasb stops one past the first match. */
    __asm__ volatile("repne scasb" : "+D"(p), "+c"(n) : "a"(c) : "memory", "cc");
    return p[-1] == (uint8_t)c ? (void *)(p - 1) : 0;
}

size_t strlen(const char *s) {
    size_t n = 0;
    while (s[n]) n++;
    return n;
}

/* ---- spinlock ---- */
void spin_lock(spinlock_t *l) {
    while (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE)) cpu_relax();
}

void spin_unlock(spinlock_t *l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

/* ---- serial ---- */
#define LSR_THR_EMPTY 0x20
#define LSR_DATA_READY 0x01

void serial_putc(char c) {
    while (!(inb(SERIAL_PORT + 5) & LSR_THR_EMPTY)) cpu_relax();
    outb(SERIAL_PORT, (uint8_t)c);
}

void serial_write(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) serial_putc(s[i]);
}

void serial_puts(const char *s) { serial_write(s, strlen(s)); }

int serial_getc_nonblock(void) {
    if (!(inb(SERIAL_PORT + 5) & LSR_DATA_READY)) return -1;
    return inb(SERIAL_PORT);
}

static void put_unsigned(uint64_t v, unsigned base) {
    char buf[24];
    int i = 0;
    do {
        unsigned d = (unsigned)(v % base);
        buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    while (i--) serial_putc(buf[i]);
}

void serial_vprintf(const char *fmt, va_list ap) {
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        int is_long = 0;
        while (*fmt == 'l') {
            is_long = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = va_arg(ap, const char *);
            serial_puts(s ? s : "(null)");
            break;
        }
        case 'c': serial_putc((char)va_arg(ap, int)); break;
        case 'd': {
            int64_t v = is_long ? va_arg(ap, int64_t) : va_arg(ap, int);
            if (v < 0) {
                serial_putc('-');
                put_unsigned((uint64_t)(-(v + 1)) + 1, 10);
            } else {
                put_unsigned((uint64_t)v, 10);
            }
            break;
        }
        case 'u': put_unsigned(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 10); break;
        case 'x': put_unsigned(is_long ? va_arg(ap, uint64_t) : va_arg(ap, unsigned), 16); break;
        case 'p':
            serial_puts("0x");
            put_unsigned((uint64_t)va_arg(ap, void *), 16);
            break;
        case '%': serial_putc('%'); break;
        case 0: return;
        default: serial_putc('?'); break;
        }
    }
}

void serial_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    serial_vprintf(fmt, ap);
    va_end(ap);
}

/* ---- stopping ---- */
void guest_exit(uint32_t code) {
    for (;;) {
        outl(GUEST_EXIT_PORT, code);
        __asm__ volatile("cli; hlt");
    }
}

void guest_reset(void) {
    for (;;) {
        outb(I8042_COMMAND_PORT, 0xfe);
        __asm__ volatile("cli; hlt");
    }
}

/* ---- paging: map the 3-4 GiB MMIO hole (LAPIC, IOAPIC, virtio-mmio) uncached ---- */
static uint64_t high_pd[512] __attribute__((aligned(4096)));

static void map_mmio_hole(void) {
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    uint64_t *pml4 = (uint64_t *)(cr3 & ~0xfffUL);
    uint64_t *pdpt = (uint64_t *)(pml4[0] & ~0xfffUL);
    for (uint64_t i = 0; i < 512; i++)
        /* present | writable | PWT | PCD | 2 MiB page */
        high_pd[i] = (0xc0000000UL + (i << 21)) | 0x3 | 0x8 | 0x10 | 0x80;
    pdpt[3] = (uint64_t)high_pd | 0x3;
    __asm__ volatile("mov %0, %%cr3" ::"r"(cr3) : "memory");
}

/* ---- CPUs ---- */
uint32_t this_apic_id(void) {
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    return b >> 24;
}

static const uint8_t *find_mp_floating_pointer(void) {
    /* Where Linux looks: the last KiB of base memory (0x9fc00) and the BIOS area. */
    static const uint64_t ranges[][2] = {{0x9fc00, 0xa0000}, {0xf0000, 0x100000}};
    for (unsigned r = 0; r < 2; r++)
        for (uint64_t p = ranges[r][0]; p < ranges[r][1]; p += 16)
            if (memcmp((const void *)p, "_MP_", 4) == 0) return (const uint8_t *)p;
    return 0;
}

int mp_cpu_count(void) {
    const uint8_t *fp = find_mp_floating_pointer();
    if (!fp) return 0;
    uint32_t table;
    memcpy(&table, fp + 4, 4);
    const uint8_t *cfg = (const uint8_t *)(uint64_t)table;
    if (memcmp(cfg, "PCMP", 4) != 0) return 0;
    uint16_t count;
    memcpy(&count, cfg + 34, 2);
    const uint8_t *e = cfg + 44;
    int cpus = 0;
    for (uint16_t i = 0; i < count; i++) {
        if (e[0] == 0) { /* processor entry, 20 bytes */
            if (e[3] & 1) cpus++;
            e += 20;
        } else {
            e += 8;
        }
    }
    return cpus;
}

extern const uint8_t trampoline_start[], trampoline_end[], trampoline_cr3[];
uint8_t ap_stacks[(MAX_CPUS + 1) * 16384] __attribute__((aligned(16)));
static void (*volatile ap_entry_fn)(uint32_t);
static volatile uint32_t aps_arrived;

#define TRAMPOLINE_BASE 0x10000UL
#define APIC_ICR_LOW (LAPIC_BASE + 0x300)
#define APIC_ICR_HIGH (LAPIC_BASE + 0x310)
#define APIC_SVR (LAPIC_BASE + 0xf0)
#define ICR_INIT 0x00000500
#define ICR_STARTUP 0x00000600
#define ICR_LEVEL_ASSERT 0x00004000
#define ICR_LEVEL_TRIGGER 0x00008000
#define ICR_BUSY 0x00001000

/* Called by the trampoline on each AP with its APIC id, on its own stack. */
void ap_start(uint32_t apic_id) {
    __atomic_fetch_add(&aps_arrived, 1, __ATOMIC_SEQ_CST);
    if (ap_entry_fn) ap_entry_fn(apic_id);
    for (;;) __asm__ volatile("cli; hlt");
}

static void delay(unsigned n) {
    for (volatile unsigned i = 0; i < n; i++) cpu_relax();
}

static void send_ipi(uint32_t apic_id, uint32_t icr) {
    mmio_write32(APIC_ICR_HIGH, apic_id << 24);
    mmio_write32(APIC_ICR_LOW, icr);
    for (int i = 0; i < 1000 && (mmio_read32(APIC_ICR_LOW) & ICR_BUSY); i++) cpu_relax();
}

int smp_start_aps(void (*entry)(uint32_t)) {
    int cpus = mp_cpu_count();
    if (cpus <= 1) return 0;
    if (cpus > MAX_CPUS) cpus = MAX_CPUS;
    ap_entry_fn = entry;
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0" : "=r"(cr3));
    memcpy((void *)TRAMPOLINE_BASE, trampoline_start, (size_t)(trampoline_end - trampoline_start));
    *(volatile uint32_t *)(TRAMPOLINE_BASE + (uint64_t)(trampoline_cr3 - trampoline_start)) = (uint32_t)cr3;
    /* Software-enable the local APIC (spurious vector register bit 8). */
    mmio_write32(APIC_SVR, mmio_read32(APIC_SVR) | 0x100);
    uint32_t self = this_apic_id();
    uint32_t vector = (uint32_t)(TRAMPOLINE_BASE >> 12);
    for (int id = 0; id < cpus; id++) {
        if ((uint32_t)id == self) continue;
        send_ipi(id, ICR_INIT | ICR_LEVEL_TRIGGER | ICR_LEVEL_ASSERT);
        send_ipi(id, ICR_INIT | ICR_LEVEL_TRIGGER);
        delay(100);
        send_ipi(id, ICR_STARTUP | vector);
        delay(100);
        send_ipi(id, ICR_STARTUP | vector);
    }
    for (int spins = 0; spins < 2000000 && aps_arrived < (uint32_t)(cpus - 1); spins++) cpu_relax();
    return (int)aps_arrived;
}

/* ---- entry ---- */
void guest_start(void *boot_params) {
    map_mmio_hole();
    guest_exit((uint32_t)main(boot_params));
}
