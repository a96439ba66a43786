"""transformers' own continuous batching (generate_batch, sdpa_paged) on the engine's workload:
N prompts of 72 tokens, 50 greedy new tokens each; wall time of the whole batch after a warm-up."""
import sys
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation import GenerationConfig

from djinn.models.loader import resolve_device, resolve_dtype, synthetic_config

model_id = sys.argv[1] if len(sys.argv) > 1 else "meta-llama/Llama-2-7b-hf"
ATTN = "paged|sdpa"  # transformers 5.x: paged cache with SDPA ("sdpa_paged" in older releases)
device = resolve_device("auto")
dtype = resolve_dtype("auto", device)
torch.manual_seed(0)
previous = torch.get_default_dtype()
torch.set_default_dtype(dtype)
with torch.device(device):
    model = AutoModelForCausalLM.from_config(synthetic_config(model_id), attn_implementation=ATTN)
torch.set_default_dtype(previous)
model.eval()
config = GenerationConfig(max_new_tokens=50, min_new_tokens=50, do_sample=False, eos_token_id=-1, pad_token_id=0)
prompt = [(7 * i) % 30000 + 3 for i in range(72)]
for n in [int(x) for x in (sys.argv[2:] or ["1", "32"])]:
    inputs = [[(t + k) % 30000 + 3 for t in prompt] for k in range(n)]
    with torch.no_grad():  # its manager thread updates tensors created here
        model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) * 1e3
    lens = sorted(len(o.generated_tokens) for o in out.values())
    print(f"generate_batch N={n}: {ms:.1f} ms for all, {n * 50 / ms * 1e3:.0f} tokens/s, "
          f"generated lengths {lens[0]}..{lens[-1]}", flush=True)
