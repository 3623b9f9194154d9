/* The fleet link from C: an agent opened from a device bundle's agent.toml (with
 * [broker]) against a real `outpost-server serve`, whose director already assigns a
 * release of MODEL to this device. Checks that the update-state callback sees the
 * machine's states through COMMITTED on the link thread with our user_data, that
 * progress ends at the artifact's length, that a callback may call back into the
 * library but not stop or free the link it runs on, that inference then runs the
 * delivered model (compared with onnxruntime), and that stop/free end the link cleanly.
 *
 * Usage: fleet_test AGENT_TOML OTHER_DATA_DIR BIN_DIR COUNT MODEL MODEL_BYTES
 *   BIN_DIR holds image.bin (COUNT x 64 f32) and cnn_ref.bin (COUNT x 10 f32) for the
 *   assigned model; MODEL_BYTES is the length of the artifact a first install downloads
 *   (the zstd-compressed full model when the server kept one, else the ONNX file).
 *   OTHER_DATA_DIR is an empty directory for an agent without link.
 * Exit status 0 when every check passed. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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

#define CLASSES 10
#define PIXELS 64
#define MAX_EVENTS 256
#define WAIT_SECS 120

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

static size_t argmax(const float *v, size_t n) {
    size_t best = 0;
    for (size_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

static int close_to_ref(const float *got, const float *want) {
    for (size_t i = 0; i < CLASSES; i++)
        if (fabsf(got[i] - want[i]) > 1e-3f + 1e-3f * fabsf(want[i])) return 0;
    return argmax(got, CLASSES) == argmax(want, CLASSES);
}

/* ---- what the callbacks saw --------------------------------------------- */

#define MAGIC 0x6f75747021ULL

struct recorder {
    uint64_t magic; /* the callbacks check they got this struct back */
    pthread_mutex_t lock;
    pthread_cond_t changed;
    pthread_t main_thread;
    outpost_agent *agent;
    const char *model;
    outpost_update_state states[MAX_EVENTS]; /* states of `model`, in order */
    outpost_status statuses[MAX_EVENTS];
    size_t n_states;
    size_t n_verifying;      /* VERIFYING (reported with model "") */
    size_t n_other_model;    /* states or progress for another model name */
    size_t n_on_main_thread; /* callbacks run on the link thread, never ours */
    size_t n_bad_user_data;
    uint64_t last_done, last_total;
    size_t n_progress;
    size_t n_progress_backwards;
    outpost_status reentry_count, reentry_stop, reentry_free;
    int reentry_done;
    int finished; /* COMMITTED or FAILED seen for `model` */
};

static struct recorder *checked(void *user) {
    struct recorder *r = user;
    return r;
}

static void on_state(void *user, const char *model, outpost_update_state state,
                     outpost_status status) {
    struct recorder *r = checked(user);
    if (r->magic != MAGIC) {
        /* not our pointer: nothing else can be trusted */
        fprintf(stderr, "on_state: wrong user_data %p\n", user);
        abort();
    }
    int on_main = pthread_equal(pthread_self(), r->main_thread);
    /* Calling back into the library is allowed (outside the lock: the library may
     * call us again from this thread); stopping or freeing the link from it is not. */
    outpost_status st_count = OUTPOST_OK, st_stop = OUTPOST_OK, st_free = OUTPOST_OK;
    int reenter = model && strcmp(model, r->model) == 0 && state == OUTPOST_UPDATE_PROBATION;
    if (reenter) {
        size_t n = 0;
        st_count = outpost_agent_model_count(r->agent, &n);
        st_stop = outpost_agent_stop_link(r->agent);
        st_free = outpost_agent_free(r->agent);
    }
    pthread_mutex_lock(&r->lock);
    if (on_main) r->n_on_main_thread++;
    if (reenter && !r->reentry_done) {
        r->reentry_count = st_count;
        r->reentry_stop = st_stop;
        r->reentry_free = st_free;
        r->reentry_done = 1;
    }
    if (!model) {
        r->n_bad_user_data++;
    } else if (model[0] == '\0') {
        if (state == OUTPOST_UPDATE_VERIFYING) r->n_verifying++;
        else if (state == OUTPOST_UPDATE_FAILED) {
            fprintf(stderr, "assignment failed: %s\n", outpost_status_name(status));
            r->finished = 1;
        }
    } else if (strcmp(model, r->model) != 0) {
        r->n_other_model++;
    } else {
        if (r->n_states < MAX_EVENTS) {
            r->states[r->n_states] = state;
            r->statuses[r->n_states] = status;
            r->n_states++;
        }
        if (state == OUTPOST_UPDATE_COMMITTED || state == OUTPOST_UPDATE_FAILED)
            r->finished = 1;
    }
    pthread_cond_broadcast(&r->changed);
    pthread_mutex_unlock(&r->lock);
}

