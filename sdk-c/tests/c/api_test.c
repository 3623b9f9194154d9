/* The liboutpost C API, exercised from C: install with callbacks, inference compared
 * with onnxruntime's outputs, labels, consent, status, concurrent inference, and bad
 * input (NULL pointers, wrong sizes, dtypes, shapes, names, freed handles).
 *
 * Usage: api_test FIXTURES_DIR DATA_DIR BIN_DIR COUNT fresh|preinstalled
 *   BIN_DIR holds raw little-endian files written by the Rust harness (sdk-c/tests/c_api.rs):
 *   flat.bin (COUNT x 64 f32), image.bin (COUNT x 64 f32), mlp_ref.bin and cnn_ref.bin
 *   (COUNT x 10 f32, onnxruntime outputs), labels.bin (COUNT i64).
 *   "preinstalled": DATA_DIR already holds both models (installs are no-ops).
 * Exit status 0 when every check passed. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outpost.h"

static int failures = 0;

#define CHECK(cond)                                                            \
    do {                                                                       \
        if (!(cond)) {                                                         \
            char msg_[512];                                                    \
            outpost_last_error(msg_, sizeof msg_, NULL);                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n",     \
                    __FILE__, __LINE__, #cond, msg_);                          \
            failures++;                                                        \
        }                                                                      \
    } while (0)

#define CHECK_STATUS(call, want)                                               \
    do {                                                                       \
        outpost_status got_ = (call);                                          \
        if (got_ != (want)) {                                                  \
            char msg_[512];                                                    \
            outpost_last_error(msg_, sizeof msg_, NULL);                       \
            fprintf(stderr, "%s:%d: %s returned %s, want %s (last error: %s)\n", \
                    __FILE__, __LINE__, #call, outpost_status_name(got_),      \
                    outpost_status_name(want), msg_);                          \
            failures++;                                                        \
        }                                                                      \
    } while (0)

#define MLP "digits-mlp"
#define CNN "digits-cnn-a"
#define CLASSES 10
#define PIXELS 64

static const char *fixtures, *data_dir, *bin_dir;
static size_t count;
static float *flat, *image, *mlp_ref, *cnn_ref;
static int64_t *labels;

static void *read_file(const char *dir, const char *name, size_t want_bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        exit(2);
    }
    void *buf = malloc(want_bytes);
    if (!buf || fread(buf, 1, want_bytes, f) != want_bytes) {
        fprintf(stderr, "cannot read %zu bytes from %s\n", want_bytes, path);
        exit(2);
    }
    fclose(f);
    return buf;
}

static void path_of(char *out, size_t len, const char *name) {
    snprintf(out, len, "%s/%s", fixtures, name);
}

static size_t argmax(const float *v, size_t n) {
    size_t best = 0;
    for (size_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Within the release's golden tolerance (abs 1e-3 + rel 1e-3) and the same top-1. */
static int close_to_ref(const float *got, const float *want) {
    for (size_t i = 0; i < CLASSES; i++)
        if (fabsf(got[i] - want[i]) > 1e-3f + 1e-3f * fabsf(want[i])) return 0;
    return argmax(got, CLASSES) == argmax(want, CLASSES);
}

/* ---- callbacks ---------------------------------------------------------- */

#define MAX_EVENTS 64
struct recorder {
    outpost_update_state states[MAX_EVENTS];
    outpost_status statuses[MAX_EVENTS];
    size_t n_states;
    uint64_t last_done, last_total;
    size_t n_progress;
    int bad_model_name;
    const char *expect_model;
};

static void on_state(void *user, const char *model, outpost_update_state state,
                     outpost_status status) {
    struct recorder *r = user;
    if (!model || strcmp(model, r->expect_model) != 0) r->bad_model_name = 1;
    if (r->n_states < MAX_EVENTS) {
        r->states[r->n_states] = state;
        r->statuses[r->n_states] = status;
        r->n_states++;
    }
}

