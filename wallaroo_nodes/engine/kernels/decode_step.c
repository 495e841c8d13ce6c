/* One decode step of the Qwen2-style LLM for a few rows (batch x new positions <= 8), fp32, x86-64 AVX2+FMA.
 *
 * Why this exists: on the CPU a tiny model's decode step is ~140 small PyTorch operations, and the matrix
 * products for 1-2 rows run at a fraction of what the core can stream (BLAS kernels are built for many rows).
 * Here the whole step is one call: each weight matrix is stored in 16-column panels, (N/16, K, 16), so a
 * product streams it once, contiguously, with every row's accumulators held in registers; norms, rotary,
 * cache writes, attention and the MLP gate run as plain loops on data that is already in cache.
 *
 * The arithmetic is the same as `step.forward_step` (Qwen2 decoder layers, grouped KV heads, rotary with the
 * sine's sign folded in); only the order of floating-point additions differs, so results agree to rounding.
 * Loaded through ctypes by `native.py`, which builds this file with the system C compiler on first use.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 8

typedef struct {
    int32_t dim, heads, kv_heads, head_dim, intermediate, layers;
    float eps;
    /* per layer, `layers` pointers each */
    const float *const *input_norm;   /* (dim) */
    const float *const *qkv_panels;   /* dim -> (heads + 2 kv_heads) head_dim */
    const float *const *qkv_bias;     /* ((heads + 2 kv_heads) head_dim) */
    const float *const *o_panels;     /* heads head_dim -> dim */
    const float *const *post_norm;    /* (dim) */
    const float *const *gate_up_panels; /* dim -> 2 intermediate (gate columns, then up columns) */
    const float *const *down_panels;  /* intermediate -> dim */
    const float *final_norm;          /* (dim) */
} wl_model;

int wl_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/* Floats of scratch memory a step needs (residual, normed rows, qkv, attention out, gate/up, scores). */
int64_t wl_scratch_floats(const wl_model *m, int32_t rows, int32_t max_len) {
    int64_t qkv = (int64_t)(m->heads + 2 * m->kv_heads) * m->head_dim;
    return (int64_t)rows * (2 * m->dim + qkv + (int64_t)m->heads * m->head_dim + 2 * (int64_t)m->intermediate)
           + max_len + m->head_dim;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int n) { /* n % 8 == 0 */
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i < n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    return hsum(_mm256_add_ps(s0, s1));
}

/* y[r, :] = x[r, :] / rms(x[r, :]) * w, per row. */
static void rms_norm_rows(const float *x, int rows, int dim, const float *w, float eps, float *y) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * dim;
        float *yr = y + (int64_t)r * dim;
        float inv = 1.0f / sqrtf(dot(xr, xr, dim) / (float)dim + eps);
        for (int i = 0; i < dim; i++) yr[i] = xr[i] * inv * w[i];
    }
}

/* One 16-column panel against `rr` rows; rr is a compile-time constant at every call site. */
static inline __attribute__((always_inline)) void panel_rows(
        const float *x, int ldx, int k_len, const float *panel, float *y, int ldy,
        const float *bias, const float *add, int ldadd, const int rr) {
    __m256 lo[4], hi[4], lo2[4], hi2[4];
    for (int r = 0; r < rr; r++) {
        lo[r] = hi[r] = lo2[r] = hi2[r] = _mm256_setzero_ps();
    }
    int k = 0;
    if (rr <= 2) {
        /* Few rows: two accumulator sets (even / odd k) so enough FMAs are in flight. */
        for (; k + 2 <= k_len; k += 2) {
            const float *p = panel + (int64_t)k * 16;
            __m256 w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8);
            __m256 w2 = _mm256_loadu_ps(p + 16), w3 = _mm256_loadu_ps(p + 24);
            for (int r = 0; r < rr; r++) {
                __m256 a = _mm256_broadcast_ss(x + (int64_t)r * ldx + k);
                __m256 b = _mm256_broadcast_ss(x + (int64_t)r * ldx + k + 1);
                lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
                hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
                lo2[r] = _mm256_fmadd_ps(b, w2, lo2[r]);
                hi2[r] = _mm256_fmadd_ps(b, w3, hi2[r]);
            }
        }
    }
    for (; k < k_len; k++) {
        const float *p = panel + (int64_t)k * 16;
        __m256 w0 = _mm256_loadu_ps(p), w1 = _mm256_loadu_ps(p + 8);
        for (int r = 0; r < rr; r++) {
            __m256 a = _mm256_broadcast_ss(x + (int64_t)r * ldx + k);
            lo[r] = _mm256_fmadd_ps(a, w0, lo[r]);
            hi[r] = _mm256_fmadd_ps(a, w1, hi[r]);
        }
    }
    for (int r = 0; r < rr; r++) {
        __m256 l = _mm256_add_ps(lo[r], lo2[r]), h = _mm256_add_ps(hi[r], hi2[r]);
        if (bias) {
            l = _mm256_add_ps(l, _mm256_loadu_ps(bias));
            h = _mm256_add_ps(h, _mm256_loadu_ps(bias + 8));
        }
        if (add) {
            l = _mm256_add_ps(_mm256_loadu_ps(add + (int64_t)r * ldadd), l);
            h = _mm256_add_ps(_mm256_loadu_ps(add + (int64_t)r * ldadd + 8), h);
        }
        _mm256_storeu_ps(y + (int64_t)r * ldy, l);
        _mm256_storeu_ps(y + (int64_t)r * ldy + 8, h);
    }
}

