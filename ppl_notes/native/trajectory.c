/* One NUTS transition as a resumable state machine, for ppl_notes' sampler.
 *
 * This is the tree building of ppl_notes/mcmc/kernel.py (Stan's base_nuts:
 * multinomial sampling, biased progressive sampling at the top, the generalised no-U-turn
 * criterion with the extra checks across merged subtrees, divergence at an energy error
 * above 1000) with its recursion unrolled onto an explicit stack, so that the transition
 * can stop whenever it needs the potential and its gradient at a new position: the caller
 * evaluates a whole batch of chains at once and resumes each. Both implementations draw
 * their uniforms from the same splitmix64 stream and make the same decisions in the same
 * order, so given the same momentum and seed they build the same trajectory
 * (tests/test_trajectory.py).
 *
 * The caller (ppl_notes/native/trajectory.py) owns every buffer: nothing here
 * allocates after nuts_new.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ENERGY_ERROR 1000.0
#define NEEDS_POTENTIAL 1
#define DONE 0

enum { METRIC_DIAG = 0, METRIC_DENSE = 1, METRIC_LOWRANK = 2 };

typedef struct {
    double *q, *p, *grad;
    double potential;
} Point;

typedef struct {
    int valid, diverging;
    long num_steps;
    double log_sum_weight, sum_accept;
    Point proposal, end;
    double *rho, *p_sharp_begin, *p_sharp_end, *p_begin, *p_end;
} Tree;

typedef struct {
    int dim, max_depth;
    /* the metric: diag uses `inverse` (dim); dense uses `inverse` (dim x dim, row major);
       lowrank uses `stds` (dim), `vectors` (dim x rank, row major), `values` (rank) */
    int metric_kind, rank;
    double *inverse, *stds, *vectors, *values, *scratch_rank, *scratch_dim;
    double step_size;
    uint64_t rng_state;
    /* the transition */
    double h0, log_sum_weight, sum_accept;
    long num_steps;
    int depth, diverging, direction, done;
    Point start, forward_end, backward_end, sample;
    double *rho, *rho_forward, *rho_backward;
    double *p_sharp_fb, *p_sharp_ff, *p_sharp_bf, *p_sharp_bb;
    double *p_fb, *p_ff, *p_bf, *p_bb;
    Tree top;
    /* the build stack: frames 1..depth; each holds its two halves */
    Tree *init, *final;
    Tree **dest;
    int *phase;
    /* the pending leaf */
    Tree *leaf_dest;
    Point leaf;
    double leaf_step;
    double *request;
    double *memory;
} Chain;