static void on_progress(void *user, const char *model, uint64_t done, uint64_t total) {
    struct recorder *r = user;
    if (!model || strcmp(model, r->expect_model) != 0) r->bad_model_name = 1;
    if (done > total || done < r->last_done) r->bad_model_name = 1;
    r->last_done = done;
    r->last_total = total;
    r->n_progress++;
}

static void reset(struct recorder *r, const char *model) {
    memset(r, 0, sizeof *r);
    r->expect_model = model;
}

static long file_size(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fclose(f);
    return n;
}

static void install_with_callbacks(outpost_agent *agent, const char *model, const char *onnx,
                                   const char *release, int fresh) {
    struct recorder rec;
    char mpath[4096], rpath[4096];
    path_of(mpath, sizeof mpath, onnx);
    path_of(rpath, sizeof rpath, release);
    reset(&rec, model);
    CHECK_STATUS(outpost_agent_set_callbacks(agent, on_state, on_progress, &rec), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_install_file(agent, mpath, rpath), OUTPOST_OK);
    CHECK(!rec.bad_model_name);
    CHECK(rec.n_progress >= 2);
    CHECK(rec.last_done == (uint64_t)file_size(mpath));
    CHECK(rec.last_total == (uint64_t)file_size(mpath));
    /* DOWNLOADING, VERIFYING, [INSTALLING when the gate ran], COMMITTED */
    CHECK(rec.n_states == (size_t)(fresh ? 4 : 3));
    CHECK(rec.states[0] == OUTPOST_UPDATE_DOWNLOADING);
    CHECK(rec.states[1] == OUTPOST_UPDATE_VERIFYING);
    if (fresh) CHECK(rec.states[2] == OUTPOST_UPDATE_INSTALLING);
    CHECK(rec.n_states > 0 && rec.states[rec.n_states - 1] == OUTPOST_UPDATE_COMMITTED);
    for (size_t i = 0; i < rec.n_states; i++) CHECK(rec.statuses[i] == OUTPOST_OK);
    CHECK_STATUS(outpost_agent_set_callbacks(agent, NULL, NULL, NULL), OUTPOST_OK);
}

/* ---- inference helpers -------------------------------------------------- */

static outpost_status infer_mlp(outpost_agent *agent, const float *x, float *out,
                                uint64_t *id) {
    size_t shape[2] = {1, PIXELS};
    outpost_tensor in = {"x", OUTPOST_DTYPE_F32, shape, 2, x, PIXELS * sizeof(float)};
    outpost_output o;
    memset(&o, 0, sizeof o);
    o.data = out;
    o.capacity = CLASSES * sizeof(float);
    outpost_status s = outpost_agent_infer(agent, MLP, &in, 1, &o, 1, id);
    if (s == OUTPOST_OK) {
        CHECK(o.byte_len == CLASSES * sizeof(float));
        CHECK(o.dtype == OUTPOST_DTYPE_F32);
        CHECK(o.rank == 2 && o.shape[0] == 1 && o.shape[1] == CLASSES);
    }
    return s;
}

