/* An interpreter of recorded aten tapes: the potential and its gradient, in C.
 *
 * ppl_notes/native/tape.py records one evaluation of a story's potential and
 * gradient as the sequence of aten operations it ran, and translates it into the
 * instruction stream this file executes. Every tensor lives in one float64 arena:
 * an operand is an arena offset with a stride per dimension, so views cost nothing
 * and every instruction is a strided loop. The translation proves nothing about the
 * story; the caller checks the tape against the story at prior draws before using it.
 *
 * Instruction layouts (int64 words; "desc" is a base offset then one stride per dim):
 *   MAP      fn nin ndim round pidx sizes[ndim] out-desc in-desc * nin
 *   REDUCE   kind nout nred round pidx outsizes[nout] redsizes[nred]
 *            out-desc(nout) in-base in-strides[nout] in-strides[nred]
 *   SCAN     kind nout round pidx outsizes[nout] n out-desc(nout) out-stride
 *            in-desc(nout) in-stride
 *   MATMUL   nb round bsizes[nb] M K N  out(base bstr[nb] sm sn)
 *            a(base bstr[nb] sm sk) b(base bstr[nb] sk sn)
 *   CHOL     nb bsizes[nb] n out(base bstr[nb] sr sc) in(base bstr[nb] sr sc)
 *   TRISOLVE nb upper unit bsizes[nb] n k out(...) a(...) b(...)
 *   GATHER   ndim round pidx sizes[ndim] out-desc count addr[count]
 *   LU       nb det bsizes[nb] n lu(...) pivots(...) [sign(...) logdet(...) | det(...)]
 *            in(...)
 *   LUSOLVE  nb adjoint bsizes[nb] n k out(...) lu(...) pivots(...) b(...)
 *   SORT     ndim dim descending k sizes[ndim] values-desc indices-desc in-desc
 *   INDEXED  ndim dim mode n sizes[ndim] out-desc index-desc src-desc
 *   SCATTER  count src[count] dst[count]
 * "round" stores a result as float32 (1), an integer (2, truncated) or a bool (3).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { I_MAP = 1, I_REDUCE, I_SCAN, I_MATMUL, I_CHOL, I_TRISOLVE, I_GATHER, I_SCATTER,
       I_LU, I_LUSOLVE, I_SORT, I_INDEXED };

enum {
    F_CONST = 0, F_COPY, F_ADD, F_SUB, F_MUL, F_DIV, F_AFFINE, F_POW, F_POWT, F_RPOW,
    F_EXP, F_LOG, F_LOG1P, F_EXPM1, F_SQRT, F_RSQRT, F_ABS, F_SIGN, F_SIGMOID, F_TANH,
    F_LGAMMA, F_DIGAMMA, F_ERF, F_ERFC, F_RECIP, F_SIN, F_COS, F_SIGMOID_BW, F_TANH_BW,
    F_SOFTPLUS, F_SOFTPLUS_BW, F_LOGSIGMOID, F_LOGSIGMOID_BW, F_XLOGY, F_LT, F_LE, F_GT,
    F_GE, F_EQ, F_NE, F_AND, F_OR, F_NOT, F_WHERE, F_MASKED_FILL, F_CLAMP, F_MAXIMUM,
    F_MINIMUM, F_FLOOR, F_XLOG1PY, F_ATAN, F_LOG2, F_EXP2, F_SQUARE, F_CEIL, F_ROUND,
    F_TRUNC, F_LOGADDEXP, F_POLYGAMMA, F_BCE_LOGITS
};

enum { R_SUM = 0, R_PROD, R_MAX, R_MIN, R_LOGSUMEXP, R_ARGMAX, R_ARGMIN, R_ANY, R_ALL };
enum { S_CUMSUM = 0, S_CUMPROD, S_LOGCUMSUMEXP };

#define MAXDIM 12
#define PI 3.14159265358979323846

static double digamma(double x) {
    if (x == 0) return -INFINITY;  /* torch: digamma(0) = -inf */
    double result = 0;
    if (x < 0) {
        if (x == floor(x)) return NAN;
        /* reflection: psi(1 - x) - psi(x) = pi cot(pi x) */
        return digamma(1 - x) - PI / tan(PI * x);
    }
    while (x < 10) { result -= 1 / x; x += 1; }
    double f = 1 / (x * x);
    return result + log(x) - 0.5 / x
        - f * (1.0 / 12 - f * (1.0 / 120 - f * (1.0 / 252 - f * (1.0 / 240 - f / 132))));
}

/* psi^(n)(x), n >= 1: the recurrence up to x >= 20 + n, then the asymptotic series
 * (-1)^(n+1) [(n-1)!/x^n + n!/(2x^(n+1)) + sum_k B_2k (2k+n-1)!/((2k)! x^(2k+n))]. */
static double polygamma(double n, double x) {
    if (x <= 0 && x == floor(x)) return NAN;
    if (x < 0) return NAN;  /* no reflection for n >= 1 here */
    static const double bernoulli[] = {1.0 / 6, -1.0 / 30, 1.0 / 42, -1.0 / 30, 5.0 / 66,
                                       -691.0 / 2730, 7.0 / 6};
    double sign = fmod(n, 2) == 1 ? 1 : -1;  /* (-1)^(n+1) */
    double factorial = tgamma(n + 1), shift = 0;
    while (x < 20 + n) { shift += factorial / pow(x, n + 1); x += 1; }
    double series = tgamma(n) / pow(x, n) + factorial / (2 * pow(x, n + 1));
    for (int k = 1; k <= 7; k++)
        series += bernoulli[k - 1] * exp(lgamma(2 * k + n) - lgamma(2 * k + 1)) / pow(x, 2 * k + n);
    return sign * (series + shift);
}

static inline double store(double v, int64_t round) {
    switch (round) {
    case 1: return (double)(float)v;
    case 2: return trunc(v);
    case 3: return v != 0;
    default: return v;
    }
}

