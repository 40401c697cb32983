"""Real third-party-style models on a real (offline) text corpus, small enough for CPU tests.

Everything here is seeded, downloads nothing and needs no internet:

- the corpus is the Python standard library's own source (a few fixed ``.py`` files), byte-level (vocab 128);
- :class:`NanoGPT`: a nanoGPT-style causal transformer on ``F.scaled_dot_product_attention(..., is_causal=True)``;
- :class:`HFGPT2`: ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` (never ``from_pretrained``), with
  ``attn_implementation`` "eager" or "sdpa", its loss from ``labels=``;
- :class:`DemoTransformer`: Lightning's own ``lightning.pytorch.demos.LightningTransformer`` fed with this corpus
  (its WikiText2 dataset downloads, so it is not used);
- :class:`TinyGAN`: manual optimization with two optimizers (generator and discriminator on 2-D points);
- :class:`TinyMLP`: a small classifier for fast crosses;
- :func:`make_trainer`: a quiet, seeded CPU Trainer.

Batch formats (``data=`` of the language models): ``"tuple"`` (``(input, target)`` windows, target shifted by one,
map-style DataLoader), ``"iterable"`` (the same windows from an ``IterableDataset``), ``"dict"``
(``{"input_ids": ..., "labels": ...}`` with ``labels == input_ids``: the model shifts, as Hugging Face does).

Other helpers import this file; keep its names stable (add, do not rename).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

VOCAB_SIZE = 128
BLOCK_SIZE = 32
#: Fixed standard-library files (present in every CPython 3.10+): the corpus is the same on every machine with the
#: same Python version. A missing file is skipped; at least one must exist.
CORPUS_FILES = ("textwrap.py", "bisect.py", "heapq.py", "colorsys.py", "keyword.py", "this.py", "fnmatch.py")
DATA_FORMATS = ("tuple", "iterable", "dict")


# --------------------------------------------------------------------------------------------------- corpus


def corpus_tokens(max_chars: int = 40_000) -> torch.Tensor:
    """The stdlib corpus as a 1-D ``int64`` tensor of byte tokens in ``[0, 128)`` (non-ASCII bytes become ``?``)."""
    root = Path(os.path.dirname(os.__file__))
    chunks = [(root / name).read_bytes() for name in CORPUS_FILES if (root / name).is_file()]
    if not chunks:
        raise FileNotFoundError(f"none of {CORPUS_FILES} found under {root}")
    data = b"\n".join(chunks)[:max_chars]
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)
    return torch.where(tokens < VOCAB_SIZE, tokens, torch.full_like(tokens, ord("?")))


def decode(tokens: torch.Tensor) -> str:
    """Byte tokens back to text (for eyeballing samples)."""
    return bytes(int(t) for t in tokens.flatten()).decode("ascii", errors="replace")


def lm_windows(block_size: int = BLOCK_SIZE, num_windows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping ``(input, target)`` windows of ``block_size`` tokens, target = input shifted by one."""
    tokens = corpus_tokens()
    n = min(num_windows, (len(tokens) - 1) // block_size)
    x = tokens[: n * block_size].view(n, block_size)
    y = tokens[1 : n * block_size + 1].view(n, block_size)
    return x.clone(), y.clone()


def lm_dataset(block_size: int = BLOCK_SIZE, num_windows: int = 256) -> TensorDataset:
    """Map-style dataset of ``(input, target)`` windows."""
    return TensorDataset(*lm_windows(block_size, num_windows))


class LMIterable(IterableDataset):
    """The same windows as :func:`lm_dataset`, from an ``IterableDataset`` (no ``__len__``, order fixed)."""

    def __init__(self, block_size: int = BLOCK_SIZE, num_windows: int = 256) -> None:
        super().__init__()
        self.x, self.y = lm_windows(block_size, num_windows)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        yield from zip(self.x, self.y, strict=True)


class LMDictDataset(Dataset):
    """Hugging Face style items ``{"input_ids": w, "labels": w}`` (the model shifts the labels itself)."""

    def __init__(self, block_size: int = BLOCK_SIZE, num_windows: int = 256) -> None:
        super().__init__()
        self.x, _ = lm_windows(block_size, num_windows)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[index], "labels": self.x[index].clone()}


