"""The KV budget: what is left of --max-vram-gb for the KV cache, in the server and the engine bench."""
import argparse
from types import SimpleNamespace

import pytest
import torch

import djinn.server.service as service_module
from djinn.server.service import DjinnService, RequestError, ServerConfig, build_engine, kv_budget_bytes

GiB = 1 << 30


def _entry(weight_bytes, pool_bytes):
    return SimpleNamespace(loaded=SimpleNamespace(weight_bytes=weight_bytes),
                           engine=SimpleNamespace(cache=SimpleNamespace(nbytes=pool_bytes)))


def budget(service, weight_bytes, device):
    """What the server leaves a new model's KV cache (as its load does)."""
    return kv_budget_bytes(service.config.max_vram_gb, weight_bytes, device, service._used_bytes())


@pytest.fixture(autouse=True)
def roomy_host(monkeypatch):
    """A host with 1 TiB free, so the CPU budgets below are --max-vram-gb's (one test shrinks it)."""
    monkeypatch.setattr(service_module, "available_host_bytes", lambda: 1024 * GiB)


def test_server_budget_is_the_cap_less_weights_and_a_reserve():
    service = DjinnService(ServerConfig(max_vram_gb=10))
    # reserve: min(4 GiB, 5% of the cap) for activations + 10% of the weights for allocator slack
    assert budget(service, 1 * GiB, torch.device("cpu")) == int(10 * GiB - 1 * GiB - (0.5 * GiB + 0.1 * GiB))
    big = DjinnService(ServerConfig(max_vram_gb=200))
    assert budget(big, 1 * GiB, torch.device("cpu")) == int(200 * GiB - 1 * GiB - (4 * GiB + 0.1 * GiB))


def test_server_budget_leaves_what_other_models_hold():
    service = DjinnService(ServerConfig(max_vram_gb=10))
    service.models["other"] = _entry(2 * GiB, 3 * GiB)
    assert budget(service, 1 * GiB, torch.device("cpu")) == int(10 * GiB - 5 * GiB - 1 * GiB - 0.6 * GiB)


def test_server_budget_never_exceeds_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=8 * GiB))
    service = DjinnService(ServerConfig(max_vram_gb=80))  # more than the 8 GiB device has
    cap = 8 * GiB * 0.92
    assert budget(service, 1 * GiB, torch.device("cuda", 0)) == int(cap - 1 * GiB - (0.05 * cap + 0.1 * GiB))


def test_on_the_cpu_the_host_free_memory_caps_the_budget(monkeypatch):
    """A CPU server's KV cache and a wire-loaded model live in host memory: past what is free, the server
    would be OOM-killed with every session (a client's load_model of the 7B config did that on 24 GiB)."""
    monkeypatch.setattr(service_module, "available_host_bytes", lambda: 20 * GiB)
    service = DjinnService(ServerConfig(max_vram_gb=80))
    service.models["other"] = _entry(2 * GiB, 3 * GiB)  # already out of the free memory
    cap = 25 * GiB
    assert budget(service, 1 * GiB, torch.device("cpu")) == int(cap - 5 * GiB - 1 * GiB - (0.05 * cap + 0.1 * GiB))
    with pytest.raises(RequestError, match=r"^the host's free memory \(25.0 GiB\) leaves no room for the KV cache "
                                           r"after 25.10 GiB of weights; load a smaller model or dtype$") as err:
        budget(service, int(25.1 * GiB), torch.device("cpu"))
    assert err.value.code == "out_of_memory"
    # the engine is sized after the load, when the weights are no longer free: the budget the check saw
    checked = budget(service, 12 * GiB, torch.device("cpu"))
    monkeypatch.setattr(service_module, "available_host_bytes", lambda: 8 * GiB)
    assert kv_budget_bytes(80, 12 * GiB, torch.device("cpu"), service._used_bytes(), weights_resident=True) == checked


def test_a_wire_load_past_the_host_memory_is_refused_before_loading(monkeypatch):
    import asyncio

    monkeypatch.setattr(service_module, "available_host_bytes", lambda: 4 * GiB)
    monkeypatch.setattr(service_module, "load_model", lambda *a, **k: pytest.fail("loaded a model that cannot fit"))
    service = DjinnService(ServerConfig(device="cpu"))
    with pytest.raises(RequestError, match=r"^the host's free memory \(4.0 GiB\) leaves no room") as err:
        asyncio.run(service.load("meta-llama/Llama-2-7b-hf", "synthetic", "float16"))
    assert err.value.code == "out_of_memory" and not service.models


def test_server_refuses_a_cap_with_no_room_for_kv():
    with pytest.raises(RequestError, match=r"--max-vram-gb 1 leaves no room .* raise it") as err:
        kv_budget_bytes(ServerConfig(max_vram_gb=1).max_vram_gb, 1 * GiB, torch.device("cpu"))
    assert err.value.code == "out_of_memory"


