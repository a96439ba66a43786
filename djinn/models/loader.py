"""Load a causal LM by id: local path or HF cache when present, else the real
architecture from ``configs/models/<name>.json`` with seeded random weights."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from djinn.paths import MODEL_CONFIG_DIR

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # djinn.models.tokenizer.Tokenizer
    model_id: str
    weights: str  # "pretrained" | "synthetic"
    device: torch.device
    dtype: torch.dtype

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device: {device} requested but no CUDA GPU is visible; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype: {dtype!r} is not one of auto, {', '.join(_DTYPES)}") from None


def synthetic_config_path(model_id: str) -> Path:
    """``configs/models/<last path part, lower-cased>.json`` (or ``model_id`` itself if it is a .json file)."""
    if model_id.endswith(".json") and Path(model_id).is_file():
        return Path(model_id)
    return MODEL_CONFIG_DIR / f"{model_id.rstrip('/').split('/')[-1].lower()}.json"


def shipped_model_ids() -> list[str]:
    return sorted(json.loads(p.read_text()).get("_name_or_path", p.stem) for p in MODEL_CONFIG_DIR.glob("*.json"))


def synthetic_config(model_id: str):
    from transformers import AutoConfig

    path = synthetic_config_path(model_id)
    if not path.is_file():
        raise ModelLoadError(f"model_id: no local weights for {model_id!r} and no shipped config {path.name}; "
                             f"use a local path or one of {', '.join(shipped_model_ids())}")
    data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    data.pop("architectures", None)
    data.pop("torch_dtype", None)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def local_snapshot(model_id: str) -> Optional[str]:
    """``model_id`` itself when it is a directory, else its HF-cache snapshot directory, else None.

    Offline by construction: transformers given a hub id looks it up on the hub even with
    ``local_files_only`` (10 s per process where DNS does not answer, as in an air-gapped pod).
    """
    if Path(model_id).is_dir():
        return model_id
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, local_files_only=True)
    except Exception:
        return None


DOWNLOAD_ENV = "DJINN_DOWNLOAD_WEIGHTS"  # "1": fetch from the hub what is not local (HF_TOKEN for gated models)
_DOWNLOADED = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def _complete(path: Optional[str]) -> Optional[str]:
    if path is None or not (Path(path) / "config.json").is_file():
        return None
    files = {p.suffix for p in Path(path).iterdir()}
    return path if {".safetensors", ".bin"} & files else None


def _download(model_id: str) -> str:
    """The hub snapshot of ``model_id``, fetched into the HF cache (HF_HUB_CACHE: a mounted volume on a cluster)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model_id, allow_patterns=_DOWNLOADED)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelLoadError(f"model_id: downloading {model_id!r} from the Hugging Face hub failed ({first}); "
                             "check the id, HF_TOKEN's access to it, and the pod's network") from None


def _pretrained_source(model_id: str) -> Optional[str]:
    """A local directory or a complete HF-cache snapshot for ``model_id``, else None; downloads only when
    DJINN_DOWNLOAD_WEIGHTS=1 (what the operator sets with ``cluster.hfTokenSecret``)."""
    path = _complete(local_snapshot(model_id))
    if path is None and os.environ.get(DOWNLOAD_ENV) == "1" and not Path(model_id).is_absolute():
        path = _complete(_download(model_id))
    return path


def resolve_weights(model_id: str, weights: str = "auto", seed: int = 0) -> tuple[str, str]:
    """(pretrained | synthetic, where from) as load_model would resolve them here; what result documents record."""
    source = None if weights == "synthetic" else _pretrained_source(model_id)
    if source is not None:
        return "pretrained", source
    if weights == "auto" and Path(model_id).is_absolute() and not model_id.endswith(".json"):
        raise ModelLoadError(f"model_id: {model_id!r} is a path but not a model directory (config.json and *.safetensors "
                             "or *.bin); mount the weights there, or pass --weights synthetic for its shape with random weights")
    if weights == "pretrained":
        raise ModelLoadError(f"model_id: {model_id!r} is neither a local model directory nor in the local HF "
                             f"cache; download it first (or set {DOWNLOAD_ENV}=1) or use --weights synthetic")
    return "synthetic", f"{synthetic_config_path(model_id).name} with seeded random weights (seed {seed})"


def model_config(model_id: str, weights: str = "auto"):
    """The transformers config load_model would build ``model_id`` from (no weights read)."""
    kind, where = resolve_weights(model_id, weights)
    if kind == "pretrained":
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(where)
    return synthetic_config(model_id)


def model_on_meta(model_id: str, weights: str = "auto", dtype: str = "auto", device: str = "auto"):
    """``model_id``'s modules at the dtype ``load_model`` would pick, on the meta device: every shape and
    size, nothing allocated."""
    dev = resolve_device(device)
    return _from_config(model_config(model_id, weights), resolve_dtype(dtype, dev), torch.device("meta"))


def estimate_weight_bytes(model_id: str, weights: str = "auto", dtype: str = "auto", device: str = "auto") -> int:
    """Bytes of ``model_id``'s weights at ``dtype``, counted on the meta device (nothing allocated)."""
    return sum(p.numel() * p.element_size() for p in model_on_meta(model_id, weights, dtype, device).parameters())


def _from_config(config, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(previous)


def build_synthetic(model_id: str, dtype: torch.dtype, device: torch.device | str, seed: int = 0):
    """The real architecture of ``model_id`` with seeded random weights (``device='meta'`` allocates nothing)."""
    config = synthetic_config(model_id)
    device = torch.device(device)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    model = _from_config(config, dtype, device)
    return model.eval().requires_grad_(False)


def load_model(model_id: str, weights: str = "auto", dtype: str = "auto", device: str = "auto",
               seed: int = 0, quiet: bool = False) -> LoadedModel:
    """Load ``model_id`` for inference. ``weights``: auto | pretrained | synthetic."""
    from djinn.models.tokenizer import load_tokenizer

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    kind, where = resolve_weights(model_id, weights, seed)
    source = where if kind == "pretrained" else None
    if source is not None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dt, attn_implementation="sdpa")
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=dt, attn_implementation="sdpa")
        model = model.to(dev).eval().requires_grad_(False)
    else:
        if weights == "auto" and not quiet:
            print(f"[djinn] no local weights for {model_id}: using synthetic weights ({where})", file=sys.stderr)
        model = build_synthetic(model_id, dt, dev, seed)
    tokenizer = load_tokenizer(source or local_snapshot(model_id), vocab_size=model.config.vocab_size,
                               eos_token_id=model.config.eos_token_id)
    return LoadedModel(model, tokenizer, model_id, kind, dev, dt)


def load_tokenizer_for(model_id: str, weights: str = "auto"):
    """The tokenizer of ``model_id`` without loading its weights (for clients of a remote model)."""
    from djinn.models.tokenizer import load_tokenizer

    source = None if weights == "synthetic" else _pretrained_source(model_id)
    if source is not None:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(source)
    else:
        config = synthetic_config(model_id)
    return load_tokenizer(source or local_snapshot(model_id), vocab_size=config.vocab_size,
                          eos_token_id=config.eos_token_id)
