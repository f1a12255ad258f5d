/* LapSum soft top-k on the CPU, one fused loop per row: the float32 path's forward and backward.
 *
 * softmoe/ops/lapsum_native.py builds this file on first use (plain C, no Python or torch headers: it
 * compiles in about a second) and calls it through ctypes on the buffers of float32 tensors. The math is
 * that of softmoe/ops/lapsum.py (its module docstring) and softmoe/ops/lapsum_fast.py; what differs is that
 * each row is solved in a few vectorised loops over its entries, in double precision:
 *
 *   1. s = (r - max r) / alpha, e^s (a branch-free exp that vectorises) and e^t0 = sum e^s / 2k. Where
 *      t0 >= 0 every p < 1/2 and p = k e^s / sum e^s exactly: the row is done after one exp per entry.
 *   2. Otherwise the threshold t takes the exact piecewise steps of lapsum_steps._interval_step from t0
 *      (the root's safe side). Where every |s| <= CACHED_RANGE the steps run in exp space (a score is below
 *      the threshold where e^s < e^t; L = sum e^s / e^t, U = e^t sum e^-s), so a step costs adds and
 *      compares, no exp; other rows step in the frame x = s - t with one exp per entry. Held in double,
 *      x keeps float32's digits near the threshold while |t| <= FAR_FRAME (no re-anchoring needed). A step
 *      that passes no score (checked against the nearest score on each side) lands on the root; router rows
 *      settle in one or two steps.
 *   3. f = F'(x) = e^{-|x|} / 2 (saved for the backward) and p = F(x) from the cached e^s and e^t; x itself
 *      only where the caller asks (a learned alpha's gradient reads it; otherwise only rows whose sum f
 *      underflows do, and those are marked ROW_FLAT for the caller to solve).
 *
 * A row that this loop does not finish is marked and left to the general solver (lapsum._solve_x): k > n/2,
 * a side whose sum is subnormal in double (every score on it beyond ~700 alpha from the threshold), a
 * threshold beyond FAR_FRAME from the row max, no settling within MAX_STEPS. A row whose centred scores
 * overflow float32 is marked too (the caller raises, as the torch path does). Rows are split over up to
 * `threads` POSIX threads; each row's arithmetic does not depend on the split, so the bits do not either.
 *
 * Shape legend: R rows, n entries per row, row-major and contiguous.
 */

#include <float.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* A row's status: done, or left to the caller (forward: general solver or overflow; backward: unsafe). ROW_FLAT: done
 * without x, and its sum f may be subnormal in float32, so the backward will need its x (the caller solves it). */
enum { ROW_DONE = 0, ROW_GENERAL = 1, ROW_OVERFLOW = 2, ROW_FLAT = 3 };
enum { ROW_UNSAFE = 1 };

#define MAX_STEPS 8
#define FAR_FRAME 1e6
#define TOLERANCE 1.4901161193847656e-08 /* sqrt(double eps): a crossing step this short errs by eps */
#define MAX_THREADS 256
/* Entries per thread below which extra threads cost more than they save. */
#define MIN_ENTRIES_PER_THREAD 32768

/* e^x in double to within 1 ulp for x in [-708, 709] (clamped there: below, e^x is under 3.1e-308 and reads as
 * that; the callers need e^x exactly only above -600). Branch-free, so that `omp simd` loops vectorize it:
 * x = j ln 2 + y with |y| <= ln 2 / 2 (ln 2 split in two parts, so y is exact), e^y by its Taylor series to y^13
 * (error below 2e-17 there), 2^j from the exponent bits. */
