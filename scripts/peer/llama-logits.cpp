// llama.cpp's answer for one prompt of token ids, for scripts/compare-llama-cpp-models:
// the logits of the prompt's last position and the greedy continuation (argmax, the lowest
// id on ties, end of sequence ignored), as one JSON object on stdout.
//
// Usage: llama-logits MODEL.gguf N_NEW ID,ID,...
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

static int fail(const char * what) {
    fprintf(stderr, "llama-logits: %s\n", what);
    return 1;
}

int main(int argc, char ** argv) {
    if (argc != 4) {
        return fail("usage: llama-logits MODEL.gguf N_NEW ID,ID,...");
    }
    std::vector<llama_token> ids;
    std::stringstream list(argv[3]);
    for (std::string id; std::getline(list, id, ',');) {
        ids.push_back((llama_token) std::stol(id));
    }
    const int n_new = atoi(argv[2]);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (model == nullptr) {
        return fail("llama.cpp could not load the model");
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = ids.size() + n_new + 16;
    cp.n_batch = cp.n_ctx;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        return fail("llama.cpp could not make a context");
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    if (llama_decode(ctx, llama_batch_get_one(ids.data(), ids.size())) != 0) {
        return fail("the prompt did not decode");
    }
    printf("{\"last_logits\": [");
    const float * logits = llama_get_logits_ith(ctx, -1);
    for (int i = 0; i < n_vocab; i++) {
        printf(i ? ",%.6g" : "%.6g", logits[i]);
    }
    printf("], \"output_ids\": [");
    for (int step = 0; step < n_new; step++) {
        const float * l = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (int i = 1; i < n_vocab; i++) {
            if (l[i] > l[best]) {
                best = i;
            }
        }
        printf(step ? ",%d" : "%d", best);
        if (step + 1 < n_new && llama_decode(ctx, llama_batch_get_one(&best, 1)) != 0) {
            return fail("a generated token did not decode");
        }
    }
    printf("]}\n");
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