static double power(double a, double e) {
    if (e == 2) return a * a;
    if (e == 1) return a;
    if (e == 0.5) return sqrt(a);
    if (e == -1) return 1 / a;
    if (e == 3) return a * a * a;
    if (e == -2) return 1 / (a * a);
    if (e == 0) return 1;
    return pow(a, e);
}

static double softplus_bw(double g, double x, double beta, double threshold) {
    double z = exp(x * beta);
    return x * beta > threshold ? g : g * z / (z + 1);
}

static double logaddexp(double a, double b) {
    double m = a > b ? a : b;
    if (m == -INFINITY) return m;
    return m + log1p(exp(-fabs(a - b)));
}

/* Every elementwise function: X(code, expression of a, b, c and the parameters p). */
#define FUNCTIONS(X) \
    X(F_CONST, p0) \
    X(F_COPY, a) \
    X(F_ADD, a + p0 * b) \
    X(F_SUB, a - p0 * b) \
    X(F_MUL, a * b) \
    X(F_DIV, a / b) \
    X(F_AFFINE, p1 * a + p0) \
    X(F_POW, power(a, p0)) \
    X(F_POWT, pow(a, b)) \
    X(F_RPOW, pow(p0, a)) \
    X(F_EXP, exp(a)) \
    X(F_LOG, log(a)) \
    X(F_LOG1P, log1p(a)) \
    X(F_EXPM1, expm1(a)) \
    X(F_SQRT, sqrt(a)) \
    X(F_RSQRT, 1 / sqrt(a)) \
    X(F_ABS, fabs(a)) \
    X(F_SIGN, a != a ? a : (double)((a > 0) - (a < 0))) \
    X(F_SIGMOID, 1 / (1 + exp(-a))) \
    X(F_TANH, tanh(a)) \
    X(F_LGAMMA, lgamma(a)) \
    X(F_DIGAMMA, digamma(a)) \
    X(F_POLYGAMMA, polygamma(p0, a)) \
    X(F_ERF, erf(a)) \
    X(F_ERFC, erfc(a)) \
    X(F_RECIP, 1 / a) \
    X(F_SIN, sin(a)) \
    X(F_COS, cos(a)) \
    X(F_SIGMOID_BW, a * b * (1 - b)) \
    X(F_TANH_BW, a * (1 - b * b)) \
    X(F_SOFTPLUS, a * p0 > p1 ? a : log1p(exp(a * p0)) / p0) \
    X(F_SOFTPLUS_BW, softplus_bw(a, b, p0, p1)) \
    X(F_LOGSIGMOID, (a < 0 ? a : 0) - log1p(exp(-fabs(a)))) \
    X(F_LOGSIGMOID_BW, a / (1 + exp(b))) \
    X(F_XLOGY, b != b ? b : (a == 0 ? 0 : a * log(b))) \
    X(F_XLOG1PY, b != b ? b : (a == 0 ? 0 : a * log1p(b))) \
    X(F_LT, a < b) \
    X(F_LE, a <= b) \
    X(F_GT, a > b) \
    X(F_GE, a >= b) \
    X(F_EQ, a == b) \
    X(F_NE, a != b) \
    X(F_AND, (a != 0) && (b != 0)) \
    X(F_OR, (a != 0) || (b != 0)) \
    X(F_NOT, a == 0) \
    X(F_WHERE, a != 0 ? b : c) \
    X(F_MASKED_FILL, b != 0 ? p0 : a) \
    X(F_CLAMP, a < p0 ? p0 : (a > p1 ? p1 : a)) \
    X(F_MAXIMUM, (a != a || b != b) ? NAN : (a > b ? a : b)) \
    X(F_MINIMUM, (a != a || b != b) ? NAN : (a < b ? a : b)) \
    X(F_FLOOR, floor(a)) \
    X(F_CEIL, ceil(a)) \
    X(F_ROUND, nearbyint(a)) \
    X(F_TRUNC, trunc(a)) \
    X(F_ATAN, atan(a)) \
    X(F_LOG2, log2(a)) \
    X(F_EXP2, exp2(a)) \
    X(F_SQUARE, a * a) \
    X(F_LOGADDEXP, logaddexp(a, b)) \
    X(F_BCE_LOGITS, (1 - b) * a - ((a < 0 ? a : 0) - log1p(exp(-fabs(a)))))

/* out[i] = fn(a[i], b[i], c[i]) over an ndim-dimensional strided index space. */
static const int64_t *run_map(double *arena, const int64_t *w, const double *params) {
    int64_t fn = w[0], nin = w[1], ndim = w[2], round = w[3];
    const double *p = params + w[4];
    const int64_t *sizes = w + 5;
    const int64_t *desc = sizes + ndim;
    double *out = arena + desc[0];
    const int64_t *ostr = desc + 1;
    const double *in[3] = {out, out, out};
    const int64_t *istr[3] = {ostr, ostr, ostr};
    for (int64_t k = 0; k < nin; k++) {
        const int64_t *d = desc + (1 + ndim) * (k + 1);
        in[k] = arena + d[0];
        istr[k] = d + 1;
    }
    int64_t index[MAXDIM] = {0};
    int64_t last = ndim - 1, n = sizes[last];
    int64_t so = ostr[last], s0 = istr[0][last], s1 = istr[1][last], s2 = istr[2][last];
    int contiguous = so == 1 && s0 == 1 && s1 == 1 && s2 == 1;
    /* every input constant along the inner loop (a broadcast): compute once, then fill */
    int uniform = nin > 0 && (nin < 1 || s0 == 0) && (nin < 2 || s1 == 0) && (nin < 3 || s2 == 0);
    int64_t m = uniform ? 1 : n;
    double p0 = p[0], p1 = p[1];
    int64_t outer = 1;
    for (int64_t d = 0; d < last; d++) outer *= sizes[d];
    for (int64_t o = 0; o < outer; o++) {
        int64_t oo = 0, i0 = 0, i1 = 0, i2 = 0;
        for (int64_t d = 0; d < last; d++) {
            oo += index[d] * ostr[d];
            i0 += index[d] * istr[0][d];
            i1 += index[d] * istr[1][d];
            i2 += index[d] * istr[2][d];
        }
        double *O = out + oo;
        const double *A = in[0] + i0, *B = in[1] + i1, *C = in[2] + i2;
        /* one loop per function; the contiguous one is left to the vectoriser */
#define LOOP(code, expression) \
        case code: \
            if (contiguous) \
                for (int64_t i = 0; i < m; i++) { \
                    double a = A[i], b = B[i], c = C[i]; (void)a; (void)b; (void)c; \
                    O[i] = (expression); \
                } \
            else \
                for (int64_t i = 0; i < m; i++) { \
                    double a = A[i * s0], b = B[i * s1], c = C[i * s2]; \
                    (void)a; (void)b; (void)c; \
                    O[i * so] = (expression); \
                } \
            break;
        switch (fn) { FUNCTIONS(LOOP) default: break; }
#undef LOOP
        if (uniform)
            for (int64_t i = 1; i < n; i++) O[i * so] = O[0];
        if (round)
            for (int64_t i = 0; i < n; i++) O[i * so] = store(O[i * so], round);
        for (int64_t d = last - 1; d >= 0; d--) {
            if (++index[d] < sizes[d]) break;
            index[d] = 0;
        }
    }
    return desc + (1 + ndim) * (nin + 1);
}

