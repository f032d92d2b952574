/* tap_dump.h: a single-header safetensors writer for dumping an engine's intermediate
 * tensors ("taps") under mlx_tinyllama's canonical names, so that
 *
 *     python -m mlx_tinyllama.trace compare --against dump.safetensors --model MODEL
 *
 * can tell where the engine first goes wrong. Copy this file into your engine; it needs
 * only the C standard library (C99 or C++98 and later). Public domain / CC0.
 *
 * In exactly one C or C++ file:
 *     #define TAP_DUMP_IMPLEMENTATION
 *     #include "tap_dump.h"
 * Everywhere else just #include "tap_dump.h".
 *
 *     tap_dump *d = tap_dump_new();
 *     tap_dump_set_tokens(d, ids, n_ids);          // the prompt ids, BOS included if you feed one
 *     tap_dump_set_position(d, 0);                 // position of the first token row (decode: the step's)
 *     tap_dump_set_dtype(d, "float16");            // the precision the engine computed in (tolerances)
 *     char name[64];
 *     tap_dump_name(name, sizeof name, 3, "attn.q");              // "layers.3.attn.q"
 *     int64_t shape[3] = {n_heads, n_tokens, head_dim};
 *     tap_dump_add_f32(d, name, q, 3, shape, TAP_DUMP_F16);     // f32 buffer, stored as f16
 *     tap_dump_add_f16(d, "embed", embed_half_bits, 2, eshape);   // IEEE half bits, stored as f16
 *     if (tap_dump_write(d, "dump.safetensors") != 0) perror("tap_dump_write");
 *     tap_dump_free(d);
 *
 * Tensors are copied when added (the engine may reuse its buffers at once) and written in
 * one go by tap_dump_write: first to "PATH.tmp.PID", then renamed onto PATH, so a reader
 * never sees half a file. The canonical names and shapes are mlx_tinyllama/stages.py's table
 * (TAP_DUMP_LAYER_STAGES below; tested against it). Shapes drop the batch dimension:
 * [T, hidden] for norms and residuals, [heads, T, head_dim] for q/k/v (K/V after the GQA repeat:
 * attn.k_rep/v_rep), [heads, T, S] for scores and probabilities, [T, heads*head_dim] for attn.context.
 */
#ifndef TAP_DUMP_H
#define TAP_DUMP_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { TAP_DUMP_F32 = 0, TAP_DUMP_F16 = 1, TAP_DUMP_BF16 = 2 } tap_dump_dtype;

typedef struct tap_dump tap_dump;

/* Canonical stage names (mlx_tinyllama/stages.py), in forward order. */
#define TAP_DUMP_N_LAYER_STAGES 22
extern const char *const TAP_DUMP_LAYER_STAGES[TAP_DUMP_N_LAYER_STAGES];
#define TAP_DUMP_N_GLOBAL_STAGES 3
extern const char *const TAP_DUMP_GLOBAL_STAGES[TAP_DUMP_N_GLOBAL_STAGES]; /* embed, final_norm, logits */

tap_dump *tap_dump_new(void);
void tap_dump_free(tap_dump *d);

/* Metadata (__metadata__ of the safetensors header; values are strings). */
int tap_dump_set_meta(tap_dump *d, const char *key, const char *value);
int tap_dump_set_tokens(tap_dump *d, const int32_t *ids, size_t n); /* "tokens": "[1, 529, ...]" */
int tap_dump_set_position(tap_dump *d, int64_t position);          /* "position": "37" */
int tap_dump_set_dtype(tap_dump *d, const char *dtype);            /* "dtype": "float16" */

/* "layers.<layer>.<stage>", or "<stage>" when layer < 0. Returns 0, -1 if it does not fit. */
int tap_dump_name(char *out, size_t cap, int layer, const char *stage);

/* Add a tensor (row-major, batch dimension dropped). Returns 0, or -1 (bad arguments, a
 * duplicate name, out of memory). */
int tap_dump_add_f32(tap_dump *d, const char *name, const float *data, int ndim, const int64_t *shape,
                     tap_dump_dtype store_as);
int tap_dump_add_f16(tap_dump *d, const char *name, const uint16_t *half_bits, int ndim, const int64_t *shape);
int tap_dump_add_bf16(tap_dump *d, const char *name, const uint16_t *bf16_bits, int ndim, const int64_t *shape);

