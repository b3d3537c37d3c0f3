"""Train several model variants briefly with the real Trainer, in ONE torchrun launch.

    torchrun --nproc-per-node 4 tests/dist/hf_train_variants.py OUT '{"vanilla": {"model.variant": "vanilla"}, ...}' \
        parallel.tensor_parallel=2 parallel.pipeline_parallel=2 data.paths=[...] ...

For every variant: RunConfig = tiny_cpu preset + the shared overrides + the variant's own +
checkpoint.dir=OUT/<variant>/ckpt, logging.dir=OUT/<variant>/log. Before training, lambdas, the
learnable_plus logits/scale and the norm weights are set to deterministic non-trivial values (the
same on every rank), so that a swapped lambda or norm cannot hide behind the default 0.5 / 1.0.
"""
import json
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402


def _perturb(trainer) -> None:
    from rf_megatron.model import unwrap
    from global_params import named_global_parameters

    with torch.no_grad():
        for chunk in trainer.model:
            for name, param in named_global_parameters(unwrap(chunk)):
                if "value_residual" in name or name.endswith("norm.weight") or name.endswith("layer_norm_weight"):
                    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                    param.copy_(0.5 + torch.rand(param.shape, generator=g))


def main() -> int:
    out, variants, shared = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
    from rf_megatron.run_config import load_run_config
    from rf_megatron.engines.megatron import Trainer

    trainer = None
    for name, extra in variants.items():
        run = os.path.join(out, name)
        overrides = shared + [f"{k}={v}" for k, v in extra.items()] + [
            f"checkpoint.dir={run}/ckpt", f"logging.dir={run}/log", f"name={name}"]
        trainer = Trainer(load_run_config("tiny_cpu", overrides))
        _perturb(trainer)
        trainer.train()
    if trainer is not None:
        trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
