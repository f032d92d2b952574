/* decode_engine: a small Llama that runs one token at a time through a KV cache, the way
 * llama2.c's run.c does (the prompt too: every position is a decode step), in float32, and
 * dumps every step's taps with kit/tap_dump.h. The field suite's C engine
 * (tests/field/test_field_c.py): written apart from this package, so that `compare
 * --against-steps` is tried on an engine it was not built with.
 *
 *     cc -std=c99 -O2 [-DFAULT_...] -o decode_engine decode_engine.c -lm
 *     ./decode_engine WEIGHTS OUTDIR ID0 ID1 ...      (writes OUTDIR/step-POS.safetensors)
 *
 * WEIGHTS (little-endian, written by tests/field/c_engine.py): 7 int32 (dim, hidden, layers,
 * heads, kv_heads, vocab, head_dim), 2 float32 (rms eps, rope theta), then float32 tensors in
 * HF's [out, in] layout: embed [vocab, dim]; per layer: attn_norm [dim], wq [heads*hd, dim],
 * wk, wv [kv*hd, dim], wo [dim, heads*hd], mlp_norm [dim], gate, up [hidden, dim],
 * down [dim, hidden]; final_norm [dim]; lm_head [vocab, dim].
 *
 * -DSTORE_F16 stores the taps as float16 (dtype "float16" in the metadata); the arithmetic stays float32.
 *
 * Faults (one -D flag each; the field suite's expected first divergence is in field_cases.py):
 *   FAULT_KV_LATE       layer 1 writes K/V to the cache slot one position late
 *   FAULT_ROPE_NEXT     RoPE at position + 1
 *   FAULT_EXTRA_KEY     attention reads one key past the last position
 *   FAULT_KV_HEAD       layer 1 maps query head h to KV head h % kv (not h / (heads / kv))
 *   FAULT_PARTIAL_ROWS  matmuls in blocks of 16 output rows skip the last partial block
 *   FAULT_RING4         the KV cache is a ring of 4 slots (reads at most 4 keys)
 */
#define TAP_DUMP_IMPLEMENTATION
#include "../../kit/tap_dump.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int dim, hidden, layers, heads, kv, vocab, hd;
    float eps, theta;
} Config;

typedef struct {
    float *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *gate, *up, *down;
} Layer;

static float *take(float **p, size_t n) {
    float *r = *p;
    *p += n;
    return r;
}

/* out[r] = sum_c w[r, c] x[c], w: [rows, cols] */
static void matvec(float *out, const float *w, const float *x, int rows, int cols) {
    int r, c, end = rows;
#ifdef FAULT_PARTIAL_ROWS
    end = rows - rows % 16;
    for (r = end; r < rows; r++) out[r] = 0.0f;
#endif
    for (r = 0; r < end; r++) {
        float s = 0.0f;
        for (c = 0; c < cols; c++) s += w[(size_t)r * cols + c] * x[c];
        out[r] = s;
    }
}

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    int i;
    for (i = 0; i < n; i++) ss += x[i] * x[i];
    ss = 1.0f / sqrtf(ss / n + eps);
    for (i = 0; i < n; i++) out[i] = w[i] * (x[i] * ss);
}

/* HF's rotate_half RoPE on each head of x [n_heads, hd] at position pos */
static void rope(float *out, const float *x, int n_heads, int hd, int pos, float theta) {
    int h, i, half = hd / 2;
#ifdef FAULT_ROPE_NEXT
    pos += 1;
#endif
    for (h = 0; h < n_heads; h++) {
        for (i = 0; i < half; i++) {
            float inv = 1.0f / powf(theta, (float)(2 * i) / (float)hd);
            float a = (float)pos * inv, c = cosf(a), s = sinf(a);
            float x1 = x[h * hd + i], x2 = x[h * hd + i + half];
            out[h * hd + i] = x1 * c - x2 * s;
            out[h * hd + i + half] = x2 * c + x1 * s;
        }
    }
}

static int add(tap_dump *d, int layer, const char *stage, const float *x, int ndim, int64_t a, int64_t b,
               int64_t c) {
    char name[96];
    int64_t shape[3] = {a, b, c};
    if (tap_dump_name(name, sizeof name, layer, stage) != 0) return -1;
#ifdef STORE_F16
    return tap_dump_add_f32(d, name, x, ndim, shape, TAP_DUMP_F16);
#else
    return tap_dump_add_f32(d, name, x, ndim, shape, TAP_DUMP_F32);
#endif
}

