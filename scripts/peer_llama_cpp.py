"""Times llama.cpp (through llama-cpp-python) on one GGUF model with its own counters.

Usage: python peer_llama_cpp.py MODEL THREADS INPUT_LEN OUTPUT_LEN
Prints one JSON object: prefill_tok_s, decode_tok_s (llama.cpp's perf counters, not wall
time), for a prompt of INPUT_LEN token ids and OUTPUT_LEN greedy decode steps.
"""
import json
import sys

import llama_cpp
from llama_cpp import Llama


def main():
    path, threads, n_in, n_out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    llm = Llama(
        model_path=path,
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=n_in + n_out + 16,
        n_batch=512,
        verbose=False,
    )
    vocab = llm.n_vocab()
    prompt = [1 + (i * 7919) % (vocab - 1) for i in range(n_in)]

    def run(steps):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        for n, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True), start=1):
            if n > steps:
                break
        return llama_cpp.llama_perf_context(llm._ctx.ctx)

    run(4)  # warm up: page the model in
    perf = run(n_out)
    print(json.dumps({
        "threads": threads,
        "prefill_tok_s": perf.n_p_eval / perf.t_p_eval_ms * 1e3,
        "decode_tok_s": perf.n_eval / perf.t_eval_ms * 1e3,
        "decode_tokens": perf.n_eval,
    }))


if __name__ == "__main__":
    main()
