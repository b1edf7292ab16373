"""The models cgtree's benchmarks run, built deterministically, and a factory by name.

The two models are the ones measured in the project notes (shared/NOTES.md, section 2), so
that figures from different runs and machines compare:

- ``tiny``:  2 x (Linear(64, 64) + GELU), batch 16. Launch-bound: a handful of microsecond
  kernels, so per-call host overhead dominates; it is the model that shows what the graph
  machinery itself costs.
- ``mlp24``: 24 x (Linear(512, 512) + GELU), batch 16. 48 kernels a call: eager pays 48
  launches, a graph replays them as one.

Every model is built on the CPU in float32 under a fixed seed and only then moved, so the
weights are the same on every device and in every run. Inputs come from their own seeded
generator, never from the global RNG, so drawing an input does not disturb anything else.

Each model is exposed two ways (see ``BenchModel``): as the ``nn.Module`` (for eager, for
``torch.compile`` and for a hand-written ``torch.cuda.CUDAGraph``) and as a flat function of
``(*params, *activations)`` (for tree managers, which take parameters as *static inputs*, used
in place, and activations as inputs copied into the graph's buffers on each replay, the way
cgtree's daemon hands weights to ``TreeManager.cudagraphify``).

A model that needs several activation inputs (the GPT-style decoder step planned for a later
issue: token ids, position, KV cache) registers a ``ModelSpec`` whose ``make_inputs`` returns
several tensors; nothing else here assumes a single input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

# The seed every benchmark uses unless told otherwise; a fixed default keeps runs comparable.
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model.

    ``build_module`` is called on the CPU, in float32, with the global RNG already seeded; it
    must not draw from any other source of randomness. ``make_inputs(generator, device, dtype)``
    returns the activation inputs for one call (batch size included), drawn from ``generator``.
    """

    name: str
    description: str
    batch: int
    build_module: Callable[[], nn.Module]
    make_inputs: Callable[[torch.Generator, torch.device, torch.dtype], tuple[torch.Tensor, ...]]


@dataclass
class BenchModel:
    """One built model: the module, its parameters as a flat tuple, and its example inputs.

    ``static_tensors`` holds the parameters, then the buffers, in ``named_parameters`` /
    ``named_buffers`` order; ``forward_flat(*static_tensors, *inputs)`` computes the same
    as ``module(*inputs)``. ``inputs`` are the example activation inputs (seeded).
    """

    spec: ModelSpec
    module: nn.Module
    static_names: tuple[str, ...]
    static_tensors: tuple[torch.Tensor, ...]
    inputs: tuple[torch.Tensor, ...]
    device: torch.device
    dtype: torch.dtype
    seed: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_static(self) -> int:
        """How many leading arguments of ``forward_flat`` are static (parameters, buffers)."""
        return len(self.static_tensors)

    def forward_flat(self, *tensors: torch.Tensor) -> torch.Tensor:
        """``module(*activations)`` with the module's tensors replaced by the leading arguments.

        A tree manager records this function with the leading ``num_static`` arguments marked
        static: it then checks their addresses instead of copying them on every replay.
        ``torch.func.functional_call`` substitutes them for the module's own tensors for the
        duration of the call, so the same code path serves every model.
        """
        count = len(self.static_names)
        if len(tensors) < count:
            raise TypeError(f"forward_flat needs at least {count} tensors, got {len(tensors)}")
        substituted = dict(zip(self.static_names, tensors[:count], strict=True))
        return torch.func.functional_call(self.module, substituted, tuple(tensors[count:]))

    def fresh_inputs(self, seed: int) -> tuple[torch.Tensor, ...]:
        """New activation inputs of the same shapes, from ``seed`` (for correctness checks)."""
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return self.spec.make_inputs(generator, self.device, self.dtype)


def _mlp(depth: int, width: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers)


def _dense_input(batch: int, width: int):
    def make_inputs(
        generator: torch.Generator, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        # Drawn on the CPU from a CPU generator, then moved: the same numbers on every device.
        x = torch.randn(batch, width, generator=generator, dtype=torch.float32)
        return (x.to(device=device, dtype=dtype),)

    return make_inputs


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add a model to the factory; names are unique."""
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


register(
    ModelSpec(
        name="tiny",
        description="2 x (Linear(64) + GELU), batch 16",
        batch=16,
        build_module=lambda: _mlp(depth=2, width=64),
        make_inputs=_dense_input(batch=16, width=64),
    )
)
register(
    ModelSpec(
        name="mlp24",
        description="24 x (Linear(512) + GELU), batch 16",
        batch=16,
        build_module=lambda: _mlp(depth=24, width=512),
        make_inputs=_dense_input(batch=16, width=512),
    )
)


def model_names() -> list[str]:
    return list(MODELS)


def build_model(
    name: str,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = DEFAULT_SEED,
) -> BenchModel:
    """Build model ``name`` on ``device``: same weights and inputs for the same ``seed``.

    The module is put in eval mode; gradients are left to the caller (benchmarks run under
    ``torch.no_grad()``).
    """
    try:
        spec = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None
    device = torch.device(device)
    # fork_rng restores the caller's CPU RNG afterwards, so building a model has no side effect
    # on anything else that draws random numbers.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.build_module()
    module = module.to(device=device, dtype=dtype).eval()
    named = list(module.named_parameters()) + list(module.named_buffers())
    inputs = spec.make_inputs(torch.Generator(device="cpu").manual_seed(seed + 1), device, dtype)
    return BenchModel(
        spec=spec,
        module=module,
        static_names=tuple(n for n, _ in named),
        static_tensors=tuple(t for _, t in named),
        inputs=inputs,
        device=device,
        dtype=dtype,
        seed=seed,
    )
