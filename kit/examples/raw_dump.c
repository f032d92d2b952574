/* raw_dump: the tap_dump.h example. Turns raw float32 buffers into a safetensors dump
 * under canonical tap names, the way an engine would call the header at each stage.
 *
 *     cc -O2 -o raw_dump kit/examples/raw_dump.c -lm
 *     ./raw_dump MANIFEST DATA OUT.safetensors f32|f16|bf16 TOKENS POSITION
 *
 * MANIFEST: one line per tensor, "NAME NDIM D0 D1 ...", in the order of DATA, which holds
 * the tensors' float32 values back to back (little-endian, row-major), or "@fused NAME LAYOUT
 * TAP1,TAP2,..." naming a fused tensor (tap_dump_set_fused). TOKENS: "1,529,..."
 * POSITION: the position of the first token row.
 */
#define TAP_DUMP_IMPLEMENTATION
#include "../tap_dump.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *msg) {
    fprintf(stderr, "error: %s\n", msg);
    return 2;
}

int main(int argc, char **argv) {
    FILE *manifest, *data;
    tap_dump *d;
    tap_dump_dtype store;
    char name[256];
    int ndim, rc = 0;
    int32_t ids[4096];
    size_t n_ids = 0;
    const char *p;
    if (argc != 7) return fail("usage: raw_dump MANIFEST DATA OUT f32|f16|bf16 TOKENS POSITION");
    if (!strcmp(argv[4], "f32")) store = TAP_DUMP_F32;
    else if (!strcmp(argv[4], "f16")) store = TAP_DUMP_F16;
    else if (!strcmp(argv[4], "bf16")) store = TAP_DUMP_BF16;
    else return fail("dtype must be f32, f16 or bf16");
    manifest = fopen(argv[1], "r");
    data = fopen(argv[2], "rb");
    if (!manifest || !data) return fail("cannot open MANIFEST or DATA");
    d = tap_dump_new();
    for (p = argv[5]; *p && n_ids < 4096;) { /* "1,529,29989" */
        char *end;
        ids[n_ids++] = (int32_t)strtol(p, &end, 10);
        if (end == p || (*end && *end != ',')) return fail("bad TOKENS");
        p = *end == ',' ? end + 1 : end;
    }
    tap_dump_set_tokens(d, ids, n_ids);
    tap_dump_set_position(d, strtoll(argv[6], NULL, 10));
    tap_dump_set_dtype(d, store == TAP_DUMP_F32 ? "float32" : store == TAP_DUMP_F16 ? "float16" : "bfloat16");
    tap_dump_set_meta(d, "engine", "kit/examples/raw_dump.c");
    while (fscanf(manifest, "%255s", name) == 1) {
        if (!strcmp(name, "@fused")) { /* "@fused NAME LAYOUT TAP1,TAP2,...": NAME holds those taps side by side */
            char fused[256], layout[32], list[4096], *taps[16], *t;
            int n_taps = 0;
            if (fscanf(manifest, "%255s %31s %4095s", fused, layout, list) != 3) return fail("bad @fused line");
            for (t = strtok(list, ","); t && n_taps < 16; t = strtok(NULL, ",")) taps[n_taps++] = t;
            if (tap_dump_set_fused(d, fused, (const char *const *)taps, n_taps, layout) != 0)
                return fail("tap_dump_set_fused failed");
            continue;
        }
        if (fscanf(manifest, "%d", &ndim) != 1) return fail("bad NDIM in MANIFEST");
        int64_t shape[8];
        size_t count = 1;
        float *buf;
        int k;
        if (ndim < 0 || ndim > 8) return fail("bad NDIM in MANIFEST");
        for (k = 0; k < ndim; k++) {
            long long v;
            if (fscanf(manifest, "%lld", &v) != 1) return fail("bad shape in MANIFEST");
            shape[k] = v;
            count *= (size_t)v;
        }
        buf = (float *)malloc(count * sizeof(float) + 1);
        if (!buf || fread(buf, sizeof(float), count, data) != count) return fail("DATA is shorter than MANIFEST says");
        if (tap_dump_add_f32(d, name, buf, ndim, shape, store) != 0) return fail("tap_dump_add_f32 failed");
        free(buf);
    }
    if (tap_dump_write(d, argv[3]) != 0) {
        perror("error: tap_dump_write");
        rc = 1;
    }
    tap_dump_free(d);
    fclose(manifest);
    fclose(data);
    return rc;
}
