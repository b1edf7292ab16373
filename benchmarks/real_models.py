"""Real-model zoo for ``benchmarks/bench_models.py`` and the tests: small configurations of
models people run (HF transformers, timm, torchvision), built from configs with seeded random
weights. Nothing is downloaded: no model hub is reachable on the machines this runs on.

Each ``ModelCase`` builds a ``Built`` on a device: the module, a function from a step number to
the positional inputs of that step (fresh random values per step, same shapes, on the device),
one to the keyword inputs, and ``output`` to pick the tensor to compare from what the module
returns. Weights are created on the CPU under ``torch.manual_seed(MODEL_SEED)`` and then moved,
so two builds (on any device) hold identical weights; step inputs come from a generator seeded
by the step, so every path of a benchmark sees the same data.

Families:

- ``hf-causal-lm``: ``AutoModelForCausalLM.from_config``, called as users call it,
  ``model(input_ids, attention_mask=mask)`` with an all-ones mask (HF's masking code with a
  mask is the interesting path); output ``.logits``.
- ``hf-encoder``: ``AutoModel.from_config`` (bert, roberta) with ``attention_mask``; output
  ``.last_hidden_state``.
- ``hf-vision``: HF ViT on ``pixel_values``; output ``.last_hidden_state``.
- ``hf-breadth``: more transformers architectures, each unlike the ones above in how it
  attends or normalizes: gemma2 (logit soft-capping, sliding-window layers), GPT-NeoX (parallel
  residual, partial rotary), Falcon (multi-query attention), BLOOM (ALiBi), DeBERTa-v2
  (disentangled relative attention), DistilBERT; called like their families above.
- ``timm``, ``torchvision``: image classifiers on 64x64 images; output the logits tensor.
- ``hf-generate``: HF llama; the benchmark calls ``module.generate(*inputs(step),
  **kwargs(step))`` (static cache, greedy, ``max_new_tokens`` in the kwargs, HF's own
  auto-compile off so that eager is eager); output the generated token ids.
  ``llama-generate``: ``cache_implementation="static"`` (the cache is created lazily, inside
  the first forward). ``llama-generate-cache``: a ``StaticCache`` made and initialized at build
  time, passed as ``past_key_values``; a ``past_key_values`` in the kwargs must be ``reset()``
  by the caller before each ``generate`` call.
- ``hf-train``: HF llama causal LM in train mode (no dropout in the config); one step is
  ``output(module(*inputs(step), **kwargs(step)))`` (the loss, ``labels`` = the input ids),
  backward, then ``torch.optim.SGD(lr=TRAIN_LR)``.

Inference modules are in ``.eval()``. Everything is float32.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["Built", "CASES", "ModelCase", "MODEL_SEED", "TRAIN_LR", "cases", "missing_library", "step_generator"]

MODEL_SEED = 0
TRAIN_LR = 1e-2
FAMILIES = ("hf-causal-lm", "hf-encoder", "hf-vision", "timm", "torchvision", "hf-generate", "hf-train",
            "hf-breadth")

# Shapes: small, so that a case builds in about a second on a CPU and per-call overhead (what
# graphs remove) is a visible part of a call on a GPU.
LM_BATCH, LM_TOKENS = 2, 32
LM_VOCAB = 1024
IMAGE_BATCH, IMAGE_SIZE = 2, 64
GENERATE_PROMPT, GENERATE_NEW_TOKENS = 8, 16


def _no_kwargs(step: int) -> dict:
    return {}


def _itself(out: Any) -> torch.Tensor:
    return out


@dataclass
class Built:
    module: torch.nn.Module
    inputs: Callable[[int], tuple]  # step -> positional inputs (fresh random values per step, same shapes, on the device)
    kwargs: Callable[[int], dict] = _no_kwargs
    output: Callable[[Any], torch.Tensor] = _itself  # the tensor to compare


@dataclass(frozen=True)
class ModelCase:
    name: str
    family: str  # "hf-causal-lm", "hf-encoder", "hf-vision", "timm", "torchvision", "hf-generate", "hf-train"
    library: str  # "transformers" | "timm" | "torchvision"
    build: Callable[[torch.device], "Built"]


# ---------------------------------------------------------------------------------------------
# Helpers


def step_generator(step: int, salt: int = 0) -> torch.Generator:
    """A CPU generator for a step's inputs: the same step gives the same values on every path."""
    return torch.Generator().manual_seed(1_000_003 * (salt + 1) + step)