static void test_inference(outpost_agent *agent) {
    size_t mlp_ok = 0, cnn_ok = 0, class_ok = 0;
    uint64_t first_id = 0;
    for (size_t i = 0; i < count; i++) {
        float out[CLASSES];
        uint64_t id = 0;
        CHECK_STATUS(infer_mlp(agent, flat + i * PIXELS, out, &id), OUTPOST_OK);
        if (close_to_ref(out, mlp_ref + i * CLASSES)) mlp_ok++;
        if (i == 0) first_id = id;
        else CHECK(id != first_id);

        size_t shape[4] = {1, 1, 8, 8};
        outpost_tensor in = {"x", OUTPOST_DTYPE_F32, shape, 4, image + i * PIXELS,
                             PIXELS * sizeof(float)};
        outpost_result *res = NULL;
        CHECK_STATUS(outpost_agent_infer_owned(agent, CNN, &in, 1, &res), OUTPOST_OK);
        if (!res) continue;
        size_t n = 0;
        CHECK_STATUS(outpost_result_output_count(res, &n), OUTPOST_OK);
        CHECK(n == 1);
        outpost_tensor_view view;
        CHECK_STATUS(outpost_result_output(res, 0, &view), OUTPOST_OK);
        CHECK(strcmp(view.name, "logits") == 0);
        CHECK(view.dtype == OUTPOST_DTYPE_F32 && view.rank == 2 && view.shape[1] == CLASSES);
        CHECK(view.byte_len == CLASSES * sizeof(float));
        float logits[CLASSES];
        memcpy(logits, view.data, sizeof logits);
        if (close_to_ref(logits, cnn_ref + i * CLASSES)) cnn_ok++;
        uint32_t cls = 99;
        float p = -1.0f;
        CHECK_STATUS(outpost_result_class(res, &cls, &p), OUTPOST_OK);
        if (cls == argmax(logits, CLASSES) && p > 0.0f && p <= 1.0f) class_ok++;
        uint64_t rid = 0;
        CHECK_STATUS(outpost_result_prediction_id(res, &rid), OUTPOST_OK);
        CHECK(rid != 0);
        CHECK_STATUS(outpost_result_output(res, 1, &view), OUTPOST_ERR_INVALID_ARGUMENT);
        CHECK_STATUS(outpost_result_free(res), OUTPOST_OK);
        /* a freed result is detected, not read */
        CHECK_STATUS(outpost_result_free(res), OUTPOST_ERR_INVALID_HANDLE);
        CHECK_STATUS(outpost_result_output_count(res, &n), OUTPOST_ERR_INVALID_HANDLE);
    }
    CHECK(mlp_ok == count);
    CHECK(cnn_ok == count);
    CHECK(class_ok == count);
    CHECK_STATUS(outpost_result_free(NULL), OUTPOST_OK);
}

static void test_io_specs(outpost_agent *agent) {
    size_t ni = 0, no = 0;
    CHECK_STATUS(outpost_agent_model_io_count(agent, CNN, &ni, &no), OUTPOST_OK);
    CHECK(ni == 1 && no == 1);
    char name[32];
    size_t name_len = 0;
    outpost_tensor_spec spec;
    CHECK_STATUS(outpost_agent_model_input(agent, CNN, 0, name, sizeof name, &name_len, &spec),
                 OUTPOST_OK);
    CHECK(strcmp(name, "x") == 0 && name_len == 1);
    CHECK(spec.dtype == OUTPOST_DTYPE_F32 && spec.rank == 4);
    CHECK(spec.shape[0] == 1 && spec.shape[1] == 1 && spec.shape[2] == 8 && spec.shape[3] == 8);
    CHECK_STATUS(outpost_agent_model_output(agent, MLP, 0, name, sizeof name, NULL, &spec),
                 OUTPOST_OK);
    CHECK(strcmp(name, "logits") == 0 && spec.rank == 2 && spec.shape[1] == CLASSES);
    /* name buffer too small: truncated, NUL-terminated, needed length reported */
    char tiny[3] = {'a', 'b', 'c'};
    CHECK_STATUS(outpost_agent_model_output(agent, MLP, 0, tiny, sizeof tiny, &name_len, &spec),
                 OUTPOST_ERR_BUFFER_TOO_SMALL);
    CHECK(name_len == 6 && strcmp(tiny, "lo") == 0);
    CHECK_STATUS(outpost_agent_model_input(agent, MLP, 1, name, sizeof name, NULL, &spec),
                 OUTPOST_ERR_INVALID_ARGUMENT);
    CHECK_STATUS(outpost_agent_model_input(agent, "nope", 0, name, sizeof name, NULL, &spec),
                 OUTPOST_ERR_UNKNOWN_MODEL);
    CHECK_STATUS(outpost_agent_model_input(agent, MLP, 0, name, sizeof name, NULL, NULL),
                 OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_model_io_count(agent, MLP, NULL, &no), OUTPOST_ERR_NULL_POINTER);
}