#pragma omp declare simd notinbranch
static inline double exp_clamped(double x) {
    const double shifter = 6755399441055744.0; /* 1.5 * 2^52: adding it leaves round(x / ln 2) in the low bits */
    x = x < -708.0 ? -708.0 : x;
    x = x > 709.0 ? 709.0 : x;
    double shifted = x * 1.4426950408889634 + shifter;
    int64_t shifted_bits;
    memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    double j = shifted - shifter;
    double y = x - j * 6.93147180369123816490e-01 - j * 1.90821492927058770002e-10;
    double e_y = 1.0 / 6227020800.0;
    e_y = e_y * y + 1.0 / 479001600.0;
    e_y = e_y * y + 1.0 / 39916800.0;
    e_y = e_y * y + 1.0 / 3628800.0;
    e_y = e_y * y + 1.0 / 362880.0;
    e_y = e_y * y + 1.0 / 40320.0;
    e_y = e_y * y + 1.0 / 5040.0;
    e_y = e_y * y + 1.0 / 720.0;
    e_y = e_y * y + 1.0 / 120.0;
    e_y = e_y * y + 1.0 / 24.0;
    e_y = e_y * y + 1.0 / 6.0;
    e_y = e_y * y + 0.5;
    e_y = e_y * y + 1.0;
    e_y = e_y * y + 1.0;
    uint64_t scale_bits = (uint64_t)(shifted_bits - 0x4338000000000000LL + 1023) << 52; /* 2^j (unsigned: no UB) */
    double scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    return e_y * scale;
}

/* Side sums at the threshold: c scores below it, L = sum_{x<0} e^x and U = sum_{x>=0} e^-x (x = s - t), and the
 * nearest score on each side. */
typedef struct {
    double count, below, above, nearest_below, nearest_above;
} Sides;

/* Where every |s| <= CACHED_RANGE, e^s and e^-s are normal doubles: the steps then run in exp space, on the cached
 * e^s and e^-s and the threshold's e^t, with no exp or log per entry and no branch (a score's side is
 * unpredictable). Below means e^s < e^t; the nearest scores are given as their e^s. */
#define CACHED_RANGE 600.0

static inline __attribute__((always_inline)) Sides side_sums_cached(const double *e_s, const double *e_minus_s, int64_t n, double e_t) {
    double count = 0.0, below = 0.0, above = 0.0, nearest_below = 0.0, nearest_above = INFINITY;
#pragma omp simd reduction(+ : count, below, above) reduction(max : nearest_below) reduction(min : nearest_above)
    for (int64_t i = 0; i < n; ++i) {
        int is_below = e_s[i] < e_t;
        count += is_below ? 1.0 : 0.0;
        below += is_below ? e_s[i] : 0.0;
        above += is_below ? 0.0 : e_minus_s[i];
        double e_below = is_below ? e_s[i] : 0.0, e_above = is_below ? INFINITY : e_s[i];
        nearest_below = e_below > nearest_below ? e_below : nearest_below;
        nearest_above = e_above < nearest_above ? e_above : nearest_above;
    }
    Sides sides = {count, below / e_t, above * e_t, nearest_below, nearest_above};
    return sides;
}

/* The same at threshold t in the frame x = s - t, one libm exp per entry (rows with scores beyond CACHED_RANGE);
 * the nearest scores are given as their x. */
static Sides side_sums_exact(const double *s, int64_t n, double t) {
    Sides sides = {0.0, 0.0, 0.0, -INFINITY, INFINITY};
    for (int64_t i = 0; i < n; ++i) {
        double x = s[i] - t;
        if (x < 0.0) {
            sides.count += 1.0;
            sides.below += exp(x);
            sides.nearest_below = x > sides.nearest_below ? x : sides.nearest_below;
        } else {
            sides.above += exp(-x);
            sides.nearest_above = x < sides.nearest_above ? x : sides.nearest_above;
        }
    }
    return sides;
}

/* The step u that solves sum_j F(t + u - s_j) = c - L e^{-u} / 2 + U e^u / 2 = w on the current interval (a
 * quadratic in e^u; lapsum_steps._interval_step), returned as e^u: (|d| + sqrt D) / U for d = w - c > 0, else
 * L / (|d| + sqrt D), with D = d^2 + L U (no cancellation). */
static inline __attribute__((always_inline)) double step_factor(Sides sides, double w) {
    double d = w - sides.count;
    double root = fabs(d) + sqrt(d * d + sides.below * sides.above);
    return d > 0.0 ? root / sides.above : sides.below / root;
}

