/* cblas_sgemm for MLX's CPU backend on Linux, forwarding matrix-vector products to cblas_sgemv.
 *
 * Why: libmlx.so binds only cblas_sgemm, so a decode step (one token: every weight product is
 * 1 x K by K x N) runs OpenBLAS's general kernel, which packs the whole weight matrix into its
 * blocked layout on every call.  On a 2-core x86 machine SmolLM2's 576 x 49152 LM head took 41 ms
 * that way and 13 ms as a gemv (one thread); decode is memory-bound and packing reads the weights
 * twice.  Loaded with RTLD_GLOBAL ahead of OpenBLAS (see anemll_mlx/blas.py), this cblas_sgemm is
 * the one libmlx.so resolves; products with one row or one column of output become a cblas_sgemv
 * of the same operands, everything else goes to OpenBLAS's cblas_sgemm unchanged.
 */
#include <stddef.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*sgemv_fn)(int, int, int, int, float, const float *, int, const float *, int, float,
                         float *, int);

static sgemm_fn real_sgemm;
static sgemv_fn real_sgemv;

/* Called once from Python with OpenBLAS's own entry points, before MLX is imported. */
void anemll_gemv_forward_init(void *sgemm, void *sgemv) {
    real_sgemm = (sgemm_fn)sgemm;
    real_sgemv = (sgemv_fn)sgemv;
}

static void zero(float *c, int n, int inc) {
    for (int i = 0; i < n; i++) c[(size_t)i * inc] = 0.0f;
}

void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    if (order == ROW_MAJOR && k > 0 && (m == 1 || n == 1) && real_sgemv != NULL) {
        if (beta == 0.0f) zero(c, m == 1 ? n : m, m == 1 ? 1 : ldc);  /* gemm never reads C then */
        if (m == 1) {
            /* c (1 x n) = a (1 x k) . op(b) (k x n): c = op(b)^T a, a row of a as the vector */
            int inc_a = trans_a == NO_TRANS ? 1 : lda;
            if (trans_b == NO_TRANS)  /* b stored k x n */
                real_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, inc_a, beta, c, 1);
            else                      /* b stored n x k */
                real_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, inc_a, beta, c, 1);
        } else {
            /* c (m x 1) = op(a) (m x k) . b (k x 1): a column of c, b's column as the vector */
            int inc_b = trans_b == NO_TRANS ? ldb : 1;
            if (trans_a == NO_TRANS)  /* a stored m x k */
                real_sgemv(ROW_MAJOR, NO_TRANS, m, k, alpha, a, lda, b, inc_b, beta, c, ldc);
            else                      /* a stored k x m */
                real_sgemv(ROW_MAJOR, TRANS, k, m, alpha, a, lda, b, inc_b, beta, c, ldc);
        }
        return;
    }
    real_sgemm(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
