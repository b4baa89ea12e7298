/* AMX-INT8 instructions emulated in a SIGILL handler, so that the machine code of AMX kernels (the
 * very instructions LLVM generated: ldtilecfg, tileloadd, tdpbssd, tilestored, ... with their
 * registers, strides and tile configuration) runs on an x86-64 CPU without AMX, bit for bit as the
 * instruction set reference defines it. For checking, not speed: every tile instruction traps.
 * Loaded and driven by tvm_intlstm/runtime/amx_trap.py (see there and docs/compiler.md).
 *
 * On a CPU without AMX a tile instruction raises #UD, i.e. SIGILL in the thread that ran it. The
 * handler decodes the instruction at the faulting RIP (3-byte VEX, map 0F38: the only encodings of
 * these instructions), carries it out on a per-thread tile state kept here (8 tiles of 16 rows x
 * 64 bytes and the palette-1 configuration), advances RIP past it and returns. Anything that is not
 * an emulated AMX instruction gets the previous SIGILL action back and faults again as before.
 *
 * Shapes and configurations the hardware refuses (a tile used before ldtilecfg, rows > 16, colsb >
 * 64, tdpbssd operands whose shapes do not chain, reserved bytes set) are recorded as an error
 * (the first one's text is kept; amx_trap_error) and the instruction is skipped: the Python side
 * raises it after the call instead of the process dying. Semantics follow the Intel SDM's
 * pseudocode: tileloadd zeroes the bytes past colsb and the rows past `rows`; tdpbssd adds the four
 * s8 x s8 products of each dword pair to the int32 lane with wraparound. start_row is always 0
 * here (it is only non-zero after an interrupted tileloadd/tilestored on real hardware). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

typedef struct {
    int configured;          /* palette 1 loaded (else the init state: tile instructions #UD) */
    uint8_t cfg[64];         /* the configuration as ldtilecfg loaded it (sttilecfg stores it) */
    uint16_t colsb[8];
    uint8_t rows[8];
    uint8_t t[8][16][64];    /* tile data */
} tile_state;

/* Per-thread states, claimed by thread id (gettid is async-signal-safe; malloc and dynamic TLS
 * in a signal handler are not). A reused thread id inherits a state, which ldtilecfg resets. */
#define MAX_THREADS 256
static struct { _Atomic int tid; tile_state st; } slots[MAX_THREADS];

static _Atomic long counts[9];   /* per instruction kind, see KIND_* */
enum { K_LDTILECFG, K_STTILECFG, K_TILERELEASE, K_TILEZERO, K_TILELOADD, K_TILESTORED,
       K_TDPBXXD, K_ERRORS, K_TOTAL };
static _Atomic int error_set;
static char error_text[256];

static struct sigaction previous;
static _Atomic int installed;

static void set_error(const char *what, const uint8_t *ip) {
    atomic_fetch_add(&counts[K_ERRORS], 1);
    int expected = 0;
    if (atomic_compare_exchange_strong(&error_set, &expected, 1))
        snprintf(error_text, sizeof error_text, "%s (instruction at %p)", what, (const void *)ip);
}

static tile_state *state(void) {
    int tid = (int)syscall(SYS_gettid);
    for (int i = 0; i < MAX_THREADS; i++)
        if (atomic_load(&slots[i].tid) == tid) return &slots[i].st;
    for (int i = 0; i < MAX_THREADS; i++) {
        int zero = 0;
        if (atomic_compare_exchange_strong(&slots[i].tid, &zero, tid)) {
            memset(&slots[i].st, 0, sizeof slots[i].st);
            return &slots[i].st;
        }
    }
    return NULL;
}

/* x86 register number (rax, rcx, ..., r15) -> the glibc gregs index */
static const int GREG[16] = {REG_RAX, REG_RCX, REG_RDX, REG_RBX, REG_RSP, REG_RBP, REG_RSI, REG_RDI,
                             REG_R8,  REG_R9,  REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15};