/* -- random numbers: splitmix64, as ppl_notes.native.trajectory.SplitMix64 -------- */
static double uniform(Chain *c) {
    uint64_t z = (c->rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z = z ^ (z >> 31);
    return (double)(z >> 11) * 0x1.0p-53;
}

/* -- small vector algebra ------------------------------------------------------------ */
static double dot(const double *a, const double *b, int n) {
    double s = 0.0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

static void copy(double *to, const double *from, int n) { memcpy(to, from, sizeof(double) * n); }

static void sharp(Chain *c, const double *p, double *out) {
    int d = c->dim;
    if (c->metric_kind == METRIC_DIAG) {
        for (int i = 0; i < d; i++) out[i] = c->inverse[i] * p[i];
    } else if (c->metric_kind == METRIC_DENSE) {
        for (int i = 0; i < d; i++) out[i] = dot(c->inverse + (size_t)i * d, p, d);
    } else {
        int k = c->rank;
        double *v = c->scratch_dim, *w = c->scratch_rank;
        for (int i = 0; i < d; i++) v[i] = c->stds[i] * p[i];
        for (int j = 0; j < k; j++) w[j] = 0.0;
        for (int i = 0; i < d; i++)
            for (int j = 0; j < k; j++) w[j] += c->vectors[(size_t)i * k + j] * v[i];
        for (int j = 0; j < k; j++) w[j] *= c->values[j] - 1.0;
        for (int i = 0; i < d; i++) {
            double s = v[i];
            for (int j = 0; j < k; j++) s += c->vectors[(size_t)i * k + j] * w[j];
            out[i] = c->stds[i] * s;
        }
    }
}

static double kinetic(Chain *c, const double *p, double *scratch) {
    sharp(c, p, scratch);
    return 0.5 * dot(p, scratch, c->dim);
}

static double logaddexp(double a, double b) {
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    double m = a > b ? a : b;
    return m + log(exp(a - m) + exp(b - m));
}

static int criterion(Chain *c, const double *minus, const double *plus, const double *rho) {
    return dot(plus, rho, c->dim) > 0 && dot(minus, rho, c->dim) > 0;
}

/* Stan's generalised no-U-turn check of two adjacent subtrees, left (backward) then right
   (forward), whose union has momentum sum `rho`: across the whole, and across each join
   with the neighbouring end point (the extra checks of Stan's base_nuts). */
static int no_u_turn(Chain *c, const double *rho, const double *rho_left,
                     const double *sharp_left_begin, const double *sharp_left_end,
                     const double *p_left_end, const double *rho_right,
                     const double *sharp_right_begin, const double *sharp_right_end,
                     const double *p_right_begin) {
    int d = c->dim;
    double *sum = c->scratch_dim;
    if (!criterion(c, sharp_left_begin, sharp_right_end, rho)) return 0;
    for (int i = 0; i < d; i++) sum[i] = rho_left[i] + p_right_begin[i];
    if (!criterion(c, sharp_left_begin, sharp_right_begin, sum)) return 0;
    for (int i = 0; i < d; i++) sum[i] = rho_right[i] + p_left_end[i];
    return criterion(c, sharp_left_end, sharp_right_end, sum);
}

static void copy_point(Chain *c, Point *to, const Point *from) {
    copy(to->q, from->q, c->dim);
    copy(to->p, from->p, c->dim);
    copy(to->grad, from->grad, c->dim);
    to->potential = from->potential;
}

static void copy_tree(Chain *c, Tree *to, const Tree *from) {
    int d = c->dim;
    to->valid = from->valid;
    to->diverging = from->diverging;
    to->num_steps = from->num_steps;
    to->log_sum_weight = from->log_sum_weight;
    to->sum_accept = from->sum_accept;
    copy_point(c, &to->proposal, &from->proposal);
    copy_point(c, &to->end, &from->end);
    copy(to->rho, from->rho, d);
    copy(to->p_sharp_begin, from->p_sharp_begin, d);
    copy(to->p_sharp_end, from->p_sharp_end, d);
    copy(to->p_begin, from->p_begin, d);
    copy(to->p_end, from->p_end, d);
}

/* -- memory ---------------------------------------------------------------------------- */
static double *take(double **cursor, size_t n) {
    double *out = *cursor;
    *cursor += n;
    return out;
}

static void point_in(Point *point, double **cursor, int d) {
    point->q = take(cursor, d);
    point->p = take(cursor, d);
    point->grad = take(cursor, d);
}

static void tree_in(Tree *tree, double **cursor, int d) {
    point_in(&tree->proposal, cursor, d);
    point_in(&tree->end, cursor, d);
    tree->rho = take(cursor, d);
    tree->p_sharp_begin = take(cursor, d);
    tree->p_sharp_end = take(cursor, d);
    tree->p_begin = take(cursor, d);
    tree->p_end = take(cursor, d);
}

#define TREE_DOUBLES(d) (11 * (size_t)(d))

void *nuts_new(int dim, int max_depth) {
    Chain *c = calloc(1, sizeof(Chain));
    if (!c) return NULL;
    c->dim = dim;
    c->max_depth = max_depth;
    size_t d = dim, levels = (size_t)max_depth + 1;
    size_t doubles = d * d        /* inverse (dense at most) */
                     + 2 * d      /* stds, scratch_dim */
                     + d * d + d  /* vectors and values (rank <= dim) */
                     + d          /* scratch_rank */
                     + 5 * 3 * d  /* start, forward_end, backward_end, sample, leaf */
                     + 3 * d      /* rho, rho_forward, rho_backward */
                     + 8 * d      /* p_sharp_*, p_* */
                     + TREE_DOUBLES(d) * (1 + 2 * levels) + d /* top, init, final; request */;
    c->memory = calloc(doubles, sizeof(double));
    c->init = calloc(levels, sizeof(Tree));
    c->final = calloc(levels, sizeof(Tree));
    c->dest = calloc(levels, sizeof(Tree *));
    c->phase = calloc(levels, sizeof(int));
    if (!c->memory || !c->init || !c->final || !c->dest || !c->phase) {
        free(c->memory); free(c->init); free(c->final); free(c->dest); free(c->phase); free(c);
        return NULL;
    }
    double *cursor = c->memory;
    c->inverse = take(&cursor, d * d);
    c->stds = take(&cursor, d);
    c->scratch_dim = take(&cursor, d);
    c->vectors = take(&cursor, d * d);
    c->values = take(&cursor, d);
    c->scratch_rank = take(&cursor, d);
    point_in(&c->start, &cursor, dim);
    point_in(&c->forward_end, &cursor, dim);
    point_in(&c->backward_end, &cursor, dim);
    point_in(&c->sample, &cursor, dim);
    point_in(&c->leaf, &cursor, dim);
    c->rho = take(&cursor, d);
    c->rho_forward = take(&cursor, d);
    c->rho_backward = take(&cursor, d);
    c->p_sharp_fb = take(&cursor, d);
    c->p_sharp_ff = take(&cursor, d);
    c->p_sharp_bf = take(&cursor, d);
    c->p_sharp_bb = take(&cursor, d);
    c->p_fb = take(&cursor, d);
    c->p_ff = take(&cursor, d);
    c->p_bf = take(&cursor, d);
    c->p_bb = take(&cursor, d);
    tree_in(&c->top, &cursor, dim);
    for (size_t k = 0; k < levels; k++) {
        tree_in(&c->init[k], &cursor, dim);
        tree_in(&c->final[k], &cursor, dim);
    }
    c->request = take(&cursor, d);
    for (int i = 0; i < dim; i++) c->inverse[i] = 1.0;
    c->done = 1;
    return c;
}

void nuts_free(void *chain) {
    Chain *c = chain;
    if (!c) return;
    free(c->memory); free(c->init); free(c->final); free(c->dest); free(c->phase); free(c);
}

/* kind: 0 diag (inverse: dim), 1 dense (inverse: dim x dim), 2 lowrank (stds: dim,
   vectors: dim x rank, values: rank). */
void nuts_set_metric(void *chain, int kind, const double *inverse, const double *stds,
                     const double *vectors, const double *values, int rank) {
    Chain *c = chain;
    int d = c->dim;
    c->metric_kind = kind;
    if (kind == METRIC_DIAG) {
        copy(c->inverse, inverse, d);
    } else if (kind == METRIC_DENSE) {
        copy(c->inverse, inverse, d * d);
    } else {
        c->rank = rank;
        copy(c->stds, stds, d);
        copy(c->vectors, vectors, d * rank);
        copy(c->values, values, rank);
    }
}

/* -- the tree ----------------------------------------------------------------------------- */

/* Set frames depth..1 to their first half and start the leaf of the deepest: the first
   half of a leapfrog step from `from` (the position it needs is written to `request`). */
static void descend(Chain *c, int depth, const Point *from, Tree *dest) {
    for (int k = depth; k > 0; k--) {
        c->dest[k] = dest;
        c->phase[k] = 0;
        dest = &c->init[k];
    }
    c->leaf_dest = dest;
    int d = c->dim;
    double step = c->direction * c->step_size;
    c->leaf_step = step;
    for (int i = 0; i < d; i++) c->leaf.p[i] = from->p[i] - 0.5 * step * from->grad[i];
    sharp(c, c->leaf.p, c->scratch_dim);
    for (int i = 0; i < d; i++) c->leaf.q[i] = from->q[i] + step * c->scratch_dim[i];
    copy(c->request, c->leaf.q, d);
}

/* The second half of the leaf's leapfrog step, and the leaf as a subtree. */
static void finish_leaf(Chain *c, double potential, const double *grad) {
    int d = c->dim, finite = isfinite(potential);
    for (int i = 0; finite && i < d; i++) finite = isfinite(grad[i]);
    Tree *tree = c->leaf_dest;
    Point *point = &tree->proposal;
    copy(point->q, c->leaf.q, d);
    if (finite) {
        for (int i = 0; i < d; i++) point->p[i] = c->leaf.p[i] - 0.5 * c->leaf_step * grad[i];
        copy(point->grad, grad, d);
        point->potential = potential;
    } else {
        copy(point->p, c->leaf.p, d);
        memset(point->grad, 0, sizeof(double) * d);
        point->potential = INFINITY;
    }
    double h = point->potential + kinetic(c, point->p, tree->p_sharp_begin);
    if (!isfinite(h)) h = INFINITY;
    int diverging = h - c->h0 > MAX_ENERGY_ERROR;
    double log_weight = c->h0 - h;
    tree->valid = !diverging;
    tree->diverging = diverging;
    tree->log_sum_weight = log_weight;
    tree->num_steps = 1;
    tree->sum_accept = log_weight > 0 ? 1.0 : exp(log_weight);
    copy(tree->rho, point->p, d);
    copy(tree->p_sharp_end, tree->p_sharp_begin, d);
    copy(tree->p_begin, point->p, d);
    copy(tree->p_end, point->p, d);
    copy_point(c, &tree->end, point);
}

static void merge(Chain *c, Tree *init, Tree *final, Tree *merged) {
    int d = c->dim;
    merged->valid = 0;
    copy_point(c, &merged->proposal, &init->proposal);
    merged->log_sum_weight = logaddexp(init->log_sum_weight, final->log_sum_weight);
    for (int i = 0; i < d; i++) merged->rho[i] = init->rho[i] + final->rho[i];
    copy(merged->p_sharp_begin, init->p_sharp_begin, d);
    copy(merged->p_sharp_end, final->p_sharp_end, d);
    copy(merged->p_begin, init->p_begin, d);
    copy(merged->p_end, final->p_end, d);
    merged->num_steps = init->num_steps + final->num_steps;
    merged->sum_accept = init->sum_accept + final->sum_accept;
    merged->diverging = final->diverging;
    copy_point(c, &merged->end, &final->end);
    if (!final->valid) return;
    if (final->log_sum_weight > merged->log_sum_weight ||
        uniform(c) < exp(final->log_sum_weight - merged->log_sum_weight))
        copy_point(c, &merged->proposal, &final->proposal);
    merged->valid = no_u_turn(c, merged->rho, init->rho, init->p_sharp_begin,
                              init->p_sharp_end, init->p_end, final->rho,
                              final->p_sharp_begin, final->p_sharp_end, final->p_begin);
}

/* Start the next doubling: draw its direction and descend to its first leaf. */
static void extend(Chain *c) {
    int d = c->dim;
    if (uniform(c) > 0.5) {
        c->direction = 1;
        copy(c->rho_backward, c->rho, d);
        copy(c->p_bf, c->p_ff, d);
        copy(c->p_sharp_bf, c->p_sharp_ff, d);
        descend(c, c->depth, &c->forward_end, &c->top);
    } else {
        c->direction = -1;
        copy(c->rho_forward, c->rho, d);
        copy(c->p_fb, c->p_bb, d);
        copy(c->p_sharp_fb, c->p_sharp_bb, d);
        descend(c, c->depth, &c->backward_end, &c->top);
    }
}

/* The top-level tree of this doubling is built: take it in; extend again or finish. */
static int doubled(Chain *c) {
    int d = c->dim;
    Tree *tree = &c->top;
    if (c->direction == 1) {
        copy_point(c, &c->forward_end, &tree->end);
        copy(c->rho_forward, tree->rho, d);
        copy(c->p_sharp_fb, tree->p_sharp_begin, d);
        copy(c->p_sharp_ff, tree->p_sharp_end, d);
        copy(c->p_fb, tree->p_begin, d);
        copy(c->p_ff, tree->p_end, d);
    } else {
        copy_point(c, &c->backward_end, &tree->end);
        copy(c->rho_backward, tree->rho, d);
        copy(c->p_sharp_bf, tree->p_sharp_begin, d);
        copy(c->p_sharp_bb, tree->p_sharp_end, d);
        copy(c->p_bf, tree->p_begin, d);
        copy(c->p_bb, tree->p_end, d);
    }
    c->num_steps += tree->num_steps;
    c->sum_accept += tree->sum_accept;
    if (tree->diverging) c->diverging = 1;
    if (!tree->valid) return DONE;
    c->depth += 1;
    if (tree->log_sum_weight > c->log_sum_weight ||
        uniform(c) < exp(tree->log_sum_weight - c->log_sum_weight))
        copy_point(c, &c->sample, &tree->proposal);
    c->log_sum_weight = logaddexp(c->log_sum_weight, tree->log_sum_weight);
    for (int i = 0; i < d; i++) c->rho[i] = c->rho_backward[i] + c->rho_forward[i];
    int persist = no_u_turn(c, c->rho, c->rho_backward, c->p_sharp_bb, c->p_sharp_bf, c->p_bf,
                            c->rho_forward, c->p_sharp_fb, c->p_sharp_ff, c->p_fb);
    if (!persist || c->depth >= c->max_depth) return DONE;
    extend(c);
    return NEEDS_POTENTIAL;
}

/* After a subtree at level k - 1 completed into frame k's init or final half: unwind
   while frames complete; descend into the next second half, or take a finished doubling. */
static int unwind(Chain *c, int k) {
    for (; k <= c->depth; k++) {
        if (c->phase[k] == 0) {
            if (!c->init[k].valid) {
                copy_tree(c, c->dest[k], &c->init[k]);
                continue;
            }
            c->phase[k] = 1;  /* frames k-1..1 build the second half from the first's end */
            descend(c, k - 1, &c->init[k].end, &c->final[k]);
            return NEEDS_POTENTIAL;
        }
        merge(c, &c->init[k], &c->final[k], c->dest[k]);
    }
    return doubled(c);
}

/* Begin a transition at (q, potential, grad) with momentum p0; returns NEEDS_POTENTIAL
   and writes the first position to evaluate into `request` (dim doubles). */
int nuts_begin(void *chain, const double *q, double potential, const double *grad,
               const double *p0, double step_size, uint64_t seed, double *request) {
    Chain *c = chain;
    int d = c->dim;
    c->step_size = step_size;
    c->rng_state = seed;
    copy(c->start.q, q, d);
    copy(c->start.p, p0, d);
    copy(c->start.grad, grad, d);
    c->start.potential = potential;
    double *p_sharp = c->p_sharp_ff;
    c->h0 = potential + kinetic(c, p0, p_sharp);
    copy_point(c, &c->forward_end, &c->start);
    copy_point(c, &c->backward_end, &c->start);
    copy_point(c, &c->sample, &c->start);
    copy(c->p_sharp_fb, p_sharp, d);
    copy(c->p_sharp_bf, p_sharp, d);
    copy(c->p_sharp_bb, p_sharp, d);
    copy(c->p_fb, p0, d);
    copy(c->p_ff, p0, d);
    copy(c->p_bf, p0, d);
    copy(c->p_bb, p0, d);
    copy(c->rho, p0, d);
    c->log_sum_weight = 0.0;
    c->depth = 0;
    c->num_steps = 0;
    c->sum_accept = 0.0;
    c->diverging = 0;
    c->done = 0;
    if (c->max_depth <= 0) {
        c->done = 1;
        return DONE;
    }
    extend(c);
    copy(request, c->request, d);
    return NEEDS_POTENTIAL;
}

/* Give the potential and gradient at the last requested position; returns
   NEEDS_POTENTIAL (the next position in `request`) or DONE. */
int nuts_resume(void *chain, double potential, const double *grad, double *request) {
    Chain *c = chain;
    finish_leaf(c, potential, grad);
    int status = unwind(c, 1);
    if (status == NEEDS_POTENTIAL)
        copy(request, c->request, c->dim);
    else
        c->done = 1;
    return status;
}

/* nuts_resume for `count` chains: row i of `grads` and `requests` (dim doubles each)
   belongs to chains[i]; chains without a transition under way are skipped. The indices
   of the chains whose transition finished go to `finished`; returns how many. */
int nuts_resume_batch(void **chains, int count, const double *potentials,
                      const double *grads, double *requests, int *finished) {
    int done = 0;
    for (int i = 0; i < count; i++) {
        Chain *c = chains[i];
        if (c->done) continue;
        size_t offset = (size_t)i * c->dim;
        if (nuts_resume(c, potentials[i], grads + offset, requests + offset) == DONE)
            finished[done++] = i;
    }
    return done;
}

/* A batched potential in C: positions (count x dim) -> potentials, gradients; 0 or an
   error (the caller then evaluates those positions itself and resumes). */
typedef int (*potential_fn)(void *context, const double *positions, double *potentials,
                            double *grads);

/* Leapfrog steps for every running chain, the potential evaluated by `potential`, until
   a transition finishes (returns how many, their indices in `finished`) or the
   potential fails (returns -1; nothing has moved). */
int nuts_run_batch(void **chains, int count, double *requests, int *finished,
                   potential_fn potential, void *context, double *potentials,
                   double *grads) {
    for (;;) {
        if (potential(context, requests, potentials, grads) != 0) return -1;
        int done = nuts_resume_batch(chains, count, potentials, grads, requests, finished);
        if (done) return done;
    }
}

/* The finished transition: the sampled point and the statistics. */
void nuts_result(void *chain, double *q, double *grad, double *stats) {
    Chain *c = chain;
    int d = c->dim;
    copy(q, c->sample.q, d);
    copy(grad, c->sample.grad, d);
    stats[0] = c->sample.potential;
    stats[1] = c->sum_accept / (c->num_steps > 0 ? c->num_steps : 1);
    stats[2] = (double)c->num_steps;
    stats[3] = (double)c->depth;
    stats[4] = (double)c->diverging;
    stats[5] = c->sample.potential + kinetic(c, c->sample.p, c->scratch_dim);
}
