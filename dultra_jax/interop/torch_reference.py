"""Independent PyTorch reference of the LLaDA backbone and the dUltra planner head.

Written from the model description only (``docs/algorithm.md`` section 1: backbone, planner
head, checkpoint layout); it imports nothing from the rest of
``dultra_jax`` so that parity tests (``tests/test_models.py``) and the PyTorch baseline of
``benchmarks/vs_torch.py`` compare two independent implementations.

PyTorch is a test and benchmark dependency only: nothing else in the package imports this
module, so ``dultra_jax`` itself imports without torch installed.

The module's ``state_dict()`` uses exactly the HF LLaDA layout (``model.transformer.*``) plus, when
the planner is enabled, the dUltra planner keys at the top level (``mask_head.0.*``,
``time_embedding.mlp.{0,2}.*``, ``norm_out_{1,2}.modulation.*``, ``mask_embedding.weight``,
``mask_linear.*``). There are no registered buffers; rotary tables are computed on the fly.

Public API::

    RefLLaDA(config: dict, with_planner: bool | None = None)
        .forward(input_ids [B,L] long, key_valid [B,L] bool | None) -> (logits [B,L,V], h_last [B,L,D])
        .planner_logits(h_last [B,L,D], t [B], candidates [B,L] bool, key_valid=None) -> [B,L] f32
    planner_inputs(canvas [B,L] long, mask_id, valid=None) -> (t [B] f32, candidates [B,L] bool)
    ref_from_hf_dir(path) -> RefLLaDA            (float32, strict loading)
    random_init_(model, seed) -> model           (deterministic, in place)
    save_hf_dir(model, config_dict, path)        (config.json + model.safetensors, float32)
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RMSNorm",
    "LLaDABlock",
    "TimestepEmbedder",
    "AdaLayerNorm",
    "RefLLaDA",
    "planner_inputs",
    "ref_from_hf_dir",
    "random_init_",
    "save_hf_dir",
]

_PLANNER_KEYS = ("num_head_layers", "use_adaln", "use_mask_embeddings")


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm as LLaDA computes it.

    ``y = (x.f32 * rsqrt(mean(x.f32^2, -1) + eps)).to(x.dtype) * weight``; weight ``[D]``, no bias.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., D] -> [..., D]`` (same dtype as ``x``, then times the weight)."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """NeoX/HF-Llama rotate-half: ``[x1, x2] -> [-x2, x1]`` over the last dim split in halves."""
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half layout, computed in float32, positions 0..L-1.

    ``x [B, H, L, Dh] -> [B, H, L, Dh]`` (cast back to ``x.dtype``).
    ``inv_freq = 1 / theta^(arange(0, Dh, 2) / Dh)``; angles ``cat(freqs, freqs)``.
    """
    _, _, seq_len, head_dim = x.shape
    inv_freq = 1.0 / (
        float(theta)
        ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=x.device) / head_dim)
    )
    pos = torch.arange(seq_len, dtype=torch.float32, device=x.device)
    freqs = torch.outer(pos, inv_freq)  # [L, Dh/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [L, Dh]
    cos, sin = angles.cos(), angles.sin()
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)