/* Reduce the trailing nred dimensions of a strided input into each output element. */
static const int64_t *run_reduce(double *arena, const int64_t *w, const double *params) {
    int64_t kind = w[0], nout = w[1], nred = w[2], round = w[3];
    const double *p = params + w[4];
    const int64_t *osizes = w + 5, *rsizes = osizes + nout;
    const int64_t *odesc = rsizes + nred;
    const int64_t *idesc = odesc + 1 + nout;
    const int64_t *iostr = idesc + 1, *irstr = iostr + nout;
    double *out = arena + odesc[0];
    const double *in = arena + idesc[0];
    int64_t oindex[MAXDIM] = {0}, rindex[MAXDIM] = {0};
    int64_t outer = 1, count = 1;
    for (int64_t d = 0; d < nout; d++) outer *= osizes[d];
    for (int64_t d = 0; d < nred; d++) count *= rsizes[d];
    for (int64_t o = 0; o < outer; o++) {
        int64_t oo = 0, io = 0, inner = count;
        for (int64_t d = 0; d < nout; d++) {
            oo += oindex[d] * odesc[1 + d];
            io += oindex[d] * iostr[d];
        }
        double acc, best = 0;
        int64_t arg = 0;
        switch (kind) {
        case R_PROD: case R_ALL: acc = 1; break;
        case R_MAX: case R_ARGMAX: case R_LOGSUMEXP: acc = -INFINITY; break;
        case R_MIN: case R_ARGMIN: acc = INFINITY; break;
        default: acc = 0;
        }
        int nan = 0;
        if (nred == 1 && (kind == R_SUM || kind == R_PROD)) {  /* the common case, tight */
            const double *I = in + io;
            int64_t s = irstr[0];
            if (kind == R_SUM) {  /* four partial sums: the adds' latency overlaps */
                double a0 = 0, a1 = 0, a2 = 0, a3 = 0;
                int64_t r = 0;
                for (; r + 4 <= inner; r += 4) {
                    a0 += I[r * s]; a1 += I[(r + 1) * s];
                    a2 += I[(r + 2) * s]; a3 += I[(r + 3) * s];
                }
                for (; r < inner; r++) a0 += I[r * s];
                acc = (a0 + a1) + (a2 + a3);
            } else for (int64_t r = 0; r < inner; r++) acc *= I[r * s];
            inner = 0;  /* done: skip the general loop below */
        }
        memset(rindex, 0, sizeof rindex);
        for (int64_t r = 0; r < inner; r++) {
            int64_t off = io;
            for (int64_t d = 0; d < nred; d++) off += rindex[d] * irstr[d];
            double v = in[off];
            switch (kind) {
            case R_SUM: acc += v; break;
            case R_PROD: acc *= v; break;
            case R_MAX: case R_LOGSUMEXP: if (v != v) nan = 1; else if (v > acc) acc = v; break;
            case R_MIN: if (v != v) nan = 1; else if (v < acc) acc = v; break;
            case R_ARGMAX: if (!nan && (v != v || v > acc || r == 0)) { acc = v; arg = r; nan = v != v; } break;
            case R_ARGMIN: if (!nan && (v != v || v < acc || r == 0)) { acc = v; arg = r; nan = v != v; } break;
            case R_ANY: acc = acc || v != 0; break;
            case R_ALL: acc = acc && v != 0; break;
            }
            for (int64_t d = nred - 1; d >= 0; d--) {
                if (++rindex[d] < rsizes[d]) break;
                rindex[d] = 0;
            }
        }
        if (kind == R_LOGSUMEXP && !nan) {
            best = acc;
            double sum = 0;
            memset(rindex, 0, sizeof rindex);
            for (int64_t r = 0; r < count; r++) {
                int64_t off = io;
                for (int64_t d = 0; d < nred; d++) off += rindex[d] * irstr[d];
                if (isfinite(best)) sum += exp(in[off] - best);
                else sum += in[off] == best ? 1 : 0;
                for (int64_t d = nred - 1; d >= 0; d--) {
                    if (++rindex[d] < rsizes[d]) break;
                    rindex[d] = 0;
                }
            }
            acc = isinf(best) && best < 0 ? best : best + log(sum);
            if (isinf(best) && best > 0) acc = best;
        }
        if ((kind == R_MAX || kind == R_MIN || kind == R_LOGSUMEXP) && nan) acc = NAN;
        if (kind == R_ARGMAX || kind == R_ARGMIN) acc = (double)arg;
        if (kind == R_SUM) acc *= p[0];
        out[oo] = store(acc, round);
        for (int64_t d = nout - 1; d >= 0; d--) {
            if (++oindex[d] < osizes[d]) break;
            oindex[d] = 0;
        }
    }
    return irstr + nred;
}