static void test_labels(outpost_agent *agent) {
    float out[CLASSES];
    uint64_t id = 0;
    size_t joined_before = 0;
    outpost_model_status st;
    CHECK_STATUS(outpost_agent_model_status(agent, MLP, &st), OUTPOST_OK);
    joined_before = (size_t)st.labels_joined;
    size_t right = 0;
    for (size_t i = 0; i < 5; i++) {
        CHECK_STATUS(infer_mlp(agent, flat + i * PIXELS, out, &id), OUTPOST_OK);
        bool correct = false;
        CHECK_STATUS(outpost_agent_report_label(agent, id, (uint32_t)labels[i], &correct),
                     OUTPOST_OK);
        CHECK(correct == (argmax(out, CLASSES) == (size_t)labels[i]));
        right += correct;
        /* a second label for the same prediction does not join */
        CHECK_STATUS(outpost_agent_report_label(agent, id, 0, NULL),
                     OUTPOST_ERR_UNKNOWN_PREDICTION);
    }
    CHECK(right >= 4);
    CHECK_STATUS(outpost_agent_report_label(agent, 0x1234, 1, NULL),
                 OUTPOST_ERR_UNKNOWN_PREDICTION);
    CHECK_STATUS(outpost_agent_model_status(agent, MLP, &st), OUTPOST_OK);
    CHECK(st.labels_joined == joined_before + 5);
    CHECK(st.labels_unknown >= 5);
}

static void test_consent(outpost_agent *agent) {
    bool on = true;
    CHECK_STATUS(outpost_agent_consent(agent, &on), OUTPOST_OK);
    CHECK(!on);
    CHECK_STATUS(outpost_agent_set_consent(agent, true), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_consent(agent, &on), OUTPOST_OK);
    CHECK(on);
    CHECK_STATUS(outpost_agent_set_consent(agent, false), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_consent(agent, &on), OUTPOST_OK);
    CHECK(!on);
    CHECK_STATUS(outpost_agent_consent(agent, NULL), OUTPOST_ERR_NULL_POINTER);
}

static void test_status(outpost_agent *agent) {
    size_t n = 0;
    CHECK_STATUS(outpost_agent_model_count(agent, &n), OUTPOST_OK);
    CHECK(n == 2);
    char name[64];
    CHECK_STATUS(outpost_agent_model_name(agent, 0, name, sizeof name, NULL), OUTPOST_OK);
    CHECK(strcmp(name, CNN) == 0);
    CHECK_STATUS(outpost_agent_model_name(agent, 1, name, sizeof name, NULL), OUTPOST_OK);
    CHECK(strcmp(name, MLP) == 0);
    CHECK_STATUS(outpost_agent_model_name(agent, 2, name, sizeof name, NULL),
                 OUTPOST_ERR_INVALID_ARGUMENT);

    outpost_model_status st;
    CHECK_STATUS(outpost_agent_model_status(agent, MLP, &st), OUTPOST_OK);
    CHECK(st.loaded);
    CHECK(st.active_sequence == 1 && st.previous_sequence == 0);
    CHECK(st.inferences >= count);
    CHECK_STATUS(outpost_agent_model_status(agent, "nope", &st), OUTPOST_ERR_UNKNOWN_MODEL);

    char version[16];
    size_t vlen = 0;
    CHECK_STATUS(outpost_agent_model_version(agent, MLP, version, sizeof version, &vlen),
                 OUTPOST_OK);
    CHECK(strcmp(version, "1.0.0") == 0 && vlen == 5);

    size_t need = 0;
    CHECK_STATUS(outpost_agent_status_json(agent, NULL, 0, &need), OUTPOST_ERR_BUFFER_TOO_SMALL);
    CHECK(need > 0);
    char *json = malloc(need + 1);
    CHECK_STATUS(outpost_agent_status_json(agent, json, need + 1, NULL), OUTPOST_OK);
    CHECK(strlen(json) == need);
    CHECK(strstr(json, "\"model\":\"digits-mlp\"") != NULL);
    CHECK(strstr(json, "\"update_state\"") != NULL);
    free(json);
    CHECK_STATUS(outpost_agent_status_json(agent, NULL, 10, &need), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_tick(agent), OUTPOST_OK);
}

