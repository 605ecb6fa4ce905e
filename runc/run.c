/* run.c: chat with a nanochat model in one dependency-free C file (C11, libc and libm; OpenMP if built with it).
 *
 *   python -m scripts.export --source sft --format c --out DIR [--quantize int8]
 *   make -C runc            # portable build; `make -C runc fast` for -Ofast -march=native -fopenmp
 *   runc/run DIR --chat     # or: runc/run DIR --prompt "Who are you?"     (runc/run --help lists every flag)
 *
 * DIR holds model.bin and tokenizer.bin, whose formats are described in one place: the docstring of
 * nanochat/export_c.py. What this file computes is what the Python side computes:
 *   - the forward pass of nanochat/gpt.py, op for op, in fp32, or with int8 weights (the activation vector is
 *     rounded to int8 groups too, so the dot products are int8 x int8 summed in int32), with the 2026 recipe's
 *     changes a model was trained with (value embeddings, layer scalars, smear, backout, windows, QK gain),
 *   - tiktoken's encoding given our merge ranks and split pattern (nanochat/tokenizer.py SPLIT_PATTERN, written out
 *     by hand below), and the Engine's streaming UTF-8 decoding (nanochat/engine.py TextStream),
 *   - the chat format of Tokenizer.render_for_completion, and scripts/chat_cli.py's printing of a reply.
 * The python tool is not run: a reply that calls it is printed up to the call and stops there.
 *
 * Sections: model (file checks, memory map), forward pass, tokenizer, sampler, chat loop, CLI.
 */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define MODEL_FORMAT_VERSION 2 /* version 1 files (no recipe change, no window tensor) are read too */
#define TOKENIZER_FORMAT_VERSION 1
/* header offset 100: the 2026-recipe changes on */
#define VALUE_EMBEDDINGS 1u
#define LAYER_SCALARS 2u
#define SMEAR 4u
#define BACKOUT 8u
#define MODEL_HEADER_BYTES 256
#define TOKENIZER_HEADER_BYTES 64
#define GROUP 64 /* the int8 group size this runner computes with (nanochat/quantize.py GROUP_SIZE) */
#define PARALLEL_MIN_WORK 32768 /* multiply-adds below which a matmul stays on one thread */