/* y (rows, n) = x (rows, k) @ W (k, n) [+ bias] [+ add]; W in panels (n / 16, k, 16); add may alias y. */
static void matmul_rows(const float *x, int rows, int k_len, const float *panels, int n,
                        const float *bias, const float *add, float *y) {
    for (int j = 0; j < n; j += 16) {
        const float *panel = panels + (int64_t)j * k_len;
        const float *b = bias ? bias + j : 0;
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const float *xr = x + (int64_t)r0 * k_len;
            float *yr = y + (int64_t)r0 * n + j;
            const float *ar = add ? add + (int64_t)r0 * n + j : 0;
            switch (rows - r0 >= 4 ? 4 : rows - r0) {
                case 4: panel_rows(xr, k_len, k_len, panel, yr, n, b, ar, n, 4); break;
                case 3: panel_rows(xr, k_len, k_len, panel, yr, n, b, ar, n, 3); break;
                case 2: panel_rows(xr, k_len, k_len, panel, yr, n, b, ar, n, 2); break;
                default: panel_rows(xr, k_len, k_len, panel, yr, n, b, ar, n, 1); break;
            }
        }
    }
}

/* Rotate one head in place: v[i] = v[i] cos[i] + v[(i + half) % d] signed_sin[i]. */
static void rotate(float *v, const float *cos_row, const float *sin_row, int d, float *tmp) {
    int half = d / 2;
    memcpy(tmp, v, sizeof(float) * d);
    for (int i = 0; i < d; i++) v[i] = tmp[i] * cos_row[i] + tmp[(i + half) % d] * sin_row[i];
}

/* The step. x: (batch, n, dim) embeddings of the new positions. cos/sin: element [b, i, :] at
 * cos + b * rope_stride + i * head_dim. k_cache/v_cache: per layer (batch, kv_heads, max_len, head_dim).
 * valid: (batch, max_len) key validity. length: positions already cached. out: (batch, dim), the final-normed
 * hidden state of each row's last new position. Returns 0, or -1 when the shapes are out of range. */