/* A release whose model file is another model's: the gate refuses it; the old one serves. */
static void test_failed_install(outpost_agent *agent) {
    struct recorder rec;
    char mpath[4096], rpath[4096];
    path_of(mpath, sizeof mpath, "cnn_a.onnx");
    path_of(rpath, sizeof rpath, "mlp_ft.release.json");
    reset(&rec, MLP);
    CHECK_STATUS(outpost_agent_set_callbacks(agent, on_state, NULL, &rec), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_install_file(agent, mpath, rpath), OUTPOST_ERR_GATE_REJECTED);
    CHECK(rec.n_states >= 2);
    CHECK(rec.n_states > 0 && rec.states[rec.n_states - 1] == OUTPOST_UPDATE_FAILED);
    CHECK(rec.n_states > 0 && rec.statuses[rec.n_states - 1] == OUTPOST_ERR_GATE_REJECTED);

    outpost_model_status st;
    CHECK_STATUS(outpost_agent_model_status(agent, MLP, &st), OUTPOST_OK);
    CHECK(st.update_state == OUTPOST_UPDATE_FAILED);
    CHECK(st.update_status == OUTPOST_ERR_GATE_REJECTED);
    CHECK(st.active_sequence == 1 && st.loaded);
    char msg[1024];
    size_t len = 0;
    CHECK_STATUS(outpost_agent_model_last_error(agent, MLP, msg, sizeof msg, &len), OUTPOST_OK);
    CHECK(len > 0 && strstr(msg, "validation gate") != NULL);
    float out[CLASSES];
    uint64_t id;
    CHECK_STATUS(infer_mlp(agent, flat, out, &id), OUTPOST_OK);
    CHECK(close_to_ref(out, mlp_ref));

    /* a stale release (sequence not above the active one) */
    path_of(mpath, sizeof mpath, "mlp_ft.onnx");
    path_of(rpath, sizeof rpath, "mlp.release.json");
    CHECK_STATUS(outpost_agent_install_file(agent, mpath, rpath), OUTPOST_ERR_STALE_RELEASE);
    /* missing files, malformed release */
    CHECK_STATUS(outpost_agent_install_file(agent, "/nonexistent.onnx", rpath), OUTPOST_ERR_IO);
    CHECK_STATUS(outpost_agent_install_file(agent, mpath, mpath), OUTPOST_ERR_INVALID_RELEASE);
    const char junk[] = "{\"schema\":1}";
    CHECK_STATUS(outpost_agent_install(agent, (const uint8_t *)junk, 4, (const uint8_t *)junk,
                                       sizeof junk - 1),
                 OUTPOST_ERR_INVALID_RELEASE);
    CHECK_STATUS(outpost_agent_install(agent, NULL, 4, (const uint8_t *)junk, sizeof junk - 1),
                 OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_install_file(agent, NULL, rpath), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_revert(agent, MLP), OUTPOST_ERR_NOT_FOUND);
    CHECK_STATUS(outpost_agent_revert(agent, "nope"), OUTPOST_ERR_UNKNOWN_MODEL);
    CHECK_STATUS(outpost_agent_set_callbacks(agent, NULL, NULL, NULL), OUTPOST_OK);
}

