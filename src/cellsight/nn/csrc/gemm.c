/* A single-precision matrix product for AVX-512 CPUs on which the BLAS torch links runs its
 * AVX2 path (cellsight.nn.native, the stacked kernels' gemm).
 *
 * torch's x86 wheels carry MKL, which chooses its code path by CPU vendor: on AMD processors
 * with AVX-512 (Zen 4, Zen 5) it runs its AVX2 kernels, half the width of the hardware's
 * vector units (measured on a Zen 5 core: 88 GFLOPS for FADVI's 128 x 765 x 128 products).
 * This is the classic packed design (Goto and van de Geijn 2008): op(B) is copied, a block of
 * KC of its rows at a time, into panels of NR = 32 columns, op(A) into panels of MR = 14 rows,
 * and a micro-kernel accumulates a 14 x 32 tile of C in 28 vector registers with two fused
 * multiply-adds per element of A, the panels streaming from L1/L2. Edges are zero-padded in
 * the panels and stored through a scratch tile. Row-major throughout:
 *   C (m, n) = alpha op(A) op(B) + beta C,  op(X) = X or X^T (ta, tb), beta = 0: C not read.
 * Without AVX-512 (SG_NATIVE_GEMM 0) the caller keeps the BLAS sgemm.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SG_NATIVE_GEMM 1
#define SG_MR 14
#define SG_NR 32
#define SG_KC 256

typedef float sg_v16 __attribute__((vector_size(64), aligned(64)));
typedef float sg_v16u __attribute__((vector_size(64), aligned(4), may_alias));

/* packing buffers, grown on demand (one set per thread) */
static _Thread_local float *sg_bbuf = NULL, *sg_abuf = NULL;
static _Thread_local size_t sg_bcap = 0, sg_acap = 0;

static float *sg_reserve(float **buf, size_t *cap, size_t n) {
    if (n > *cap) {
        free(*buf);
        *buf = aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
        *cap = *buf ? n : 0;
    }
    return *buf;
}

/* dst[r][c] = src[c][r] for an 8 x 8 block (row strides ls, ld) */
static inline void sg_transpose8(const float *src, size_t ls, float *dst, size_t ld) {
    __m256 r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ls);
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + i * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

/* op(B)[p0 .. p0 + kc, j0 .. j0 + w) into one panel dst[p][NR] (columns past w zero); with
 * tb the columns of op(B) are rows of B. */
static void sg_pack_b(int tb, const float *B, int ldb, int p0, int kc, int j0, int w,
                      float *dst) {
    if (!tb) {
        for (int p = 0; p < kc; ++p) {
            const float *src = B + (size_t)(p0 + p) * ldb + j0;
            float *d = dst + p * SG_NR;
            memcpy(d, src, (size_t)w * sizeof(float));
            for (int c = w; c < SG_NR; ++c) d[c] = 0.0f;
        }
        return;
    }
    const int c8 = w & ~7, p8 = kc & ~7;
    for (int c0 = 0; c0 < c8; c0 += 8) {  /* 8 x 8 blocks transposed in registers */
        const float *src = B + (size_t)(j0 + c0) * ldb + p0;
        for (int q = 0; q < p8; q += 8)
            sg_transpose8(src + q, (size_t)ldb, dst + (size_t)q * SG_NR + c0, SG_NR);
        for (int q = p8; q < kc; ++q)
            for (int c = 0; c < 8; ++c) dst[q * SG_NR + c0 + c] = src[(size_t)c * ldb + q];
    }
    for (int c = c8; c < w; ++c) {
        const float *src = B + (size_t)(j0 + c) * ldb + p0;
        for (int q = 0; q < kc; ++q) dst[q * SG_NR + c] = src[q];
    }
    for (int c = w; c < SG_NR; ++c)
        for (int q = 0; q < kc; ++q) dst[q * SG_NR + c] = 0.0f;
}

/* op(A)[i0 .. i0 + mr, p0 .. p0 + kc) into Ap[p][MR] (rows past mr zero) */
static void sg_pack_a(int ta, const float *A, int lda, int i0, int mr, int p0, int kc,
                      float *Ap) {
    for (int p = 0; p < kc; ++p)
        for (int i = 0; i < SG_MR; ++i)
            Ap[p * SG_MR + i] = i >= mr ? 0.0f
                                : ta ? A[(size_t)(p0 + p) * lda + i0 + i]
                                     : A[(size_t)(i0 + i) * lda + p0 + p];
}

/* tile (mr, nr) of C = alpha op(A) Bp + beta C: element (i, p) of the tile's A at
 * a[i si + p sp], row p of its B at b + p sb (32 floats). Inlined at each call with the
 * strides' pattern known (packed A, A^T rows, A rows), so each loop compiles to its own
 * addressing. */