static const int64_t *run_scan(double *arena, const int64_t *w, const double *params) {
    int64_t kind = w[0], nout = w[1], round = w[2];
    (void)params;
    const int64_t *osizes = w + 4;
    int64_t n = osizes[nout];
    const int64_t *odesc = osizes + nout + 1;
    int64_t oscan = odesc[1 + nout];
    const int64_t *idesc = odesc + 2 + nout;
    int64_t iscan = idesc[1 + nout];
    int64_t index[MAXDIM] = {0}, outer = 1;
    for (int64_t d = 0; d < nout; d++) outer *= osizes[d];
    for (int64_t o = 0; o < outer; o++) {
        int64_t oo = odesc[0], io = idesc[0];
        for (int64_t d = 0; d < nout; d++) {
            oo += index[d] * odesc[1 + d];
            io += index[d] * idesc[1 + d];
        }
        double acc = kind == S_CUMPROD ? 1 : (kind == S_LOGCUMSUMEXP ? -INFINITY : 0);
        for (int64_t i = 0; i < n; i++) {
            double v = arena[io + i * iscan];
            if (kind == S_CUMSUM) acc += v;
            else if (kind == S_CUMPROD) acc *= v;
            else {
                double m = acc > v ? acc : v;
                acc = m == -INFINITY ? m : m + log1p(exp(-fabs(acc - v)));
            }
            arena[oo + i * oscan] = store(acc, round);
        }
        for (int64_t d = nout - 1; d >= 0; d--) {
            if (++index[d] < osizes[d]) break;
            index[d] = 0;
        }
    }
    return idesc + 2 + nout;
}

/* Iterate the batch dimensions of a batched matrix instruction: offsets of 3 operands. */
typedef struct { int64_t nb, count; const int64_t *sizes; } batch_t;

static void batch_offsets(batch_t b, int64_t flat, const int64_t *s0, const int64_t *s1,
                          const int64_t *s2, int64_t *o0, int64_t *o1, int64_t *o2) {
    *o0 = *o1 = *o2 = 0;
    for (int64_t d = b.nb - 1; d >= 0; d--) {
        int64_t i = flat % b.sizes[d];
        flat /= b.sizes[d];
        *o0 += i * s0[d];
        *o1 += i * s1[d];
        if (s2) *o2 += i * s2[d];
    }
}

/* One batched matrix operand: base, a stride per batch dimension, row and column stride. */
typedef struct { int64_t base; const int64_t *batch_strides; int64_t rows, cols; } matrix_t;

static matrix_t matrix_at(const int64_t *desc, int64_t nb) {
    matrix_t m = {desc[0], desc + 1, desc[1 + nb], desc[2 + nb]};
    return m;
}

static batch_t batch_of(int64_t nb, const int64_t *sizes) {
    batch_t batch = {nb, 1, sizes};
    for (int64_t d = 0; d < nb; d++) batch.count *= sizes[d];
    return batch;
}

/* Two doubles in one SSE2 register (GCC and Clang vector extension); loads and stores go
   through memcpy, which compiles to unaligned moves. Products are not fused into adds
   (-ffp-contract=off), so a lane rounds as the scalar code does. */
typedef double pair_t __attribute__((vector_size(16)));

static inline pair_t load_pair(const double *p) { pair_t v; memcpy(&v, p, sizeof v); return v; }

/* Largest panels kept on the stack: B's 4 columns packed (MAX_PACK rows), and the whole
   output of a long product accumulated by rank-1 updates (MAX_RANK1 elements). */
#define MAX_PACK 2048
#define MAX_RANK1 256

/* One M x K by K x N product, O = A B, strided operands (m: row, n/k: column strides).
   Each output element sums its K products in order k = 0, 1, ..., whichever of the
   three kernels below runs, so they agree to the bit. */
#define MATMUL_ARGS double *O, const double *A, const double *B, int64_t M, int64_t K, \
    int64_t N, int64_t osm, int64_t osn, int64_t asm_, int64_t ask, int64_t bsk, int64_t bsn

/* Rank-1 updates over k into a local output: A is read once, not once per row tile
   (for X^T r in a gradient: A's rows contiguous, a small output, a long K). */
static void matmul_rank1(MATMUL_ARGS) {
    double acc[MAX_RANK1];
    memset(acc, 0, (size_t)(M * N) * sizeof(double));
    for (int64_t k = 0; k < K; k++) {
        const double *Ak = A + k * ask;
        for (int64_t j = 0; j < N; j++) {
            double bkj = B[k * bsk + j * bsn], *Cj = acc + j * M;
            for (int64_t i = 0; i < M; i++) Cj[i] += Ak[i * asm_] * bkj;
        }
    }
    for (int64_t j = 0; j < N; j++)
        for (int64_t i = 0; i < M; i++) O[i * osm + j * osn] = acc[j * M + i];
}