/* Name a fused tensor: `name` (added with tap_dump_add_*) holds the n_taps taps side by side on
 * its last axis, in this order, because the engine computed them as one matmul (q|k|v against a
 * concatenated weight, gate|up). layout: NULL or "concat" (the parts one after the other),
 * "grouped" (q/k/v per KV group, Megatron-LM's linear_qkv), "interleaved" (the parts' columns
 * alternate). Recorded in the "fused" metadata, which compare reads as --map entries; shape it
 * [T, width] (or [T, heads, head_dim]). Returns 0, or -1 (bad arguments, a name given twice). */
int tap_dump_set_fused(tap_dump *d, const char *name, const char *const *taps, int n_taps, const char *layout);

/* Write every tensor added so far to path (temp file + rename). 0 on success, -1 with errno. */
int tap_dump_write(const tap_dump *d, const char *path);

/* Conversions (round to nearest even; NaN stays NaN, overflow becomes Inf). */
uint16_t tap_dump_f32_to_f16(float x);
uint16_t tap_dump_f32_to_bf16(float x);
float tap_dump_f16_to_f32(uint16_t h);

#ifdef __cplusplus
}
#endif
#endif /* TAP_DUMP_H */

#ifdef TAP_DUMP_IMPLEMENTATION
#ifndef TAP_DUMP_IMPLEMENTATION_DONE
#define TAP_DUMP_IMPLEMENTATION_DONE

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#if defined(_WIN32)
#include <process.h>
#define TAP_DUMP_GETPID _getpid
#else
#include <unistd.h>
#define TAP_DUMP_GETPID getpid
#endif

#ifdef __cplusplus
extern "C" {
#endif

const char *const TAP_DUMP_LAYER_STAGES[TAP_DUMP_N_LAYER_STAGES] = {
    "attn_norm", "attn.q", "attn.k", "attn.v", "attn.q_rope", "attn.k_rope", "attn.k_rep",
    "attn.v_rep", "attn.scores", "attn.scores_scaled", "attn.scores_masked", "attn.probs",
    "attn.context", "attn.out", "resid_mid", "mlp_norm", "mlp.gate", "mlp.up", "mlp.act", "mlp.prod", "mlp.down", "out"};
const char *const TAP_DUMP_GLOBAL_STAGES[TAP_DUMP_N_GLOBAL_STAGES] = {"embed", "final_norm", "logits"};

typedef struct {
    char *name;
    tap_dump_dtype dtype;
    int ndim;
    int64_t shape[8];
    unsigned char *bytes;
    size_t nbytes;
} tap_dump_tensor_;

typedef struct {
    char *key;
    char *value;
} tap_dump_meta_;

struct tap_dump {
    tap_dump_tensor_ *tensors;
    size_t n, cap;
    tap_dump_meta_ *meta;
    size_t n_meta, cap_meta;
    char *fused;        /* the "fused" metadata's entries so far, comma-separated (NULL: none) */
    char **fused_names; /* their tensor names, to refuse one given twice */
    size_t n_fused;
};

static char *tap_dump_strdup_(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = (char *)malloc(n);
    if (p) memcpy(p, s, n);
    return p;
}

tap_dump *tap_dump_new(void) { return (tap_dump *)calloc(1, sizeof(tap_dump)); }

void tap_dump_free(tap_dump *d) {
    size_t i;
    if (!d) return;
    for (i = 0; i < d->n; i++) {
        free(d->tensors[i].name);
        free(d->tensors[i].bytes);
    }
    for (i = 0; i < d->n_meta; i++) {
        free(d->meta[i].key);
        free(d->meta[i].value);
    }
    for (i = 0; i < d->n_fused; i++) free(d->fused_names[i]);
    free(d->fused_names);
    free(d->fused);
    free(d->tensors);
    free(d->meta);
    free(d);
}

int tap_dump_set_meta(tap_dump *d, const char *key, const char *value) {
    size_t i;
    char *v;
    if (!d || !key || !value) return -1;
    v = tap_dump_strdup_(value);
    if (!v) return -1;
    for (i = 0; i < d->n_meta; i++) {
        if (strcmp(d->meta[i].key, key) == 0) { /* replace */
            free(d->meta[i].value);
            d->meta[i].value = v;
            return 0;
        }
    }
    if (d->n_meta == d->cap_meta) {
        size_t cap = d->cap_meta ? 2 * d->cap_meta : 8;
        tap_dump_meta_ *m = (tap_dump_meta_ *)realloc(d->meta, cap * sizeof *m);
        if (!m) { free(v); return -1; }
        d->meta = m;
        d->cap_meta = cap;
    }
    d->meta[d->n_meta].key = tap_dump_strdup_(key);
    if (!d->meta[d->n_meta].key) { free(v); return -1; }
    d->meta[d->n_meta].value = v;
    d->n_meta++;
    return 0;
}

int tap_dump_set_tokens(tap_dump *d, const int32_t *ids, size_t n) {
    size_t i, cap = 3 + n * 13, len = 0; /* "[", up to 13 chars per id with ", ", "]", NUL */
    int rc;
    char *s = (char *)malloc(cap);
    if (!s) return -1;
    s[len++] = '[';
    for (i = 0; i < n; i++) len += (size_t)sprintf(s + len, i ? ", %ld" : "%ld", (long)ids[i]);
    s[len++] = ']';
    s[len] = '\0';
    rc = tap_dump_set_meta(d, "tokens", s);
    free(s);
    return rc;
}

int tap_dump_set_position(tap_dump *d, int64_t position) {
    char buf[32];
    sprintf(buf, "%lld", (long long)position);
    return tap_dump_set_meta(d, "position", buf);
}

int tap_dump_set_dtype(tap_dump *d, const char *dtype) { return tap_dump_set_meta(d, "dtype", dtype); }

int tap_dump_name(char *out, size_t cap, int layer, const char *stage) {
    int n = layer < 0 ? snprintf(out, cap, "%s", stage) : snprintf(out, cap, "layers.%d.%s", layer, stage);
    return (n < 0 || (size_t)n >= cap) ? -1 : 0;
}

uint16_t tap_dump_f32_to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                          /* round to nearest even */
    return (uint16_t)(u >> 16);
}