def lm_dataloader(
    data: str = "tuple",
    batch_size: int = 8,
    block_size: int = BLOCK_SIZE,
    num_windows: int = 256,
    shuffle: bool = True,
) -> DataLoader:
    """A DataLoader over the corpus in one of :data:`DATA_FORMATS` (``"iterable"`` never shuffles)."""
    if data == "tuple":
        return DataLoader(lm_dataset(block_size, num_windows), batch_size=batch_size, shuffle=shuffle)
    if data == "iterable":
        return DataLoader(LMIterable(block_size, num_windows), batch_size=batch_size)
    if data == "dict":
        return DataLoader(LMDictDataset(block_size, num_windows), batch_size=batch_size, shuffle=shuffle)
    raise ValueError(f"`data` must be one of {DATA_FORMATS}, got {data!r}.")


def split_lm_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``(inputs, labels, shifted)``: tuple batches carry shifted targets, dict batches carry ``labels == inputs``."""
    if isinstance(batch, dict):
        return batch["input_ids"], batch["labels"], False
    inputs, targets = batch
    return inputs, targets, True


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, shifted: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (float32 even when the logits are half precision)."""
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1))


def lm_loss_fn(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """A ``loss_fn`` for the monitors that works for every language model here (calls ``module.lm_loss``)."""
    return module.lm_loss(batch)


def _warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> dict[str, Any]:
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# --------------------------------------------------------------------------------------------------- nanoGPT


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused qkv projection, ``F.scaled_dot_product_attention(is_causal=True)``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The network of :class:`NanoGPT` (token + position embeddings, pre-LN blocks, tied head)."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, dropout: float):
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class NanoGPT(pl.LightningModule):
    """nanoGPT-style causal LM on the stdlib corpus; AdamW, optional linear warm-up and dropout.

    Args:
        lr: AdamW learning rate (a large one, e.g. 0.3, makes an unhealthy run).
        warmup_steps: linear LR warm-up over this many optimizer steps (0: constant LR).
        dropout: in embeddings, attention (SDPA ``dropout_p``), residuals and the MLP.
        data: batch format, one of :data:`DATA_FORMATS`.
        compile_model: wrap the inner network in ``torch.compile`` (the LightningModule itself stays eager).
        seed: initialisation seed (the global RNG is left as it was).
        log_loss: ``self.log("train_loss", ...)`` in the training step. Off for a ``torch.compile``-d LightningModule:
            with torch 2.13 and Lightning 2.6 dynamo fails to trace ``self.log`` ("'method' object has no attribute
            '__dict__'"), with or without any callback.
    """

    def __init__(
        self,
        lr: float = 3e-3,
        warmup_steps: int = 0,
        dropout: float = 0.0,
        n_layer: int = 2,
        n_head: int = 2,
        n_embd: int = 32,
        block_size: int = BLOCK_SIZE,
        batch_size: int = 8,
        num_windows: int = 256,
        weight_decay: float = 0.1,
        data: str = "tuple",
        compile_model: bool = False,
        seed: int = 0,
        log_loss: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = GPT(VOCAB_SIZE, block_size, n_layer, n_head, n_embd, dropout)
        self.net = torch.compile(net) if compile_model else net

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def lm_loss(self, batch: Any) -> torch.Tensor:
        inputs, labels, shifted = split_lm_batch(batch)
        return lm_loss(self(inputs), labels, shifted)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch)
        if self.hparams.log_loss:
            self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return _warmup_schedule(optimizer, hp.warmup_steps) if hp.warmup_steps > 0 else optimizer

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return lm_dataloader(hp.data, hp.batch_size, hp.block_size, hp.num_windows)


# --------------------------------------------------------------------------------------------------- HF GPT-2


def gpt2_config(attn_implementation: str = "eager", dropout: float = 0.0, n_positions: int = 64, **kwargs: Any):
    """A tiny ``GPT2Config`` (2 layers, 2 heads, width 32) for the byte vocabulary."""
    from transformers import GPT2Config

    if attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"`attn_implementation` must be 'eager' or 'sdpa', got {attn_implementation!r}.")
    settings = {
        "n_layer": 2,
        "n_head": 2,
        "n_embd": 32,
        "n_positions": n_positions,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "loss_type": "ForCausalLM",
        # transformers 5 takes the attention implementation in the config (it lands in `config._attn_implementation`)
        "attn_implementation": attn_implementation,
    }
    settings.update(kwargs)
    return GPT2Config(**settings)