class LLaDABlock(nn.Module):
    """One LLaDA (Llama-style) block: pre-norm bidirectional GQA attention + SwiGLU MLP, no biases.

    Parameters (PyTorch ``[out, in]``): ``attn_norm [D]``, ``q_proj [H*Dh, D]``,
    ``k_proj/v_proj [Hkv*Dh, D]``, ``attn_out [D, H*Dh]``, ``ff_norm [D]``,
    ``ff_proj/up_proj [F, D]`` (SiLU on ``ff_proj``), ``ff_out [D, F]``.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        mlp_hidden: int,
        rope_theta: float,
        eps: float,
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model {d_model} not divisible by n_heads {n_heads}")
        if n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads {n_heads} not divisible by n_kv_heads {n_kv_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = float(rope_theta)
        dh = self.head_dim
        self.attn_norm = RMSNorm(d_model, eps)
        self.q_proj = nn.Linear(d_model, n_heads * dh, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * dh, bias=False)
        self.attn_out = nn.Linear(n_heads * dh, d_model, bias=False)
        self.ff_norm = RMSNorm(d_model, eps)
        self.ff_proj = nn.Linear(d_model, mlp_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, mlp_hidden, bias=False)
        self.ff_out = nn.Linear(mlp_hidden, d_model, bias=False)

    def attention(self, x: torch.Tensor, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
        """Bidirectional grouped-query attention on already-normed input.

        ``x [B, L, D]``; ``key_valid [B, L] bool`` or None (keys where False get -inf scores).
        Returns ``[B, L, H*Dh]`` (before ``attn_out``). KV head ``j`` serves query heads
        ``j*G .. (j+1)*G-1`` with ``G = H / Hkv``. Scale ``1/sqrt(Dh)``.
        """
        b, l, _ = x.shape
        dh = self.head_dim
        q = self.q_proj(x).view(b, l, self.n_heads, dh).transpose(1, 2)  # [B,H,L,Dh]
        k = self.k_proj(x).view(b, l, self.n_kv_heads, dh).transpose(1, 2)  # [B,Hkv,L,Dh]
        v = self.v_proj(x).view(b, l, self.n_kv_heads, dh).transpose(1, 2)  # [B,Hkv,L,Dh]
        q = _apply_rope(q, self.rope_theta)
        k = _apply_rope(k, self.rope_theta)
        groups = self.n_heads // self.n_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # [B,H,L,Dh]
            v = v.repeat_interleave(groups, dim=1)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(dh)  # [B,H,Lq,Lk]
        scores = scores.float()
        if key_valid is not None:
            keep = key_valid.to(torch.bool)[:, None, None, :]  # [B,1,1,Lk]
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.einsum("bhqk,bhkd->bhqd", probs, v)  # [B,H,L,Dh]
        return out.transpose(1, 2).reshape(b, l, self.n_heads * dh)

    def forward(self, x: torch.Tensor, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, L, D] -> [B, L, D]``.

        ``h = x + attn_out(attn(n1(x)))``; ``y = h + ff_out(silu(ff_proj(n2 h)) * up_proj(n2 h))``.
        """
        h = x + self.attn_out(self.attention(self.attn_norm(x), key_valid))
        n2 = self.ff_norm(h)
        return h + self.ff_out(F.silu(self.ff_proj(n2)) * self.up_proj(n2))


class TimestepEmbedder(nn.Module):
    """Sinusoidal timestep embedding followed by an MLP (``mlp.0`` Linear(256, D), SiLU, ``mlp.2``).

    ``freqs = exp(-ln(10000) * arange(128) / 128)``; ``emb = [cos(t*freqs), sin(t*freqs)]``
    (cos first), cast to the MLP weight dtype.
    """

    def __init__(self, d_model: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, d_model, bias=True),
            nn.SiLU(),
            nn.Linear(d_model, d_model, bias=True),
        )

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B] -> [B, freq_dim]`` in float32."""
        half = self.freq_dim // 2
        freqs = torch.exp(
            -math.log(self.max_period)
            * torch.arange(half, dtype=torch.float32, device=t.device)
            / half
        )
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """``t [B] float -> [B, D]``."""
        emb = self.sinusoid(t).to(self.mlp[0].weight.dtype)
        return self.mlp(emb)


class AdaLayerNorm(nn.Module):
    """AdaLN: ``LayerNorm_noaffine(x, eps) * (1 + scale) + shift``; ``[scale, shift] = modulation(c)``.

    ``modulation`` is ``Linear(D, 2D)`` with bias; its output is split scale FIRST, then shift.
    No activation is applied to the conditioning before ``modulation``.
    """

    def __init__(self, d_model: int, eps: float = 1e-4):
        super().__init__()
        self.eps = float(eps)
        self.d_model = d_model
        self.modulation = nn.Linear(d_model, 2 * d_model, bias=True)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x [B, L, D]``, ``cond [B, L, D]`` (or ``[B, D]``, broadcast over L) ``-> [B, L, D]``."""
        normed = F.layer_norm(x, (self.d_model,), eps=self.eps)
        scale, shift = self.modulation(cond).chunk(2, dim=-1)
        if x.ndim == 3 and scale.ndim == 2:
            scale, shift = scale[:, None, :], shift[:, None, :]
        return normed * (1 + scale) + shift