static void test_bad_input(outpost_agent *agent) {
    float x[PIXELS] = {0};
    float out[CLASSES];
    uint64_t id = 0;
    size_t shape[2] = {1, PIXELS};
    outpost_tensor in = {"x", OUTPOST_DTYPE_F32, shape, 2, x, sizeof x};
    outpost_output o;
    memset(&o, 0, sizeof o);
    o.data = out;
    o.capacity = sizeof out;

    CHECK_STATUS(outpost_agent_infer(NULL, MLP, &in, 1, &o, 1, &id), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_infer(agent, NULL, &in, 1, &o, 1, &id), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_infer(agent, MLP, NULL, 1, &o, 1, &id), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &in, 1, NULL, 1, &id), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &in, 1, &o, 1, NULL), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_infer(agent, "no-such-model", &in, 1, &o, 1, &id),
                 OUTPOST_ERR_UNKNOWN_MODEL);
    char msg[256];
    CHECK_STATUS(outpost_last_error(msg, sizeof msg, NULL), OUTPOST_OK);
    CHECK(strstr(msg, "no-such-model") != NULL);
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &in, 0, &o, 1, &id), OUTPOST_ERR_MISSING_INPUT);

    outpost_tensor bad = in;
    bad.byte_len = sizeof x - 1;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id), OUTPOST_ERR_WRONG_LENGTH);
    bad = in;
    bad.dtype = OUTPOST_DTYPE_I32; /* same byte length, wrong type */
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id), OUTPOST_ERR_WRONG_DTYPE);
    bad = in;
    bad.dtype = 99;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id),
                 OUTPOST_ERR_INVALID_ARGUMENT);
    size_t wrong_shape[2] = {PIXELS, 1};
    bad = in;
    bad.shape = wrong_shape;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id), OUTPOST_ERR_WRONG_SHAPE);
    size_t big_rank[9] = {1, 1, 1, 1, 1, 1, 1, 1, PIXELS};
    bad = in;
    bad.shape = big_rank;
    bad.rank = 9;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id),
                 OUTPOST_ERR_INVALID_ARGUMENT);
    bad = in;
    bad.shape = NULL;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id), OUTPOST_ERR_NULL_POINTER);
    bad = in;
    bad.data = NULL;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id), OUTPOST_ERR_NULL_POINTER);
    bad = in;
    bad.name = NULL;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id), OUTPOST_ERR_NULL_POINTER);
    bad = in;
    bad.name = "y";
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id), OUTPOST_ERR_UNKNOWN_INPUT);
    outpost_tensor twice[2] = {in, in};
    CHECK_STATUS(outpost_agent_infer(agent, MLP, twice, 2, &o, 1, &id),
                 OUTPOST_ERR_INVALID_ARGUMENT);
    bad = in;
    bad.name = "\xff\xfe";
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &bad, 1, &o, 1, &id),
                 OUTPOST_ERR_INVALID_ARGUMENT);

    /* output buffer too small: sizes reported, the inference ran */
    outpost_output small = o;
    small.capacity = sizeof out - 1;
    id = 0;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &in, 1, &small, 1, &id),
                 OUTPOST_ERR_BUFFER_TOO_SMALL);
    CHECK(small.byte_len == sizeof out && small.rank == 2 && id != 0);
    outpost_output nodata = o;
    nodata.data = NULL;
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &in, 1, &nodata, 1, &id),
                 OUTPOST_ERR_NULL_POINTER);
    outpost_output two[2];
    memset(two, 0, sizeof two);
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &in, 1, two, 2, &id),
                 OUTPOST_ERR_INVALID_ARGUMENT);
    /* no outputs wanted: fine */
    CHECK_STATUS(outpost_agent_infer(agent, MLP, &in, 1, NULL, 0, &id), OUTPOST_OK);

    outpost_result *res = (outpost_result *)&res;
    CHECK_STATUS(outpost_agent_infer_owned(agent, "nope", &in, 1, &res), OUTPOST_ERR_UNKNOWN_MODEL);
    CHECK(res == NULL);
    CHECK_STATUS(outpost_agent_infer_owned(agent, MLP, &in, 1, NULL), OUTPOST_ERR_NULL_POINTER);
    /* a pointer this library never returned */
    CHECK_STATUS(outpost_agent_tick((outpost_agent *)&in), OUTPOST_ERR_INVALID_HANDLE);
    CHECK_STATUS(outpost_result_free((outpost_result *)&in), OUTPOST_ERR_INVALID_HANDLE);
    CHECK_STATUS(outpost_agent_tick(NULL), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_set_consent(NULL, true), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_report_label(NULL, 1, 1, NULL), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_model_status(agent, MLP, NULL), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_model_count(agent, NULL), OUTPOST_ERR_NULL_POINTER);
}