int main(int argc, char **argv) {
    Config p;
    FILE *f;
    long size;
    float *all, *w, *embed, *final_norm, *lm_head, *kcache, *vcache;
    Layer *L;
    int n_ids, pos, l, i, h, t;
    int32_t *ids;
    int32_t hdr[7];
    if (argc < 4) {
        fprintf(stderr, "usage: decode_engine WEIGHTS OUTDIR ID...\n");
        return 2;
    }
    f = fopen(argv[1], "rb");
    if (!f || fread(hdr, 4, 7, f) != 7 || fread(&p.eps, 4, 1, f) != 1 || fread(&p.theta, 4, 1, f) != 1) {
        fprintf(stderr, "error: cannot read %s\n", argv[1]);
        return 2;
    }
    p.dim = hdr[0], p.hidden = hdr[1], p.layers = hdr[2], p.heads = hdr[3], p.kv = hdr[4], p.vocab = hdr[5];
    p.hd = hdr[6];
    fseek(f, 0, SEEK_END);
    size = ftell(f) - 36;
    fseek(f, 36, SEEK_SET);
    all = malloc((size_t)size);
    if (!all || fread(all, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "error: short weights file\n");
        return 2;
    }
    fclose(f);
    {
        int q = p.heads * p.hd, kvd = p.kv * p.hd;
        w = all;
        embed = take(&w, (size_t)p.vocab * p.dim);
        L = calloc((size_t)p.layers, sizeof *L);
        for (l = 0; l < p.layers; l++) {
            L[l].attn_norm = take(&w, p.dim);
            L[l].wq = take(&w, (size_t)q * p.dim);
            L[l].wk = take(&w, (size_t)kvd * p.dim);
            L[l].wv = take(&w, (size_t)kvd * p.dim);
            L[l].wo = take(&w, (size_t)p.dim * q);
            L[l].mlp_norm = take(&w, p.dim);
            L[l].gate = take(&w, (size_t)p.hidden * p.dim);
            L[l].up = take(&w, (size_t)p.hidden * p.dim);
            L[l].down = take(&w, (size_t)p.dim * p.hidden);
        }
        final_norm = take(&w, p.dim);
        lm_head = take(&w, (size_t)p.vocab * p.dim);
        if ((char *)w - (char *)all != size) {
            fprintf(stderr, "error: weights file size does not match its header\n");
            return 2;
        }
    }
    n_ids = argc - 3;
    ids = malloc(sizeof *ids * (size_t)n_ids);
    for (i = 0; i < n_ids; i++) ids[i] = (int32_t)atoi(argv[3 + i]);
    /* one spare slot past the last position (FAULT_KV_LATE writes there; FAULT_EXTRA_KEY reads it) */
    kcache = calloc((size_t)p.layers * (n_ids + 1) * p.kv * p.hd, sizeof(float));
    vcache = calloc((size_t)p.layers * (n_ids + 1) * p.kv * p.hd, sizeof(float));
    {
        int qd = p.heads * p.hd, kvd = p.kv * p.hd, rep = p.heads / p.kv, S_max = n_ids + 1;
        float *x = malloc(sizeof(float) * p.dim), *xn = malloc(sizeof(float) * p.dim);
        float *q = malloc(sizeof(float) * qd), *qr = malloc(sizeof(float) * qd);
        float *k = malloc(sizeof(float) * kvd), *kr = malloc(sizeof(float) * kvd), *v = malloc(sizeof(float) * kvd);
        float *sc = malloc(sizeof(float) * p.heads * S_max), *scs = malloc(sizeof(float) * p.heads * S_max);
        float *pr = malloc(sizeof(float) * p.heads * S_max), *ctx = malloc(sizeof(float) * qd);
        float *ao = malloc(sizeof(float) * p.dim), *g = malloc(sizeof(float) * p.hidden);
        float *u = malloc(sizeof(float) * p.hidden), *act = malloc(sizeof(float) * p.hidden);
        float *prod = malloc(sizeof(float) * p.hidden), *dn = malloc(sizeof(float) * p.dim);
        float *logits = malloc(sizeof(float) * p.vocab);
        float scale = 1.0f / sqrtf((float)p.hd);
        for (pos = 0; pos < n_ids; pos++) {
            tap_dump *d = tap_dump_new();
            char path[4096];
            int S = pos + 1, first = 0;
#ifdef FAULT_EXTRA_KEY
            S = pos + 2;
#endif
#ifdef FAULT_RING4
            if (S > 4) first = S - 4;
#endif
            tap_dump_set_tokens(d, ids, (size_t)pos + 1);
            tap_dump_set_position(d, pos);
#ifdef STORE_F16
            tap_dump_set_dtype(d, "float16");
#else
            tap_dump_set_dtype(d, "float32");
#endif
            tap_dump_set_meta(d, "engine", "tests/field/decode_engine.c");
            memcpy(x, embed + (size_t)ids[pos] * p.dim, sizeof(float) * p.dim);
            add(d, -1, "embed", x, 2, 1, p.dim, 0);
            for (l = 0; l < p.layers; l++) {
                float *kc = kcache + (size_t)l * S_max * kvd, *vc = vcache + (size_t)l * S_max * kvd;
                int slot = pos;
#ifdef FAULT_KV_LATE
                if (l == 1) slot = pos + 1;
#endif
#ifdef FAULT_RING4
                slot = pos % 4;
#endif
                rmsnorm(xn, x, L[l].attn_norm, p.dim, p.eps);
                add(d, l, "attn_norm", xn, 2, 1, p.dim, 0);
                matvec(q, L[l].wq, xn, qd, p.dim);
                matvec(k, L[l].wk, xn, kvd, p.dim);
                matvec(v, L[l].wv, xn, kvd, p.dim);
                add(d, l, "attn.q", q, 3, p.heads, 1, p.hd);
                add(d, l, "attn.k", k, 3, p.kv, 1, p.hd);
                add(d, l, "attn.v", v, 3, p.kv, 1, p.hd);
                rope(qr, q, p.heads, p.hd, pos, p.theta);
                rope(kr, k, p.kv, p.hd, pos, p.theta);
                add(d, l, "attn.q_rope", qr, 3, p.heads, 1, p.hd);
                add(d, l, "attn.k_rope", kr, 3, p.kv, 1, p.hd);
                memcpy(kc + (size_t)slot * kvd, kr, sizeof(float) * kvd);
                memcpy(vc + (size_t)slot * kvd, v, sizeof(float) * kvd);
                for (h = 0; h < p.heads; h++) {
                    int kvh = h / rep, n = S - first;
                    float mx = -INFINITY, sum = 0.0f;
#ifdef FAULT_KV_HEAD
                    if (l == 1) kvh = h % p.kv;
#endif
                    for (t = 0; t < n; t++) {
                        int src = first + t;
                        float s = 0.0f;
#ifdef FAULT_RING4
                        src = src % 4;
#endif
                        for (i = 0; i < p.hd; i++) s += qr[h * p.hd + i] * kc[(size_t)src * kvd + kvh * p.hd + i];
                        sc[h * n + t] = s;
                        scs[h * n + t] = s * scale;
                        if (scs[h * n + t] > mx) mx = scs[h * n + t];
                    }
                    for (t = 0; t < n; t++) sum += (pr[h * n + t] = expf(scs[h * n + t] - mx));
                    for (t = 0; t < n; t++) pr[h * n + t] /= sum;
                    for (i = 0; i < p.hd; i++) {
                        float c = 0.0f;
                        for (t = 0; t < n; t++) {
                            int src = first + t;
#ifdef FAULT_RING4
                            src = src % 4;
#endif
                            c += pr[h * n + t] * vc[(size_t)src * kvd + kvh * p.hd + i];
                        }
                        ctx[h * p.hd + i] = c;
                    }
                }
                add(d, l, "attn.scores", sc, 3, p.heads, 1, S - first);
                add(d, l, "attn.scores_scaled", scs, 3, p.heads, 1, S - first);
                add(d, l, "attn.scores_masked", scs, 3, p.heads, 1, S - first); /* a decode step masks nothing */
                add(d, l, "attn.probs", pr, 3, p.heads, 1, S - first);
                add(d, l, "attn.context", ctx, 2, 1, qd, 0);
                matvec(ao, L[l].wo, ctx, p.dim, qd);
                add(d, l, "attn.out", ao, 2, 1, p.dim, 0);
                for (i = 0; i < p.dim; i++) x[i] += ao[i];
                add(d, l, "resid_mid", x, 2, 1, p.dim, 0);
                rmsnorm(xn, x, L[l].mlp_norm, p.dim, p.eps);
                add(d, l, "mlp_norm", xn, 2, 1, p.dim, 0);
                matvec(g, L[l].gate, xn, p.hidden, p.dim);
                matvec(u, L[l].up, xn, p.hidden, p.dim);
                for (i = 0; i < p.hidden; i++) {
                    act[i] = g[i] / (1.0f + expf(-g[i]));
                    prod[i] = act[i] * u[i];
                }
                add(d, l, "mlp.gate", g, 2, 1, p.hidden, 0);
                add(d, l, "mlp.up", u, 2, 1, p.hidden, 0);
                add(d, l, "mlp.act", act, 2, 1, p.hidden, 0);
                add(d, l, "mlp.prod", prod, 2, 1, p.hidden, 0);
                matvec(dn, L[l].down, prod, p.dim, p.hidden);
                add(d, l, "mlp.down", dn, 2, 1, p.dim, 0);
                for (i = 0; i < p.dim; i++) x[i] += dn[i];
                add(d, l, "out", x, 2, 1, p.dim, 0);
            }
            rmsnorm(xn, x, final_norm, p.dim, p.eps);
            add(d, -1, "final_norm", xn, 2, 1, p.dim, 0);
            matvec(logits, lm_head, xn, p.vocab, p.dim);
            add(d, -1, "logits", logits, 2, 1, p.vocab, 0);
            snprintf(path, sizeof path, "%s/step-%04d.safetensors", argv[2], pos);
            if (tap_dump_write(d, path) != 0) {
                perror("tap_dump_write");
                return 1;
            }
            tap_dump_free(d);
        }
    }
    return 0;
}
