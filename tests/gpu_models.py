"""Small nn.Modules the GPU daemon tests share (``tests/gpu/test_daemon_gpu.py``,
``tests/gpu/test_stream_order_gpu.py``)."""

import torch


class Deep(torch.nn.Module):
    """Enough GPU work a step (~1 ms) that reading the outputs before the device finished
    would see the previous step's values."""

    def __init__(self, seed: int = 3) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(16))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return (x,)
