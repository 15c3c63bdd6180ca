"""SiT: one transformer backbone with two front doors, running through the
fused AdaLN-Zero ops (``fused=False`` runs the same weights through plain
PyTorch).

- ``SiT(input_size=32, patch_size=2, in_channels=4, ...)`` is the official image
  model: the same parameter names and shapes as the official SiT code, so its
  checkpoints load with ``strict=True`` (see ``SiT.from_pretrained``).
- ``SiT.build(input_dim, ...)`` is the seed's model for flat vectors ([B, D]) or
  sequences of them ([B, L, D]).

Time is embedded as given: the image model, like the official code, embeds t
unscaled; the vector model embeds t * num_steps.

Bytes moved per element of the [B, T, D] activations, per block (two
sub-blocks; attention and MLP internals excluded; the [B, D] modulation vectors
are negligible). Under bf16 autocast the residual stream x is float32 (4 bytes)
and the Linear outputs h are bfloat16 (2 bytes):

| per block, bytes/element | forward | backward |
|---|---|---|
| unfused, bf16 autocast (the official code) | 88 | about 148 |
| fused, bf16 autocast | 24 | 36 |
| unfused, float32 | 88 | about 164 |
| fused, float32 | 32 | 48 |

Unfused forward, per sub-block: LayerNorm reads x and writes its float32
output (8), the modulate multiply and add read and write it twice (16), autocast
casts it to bfloat16 for the Linear (6), gate * h (4, bfloat16), and the
residual add reads x and the product and writes x (10). Fused, per sub-block,
one ``gated_residual_ln_modulate``: read x (4) and h (2), write x_out (4) and y
(2, bfloat16: what the next Linear reads). Each block's MLP residual is fused
with the next block's attention modulation, and the last one with the final
layer's. Backward, fused: read dy, d x_out, x_out and h, write dx and dh (18 per
sub-block under autocast); unfused, autograd runs each elementwise op's
backward and adds the residual gradients (about 74). ``python bench/run.py``
counts the bytes of each fused op against these per-op numbers.

The biases of ``attn.proj`` and ``mlp.fc2`` are folded into the fused residual
(x + gate (h + b)): their gradients come from the per-sample column sums the
fused backward makes anyway, instead of a reduction over dh (2 bytes/element
read per sub-block under autocast) each. Parameter names and shapes stay the
official ones.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from . import reference as ref
from ._io import FileFormatError, torch_load

# ------------------------------------------------------------ embeddings


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of t [B]: cos half first, then sin (as DiT/SiT)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """sinusoidal(256) -> Linear(256, D) -> SiLU -> Linear(D, D)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors, with label dropout for classifier-free guidance:
    the extra row num_classes is the null class."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels: Tensor, train: bool, force_drop_ids: Tensor | None = None) -> Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """[N, C, H, W] -> [N, (H/p)(W/p), D] with a strided convolution (timm's
    PatchEmbed, whose parameter names the official checkpoints use)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, (patch_size, patch_size)
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VectorEmbed(nn.Module):
    """[B, L, input_dim] -> [B, L, D]: one Linear per token."""

    def __init__(self, input_dim: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(input_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> Tensor:
    """The official fixed 2-D sin-cos positional embedding, [grid_size^2, D]
    (computed in float64 as the official numpy code does)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # as np.meshgrid(w, h)

    def one_d(dim: int, pos: Tensor) -> Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], dim=1)


# ------------------------------------------------------------------ blocks


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm's names)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.mix(x))

    def mix(self, x: Tensor) -> Tensor:
        """Attention up to the output projection."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))

    def hidden(self, x: Tensor) -> Tensor:
        """The MLP up to its output projection."""
        return self.act(self.fc1(x))


def _fused_dtypes(x: Tensor, mods: tuple[Tensor, ...]) -> tuple[torch.dtype | None, tuple[Tensor, ...]]:
    """(the dtype the fused ops write y in, the modulation vectors in a dtype
    they take). A float32 residual stream under autocast writes y in
    autocast's dtype, that of the next Linear (sparing autocast a cast pass),
    and takes the Linear-made low-precision modulation as it is. Any other
    stream (float64, which autocast never casts, or half precision) writes y
    in its own dtype, with the [B, D] modulation vectors cast to it."""
    kind = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind), mods
    return None, tuple(m.to(x.dtype) for m in mods)


def _to_stream(x: Tensor, h: Tensor) -> Tensor:
    """A branch output h in the dtype the fused ops take beside x: as it is
    beside float32 x; cast to x's dtype beside any other (a half-precision
    stream under autocast of the other half type gets h in autocast's)."""
    return h if x.dtype == torch.float32 or h.dtype == x.dtype else h.to(x.dtype)


def _branch(x: Tensor, linear: nn.Module, inner: Tensor, fold: bool = True) -> tuple[Tensor, Tensor | None]:
    """linear(inner) as (h, bias) for the fused residual: a plain nn.Linear
    without hooks gives (inner W^T, its bias), the bias left for the fused op to
    add (as it is when in x's dtype or h's: the float32 parameter under
    autocast is read without a cast); any other module (a LoRA wrapper, a
    hooked Linear) runs as it is and gives (linear(inner), None). h is in the
    dtype the fused ops take beside x (see _to_stream)."""
    if not fold or type(linear) is not nn.Linear or linear.bias is None or not _hook_free(linear):
        return _to_stream(x, linear(inner)), None
    h = _to_stream(x, F.linear(inner, linear.weight))
    return h, _folded_bias(x, h, linear.bias)


def _folded_bias(x: Tensor, h: Tensor, bias: Tensor) -> Tensor:
    """A branch's bias as the fused residual takes it: as it is in x's dtype or
    h's (the float32 parameter under autocast), else cast to h's."""
    return bias if bias.dtype in (x.dtype, h.dtype) else bias.to(h.dtype)


def _hook_free(*modules: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _fusable_mlp(mlp: nn.Module) -> bool:
    """Whether gelu_mlp computes exactly this module: the official Mlp (fc1,
    tanh GELU, fc2) with plain, hook-free parts (a LoRA wrapper or a hook
    runs the module as it is)."""
    return (type(mlp) is Mlp and type(mlp.fc1) is nn.Linear and type(mlp.fc2) is nn.Linear
            and type(mlp.act) is nn.GELU and mlp.act.approximate == "tanh" and mlp.fc1.bias is not None
            and _hook_free(mlp, mlp.fc1, mlp.act, mlp.fc2))


def _mlp_branch(x: Tensor, mlp: nn.Module, y: Tensor, fold: bool, fuse: bool) -> tuple[Tensor, Tensor | None]:
    """The MLP branch as (h, bias) for the fused residual (see _branch); with
    `fuse`, fc1, GELU and fc2 run as one gelu_mlp op."""
    if not (fuse and _fusable_mlp(mlp)):
        return _branch(x, mlp.fc2, mlp.hidden(y), fold)
    fc2 = mlp.fc2
    fold = fold and fc2.bias is not None
    h = _to_stream(x, ops.gelu_mlp(y, mlp.fc1.weight, mlp.fc1.bias, fc2.weight, None if fold else fc2.bias))
    return h, _folded_bias(x, h, fc2.bias) if fold else None


class SiTBlock(nn.Module):
    """x += gate_msa attn(modulate(LN(x))); x += gate_mlp mlp(modulate(LN(x)))."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def modulation(self, c: Tensor) -> tuple[Tensor, ...]:
        """(shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        strided [B, D] views of one [B, 6D] tensor."""
        return self.adaLN_modulation(c).chunk(6, dim=1)

    def forward(self, x: Tensor, c: Tensor, fused: bool = True) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(c)
        if not fused:
            x = ref.gated_residual(x, self.attn(ref.ln_modulate(x, shift_msa, scale_msa)), gate_msa)
            return ref.gated_residual(x, self.mlp(ref.ln_modulate(x, shift_mlp, scale_mlp)), gate_mlp)
        y_dtype, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) = _fused_dtypes(
            x, (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp))
        y = ops.ln_modulate(x, shift_msa, scale_msa, out_dtype=y_dtype)
        h, bias = _branch(x, self.attn.proj, self.attn.mix(y))
        x, y = ops.gated_residual_ln_modulate(x, h, gate_msa, shift_mlp, scale_mlp, out_dtype=y_dtype, bias=bias)
        return ops.gated_residual(x, _to_stream(x, self.mlp(y)), gate_mlp)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def modulation(self, c: Tensor) -> tuple[Tensor, Tensor]:
        return self.adaLN_modulation(c).chunk(2, dim=1)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)
        return self.linear(ref.ln_modulate(x, shift, scale))


# -------------------------------------------------------------------- SiT


class SiT(nn.Module):
    """Scalable Interpolant Transformer.

    ``SiT(...)`` builds the official image model (see the module docstring);
    ``SiT.build(input_dim, ...)`` builds the vector model. ``fused`` picks the
    fused kernels (default) or plain PyTorch, with the same weights; it can be
    switched at any time, as can ``fold_biases`` (default True: the fused path
    adds the attn.proj and mlp.fc2 biases inside the fused residual op; False
    leaves them to the Linears, for comparison) and ``fuse_mlp`` (default
    False: True runs each block's fc1, GELU and fc2 as one ``gelu_mlp`` op,
    whose CUDA path puts fc1's bias and GELU, and in backward GELU's
    derivative and fc1's bias gradient, in cuBLASLt GEMM epilogues; off until
    a GPU benchmark shows that it pays: ``sit-ext bench --models`` measures
    it as the ``fused-mlp`` variant) and ``batch_adaln`` (default False: True
    makes every adaLN modulation in one GEMM per forward, the per-block
    parameters and checkpoint keys unchanged; measured as ``fused-batchadaln``).
    """

    fold_biases = True
    fuse_mlp = False
    batch_adaln = False

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int | None = 1000, learn_sigma: bool = True,
                 *, fused: bool = True):
        super().__init__()
        for name, value in (("input_size", input_size), ("patch_size", patch_size), ("in_channels", in_channels)):
            _positive_int(name, value)
        self._check_backbone(hidden_size, depth, num_heads, mlp_ratio, num_classes, class_dropout_prob)
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        self.kind = "image"
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.time_scale = 1.0
        self._build_backbone(hidden_size, depth, num_heads, mlp_ratio, num_classes, class_dropout_prob,
                             patch_size * patch_size * self.out_channels, fused)
        self.initialize_weights()

    @classmethod
    def build(cls, input_dim: int, hidden_size: int = 256, num_layers: int = 6, num_heads: int = 4,
              mlp_ratio: float = 4.0, num_classes: int | None = None, num_steps: int = 1000, *,
              class_dropout_prob: float = 0.1, max_seq_len: int = 256, fused: bool = True) -> SiT:
        """The seed's vector model: x [B, input_dim] or [B, L, input_dim] (L <=
        max_seq_len), t [B] in [0, 1] (scaled by num_steps before embedding),
        optional labels y [B]. Returns the velocity in x's shape."""
        _positive_int("input_dim", input_dim)
        _positive_int("max_seq_len", max_seq_len)
        _positive_int("num_steps", num_steps)
        _positive_int("num_layers", num_layers)
        cls._check_backbone(hidden_size, num_layers, num_heads, mlp_ratio, num_classes, class_dropout_prob)
        model = cls.__new__(cls)
        nn.Module.__init__(model)
        model.kind = "vector"
        model.input_dim, model.learn_sigma = input_dim, False
        model.x_embedder = VectorEmbed(input_dim, hidden_size)
        model.pos_embed = nn.Parameter(torch.zeros(1, max_seq_len, hidden_size))
        model.time_scale = float(num_steps)
        model._build_backbone(hidden_size, num_layers, num_heads, mlp_ratio, num_classes, class_dropout_prob,
                              input_dim, fused)
        model.initialize_weights()
        return model

    @staticmethod
    def _check_backbone(hidden_size, depth, num_heads, mlp_ratio, num_classes, class_dropout_prob) -> None:
        """Before any layer is made (the embedders take hidden_size)."""
        for name, value in (("hidden_size", hidden_size), ("depth", depth), ("num_heads", num_heads)):
            _positive_int(name, value)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 0):
            raise ValueError(f"num_classes must be None or an integer >= 0, got {num_classes!r}")
        if isinstance(class_dropout_prob, bool) or not isinstance(class_dropout_prob, (int, float)) \
                or not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob!r}")

    def _build_backbone(self, hidden_size, depth, num_heads, mlp_ratio, num_classes, class_dropout_prob,
                        out_features, fused):
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.num_classes = num_classes
        self.fused = fused
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = (LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
                           if num_classes else None)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, out_features)

    def initialize_weights(self) -> None:
        """As the paper: xavier-uniform Linears with zero bias, the patch
        embedding like a Linear, N(0, 0.02) for the label table and the time MLP,
        and zero adaLN and final layers (so every block starts as the identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        if self.kind == "image":
            grid = int(self.x_embedder.num_patches ** 0.5)
            pos = get_2d_sincos_pos_embed(self.hidden_size, grid)
            self.pos_embed.data.copy_(pos.float().unsqueeze(0).to(self.pos_embed.device))
            w = self.x_embedder.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.x_embedder.proj.bias)
        else:
            nn.init.normal_(self.pos_embed, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # --------------------------------------------------------------- forward

    def _embed(self, x: Tensor) -> Tensor:
        if self.kind == "image":
            c, s = self.in_channels, self.input_size
            if x.dim() != 4 or x.shape[1] != c or x.shape[2] != s or x.shape[3] != s:
                raise ValueError(f"SiT: expected x of shape [N, {c}, {s}, {s}], got {tuple(x.shape)}")
            return self.x_embedder(x) + self.pos_embed
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_dim:
            raise ValueError(f"SiT: expected x of shape [B, {self.input_dim}] or [B, L, {self.input_dim}], "
                             f"got {tuple(x.shape)}")
        tokens = x if x.dim() == 3 else x[:, None]
        if tokens.shape[1] > self.pos_embed.shape[1]:
            raise ValueError(f"SiT: sequence length {tokens.shape[1]} exceeds max_seq_len {self.pos_embed.shape[1]}")
        return self.x_embedder(tokens) + self.pos_embed[:, : tokens.shape[1]]

    def _condition(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        for name, value in (("x", x), ("t", t)) + ((("y", y),) if y is not None else ()):
            if not isinstance(value, Tensor):
                raise TypeError(f"SiT: {name} must be a Tensor, got {type(value).__name__}")
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"SiT: expected t of shape [{x.shape[0]}], got {tuple(t.shape)}")
        c = self.t_embedder(t * self.time_scale if self.time_scale != 1.0 else t)
        if self.y_embedder is None:
            if y is not None:
                raise ValueError("SiT: this model has no classes (num_classes=None); pass y=None")
            return c
        if y is None:
            raise ValueError(f"SiT: this model is class-conditional (num_classes={self.num_classes}); pass y")
        if y.shape != (x.shape[0],) or y.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"SiT: expected integer labels y of shape [{x.shape[0]}], got {y.dtype} "
                             f"{tuple(y.shape)}")
        top = self.y_embedder.embedding_table.num_embeddings - 1
        # No host sync: raises at once on the CPU, as a device-side assert on CUDA.
        torch._assert_async(((y >= 0) & (y <= top)).all(),
                            f"SiT: labels must be in [0, {top}] ({self.num_classes} classes"
                            + (", plus the null class)" if top == self.num_classes else ")"))
        return c + self.y_embedder(y.long(), self.training)

    def _unembed(self, out: Tensor, x: Tensor) -> Tensor:
        if self.kind == "vector":
            return out if x.dim() == 3 else out[:, 0]
        imgs = self.unpatchify(out)
        return imgs.chunk(2, dim=1)[0] if self.learn_sigma else imgs

    def unpatchify(self, x: Tensor) -> Tensor:
        """[N, T, p*p*C] -> [N, C, H, W]."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def _modulations(self, c: Tensor) -> list[tuple[Tensor, ...]]:
        """Every block's six modulation vectors and the final layer's two. With
        batch_adaln (and every adaLN layer the plain SiLU + Linear), one GEMM
        makes them all: SiLU(c) against the blocks' weights concatenated (a copy
        per call; autograd hands each block's Linear its own gradient), giving
        [B, D] views of one [B, (6 depth + 2) D] tensor."""
        layers = [block.adaLN_modulation for block in self.blocks] + [self.final_layer.adaLN_modulation]
        if not (self.batch_adaln and all(
                type(seq) is nn.Sequential and len(seq) == 2 and type(seq[0]) is nn.SiLU
                and type(seq[1]) is nn.Linear and seq[1].bias is not None and _hook_free(seq, *seq)
                for seq in layers)):
            return [block.modulation(c) for block in self.blocks] + [self.final_layer.modulation(c)]
        linears = [seq[1] for seq in layers]
        out = F.linear(F.silu(c), torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears]))
        widths = [lin.out_features for lin in linears]
        return [part.chunk(width // self.hidden_size, dim=1) for part, width in zip(out.split(widths, dim=1), widths)]

    def backbone(self, x: Tensor, c: Tensor) -> Tensor:
        """Blocks and final layer: tokens [B, T, D] -> [B, T, out_features]."""
        if not self.fused:
            for block in self.blocks:
                x = block(x, c, fused=False)
            return self.final_layer(x, c)
        mods = self._modulations(c)
        y_dtype = _fused_dtypes(x, ())[0]
        mods = [_fused_dtypes(x, m)[1] for m in mods]
        y = ops.ln_modulate(x, *mods[0][:2], out_dtype=y_dtype)
        for i, block in enumerate(self.blocks):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[i]
            next_shift, next_scale = mods[i + 1][:2]
            h, bias = _branch(x, block.attn.proj, block.attn.mix(y), self.fold_biases)
            x, y = ops.gated_residual_ln_modulate(x, h, gate_msa, shift_mlp, scale_mlp, out_dtype=y_dtype, bias=bias)
            h, bias = _mlp_branch(x, block.mlp, y, self.fold_biases, self.fuse_mlp)
            x, y = ops.gated_residual_ln_modulate(x, h, gate_mlp, next_shift, next_scale, out_dtype=y_dtype,
                                                  bias=bias)
        return self.final_layer.linear(y)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """The predicted velocity: [N, C, H, W] for the image model (the first C
        of 2C channels with learn_sigma), x's shape for the vector model."""
        c = self._condition(x, t, y)
        return self._unembed(self.backbone(self._embed(x), c), x)

    def forward_with_cfg(self, x: Tensor, t: Tensor, y: Tensor, cfg_scale: float,
                         cfg_channels: int | None = None) -> Tensor:
        """Classifier-free guidance in one batch, as the official code: the
        first half of x (repeated) runs with labels y, whose second half should
        be the null class; the output is uncond + cfg_scale (cond - uncond) in
        both halves. Guidance covers all channels, or only the first
        cfg_channels (cfg_channels=3 reproduces the official sampler)."""
        if len(x) % 2:
            raise ValueError(f"forward_with_cfg: expected an even batch (conditional and unconditional halves), "
                             f"got {len(x)}")
        half = x[: len(x) // 2]
        out = self.forward(half.repeat(2, *[1] * (half.dim() - 1)), t, y)
        if cfg_channels is not None and not 1 <= cfg_channels <= out.shape[1]:
            raise ValueError(f"cfg_channels must be in [1, {out.shape[1]}] (the output's channels), got {cfg_channels}")
        k = out.shape[1] if cfg_channels is None else cfg_channels
        guided, rest = out[:, :k], out[:, k:]
        cond, uncond = guided.split(len(guided) // 2, dim=0)
        mixed = uncond + cfg_scale * (cond - uncond)
        with torch.autocast(x.device.type, enabled=False):  # autocast's cat refuses float16 beside bfloat16
            return torch.cat([mixed.repeat(2, *[1] * (mixed.dim() - 1)), rest], dim=1)

    # ------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path_or_state_dict: str | os.PathLike | Mapping[str, Tensor],
                        model: str = "SiT-XL/2", map_location: str | torch.device = "cpu",
                        weights: str = "ema", **overrides) -> SiT:
        """An official (or sit_ext) SiT checkpoint, in eval mode, from a local
        file or a state dict: a plain state dict, or a dict with "ema"
        (preferred, or weights="model") or "model"; or a .safetensors file
        (``sit-ext export`` writes one), read without pickle. Never downloads.
        Other files load with weights_only=True: a file that needs arbitrary
        unpickling is refused. `overrides` change the preset's constructor
        arguments (e.g. input_size=64, num_classes=10)."""
        if model not in SiT_models:
            raise ValueError(f"unknown model {model!r}: choose from {sorted(SiT_models)}")
        state = load_state_dict(path_or_state_dict, map_location, weights)
        net = SiT_models[model](**overrides)
        check_state_dict(net, state, model)
        net.load_state_dict(state, strict=True)
        return net.eval()


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def load_state_dict(path_or_state_dict, map_location="cpu", weights: str = "ema") -> dict[str, Tensor]:
    """The model weights in a checkpoint: its "ema" entry, else its "model"
    entry, else the whole dict; a .safetensors file's tensors. weights="model"
    takes the "model" entry, and refuses a file without one (it would
    otherwise give the EMA, or the only weights there are, without a word)."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    if isinstance(path_or_state_dict, Mapping):
        ckpt, source = path_or_state_dict, "the state dict"
    elif not isinstance(path_or_state_dict, (str, os.PathLike)):
        raise TypeError("path_or_state_dict must be a file path or a mapping of names to tensors, "
                        f"got {type(path_or_state_dict).__name__}")
    elif os.fspath(path_or_state_dict).endswith(".safetensors"):
        state, meta = read_safetensors(path_or_state_dict, map_location)
        if weights == "model" and meta.get("weights", "model") != "model":
            raise ValueError(f"{os.fspath(path_or_state_dict)!r} holds the {meta['weights']} weights only "
                             "(sit-ext export --weights model writes the model's): drop weights='model' (--weights "
                             "model)")
        return state
    else:
        # argparse.Namespace: the official training checkpoints store their args in one.
        source = repr(os.fspath(path_or_state_dict))
        ckpt = torch_load(path_or_state_dict, "checkpoint", safe_globals=(argparse.Namespace,))
        if not isinstance(ckpt, Mapping):
            raise FileFormatError(f"checkpoint {source} holds a {type(ckpt).__name__}, not a state dict")
    if weights == "model" and not isinstance(ckpt.get("model"), Mapping):
        raise ValueError(f"{source} holds one set of weights (no \"model\" entry beside an EMA): "
                         "drop weights='model' (--weights model)")
    for key in ("ema", "model") if weights == "ema" else ("model",):
        if isinstance(ckpt.get(key), Mapping):
            ckpt = ckpt[key]
            break
    if not all(isinstance(v, Tensor) for v in ckpt.values()):
        raise ValueError(f"{source} is not a state dict: expected a mapping of names to tensors")
    return {k: v.to(map_location) for k, v in ckpt.items()}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError(".safetensors files need safetensors: pip install 'sit_ext[vae]' (or pip install "
                          "safetensors)") from None
    return safetensors


def read_safetensors(path: str | os.PathLike, map_location="cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file: no pickle, no code run."""
    safetensors = _safetensors()
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a folder, not a .safetensors file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    try:
        with safetensors.safe_open(path, framework="pt", device=str(map_location)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header or file
        raise ValueError(f"cannot read {path!r} as safetensors: {str(e).splitlines()[0][:200]}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(path: str | os.PathLike, state: Mapping[str, Tensor], metadata: dict[str, str]) -> None:
    """Writes contiguous copies of `state` with string `metadata`, through a
    temporary file renamed over `path`."""
    safetensors = _safetensors()
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, tmp,
                                    metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates it 0600; torch.save and open() follow the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_state_dict(net: nn.Module, state: Mapping[str, Tensor], name: str) -> None:
    """Raises a ValueError listing missing and unexpected keys and shape
    conflicts between `state` and `net`."""
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    conflicts = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or conflicts:
        lines = [f"checkpoint does not match {name}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape conflicts", conflicts)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))


def output_size(input_dim: int, learn_sigma: bool = False) -> int:
    """Size of the vector model's output per token: input_dim (twice that with
    learn_sigma, for the image model's variance channels)."""
    return input_dim * (2 if learn_sigma else 1)


def build(input_dim: int, **kwargs) -> SiT:
    """The seed's vector model; see SiT.build."""
    return SiT.build(input_dim, **kwargs)


# ---------------------------------------------------------------- presets

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _preset(depth: int, hidden: int, heads: int, patch: int):
    def make(**overrides) -> SiT:
        return SiT(**({"depth": depth, "hidden_size": hidden, "patch_size": patch, "num_heads": heads} | overrides))

    return make


SiT_models = {f"SiT-{size}/{patch}": _preset(*_SIZES[size], patch)
              for size in ("XL", "L", "B", "S") for patch in (2, 4, 8)}