static void on_progress(void *user, const char *model, uint64_t done, uint64_t total) {
    struct recorder *r = checked(user);
    if (r->magic != MAGIC) {
        fprintf(stderr, "on_progress: wrong user_data %p\n", user);
        abort();
    }
    pthread_mutex_lock(&r->lock);
    if (pthread_equal(pthread_self(), r->main_thread)) r->n_on_main_thread++;
    if (!model || strcmp(model, r->model) != 0) {
        r->n_other_model++;
    } else {
        if (done > total || (r->n_progress > 0 && (done < r->last_done || total != r->last_total)))
            r->n_progress_backwards++;
        r->last_done = done;
        r->last_total = total;
        r->n_progress++;
    }
    pthread_mutex_unlock(&r->lock);
}

/* Index of the first `state` in the recorded states at or after `from`, or -1. */
static long find_state(const struct recorder *r, outpost_update_state state, size_t from) {
    for (size_t i = from; i < r->n_states; i++)
        if (r->states[i] == state) return (long)i;
    return -1;
}

static void check_no_link(const char *dir) {
    outpost_agent *plain = NULL;
    CHECK_STATUS(outpost_agent_new(NULL, dir, &plain), OUTPOST_OK);
    if (!plain) return;
    bool running = true;
    CHECK_STATUS(outpost_agent_start_link(plain), OUTPOST_ERR_NOT_FOUND);
    CHECK_STATUS(outpost_agent_stop_link(plain), OUTPOST_ERR_NOT_FOUND);
    CHECK_STATUS(outpost_agent_link_running(plain, &running), OUTPOST_ERR_NOT_FOUND);
    CHECK(!running);
    CHECK_STATUS(outpost_agent_link_running(plain, NULL), OUTPOST_ERR_NULL_POINTER);
    CHECK_STATUS(outpost_agent_free(plain), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_start_link(plain), OUTPOST_ERR_INVALID_HANDLE);
}

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: %s AGENT_TOML OTHER_DATA_DIR BIN_DIR COUNT MODEL MODEL_BYTES\n",
                argv[0]);
        return 2;
    }
    const char *config = argv[1], *other_dir = argv[2], *bin_dir = argv[3];
    size_t count = (size_t)strtoul(argv[4], NULL, 10);
    const char *model = argv[5];
    uint64_t model_bytes = strtoull(argv[6], NULL, 10);
    if (count == 0 || count > 360 || model_bytes == 0) return 2;
    float *image = read_file(bin_dir, "image.bin", count * PIXELS * sizeof(float));
    float *ref = read_file(bin_dir, "cnn_ref.bin", count * CLASSES * sizeof(float));

    check_no_link(other_dir);

    struct recorder rec;
    memset(&rec, 0, sizeof rec);
    rec.magic = MAGIC;
    pthread_mutex_init(&rec.lock, NULL);
    pthread_cond_init(&rec.changed, NULL);
    rec.main_thread = pthread_self();
    rec.model = model;

    outpost_agent *agent = NULL;
    CHECK_STATUS(outpost_agent_new_from_file(config, NULL, &agent), OUTPOST_OK);
    if (!agent) return 1;
    rec.agent = agent;
    bool running = true;
    CHECK_STATUS(outpost_agent_link_running(agent, &running), OUTPOST_OK);
    CHECK(!running);
    size_t n_models = 99;
    CHECK_STATUS(outpost_agent_model_count(agent, &n_models), OUTPOST_OK);
    CHECK(n_models == 0);
    CHECK_STATUS(outpost_agent_set_callbacks(agent, on_state, on_progress, &rec), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_start_link(agent), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_start_link(agent), OUTPOST_OK); /* already running */
    CHECK_STATUS(outpost_agent_link_running(agent, &running), OUTPOST_OK);
    CHECK(running);

    /* Wait (bounded) for the assigned release to commit or fail. */
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += WAIT_SECS;
    pthread_mutex_lock(&rec.lock);
    int timed_out = 0;
    while (!rec.finished && !timed_out)
        timed_out = pthread_cond_timedwait(&rec.changed, &rec.lock, &deadline) == ETIMEDOUT;
    pthread_mutex_unlock(&rec.lock);
    CHECK(!timed_out);

    pthread_mutex_lock(&rec.lock);
    fprintf(stderr, "states of %s:", model);
    for (size_t i = 0; i < rec.n_states; i++)
        fprintf(stderr, " %u/%s", rec.states[i], outpost_status_name(rec.statuses[i]));
    fprintf(stderr, "; verifying %zu; progress %zu calls, last %llu/%llu\n", rec.n_verifying,
            rec.n_progress, (unsigned long long)rec.last_done,
            (unsigned long long)rec.last_total);
    /* The machine's order: DOWNLOADING -> RECONSTRUCTING -> INSTALLING -> PROBATION ->
     * COMMITTED, each once, all OK, after a VERIFYING of the assignment. */
    CHECK(rec.n_verifying >= 1);
    long dl = find_state(&rec, OUTPOST_UPDATE_DOWNLOADING, 0);
    long rc = find_state(&rec, OUTPOST_UPDATE_RECONSTRUCTING, 0);
    long in = find_state(&rec, OUTPOST_UPDATE_INSTALLING, 0);
    long pr = find_state(&rec, OUTPOST_UPDATE_PROBATION, 0);
    long co = find_state(&rec, OUTPOST_UPDATE_COMMITTED, 0);
    CHECK(dl == 0 && rc > dl && in > rc && pr > in && co > pr);
    CHECK(co == (long)rec.n_states - 1);
    CHECK(find_state(&rec, OUTPOST_UPDATE_FAILED, 0) < 0);
    CHECK(find_state(&rec, OUTPOST_UPDATE_DOWNLOADING, (size_t)dl + 1) < 0);
    CHECK(find_state(&rec, OUTPOST_UPDATE_INSTALLING, (size_t)in + 1) < 0);
    for (size_t i = 0; i < rec.n_states; i++) CHECK(rec.statuses[i] == OUTPOST_OK);
    CHECK(rec.n_other_model == 0);
    CHECK(rec.n_bad_user_data == 0);
    CHECK(rec.n_on_main_thread == 0);
    /* progress: at least the start and the end, monotonic, ending at the file length */
    CHECK(rec.n_progress >= 2);
    CHECK(rec.n_progress_backwards == 0);
    CHECK(rec.last_total == model_bytes);
    CHECK(rec.last_done == rec.last_total);
    /* re-entry from the link thread */
    CHECK(rec.reentry_done);
    CHECK(rec.reentry_count == OUTPOST_OK);
    CHECK(rec.reentry_stop == OUTPOST_ERR_INVALID_ARGUMENT);
    CHECK(rec.reentry_free == OUTPOST_ERR_INVALID_ARGUMENT);
    pthread_mutex_unlock(&rec.lock);

    /* The delivered model serves, and the status says so. */
    outpost_model_status status;
    CHECK_STATUS(outpost_agent_model_status(agent, model, &status), OUTPOST_OK);
    CHECK(status.loaded && status.active_sequence >= 1);
    CHECK(status.update_state == OUTPOST_UPDATE_COMMITTED && status.update_status == OUTPOST_OK);
    size_t agree = 0;
    for (size_t i = 0; i < count; i++) {
        size_t shape[4] = {1, 1, 8, 8};
        outpost_tensor input = {"x", OUTPOST_DTYPE_F32, shape, 4, image + i * PIXELS,
                                PIXELS * sizeof(float)};
        float logits[CLASSES];
        outpost_output out = {logits, sizeof logits, 0, 0, 0, {0}};
        uint64_t id = 0;
        CHECK_STATUS(outpost_agent_infer(agent, model, &input, 1, &out, 1, &id), OUTPOST_OK);
        CHECK(id != 0 && out.byte_len == sizeof logits);
        if (close_to_ref(logits, ref + i * CLASSES)) agree++;
    }
    CHECK(agree == count);

    /* Stop, restart, and free with the link running. */
    CHECK_STATUS(outpost_agent_stop_link(agent), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_link_running(agent, &running), OUTPOST_OK);
    CHECK(!running);
    CHECK_STATUS(outpost_agent_stop_link(agent), OUTPOST_OK); /* not running: no-op */
    CHECK_STATUS(outpost_agent_start_link(agent), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_free(agent), OUTPOST_OK);
    CHECK_STATUS(outpost_agent_link_running(agent, &running), OUTPOST_ERR_INVALID_HANDLE);
    /* the data directory is unlocked: it opens again, with the model installed */
    outpost_agent *again = NULL;
    CHECK_STATUS(outpost_agent_new_from_file(config, NULL, &again), OUTPOST_OK);
    if (again) {
        CHECK_STATUS(outpost_agent_model_status(again, model, &status), OUTPOST_OK);
        CHECK(status.loaded);
        CHECK_STATUS(outpost_agent_free(again), OUTPOST_OK);
    }

    pthread_cond_destroy(&rec.changed);
    pthread_mutex_destroy(&rec.lock);
    free(image);
    free(ref);
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("fleet link: ok\n");
    return 0;
}
