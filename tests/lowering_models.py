"""Small nn.Modules the lowering tests share (``tests/test_lowering.py``,
``tests/client/test_lowering_routes.py``): each exercises one way weights or writes reach a graph."""

import torch
from torch import nn


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.register_buffer("shift", torch.linspace(-1, 1, 16))
        self.register_buffer("scale", torch.full((16,), 0.5), persistent=False)
        self.offset = torch.tensor(3.0)  # a plain tensor attribute: a lifted constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x)) * self.scale + self.shift + self.offset


class MutatesInput(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y.add_(1)
        return x * 2 + y