static void die(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("error: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(1);
}

/* Threads that run the matmuls' tasks (all of them sit in the one parallel region main opens). */
static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static void *xmalloc(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (!p) die("out of memory (%zu bytes)", bytes);
    return p;
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Little-endian fields, read byte by byte so the headers parse the same on any host. */
static uint32_t read_u32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t read_u64(const uint8_t *p) { return (uint64_t)read_u32(p) | (uint64_t)read_u32(p + 4) << 32; }
static float read_f32(const uint8_t *p) {
    uint32_t bits = read_u32(p);
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* zlib's CRC-32 (what Python's zlib.crc32 computes). */
static uint32_t crc32_of(const uint8_t *data, size_t n) {
    static uint32_t table[256];
    if (!table[1]) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
    }
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

/* A fingerprint field (16 ASCII hex digits) as a string; anything else in it shows as '?' in messages. */
static void copy_fingerprint(char out[17], const uint8_t *field) {
    for (int i = 0; i < 16; i++) {
        uint8_t c = field[i];
        out[i] = (char)(((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')) ? c : '?');
    }
    out[16] = '\0';
}

/* ============================================================================================================
 * Model: the header, checked before any weight is touched, and the weights, memory-mapped in place
 * ============================================================================================================ */

typedef struct {
    int n_layer, n_head, n_kv_head, n_embd, vocab_size, seq_len, rotary_len, hidden, group_size;
    int head_dim, kv_dim;
    float rope_base, softcap, eps;
    uint32_t version, features; /* features: the recipe bits above */
    int gate_channels;
    float qk_gain;
    char tokenizer_fingerprint[17];
    uint32_t tokenizer_vocab;
    uint64_t file_bytes;
} Config;

/* One weight matrix (rows = out features): fp32, or int8 values with one fp32 scale per GROUP of a row. */
typedef struct {
    const float *f32;
    const int8_t *q;
    const float *scales;
    int rows, cols;
} Matrix;

typedef struct {
    Matrix c_q, c_k, c_v, attn_proj, c_fc, mlp_proj;
    const float *value_embedding; /* vocab_size x kv_dim, or NULL: a layer without one */
    const float *ve_gate;         /* n_kv_head x gate_channels, with value_embedding */
    int window;                   /* positions its queries see, their own included; 0: all of them */
} Layer;

typedef struct {
    Config c;
    const float *inv_freq; /* head_dim / 2 */
    const uint32_t *windows; /* n_layer (version 2), or NULL */
    const float *wte;      /* vocab_size x n_embd */
    Layer *layers;
    Matrix lm_head;
    /* the recipe's scalars, NULL when their change is off */
    const float *resid_lambdas, *x0_lambdas, *smear_gate, *smear_lambda, *backout_lambda;
    void *map;
    size_t map_bytes;
} Model;

/* Walks the tensors in file order: with base == NULL it only sizes the file, which is how the size check and the
 * pointers into the mapping come from the same code. */
typedef struct {
    const uint8_t *base;
    uint64_t offset;
} Cursor;

static const void *take(Cursor *cursor, uint64_t bytes) {
    const void *p = cursor->base ? cursor->base + cursor->offset : NULL;
    cursor->offset += (bytes + 63) & ~(uint64_t)63;
    return p;
}

static Matrix take_matrix(Cursor *cursor, int rows, int cols, int group_size) {
    Matrix m = {NULL, NULL, NULL, rows, cols};
    uint64_t count = (uint64_t)rows * (uint64_t)cols;
    if (group_size) {
        m.q = take(cursor, count);
        m.scales = take(cursor, count / (uint64_t)group_size * 4);
    } else {
        m.f32 = take(cursor, count * 4);
    }
    return m;
}

/* attention.py has_value_embedding: the last layer and every other one before it. */
static int has_value_embedding(const Config *c, int layer) {
    return (c->features & VALUE_EMBEDDINGS) && (c->n_layer - 1 - layer) % 2 == 0;
}

static const float *take_f32(Cursor *cursor, uint64_t count, uint32_t feature, const Config *c) {
    return (c->features & feature) ? take(cursor, count * 4) : NULL;
}

static uint64_t layout(Model *m, const uint8_t *base) {
    const Config *c = &m->c;
    Cursor cursor = {base, MODEL_HEADER_BYTES};
    int g = c->group_size;
    Layer scratch; /* where a sizing pass (no layers yet) writes */
    m->inv_freq = take(&cursor, (uint64_t)c->head_dim / 2 * 4);
    m->windows = c->version >= 2 ? take(&cursor, (uint64_t)c->n_layer * 4) : NULL;
    m->wte = take(&cursor, (uint64_t)c->vocab_size * (uint64_t)c->n_embd * 4);
    for (int l = 0; l < c->n_layer; l++) {
        Layer *layer = m->layers ? &m->layers[l] : &scratch;
        memset(layer, 0, sizeof *layer);
        if (has_value_embedding(c, l))
            layer->value_embedding = take(&cursor, (uint64_t)c->vocab_size * (uint64_t)c->kv_dim * 4);
    }
    for (int l = 0; l < c->n_layer; l++) {
        Layer *layer = m->layers ? &m->layers[l] : &scratch;
        layer->c_q = take_matrix(&cursor, c->n_head * c->head_dim, c->n_embd, g);
        layer->c_k = take_matrix(&cursor, c->kv_dim, c->n_embd, g);
        layer->c_v = take_matrix(&cursor, c->kv_dim, c->n_embd, g);
        layer->attn_proj = take_matrix(&cursor, c->n_embd, c->n_embd, g);
        layer->c_fc = take_matrix(&cursor, c->hidden, c->n_embd, g);
        layer->mlp_proj = take_matrix(&cursor, c->n_embd, c->hidden, g);
        if (has_value_embedding(c, l))
            layer->ve_gate = take(&cursor, (uint64_t)c->n_kv_head * (uint64_t)c->gate_channels * 4);
    }
    m->lm_head = take_matrix(&cursor, c->vocab_size, c->n_embd, g);
    m->resid_lambdas = take_f32(&cursor, (uint64_t)c->n_layer, LAYER_SCALARS, c);
    m->x0_lambdas = take_f32(&cursor, (uint64_t)c->n_layer, LAYER_SCALARS, c);
    m->smear_gate = take_f32(&cursor, (uint64_t)c->gate_channels, SMEAR, c);
    m->smear_lambda = take_f32(&cursor, 1, SMEAR, c);
    m->backout_lambda = take_f32(&cursor, 1, BACKOUT, c);
    return cursor.offset;
}

static void check_range(const char *path, const char *name, long value, long lo, long hi) {
    if (value < lo || value > hi)
        die("%s is corrupt: %s = %ld is outside [%ld, %ld] (re-export it with python -m scripts.export --format c)",
            path, name, value, lo, hi);
}

static void parse_model_header(Config *c, const uint8_t *h, const char *path) {
    if (memcmp(h, "NCHATMDL", 8) != 0)
        die("%s is not a nanochat model.bin (wrong magic): export one with python -m scripts.export --format c",
            path);
    uint32_t version = read_u32(h + 8);
    if (version < 1 || version > MODEL_FORMAT_VERSION)
        die("%s has format version %u, this runner reads versions 1 to %d: re-export it, or rebuild runc/run from "
            "the same checkout as the exporter", path, version, MODEL_FORMAT_VERSION);
    if (read_u32(h + 12) != MODEL_HEADER_BYTES || crc32_of(h, 96) != read_u32(h + 96) ||
        (version >= 2 && crc32_of(h + 100, 152) != read_u32(h + 252)))
        die("%s has a corrupt header (checksum mismatch): re-export it", path);
    c->version = version;
    c->features = version >= 2 ? read_u32(h + 100) : 0;
    c->gate_channels = version >= 2 ? (int)read_u32(h + 104) : 0;
    c->qk_gain = version >= 2 ? read_f32(h + 108) : 1.0f;
    int *fields[9] = {&c->n_layer, &c->n_head, &c->n_kv_head, &c->n_embd, &c->vocab_size,
                      &c->seq_len, &c->rotary_len, &c->hidden, &c->group_size};
    for (int i = 0; i < 9; i++) *fields[i] = (int)read_u32(h + 16 + 4 * i);
    c->rope_base = read_f32(h + 52);
    c->softcap = read_f32(h + 56);
    c->eps = read_f32(h + 60);
    copy_fingerprint(c->tokenizer_fingerprint, h + 64);
    c->tokenizer_vocab = read_u32(h + 80);
    c->file_bytes = read_u64(h + 88);
    /* bounds that keep every size below 2^50 bytes, so the size arithmetic cannot overflow */
    check_range(path, "n_layer", c->n_layer, 1, 4096);
    check_range(path, "n_embd", c->n_embd, 2, 65536);
    check_range(path, "n_head", c->n_head, 1, c->n_embd);
    check_range(path, "n_kv_head", c->n_kv_head, 1, c->n_head);
    check_range(path, "vocab_size", c->vocab_size, 1, 1 << 24);
    check_range(path, "sequence_len", c->seq_len, 1, 1 << 24);
    check_range(path, "rotary_len", c->rotary_len, c->seq_len, 1 << 28);
    check_range(path, "mlp_hidden", c->hidden, 1, 1 << 20);
    check_range(path, "tokenizer vocab", (long)c->tokenizer_vocab, 1, c->vocab_size);
    if (c->n_embd % c->n_head || c->n_head % c->n_kv_head || (c->n_embd / c->n_head) % 2)
        die("%s is corrupt: n_embd %d, n_head %d, n_kv_head %d do not make whole, even heads", path, c->n_embd,
            c->n_head, c->n_kv_head);
    if (c->group_size != 0 && c->group_size != GROUP)
        die("%s holds int8 groups of %d; this runner computes with groups of %d: re-export it", path,
            c->group_size, GROUP);
    if (c->group_size && (c->n_embd % GROUP || c->hidden % GROUP))
        die("%s is corrupt: int8 groups of %d do not divide n_embd %d / mlp_hidden %d", path, GROUP, c->n_embd,
            c->hidden);
    if (!(c->softcap > 0.0f && c->softcap < 1e6f) || !(c->eps >= 0.0f && c->eps < 1.0f))
        die("%s is corrupt: softcap %g, norm eps %g", path, c->softcap, c->eps);
    if (c->features & ~(VALUE_EMBEDDINGS | LAYER_SCALARS | SMEAR | BACKOUT))
        die("%s uses recipe changes 0x%x this runner does not know: rebuild runc/run from the same checkout as the "
            "exporter", path, c->features);
    if ((c->features & (VALUE_EMBEDDINGS | SMEAR)) && (c->gate_channels < 1 || c->gate_channels > c->n_embd))
        die("%s is corrupt: gate_channels %d with n_embd %d", path, c->gate_channels, c->n_embd);
    if (!(c->qk_gain > 0.0f && c->qk_gain < 1e3f)) die("%s is corrupt: qk_gain %g", path, c->qk_gain);
    c->head_dim = c->n_embd / c->n_head;
    c->kv_dim = c->n_kv_head * c->head_dim;
}

static void load_model(Model *m, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die("cannot open %s: %s (export a model with python -m scripts.export --format c --out DIR)", path,
            strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) die("cannot stat %s: %s", path, strerror(errno));
    uint64_t size = (uint64_t)st.st_size;
    uint8_t header[MODEL_HEADER_BYTES];
    if (size < MODEL_HEADER_BYTES || pread(fd, header, MODEL_HEADER_BYTES, 0) != MODEL_HEADER_BYTES)
        die("%s is truncated: %llu bytes, less than its %d-byte header (re-export it)", path,
            (unsigned long long)size, MODEL_HEADER_BYTES);
    memset(m, 0, sizeof *m);
    parse_model_header(&m->c, header, path);
    uint64_t expected = layout(m, NULL);
    if (expected != m->c.file_bytes)
        die("%s is corrupt: its header says %llu bytes but its shape needs %llu (re-export it)", path,
            (unsigned long long)m->c.file_bytes, (unsigned long long)expected);
    if (size != expected)
        die("%s is %s: %llu bytes, its header says %llu (re-export it)", path, size < expected ? "truncated" :
            "longer than its header says", (unsigned long long)size, (unsigned long long)expected);
    m->map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m->map == MAP_FAILED) die("cannot memory-map %s: %s", path, strerror(errno));
    close(fd);
    posix_madvise(m->map, (size_t)size, POSIX_MADV_WILLNEED);
    m->map_bytes = (size_t)size;
    m->layers = xmalloc(sizeof(Layer) * (size_t)m->c.n_layer);
    layout(m, m->map);
    for (int l = 0; l < m->c.n_layer; l++) {
        uint32_t window = m->windows ? m->windows[l] : 0;
        check_range(path, "a layer's window", (long)window, 0, m->c.seq_len);
        m->layers[l].window = (int)window;
    }
}

/* ============================================================================================================
 * Forward pass: nanochat/gpt.py for one token at one position, against a KV cache. Every buffer is allocated once.
 * ============================================================================================================ */

typedef struct {
    float *x, *xb, *xb2, *q, *k, *v, *att_out, *hidden, *scores, *logits, *rope_cos, *rope_sin;
    int16_t *xq;      /* the current matmul input rounded to int8 groups (int8 models only), held as int16 */
    float *xq_scales; /* one per group */
    float *k_cache, *v_cache; /* [layer][position][kv_dim]; keys after rotary and QK-norm, as gpt.py caches them */
    float *x0, *mid, *previous; /* the recipe's: the embedding (scalars), the mid-depth residual (backout), smear's */
    int *tokens;                /* the token at each cached position: smear reads the one before */
    int context;                /* positions the cache holds */
} State;

static void new_state(State *s, const Config *c, int context) {
    int widest = c->hidden > c->n_embd ? c->hidden : c->n_embd;
    s->context = context;
    s->x = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->xb = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->xb2 = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->q = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->k = xmalloc(sizeof(float) * (size_t)c->kv_dim);
    s->v = xmalloc(sizeof(float) * (size_t)c->kv_dim);
    s->att_out = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->hidden = xmalloc(sizeof(float) * (size_t)c->hidden);
    s->scores = xmalloc(sizeof(float) * (size_t)c->n_head * (size_t)context);
    s->logits = xmalloc(sizeof(float) * (size_t)c->vocab_size);
    s->rope_cos = xmalloc(sizeof(float) * (size_t)c->head_dim / 2);
    s->rope_sin = xmalloc(sizeof(float) * (size_t)c->head_dim / 2);
    s->xq = xmalloc(sizeof(int16_t) * (size_t)widest);
    s->xq_scales = xmalloc(sizeof(float) * (size_t)(widest / GROUP + 1));
    size_t cache = (size_t)c->n_layer * (size_t)context * (size_t)c->kv_dim;
    s->k_cache = xmalloc(sizeof(float) * cache);
    s->v_cache = xmalloc(sizeof(float) * cache);
    s->x0 = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->mid = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->previous = xmalloc(sizeof(float) * (size_t)c->n_embd);
    s->tokens = xmalloc(sizeof(int) * (size_t)context);
}

/* F.rms_norm without weights: x / sqrt(mean(x^2) + eps). */
static void rmsnorm(float *out, const float *x, int n, float eps) {
    float sum = 0.0f;
    for (int i = 0; i < n; i++) sum += x[i] * x[i];
    float scale = 1.0f / sqrtf(sum / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * scale;
}

/* 16 independent partial sums: the compiler vectorizes them without being allowed to reorder a sum. */
static inline float dot_f32(const float *restrict a, const float *restrict b, int n) {
    float acc[16] = {0};
    int j = 0;
    for (; j + 16 <= n; j += 16)
        for (int k = 0; k < 16; k++) acc[k] += a[j + k] * b[j + k];
    float sum = 0.0f;
    for (int k = 0; k < 16; k++) sum += acc[k];
    for (; j < n; j++) sum += a[j] * b[j];
    return sum;
}

/* Round x to int8 groups of GROUP, each with its own scale max|x| / 127 (the weights' rounding, applied to the
 * activation), so that a matmul is int8 x int8 products summed in int32, reading 4x fewer weight bytes than fp32.
 * The values are kept as int16: an int8 weight times an int16 is what gcc turns into pmaddwd multiply-adds, where
 * int8 x int8 gets widened element by element (one Zen 3 core, AVX2, -Ofast, 768-wide rows: 17.2 against 7.2
 * GMAC/s in cache, 9.1 against 4.9 streaming from memory). */
static void quantize_activation(State *s, const float *x, int n) {
    for (int g = 0; g < n / GROUP; g++) {
        const float *group = x + g * GROUP;
        float amax = 0.0f;
        for (int j = 0; j < GROUP; j++) amax = fmaxf(amax, fabsf(group[j]));
        float scale = amax / 127.0f;
        float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < GROUP; j++) s->xq[g * GROUP + j] = (int16_t)lrintf(group[j] * inverse);
        s->xq_scales[g] = scale;
    }
}

static inline int32_t dot_q8(const int8_t *restrict a, const int16_t *restrict b) {
    int32_t sum = 0;
    for (int j = 0; j < GROUP; j++) sum += (int32_t)a[j] * (int32_t)b[j];
    return sum;
}

/* Row i of W times x: fp32, or int8 groups (x quantized into the state first, by prepare_input). */
static inline float row_dot(const Matrix *w, int i, const float *x, const State *s) {
    int n = w->cols;
    if (!w->q) return dot_f32(w->f32 + (size_t)i * n, x, n);
    const int8_t *row = w->q + (size_t)i * n;
    const float *row_scales = w->scales + (size_t)i * (n / GROUP);
    float acc = 0.0f;
    for (int g = 0; g < n / GROUP; g++)
        acc += (float)dot_q8(row + g * GROUP, s->xq + g * GROUP) * row_scales[g] * s->xq_scales[g];
    return acc;
}

/* Rows [begin, end) of the matrices' rows taken one after another (q's, then k's, then v's). */
static void linear_rows(float *const *ys, const Matrix *const *ws, const float *x, const State *s, int begin,
                        int end) {
    int k = 0, i = begin;
    while (i >= ws[k]->rows) i -= ws[k++]->rows;
    for (int r = begin; r < end; r++, i++) {
        if (i == ws[k]->rows) i = 0, k++;
        ys[k][i] = row_dot(ws[k], i, x, s);
    }
}

/* ys[k] = Ws[k] x for matrices that read the same input (q, k and v share one pass), their rows split into tasks.
 * Tasks, not a parallel for: a thread that has no core just now (a busy machine) is never waited for; whoever runs
 * takes the next task. Measured on 2 Zen 3 cores with another process busy on one of them, depth 12, 2 threads:
 * 2.2 tok/s with `omp parallel for` (each of the ~70 joins a token waits for the descheduled thread), 12.7 with
 * tasks (one thread alone: 29.9). */
static void linears(float *const *ys, const Matrix *const *ws, int count, const float *x, const State *s) {
    int rows = 0;
    for (int k = 0; k < count; k++) rows += ws[k]->rows;
    int tasks = (long)rows * ws[0]->cols >= PARALLEL_MIN_WORK ? 2 * team_size() : 1;
#pragma omp taskloop num_tasks(tasks) if (tasks > 1)
    for (int task = 0; task < tasks; task++)
        linear_rows(ys, ws, x, s, (int)((long)rows * task / tasks), (int)((long)rows * (task + 1) / tasks));
}

static void linear(float *y, const Matrix *w, const float *x, const State *s) { linears(&y, &w, 1, x, s); }

static void prepare_input(const Model *m, State *s, const float *x, int n) {
    if (m->c.group_size) quantize_activation(s, x, n);
}

/* gpt.py apply_rotary on one head: the two halves rotate as pairs, [x1 cos + x2 sin, x2 cos - x1 sin]. */
static void rotary(float *head, const State *s, int half) {
    for (int i = 0; i < half; i++) {
        float x1 = head[i], x2 = head[i + half];
        head[i] = x1 * s->rope_cos[i] + x2 * s->rope_sin[i];
        head[i + half] = x2 * s->rope_cos[i] - x1 * s->rope_sin[i];
    }
}

static void softmax(float *x, int n) {
    float max = x[0];
    for (int i = 1; i < n; i++) max = x[i] > max ? x[i] : max;
    float sum = 0.0f;
    for (int i = 0; i < n; i++) {
        x[i] = expf(x[i] - max);
        sum += x[i];
    }
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* Causal attention of the token at `pos` over the cached positions its layer's window reaches (first..pos) for
 * query heads [begin, end), at scale qk_gain / sqrt(head_dim) (SDPA's default when the gain is 1); query head h
 * reads key/value head h / (n_head / n_kv_head) (GQA, as enable_gqa repeats them). */
static void attend(const Model *m, State *s, int layer, int pos, int begin, int end) {
    const Config *c = &m->c;
    int hd = c->head_dim, group = c->n_head / c->n_kv_head, window = m->layers[layer].window;
    int first = window && pos >= window ? pos - window + 1 : 0, n = pos - first + 1;
    size_t layer_offset = ((size_t)layer * (size_t)s->context + (size_t)first) * (size_t)c->kv_dim;
    const float *keys = s->k_cache + layer_offset, *values = s->v_cache + layer_offset;
    float scale = c->qk_gain / sqrtf((float)hd);
    for (int h = begin; h < end; h++) {
        const float *q = s->q + h * hd;
        float *scores = s->scores + (size_t)h * s->context;
        size_t head_offset = (size_t)(h / group) * hd;
        for (int t = 0; t < n; t++) scores[t] = dot_f32(q, keys + (size_t)t * c->kv_dim + head_offset, hd) * scale;
        softmax(scores, n);
        float *out = s->att_out + h * hd;
        memset(out, 0, sizeof(float) * (size_t)hd);
        for (int t = 0; t < n; t++) {
            const float *v = values + (size_t)t * c->kv_dim + head_offset;
            for (int i = 0; i < hd; i++) out[i] += scores[t] * v[i];
        }
    }
}

/* All heads, one task per head once the context is long enough to be worth it. */
static void attention(const Model *m, State *s, int layer, int pos) {
    int heads = m->c.n_head, tasks = (long)(pos + 1) * m->c.n_embd >= PARALLEL_MIN_WORK ? heads : 1;
#pragma omp taskloop num_tasks(tasks) if (tasks > 1)
    for (int task = 0; task < tasks; task++) attend(m, s, layer, pos, heads * task / tasks, heads * (task + 1) / tasks);
}

static void add(float *x, const float *y, int n) {
    for (int i = 0; i < n; i++) x[i] += y[i];
}

static float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

/* The normed token embedding: the start of the residual stream (gpt.py _embed). */
static void embed(const Model *m, float *out, int token) {
    int d = m->c.n_embd;
    memcpy(out, m->wte + (size_t)token * d, sizeof(float) * (size_t)d);
    rmsnorm(out, out, d, m->c.eps);
}

/* gpt.py _smear: x += smear_lambda * sigmoid(smear_gate . x[:gate_channels]) * (the previous token's embedding). */
static void smear(const Model *m, State *s, int pos) {
    if (pos == 0) return; /* a sequence's first token has no previous one */
    const Config *c = &m->c;
    embed(m, s->previous, s->tokens[pos - 1]);
    float gate = m->smear_lambda[0] * sigmoid(dot_f32(s->x, m->smear_gate, c->gate_channels));
    for (int i = 0; i < c->n_embd; i++) s->x[i] += gate * s->previous[i];
}

/* attention.py: v += 2 sigmoid(ve_gate[h] . x[:gate_channels]) * (the layer's value-embedding row), per kv head,
 * where x is the normed input of the attention. */
static void add_value_embedding(const Model *m, State *s, const Layer *w, int token) {
    const Config *c = &m->c;
    const float *row = w->value_embedding + (size_t)token * c->kv_dim;
    for (int h = 0; h < c->n_kv_head; h++) {
        float gate = 2.0f * sigmoid(dot_f32(s->xb, w->ve_gate + (size_t)h * c->gate_channels, c->gate_channels));
        for (int i = 0; i < c->head_dim; i++) s->v[h * c->head_dim + i] += gate * row[h * c->head_dim + i];
    }
}

/* One token through the model; returns the softcapped logits, or NULL when want_logits is 0 (a prefill token
 * whose logits nobody reads skips the LM head, most of a small model's work). */
static float *forward(const Model *m, State *s, int token, int pos, int want_logits) {
    const Config *c = &m->c;
    int d = c->n_embd, hd = c->head_dim;
    s->tokens[pos] = token;
    embed(m, s->x, token);
    if (m->smear_gate) smear(m, s, pos);
    memcpy(s->x0, s->x, sizeof(float) * (size_t)d);
    for (int i = 0; i < hd / 2; i++) {
        float angle = (float)pos * m->inv_freq[i]; /* the f32 product, as torch.outer computes the table */
        s->rope_cos[i] = cosf(angle);
        s->rope_sin[i] = sinf(angle);
    }
    for (int l = 0; l < c->n_layer; l++) {
        const Layer *w = &m->layers[l];
        if (l == c->n_layer / 2) memcpy(s->mid, s->x, sizeof(float) * (size_t)d); /* what backout subtracts */
        if (m->resid_lambdas)
            for (int i = 0; i < d; i++) s->x[i] = m->resid_lambdas[l] * s->x[i] + m->x0_lambdas[l] * s->x0[i];
        rmsnorm(s->xb, s->x, d, c->eps);
        prepare_input(m, s, s->xb, d);
        float *qkv[3] = {s->q, s->k, s->v};
        const Matrix *qkv_weights[3] = {&w->c_q, &w->c_k, &w->c_v};
        linears(qkv, qkv_weights, 3, s->xb, s);
        if (w->value_embedding) add_value_embedding(m, s, w, token);
        for (int h = 0; h < c->n_head; h++) { /* rotary, then QK-norm */
            rotary(s->q + h * hd, s, hd / 2);
            rmsnorm(s->q + h * hd, s->q + h * hd, hd, c->eps);
        }
        for (int h = 0; h < c->n_kv_head; h++) {
            rotary(s->k + h * hd, s, hd / 2);
            rmsnorm(s->k + h * hd, s->k + h * hd, hd, c->eps);
        }
        size_t slot = ((size_t)l * s->context + (size_t)pos) * c->kv_dim;
        memcpy(s->k_cache + slot, s->k, sizeof(float) * (size_t)c->kv_dim);
        memcpy(s->v_cache + slot, s->v, sizeof(float) * (size_t)c->kv_dim);
        attention(m, s, l, pos);
        prepare_input(m, s, s->att_out, d);
        linear(s->xb2, &w->attn_proj, s->att_out, s);
        add(s->x, s->xb2, d);

        rmsnorm(s->xb, s->x, d, c->eps);
        prepare_input(m, s, s->xb, d);
        linear(s->hidden, &w->c_fc, s->xb, s);
        for (int i = 0; i < c->hidden; i++) { /* ReLU^2 */
            float r = s->hidden[i] > 0.0f ? s->hidden[i] : 0.0f;
            s->hidden[i] = r * r;
        }
        prepare_input(m, s, s->hidden, c->hidden);
        linear(s->xb2, &w->mlp_proj, s->hidden, s);
        add(s->x, s->xb2, d);
    }
    if (!want_logits) return NULL;
    if (m->backout_lambda)
        for (int i = 0; i < d; i++) s->x[i] -= m->backout_lambda[0] * s->mid[i];
    rmsnorm(s->xb, s->x, d, c->eps);
    prepare_input(m, s, s->xb, d);
    linear(s->logits, &m->lm_head, s->xb, s);
    for (int i = 0; i < c->vocab_size; i++) s->logits[i] = c->softcap * tanhf(s->logits[i] / c->softcap);
    return s->logits;
}

/* ============================================================================================================
 * Tokenizer: tiktoken's encoding (split by SPLIT_PATTERN, then byte-pair merges by rank), streaming UTF-8 decoding
 * ============================================================================================================ */

/* nanochat/tokenizer.py SPLIT_PATTERN, byte for byte; split_end() below implements exactly this pattern. */
static const char SPLIT_PATTERN[] =
    "'(?i:[sdmt]|ll|ve|re)|[^\\r\\n\\p{L}\\p{N}]?+\\p{L}+|\\p{N}{1,2}| ?[^\\s\\p{L}\\p{N}]++[\\r\\n]*|\\s*[\\r\\n]|"
    "\\s+(?!\\S)|\\s+";

enum { OTHER = 0, LETTER = 1, NUMBER = 2, SPACE = 3 };

typedef struct {
    uint8_t *file;
    uint32_t n_mergeable, n_special, vocab_size, n_ranges;
    const uint8_t **token;   /* bytes of each mergeable id */
    uint32_t *token_len;
    uint8_t *is_special;     /* per id < vocab_size */
    uint32_t *slots;         /* open-addressing hash of token bytes -> id + 1 (0: empty) */
    uint32_t slot_mask;
    uint32_t *range_first, *range_last, *range_class;
    uint8_t ascii_class[128];
    uint32_t max_token_len;
    char fingerprint[17];
    int bos, user_start, user_end, assistant_start, assistant_end, python_start, python_end, output_start,
        output_end;
} Tokenizer;

static uint32_t hash_bytes(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* The id of a byte string, or -1. */
static int lookup(const Tokenizer *t, const uint8_t *p, size_t n) {
    for (uint32_t i = hash_bytes(p, n) & t->slot_mask;; i = (i + 1) & t->slot_mask) {
        uint32_t slot = t->slots[i];
        if (!slot) return -1;
        uint32_t id = slot - 1;
        if (t->token_len[id] == n && memcmp(t->token[id], p, n) == 0) return (int)id;
    }
}

/* A bounds-checked reader over tokenizer.bin's body: a garbled length can only end in a clear error. */
typedef struct {
    const uint8_t *p, *end;
    const char *path;
} Reader;

static const uint8_t *read_bytes(Reader *r, uint64_t n) {
    if ((uint64_t)(r->end - r->p) < n)
        die("%s is corrupt: it ends in the middle of its tables (re-export it)", r->path);
    const uint8_t *start = r->p;
    r->p += n;
    return start;
}
static uint32_t read_next_u32(Reader *r) { return read_u32(read_bytes(r, 4)); }

static int special_id(Reader names, uint32_t n_special, const char *name) {
    for (uint32_t i = 0; i < n_special; i++) {
        uint32_t id = read_next_u32(&names), len = read_next_u32(&names);
        const uint8_t *text = read_bytes(&names, len);
        if (len == strlen(name) && memcmp(text, name, len) == 0) return (int)id;
    }
    die("%s lacks the special token %s (re-export it)", names.path, name);
    return -1;
}

static void load_tokenizer(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof *t);
    FILE *f = fopen(path, "rb");
    if (!f) die("cannot open %s: %s (export a model with python -m scripts.export --format c --out DIR)", path,
                strerror(errno));
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (size < TOKENIZER_HEADER_BYTES) die("%s is truncated: %ld bytes (re-export it)", path, size);
    t->file = xmalloc((size_t)size);
    if (fread(t->file, 1, (size_t)size, f) != (size_t)size) die("cannot read %s", path);
    fclose(f);
    const uint8_t *h = t->file;
    if (memcmp(h, "NCHATTOK", 8) != 0)
        die("%s is not a nanochat tokenizer.bin (wrong magic): export one with python -m scripts.export --format c",
            path);
    if (read_u32(h + 8) != TOKENIZER_FORMAT_VERSION)
        die("%s has format version %u, this runner reads version %d: re-export it", path, read_u32(h + 8),
            TOKENIZER_FORMAT_VERSION);
    t->n_mergeable = read_u32(h + 12);
    t->n_special = read_u32(h + 16);
    t->vocab_size = read_u32(h + 20);
    copy_fingerprint(t->fingerprint, h + 24);
    uint32_t pattern_len = read_u32(h + 40);
    t->n_ranges = read_u32(h + 44);
    uint64_t body_bytes = read_u32(h + 48);
    if (body_bytes != (uint64_t)size - TOKENIZER_HEADER_BYTES)
        die("%s is %s: %ld bytes, its header says %llu (re-export it)", path,
            body_bytes > (uint64_t)size - TOKENIZER_HEADER_BYTES ? "truncated" : "longer than its header says",
            size, (unsigned long long)body_bytes + TOKENIZER_HEADER_BYTES);
    if (crc32_of(h + TOKENIZER_HEADER_BYTES, body_bytes) != read_u32(h + 52))
        die("%s is corrupt (checksum mismatch): re-export it", path);
    if (t->n_mergeable < 256 || t->n_mergeable > (1u << 24) || t->n_special > 1024 ||
        t->vocab_size != t->n_mergeable + t->n_special)
        die("%s is corrupt: %u tokens + %u special tokens, vocab %u", path, t->n_mergeable, t->n_special,
            t->vocab_size);

    Reader r = {h + TOKENIZER_HEADER_BYTES, h + size, path};
    const uint8_t *pattern = read_bytes(&r, pattern_len);
    if (pattern_len != strlen(SPLIT_PATTERN) || memcmp(pattern, SPLIT_PATTERN, pattern_len) != 0)
        die("%s splits text with another pattern than nanochat.tokenizer.SPLIT_PATTERN, the only one this runner "
            "implements: use a tokenizer trained by python -m scripts.tok_train", path);
    t->token = xmalloc(sizeof(uint8_t *) * t->n_mergeable);
    t->token_len = xmalloc(sizeof(uint32_t) * t->n_mergeable);
    for (uint32_t id = 0; id < t->n_mergeable; id++) {
        t->token_len[id] = read_next_u32(&r);
        t->token[id] = read_bytes(&r, t->token_len[id]);
        if (t->token_len[id] == 0) die("%s is corrupt: token %u is empty", path, id);
        if (t->token_len[id] > t->max_token_len) t->max_token_len = t->token_len[id];
    }
    Reader names = r;
    t->is_special = xmalloc(t->vocab_size);
    for (uint32_t i = 0; i < t->n_special; i++) {
        uint32_t id = read_next_u32(&r);
        read_bytes(&r, read_next_u32(&r));
        if (id < t->n_mergeable || id >= t->vocab_size) die("%s is corrupt: special token id %u", path, id);
        t->is_special[id] = 1;
    }
    t->bos = special_id(names, t->n_special, "<|bos|>");
    t->user_start = special_id(names, t->n_special, "<|user_start|>");
    t->user_end = special_id(names, t->n_special, "<|user_end|>");
    t->assistant_start = special_id(names, t->n_special, "<|assistant_start|>");
    t->assistant_end = special_id(names, t->n_special, "<|assistant_end|>");
    t->python_start = special_id(names, t->n_special, "<|python_start|>");
    t->python_end = special_id(names, t->n_special, "<|python_end|>");
    t->output_start = special_id(names, t->n_special, "<|output_start|>");
    t->output_end = special_id(names, t->n_special, "<|output_end|>");

    if (t->n_ranges > (1u << 21)) die("%s is corrupt: %u Unicode ranges", path, t->n_ranges);
    t->range_first = xmalloc(sizeof(uint32_t) * t->n_ranges);
    t->range_last = xmalloc(sizeof(uint32_t) * t->n_ranges);
    t->range_class = xmalloc(sizeof(uint32_t) * t->n_ranges);
    for (uint32_t i = 0; i < t->n_ranges; i++) {
        t->range_first[i] = read_next_u32(&r);
        t->range_last[i] = read_next_u32(&r);
        t->range_class[i] = read_next_u32(&r);
        if (t->range_first[i] > t->range_last[i] || t->range_last[i] > 0x10FFFF || t->range_class[i] < 1 ||
            t->range_class[i] > 3 || (i && t->range_first[i] <= t->range_last[i - 1]))
            die("%s is corrupt: Unicode range %u", path, i);
    }
    if (r.p != r.end) die("%s is corrupt: %ld unread bytes at its end", path, (long)(r.end - r.p));

    uint32_t slots = 1;
    while (slots < 2 * t->n_mergeable) slots <<= 1;
    t->slots = xmalloc(sizeof(uint32_t) * slots);
    t->slot_mask = slots - 1;
    for (uint32_t id = 0; id < t->n_mergeable; id++) {
        if (lookup(t, t->token[id], t->token_len[id]) >= 0) die("%s is corrupt: token %u repeats another", path, id);
        uint32_t i = hash_bytes(t->token[id], t->token_len[id]) & t->slot_mask;
        while (t->slots[i]) i = (i + 1) & t->slot_mask;
        t->slots[i] = id + 1;
    }
    for (int b = 0; b < 256; b++) {
        uint8_t byte = (uint8_t)b;
        if (lookup(t, &byte, 1) < 0) die("%s is corrupt: the single byte %d is not a token", path, b);
    }
    for (uint32_t i = 0; i < t->n_ranges && t->range_first[i] < 128; i++)
        for (uint32_t c = t->range_first[i]; c <= t->range_last[i] && c < 128; c++)
            t->ascii_class[c] = (uint8_t)t->range_class[i];
}

static int char_class(const Tokenizer *t, uint32_t c) {
    if (c < 128) return t->ascii_class[c];
    uint32_t lo = 0, hi = t->n_ranges;
    while (lo < hi) { /* the first range whose last >= c */
        uint32_t mid = (lo + hi) / 2;
        if (t->range_last[mid] < c) lo = mid + 1; else hi = mid;
    }
    return lo < t->n_ranges && t->range_first[lo] <= c ? (int)t->range_class[lo] : OTHER;
}

/* One UTF-8 character at s (n bytes available), with Python's rules for invalid input (errors="replace"): returns
 * its length and code point; an invalid sequence returns the length of its maximal valid prefix (at least 1)
 * and U+FFFD; a valid prefix cut short by the end of the buffer returns 0. */
static int utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t b = s[0];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    int need;
    uint8_t lo = 0x80, hi = 0xBF;
    uint32_t v;
    if (b >= 0xC2 && b <= 0xDF) {
        need = 1, v = b & 0x1Fu;
    } else if (b >= 0xE0 && b <= 0xEF) {
        need = 2, v = b & 0x0Fu;
        if (b == 0xE0) lo = 0xA0;
        if (b == 0xED) hi = 0x9F; /* no surrogates */
    } else if (b >= 0xF0 && b <= 0xF4) {
        need = 3, v = b & 0x07u;
        if (b == 0xF0) lo = 0x90;
        if (b == 0xF4) hi = 0x8F; /* nothing above U+10FFFF */
    } else {
        *cp = 0xFFFD;
        return 1;
    }
    for (int k = 1; k <= need; k++) {
        if ((size_t)k >= n) return 0;
        if (s[k] < lo || s[k] > hi) {
            *cp = 0xFFFD;
            return k;
        }
        lo = 0x80, hi = 0xBF;
        v = v << 6 | (s[k] & 0x3Fu);
    }
    *cp = v;
    return need + 1;
}

static int put_utf8(uint8_t *out, uint32_t cp) {
    if (cp < 0x80) return out[0] = (uint8_t)cp, 1;
    if (cp < 0x800) return out[0] = (uint8_t)(0xC0 | cp >> 6), out[1] = (uint8_t)(0x80 | (cp & 0x3F)), 2;
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | cp >> 12), out[1] = (uint8_t)(0x80 | (cp >> 6 & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | cp >> 18), out[1] = (uint8_t)(0x80 | (cp >> 12 & 0x3F));
    out[2] = (uint8_t)(0x80 | (cp >> 6 & 0x3F)), out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* The regex crate's simple case folding, as far as (?i:[sdmt]|ll|ve|re) can see it: ASCII, and U+017F LONG S,
 * which folds to s (tiktoken splits "'\u017f" like "'s"). */
static uint32_t fold(uint32_t c) {
    if (c >= 'A' && c <= 'Z') return c + 32;
    return c == 0x17F ? 's' : c;
}

static int is_crlf(uint32_t c) { return c == '\r' || c == '\n'; }

/* Where the piece of text starting at code point i ends, by SPLIT_PATTERN: its alternatives are tried in order,
 * the first that matches wins (leftmost-first, as in fancy-regex), and each is written out as its greedy or
 * possessive match. cls holds each code point's class. */
static int split_end(const uint32_t *cp, const uint8_t *cls, int i, int n) {
    uint32_t c = cp[i];
    int j;
    if (c == '\'' && i + 1 < n) { /* '(?i:[sdmt]|ll|ve|re) */
        uint32_t a = fold(cp[i + 1]), b = i + 2 < n ? fold(cp[i + 2]) : 0;
        if (a == 's' || a == 'd' || a == 'm' || a == 't') return i + 2;
        if ((a == 'l' && b == 'l') || (a == 'v' && b == 'e') || (a == 'r' && b == 'e')) return i + 3;
    }
    j = (cls[i] != LETTER && cls[i] != NUMBER && !is_crlf(c)) ? i + 1 : i; /* [^\r\n\p{L}\p{N}]?+\p{L}+ */
    if (j < n && cls[j] == LETTER) {
        while (j < n && cls[j] == LETTER) j++;
        return j;
    }
    if (cls[i] == NUMBER) return (i + 1 < n && cls[i + 1] == NUMBER) ? i + 2 : i + 1; /* \p{N}{1,2} */
    j = (c == ' ' && i + 1 < n && cls[i + 1] == OTHER) ? i + 1 : i; /* ' ?[^\s\p{L}\p{N}]++[\r\n]*' */
    if (cls[j] == OTHER) {
        while (j < n && cls[j] == OTHER) j++;
        while (j < n && is_crlf(cp[j])) j++;
        return j;
    }
    int end = i; /* what is left starts a run of whitespace */
    while (end < n && cls[end] == SPACE) end++;
    for (j = end - 1; j >= i; j--) /* \s*[\r\n]: up to the run's last line break */
        if (is_crlf(cp[j])) return j + 1;
    /* \s+(?!\S): all of a run that ends the text, else all but its last character (which then joins the next
     * piece); a run of one before a non-space is \s+ */
    return (end == n || end - i == 1) ? end : end - 1;
}

/* Byte-pair merges of one piece, as tiktoken's byte_pair_merge: repeatedly join the adjacent pair whose join has
 * the lowest rank (the leftmost on a tie) until no join is a token. starts/ranks: scratch of n + 1 entries. */
static int merge_piece(const Tokenizer *t, const uint8_t *p, int n, int *out, int *starts, int *ranks) {
    int whole = lookup(t, p, (size_t)n);
    if (whole >= 0) {
        out[0] = whole;
        return 1;
    }
    int parts = n + 1; /* starts[0..parts-1]; part k is p[starts[k] .. starts[k+1]) */
    for (int k = 0; k < parts; k++) starts[k] = k;
    for (int k = 0; k + 2 < parts; k++) ranks[k] = lookup(t, p + k, 2);
    for (;;) {
        int best = -1;
        for (int k = 0; k + 2 < parts; k++)
            if (ranks[k] >= 0 && (best < 0 || ranks[k] < ranks[best])) best = k;
        if (best < 0) break;
        memmove(starts + best + 1, starts + best + 2, sizeof(int) * (size_t)(parts - best - 2));
        memmove(ranks + best + 1, ranks + best + 2, sizeof(int) * (size_t)(parts > best + 3 ? parts - best - 3 : 0));
        parts--;
        if (best + 2 < parts)
            ranks[best] = lookup(t, p + starts[best], (size_t)(starts[best + 2] - starts[best]));
        if (best > 0) ranks[best - 1] = lookup(t, p + starts[best - 1], (size_t)(starts[best + 1] - starts[best - 1]));
    }
    for (int k = 0; k + 1 < parts; k++) out[k] = lookup(t, p + starts[k], (size_t)(starts[k + 1] - starts[k]));
    return parts - 1;
}

/* Token ids of text (n bytes) into out, which holds at least n + 1 ids; returns how many. Invalid UTF-8 is read
 * as U+FFFD, as Python decodes it with errors="replace". Special tokens in the text are plain text, as in
 * Tokenizer.encode. */
static int encode(const Tokenizer *t, const char *text, size_t n, int *out) {
    const uint8_t *s = (const uint8_t *)text;
    uint8_t *clean = xmalloc(3 * n + 4); /* a bad byte becomes the 3 bytes of U+FFFD */
    uint32_t *cps = xmalloc(sizeof(uint32_t) * (n + 1));
    uint8_t *cls = xmalloc(n + 1);
    size_t *offsets = xmalloc(sizeof(size_t) * (n + 2));
    int count = 0;
    size_t clean_len = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        int len = utf8_next(s + i, n - i, &cp);
        if (len == 0) len = (int)(n - i), cp = 0xFFFD; /* cut short at the end */
        offsets[count] = clean_len;
        cps[count] = cp;
        cls[count] = (uint8_t)char_class(t, cp);
        if (cp == 0xFFFD && !(len == 3 && memcmp(s + i, "\xEF\xBF\xBD", 3) == 0))
            clean_len += (size_t)put_utf8(clean + clean_len, cp);
        else
            memcpy(clean + clean_len, s + i, (size_t)len), clean_len += (size_t)len;
        count++;
        i += (size_t)len;
    }
    offsets[count] = clean_len;
    int *starts = xmalloc(sizeof(int) * (clean_len + 1)), *ranks = xmalloc(sizeof(int) * (clean_len + 1));
    int produced = 0;
    for (int i = 0; i < count;) {
        int end = split_end(cps, cls, i, count);
        produced += merge_piece(t, clean + offsets[i], (int)(offsets[end] - offsets[i]), out + produced, starts,
                                ranks);
        i = end;
    }
    free(clean), free(cps), free(cls), free(offsets), free(starts), free(ranks);
    return produced;
}

/* Streaming decoding (nanochat/engine.py TextStream): the bytes of a character split across tokens wait until it
 * is complete; invalid bytes print as U+FFFD where Python's incremental decoder would put one. */
typedef struct {
    uint8_t *buffer; /* held bytes + the next token's bytes */
    int held;
    FILE *out;
    char **copy; /* when set, everything written is appended here too (the reply's text, for the history) */
    size_t *copy_len, *copy_cap;
} TextStream;

static void new_text_stream(TextStream *d, const Tokenizer *t, FILE *out) {
    memset(d, 0, sizeof *d);
    d->buffer = xmalloc(t->max_token_len + 8);
    d->out = out;
}

static void emit(TextStream *d, const void *bytes, size_t n) {
    if (d->out) fwrite(bytes, 1, n, d->out);
    if (!d->copy) return;
    if (*d->copy_len + n + 1 > *d->copy_cap) {
        *d->copy_cap = 2 * (*d->copy_len + n + 1);
        *d->copy = realloc(*d->copy, *d->copy_cap);
        if (!*d->copy) die("out of memory");
    }
    memcpy(*d->copy + *d->copy_len, bytes, n);
    *d->copy_len += n;
    (*d->copy)[*d->copy_len] = '\0';
}

static void decode_bytes(TextStream *d, int final) {
    int i = 0;
    while (i < d->held) {
        uint32_t cp;
        int len = utf8_next(d->buffer + i, (size_t)(d->held - i), &cp);
        if (len == 0 && !final) break;
        if (len == 0) len = d->held - i, cp = 0xFFFD;
        if (cp == 0xFFFD && !(len == 3 && memcmp(d->buffer + i, "\xEF\xBF\xBD", 3) == 0))
            emit(d, "\xEF\xBF\xBD", 3);
        else
            emit(d, d->buffer + i, (size_t)len);
        i += len;
    }
    memmove(d->buffer, d->buffer + i, (size_t)(d->held - i));
    d->held -= i;
}

/* A token's text; special tokens (and ids past the tokenizer's vocabulary) are not text and print nothing. */
static void feed_token(TextStream *d, const Tokenizer *t, int id) {
    if (id < 0 || (uint32_t)id >= t->n_mergeable) return;
    memcpy(d->buffer + d->held, t->token[id], t->token_len[id]);
    d->held += (int)t->token_len[id];
    decode_bytes(d, 0);
}

static void flush_text(TextStream *d) { decode_bytes(d, 1); }

/* ============================================================================================================
 * Sampler: greedy at temperature 0 (the lowest id on a tie, like torch.argmax), else softmax(logits / T) over the
 * top-k (0 = all)
 * ============================================================================================================ */

typedef struct {
    float temperature;
    int top_k;
    uint64_t rng;
    int *candidates; /* vocab_size, allocated once */
    float *weights;
} Sampler;

static float random_uniform(Sampler *s) { /* xorshift64*: [0, 1) */
    s->rng ^= s->rng >> 12;
    s->rng ^= s->rng << 25;
    s->rng ^= s->rng >> 27;
    return (float)((s->rng * 0x2545F4914F6CDD1Dull) >> 40) / 16777216.0f;
}

static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static void swap_ids(int *a, int *b) {
    int tmp = *a;
    *a = *b;
    *b = tmp;
}

/* The k largest logits' ids into s->candidates[0..k), kept as a min-heap of size k: O(V log k). */
static void top_candidates(Sampler *s, const float *logits, int n, int k) {
    int *heap = s->candidates, size = 0;
    for (int i = 0; i < n; i++) {
        if (size < k) { /* add a leaf, sift it up */
            int at = size++;
            heap[at] = i;
            while (at > 0 && logits[heap[at]] < logits[heap[(at - 1) / 2]]) {
                swap_ids(&heap[at], &heap[(at - 1) / 2]);
                at = (at - 1) / 2;
            }
        } else if (logits[i] > logits[heap[0]]) { /* replace the smallest, sift it down */
            int at = 0;
            heap[0] = i;
            for (;;) {
                int child = 2 * at + 1;
                if (child >= size) break;
                if (child + 1 < size && logits[heap[child + 1]] < logits[heap[child]]) child++;
                if (logits[heap[child]] >= logits[heap[at]]) break;
                swap_ids(&heap[at], &heap[child]);
                at = child;
            }
        }
    }
}

static int sample(Sampler *s, const float *logits, int n) {
    if (s->temperature <= 0.0f) return argmax(logits, n);
    int k = (s->top_k > 0 && s->top_k < n) ? s->top_k : n;
    if (k == n)
        for (int i = 0; i < n; i++) s->candidates[i] = i;
    else
        top_candidates(s, logits, n, k);
    float max = logits[s->candidates[0]];
    for (int i = 1; i < k; i++) max = fmaxf(max, logits[s->candidates[i]]);
    float total = 0.0f;
    for (int i = 0; i < k; i++) total += s->weights[i] = expf((logits[s->candidates[i]] - max) / s->temperature);
    float target = random_uniform(s) * total;
    for (int i = 0; i < k; i++) {
        target -= s->weights[i];
        if (target < 0.0f) return s->candidates[i];
    }
    return s->candidates[k - 1];
}

/* ============================================================================================================
 * Chat loop: the conversation rendered as Tokenizer.render_for_completion does, a reply printed as chat_cli prints
 * it; the KV cache keeps whatever prefix the next prompt shares with what it already holds
 * ============================================================================================================ */

enum { PART_TEXT, PART_PYTHON, PART_OUTPUT };

typedef struct {
    int type;
    char *text;
    size_t len, cap;
} Part;

typedef struct {
    int is_user;
    Part *parts;
    int n_parts;
} Message;

typedef struct {
    Model model;
    State state;
    Tokenizer tok;
    Sampler sampler;
    int *cached;    /* the token at each position the KV cache holds */
    int n_cached;
    int max_steps;  /* --steps */
    int print_ids;  /* --ids */
    long decoded;   /* decode-speed totals, for the report on stderr */
    double decode_seconds;
} Runner;

static void append_ids(int **ids, int *n, int *cap, const int *more, int count) {
    if (*n + count > *cap) {
        *cap = 2 * (*n + count) + 16;
        *ids = realloc(*ids, sizeof(int) * (size_t)*cap);
        if (!*ids) die("out of memory");
    }
    memcpy(*ids + *n, more, sizeof(int) * (size_t)count);
    *n += count;
}

static void append_text_ids(const Tokenizer *t, int **ids, int *n, int *cap, const char *text, size_t len) {
    int *scratch = xmalloc(sizeof(int) * (len + 1));
    int count = encode(t, text, len, scratch);
    append_ids(ids, n, cap, scratch, count);
    free(scratch);
}

/* <|bos|>, then per message user: <|user_start|> text <|user_end|>, assistant: <|assistant_start|> parts
 * <|assistant_end|> (text; python: <|python_start|> code <|python_end|>; output: <|output_start|> .. <|output_end|>),
 * then <|assistant_start|> for the reply. Empty parts are left out (chat_cli drops them from its history). */
static int render_for_completion(const Tokenizer *t, const Message *messages, int n_messages, int **ids) {
    int n = 0, cap = 0;
    *ids = NULL;
    append_ids(ids, &n, &cap, &t->bos, 1);
    for (int m = 0; m < n_messages; m++) {
        const Message *msg = &messages[m];
        if (msg->is_user) {
            append_ids(ids, &n, &cap, &t->user_start, 1);
            append_text_ids(t, ids, &n, &cap, msg->parts[0].text, msg->parts[0].len);
            append_ids(ids, &n, &cap, &t->user_end, 1);
            continue;
        }
        append_ids(ids, &n, &cap, &t->assistant_start, 1);
        for (int p = 0; p < msg->n_parts; p++) {
            const Part *part = &msg->parts[p];
            if (!part->len) continue;
            if (part->type == PART_PYTHON) append_ids(ids, &n, &cap, &t->python_start, 1);
            if (part->type == PART_OUTPUT) append_ids(ids, &n, &cap, &t->output_start, 1);
            append_text_ids(t, ids, &n, &cap, part->text, part->len);
            if (part->type == PART_PYTHON) append_ids(ids, &n, &cap, &t->python_end, 1);
            if (part->type == PART_OUTPUT) append_ids(ids, &n, &cap, &t->output_end, 1);
        }
        append_ids(ids, &n, &cap, &t->assistant_end, 1);
    }
    append_ids(ids, &n, &cap, &t->assistant_start, 1);
    return n;
}

static void free_message(Message *msg) {
    for (int p = 0; p < msg->n_parts; p++) free(msg->parts[p].text);
    free(msg->parts);
    memset(msg, 0, sizeof *msg);
}

static Part *new_part(Message *msg, int type) {
    msg->parts = realloc(msg->parts, sizeof(Part) * (size_t)(msg->n_parts + 1));
    if (!msg->parts) die("out of memory");
    Part *part = &msg->parts[msg->n_parts++];
    memset(part, 0, sizeof *part);
    part->type = type;
    part->text = xmalloc(1);
    part->cap = 1;
    return part;
}

/* Runs prompt[0..n) through the model, reusing the cached prefix it shares; returns the last position's logits. */
static float *prefill(Runner *r, const int *prompt, int n) {
    int shared = 0;
    while (shared < r->n_cached && shared < n - 1 && r->cached[shared] == prompt[shared]) shared++;
    float *logits = NULL;
    for (int pos = shared; pos < n; pos++) {
        logits = forward(&r->model, &r->state, prompt[pos], pos, pos == n - 1);
        r->cached[pos] = prompt[pos];
    }
    r->n_cached = n;
    return logits;
}

static void report_speed(const Runner *r) {
    if (r->decoded > 0 && r->decode_seconds > 0)
        fprintf(stderr, "decode: %ld tokens in %.3f s, %.1f tok/s\n", r->decoded, r->decode_seconds,
                (double)r->decoded / r->decode_seconds);
    else
        fprintf(stderr, "decode: %ld tokens, too few to time\n", r->decoded);
}

/* The assistant's reply to `prompt` (ending in <|assistant_start|>), printed as it streams: text as chat_cli prints
 * it, or ids with --ids. Ends at <|assistant_end|> or <|bos|>, after --steps tokens, when the context is full, or
 * after a python tool call, which this runner does not execute. The reply's parts go into `reply`. */
static void generate_reply(Runner *r, const int *prompt, int n_prompt, Message *reply) {
    const Tokenizer *t = &r->tok;
    float *logits = prefill(r, prompt, n_prompt);
    TextStream text;
    new_text_stream(&text, t, r->print_ids ? NULL : stdout);
    Part *part = new_part(reply, PART_TEXT);
    text.copy = &part->text, text.copy_len = &part->len, text.copy_cap = &part->cap;
    int pos = n_prompt, in_python = 0, called_tool = 0;
    double start = now_seconds();
    long forwards = 0;
    for (int step = 0; step < r->max_steps; step++) {
        int token = sample(&r->sampler, logits, r->model.c.vocab_size);
        if (r->print_ids) printf("%s%d", step ? " " : "", token);
        if (token == t->assistant_end || token == t->bos) break;
        int type = token == t->python_start ? PART_PYTHON : token == t->output_start ? PART_OUTPUT : PART_TEXT;
        if (token == t->python_start || token == t->python_end || token == t->output_start || token == t->output_end) {
            if (!r->print_ids) fputs(type == PART_PYTHON ? "\n[python] " : type == PART_OUTPUT ? " -> " : "\n", stdout);
            part = new_part(reply, type);
            text.copy = &part->text, text.copy_len = &part->len, text.copy_cap = &part->cap;
            if (token == t->python_start) in_python = 1;
            if (token == t->python_end && in_python) called_tool = 1;
        } else {
            feed_token(&text, t, token);
        }
        fflush(stdout);
        if (called_tool || pos >= r->state.context || step + 1 == r->max_steps) break;
        logits = forward(&r->model, &r->state, token, pos, 1);
        r->cached[pos++] = token;
        r->n_cached = pos;
        forwards++;
    }
    flush_text(&text);
    fputs("\n", stdout);
    fflush(stdout);
    r->decoded += forwards;
    r->decode_seconds += now_seconds() - start;
    free(text.buffer);
    if (called_tool)
        fprintf(stderr, "(the python tool call above was not run: the C runner does not execute code; "
                        "python -m scripts.chat_cli runs it in a sandbox)\n");
}

static int too_long(const Runner *r, int n_prompt) {
    if (n_prompt < r->state.context) return 0;
    printf("(the conversation has %d tokens; the context holds %d (--context); type /clear to start a new one)\n",
           n_prompt, r->state.context);
    return 1;
}

static int answer_prompt(Runner *r, const char *prompt) {
    Message messages[2] = {{1, NULL, 0}, {0, NULL, 0}};
    Part *part = new_part(&messages[0], PART_TEXT);
    free(part->text);
    part->text = strdup(prompt);
    part->len = strlen(prompt);
    int *ids;
    int n = render_for_completion(&r->tok, messages, 1, &ids);
    if (n >= r->state.context)
        die("the prompt has %d tokens; the context holds %d (raise --context, up to %d)", n, r->state.context,
            r->model.c.rotary_len);
    generate_reply(r, ids, n, &messages[1]);
    free(ids);
    free_message(&messages[0]);
    free_message(&messages[1]);
    report_speed(r);
    return 0;
}

/* str.strip() for the ASCII whitespace Python strips: space, \t \n \v \f \r and the separators \x1c..\x1f. */
static int is_strippable(char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

static char *strip(char *line) {
    while (is_strippable(*line)) line++;
    size_t n = strlen(line);
    while (n && is_strippable(line[n - 1])) line[--n] = '\0';
    return line;
}

static int chat(Runner *r) {
    const Config *c = &r->model.c;
    printf("nanochat (depth %d, width %d, vocab %d, %s weights) - /clear to start over, /exit to quit\n",
           c->n_layer, c->n_embd, c->vocab_size, c->group_size ? "int8" : "fp32");
    Message *messages = NULL;
    int n_messages = 0;
    char *line = NULL;
    size_t line_cap = 0;
    for (;;) {
        printf("\nYou: ");
        fflush(stdout);
        if (getline(&line, &line_cap, stdin) < 0) {
            printf("\n");
            break;
        }
        char *text = strip(line);
        if (!strcmp(text, "/exit") || !strcmp(text, "/quit")) break;
        if (!strcmp(text, "/clear")) {
            for (int m = 0; m < n_messages; m++) free_message(&messages[m]);
            n_messages = 0;
            printf("(conversation cleared)\n");
            continue;
        }
        if (!*text) continue;
        messages = realloc(messages, sizeof(Message) * (size_t)(n_messages + 2));
        if (!messages) die("out of memory");
        Message *user = &messages[n_messages++];
        memset(user, 0, sizeof *user);
        user->is_user = 1;
        Part *part = new_part(user, PART_TEXT);
        free(part->text);
        part->text = strdup(text);
        part->len = strlen(text);
        int *ids;
        int n = render_for_completion(&r->tok, messages, n_messages, &ids);
        if (too_long(r, n)) {
            free_message(&messages[--n_messages]);
            free(ids);
            continue;
        }
        printf("nanochat: ");
        Message *reply = &messages[n_messages++];
        memset(reply, 0, sizeof *reply);
        generate_reply(r, ids, n, reply);
        free(ids);
    }
    for (int m = 0; m < n_messages; m++) free_message(&messages[m]);
    free(messages);
    free(line);
    report_speed(r);
    return 0;
}

/* ============================================================================================================
 * CLI, and the raw modes the tests and the benchmark use: --raw-ids, --logits, --loss, --encode, --decode
 * ============================================================================================================ */

static const char USAGE[] =
    "usage: runc/run DIR [mode] [options]       DIR: model.bin + tokenizer.bin from python -m scripts.export\n"
    "modes (default --chat):\n"
    "  --chat                 interactive chat (/clear starts over, /exit quits)\n"
    "  --prompt TEXT          one assistant reply to TEXT\n"
    "  --raw-ids \"IDS\"        continue these token ids (no chat format, no stop tokens); with --logits print the\n"
    "                         last position's logits instead, with --loss the mean next-token loss over the ids\n"
    "  --encode TEXT          print TEXT's token ids;  --decode \"IDS\": print the text of the ids\n"
    "options:\n"
    "  --steps N              most new tokens (default 512)\n"
    "  --temperature T        0 = greedy (default 0.6)\n"
    "  --top-k K              sample among the K likeliest tokens, 0 = all (default 50)\n"
    "  --seed S               random seed (default: from the clock)\n"
    "  --ids                  print token ids instead of text\n"
    "  --context N            KV cache positions (default the model's sequence_len, at most its rotary_len)\n"
    "  --threads N            OpenMP threads (builds with `make -C runc fast`)\n";

static long parse_long(const char *flag, const char *value, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(value, &end, 10);
    if (errno || end == value || *end || v < lo || v > hi)
        die("%s takes an integer in [%ld, %ld], got '%s'", flag, lo, hi, value);
    return v;
}

/* "1 2 3" or "1,2,3" -> ids, each checked against the vocabulary. */
static int parse_ids(const char *text, int vocab_size, int **ids) {
    int n = 0, cap = 0;
    *ids = NULL;
    const char *p = text;
    for (;;) {
        while (*p == ' ' || *p == ',' || *p == '\n' || *p == '\t') p++;
        if (!*p) break;
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v >= vocab_size)
            die("token ids must be integers in [0, %d), got '%.20s'", vocab_size, p);
        int id = (int)v;
        append_ids(ids, &n, &cap, &id, 1);
        p = end;
    }
    if (!n) die("no token ids given");
    return n;
}

static int run_raw(Runner *r, const int *ids, int n, int logits_only, int loss) {
    if (n > r->state.context) die("%d ids do not fit the context of %d (--context)", n, r->state.context);
    if (loss) {
        double total = 0.0;
        for (int pos = 0; pos + 1 < n; pos++) {
            float *logits = forward(&r->model, &r->state, ids[pos], pos, 1);
            double max = logits[argmax(logits, r->model.c.vocab_size)], sum = 0.0;
            for (int i = 0; i < r->model.c.vocab_size; i++) sum += exp((double)logits[i] - max);
            total += log(sum) + max - logits[ids[pos + 1]];
        }
        printf("loss %.9f over %d tokens\n", n > 1 ? total / (n - 1) : 0.0, n - 1);
        return 0;
    }
    float *logits = prefill(r, ids, n);
    if (logits_only) {
        for (int i = 0; i < r->model.c.vocab_size; i++) printf("%.9g\n", logits[i]);
        return 0;
    }
    TextStream text;
    new_text_stream(&text, &r->tok, stdout);
    double start = now_seconds();
    int pos = n;
    long forwards = 0;
    for (int step = 0; step < r->max_steps; step++) {
        int token = sample(&r->sampler, logits, r->model.c.vocab_size);
        if (r->print_ids) printf("%s%d", step ? " " : "", token);
        else feed_token(&text, &r->tok, token);
        if (pos >= r->state.context || step + 1 == r->max_steps) break;
        logits = forward(&r->model, &r->state, token, pos++, 1);
        forwards++;
    }
    if (!r->print_ids) flush_text(&text);
    printf("\n");
    r->decoded = forwards;
    r->decode_seconds = now_seconds() - start;
    report_speed(r);
    return 0;
}

static void check_pair(const Model *m, const Tokenizer *t, const char *model_path, const char *tokenizer_path) {
    if (memcmp(m->c.tokenizer_fingerprint, t->fingerprint, 16) != 0 || m->c.tokenizer_vocab != t->vocab_size)
        die("%s (tokenizer %s, %u tokens) is not the tokenizer %s was exported with (%s, %u tokens): export the "
            "two together with python -m scripts.export --format c", tokenizer_path, t->fingerprint, t->vocab_size,
            model_path, m->c.tokenizer_fingerprint, m->c.tokenizer_vocab);
}

int main(int argc, char **argv) {
    uint16_t one = 1;
    if (*(uint8_t *)&one != 1) die("this runner reads the little-endian weights of model.bin on little-endian hosts");
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(USAGE, argc < 2 ? stderr : stdout);
        return argc < 2 ? 1 : 0;
    }
    const char *dir = argv[1], *prompt = NULL, *raw_ids = NULL, *encode_text = NULL, *decode_ids = NULL;
    int chat_mode = 0, logits_only = 0, loss = 0, modes = 0;
    long steps = 512, top_k = 50, context = 0, threads = 0;
    float temperature = 0.6f;
    uint64_t seed = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    Runner r;
    memset(&r, 0, sizeof r);
    for (int i = 2; i < argc; i++) {
        const char *flag = argv[i];
        int has_value = i + 1 < argc;
        const char *value = has_value ? argv[i + 1] : NULL;
#define NEEDS_VALUE \
    if (!has_value) die("%s needs a value (see runc/run --help)", flag); \
    i++
        if (!strcmp(flag, "--chat")) chat_mode = 1, modes++;
        else if (!strcmp(flag, "--ids")) r.print_ids = 1;
        else if (!strcmp(flag, "--logits")) logits_only = 1;
        else if (!strcmp(flag, "--loss")) loss = 1;
        else if (!strcmp(flag, "--prompt")) { NEEDS_VALUE; prompt = value, modes++; }
        else if (!strcmp(flag, "--raw-ids")) { NEEDS_VALUE; raw_ids = value, modes++; }
        else if (!strcmp(flag, "--encode")) { NEEDS_VALUE; encode_text = value, modes++; }
        else if (!strcmp(flag, "--decode")) { NEEDS_VALUE; decode_ids = value, modes++; }
        else if (!strcmp(flag, "--steps")) { NEEDS_VALUE; steps = parse_long(flag, value, 1, 1L << 30); }
        else if (!strcmp(flag, "--top-k")) { NEEDS_VALUE; top_k = parse_long(flag, value, 0, 1L << 30); }
        else if (!strcmp(flag, "--context")) { NEEDS_VALUE; context = parse_long(flag, value, 1, 1L << 30); }
        else if (!strcmp(flag, "--threads")) { NEEDS_VALUE; threads = parse_long(flag, value, 1, 4096); }
        else if (!strcmp(flag, "--seed")) { NEEDS_VALUE; seed = (uint64_t)parse_long(flag, value, 0, LONG_MAX); }
        else if (!strcmp(flag, "--temperature")) {
            NEEDS_VALUE;
            char *end;
            temperature = strtof(value, &end);
            if (end == value || *end || !(temperature >= 0.0f && temperature <= 100.0f))
                die("--temperature takes a number >= 0, got '%s'", value);
        } else die("unknown flag %s (see runc/run --help)", flag);
#undef NEEDS_VALUE
    }
    if (modes > 1) die("give one of --chat, --prompt, --raw-ids, --encode, --decode");
    if ((logits_only || loss) && !raw_ids) die("--logits and --loss go with --raw-ids");
    if (prompt && !prompt[strspn(prompt, " \t\r\n")]) die("--prompt needs a non-empty prompt");
    if (threads) {
#ifdef _OPENMP
        omp_set_num_threads((int)threads);
#else
        fprintf(stderr, "warning: --threads ignored: this build has no OpenMP (make -C runc fast)\n");
#endif
    }

    char model_path[4096], tokenizer_path[4096];
    snprintf(model_path, sizeof model_path, "%s/model.bin", dir);
    snprintf(tokenizer_path, sizeof tokenizer_path, "%s/tokenizer.bin", dir);
    load_model(&r.model, model_path);
    load_tokenizer(&r.tok, tokenizer_path);
    check_pair(&r.model, &r.tok, model_path, tokenizer_path);
    const Config *c = &r.model.c;

    if (encode_text) {
        size_t n = strlen(encode_text);
        int *ids = xmalloc(sizeof(int) * (n + 1));
        int count = encode(&r.tok, encode_text, n, ids);
        for (int i = 0; i < count; i++) printf("%s%d", i ? " " : "", ids[i]);
        printf("\n");
        return 0;
    }
    if (decode_ids) {
        int *ids;
        int n = parse_ids(decode_ids, (int)r.tok.vocab_size, &ids);
        TextStream text;
        new_text_stream(&text, &r.tok, stdout);
        for (int i = 0; i < n; i++) feed_token(&text, &r.tok, ids[i]);
        flush_text(&text);
        return 0;
    }

    if (context > c->rotary_len)
        die("--context %ld exceeds the model's rotary table (%d positions)", context, c->rotary_len);
    new_state(&r.state, c, context ? (int)context : c->seq_len);
    r.cached = xmalloc(sizeof(int) * (size_t)r.state.context);
    r.max_steps = (int)steps;
    r.sampler = (Sampler){temperature, (int)top_k, (seed ^ 0x9E3779B97F4A7C15ull) | 1,
                          xmalloc(sizeof(int) * (size_t)c->vocab_size), xmalloc(sizeof(float) * (size_t)c->vocab_size)};
    int *ids = NULL, n = raw_ids ? parse_ids(raw_ids, c->vocab_size, &ids) : 0, status = 0;
    (void)chat_mode; /* the default */
    /* One parallel region for the whole run: this thread drives it, the others wait for the matmuls' tasks. */
#pragma omp parallel
#pragma omp single
    status = raw_ids ? run_raw(&r, ids, n, logits_only, loss) : prompt ? answer_prompt(&r, prompt) : chat(&r);
    return status;
}