typedef struct {
    uint64_t base_disp;   /* base + displacement (+ index*scale for a plain memory operand) */
    uint64_t stride;      /* index << scale for the tile sibmem form (0 without an index) */
    int len;              /* bytes of ModRM + SIB + displacement */
} memop;

/* Decode the memory operand whose ModRM byte is at p (mod != 3). next_ip_base: the address of
 * the byte after ModRM, to which the instruction's remaining length is added for RIP-relative. */
static int decode_mem(const uint8_t *p, const greg_t *g, int X, int B, int sib_form, memop *m,
                      const uint8_t *ip, int prefix_len) {
    int mod = p[0] >> 6, rm = p[0] & 7, len = 1;
    uint64_t addr = 0, index = 0;
    int scale = 0, rip_rel = 0;
    if (rm == 4) {
        uint8_t sib = p[1];
        len = 2;
        scale = sib >> 6;
        int idx = ((sib >> 3) & 7) | (X << 3), base = (sib & 7) | (B << 3);
        if (idx != 4) index = (uint64_t)g[GREG[idx]];
        if ((sib & 7) == 5 && mod == 0) {
            int32_t d;
            memcpy(&d, p + 2, 4);
            addr = (uint64_t)(int64_t)d;
            len += 4;
        } else {
            addr = (uint64_t)g[GREG[base]];
        }
    } else if (sib_form) {
        return -1;                                  /* tileloadd/tilestored need a SIB byte */
    } else if (rm == 5 && mod == 0) {
        rip_rel = 1;
    } else {
        addr = (uint64_t)g[GREG[rm | (B << 3)]];
    }
    if (mod == 1) {
        addr += (uint64_t)(int64_t)(int8_t)p[len];
        len += 1;
    } else if (mod == 2 || rip_rel) {
        int32_t d;
        memcpy(&d, p + len, 4);
        addr += (uint64_t)(int64_t)d;
        len += 4;
    }
    if (rip_rel) addr += (uint64_t)(ip + prefix_len + len);   /* relative to the next instruction */
    if (sib_form) {
        m->base_disp = addr;
        m->stride = index << scale;
    } else {
        m->base_disp = addr + (index << scale);
        m->stride = 0;
    }
    m->len = len;
    return 0;
}

static void tile_init(tile_state *s) {
    memset(s, 0, sizeof *s);
}

static int load_config(tile_state *s, const uint8_t *cfg, const uint8_t *ip) {
    if (cfg[0] == 0) {                      /* palette 0: the init state */
        tile_init(s);
        return 0;
    }
    if (cfg[0] != 1) { set_error("ldtilecfg: palette other than 0 or 1", ip); return -1; }
    if (cfg[1] != 0) { set_error("ldtilecfg: start_row is not 0", ip); return -1; }
    for (int i = 2; i < 16; i++)
        if (cfg[i]) { set_error("ldtilecfg: reserved bytes 2-15 are not zero", ip); return -1; }
    uint16_t colsb[16];
    memcpy(colsb, cfg + 16, 32);
    for (int i = 0; i < 16; i++) {
        int rows = cfg[48 + i];
        if (i >= 8 && (colsb[i] || rows)) { set_error("ldtilecfg: tile 8-15 configured", ip); return -1; }
        if (i < 8 && (colsb[i] > 64 || rows > 16)) {
            set_error("ldtilecfg: a tile over 16 rows or 64 bytes per row", ip);
            return -1;
        }
        if (i < 8 && ((colsb[i] == 0) != (rows == 0))) {
            set_error("ldtilecfg: a tile with rows but no columns (or columns but no rows)", ip);
            return -1;
        }
    }
    tile_init(s);
    s->configured = 1;
    memcpy(s->cfg, cfg, 64);
    for (int i = 0; i < 8; i++) { s->colsb[i] = colsb[i]; s->rows[i] = cfg[48 + i]; }
    return 0;
}

