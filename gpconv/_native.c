/*
 * gpconv._native: the io block's two data-movement kernels on the CPU, in float32.
 *
 *   interleave(src, dst, n, c, g)          dst (n, g, c)  <- src (n, c, g)   per token a (c, g) -> (g, c) transpose
 *   uninterleave_add(src, dst, n, c, g)    dst (n, c, g) += src (g, n, c)    the backward's scatter, as an add
 *
 * Both are the interleave of the kphi-3 block: channel i*g + k of a token is channel k*c + i of its
 * interleaved copy. torch does them as a strided elementwise copy, one scalar load per element at
 * a stride of g floats (about 3x a plain copy for Phi-3's down_proj, docs/speed.md). Here each token
 * is transposed in 16 x 16 tiles held in AVX-512 registers, which runs near plain-copy speed. CPUs
 * without AVX-512 get a cache-tiled scalar loop (still a little faster than torch's).
 *
 * Pointers come from Python as integers (tensor.data_ptr()); the Python side (gpconv/layers.py)
 * checks dtype, contiguity and shapes before calling. The GIL is released while copying, and
 * `threads` > 1 splits the tokens over that many pthreads.
 *
 * Optional: setup.py builds it with optional=True, and gpconv falls back to torch's copy when it
 * is missing or GPCONV_NATIVE=0.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define GPCONV_X86 1
#include <immintrin.h>
#endif

typedef struct {
    const float *src;
    float *dst;
    int64_t n0, n1, n, c, g;
    int kind; /* 0 interleave, 1 uninterleave_add */
} job_t;

static int have_avx512 = 0;

/* ---- portable versions: 16-wide tiles so both the reads and the writes stay in cache lines ---- */

static void interleave_scalar(const float *src, float *dst, int64_t n0, int64_t n1, int64_t c, int64_t g) {
    for (int64_t t = n0; t < n1; t++) {
        const float *s = src + t * c * g; /* (c, g) */
        float *d = dst + t * c * g;       /* (g, c) */
        for (int64_t i0 = 0; i0 < c; i0 += 16) {
            int64_t ie = i0 + 16 < c ? i0 + 16 : c;
            for (int64_t k = 0; k < g; k++)
                for (int64_t i = i0; i < ie; i++) d[k * c + i] = s[i * g + k];
        }
    }
}

static void uninterleave_add_scalar(const float *src, float *dst, int64_t n0, int64_t n1, int64_t n, int64_t c,
                                    int64_t g) {
    for (int64_t t = n0; t < n1; t++) {
        float *d = dst + t * c * g; /* (c, g) */
        for (int64_t k = 0; k < g; k++) {
            const float *s = src + (k * n + t) * c; /* row (k, t) of (g, n, c) */
            for (int64_t i = 0; i < c; i++) d[i * g + k] += s[i];
        }
    }
}

#ifdef GPCONV_X86
/* r[j] holds row j of a 16 x 16 tile; on return r[j] holds column j. */
__attribute__((target("avx512f"))) static inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int j = 0; j < 8; j++) { /* 2 x 2 blocks of floats */
        t[2 * j] = _mm512_unpacklo_ps(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_ps(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) { /* 4 x 4 blocks: pairs of floats moved as doubles */
        __m512d a0 = _mm512_castps_pd(t[4 * j]), a1 = _mm512_castps_pd(t[4 * j + 1]);
        __m512d a2 = _mm512_castps_pd(t[4 * j + 2]), a3 = _mm512_castps_pd(t[4 * j + 3]);
        r[4 * j] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
        r[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
        r[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
        r[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
    }
    for (int j = 0; j < 4; j++) { /* 128-bit lanes, twice */
        t[j] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0x88);
        t[j + 4] = _mm512_shuffle_f32x4(r[j], r[j + 4], 0xdd);
        t[j + 8] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0x88);
        t[j + 12] = _mm512_shuffle_f32x4(r[j + 8], r[j + 12], 0xdd);
    }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

__attribute__((target("avx512f"))) static void interleave_avx512(const float *src, float *dst, int64_t n0,
                                                                  int64_t n1, int64_t c, int64_t g) {
    for (int64_t t = n0; t < n1; t++) {
        const float *s = src + t * c * g; /* (c, g) */
        float *d = dst + t * c * g;       /* (g, c) */
        for (int64_t k0 = 0; k0 < g; k0 += 16) {
            int kw = (int)(g - k0 < 16 ? g - k0 : 16); /* columns in this tile: g need not be a multiple of 16 */
            __mmask16 m = (__mmask16)((1u << kw) - 1);
            int64_t i0 = 0;
            for (; i0 + 16 <= c; i0 += 16) {
                __m512 r[16];
                for (int j = 0; j < 16; j++) r[j] = _mm512_maskz_loadu_ps(m, s + (i0 + j) * g + k0);
                transpose16(r); /* r[j]: channel k0 + j of tokens rows i0 .. i0 + 15 */
                for (int j = 0; j < kw; j++) _mm512_storeu_ps(d + (k0 + j) * c + i0, r[j]);
            }
            for (; i0 < c; i0++) /* c not a multiple of 16: the last rows one by one */
                for (int64_t k = k0; k < k0 + kw; k++) d[k * c + i0] = s[i0 * g + k];
        }
    }
}

__attribute__((target("avx512f"))) static void uninterleave_add_avx512(const float *src, float *dst, int64_t n0,
                                                                        int64_t n1, int64_t n, int64_t c, int64_t g) {
    for (int64_t t = n0; t < n1; t++) {
        float *d = dst + t * c * g; /* (c, g) */
        for (int64_t k0 = 0; k0 < g; k0 += 16) {
            int kw = (int)(g - k0 < 16 ? g - k0 : 16);
            __mmask16 m = (__mmask16)((1u << kw) - 1);
            int64_t i0 = 0;
            for (; i0 + 16 <= c; i0 += 16) {
                __m512 r[16];
                for (int j = 0; j < 16; j++) /* row j: group k0 + j, token t, channels i0 .. i0 + 15 */
                    r[j] = j < kw ? _mm512_loadu_ps(src + ((k0 + j) * n + t) * c + i0) : _mm512_setzero_ps();
                transpose16(r); /* r[j]: channel i0 + j across groups k0 .. k0 + 15 */
                for (int j = 0; j < 16; j++) {
                    float *p = d + (i0 + j) * g + k0;
                    _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), r[j]));
                }
            }
            for (; i0 < c; i0++)
                for (int64_t k = k0; k < k0 + kw; k++) d[i0 * g + k] += src[(k * n + t) * c + i0];
        }
    }
}
#endif