def _seeded(make: Callable[[], torch.nn.Module], device: torch.device, train: bool = False) -> torch.nn.Module:
    torch.manual_seed(MODEL_SEED)
    module = make().to(dtype=torch.float32)
    module = module.to(device)
    return module.train() if train else module.eval()


def _token_ids(device: torch.device, step: int, batch: int, tokens: int, vocab: int) -> torch.Tensor:
    # Ids from 3 up: 0-2 are the configs' pad/bos/eos.
    return torch.randint(3, vocab, (batch, tokens), generator=step_generator(step)).to(device)


def _images(device: torch.device, step: int, batch: int = IMAGE_BATCH, size: int = IMAGE_SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=step_generator(step, salt=1)).to(device)


_SPECIAL_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


# ---------------------------------------------------------------------------------------------
# transformers


def _hf_config(model_type: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **overrides)


def _causal_lm_config(model_type: str) -> Any:
    common = dict(vocab_size=LM_VOCAB, **_SPECIAL_TOKENS)
    if model_type == "gpt2":
        return _hf_config("gpt2", n_layer=2, n_embd=128, n_head=4, n_positions=128, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if model_type == "opt":
        return _hf_config("opt", num_hidden_layers=2, hidden_size=128, ffn_dim=256, num_attention_heads=4,
                          word_embed_proj_dim=128, max_position_embeddings=128, dropout=0.0,
                          attention_dropout=0.0, **common)
    if model_type == "phi":
        return _hf_config("phi", num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          max_position_embeddings=128, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0,
                          **common)
    if model_type == "gemma2":
        return _hf_config("gemma2", num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, max_position_embeddings=128, sliding_window=16,
                          attention_dropout=0.0, **common)
    if model_type == "gpt_neox":
        return _hf_config("gpt_neox", num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                          num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.25,
                          use_parallel_residual=True, attention_dropout=0.0, hidden_dropout=0.0, **common)
    if model_type == "falcon":
        return _hf_config("falcon", num_hidden_layers=2, hidden_size=128, num_attention_heads=4, multi_query=True,
                          new_decoder_architecture=False, attention_dropout=0.0, hidden_dropout=0.0, **common)
    if model_type == "bloom":
        return _hf_config("bloom", n_layer=2, hidden_size=128, n_head=4, attention_dropout=0.0, hidden_dropout=0.0,
                          **common)
    # llama-style: llama, mistral, qwen2
    return _hf_config(model_type, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attention_dropout=0.0, **common)


def _causal_lm(model_type: str) -> Callable[[torch.device], Built]:
    def build(device: torch.device) -> Built:
        from transformers import AutoModelForCausalLM

        config = _causal_lm_config(model_type)
        module = _seeded(lambda: AutoModelForCausalLM.from_config(config), device)
        return _with_token_inputs(module, device, output=lambda out: out.logits)

    return build


def _with_token_inputs(module: torch.nn.Module, device: torch.device, output: Callable[[Any], torch.Tensor]) -> Built:
    """A text model called as users call it: token ids and an all-ones attention mask."""
    return Built(
        module,
        inputs=lambda step: (_token_ids(device, step, LM_BATCH, LM_TOKENS, LM_VOCAB),),
        kwargs=lambda step: {"attention_mask": torch.ones(LM_BATCH, LM_TOKENS, dtype=torch.long, device=device)},
        output=output,
    )


def _encoder_config(model_type: str) -> Any:
    if model_type == "distilbert":
        return _hf_config("distilbert", n_layers=2, dim=128, hidden_dim=256, n_heads=4, max_position_embeddings=128,
                          vocab_size=LM_VOCAB, dropout=0.0, attention_dropout=0.0, pad_token_id=0)
    return _hf_config(model_type, num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                      num_attention_heads=4, max_position_embeddings=128, vocab_size=LM_VOCAB,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)


def _encoder(model_type: str) -> Callable[[torch.device], Built]:
    def build(device: torch.device) -> Built:
        from transformers import AutoModel

        config = _encoder_config(model_type)
        # Only BERT-style models have a pooler to leave out.
        options = {"add_pooling_layer": False} if model_type in ("bert", "roberta") else {}
        module = _seeded(lambda: AutoModel.from_config(config, **options), device)
        return _with_token_inputs(module, device, output=lambda out: out.last_hidden_state)

    return build


def _hf_vit(device: torch.device) -> Built:
    from transformers import AutoModel

    config = _hf_config("vit", image_size=IMAGE_SIZE, patch_size=16, num_channels=3, num_hidden_layers=2,
                        hidden_size=128, intermediate_size=256, num_attention_heads=4, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    module = _seeded(lambda: AutoModel.from_config(config, add_pooling_layer=False), device)
    return Built(module, inputs=lambda step: (_images(device, step),), output=lambda out: out.last_hidden_state)


def _hf_generate(device: torch.device) -> Built:
    from transformers import AutoModelForCausalLM

    config = _causal_lm_config("llama")
    config.eos_token_id = None  # never stop early: every run decodes exactly max_new_tokens
    module = _seeded(lambda: AutoModelForCausalLM.from_config(config), device)
    module.generation_config.eos_token_id = None
    module.generation_config.pad_token_id = 0
    return Built(
        module,
        inputs=lambda step: (_token_ids(device, step, LM_BATCH, GENERATE_PROMPT, LM_VOCAB),),
        kwargs=lambda step: {
            "attention_mask": torch.ones(LM_BATCH, GENERATE_PROMPT, dtype=torch.long, device=device),
            "cache_implementation": "static", "max_new_tokens": GENERATE_NEW_TOKENS, "do_sample": False,
            # HF compiles forward itself on CUDA with a static cache; off, so that eager is eager
            # and each path's own torch.compile of forward is the only one.
            "disable_compile": True,
        },
        output=lambda out: out,
    )


def _hf_generate_with_cache(device: torch.device) -> Built:
    """As ``_hf_generate``, with a ``StaticCache`` made and initialized up front and passed as
    ``past_key_values`` (HF's other documented way): its tensors are created outside any compiled
    region, so HF marks them static (``torch._dynamo.mark_static_address``). With
    ``cache_implementation="static"`` the cache is created lazily inside the first (compiled)
    forward, where HF cannot mark it. The caller resets the cache before each ``generate``."""
    from transformers import StaticCache

    built = _hf_generate(device)
    config = built.module.config
    cache = StaticCache(config=config, max_cache_len=GENERATE_PROMPT + GENERATE_NEW_TOKENS)
    cache.early_initialization(LM_BATCH, config.num_key_value_heads, config.hidden_size // config.num_attention_heads,
                               torch.float32, device)
    base_kwargs = built.kwargs

    def kwargs(step: int) -> dict:
        out = {k: v for k, v in base_kwargs(step).items() if k != "cache_implementation"}
        out["past_key_values"] = cache
        return out

    built.kwargs = kwargs
    return built


def _hf_train(device: torch.device) -> Built:
    from transformers import AutoModelForCausalLM

    config = _causal_lm_config("llama")
    module = _seeded(lambda: AutoModelForCausalLM.from_config(config), device, train=True)

    def ids(step: int) -> torch.Tensor:
        return _token_ids(device, step, LM_BATCH, LM_TOKENS, LM_VOCAB)

    return Built(module, inputs=lambda step: (ids(step),), kwargs=lambda step: {"labels": ids(step)},
                 output=lambda out: out.loss)


# ---------------------------------------------------------------------------------------------
# timm and torchvision


def _timm(name: str, **options: Any) -> Callable[[torch.device], Built]:
    def build(device: torch.device) -> Built:
        import timm

        module = _seeded(lambda: timm.create_model(name, pretrained=False, num_classes=10, **options), device)
        return Built(module, inputs=lambda step: (_images(device, step),))

    return build


def _torchvision(name: str) -> Callable[[torch.device], Built]:
    def build(device: torch.device) -> Built:
        from torchvision import models

        module = _seeded(lambda: getattr(models, name)(weights=None, num_classes=10), device)
        return Built(module, inputs=lambda step: (_images(device, step),))

    return build


# ---------------------------------------------------------------------------------------------
# The zoo


def _case(name: str, family: str, library: str, build: Callable[[torch.device], Built]) -> tuple[str, ModelCase]:
    return name, ModelCase(name, family, library, build)


CASES: dict[str, ModelCase] = dict([
    _case("gpt2", "hf-causal-lm", "transformers", _causal_lm("gpt2")),
    _case("llama", "hf-causal-lm", "transformers", _causal_lm("llama")),
    _case("mistral", "hf-causal-lm", "transformers", _causal_lm("mistral")),
    _case("qwen2", "hf-causal-lm", "transformers", _causal_lm("qwen2")),
    _case("phi", "hf-causal-lm", "transformers", _causal_lm("phi")),
    _case("opt", "hf-causal-lm", "transformers", _causal_lm("opt")),
    _case("bert", "hf-encoder", "transformers", _encoder("bert")),
    _case("roberta", "hf-encoder", "transformers", _encoder("roberta")),
    _case("vit-hf", "hf-vision", "transformers", _hf_vit),
    _case("resnet18-timm", "timm", "timm", _timm("resnet18")),
    _case("vit-tiny-timm", "timm", "timm", _timm("vit_tiny_patch16_224", img_size=IMAGE_SIZE)),
    _case("convnext-atto-timm", "timm", "timm", _timm("convnext_atto")),
    _case("mobilenet-v3-small-tv", "torchvision", "torchvision", _torchvision("mobilenet_v3_small")),
    _case("gemma2", "hf-breadth", "transformers", _causal_lm("gemma2")),
    _case("gpt-neox", "hf-breadth", "transformers", _causal_lm("gpt_neox")),
    _case("falcon", "hf-breadth", "transformers", _causal_lm("falcon")),
    _case("bloom", "hf-breadth", "transformers", _causal_lm("bloom")),
    _case("deberta-v2", "hf-breadth", "transformers", _encoder("deberta-v2")),
    _case("distilbert", "hf-breadth", "transformers", _encoder("distilbert")),
    _case("llama-generate", "hf-generate", "transformers", _hf_generate),
    _case("llama-generate-cache", "hf-generate", "transformers", _hf_generate_with_cache),
    _case("llama-train", "hf-train", "transformers", _hf_train),
])


def missing_library(case: ModelCase) -> Optional[str]:
    """None when ``case``'s library imports here, else why not (e.g. "timm is not installed")."""
    if importlib.util.find_spec(case.library) is None:
        return f"{case.library} is not installed"
    try:
        importlib.import_module(case.library)
    except Exception as exc:  # installed but broken (e.g. a torchvision built for another torch)
        return f"{case.library} does not import: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def cases(families: Optional[Iterable[str]] = None, names: Optional[Iterable[str]] = None) -> list[ModelCase]:
    """The cases of ``families`` and/or ``names`` (both None: all), in the zoo's order; an
    unknown name or family raises ``KeyError``."""
    families = None if families is None else list(families)
    names = None if names is None else list(names)
    for family in families or ():
        if family not in FAMILIES:
            raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    for name in names or ():
        if name not in CASES:
            raise KeyError(f"unknown model {name!r}; known: {', '.join(CASES)}")
    return [case for case in CASES.values()
            if (families is None or case.family in families) and (names is None or case.name in names)]