static inline __attribute__((always_inline)) void sg_kernel(
    int kc, const float *restrict a, size_t si, size_t sp, const float *restrict b, size_t sb,
    float alpha, float beta, float *C, int ldc, int mr, int nr) {
    sg_v16 c0[SG_MR], c1[SG_MR];
    for (int i = 0; i < SG_MR; ++i) c0[i] = c1[i] = (sg_v16){0};
    for (int p = 0; p < kc; ++p) {
        const sg_v16 b0 = *(const sg_v16u *)(b + p * sb);
        const sg_v16 b1 = *(const sg_v16u *)(b + p * sb + 16);
        const float *ap = a + p * sp;
        for (int i = 0; i < SG_MR; ++i) {
            const float av = ap[i * si];
            c0[i] += av * b0;
            c1[i] += av * b1;
        }
    }
    if (mr == SG_MR && nr == SG_NR) {
        for (int i = 0; i < SG_MR; ++i) {
            sg_v16u *row = (sg_v16u *)(C + (size_t)i * ldc);
            if (beta == 0.0f) {
                row[0] = alpha * c0[i];
                row[1] = alpha * c1[i];
            } else {
                row[0] = alpha * c0[i] + beta * row[0];
                row[1] = alpha * c1[i] + beta * row[1];
            }
        }
        return;
    }
    float tile[SG_MR][SG_NR] __attribute__((aligned(64)));
    for (int i = 0; i < SG_MR; ++i) {
        *(sg_v16 *)&tile[i][0] = c0[i];
        *(sg_v16 *)&tile[i][16] = c1[i];
    }
    for (int i = 0; i < mr; ++i) {
        float *row = C + (size_t)i * ldc;
        for (int j = 0; j < nr; ++j)
            row[j] = beta == 0.0f ? alpha * tile[i][j] : alpha * tile[i][j] + beta * row[j];
    }
}

static void sg_kernel_packed(int kc, const float *a, const float *b, size_t sb, float alpha,
                             float beta, float *C, int ldc, int mr, int nr) {
    sg_kernel(kc, a, 1, SG_MR, b, sb, alpha, beta, C, ldc, mr, nr);
}

static void sg_kernel_at(int kc, const float *a, size_t lda, const float *b, size_t sb,
                         float alpha, float beta, float *C, int ldc) {
    sg_kernel(kc, a, 1, lda, b, sb, alpha, beta, C, ldc, SG_MR, SG_NR);
}

static void sg_kernel_an(int kc, const float *a, size_t lda, const float *b, size_t sb,
                         float alpha, float beta, float *C, int ldc) {
    sg_kernel(kc, a, lda, 1, b, sb, alpha, beta, C, ldc, SG_MR, SG_NR);
}

/* Row-major C (m, n) = alpha op(A) op(B) + beta C; op(A) (m, k), op(B) (k, n); lda, ldb, ldc
 * the row strides of A, B, C as stored. op(B) is packed only where it must be (transposed,
 * or the last panel narrower than NR), op(A) only for the last block of fewer than MR rows;
 * full blocks are read in place. Returns 0, or -1 if the packing memory could not be
 * allocated (nothing written). */
static int sg_gemm(int ta, int tb, int m, int n, int k, float alpha, const float *A, int lda,
                   const float *B, int ldb, float beta, float *C, int ldc) {
    if (m <= 0 || n <= 0) return 0;
    if (k <= 0) {
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) C[(size_t)i * ldc + j] *= beta;
        return 0;
    }
    const int panels = (n + SG_NR - 1) / SG_NR;
    const int kc_max = k < SG_KC ? k : SG_KC;
    float *Bp = sg_reserve(&sg_bbuf, &sg_bcap, (size_t)panels * kc_max * SG_NR);
    float *Ap = sg_reserve(&sg_abuf, &sg_acap, (size_t)SG_MR * kc_max);
    if (!Bp || !Ap) return -1;
    for (int p0 = 0; p0 < k; p0 += SG_KC) {
        const int kc = k - p0 < SG_KC ? k - p0 : SG_KC;
        const float beta_p = p0 == 0 ? beta : 1.0f;
        for (int jp = 0; jp < panels; ++jp) {
            const int j0 = jp * SG_NR, w = n - j0 < SG_NR ? n - j0 : SG_NR;
            if (tb || w < SG_NR) sg_pack_b(tb, B, ldb, p0, kc, j0, w, Bp + (size_t)jp * kc * SG_NR);
        }
        for (int i0 = 0; i0 < m; i0 += SG_MR) {
            const int mr = m - i0 < SG_MR ? m - i0 : SG_MR;
            if (mr < SG_MR) sg_pack_a(ta, A, lda, i0, mr, p0, kc, Ap);
            for (int jp = 0; jp < panels; ++jp) {
                const int j0 = jp * SG_NR, nr = n - j0 < SG_NR ? n - j0 : SG_NR;
                const int packed_b = tb || nr < SG_NR;
                const float *b = packed_b ? Bp + (size_t)jp * kc * SG_NR
                                          : B + (size_t)p0 * ldb + j0;
                const size_t sb = packed_b ? SG_NR : (size_t)ldb;
                float *c = C + (size_t)i0 * ldc + j0;
                if (mr < SG_MR)
                    sg_kernel_packed(kc, Ap, b, sb, alpha, beta_p, c, ldc, mr, nr);
                else if (nr < SG_NR)  /* a full block of A, packed for the edge tile's store */
                    sg_kernel(kc, ta ? A + (size_t)p0 * lda + i0 : A + (size_t)i0 * lda + p0,
                              ta ? 1 : (size_t)lda, ta ? (size_t)lda : 1, b, sb, alpha, beta_p,
                              c, ldc, mr, nr);
                else if (ta)
                    sg_kernel_at(kc, A + (size_t)p0 * lda + i0, lda, b, sb, alpha, beta_p, c,
                                 ldc);
                else
                    sg_kernel_an(kc, A + (size_t)i0 * lda + p0, lda, b, sb, alpha, beta_p, c,
                                 ldc);
            }
        }
    }
    return 0;
}
#else
#define SG_NATIVE_GEMM 0
#endif
