"""FP8 training: the transformer blocks' matmuls in float8 with per-tensor dynamic scaling (torchao's float8
training: e4m3 weights and activations, e5m2 gradients), on GPUs with FP8 tensor cores. The embedding, lm_head,
norms, attention and optimizers stay as they are; checkpoints keep the plain GPT's format."""

import torch

from vibechat.common import VibechatError


def enable_fp8(model: torch.nn.Module) -> None:
    """Swap every nn.Linear of model.transformer.h for torchao's Float8Linear (same weights), in place.

    Call before torch.compile and before setting up the optimizers. There is no fallback: on a CPU or a GPU
    without FP8 this is an error.
    """
    device = model.get_device()
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        raise VibechatError(f"--fp8 needs an NVIDIA GPU with FP8 matmuls (compute capability 8.9+: Ada, Hopper); "
                            f"this run is on {where}: leave --fp8 off")
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError as e:
        raise VibechatError(f"--fp8 needs torchao's float8 training ({e}): pip install 'vibechat[fp8]'") from e
    convert_to_float8_training(model.transformer.h)