/* Row tiles of 2 x 4 accumulated in registers, over B's columns j0 .. N-1. */
static void matmul_tiles(MATMUL_ARGS, int64_t j0) {
    int64_t i = 0;
    for (; i + 2 <= M; i += 2) {
        const double *A0 = A + i * asm_, *A1 = A0 + asm_;
        int64_t j = j0;
        for (; j + 4 <= N; j += 4) {
            double c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
            const double *Bj = B + j * bsn;
            for (int64_t k = 0; k < K; k++) {
                double a0 = A0[k * ask], a1 = A1[k * ask];
                const double *b = Bj + k * bsk;
                double b0 = b[0], b1 = b[bsn], b2 = b[2 * bsn], b3 = b[3 * bsn];
                c00 += a0 * b0; c01 += a0 * b1; c02 += a0 * b2; c03 += a0 * b3;
                c10 += a1 * b0; c11 += a1 * b1; c12 += a1 * b2; c13 += a1 * b3;
            }
            double *o0 = O + i * osm + j * osn, *o1 = o0 + osm;
            o0[0] = c00; o0[osn] = c01; o0[2 * osn] = c02; o0[3 * osn] = c03;
            o1[0] = c10; o1[osn] = c11; o1[2 * osn] = c12; o1[3 * osn] = c13;
        }
        for (; j < N; j++) {
            double c0 = 0, c1 = 0;
            for (int64_t k = 0; k < K; k++) {
                double bk = B[k * bsk + j * bsn];
                c0 += A0[k * ask] * bk;
                c1 += A1[k * ask] * bk;
            }
            O[i * osm + j * osn] = c0;
            O[(i + 1) * osm + j * osn] = c1;
        }
    }
    for (; i < M; i++)
        for (int64_t j = j0; j < N; j++) {
            double c = 0;
            for (int64_t k = 0; k < K; k++) c += A[i * asm_ + k * ask] * B[k * bsk + j * bsn];
            O[i * osm + j * osn] = c;
        }
}

/* Each 4-column panel of B packed once into pairs, then 2 x 4 tiles in SSE2 registers;
   the columns past the last whole panel go to matmul_tiles. */
static void matmul_packed(MATMUL_ARGS) {
    double panel[4 * MAX_PACK];
    int64_t j = 0;
    for (; j + 4 <= N; j += 4) {
        const double *Bj = B + j * bsn;
        for (int64_t k = 0; k < K; k++)
            for (int64_t c = 0; c < 4; c++) panel[4 * k + c] = Bj[k * bsk + c * bsn];
        int64_t i = 0;
        for (; i + 2 <= M; i += 2) {
            const double *A0 = A + i * asm_, *A1 = A0 + asm_;
            pair_t c00 = {0, 0}, c02 = {0, 0}, c10 = {0, 0}, c12 = {0, 0};
            for (int64_t k = 0; k < K; k++) {
                pair_t a0 = {A0[k * ask], A0[k * ask]}, a1 = {A1[k * ask], A1[k * ask]};
                pair_t b01 = load_pair(panel + 4 * k), b23 = load_pair(panel + 4 * k + 2);
                c00 += a0 * b01; c02 += a0 * b23;
                c10 += a1 * b01; c12 += a1 * b23;
            }
            double *o0 = O + i * osm + j * osn, *o1 = o0 + osm;
            o0[0] = c00[0]; o0[osn] = c00[1]; o0[2 * osn] = c02[0]; o0[3 * osn] = c02[1];
            o1[0] = c10[0]; o1[osn] = c10[1]; o1[2 * osn] = c12[0]; o1[3 * osn] = c12[1];
        }
        for (; i < M; i++)
            for (int64_t c = 0; c < 4; c++) {
                double v = 0;
                for (int64_t k = 0; k < K; k++) v += A[i * asm_ + k * ask] * panel[4 * k + c];
                O[i * osm + (j + c) * osn] = v;
            }
    }
    if (j < N) matmul_tiles(O, A, B, M, K, N, osm, osn, asm_, ask, bsk, bsn, j);
}

static void matmul_one(MATMUL_ARGS) {
    if (asm_ == 1 && M * N <= MAX_RANK1 && K >= 16)
        matmul_rank1(O, A, B, M, K, N, osm, osn, asm_, ask, bsk, bsn);
    else if (K <= MAX_PACK && N >= 4)
        matmul_packed(O, A, B, M, K, N, osm, osn, asm_, ask, bsk, bsn);
    else
        matmul_tiles(O, A, B, M, K, N, osm, osn, asm_, ask, bsk, bsn, 0);
}

static const int64_t *run_matmul(double *arena, const int64_t *w) {
    int64_t nb = w[0], round = w[1];
    const int64_t *bsizes = w + 2;
    int64_t M = bsizes[nb], K = bsizes[nb + 1], N = bsizes[nb + 2];
    const int64_t *o = bsizes + nb + 3, *a = o + nb + 3, *b = a + nb + 3;
    matrix_t mo = matrix_at(o, nb), ma = matrix_at(a, nb), mb = matrix_at(b, nb);
    batch_t batch = batch_of(nb, bsizes);
    for (int64_t t = 0; t < batch.count; t++) {
        int64_t oo, ao, bo;
        batch_offsets(batch, t, mo.batch_strides, ma.batch_strides, mb.batch_strides,
                      &oo, &ao, &bo);
        double *O = arena + mo.base + oo;
        matmul_one(O, arena + ma.base + ao, arena + mb.base + bo, M, K, N, mo.rows, mo.cols,
                   ma.rows, ma.cols, mb.rows, mb.cols);
        if (round)
            for (int64_t r = 0; r < M; r++)
                for (int64_t j = 0; j < N; j++)
                    O[r * mo.rows + j * mo.cols] = store(O[r * mo.rows + j * mo.cols], round);
    }
    return b + nb + 3;
}

/* Lower Cholesky factor of each matrix (its lower triangle is read); -1 if not SPD. */
static const int64_t *run_cholesky(double *arena, const int64_t *w, int *status) {
    int64_t nb = w[0];
    const int64_t *bsizes = w + 1;
    int64_t n = bsizes[nb];
    const int64_t *o = bsizes + nb + 1, *a = o + nb + 3;
    matrix_t mo = matrix_at(o, nb), ma = matrix_at(a, nb);
    batch_t batch = batch_of(nb, bsizes);
    int64_t osr = mo.rows, osc = mo.cols, asr = ma.rows, asc = ma.cols;
    for (int64_t t = 0; t < batch.count; t++) {
        int64_t oo, ao, unused;
        batch_offsets(batch, t, mo.batch_strides, ma.batch_strides, NULL, &oo, &ao, &unused);
        double *L = arena + mo.base + oo;
        const double *A = arena + ma.base + ao;
        for (int64_t j = 0; j < n; j++) {
            double s = A[j * asr + j * asc];
            for (int64_t k = 0; k < j; k++) s -= L[j * osr + k * osc] * L[j * osr + k * osc];
            if (!(s > 0)) { *status = -1; return a + nb + 3; }
            double d = sqrt(s);
            L[j * osr + j * osc] = d;
            for (int64_t i = j + 1; i < n; i++) {
                double v = A[i * asr + j * asc];
                for (int64_t k = 0; k < j; k++) v -= L[i * osr + k * osc] * L[j * osr + k * osc];
                L[i * osr + j * osc] = v / d;
            }
            for (int64_t i = 0; i < j; i++) L[i * osr + j * osc] = 0;
        }
    }
    return a + nb + 3;
}

