"""The native agent step vs plain greedy on the GPU (same model, same prompt)."""
import time

import torch

from djinn.models.loader import load_tokenizer_for
from djinn.runners.agents import AgentWorkload, NativeBackend
from djinn.runners.common import prompt_text
from djinn.runners.hf_agent import ModelRef, greedy
from djinn.spec import ExperimentSpec

ref = ModelRef("meta-llama/Llama-2-7b-hf", "synthetic", "float16", "auto")
lm = ref.load()
work = AgentWorkload.from_tokenizer(load_tokenizer_for(ref.model_id, "synthetic"), prompt_text(ExperimentSpec()))


def clock(label, fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    print(f"{label}: {(time.perf_counter() - t0) * 1e3:.0f} ms", flush=True)


for i in range(2):
    clock(f"greedy range prompt #{i}", lambda: greedy(lm.model, list(range(10, 82)), 50))
    clock(f"greedy workload prompt #{i}", lambda: greedy(lm.model, work.prompt, 50))
b = NativeBackend(lm.model)
b.setup(1)
clock("agent reason", lambda: b.step(0, work.prompt, 50))
clock("agent reflect", lambda: b.step(0, work.observation, 50))
print("prompt ids", work.prompt[:8], "eos", lm.model.config.eos_token_id)