/* Steps in exp space from e^t (cached rows); returns the final e^t, or 0 where the row did not settle. */
static inline __attribute__((always_inline)) double steps_cached(const double *e_s, const double *e_minus_s, int64_t n, double w, double e_t) {
    for (int step = 0; step < MAX_STEPS; ++step) {
        Sides sides = side_sums_cached(e_s, e_minus_s, n, e_t);
        double e_u = step_factor(sides, w);
        if (!(e_u > 0.0 && e_u < INFINITY))
            return 0.0;
        double moved = e_t * e_u; /* passed: the scores with e^s in [e^t, moved) going up, [moved, e^t) down */
        int crosses = e_u > 1.0 ? sides.nearest_above < moved : sides.nearest_below >= moved;
        e_t = moved;
        if (fabs(e_u - 1.0) <= TOLERANCE || !crosses)
            return e_t;
    }
    return 0.0;
}

/* Steps in the frame x = s - t from t (other rows); returns 1 and the final t where the row settled, else 0. */
static int steps_exact(const double *s, int64_t n, double w, double *t) {
    const double safe = DBL_MIN / DBL_EPSILON; /* a side sum below this has lost digits */
    for (int step = 0; step < MAX_STEPS; ++step) {
        Sides sides = side_sums_exact(s, n, *t);
        if ((sides.count > 0 && sides.below < safe) || (sides.count < n && sides.above < safe))
            return 0;
        double u = log(step_factor(sides, w));
        if (!isfinite(u))
            return 0;
        int crosses = u > 0.0 ? sides.nearest_above < u : sides.nearest_below >= u; /* x in [0, u) or [u, 0) */
        *t += u;
        if (fabs(u) <= TOLERANCE || !crosses)
            return 1;
    }
    return 0;
}

static inline __attribute__((always_inline)) void store_x(const double *s, int64_t n, double t, float *x_out) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        x_out[i] = (float)(s[i] - t);
}

/* One row: x (where `x_out` is not NULL), f and p, or the status that leaves the row to the caller. `s`, `e_s`
 * and `e_minus_s` are scratch rows of n doubles. */
static inline __attribute__((always_inline)) uint8_t solve_row_impl(const float *r, int64_t n, double k, double w,
                                                                    double alpha, float *x_out, float *f_out,
                                                                    float *p_out, double *s, double *e_s,
                                                                    double *e_minus_s) {
    float row_max = r[0];
#pragma omp simd reduction(max : row_max)
    for (int64_t i = 0; i < n; ++i)
        row_max = r[i] > row_max ? r[i] : row_max;
    double sum_e = 0.0, s_min = 0.0, inv_alpha = 1.0 / alpha;
#pragma omp simd reduction(+ : sum_e) reduction(min : s_min)
    for (int64_t i = 0; i < n; ++i) {
        s[i] = ((double)r[i] - (double)row_max) * inv_alpha; /* 1 / alpha: an ulp of double, and no division */
        s_min = s[i] < s_min ? s[i] : s_min;
        e_s[i] = exp_clamped(s[i]);
        sum_e += e_s[i];
    }
    /* s overflows float32 (rounds to -inf there, as the torch path's s would): at or beyond FLT_MAX + ulp / 2 */
    if (s_min <= -0x1.ffffffp+127)
        return ROW_OVERFLOW;
    if (k > w)
        return ROW_GENERAL;
    /* e^t0 = sum e^s / 2k; t0 >= 0: every p < 1/2, and p = f = e^x / 2 = k e^s / sum e^s */
    if (sum_e >= 2.0 * k) {
        double t = log(sum_e) - log(2.0 * k);
        double scale = k / sum_e;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            float p = (float)(e_s[i] * scale);
            f_out[i] = p;
            p_out[i] = p;
        }
        if (x_out)
            store_x(s, n, t, x_out);
        return ROW_DONE;
    }
    double t;
    if (s_min >= -CACHED_RANGE) {
#pragma omp simd
        for (int64_t i = 0; i < n; ++i)
            e_minus_s[i] = 1.0 / e_s[i];
        double e_t = steps_cached(e_s, e_minus_s, n, w, sum_e / (2.0 * k));
        if (e_t == 0.0)
            return ROW_GENERAL;
        double e_minus_t = 1.0 / e_t;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
            int is_below = e_s[i] < e_t; /* e^s = e^t is above: p = 1 - 1/2 = F(0) */
            double half_e = 0.5 * (is_below ? e_s[i] * e_minus_t : e_t * e_minus_s[i]);
            f_out[i] = (float)half_e;
            p_out[i] = (float)(is_below ? half_e : 1.0 - half_e);
        }
        t = x_out ? log(e_t) : 0.0;
    } else {
        t = log(sum_e) - log(2.0 * k);
        if (!steps_exact(s, n, w, &t) || fabs(t) > FAR_FRAME)
            return ROW_GENERAL;
        for (int64_t i = 0; i < n; ++i) {
            double x = s[i] - t;
            double half_e = 0.5 * exp(-fabs(x));
            f_out[i] = (float)half_e;
            p_out[i] = (float)(x < 0.0 ? half_e : 1.0 - half_e); /* x = -0.0 is above: 1 - 1/2 = F(0) */
        }
    }
    if (x_out)
        store_x(s, n, t, x_out);
    return ROW_DONE;
}