def test_engine_bench_builds_the_servers_engine(monkeypatch):
    """bench-engine builds its engine as the server does (build_engine: one budget, the same flags and defaults)."""
    import djinn.models.loader as loader
    import djinn.server.service as service
    from djinn.bench import engine_bench
    from djinn.models.tokenizer import HashTokenizer

    seen = []

    class Stop(Exception):
        pass

    class RecordingEngine:
        def __init__(self, model, **kw):
            seen.append(kw)
            raise Stop

    lm = SimpleNamespace(device=torch.device("cuda", 0), weights="synthetic", dtype=torch.float16,
                         weight_bytes=13 * GiB, model=None, tokenizer=HashTokenizer(32000))
    monkeypatch.setattr(loader, "load_model", lambda *a, **k: lm)
    monkeypatch.setattr(service, "Engine", RecordingEngine)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=80 * GiB))
    monkeypatch.setattr(engine_bench, "copy_bandwidth_gbps", lambda dev: 3000.0)
    monkeypatch.setattr(engine_bench, "gemm_tflops", lambda dev, dtype: 700.0)
    monkeypatch.setattr(engine_bench, "timed", lambda fn, repeat=3: 1.0)
    p = argparse.ArgumentParser()
    engine_bench.add_arguments(p)
    for argv, config in (([], ServerConfig()), (["--max-vram-gb", "40", "--kv-block-size", "32"],
                                                ServerConfig(max_vram_gb=40, kv_block_size=32))):
        with pytest.raises(Stop):
            engine_bench.run(p.parse_args(argv))
        with pytest.raises(Stop):
            build_engine(config, lm)
        assert seen[-2] == seen[-1]
    assert seen[-1]["kv_budget_bytes"] == int(40 * GiB - 13 * GiB - (0.05 * 40 * GiB + 1.3 * GiB))
    assert seen[-1]["block_size"] == 32 and seen[0]["max_seq"] == 512 and seen[0]["max_slots"] == 1024


def test_the_pinned_arena_defaults_to_half_the_host_memory_up_to_the_device_blocks():
    from djinn.engine.kv_cache import PagedKVCache, auto_host_blocks
    from djinn.engine.transformer import Shape

    mib = 1 << 20
    assert auto_host_blocks(7000, 8 * mib, 32 * GiB) == 4096  # 32 GiB of 8 MiB blocks
    assert auto_host_blocks(100, 8 * mib, 32 * GiB) == 100  # never more than the device holds
    assert auto_host_blocks(100, GiB, GiB // 2) == 0
    cpu = PagedKVCache(Shape(2, 2, 2, 16, 100, 128), 4, 16, 32, 4, torch.float32, torch.device("cpu"), host_blocks=None)
    assert cpu.host_blocks == 0  # pinned memory only pays on a GPU


def test_the_free_host_memory_respects_the_containers_cgroup_limit(tmp_path):
    from djinn.engine.kv_cache import available_host_bytes

    (tmp_path / "memory.max").write_text("1073741824\n")
    (tmp_path / "memory.current").write_text("268435456\n")
    assert available_host_bytes(str(tmp_path)) == 805306368  # limit minus usage (this machine has more free)
    (tmp_path / "memory.max").write_text("max\n")
    assert available_host_bytes(str(tmp_path)) > 805306368  # no limit: the host's free memory


def test_the_roofline_of_a_phase_is_prefill_flops_plus_decode_bytes():
    from djinn.bench.roofline import phase_roofline_ms

    rates = dict(params=7e9, weight_bytes=14e9, kv_bytes_per_token=500_000, gemm_tflops=700, bandwidth_gbps=3000)
    # Reason of 256 agents: 256 x 72 prompt tokens, then 49 steps reading 14 GB and the growing KV
    prefill_ms = 2 * 7e9 * 256 * 72 / 700e12 * 1e3
    kv = sum(256 * (72 + j) for j in range(49)) * 500_000
    decode_ms = (49 * 14e9 + kv) / 3000e9 * 1e3
    assert abs(phase_roofline_ms(256, 72, 50, 0, **rates) - (prefill_ms + decode_ms)) < 1e-6
    assert 750 < prefill_ms + decode_ms < 850  # the "roughly 0.8 s at N=256"
    reflect = phase_roofline_ms(256, 3, 50, 122, **rates)  # Reflect starts after prompt + Reason's tokens
    assert reflect > phase_roofline_ms(256, 3, 50, 0, **rates)


def test_a_kv_cache_the_device_cannot_hold_is_a_one_line_error_naming_the_flags():
    from djinn.engine.kv_cache import PagedKVCache
    from djinn.engine.transformer import Shape

    with pytest.raises(ValueError, match=r"does not fit on cpu .*; lower --max-vram-gb, --max-slots or --kv-block-size"):
        PagedKVCache(Shape(2, 2, 2, 16, 100, 128), 2**38, 16, 32, 4, torch.float32, torch.device("cpu"))  # 1 PiB
