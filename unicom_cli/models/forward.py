"""uint8 pixel batches → embeddings on the model's device: the one forward step of every embedder."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from unicom_cli.models.factory import LoadedModel


class PixelForward:
    """uint8 NCHW batch → normalised float on the model's device → fp32 embeddings on the CPU.

    Normalising on the device keeps the host→device copy 4x smaller; the arithmetic is the
    one of torchvision's ToTensor + Normalize, so results equal the reference transform.
    Used by ``unicom embed`` and by the query embedder of an index, so a query is embedded
    exactly as the collection was.
    """

    def __init__(self, loaded: "LoadedModel") -> None:
        import torch

        self.model = loaded.model
        self.device = next(self.model.parameters()).device
        self.cuda = self.device.type == "cuda"
        self.mean = torch.as_tensor(loaded.spec.mean, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        self.std = torch.as_tensor(loaded.spec.std, dtype=torch.float32, device=self.device).view(-1, 1, 1)

    def __call__(self, pixels: "torch.Tensor") -> "torch.Tensor":
        import torch

        x = pixels.to(self.device, non_blocking=self.cuda)
        x = x.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)  # one float copy
        if self.cuda:  # cuDNN's NHWC kernels for the patch convolution
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu()