/* ---- several threads inferring on one handle ---------------------------- */

#define THREADS 4
struct worker {
    outpost_agent *agent;
    size_t offset;
    size_t rounds;
    size_t ok;
    uint64_t ids[256];
    size_t n_ids;
};

static void *worker_main(void *arg) {
    struct worker *w = arg;
    for (size_t r = 0; r < w->rounds; r++) {
        size_t i = (w->offset + r) % count;
        float out[CLASSES];
        uint64_t id = 0;
        if (infer_mlp(w->agent, flat + i * PIXELS, out, &id) == OUTPOST_OK &&
            close_to_ref(out, mlp_ref + i * CLASSES)) {
            w->ok++;
            if (w->n_ids < 256) w->ids[w->n_ids++] = id;
        }
    }
    return NULL;
}

static void test_threads(outpost_agent *agent, size_t rounds) {
    pthread_t tids[THREADS];
    struct worker workers[THREADS];
    for (size_t t = 0; t < THREADS; t++) {
        memset(&workers[t], 0, sizeof workers[t]);
        workers[t].agent = agent;
        workers[t].offset = t * 7;
        workers[t].rounds = rounds;
        CHECK(pthread_create(&tids[t], NULL, worker_main, &workers[t]) == 0);
    }
    for (size_t t = 0; t < THREADS; t++) pthread_join(tids[t], NULL);
    for (size_t t = 0; t < THREADS; t++) CHECK(workers[t].ok == rounds);
    /* prediction ids are unique across threads */
    for (size_t a = 0; a < THREADS; a++)
        for (size_t i = 0; i < workers[a].n_ids; i++)
            for (size_t b = a; b < THREADS; b++)
                for (size_t j = (a == b ? i + 1 : 0); j < workers[b].n_ids; j++)
                    CHECK(workers[a].ids[i] != workers[b].ids[j]);
}