# --------------------------------------------------------------------------------------------------
# Full model
# --------------------------------------------------------------------------------------------------


class _Backbone(nn.Module):
    """Holds ``transformer`` so parameter names read ``model.transformer.*``."""

    def __init__(self, transformer: nn.ModuleDict):
        super().__init__()
        self.transformer = transformer


def _cfg_get(config: dict, key: str, default=None):
    value = config.get(key, default)
    return default if value is None else value


class RefLLaDA(nn.Module):
    """LLaDA backbone (+ optional dUltra planner head) with HF-layout parameter names.

    Args:
        config: HF-style config dict. Uses ``d_model``, ``n_layers``, ``n_heads``, ``n_kv_heads``
            (None/missing -> ``n_heads``), ``mlp_hidden_size``, ``vocab_size`` (``embedding_size``
            if present and larger), ``rope_theta`` (default 500000), ``rms_norm_eps`` (default 1e-5),
            and the planner fields ``num_head_layers``, ``use_adaln``, ``use_mask_embeddings``.
        with_planner: build the planner modules. None (default) -> True iff ``num_head_layers``
            is in the config.
    """

    def __init__(self, config: dict, with_planner: Optional[bool] = None):
        super().__init__()
        self.config = dict(config)
        d = int(config["d_model"])
        n_layers = int(config["n_layers"])
        n_heads = int(config["n_heads"])
        n_kv = int(_cfg_get(config, "n_kv_heads", n_heads))
        mlp = int(config["mlp_hidden_size"])
        vocab = int(config["vocab_size"])
        emb_size = config.get("embedding_size")
        if emb_size is not None and int(emb_size) > vocab:
            vocab = int(emb_size)
        theta = float(_cfg_get(config, "rope_theta", 500000.0))
        eps = float(_cfg_get(config, "rms_norm_eps", 1e-5))

        self.d_model = d
        self.vocab_size = vocab
        self.n_layers = n_layers

        def make_block() -> LLaDABlock:
            return LLaDABlock(d, n_heads, n_kv, mlp, theta, eps)

        transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, d),
                "blocks": nn.ModuleList([make_block() for _ in range(n_layers)]),
                "ln_f": RMSNorm(d, eps),
                "ff_out": nn.Linear(d, vocab, bias=False),
            }
        )
        self.model = _Backbone(transformer)

        if with_planner is None:
            with_planner = "num_head_layers" in config
        self.with_planner = bool(with_planner)
        if self.with_planner:
            if not bool(_cfg_get(config, "use_adaln", True)):
                raise NotImplementedError("only use_adaln=True planners are supported")
            if bool(config.get("use_block_embeddings", False)):
                raise NotImplementedError("use_block_embeddings=True is not supported")
            n_head_layers = int(_cfg_get(config, "num_head_layers", 1))
            self.use_mask_embeddings = bool(_cfg_get(config, "use_mask_embeddings", True))
            self.mask_head = nn.ModuleList([make_block() for _ in range(n_head_layers)])
            self.time_embedding = TimestepEmbedder(d)
            self.norm_out_1 = AdaLayerNorm(d, eps=1e-4)
            self.norm_out_2 = AdaLayerNorm(d, eps=1e-4)
            if self.use_mask_embeddings:
                self.mask_embedding = nn.Embedding(2, d)
            self.mask_linear = nn.Linear(d, 1, bias=True)

    @property
    def transformer(self) -> nn.ModuleDict:
        """The backbone ``ModuleDict`` (``wte``, ``blocks``, ``ln_f``, ``ff_out``)."""
        return self.model.transformer

    def forward(
        self, input_ids: torch.Tensor, key_valid: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone forward.

        Args:
            input_ids: ``[B, L]`` integer tokens; positions are 0..L-1 for every row.
            key_valid: optional ``[B, L]`` bool; keys where False are masked out in every layer.
                None attends to everything (the reference behaviour).

        Returns:
            ``logits [B, L, V]`` (= ``ff_out(ln_f(h))``; the mask-token logit is NOT set to -inf)
            and ``h_last [B, L, D]``, the hidden state after ``ln_f``.
        """
        tr = self.transformer
        x = tr["wte"](input_ids)
        for block in tr["blocks"]:
            x = block(x, key_valid)
        h_last = tr["ln_f"](x)
        logits = tr["ff_out"](h_last)
        return logits, h_last

    def planner_logits(
        self,
        h_last: torch.Tensor,
        t: torch.Tensor,
        candidates: torch.Tensor,
        key_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """dUltra planner head: per-position unmasking logit (apply sigmoid for the probability).

        Args:
            h_last: ``[B, L, D]`` backbone hidden state after ``ln_f``.
            t: ``[B]`` float timestep (``1 - #mask / L``, see :func:`planner_inputs`).
            candidates: ``[B, L]`` bool, the ``mask_embedding`` row index (masked and in block).
            key_valid: optional ``[B, L]`` bool key mask for the planner block's attention.

        Returns:
            ``[B, L]`` float32 logits.
        """
        if not self.with_planner:
            raise RuntimeError("model was built without the planner head")
        temb = self.time_embedding(t)[:, None, :]  # [B,1,D]
        if self.use_mask_embeddings:
            temb = temb + self.mask_embedding(candidates.long())  # [B,L,D]
        f = self.norm_out_1(h_last, temb)
        for block in self.mask_head:
            f = block(f, key_valid)
        f = self.norm_out_2(f, temb)
        return self.mask_linear(f).squeeze(-1).float()


def planner_inputs(canvas: torch.Tensor, mask_id: int,
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep and candidate set for a whole canvas.

    ``canvas [B, L]`` -> ``t [B] float32 = 1 - (#mask_id in row) / L`` and
    ``candidates [B, L] bool = canvas == mask_id`` (every masked position; restrict it to the
    current block yourself when the canvas has masks outside it). With ``valid [B, L]`` bool (False
    on left padding), ``L`` is the row's valid length: a padded row gets the ``t`` of its unpadded
    canvas, as the reference, which decodes one prompt at a time.
    """
    masked = canvas == mask_id
    length = (torch.full(canvas.shape[:1], float(canvas.shape[-1])) if valid is None
              else valid.sum(dim=-1).to(torch.float32).clamp(min=1.0))
    t = 1.0 - masked.sum(dim=-1).to(torch.float32) / length
    return t, masked


# --------------------------------------------------------------------------------------------------
# Checkpoint I/O and initialisation
# --------------------------------------------------------------------------------------------------


def _load_safetensors_dir(path: str) -> dict:
    from safetensors.torch import load_file

    index_path = os.path.join(path, "model.safetensors.index.json")
    single_path = os.path.join(path, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path) as fh:
            weight_map = json.load(fh)["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(os.path.join(path, shard)))
        return state
    if os.path.exists(single_path):
        return load_file(single_path)
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def ref_from_hf_dir(path: str) -> RefLLaDA:
    """Build a float32 :class:`RefLLaDA` from an HF-layout directory and load it strictly.

    Reads ``config.json`` (planner built iff ``num_head_layers`` is present) and either
    ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``.
    """
    with open(os.path.join(path, "config.json")) as fh:
        config = json.load(fh)
    model = RefLLaDA(config)
    state = {k: v.to(torch.float32) for k, v in _load_safetensors_dir(path).items()}
    model.load_state_dict(state, strict=True)
    return model.float().eval()


@torch.no_grad()
def random_init_(model: RefLLaDA, seed: int) -> RefLLaDA:
    """Deterministically fill every parameter with small random values (in place).

    Norm weights (names ending ``norm.weight`` / ``ln_f.weight``) get ``1 + 0.1 * N(0,1)``; every
    other tensor (weights and biases) gets ``N(0, 0.05^2)``. Parameters are visited in sorted name
    order with a private generator, so the result depends only on ``seed`` and the config.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.05 * noise
        param.copy_(value.to(device=param.device, dtype=param.dtype))
    return model


def save_hf_dir(model: RefLLaDA, config_dict: dict, path: str) -> None:
    """Write ``config.json`` and a single float32 ``model.safetensors`` into ``path`` (created)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(config_dict, fh, indent=2, sort_keys=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
