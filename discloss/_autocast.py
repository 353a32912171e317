"""What ``discloss::forward`` does under ``torch.autocast``: run in float32.

torch runs its own losses in float32 under autocast (they are on autocast's
float32 lists for CUDA and CPU), because a loss is a reduction whose result
and gradients need float32 range and precision. discloss does the same:
under autocast for the embeddings' device, float16 and bfloat16 embeddings
are cast to float32 before the op runs, so the terms are float32, and
autograd casts the gradient back to the embeddings' dtype. float32 and
float64 embeddings are left as they are.

The price is one float32 copy of the embeddings (kept for backward) and a
pass to make it. Outside autocast, or inside ``torch.autocast(...,
enabled=False)``, half-precision embeddings are read as they are (float32
accumulation) and the terms come back in their dtype.

The kernel is registered on the op, so ``torch.ops.discloss.forward``, the
wrapper and the Chainer drop-in all behave alike; it forwards every argument
after the embeddings unchanged, whatever the schema holds.
"""

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)

_library = torch.library.Library("discloss", "IMPL")


def _forward_in_float32(device_type: str):
    def forward_autocast(embeddings, *args, **kwargs):
        if embeddings.dtype in _LOW_PRECISION:
            embeddings = embeddings.float()
        # Leaving autocast removes its dispatch key, so the call below reaches
        # autograd and the device kernel instead of coming back here.
        with torch.autocast(device_type=device_type, enabled=False):
            return torch.ops.discloss.forward(embeddings, *args, **kwargs)

    return forward_autocast


_library.impl("forward", _forward_in_float32("cpu"), "AutocastCPU")
_library.impl("forward", _forward_in_float32("cuda"), "AutocastCUDA")