static void test_open_errors(void) {
    outpost_agent *a = (outpost_agent *)&a;
    CHECK_STATUS(outpost_agent_new(NULL, NULL, &a), OUTPOST_ERR_NULL_POINTER);
    CHECK(a == NULL);
    CHECK_STATUS(outpost_agent_new(NULL, data_dir, NULL), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_new("device_id = [", data_dir, &a), OUTPOST_ERR_CONFIG);
    CHECK_STATUS(outpost_agent_new("no_such_key = 1", data_dir, &a), OUTPOST_ERR_CONFIG);
    /* a fleet link needs a broker URL with a port, and over TLS a readable CA file */
    CHECK_STATUS(outpost_agent_new("[broker]\nurl = \"mqtts://localhost:8883\"\n"
                                   "ca_file = \"/nonexistent/ca.pem\"\n",
                                   data_dir, &a),
                 OUTPOST_ERR_CONFIG);
    CHECK(a == NULL);
    CHECK_STATUS(outpost_agent_new("[broker]\nurl = \"mqtt://localhost\"\n", data_dir, &a),
                 OUTPOST_ERR_CONFIG);
    CHECK(a == NULL);
    char msg[512];
    size_t len = 0;
    CHECK_STATUS(outpost_last_error(msg, sizeof msg, &len), OUTPOST_OK);
    CHECK(strstr(msg, "broker") != NULL && len == strlen(msg));
    /* too small: truncated and NUL-terminated; the message is not replaced */
    char four[4];
    CHECK_STATUS(outpost_last_error(four, sizeof four, &len), OUTPOST_ERR_BUFFER_TOO_SMALL);
    CHECK(strlen(four) == 3 && len == strlen(msg));
    CHECK_STATUS(outpost_last_error(NULL, 0, &len), OUTPOST_ERR_BUFFER_TOO_SMALL);
    CHECK_STATUS(outpost_last_error(NULL, 8, &len), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_new_from_file("/nonexistent/agent.toml", data_dir, &a),
                 OUTPOST_ERR_IO);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: %s FIXTURES DATA_DIR BIN_DIR COUNT fresh|preinstalled\n", argv[0]);
        return 2;
    }
    fixtures = argv[1];
    data_dir = argv[2];
    bin_dir = argv[3];
    count = (size_t)strtoul(argv[4], NULL, 10);
    int fresh = strcmp(argv[5], "fresh") == 0;
    if (count == 0 || count > 360) return 2;
    flat = read_file(bin_dir, "flat.bin", count * PIXELS * sizeof(float));
    image = read_file(bin_dir, "image.bin", count * PIXELS * sizeof(float));
    mlp_ref = read_file(bin_dir, "mlp_ref.bin", count * CLASSES * sizeof(float));
    cnn_ref = read_file(bin_dir, "cnn_ref.bin", count * CLASSES * sizeof(float));
    labels = read_file(bin_dir, "labels.bin", count * sizeof(int64_t));

    const char *v = outpost_version();
    CHECK(v != NULL && strncmp(v, "0.", 2) == 0);
    CHECK(strcmp(outpost_status_name(OUTPOST_OK), "OUTPOST_OK") == 0);
    CHECK(strcmp(outpost_status_name(OUTPOST_ERR_WRONG_SHAPE), "OUTPOST_ERR_WRONG_SHAPE") == 0);
    CHECK(strcmp(outpost_status_name(12345), "OUTPOST_ERR_UNKNOWN_STATUS") == 0);

    test_open_errors();

    outpost_agent *agent = NULL;
    CHECK_STATUS(outpost_agent_new("device_id = \"c-test\"\n[telemetry]\nwindow_count = 16\n",
                                   data_dir, &agent),
                 OUTPOST_OK);
    if (!agent) return 1;
    outpost_agent *second = NULL;
    CHECK_STATUS(outpost_agent_new(NULL, data_dir, &second), OUTPOST_ERR_LOCKED);
    CHECK(second == NULL);

    install_with_callbacks(agent, MLP, "mlp.onnx", "mlp.release.json", fresh);
    install_with_callbacks(agent, CNN, "cnn_a.onnx", "cnn_a.release.json", fresh);
    test_io_specs(agent);
    test_inference(agent);
    test_labels(agent);
    test_consent(agent);
    test_status(agent);
    test_failed_install(agent);
    test_bad_input(agent);
    test_threads(agent, count);

    CHECK_STATUS(outpost_agent_free(agent), OUTPOST_OK);
    /* double free and use after free are detected: handles are never reused */
    CHECK_STATUS(outpost_agent_free(agent), OUTPOST_ERR_INVALID_HANDLE);
    float out[CLASSES];
    uint64_t id;
    CHECK_STATUS(infer_mlp(agent, flat, out, &id), OUTPOST_ERR_INVALID_HANDLE);
    CHECK_STATUS(outpost_agent_free(NULL), OUTPOST_OK);

    /* the models were persisted: a new handle on the same directory serves them */
    CHECK_STATUS(outpost_agent_new(NULL, data_dir, &agent), OUTPOST_OK);
    if (agent) {
        CHECK_STATUS(infer_mlp(agent, flat + PIXELS, out, &id), OUTPOST_OK);
        CHECK(close_to_ref(out, mlp_ref + CLASSES));
        CHECK_STATUS(outpost_agent_free(agent), OUTPOST_OK);
    }

    free(flat);
    free(image);
    free(mlp_ref);
    free(cnn_ref);
    free(labels);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("api_test: all checks passed (%zu samples, %s)\n", count, fresh ? "fresh" : "preinstalled");
    return 0;
}
