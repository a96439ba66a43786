"""Model and tokenizer loading: real weights when present locally, synthetic otherwise."""

from djinn.models.loader import LoadedModel, load_model, resolve_device, resolve_dtype  # noqa: F401
from djinn.models.tokenizer import load_tokenizer  # noqa: F401
