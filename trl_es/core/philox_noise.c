/* Counter-based Gaussian noise (MemberNoise(generator="philox")), loaded by trl_es/core/philox.py.

   Element e of a noise stream with 64-bit key (k0, k1) is a pure function of (key, e): block b = e / 4 is the
   Philox4x32-10 counter (b mod 2^32, b / 2^32, 0, 0), its four 32-bit outputs make two Box-Muller pairs, and lane
   e mod 4 is picked. So any slice of a tensor's noise is computed directly (no stream to run through), by any number
   of threads, in any chunking, with the same numbers.

   Bit-identical to the torch ops of philox.py: only IEEE-exact operations (integer ops, +, -, *, /, sqrt, exact
   int -> float conversions) in the same order, with the constants passed in from Python as fp32 and the compiler
   told not to contract a * b + c into an FMA (-ffp-contract=off). The logarithm and the sine/cosine are our own
   polynomials for that reason: libm's would differ from torch's. */

#include <math.h>
#include <stdint.h>
#include <string.h>

/* The fp32 constants, in philox.py's CONSTANTS order. */
enum { LN2, SQRT2, LOG1, LOG2, LOG3, LOG4, HALF_PI, S1, S2, S3, S4, S5, S6, C1, C2, C3, C4, C5, C6, C7, NUM_CONSTANTS };

#define LANES 16                 /* Philox blocks computed together (vectorized by the compiler; 16: ~10% faster
                                    than 8 on one thread, the same on two, measured on the 2-core CI machine) */
#define GROUP (4 * LANES)        /* noise elements per group */

static inline float bits_to_float(uint32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static inline uint32_t float_to_bits(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

/* Two standard normals from two 32-bit words: radius from a (24 bits, u in (0, 1]), angle from b (24 bits). Branch
   free (selections are bit masks), so the compiler vectorizes it over the lanes. */
static inline void box_muller(uint32_t a, uint32_t b, const float *K, float *z0, float *z1) {
    /* ln(u) with u = k 2^-24: k = m 2^e, m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh((m - 1) / (m + 1)) */
    const uint32_t bits = float_to_bits((float)(int32_t)((a >> 8) + 1u));  /* via int32: no unsigned cvt in AVX2 */
    const uint32_t high = (bits & 0x7fffffu) > (float_to_bits(K[SQRT2]) & 0x7fffffu);  /* mantissa above sqrt(2) */
    const float m = bits_to_float(((bits & 0x7fffffu) | 0x3f800000u) - (high << 23));  /* halved: exponent - 1 */
    const int32_t exponent = (int32_t)(bits >> 23) - 127 + (int32_t)high;
    const float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    const float series = (((s2 * K[LOG4] + K[LOG3]) * s2 + K[LOG2]) * s2 + K[LOG1]) * s2 + 1.0f;
    const float log_u = (float)(exponent - 24) * K[LN2] + (s * 2.0f) * series;
    const float radius = sqrtf(log_u * -2.0f);
    /* angle 2 pi j 2^-24 = quadrant (j >> 22) * pi / 2 + x, x = (pi / 2) (j mod 2^22) 2^-22 in [0, pi / 2) */
    const uint32_t j = b >> 8, quadrant = j >> 22;
    const float x = ((float)(int32_t)(j & 0x3fffffu) * 2.384185791015625e-07f) * K[HALF_PI], x2 = x * x;
    const float ps = ((((x2 * K[S6] + K[S5]) * x2 + K[S4]) * x2 + K[S3]) * x2 + K[S2]) * x2 + K[S1];
    const float pc = (((((x2 * K[C7] + K[C6]) * x2 + K[C5]) * x2 + K[C4]) * x2 + K[C3]) * x2 + K[C2]) * x2 + K[C1];
    const uint32_t sine = float_to_bits(x + x * (x2 * ps)), cosine = float_to_bits(1.0f + x2 * pc);
    /* quadrant 0: (cos, sin), 1: (-sin, cos), 2: (-cos, -sin), 3: (sin, -cos) */
    const uint32_t odd = 0u - (quadrant & 1u);
    const uint32_t first = (sine & odd) | (cosine & ~odd), second = (cosine & odd) | (sine & ~odd);
    *z0 = radius * bits_to_float(first ^ ((((quadrant + 1u) >> 1) & 1u) << 31));
    *z1 = radius * bits_to_float(second ^ ((quadrant >> 1) << 31));
}

/* The GROUP normals of blocks [first, first + LANES), element order. */
static void group_normals(uint64_t first, uint32_t k0, uint32_t k1, const float *K, float *out) {
    uint32_t c0[LANES], c1[LANES], c2[LANES], c3[LANES];
#pragma omp simd
    for (int l = 0; l < LANES; l++) {
        c0[l] = (uint32_t)(first + l);
        c1[l] = (uint32_t)((first + l) >> 32);
        c2[l] = 0u;
        c3[l] = 0u;
    }
    for (int round = 0; round < 10; round++) {
#pragma omp simd
        for (int l = 0; l < LANES; l++) {
            const uint64_t p0 = (uint64_t)0xD2511F53u * c0[l], p1 = (uint64_t)0xCD9E8D57u * c2[l];
            const uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[l] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3[l] ^ k1;
            c1[l] = (uint32_t)p1;
            c3[l] = (uint32_t)p0;
            c0[l] = n0;
            c2[l] = n2;
        }
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    float z0[LANES], z1[LANES], z2[LANES], z3[LANES];
#pragma omp simd
    for (int l = 0; l < LANES; l++) {
        box_muller(c0[l], c1[l], K, &z0[l], &z1[l]);
        box_muller(c2[l], c3[l], K, &z2[l], &z3[l]);
    }
    for (int l = 0; l < LANES; l++) {
        out[4 * l] = z0[l];
        out[4 * l + 1] = z1[l];
        out[4 * l + 2] = z2[l];
        out[4 * l + 3] = z3[l];
    }
}

/* Elements [start, start + count) of the stream (k0, k1): written to out (add == 0), or added as
   out[i] = out[i] + scale * eps (add != 0; the product rounded first, as torch's mul_ then add_). */
void philox_normal(float *out, int64_t count, uint64_t start, uint32_t k0, uint32_t k1, const float *K, float scale,
                   int32_t add, int64_t parallel_above) {
    if (count <= 0) return;
    const uint64_t end = start + (uint64_t)count, first_group = start / GROUP, last_group = (end - 1) / GROUP;
#pragma omp parallel for schedule(static) if (count > parallel_above)
    for (int64_t g = (int64_t)first_group; g <= (int64_t)last_group; g++) {
        float normals[GROUP];
        const uint64_t base = (uint64_t)g * GROUP;
        group_normals(base / 4, k0, k1, K, normals);
        const uint64_t lo = base > start ? base : start, hi = base + GROUP < end ? base + GROUP : end;
        float *target = out + (lo - start);
        const float *eps = normals + (lo - base);
        const int64_t n = (int64_t)(hi - lo);
        if (add) {
            for (int64_t i = 0; i < n; i++) target[i] = target[i] + scale * eps[i];
        } else {
            for (int64_t i = 0; i < n; i++) target[i] = eps[i];
        }
    }
}