uint16_t tap_dump_f32_to_f16(float x) {
    uint32_t u, sign, mant;
    int32_t exp;
    memcpy(&u, &x, 4);
    sign = (u >> 16) & 0x8000u;
    exp = (int32_t)((u >> 23) & 0xffu);
    mant = u & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u)); /* Inf, NaN */
    exp = exp - 127 + 15;
    if (exp >= 0x1f) return (uint16_t)(sign | 0x7c00u); /* overflow: Inf */
    if (exp <= 0) {                                       /* half subnormal or zero */
        uint32_t m, shift, half_m, rem, halfway;
        if (exp < -10) return (uint16_t)sign;
        m = mant | 0x800000u;
        shift = (uint32_t)(14 - exp);
        half_m = m >> shift;
        rem = m & ((1u << shift) - 1u);
        halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (half_m & 1u))) half_m++;
        return (uint16_t)(sign | half_m);
    }
    {
        uint32_t h = sign | ((uint32_t)exp << 10) | (mant >> 13);
        uint32_t rem = mant & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is right */
        return (uint16_t)h;
    }
}

float tap_dump_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, u;
    float f;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (mant << 13);
    } else if (exp == 0) {
        if (mant == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                exp--;
            }
            u = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
        }
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

static size_t tap_dump_elem_size_(tap_dump_dtype t) { return t == TAP_DUMP_F32 ? 4 : 2; }

/* Append a tensor slot after checking the arguments; its bytes are filled by the caller. */
static tap_dump_tensor_ *tap_dump_slot_(tap_dump *d, const char *name, int ndim, const int64_t *shape,
                                        tap_dump_dtype dtype) {
    size_t i, count = 1;
    tap_dump_tensor_ *t;
    if (!d || !name || !*name || ndim < 0 || ndim > 8 || (ndim && !shape)) return NULL;
    for (i = 0; i < (size_t)ndim; i++) {
        if (shape[i] < 0) return NULL;
        count *= (size_t)shape[i];
    }
    for (i = 0; i < d->n; i++)
        if (strcmp(d->tensors[i].name, name) == 0) return NULL; /* one tensor per name */
    if (d->n == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 64;
        tap_dump_tensor_ *p = (tap_dump_tensor_ *)realloc(d->tensors, cap * sizeof *p);
        if (!p) return NULL;
        d->tensors = p;
        d->cap = cap;
    }
    t = &d->tensors[d->n];
    memset(t, 0, sizeof *t);
    t->name = tap_dump_strdup_(name);
    t->nbytes = count * tap_dump_elem_size_(dtype);
    t->bytes = (unsigned char *)malloc(t->nbytes ? t->nbytes : 1);
    if (!t->name || !t->bytes) {
        free(t->name);
        free(t->bytes);
        return NULL;
    }
    t->dtype = dtype;
    t->ndim = ndim;
    for (i = 0; i < (size_t)ndim; i++) t->shape[i] = shape[i];
    d->n++;
    return t;
}

/* safetensors stores little-endian values. */
static void tap_dump_put16_(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)(v & 0xff);
    p[1] = (unsigned char)(v >> 8);
}