/* solve_row_impl with the common expert counts as constants: their loops compile to exact-width vector code with
 * no set-up, which is what short rows need (at n = 8 a generic vector loop costs ~2x). */
static uint8_t solve_row(const float *r, int64_t n, double k, double w, double alpha, float *x_out, float *f_out,
                         float *p_out, double *s, double *e_s, double *e_minus_s) {
    switch (n) {
#define SOLVE_FIXED(entries) \
    case entries:            \
        return solve_row_impl(r, entries, k, w, alpha, x_out, f_out, p_out, s, e_s, e_minus_s);
        SOLVE_FIXED(8) SOLVE_FIXED(16) SOLVE_FIXED(32) SOLVE_FIXED(64)
#undef SOLVE_FIXED
    default:
        return solve_row_impl(r, n, k, w, alpha, x_out, f_out, p_out, s, e_s, e_minus_s);
    }
}

/* dL/dr = f (g - <q, g>) / alpha with q = f / sum f, and dL/dk = <q, g> (lapsum_fast.backward). */
static uint8_t backward_row(const float *f, const float *g, int64_t n, double alpha, float *grad, float *grad_k) {
    double sum_f = 0.0, f_dot_g = 0.0;
#pragma omp simd reduction(+ : sum_f, f_dot_g)
    for (int64_t i = 0; i < n; ++i) {
        sum_f += f[i];
        f_dot_g += (double)f[i] * g[i];
    }
    if ((float)sum_f < FLT_MIN / FLT_EPSILON) /* q = f / sum f has lost its digits: the caller redoes the row */
        return ROW_UNSAFE;
    double q_dot_g = f_dot_g / sum_f, inv_alpha = 1.0 / alpha;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i)
        grad[i] = (float)(((double)g[i] - q_dot_g) * f[i] * inv_alpha);
    *grad_k = (float)q_dot_g;
    return ROW_DONE;
}

typedef struct {
    const float *r, *k, *w; /* [R, n] centred scores, [R] k, [R] row weights */
    float *x, *f, *p;       /* [R, n] outputs; x may be NULL (then only rows that need it are marked, see flag_flat) */
    int flag_flat;          /* without x: mark rows whose sum f may be subnormal (ROW_FLAT) */
} ForwardRows;

typedef struct {
    const float *f, *g; /* [R, n] the forward's f, the output's gradient */
    float *grad, *grad_k; /* [R, n] gradient of the scores, [R] gradient of k */
} BackwardRows;

/* One thread's share of rows [begin, end) of a forward or a backward. */
typedef struct {
    int backward; /* which member of the union holds the rows */
    union {
        ForwardRows fwd;
        BackwardRows bwd;
    };
    int64_t begin, end, n;
    double alpha;
    uint8_t *status; /* [R] per row: ROW_DONE, or why the caller must redo it */
    int64_t marked;  /* out: rows of this block that are not ROW_DONE */
} Block;

