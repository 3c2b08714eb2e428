"""Write the DeepSpeed ZeRO stage 1, 2 and 3 samples in tests/formats/deepspeed_samples/.

DeepSpeed is not a ckptkit dependency (its CPU build compiles an op on first use, ~5 minutes);
run this once, in a separate environment that has torch and deepspeed:

    DS_BUILD_OPS=0 pip install deepspeed   # in that environment
    python scripts/make_deepspeed_samples.py

Each stage is a real 2-rank data-parallel job on CPU (gloo on 127.0.0.1) that trains a small
model for two steps and calls ``engine.save_checkpoint``.  Beside each checkpoint,
``expected_fp32.safetensors`` holds what DeepSpeed's own ``zero_to_fp32`` consolidation
(``get_fp32_state_dict_from_zero_checkpoint``) gives, for the tests to compare against.
The generated ``zero_to_fp32.py`` helper scripts are not kept (DeepSpeed's code, not data).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

OUT = Path(__file__).resolve().parent.parent / "tests" / "formats" / "deepspeed_samples"


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 6), torch.nn.Linear(6, 12),
                               torch.nn.LayerNorm(12), torch.nn.Linear(12, 3))


def worker(rank: int, world: int, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29650 + stage), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
              "zero_allow_untested_optimizer": True}
    deepspeed.init_distributed(dist_backend="gloo")
    net = model()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=config)
    generator = torch.Generator().manual_seed(rank)
    for _ in range(2):
        tokens = torch.randint(0, 10, (2, 4), generator=generator)
        loss = engine(tokens).pow(2).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(out, tag="global_step2", client_state={"epoch": 1})


def main() -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    for stage in (1, 2, 3):
        target = OUT / f"zero{stage}"
        shutil.rmtree(target, ignore_errors=True)
        mp.spawn(worker, args=(2, stage, str(target)), nprocs=2, join=True)
        for helper in ("zero_to_fp32.py", "zero_to_torch.py"):
            (target / helper).unlink(missing_ok=True)
        state = get_fp32_state_dict_from_zero_checkpoint(str(target), tag="global_step2")
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(target / "expected_fp32.safetensors"))
        print(f"wrote {target}", file=sys.stderr)


if __name__ == "__main__":
    main()