static int usable(tile_state *s, int t, const uint8_t *ip) {
    if (!s->configured) { set_error("tile instruction without a loaded configuration", ip); return 0; }
    if (!s->rows[t]) { set_error("tile instruction on an unconfigured tile", ip); return 0; }
    return 1;
}

/* tdpb[su][su]d: dst[m][n] += sum_i a[m][4k+i] * b[k][4n+i], int32 with wraparound */
static void tdp(tile_state *s, int dst, int a, int b, int a_signed, int b_signed, const uint8_t *ip) {
    if (!usable(s, dst, ip) || !usable(s, a, ip) || !usable(s, b, ip)) return;
    if (dst == a || dst == b || a == b) { set_error("tdp*: operands are not distinct tiles", ip); return; }
    int M = s->rows[dst], N = s->colsb[dst] / 4, K = s->colsb[a] / 4;
    if (s->colsb[dst] % 4 || s->colsb[a] % 4 || s->rows[a] != M || s->colsb[b] != s->colsb[dst] ||
        s->rows[b] != K) {
        set_error("tdp*: tile shapes do not chain (dst M x 4N, a M x 4K, b K x 4N)", ip);
        return;
    }
    for (int m = 0; m < M; m++) {
        int32_t *c = (int32_t *)s->t[dst][m];
        for (int n = 0; n < N; n++) {
            uint32_t acc = (uint32_t)c[n];
            for (int k = 0; k < K; k++)
                for (int i = 0; i < 4; i++) {
                    int x = a_signed ? (int8_t)s->t[a][m][4 * k + i] : s->t[a][m][4 * k + i];
                    int y = b_signed ? (int8_t)s->t[b][k][4 * n + i] : s->t[b][k][4 * n + i];
                    acc += (uint32_t)(x * y);
                }
            c[n] = (int32_t)acc;
        }
    }
    /* the rows past M and the bytes past colsb of dst are zeroed by the instruction */
    for (int m = 0; m < 16; m++)
        memset(&s->t[dst][m][m < M ? s->colsb[dst] : 0], 0, 64 - (m < M ? s->colsb[dst] : 0));
}