class HFGPT2(pl.LightningModule):
    """``transformers.GPT2LMHeadModel`` from a tiny config; the loss is the model's own (``labels=``).

    Args:
        attn_implementation: ``"eager"`` (the attention weights are computed explicitly) or ``"sdpa"``.
        data: batch format; ``"dict"`` (default) passes ``input_ids`` and ``labels`` straight to the model, the tuple
            formats compute the cross-entropy of the logits against the shifted targets.
    """

    def __init__(
        self,
        attn_implementation: str = "eager",
        lr: float = 3e-3,
        warmup_steps: int = 0,
        dropout: float = 0.0,
        batch_size: int = 8,
        num_windows: int = 256,
        data: str = "dict",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import GPT2LMHeadModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = GPT2LMHeadModel(gpt2_config(attn_implementation, dropout))

    def forward(self, input_ids: torch.Tensor, **kwargs: Any):
        return self.model(input_ids=input_ids, **kwargs)

    def lm_loss(self, batch: Any) -> torch.Tensor:
        if isinstance(batch, dict):
            return self.model(**batch).loss
        inputs, targets = batch
        return lm_loss(self.model(input_ids=inputs).logits, targets, shifted=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.lm_loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        return _warmup_schedule(optimizer, self.hparams.warmup_steps) if self.hparams.warmup_steps > 0 else optimizer

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return lm_dataloader(hp.data, hp.batch_size, BLOCK_SIZE, hp.num_windows)


# --------------------------------------------------------------------------------------------------- Lightning demo


class DemoTransformer:
    """Factory for Lightning's own demo ``LightningTransformer`` (``nn.Transformer`` encoder-decoder) on our corpus.

    ``DemoTransformer(...)`` returns an instance of a subclass of ``lightning.pytorch.demos.LightningTransformer``
    whose model is a smaller ``demos.Transformer`` and whose data are the corpus windows (the demo's own
    ``prepare_data`` would download WikiText2). Its ``training_step`` and SGD optimizer are Lightning's.
    """

    def __new__(cls, **kwargs: Any) -> pl.LightningModule:
        return _demo_class()(**kwargs)


_DEMO_CLASS: type | None = None


def _demo_class() -> type:
    global _DEMO_CLASS
    if _DEMO_CLASS is None:
        from lightning.pytorch.demos import LightningTransformer, Transformer

        class _Demo(LightningTransformer):
            def __init__(
                self,
                ninp: int = 32,
                nhead: int = 2,
                nhid: int = 64,
                nlayers: int = 1,
                dropout: float = 0.0,
                batch_size: int = 8,
                num_windows: int = 256,
                seed: int = 0,
            ) -> None:
                super().__init__(vocab_size=VOCAB_SIZE)
                self.save_hyperparameters()
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    self.model = Transformer(VOCAB_SIZE, ninp, nhead, nhid, nlayers, dropout)

            def lm_loss(self, batch: Any) -> torch.Tensor:
                return self.training_step(batch, 0)

            def prepare_data(self) -> None:  # the demo's downloads WikiText2
                pass

            def train_dataloader(self) -> DataLoader:
                return lm_dataloader("tuple", self.hparams.batch_size, BLOCK_SIZE, self.hparams.num_windows)

        _Demo.__name__ = _Demo.__qualname__ = "DemoTransformer"
        _DEMO_CLASS = _Demo
    return _DEMO_CLASS


# --------------------------------------------------------------------------------------------------- GAN, MLP


def ring_points(n: int = 512, modes: int = 8, seed: int = 0) -> torch.Tensor:
    """2-D points from a ring of ``modes`` Gaussians (the classic GAN toy set)."""
    g = torch.Generator().manual_seed(seed)
    angle = 2 * math.pi * torch.randint(0, modes, (n,), generator=g).float() / modes
    centres = torch.stack([angle.cos(), angle.sin()], dim=1) * 2.0
    return centres + 0.05 * torch.randn(n, 2, generator=g)


class TinyGAN(pl.LightningModule):
    """Manual optimization with two optimizers: a generator and a discriminator on 2-D ring points.

    The training step returns nothing (as manual-optimization modules usually do), so the monitors need a
    ``loss_fn``; :func:`gan_discriminator_loss` is one.
    """

    def __init__(self, lr: float = 2e-3, latent: int = 4, hidden: int = 16, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.generator = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 2))
            self.discriminator = nn.Sequential(nn.Linear(2, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))
        self.points = ring_points(seed=seed)

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        logits_real, logits_fake = self.discriminator(real), self.discriminator(fake)
        return F.binary_cross_entropy_with_logits(
            logits_real, torch.ones_like(logits_real)
        ) + F.binary_cross_entropy_with_logits(logits_fake, torch.zeros_like(logits_fake))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        (real,) = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.size(0), self.hparams.latent, device=real.device)

        fake = self.generator(z)
        loss_d = self.discriminator_loss(real, fake.detach())
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()

        logits = self.discriminator(fake)
        loss_g = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        self.log_dict({"loss_d": loss_d, "loss_g": loss_g})

    def configure_optimizers(self):
        lr = self.hparams.lr
        return (
            torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999)),
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.points), batch_size=self.hparams.batch_size, shuffle=True)


