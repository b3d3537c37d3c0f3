"""Megatron-Core on this process's GPU, world size 1 (a fixture shared by the tests in tests/gpu)."""
import pytest
import torch


@pytest.fixture(scope="module")
def megatron_gpu():
    """The GPU code path: rf_megatron.device picks cuda:0, NCCL, Megatron's TP1 x PP1 groups."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from conftest import free_port
    from rf_megatron.device import init_process_group, select_device

    assert select_device().type == "cuda"
    if not dist.is_initialized():
        init_process_group(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    yield torch.device("cuda", 0)  # (on the simulated GPU too: its tensors are tagged cuda:0)
    parallel_state.destroy_model_parallel()