/* Decode and emulate the instruction at ip; its length, or 0 if it is not one we emulate. */
static int emulate(const uint8_t *ip, greg_t *g) {
    if (ip[0] != 0xC4) return 0;
    uint8_t b1 = ip[1], b2 = ip[2], op = ip[3];
    int R = !(b1 & 0x80), X = !(b1 & 0x40), B = !(b1 & 0x20), map = b1 & 0x1F;
    int W = b2 >> 7, vvvv = (~b2 >> 3) & 0xF, L = (b2 >> 2) & 1, pp = b2 & 3;
    if (map != 2 || W || L) return 0;
    const uint8_t *p = ip + 4;       /* ModRM */
    int mod = p[0] >> 6, reg = ((p[0] >> 3) & 7) | (R << 3), rm = (p[0] & 7) | (B << 3);
    tile_state *s = state();
    if (!s) { set_error("more than 256 threads ran tile instructions", ip); return 0; }
    memop m;
    if (op == 0x49) {
        if (mod != 3) {
            if (pp > 1 || reg || vvvv) return 0;
            if (decode_mem(p, g, X, B, 0, &m, ip, 4)) return 0;
            uint8_t *mem = (uint8_t *)(uintptr_t)m.base_disp;
            if (pp == 0) {                                        /* ldtilecfg m512 */
                atomic_fetch_add(&counts[K_LDTILECFG], 1);
                load_config(s, mem, ip);
            } else {                                              /* sttilecfg m512 */
                atomic_fetch_add(&counts[K_STTILECFG], 1);
                if (s->configured) memcpy(mem, s->cfg, 64); else memset(mem, 0, 64);
            }
            return 4 + m.len;
        }
        if (pp == 0 && p[0] == 0xC0 && !vvvv) {                   /* tilerelease */
            atomic_fetch_add(&counts[K_TILERELEASE], 1);
            tile_init(s);
            return 5;
        }
        if (pp == 3 && (p[0] & 7) == 0 && !B && !vvvv && reg < 8) {   /* tilezero tmm */
            atomic_fetch_add(&counts[K_TILEZERO], 1);
            if (usable(s, reg, ip)) memset(s->t[reg], 0, sizeof s->t[reg]);
            return 5;
        }
        return 0;
    }
    if (op == 0x4B && mod != 3 && pp && !vvvv && reg < 8) {
        if (decode_mem(p, g, X, B, 1, &m, ip, 4)) return 0;
        uint8_t *mem = (uint8_t *)(uintptr_t)m.base_disp;
        if (pp == 2) {                                            /* tilestored sibmem, tmm */
            atomic_fetch_add(&counts[K_TILESTORED], 1);
            if (usable(s, reg, ip))
                for (int r = 0; r < s->rows[reg]; r++)
                    memcpy(mem + r * m.stride, s->t[reg][r], s->colsb[reg]);
        } else {                                                  /* tileloadd[t1] tmm, sibmem */
            atomic_fetch_add(&counts[K_TILELOADD], 1);
            if (usable(s, reg, ip)) {
                memset(s->t[reg], 0, sizeof s->t[reg]);
                for (int r = 0; r < s->rows[reg]; r++)
                    memcpy(s->t[reg][r], mem + r * m.stride, s->colsb[reg]);
            }
        }
        return 4 + m.len;
    }
    if (op == 0x5E && mod == 3 && reg < 8 && rm < 8 && vvvv < 8) {
        /* tdpbssd (F2), tdpbsud (F3), tdpbusd (66), tdpbuud (none): tmm1 = reg, tmm2 = rm
         * (left operand, rows of the product), tmm3 = vvvv (right operand) */
        atomic_fetch_add(&counts[K_TDPBXXD], 1);
        int a_signed = pp == 3 || pp == 2, b_signed = pp == 3 || pp == 1;
        tdp(s, reg, rm, vvvv, a_signed, b_signed, ip);
        return 5;
    }
    return 0;
}

static void on_sigill(int sig, siginfo_t *info, void *ctx) {
    ucontext_t *uc = (ucontext_t *)ctx;
    greg_t *g = uc->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)(uintptr_t)g[REG_RIP];
    int len = emulate(ip, g);
    if (len > 0) {
        atomic_fetch_add(&counts[K_TOTAL], 1);
        g[REG_RIP] += len;
        return;
    }
    /* not ours: the previous action takes this fault (the instruction runs again) */
    sigaction(SIGILL, &previous, NULL);
    (void)sig; (void)info;
}

int amx_trap_install(void) {
    if (atomic_exchange(&installed, 1)) return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigill;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGILL, &sa, &previous);
}

int amx_trap_uninstall(void) {
    if (!atomic_exchange(&installed, 0)) return 0;
    return sigaction(SIGILL, &previous, NULL);
}

/* counts[k] for k in KIND order (ldtilecfg, sttilecfg, tilerelease, tilezero, tileloadd,
 * tilestored, tdp*, errors, all emulated instructions); reset with amx_trap_reset */
long amx_trap_count(int kind) {
    return kind >= 0 && kind < 9 ? atomic_load(&counts[kind]) : -1;
}

/* the first error's text since the last reset, or "" */
const char *amx_trap_error(void) {
    return atomic_load(&error_set) ? error_text : "";
}

void amx_trap_reset(void) {
    for (int i = 0; i < 9; i++) atomic_store(&counts[i], 0);
    error_text[0] = 0;
    atomic_store(&error_set, 0);
    for (int i = 0; i < MAX_THREADS; i++) atomic_store(&slots[i].tid, 0);
}
