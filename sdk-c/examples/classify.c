/* classify: recognise a handwritten digit with liboutpost.
 *
 *   classify DATA_DIR MODEL.onnx MODEL.release.json IMAGE.pgm
 *
 * Opens an agent on DATA_DIR (a directory of its own; created if missing), installs the
 * model (a no-op when that release is already active), reads an 8x8 binary PGM (P5,
 * maxval 16), feeds pixel/16 to the model and prints the predicted digit.
 * Build: see sdk-c/README.md ("Build the example"). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "outpost.h"

static int fail(const char *what, outpost_status status) {
    char msg[1024];
    outpost_last_error(msg, sizeof msg, NULL);
    fprintf(stderr, "classify: %s: %s: %s\n", what, outpost_status_name(status), msg);
    return 1;
}

/* Reads an 8x8 P5 PGM with maxval 16 into 64 floats in [0, 1]. */
static int read_pgm(const char *path, float pixels[64]) {
    FILE *f = fopen(path, "rb");
    int w = 0, h = 0, maxval = 0;
    unsigned char raw[64];
    if (!f) return -1;
    if (fscanf(f, "P5 %d %d %d", &w, &h, &maxval) != 3 || w != 8 || h != 8 || maxval != 16 ||
        fgetc(f) == EOF || fread(raw, 1, sizeof raw, f) != sizeof raw) {
        fclose(f);
        return -1;
    }
    fclose(f);
    for (int i = 0; i < 64; i++) pixels[i] = (float)raw[i] / 16.0f;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s DATA_DIR MODEL.onnx MODEL.release.json IMAGE.pgm\n", argv[0]);
        return 2;
    }
    float pixels[64];
    if (read_pgm(argv[4], pixels) != 0) {
        fprintf(stderr, "classify: %s is not an 8x8 P5 PGM with maxval 16\n", argv[4]);
        return 1;
    }

    outpost_agent *agent = NULL;
    outpost_status s = outpost_agent_new(NULL, argv[1], &agent);
    if (s != OUTPOST_OK) return fail("opening the agent", s);
    s = outpost_agent_install_file(agent, argv[2], argv[3]);
    if (s != OUTPOST_OK) {
        fail("installing the model", s);
        outpost_agent_free(agent);
        return 1;
    }

    /* The model this data directory serves, and the name and shape of its input. */
    char model[256], input[256];
    outpost_tensor_spec spec;
    size_t elements = 1;
    s = outpost_agent_model_name(agent, 0, model, sizeof model, NULL);
    if (s == OUTPOST_OK)
        s = outpost_agent_model_input(agent, model, 0, input, sizeof input, NULL, &spec);
    if (s != OUTPOST_OK) {
        fail("reading the model's input", s);
        outpost_agent_free(agent);
        return 1;
    }
    for (size_t i = 0; i < spec.rank; i++) elements *= spec.shape[i];
    if (spec.dtype != OUTPOST_DTYPE_F32 || elements != 64) {
        fprintf(stderr, "classify: model %s does not take 64 floats\n", model);
        outpost_agent_free(agent);
        return 1;
    }

    outpost_tensor x = {input, OUTPOST_DTYPE_F32, spec.shape, spec.rank, pixels, sizeof pixels};
    outpost_result *result = NULL;
    s = outpost_agent_infer_owned(agent, model, &x, 1, &result);
    if (s != OUTPOST_OK) {
        fail("inference", s);
        outpost_agent_free(agent);
        return 1;
    }
    uint32_t digit = 0;
    float probability = 0.0f;
    uint64_t prediction_id = 0;
    s = outpost_result_class(result, &digit, &probability);
    outpost_result_prediction_id(result, &prediction_id);
    outpost_result_free(result);
    if (s != OUTPOST_OK) {
        fail("reading the class", s);
        outpost_agent_free(agent);
        return 1;
    }
    printf("digit %u (probability %.3f, model %s, prediction %016llx)\n", (unsigned)digit,
           probability, model, (unsigned long long)prediction_id);
    s = outpost_agent_free(agent);
    return s == OUTPOST_OK ? 0 : fail("closing the agent", s);
}
