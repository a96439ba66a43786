import pytest
import torch

from djinn.models import load_model
from djinn.models.loader import build_synthetic, load_tokenizer_for
from djinn.models.tokenizer import HashTokenizer
from djinn.paths import DEFAULT_PROMPT_FILE


def test_tiny_gpt2_synthetic_builds_real_architecture():
    lm = load_model("sshleifer/tiny-gpt2", weights="auto", device="cpu", quiet=True)
    assert lm.weights == "synthetic" and type(lm.model).__name__ == "GPT2LMHeadModel"
    assert lm.model.config.n_embd == 2 and lm.model.config.vocab_size == 50257
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"


def test_synthetic_weights_are_seeded():
    a = build_synthetic("djinn/tiny-llama", torch.float32, "cpu", seed=3)
    b = build_synthetic("djinn/tiny-llama", torch.float32, "cpu", seed=3)
    c = build_synthetic("djinn/tiny-llama", torch.float32, "cpu", seed=4)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_llama2_7b_shape_on_meta_device():
    model = build_synthetic("meta-llama/Llama-2-7b-hf", torch.float16, "meta")
    n = sum(p.numel() for p in model.parameters())
    assert 6.7e9 < n < 6.8e9  # Llama-2-7B has 6.74 B parameters
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 32


def test_unknown_model_without_weights_names_the_fix():
    import pytest

    from djinn.models.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="^model_id: .*use a local path or one of"):
        load_model("nobody/no-such-model", device="cpu", quiet=True)
    with pytest.raises(ModelLoadError, match="--weights synthetic"):
        load_model("sshleifer/tiny-gpt2", weights="pretrained", device="cpu", quiet=True)


def test_fallback_tokenizer_is_deterministic_and_in_vocab():
    a, b = HashTokenizer(32000), HashTokenizer(32000)
    text = DEFAULT_PROMPT_FILE.read_text()
    ids = a.encode(text)
    assert ids == b.encode(text) and all(3 <= i < 32000 for i in ids)
    assert len(ids) == 72  # configs/prompt.txt is a 72-token prompt for this tokenizer
    assert a.decode(a.encode("Djinn keeps caches.")) == "Djinn keeps caches ."
    assert load_tokenizer_for("sshleifer/tiny-gpt2").encode(text) == HashTokenizer(50257).encode(text)


def test_finding_a_tokenizer_never_touches_the_network(monkeypatch):
    """transformers looks a hub id up on the hub even with local_files_only: 10 s per client process in a
    pod whose DNS does not answer. Only local directories may reach it."""
    import socket

    from djinn.models.loader import load_tokenizer_for

    looked_up = []

    def no_network(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for weights in ("synthetic", "auto"):
        tok = load_tokenizer_for("sshleifer/tiny-gpt2", weights)
        assert tok.name == "djinn-hash" and len(tok.encode("Reason, then act.")) > 0
    assert looked_up == []


def test_weights_are_downloaded_only_when_asked_and_a_failed_download_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub

    from djinn.models import loader

    calls = []

    def snapshot_download(model_id, local_files_only=False, allow_patterns=None):
        calls.append((model_id, local_files_only))
        if local_files_only:
            raise FileNotFoundError("not cached")
        if model_id == "org/missing":
            raise RuntimeError("401 Client Error: gated repo\nmore lines")
        snap = tmp_path / "snap"
        snap.mkdir(exist_ok=True)
        (snap / "config.json").write_text("{}")
        (snap / "model.safetensors").write_bytes(b"")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv(loader.DOWNLOAD_ENV, raising=False)
    assert loader._pretrained_source("org/gated") is None and calls == [("org/gated", True)]
    monkeypatch.setenv(loader.DOWNLOAD_ENV, "1")
    assert loader._pretrained_source("org/gated") == str(tmp_path / "snap")
    assert calls[-1] == ("org/gated", False)
    with pytest.raises(loader.ModelLoadError) as err:
        loader._pretrained_source("org/missing")
    assert str(err.value).startswith("model_id: downloading 'org/missing' from the Hugging Face hub failed "
                                     "(401 Client Error: gated repo)") and "\n" not in str(err.value)


def test_a_path_that_holds_no_model_is_an_error_not_random_weights(tmp_path):
    """A modelId naming a directory (a volume that did not mount, say) must not quietly measure random weights."""
    from djinn.models.loader import ModelLoadError, resolve_weights

    missing = str(tmp_path / "Llama-2-7b-hf")  # its last part names a shipped config
    with pytest.raises(ModelLoadError, match=r"^model_id: '.*Llama-2-7b-hf' is a path but not a model directory"):
        resolve_weights(missing)
    assert resolve_weights(missing, "synthetic")[0] == "synthetic"  # asked for: its shape, random weights