/* X with A X = B, A triangular (n x n), B (n x k); X may not alias A. */
static const int64_t *run_trisolve(double *arena, const int64_t *w) {
    int64_t nb = w[0], upper = w[1], unit = w[2];
    const int64_t *bsizes = w + 3;
    int64_t n = bsizes[nb], k = bsizes[nb + 1];
    const int64_t *o = bsizes + nb + 2, *a = o + nb + 3, *b = a + nb + 3;
    matrix_t mo = matrix_at(o, nb), ma = matrix_at(a, nb), mb = matrix_at(b, nb);
    batch_t batch = batch_of(nb, bsizes);
    int64_t osr = mo.rows, osc = mo.cols, asr = ma.rows, asc = ma.cols;
    int64_t bsr = mb.rows, bsc = mb.cols;
    for (int64_t t = 0; t < batch.count; t++) {
        int64_t oo, ao, bo;
        batch_offsets(batch, t, mo.batch_strides, ma.batch_strides, mb.batch_strides,
                      &oo, &ao, &bo);
        double *X = arena + mo.base + oo;
        const double *A = arena + ma.base + ao, *B = arena + mb.base + bo;
        for (int64_t c = 0; c < k; c++) {
            double *Xc = X + c * osc;
            const double *Bc = B + c * bsc;
            if (upper)  /* back substitution: rows n-1 .. 0, each after the ones below it */
                for (int64_t i = n - 1; i >= 0; i--) {
                    double v = Bc[i * bsr];
                    for (int64_t j = i + 1; j < n; j++) v -= A[i * asr + j * asc] * Xc[j * osr];
                    Xc[i * osr] = unit ? v : v / A[i * asr + i * asc];
                }
            else  /* forward substitution */
                for (int64_t i = 0; i < n; i++) {
                    double v = Bc[i * bsr];
                    for (int64_t j = 0; j < i; j++) v -= A[i * asr + j * asc] * Xc[j * osr];
                    Xc[i * osr] = unit ? v : v / A[i * asr + i * asc];
                }
        }
    }
    return b + nb + 3;
}

/* The offset of one operand's matrix in the batch's `flat`-th position. */
static int64_t offset_at(batch_t b, int64_t flat, const int64_t *strides) {
    int64_t offset = 0;
    for (int64_t d = b.nb - 1; d >= 0; d--) {
        offset += (flat % b.sizes[d]) * strides[d];
        flat /= b.sizes[d];
    }
    return offset;
}

/* LU factorisation with partial pivoting, as LAPACK's getrf: A = P L U, L unit lower and
   U upper in one matrix, pivots 1-based (row k was swapped with row pivots[k] - 1); with
   `det` 1 the sign and log|det A| (sign 0, log -inf where A is singular: a zero pivot is
   left in place, as getrf leaves it), with `det` 2 det A itself. The pivots are point-dependent integers, held as
   doubles like every integer on the tape. */
static const int64_t *run_lu(double *arena, const int64_t *w) {
    int64_t nb = w[0], det = w[1];
    const int64_t *bsizes = w + 2;
    int64_t n = bsizes[nb];
    const int64_t *o = bsizes + nb + 1, *p = o + nb + 3, *s = p + nb + 3;
    const int64_t *l = s + nb + 3, *a = det == 1 ? l + nb + 3 : det == 2 ? l : s;
    matrix_t mo = matrix_at(o, nb), mp = matrix_at(p, nb), ma = matrix_at(a, nb);
    batch_t batch = batch_of(nb, bsizes);
    int64_t r = mo.rows, c = mo.cols;
    for (int64_t t = 0; t < batch.count; t++) {
        double *LU = arena + mo.base + offset_at(batch, t, mo.batch_strides);
        double *P = arena + mp.base + offset_at(batch, t, mp.batch_strides);
        const double *A = arena + ma.base + offset_at(batch, t, ma.batch_strides);
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < n; j++) LU[i * r + j * c] = A[i * ma.rows + j * ma.cols];
        double sign = 1, logdet = 0, product = 1;
        int singular = 0;
        for (int64_t k = 0; k < n; k++) {
            int64_t q = k;
            double largest = fabs(LU[k * r + k * c]);
            for (int64_t i = k + 1; i < n; i++)
                if (fabs(LU[i * r + k * c]) > largest) { largest = fabs(LU[i * r + k * c]); q = i; }
            P[k * mp.rows] = (double)(q + 1);
            if (q != k) {
                for (int64_t j = 0; j < n; j++) {
                    double swap = LU[k * r + j * c];
                    LU[k * r + j * c] = LU[q * r + j * c];
                    LU[q * r + j * c] = swap;
                }
                sign = -sign;
            }
            double d = LU[k * r + k * c];
            product *= q != k ? -d : d;
            if (d == 0) { singular = 1; continue; }
            if (d < 0) sign = -sign;
            logdet += log(fabs(d));
            for (int64_t i = k + 1; i < n; i++) {
                double f = LU[i * r + k * c] /= d;
                for (int64_t j = k + 1; j < n; j++) LU[i * r + j * c] -= f * LU[k * r + j * c];
            }
        }
        if (det == 2) {
            matrix_t ms = matrix_at(s, nb);
            arena[ms.base + offset_at(batch, t, ms.batch_strides)] = product;
        } else if (det == 1) {
            matrix_t ms = matrix_at(s, nb), ml = matrix_at(l, nb);
            arena[ms.base + offset_at(batch, t, ms.batch_strides)] = singular ? 0 : sign;
            arena[ml.base + offset_at(batch, t, ml.batch_strides)] = singular ? -INFINITY : logdet;
        }
    }
    return a + nb + 3;
}

