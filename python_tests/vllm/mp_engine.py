"""Run an engine with its engine core in a separate process (vLLM's default) and print, as JSON,
the greedy tokens of some prompts and the prefix-cache hits of a multi-turn prompt.

Used by test_vllm_plugin.py through a subprocess: python mp_engine.py CHECKPOINT PLAN OUT_JSON."""

import json
import os
import sys

if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import harness as H

    path, plan, out = sys.argv[1:4]
    llm = H.make_llm(path, plan)
    items = H.prompts("llava", 6, seed=11)
    tokens, _ = H.generate(llm, items, 8)
    turn1 = list(range(3, 3 + 2 * H.BLOCK))
    ans, _ = H.generate_ids(llm, [turn1], 40)
    _, outs = H.generate_ids(llm, [turn1 + ans[0] + [5, 6, 7]], 2)
    with open(out, "w") as f:
        json.dump({"tokens": tokens, "answer": ans[0], "cached": outs[0].num_cached_tokens}, f)
    H.close(llm)