int tap_dump_add_f32(tap_dump *d, const char *name, const float *data, int ndim, const int64_t *shape,
                     tap_dump_dtype store_as) {
    size_t i, n;
    tap_dump_tensor_ *t = tap_dump_slot_(d, name, ndim, shape, store_as);
    if (!t) return -1;
    n = t->nbytes / tap_dump_elem_size_(store_as);
    if (n && !data) {
        d->n--;
        free(t->name);
        free(t->bytes);
        return -1;
    }
    for (i = 0; i < n; i++) {
        if (store_as == TAP_DUMP_F32) {
            uint32_t u;
            memcpy(&u, &data[i], 4);
            tap_dump_put16_(t->bytes + 4 * i, (uint16_t)(u & 0xffffu));
            tap_dump_put16_(t->bytes + 4 * i + 2, (uint16_t)(u >> 16));
        } else {
            tap_dump_put16_(t->bytes + 2 * i,
                            store_as == TAP_DUMP_F16 ? tap_dump_f32_to_f16(data[i]) : tap_dump_f32_to_bf16(data[i]));
        }
    }
    return 0;
}

static int tap_dump_add_bits16_(tap_dump *d, const char *name, const uint16_t *bits, int ndim,
                                const int64_t *shape, tap_dump_dtype dtype) {
    size_t i, n;
    tap_dump_tensor_ *t = tap_dump_slot_(d, name, ndim, shape, dtype);
    if (!t) return -1;
    n = t->nbytes / 2;
    if (n && !bits) {
        d->n--;
        free(t->name);
        free(t->bytes);
        return -1;
    }
    for (i = 0; i < n; i++) tap_dump_put16_(t->bytes + 2 * i, bits[i]);
    return 0;
}

int tap_dump_add_f16(tap_dump *d, const char *name, const uint16_t *half_bits, int ndim, const int64_t *shape) {
    return tap_dump_add_bits16_(d, name, half_bits, ndim, shape, TAP_DUMP_F16);
}

int tap_dump_add_bf16(tap_dump *d, const char *name, const uint16_t *bf16_bits, int ndim, const int64_t *shape) {
    return tap_dump_add_bits16_(d, name, bf16_bits, ndim, shape, TAP_DUMP_BF16);
}

/* A growable string for the JSON header. */
typedef struct {
    char *s;
    size_t n, cap;
    int failed;
} tap_dump_buf_;

static void tap_dump_puts_(tap_dump_buf_ *b, const char *s, size_t len) {
    if (b->failed) return;
    if (b->n + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        char *p;
        while (b->n + len + 1 > cap) cap *= 2;
        p = (char *)realloc(b->s, cap);
        if (!p) {
            b->failed = 1;
            return;
        }
        b->s = p;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, len);
    b->n += len;
    b->s[b->n] = '\0';
}

static void tap_dump_cat_(tap_dump_buf_ *b, const char *s) { tap_dump_puts_(b, s, strlen(s)); }

static void tap_dump_json_str_(tap_dump_buf_ *b, const char *s) {
    char esc[8];
    tap_dump_cat_(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            tap_dump_puts_(b, esc, 2);
        } else if (c < 0x20) {
            sprintf(esc, "\\u%04x", c);
            tap_dump_cat_(b, esc);
        } else {
            tap_dump_puts_(b, (const char *)&c, 1);
        }
    }
    tap_dump_cat_(b, "\"");
}

int tap_dump_set_fused(tap_dump *d, const char *name, const char *const *taps, int n_taps, const char *layout) {
    tap_dump_buf_ b = {0, 0, 0, 0};
    char **names;
    size_t i;
    int k;
    if (!d || !name || !*name || !taps || n_taps < 2) return -1;
    if (layout && strcmp(layout, "concat") && strcmp(layout, "grouped") && strcmp(layout, "interleaved")) return -1;
    for (k = 0; k < n_taps; k++)
        if (!taps[k] || !*taps[k]) return -1;
    for (i = 0; i < d->n_fused; i++)
        if (strcmp(d->fused_names[i], name) == 0) return -1;
    tap_dump_cat_(&b, "{");
    if (d->fused) {
        tap_dump_cat_(&b, d->fused);
        tap_dump_cat_(&b, ",");
    }
    tap_dump_json_str_(&b, name);
    tap_dump_cat_(&b, layout && strcmp(layout, "concat") ? ":{\"taps\":[" : ":[");
    for (k = 0; k < n_taps; k++) {
        if (k) tap_dump_cat_(&b, ",");
        tap_dump_json_str_(&b, taps[k]);
    }
    tap_dump_cat_(&b, "]");
    if (layout && strcmp(layout, "concat")) {
        tap_dump_cat_(&b, ",\"layout\":");
        tap_dump_json_str_(&b, layout);
        tap_dump_cat_(&b, "}");
    }
    tap_dump_cat_(&b, "}");
    names = b.failed ? NULL : (char **)realloc(d->fused_names, (d->n_fused + 1) * sizeof *names);
    if (!names) {
        free(b.s);
        return -1;
    }
    d->fused_names = names;
    if (!(names[d->n_fused] = tap_dump_strdup_(name)) || tap_dump_set_meta(d, "fused", b.s) != 0) {
        free(names[d->n_fused]);
        free(b.s);
        return -1;
    }
    d->n_fused++;
    b.s[b.n - 1] = '\0'; /* the entries without the closing brace, for the next call */
    free(d->fused);
    d->fused = tap_dump_strdup_(b.s + 1);
    free(b.s);
    return d->fused ? 0 : -1;
}

