"""Why is HF generate with a caller-made DynamicCache slower? Time the variants on the GPU."""
import threading
import time

import torch
from transformers import DynamicCache

from djinn.models import load_model
from djinn.runners.hf_agent import greedy

lm = load_model("meta-llama/Llama-2-7b-hf", "synthetic", "float16", "cuda", quiet=True)
p = list(range(10, 82))


def t(label, make):
    for _ in range(2):
        t0 = time.perf_counter()
        greedy(lm.model, p, 50, make())
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
    print(f"{label}: {ms:.0f} ms", flush=True)


t("cache None", lambda: None)
t("DynamicCache()", DynamicCache)
try:
    t("DynamicCache(config)", lambda: DynamicCache(config=lm.model.config))
except TypeError as exc:
    print("DynamicCache(config) not supported:", exc)
th = threading.Thread(target=t, args=("thread, cache None", lambda: None))
th.start()
th.join()