/* X with A X = B (A^T X = B with `adjoint`), A = P L U from run_lu; -3 in `status` where
   a pivot is not one getrf could give (a translator bug: nothing is read outside A). */
static const int64_t *run_lusolve(double *arena, const int64_t *w, int *status) {
    int64_t nb = w[0], adjoint = w[1];
    const int64_t *bsizes = w + 2;
    int64_t n = bsizes[nb], k = bsizes[nb + 1];
    const int64_t *o = bsizes + nb + 2, *f = o + nb + 3, *p = f + nb + 3, *b = p + nb + 3;
    matrix_t mo = matrix_at(o, nb), mf = matrix_at(f, nb), mp = matrix_at(p, nb);
    matrix_t mb = matrix_at(b, nb);
    batch_t batch = batch_of(nb, bsizes);
    int64_t xr = mo.rows, xc = mo.cols, fr = mf.rows, fc = mf.cols;
    for (int64_t t = 0; t < batch.count; t++) {
        double *X = arena + mo.base + offset_at(batch, t, mo.batch_strides);
        const double *LU = arena + mf.base + offset_at(batch, t, mf.batch_strides);
        const double *P = arena + mp.base + offset_at(batch, t, mp.batch_strides);
        const double *B = arena + mb.base + offset_at(batch, t, mb.batch_strides);
        for (int64_t i = 0; i < n; i++) {
            double q = P[i * mp.rows];
            if (!(q >= (double)(i + 1) && q <= (double)n)) { *status = -3; return b + nb + 3; }
        }
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < k; j++) X[i * xr + j * xc] = B[i * mb.rows + j * mb.cols];
        for (int64_t j = 0; j < k; j++) {
            double *x = X + j * xc;
            if (!adjoint) {  /* P^T b, then L (unit lower), then U (upper) */
                for (int64_t i = 0; i < n; i++) {
                    int64_t q = (int64_t)P[i * mp.rows] - 1;
                    if (q != i) { double swap = x[i * xr]; x[i * xr] = x[q * xr]; x[q * xr] = swap; }
                }
                for (int64_t i = 0; i < n; i++) {
                    double v = x[i * xr];
                    for (int64_t m = 0; m < i; m++) v -= LU[i * fr + m * fc] * x[m * xr];
                    x[i * xr] = v;
                }
                for (int64_t i = n - 1; i >= 0; i--) {
                    double v = x[i * xr];
                    for (int64_t m = i + 1; m < n; m++) v -= LU[i * fr + m * fc] * x[m * xr];
                    x[i * xr] = v / LU[i * fr + i * fc];
                }
            } else {  /* U^T (lower), then L^T (unit upper), then P */
                for (int64_t i = 0; i < n; i++) {
                    double v = x[i * xr];
                    for (int64_t m = 0; m < i; m++) v -= LU[m * fr + i * fc] * x[m * xr];
                    x[i * xr] = v / LU[i * fr + i * fc];
                }
                for (int64_t i = n - 1; i >= 0; i--) {
                    double v = x[i * xr];
                    for (int64_t m = i + 1; m < n; m++) v -= LU[m * fr + i * fc] * x[m * xr];
                    x[i * xr] = v;
                }
                for (int64_t i = n - 1; i >= 0; i--) {
                    int64_t q = (int64_t)P[i * mp.rows] - 1;
                    if (q != i) { double swap = x[i * xr]; x[i * xr] = x[q * xr]; x[q * xr] = swap; }
                }
            }
        }
    }
    return b + nb + 3;
}

/* One element of a row being sorted: its value and its position in the row. */
typedef struct { double value; int64_t position; } ranked_t;

/* NaN after every number, as torch sorts; equal values keep their order (a stable sort). */
static int ascending(const void *a, const void *b) {
    const ranked_t *x = a, *y = b;
    int xn = x->value != x->value, yn = y->value != y->value;
    if (xn != yn) return xn - yn;
    if (!xn && x->value != y->value) return x->value < y->value ? -1 : 1;
    return (x->position > y->position) - (x->position < y->position);
}

static int descending(const void *a, const void *b) {
    const ranked_t *x = a, *y = b;
    int xn = x->value != x->value, yn = y->value != y->value;
    if (xn != yn) return yn - xn;
    if (!xn && x->value != y->value) return x->value > y->value ? -1 : 1;
    return (x->position > y->position) - (x->position < y->position);
}

/* Every row along `dim` sorted (torch.sort, and torch.topk's first k): the values and
   their positions in the row (point-dependent integers, held as doubles). -4 in `status`
   where no memory is left for a row. */
static const int64_t *run_sort(double *arena, const int64_t *w, int *status) {
    int64_t ndim = w[0], dim = w[1], down = w[2], k = w[3];
    const int64_t *sizes = w + 4, *v = sizes + ndim, *ix = v + 1 + ndim, *in = ix + 1 + ndim;
    int64_t n = sizes[dim], rows = 1;
    for (int64_t d = 0; d < ndim; d++) if (d != dim) rows *= sizes[d];
    ranked_t *row = malloc((size_t)(n > 0 ? n : 1) * sizeof *row);
    if (!row) { *status = -4; return in + 1 + ndim; }
    int64_t index[MAXDIM] = {0};
    for (int64_t r = 0; r < rows; r++) {
        int64_t vo = v[0], io = ix[0], so = in[0];
        for (int64_t d = 0; d < ndim; d++) {
            vo += index[d] * v[1 + d]; io += index[d] * ix[1 + d]; so += index[d] * in[1 + d];
        }
        for (int64_t j = 0; j < n; j++) {
            row[j].value = arena[so + j * in[1 + dim]];
            row[j].position = j;
        }
        qsort(row, (size_t)n, sizeof *row, down ? descending : ascending);
        for (int64_t j = 0; j < k; j++) {
            arena[vo + j * v[1 + dim]] = row[j].value;
            arena[io + j * ix[1 + dim]] = (double)row[j].position;
        }
        for (int64_t d = ndim - 1; d >= 0; d--) {  /* the next row: `dim` stays 0 */
            if (d == dim) continue;
            if (++index[d] < sizes[d]) break;
            index[d] = 0;
        }
    }
    free(row);
    return in + 1 + ndim;
}