int tap_dump_write(const tap_dump *d, const char *path) {
    static const char *names[] = {"F32", "F16", "BF16"};
    tap_dump_buf_ b = {0, 0, 0, 0};
    char num[64], *tmp;
    size_t i, offset = 0, header_len;
    unsigned char len8[8];
    FILE *f;
    int ok;
    if (!d || !path) {
        errno = EINVAL;
        return -1;
    }
    tap_dump_cat_(&b, "{");
    if (d->n_meta) {
        tap_dump_cat_(&b, "\"__metadata__\":{");
        for (i = 0; i < d->n_meta; i++) {
            if (i) tap_dump_cat_(&b, ",");
            tap_dump_json_str_(&b, d->meta[i].key);
            tap_dump_cat_(&b, ":");
            tap_dump_json_str_(&b, d->meta[i].value);
        }
        tap_dump_cat_(&b, "}");
    }
    for (i = 0; i < d->n; i++) {
        const tap_dump_tensor_ *t = &d->tensors[i];
        int k;
        if (i || d->n_meta) tap_dump_cat_(&b, ",");
        tap_dump_json_str_(&b, t->name);
        tap_dump_cat_(&b, ":{\"dtype\":\"");
        tap_dump_cat_(&b, names[t->dtype]);
        tap_dump_cat_(&b, "\",\"shape\":[");
        for (k = 0; k < t->ndim; k++) {
            sprintf(num, k ? ",%lld" : "%lld", (long long)t->shape[k]);
            tap_dump_cat_(&b, num);
        }
        sprintf(num, "],\"data_offsets\":[%llu,%llu]}", (unsigned long long)offset,
                (unsigned long long)(offset + t->nbytes));
        tap_dump_cat_(&b, num);
        offset += t->nbytes;
    }
    tap_dump_cat_(&b, "}");
    while (!b.failed && b.n % 8) tap_dump_cat_(&b, " "); /* the data starts 8-byte aligned */
    if (b.failed) {
        free(b.s);
        errno = ENOMEM;
        return -1;
    }
    header_len = b.n;
    for (i = 0; i < 8; i++) len8[i] = (unsigned char)(((unsigned long long)header_len >> (8 * i)) & 0xff);

    tmp = (char *)malloc(strlen(path) + 32);
    if (!tmp) {
        free(b.s);
        errno = ENOMEM;
        return -1;
    }
    sprintf(tmp, "%s.tmp.%ld", path, (long)TAP_DUMP_GETPID());
    f = fopen(tmp, "wb");
    if (!f) {
        free(b.s);
        free(tmp);
        return -1;
    }
    ok = fwrite(len8, 1, 8, f) == 8 && fwrite(b.s, 1, header_len, f) == header_len;
    for (i = 0; ok && i < d->n; i++)
        ok = fwrite(d->tensors[i].bytes, 1, d->tensors[i].nbytes, f) == d->tensors[i].nbytes;
    ok = (fclose(f) == 0) && ok;
#if defined(_WIN32)
    if (ok) remove(path); /* Windows' rename does not replace */
#endif
    if (ok) ok = rename(tmp, path) == 0;
    if (!ok) {
        int e = errno;
        remove(tmp);
        errno = e;
    }
    free(b.s);
    free(tmp);
    return ok ? 0 : -1;
}

#ifdef __cplusplus
}
#endif
#endif /* TAP_DUMP_IMPLEMENTATION_DONE */
#endif /* TAP_DUMP_IMPLEMENTATION */