int wl_step(const wl_model *m, const float *x, int32_t batch, int32_t n, const float *cos, const float *sin,
            int64_t rope_stride, float *const *k_cache, float *const *v_cache, const uint8_t *valid,
            int32_t length, int32_t max_len, float *scratch, float *out) {
    const int rows = batch * n, dim = m->dim, hq = m->heads, hkv = m->kv_heads, hd = m->head_dim;
    const int inter = m->intermediate, q_width = hq * hd, qkv_width = (hq + 2 * hkv) * hd;
    if (rows < 1 || rows > MAX_ROWS || length + n > max_len || hd % 8 || dim % 16 || inter % 8 || qkv_width % 16)
        return -1;
    const float scale = 1.0f / sqrtf((float)hd);
    float *resid = scratch;
    float *normed = resid + (int64_t)rows * dim;
    float *qkv = normed + (int64_t)rows * dim;
    float *attn = qkv + (int64_t)rows * qkv_width;
    float *gate_up = attn + (int64_t)rows * q_width;
    float *scores = gate_up + (int64_t)rows * 2 * inter;
    float *tmp = scores + max_len;
    memcpy(resid, x, sizeof(float) * rows * dim);

    for (int layer = 0; layer < m->layers; layer++) {
        rms_norm_rows(resid, rows, dim, m->input_norm[layer], m->eps, normed);
        matmul_rows(normed, rows, dim, m->qkv_panels[layer], qkv_width, m->qkv_bias[layer], 0, qkv);
        float *kc = k_cache[layer], *vc = v_cache[layer];
        /* Rotate queries and keys, and write keys / values to the cache. */
        for (int b = 0; b < batch; b++) {
            for (int i = 0; i < n; i++) {
                float *row = qkv + (int64_t)(b * n + i) * qkv_width;
                const float *c = cos + b * rope_stride + (int64_t)i * hd, *s = sin + b * rope_stride + (int64_t)i * hd;
                for (int h = 0; h < hq + hkv; h++) rotate(row + h * hd, c, s, hd, tmp);
                for (int h = 0; h < hkv; h++) {
                    int64_t at = (((int64_t)b * hkv + h) * max_len + length + i) * hd;
                    memcpy(kc + at, row + q_width + h * hd, sizeof(float) * hd);
                    memcpy(vc + at, row + q_width + hkv * hd + h * hd, sizeof(float) * hd);
                }
            }
        }
        /* Attention: query i of a row sees keys 0 .. length + i that are valid; head h reads KV head h / group. */
        const int group = hq / hkv;
        for (int b = 0; b < batch; b++) {
            const uint8_t *ok = valid + (int64_t)b * max_len;
            for (int i = 0; i < n; i++) {
                const int keys = length + i + 1;
                for (int h = 0; h < hq; h++) {
                    const float *q = qkv + (int64_t)(b * n + i) * qkv_width + h * hd;
                    const int64_t base = ((int64_t)b * hkv + h / group) * max_len * hd;
                    float best = -INFINITY;
                    for (int j = 0; j < keys; j++) {
                        float sc = ok[j] ? dot(q, kc + base + (int64_t)j * hd, hd) * scale : -INFINITY;
                        scores[j] = sc;
                        if (sc > best) best = sc;
                    }
                    float total = 0.0f;
                    for (int j = 0; j < keys; j++) {
                        float e = ok[j] ? expf(scores[j] - best) : 0.0f;
                        scores[j] = e;
                        total += e;
                    }
                    float *o = attn + (int64_t)(b * n + i) * q_width + h * hd;
                    for (int d = 0; d < hd; d++) o[d] = 0.0f;
                    for (int j = 0; j < keys; j++) {
                        if (scores[j] == 0.0f) continue;
                        const float p = scores[j] / total, *v = vc + base + (int64_t)j * hd;
                        for (int d = 0; d < hd; d++) o[d] += p * v[d];
                    }
                }
            }
        }
        matmul_rows(attn, rows, q_width, m->o_panels[layer], dim, 0, resid, resid);
        rms_norm_rows(resid, rows, dim, m->post_norm[layer], m->eps, normed);
        matmul_rows(normed, rows, dim, m->gate_up_panels[layer], 2 * inter, 0, 0, gate_up);
        for (int r = 0; r < rows; r++) {  /* silu(gate) * up, written over the gate half */
            float *g = gate_up + (int64_t)r * 2 * inter, *u = g + inter;
            for (int i = 0; i < inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        /* down: the activated rows have stride 2 * inter; compact them first (rows are few). */
        for (int r = 1; r < rows; r++) memmove(gate_up + (int64_t)r * inter, gate_up + (int64_t)r * 2 * inter,
                                               sizeof(float) * inter);
        matmul_rows(gate_up, rows, inter, m->down_panels[layer], dim, 0, resid, resid);
    }
    for (int b = 0; b < batch; b++)
        rms_norm_rows(resid + (int64_t)(b * n + n - 1) * dim, 1, dim, m->final_norm, m->eps, out + (int64_t)b * dim);
    return 0;
}