/* Whether a row's sum f may be subnormal in float32 (backward_row's test, with a margin of 4: a superset of the
 * rows that backward_row refuses, whatever the order of the sums). */
static int flat(const float *f, int64_t n) {
    double sum_f = 0.0;
#pragma omp simd reduction(+ : sum_f)
    for (int64_t i = 0; i < n; ++i)
        sum_f += f[i];
    return sum_f < 4.0 * (FLT_MIN / FLT_EPSILON);
}

static void *run_block(void *arg) {
    Block *job = (Block *)arg;
    int64_t n = job->n, marked = 0;
    double *scratch = job->backward ? 0 : malloc(3 * n * sizeof(double));
    for (int64_t row = job->begin; row < job->end; ++row) {
        int64_t at = row * n;
        uint8_t status;
        if (job->backward) {
            const BackwardRows *rows = &job->bwd;
            status = backward_row(rows->f + at, rows->g + at, n, job->alpha, rows->grad + at, rows->grad_k + row);
        } else if (scratch) {
            const ForwardRows *rows = &job->fwd;
            status = solve_row(rows->r + at, n, rows->k[row], rows->w[row], job->alpha, rows->x ? rows->x + at : 0,
                               rows->f + at, rows->p + at, scratch, scratch + n, scratch + 2 * n);
            if (status == ROW_DONE && rows->flag_flat && flat(rows->f + at, n))
                status = ROW_FLAT;
        } else {
            status = ROW_GENERAL; /* no memory for the scratch rows: the caller's solver takes them */
        }
        job->status[row] = status;
        marked += status != ROW_DONE;
    }
    free(scratch);
    job->marked = marked;
    return 0;
}

/* Run rows [0, R) in up to `threads` blocks; returns how many rows were marked (status != ROW_DONE). */
static int64_t run_rows(Block job, int64_t R, int threads) {
    int64_t by_size = R * job.n / MIN_ENTRIES_PER_THREAD;
    int64_t blocks = threads < by_size ? threads : by_size;
    blocks = blocks > MAX_THREADS ? MAX_THREADS : blocks;
    if (blocks <= 1) {
        job.begin = 0, job.end = R;
        run_block(&job);
        return job.marked;
    }
    Block parts[MAX_THREADS];
    pthread_t handles[MAX_THREADS];
    int started[MAX_THREADS];
    for (int64_t b = 0; b < blocks; ++b) {
        parts[b] = job;
        parts[b].begin = R * b / blocks, parts[b].end = R * (b + 1) / blocks;
        started[b] = b > 0 && pthread_create(&handles[b], 0, run_block, &parts[b]) == 0;
    }
    for (int64_t b = 0; b < blocks; ++b)
        if (!started[b])
            run_block(&parts[b]); /* block 0, and any block whose thread did not start, on this thread */
    int64_t marked = 0;
    for (int64_t b = 0; b < blocks; ++b) {
        if (started[b])
            pthread_join(handles[b], 0);
        marked += parts[b].marked;
    }
    return marked;
}

/* Forward of R rows: f, p, and x where `x` is not NULL (else, with `flag_flat`, ROW_FLAT marks the rows whose x the
 * backward will need). Returns how many rows are not ROW_DONE; `status` says why, per row. */
int64_t lapsum_forward(const float *r, const float *k, const float *w, int64_t R, int64_t n, double alpha, float *x,
                       float *f, float *p, uint8_t *status, int threads, int flag_flat) {
    Block job = {.backward = 0, .fwd = {r, k, w, x, f, p, flag_flat}, .n = n, .alpha = alpha, .status = status};
    return run_rows(job, R, threads);
}

int64_t lapsum_backward(const float *f, const float *g, int64_t R, int64_t n, double alpha, float *grad,
                        float *grad_k, uint8_t *status, int threads) {
    Block job = {.backward = 1, .bwd = {f, g, grad, grad_k}, .n = n, .alpha = alpha, .status = status};
    return run_rows(job, R, threads);
}
