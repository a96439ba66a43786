"""Out-of-memory is decided by the exception's type along its cause chain, never by its text."""
import pytest
import torch

from djinn.client import ConcurrencyLimitExceeded, DjinnError
from djinn.runners.common import ReportedFailure, error_line, is_oom, traceback_text

QUOTES_OOM = "No module named 'fancy_allocator' (imported to avoid torch.OutOfMemoryError: CUDA out of memory)"


def _raised(exc, cause=None):
    try:
        raise exc from cause
    except BaseException as caught:
        return caught


def test_oom_by_type_and_cause_chain():
    cuda = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB. GPU 0 has ...")
    assert is_oom(cuda) and is_oom(torch.OutOfMemoryError("emulated device out of memory"))
    assert is_oom(_raised(RuntimeError("step failed"), cuda))  # raise ... from the OOM
    assert is_oom(DjinnError("out_of_memory", "--max-vram-gb 1 leaves no room"))
    assert is_oom(ReportedFailure(True, "torch.OutOfMemoryError: x", "tb"))


def test_a_cuda_librarys_allocation_failure_is_an_oom():
    """What keep-alive's 11th weight copy raised on a full H200 (docs/results/2026-12-04-h200)."""
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    assert is_oom(cublas) and is_oom(_raised(RuntimeError("agent step failed"), cublas))
    assert is_oom(torch.AcceleratorError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert error_line(cublas) == "RuntimeError: " + str(cublas)
    assert not is_oom(RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"))
    assert not is_oom(RuntimeError("step failed: CUDA error: CUBLAS_STATUS_ALLOC_FAILED"))  # quoted, not raised
    assert not is_oom(NotImplementedError("CUDA error: out of memory"))  # another type's message
    assert not is_oom(ModuleNotFoundError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED"))


def test_text_that_quotes_an_oom_is_not_one():
    assert not is_oom(ModuleNotFoundError(QUOTES_OOM))
    assert not is_oom(RuntimeError("CUDA out of memory"))  # a type decides, not a message
    assert not is_oom(ConcurrencyLimitExceeded("concurrency_limit", "out of memory? no: 65 >= 64"))
    assert not is_oom(ReportedFailure(False, "ModuleNotFoundError: OutOfMemoryError", "tb"))
    # an error raised while handling an OOM is that error (implicit context is not a cause)
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise ModuleNotFoundError("No module named 'x'")
    except ModuleNotFoundError as exc:
        assert not is_oom(exc)


def test_error_line_names_the_oom_or_the_innermost_cause():
    cuda = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB.\nmore")
    assert error_line(_raised(RuntimeError("wrapper\nsecond"), cuda)) == \
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 32.00 MiB."
    assert error_line(_raised(RuntimeError("outer"), KeyError("inner"))) == "KeyError: 'inner'"
    assert error_line(ReportedFailure(False, "ModuleNotFoundError: No module named 'x'", "tb")) == \
        "ModuleNotFoundError: No module named 'x'"
    assert len(error_line(ValueError("x" * 2000))) == 500


def test_traceback_keeps_the_remote_part():
    exc = _raised(RuntimeError("driver"), ReportedFailure(True, "OutOfMemoryError: x", "REMOTE TRACEBACK"))
    text = traceback_text(exc)
    assert text.startswith("REMOTE TRACEBACK") and "RuntimeError: driver" in text


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from djinn.runners.ray_backends import ensure_ray

    started = ensure_ray(None, 2)
    yield ray
    if started:
        ray.shutdown()


def test_oom_raised_in_an_actor_and_wrapped_by_ray(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Raiser:
        def oom(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def missing_module(self):
            raise ModuleNotFoundError(QUOTES_OOM)

    actor = Raiser.remote()
    with pytest.raises(Exception) as wrapped:
        ray.get(actor.oom.remote())
    assert type(wrapped.value).__name__.startswith("RayTaskError")
    assert is_oom(wrapped.value)
    assert error_line(wrapped.value) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    with pytest.raises(Exception) as other:
        ray.get(actor.missing_module.remote())
    assert not is_oom(other.value)
    assert error_line(other.value).startswith("ModuleNotFoundError: No module named 'fancy_allocator'")
    assert "raise ModuleNotFoundError" in traceback_text(other.value)  # the actor's own frames


def test_keepalive_actor_reports_the_emulated_oom_as_a_flag(ray_local):
    from djinn.runners.hf_agent import ModelRef
    from djinn.runners.ray_backends import RayKeepAliveBackend

    ref = ModelRef("sshleifer/tiny-gpt2", "synthetic", "float32", "cpu")
    backend = RayKeepAliveBackend(ref, 0.01, device_memory_bytes=1 << 20)  # about two tiny-gpt2 copies
    backend.setup(2)
    backend.teardown()
    with pytest.raises(ReportedFailure) as failure:
        backend.setup(4)
    assert failure.value.oom and failure.value.line.startswith("OutOfMemoryError: emulated device out of memory")
    assert "_hold" in failure.value.traceback_text  # the actor's traceback came back whole