static void run_job(job_t *j) {
#ifdef GPCONV_X86
    if (have_avx512) {
        if (j->kind == 0)
            interleave_avx512(j->src, j->dst, j->n0, j->n1, j->c, j->g);
        else
            uninterleave_add_avx512(j->src, j->dst, j->n0, j->n1, j->n, j->c, j->g);
        return;
    }
#endif
    if (j->kind == 0)
        interleave_scalar(j->src, j->dst, j->n0, j->n1, j->c, j->g);
    else
        uninterleave_add_scalar(j->src, j->dst, j->n0, j->n1, j->n, j->c, j->g);
}

static void *thread_main(void *arg) {
    run_job((job_t *)arg);
    return NULL;
}

#define MAX_THREADS 64

/* Split tokens over `threads` workers (the caller's thread is one of them). */
static void run_split(const float *src, float *dst, int64_t n, int64_t c, int64_t g, int kind, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > n) threads = (int)(n > 0 ? n : 1);
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int w = 0; w < threads; w++) {
        jobs[w] = (job_t){src, dst, n * w / threads, n * (w + 1) / threads, n, c, g, kind};
    }
    for (int w = 1; w < threads; w++) started[w] = pthread_create(&tid[w], NULL, thread_main, &jobs[w]) == 0;
    run_job(&jobs[0]);
    for (int w = 1; w < threads; w++) {
        if (started[w])
            pthread_join(tid[w], NULL);
        else
            run_job(&jobs[w]); /* could not start a thread: do its share here */
    }
}

static PyObject *call(PyObject *args, int kind) {
    unsigned long long src, dst;
    long long n, c, g;
    int threads = 1;
    if (!PyArg_ParseTuple(args, "KKLLL|i", &src, &dst, &n, &c, &g, &threads)) return NULL;
    if (n < 0 || c < 1 || g < 1) {
        PyErr_SetString(PyExc_ValueError, "gpconv._native: need n >= 0, c >= 1, g >= 1");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    run_split((const float *)(uintptr_t)src, (float *)(uintptr_t)dst, n, c, g, kind, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_interleave(PyObject *self, PyObject *args) { return call(args, 0); }
static PyObject *py_uninterleave_add(PyObject *self, PyObject *args) { return call(args, 1); }

/* Tests run both versions on an AVX-512 machine: set_avx512(False) forces the portable loops. */
static PyObject *py_set_avx512(PyObject *self, PyObject *args) {
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    int before = have_avx512;
#ifdef GPCONV_X86
    __builtin_cpu_init();
    have_avx512 = on && __builtin_cpu_supports("avx512f");
#endif
    return PyBool_FromLong(before);
}

static PyMethodDef methods[] = {
    {"interleave", py_interleave, METH_VARARGS,
     "interleave(src_ptr, dst_ptr, n, c, g, threads=1): float32 dst (n, g, c) <- src (n, c, g)."},
    {"uninterleave_add", py_uninterleave_add, METH_VARARGS,
     "uninterleave_add(src_ptr, dst_ptr, n, c, g, threads=1): float32 dst (n, c, g) += src (g, n, c) permuted."},
    {"set_avx512", py_set_avx512, METH_VARARGS,
     "set_avx512(on) -> bool: use the AVX-512 kernels when the CPU has them (on) or the portable ones; returns the old setting."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", "gpconv's CPU data-movement kernels.", -1,
                                    methods};

PyMODINIT_FUNC PyInit__native(void) {
#ifdef GPCONV_X86
    __builtin_cpu_init();
    have_avx512 = __builtin_cpu_supports("avx512f");
#endif
    PyObject *m = PyModule_Create(&module);
    return m;
}