def gan_discriminator_loss(module: TinyGAN, batch: Any) -> torch.Tensor:
    """A deterministic ``loss_fn`` for :class:`TinyGAN`: the discriminator's loss on real points vs. fixed fakes."""
    (real,) = batch
    g = torch.Generator(device="cpu").manual_seed(1234)
    z = torch.randn(real.size(0), module.hparams.latent, generator=g).to(real.device)
    return module.discriminator_loss(real, module.generator(z))


class TinyMLP(pl.LightningModule):
    """64-32-10 MLP (optional dropout) on seeded synthetic data: the fast model for crosses."""

    def __init__(
        self, lr: float = 0.05, dropout: float = 0.0, batch_size: int = 16, num_samples: int = 256, seed: int = 0
    ):
        super().__init__()
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num_samples, 16, generator=g)
        self.y = (self.x[:, :4].sum(1) > 0).long() + (self.x[:, 4:8].sum(1) > 0).long()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.hparams.batch_size, shuffle=True)


# --------------------------------------------------------------------------------------------------- Trainer


def make_trainer(
    default_root_dir: str | os.PathLike | None = None,
    callbacks: Any = (),
    max_steps: int = 40,
    seed: int | None = 0,
    **kwargs: Any,
) -> pl.Trainer:
    """A quiet seeded CPU Trainer (no progress bar, no summary, no checkpointing, no logger unless given).

    Seeds the global RNGs with ``seed`` first (``pl.seed_everything``; ``None``: leaves them as they are), so two
    calls followed by ``fit`` on equal models train identically; ``kwargs`` override every default.
    """
    if seed is not None:
        pl.seed_everything(seed, verbose=False)
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
    }
    if default_root_dir is not None:
        settings["default_root_dir"] = str(default_root_dir)
    settings.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **settings)


def final_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer (``_orig_mod.`` prefixes of compiled modules removed)."""
    return {k.replace("_orig_mod.", ""): v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``a`` and ``b`` identical, bit for bit (NaNs at the same places count as equal)."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for key in a:
        assert torch.equal(a[key], b[key]) or (
            a[key].is_floating_point() and torch.equal(a[key].nan_to_num(), b[key].nan_to_num())
        ), f"{key} differs: max |diff| = {(a[key].double() - b[key].double()).abs().max().item()}"