/* torch.gather (mode 0: out[i] = src[i with i_dim = index[i]]) and torch.scatter (mode 1:
   out[i with i_dim = index[i]] = src[i]; mode 2 adds) with an index that depends on the
   point, over the index's `sizes`; `n` is the indexed tensor's size along `dim`. -3 in
   `status` at an index outside it (torch raises there too). */
static const int64_t *run_indexed(double *arena, const int64_t *w, int *status) {
    int64_t ndim = w[0], dim = w[1], mode = w[2], n = w[3];
    const int64_t *sizes = w + 4, *o = sizes + ndim, *ix = o + 1 + ndim, *src = ix + 1 + ndim;
    int64_t count = 1;
    for (int64_t d = 0; d < ndim; d++) count *= sizes[d];
    int64_t index[MAXDIM] = {0};
    for (int64_t e = 0; e < count; e++) {
        int64_t oo = o[0], io = ix[0], so = src[0];
        for (int64_t d = 0; d < ndim; d++) {
            oo += (d == dim && mode != 0 ? 0 : index[d]) * o[1 + d];
            io += index[d] * ix[1 + d];
            so += (d == dim && mode == 0 ? 0 : index[d]) * src[1 + d];
        }
        double at = arena[io];
        if (!(at >= 0 && at < (double)n)) { *status = -3; return src + 1 + ndim; }
        int64_t j = (int64_t)at;
        if (mode == 0) arena[oo] = arena[so + j * src[1 + dim]];
        else if (mode == 1) arena[oo + j * o[1 + dim]] = arena[so];
        else arena[oo + j * o[1 + dim]] += arena[so];
        for (int64_t d = ndim - 1; d >= 0; d--) {
            if (++index[d] < sizes[d]) break;
            index[d] = 0;
        }
    }
    return src + 1 + ndim;
}

static const int64_t *run_gather(double *arena, const int64_t *w, const double *params) {
    int64_t ndim = w[0], round = w[1];
    double fill = params[w[2]];
    const int64_t *sizes = w + 3, *odesc = sizes + ndim;
    int64_t count = odesc[1 + ndim];
    const int64_t *addr = odesc + 2 + ndim;
    int64_t index[MAXDIM] = {0};
    for (int64_t e = 0; e < count; e++) {
        int64_t oo = odesc[0];
        for (int64_t d = 0; d < ndim; d++) oo += index[d] * odesc[1 + d];
        arena[oo] = store(addr[e] ? arena[addr[e] - 1] : fill, round);
        for (int64_t d = ndim - 1; d >= 0; d--) {
            if (++index[d] < sizes[d]) break;
            index[d] = 0;
        }
    }
    return addr + count;
}

/* Run a tape; 0, -1 where a Cholesky factorisation failed, -2 at an unknown instruction,
   -3 at a pivot or index outside its tensor, -4 where memory ran out (tape.py's
   CHOLESKY_FAILED, UNKNOWN_INSTRUCTION, OUT_OF_RANGE and OUT_OF_MEMORY). */
int tape_run(double *arena, const int64_t *code, int64_t length, const double *params) {
    const int64_t *w = code, *end = code + length;
    int status = 0;
    while (w < end && status == 0) {
        switch (*w++) {
        case I_MAP: w = run_map(arena, w, params); break;
        case I_REDUCE: w = run_reduce(arena, w, params); break;
        case I_SCAN: w = run_scan(arena, w, params); break;
        case I_MATMUL: w = run_matmul(arena, w); break;
        case I_CHOL: w = run_cholesky(arena, w, &status); break;
        case I_TRISOLVE: w = run_trisolve(arena, w); break;
        case I_GATHER: w = run_gather(arena, w, params); break;
        case I_LU: w = run_lu(arena, w); break;
        case I_LUSOLVE: w = run_lusolve(arena, w, &status); break;
        case I_SORT: w = run_sort(arena, w, &status); break;
        case I_INDEXED: w = run_indexed(arena, w, &status); break;
        case I_SCATTER: {
            int64_t count = *w++;
            for (int64_t e = 0; e < count; e++) arena[w[count + e]] += arena[w[e]];
            w += 2 * count;
            break;
        }
        default: return -2;
        }
    }
    return status;
}

/* The tape as a batched potential for the C NUTS transitions (trajectory.c's
   potential_fn): positions in, potentials and gradients out through index lists. */
typedef struct {
    double *arena;
    const int64_t *code;
    int64_t length;
    const double *params;
    int64_t input, size;  /* where the positions go: arena[input .. input + size) */
    const int64_t *value_index, *grad_index;
    int64_t values, grads;
} tape_potential_t;

int tape_potential(void *context, const double *positions, double *potentials,
                   double *grads) {
    tape_potential_t *t = context;
    memcpy(t->arena + t->input, positions, (size_t)t->size * sizeof(double));
    int status = tape_run(t->arena, t->code, t->length, t->params);
    if (status != 0) return status;
    for (int64_t i = 0; i < t->values; i++) potentials[i] = t->arena[t->value_index[i]];
    for (int64_t i = 0; i < t->grads; i++) grads[i] = t->arena[t->grad_index[i]];
    return 0;
}
