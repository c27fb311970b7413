"""Fusion of modality embeddings into one patient embedding, picked by name (:data:`FUSIONS`).

- ``concat``: modality embeddings (zeroed where missing) and presence flags, concatenated, then an MLP.
- ``bilinear``: PORPOISE's gated Kronecker fusion (Chen et al., 2022): each modality embedding is gated,
  a 1 is appended, the outer product of all modalities is flattened and encoded, with a skip connection.
- ``coattention`` (:class:`GenomicCoAttention`): MCAT/SurvPath-style genomic tokens attending over tiles.

Pure torch: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.mil import GatedAttentionMIL, build_mil


def mlp_block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """LayerNorm -> Linear -> GELU -> Dropout: ``[..., in_dim] -> [..., out_dim]``."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(), nn.Dropout(dropout))


class ConcatFusion(nn.Module):
    """Concatenate modality embeddings (zeroed where missing) with their presence flags, then an MLP."""

    def __init__(self, dims: list[int], hidden: int, dropout: float):
        super().__init__()
        self.n = len(dims)
        self.net = nn.Sequential(nn.Linear(sum(dims) + self.n, hidden), nn.GELU(), nn.Dropout(dropout))
        self.out_dim = hidden

    def forward(self, parts: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
        """parts: ``[B, d_k]`` each; present: ``[B]`` bool each. Returns ``[B, hidden]``."""
        flags = torch.stack([p.float() for p in present], dim=1)  # (B, n)
        z = torch.cat([x * p.float().unsqueeze(1) for x, p in zip(parts, present, strict=True)] + [flags], dim=1)
        return self.net(z)


class BilinearForm(nn.Module):
    """``y_k = x1^T W_k x2 + b_k`` (what ``nn.Bilinear`` computes) as one matrix product and a reduction.

    ``nn.Bilinear`` goes through ``torch._trilinear``, whose backward ran ~240 small batched matmuls per
    training step of the bilinear fusion (profiled: ``bmm`` was 31% of the step's CPU time at 16 patients x
    2,000 tiles); this form is a single ``[B, d1] @ [d1, k * d2]`` product.

    Args:
        d1, d2: input sizes; k: output size.
    """

    def __init__(self, d1: int, d2: int, k: int):
        super().__init__()
        bound = 1 / d1**0.5  # nn.Bilinear's initialisation
        self.weight = nn.Parameter(torch.empty(k, d1, d2).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(k).uniform_(-bound, bound))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """x1 ``[B, d1]``, x2 ``[B, d2]`` -> ``[B, k]``."""
        k, d1, d2 = self.weight.shape
        u = (x1 @ self.weight.transpose(0, 1).reshape(d1, k * d2)).view(-1, k, d2)  # (B, k, d2)
        return (u * x2.unsqueeze(1)).sum(-1) + self.bias


class BilinearFusion(nn.Module):
    """PORPOISE's gated Kronecker fusion, for one to three modalities.

    For each modality ``i``: ``h_i = ReLU(W_h v_i)``, gate ``g_i = sigmoid(bilinear(v_i, v_rest))`` (PORPOISE's
    bilinear form of the modality with the others, :class:`BilinearForm`; a linear map with one modality),
    ``o_i = [ReLU(W_o (g_i * h_i)), 1]`` (``o_i = [0, ..., 0, 1]`` where the modality is missing, so the
    Kronecker product keeps exactly the other modalities' terms). The flattened outer product
    ``o_1 (x) o_2 (x) ...`` of size ``prod(k + 1)`` is encoded by an MLP, and (PORPOISE's skip) the encoding,
    the ``o_i`` and the presence flags go through a second layer.

    Args:
        dims: embedding size of each modality.
        hidden: output size.
        dropout: dropout after the outer product and in the encoders.
        gate_dim: per-modality size k after gating (default 32 for up to two modalities, PORPOISE's
            256 / 8; 16 for three, keeping the product at 4,913 instead of 35,937).
    """

    def __init__(self, dims: list[int], hidden: int, dropout: float, gate_dim: int | None = None):
        super().__init__()
        n = len(dims)
        k = gate_dim or (32 if n <= 2 else 16)
        self.dims, self.k = dims, k
        self.h = nn.ModuleList(nn.Sequential(nn.Linear(d, k), nn.ReLU()) for d in dims)
        self.gate = nn.ModuleList(BilinearForm(d, sum(dims) - d, k) if n > 1 else nn.Linear(d, k) for d in dims)
        self.o = nn.ModuleList(nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Dropout(dropout)) for _ in dims)
        self.encoder1 = nn.Sequential(
            nn.Dropout(dropout), nn.Linear((k + 1) ** n, hidden), nn.ReLU(), nn.Dropout(dropout)
        )  # (k + 1)^n -> hidden
        self.encoder2 = nn.Sequential(nn.Linear(hidden + n * (k + 1) + n, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.out_dim = hidden

    def forward(self, parts: list[torch.Tensor], present: list[torch.Tensor]) -> torch.Tensor:
        """parts: ``[B, d_i]`` each; present: ``[B]`` bool each. Returns ``[B, hidden]``."""
        flags = [p.float().unsqueeze(1) for p in present]  # each (B, 1)
        v = [x * f for x, f in zip(parts, flags, strict=True)]  # missing modalities are zero
        os = []
        for i, (h, gate, o) in enumerate(zip(self.h, self.gate, self.o, strict=True)):
            if len(v) > 1:
                g = gate(v[i], torch.cat(v[:i] + v[i + 1 :], dim=1))  # (B, k)
            else:
                g = gate(v[i])
            oi = o(torch.sigmoid(g) * h(v[i])) * flags[i]  # (B, k)
            os.append(torch.cat([oi, torch.ones_like(oi[:, :1])], dim=1))  # (B, k + 1)
        kron = os[0]
        for oi in os[1:]:
            kron = (kron.unsqueeze(2) * oi.unsqueeze(1)).flatten(1)  # (B, prod(k + 1))
        return self.encoder2(torch.cat([self.encoder1(kron), *os, *flags], dim=1))


class GenomicCoAttention(nn.Module):
    """Genomic tokens attend over tiles (MCAT's genomic-guided co-attention), then both sides are pooled.

    The gene vector ``[B, G]`` is cut into ``n_groups`` contiguous groups (a pathway or signature order from
    the omics panel keeps related genes together), each embedded by its own two-layer MLP into a token
    ``[B, T, H]``. Patients without omics use learned queries instead, so their slides are still read. The
    tokens are queries of a multi-head cross-attention over the embedded tiles (padded tiles masked);
    the co-attended tokens are pooled by the MIL pooling named ``mil`` (MCAT pools them with a transformer
    and attention), the genomic tokens by gated attention.

    Args:
        feature_dim: D; n_genes: G; hidden: H (divisible by ``heads``).
        n_groups: number of genomic tokens T (at most G).
        mil: pooling of the co-attended tokens (a name for :func:`models.mil.build_mil`); mil_kw its options.
    """

    def __init__(
        self,
        feature_dim: int,
        n_genes: int,
        hidden: int,
        dropout: float,
        n_groups: int = 6,
        heads: int = 4,
        mil: str = "gated_attention",
        mil_kw: dict[str, int] | None = None,
    ):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"coattention: hidden={hidden} is not divisible by heads={heads}")
        t = max(1, min(n_groups, n_genes))
        self.group_sizes = [len(g) for g in torch.tensor_split(torch.arange(n_genes), t)]
        self.token_nets = nn.ModuleList(
            nn.Sequential(nn.Linear(s, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden))
            for s in self.group_sizes
        )
        self.missing_query = nn.Parameter(torch.randn(1, t, hidden) * 0.02)
        self.tile_embed = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Dropout(dropout))
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.path_pool = build_mil(mil, hidden, hidden, dropout, **(mil_kw or {}))
        self.omic_pool = GatedAttentionMIL(hidden, hidden, dropout)
        self.out_dim = hidden

    def forward(
        self, features: torch.Tensor, mask: torch.Tensor, omics: torch.Tensor, omics_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args:
            features: ``[B, N, D]``; mask ``[B, N]`` bool; omics ``[B, G]``; omics_mask ``[B]`` bool.

        Returns:
            ``(path_z [B, H], omic_z [B, H], attn [B, N])``: pooled co-attended tiles, pooled genomic tokens,
            and the tile attention averaged over tokens and heads (rows sum to 1; 0 for an empty bag).
        """
        b = features.shape[0]
        omics = omics.masked_fill(~omics_mask.unsqueeze(1), 0.0)
        chunks = torch.split(omics, self.group_sizes, dim=1)
        tokens = torch.stack([net(c) for net, c in zip(self.token_nets, chunks, strict=True)], dim=1)  # (B, T, H)
        tokens = torch.where(omics_mask[:, None, None], tokens, self.missing_query.expand(b, -1, -1))
        h = self.tile_embed(features.masked_fill(~mask.unsqueeze(-1), 0.0))  # (B, N, H)
        nonempty = mask.any(dim=1)  # (B,)
        key_pad = ~mask.clone()
        key_pad[~nonempty, 0] = False  # an empty bag attends to one zero tile (output zeroed below), never NaN
        co, w = self.cross(tokens, h, h, key_padding_mask=key_pad, need_weights=True)  # (B, T, H), (B, T, N)
        co = self.norm(co + tokens) * nonempty[:, None, None].float()
        t_mask = torch.ones(co.shape[:2], dtype=torch.bool, device=co.device)  # (B, T)
        path_z, _ = self.path_pool(co, t_mask & nonempty[:, None])  # (B, H)
        omic_z, _ = self.omic_pool(tokens, t_mask)  # (B, H)
        attn = w.mean(dim=1).masked_fill(~mask, 0.0) * nonempty[:, None].float()  # (B, N)
        return path_z, omic_z, attn


FUSIONS: dict[str, Callable[[list[int], int, float], nn.Module]] = {
    "concat": ConcatFusion,
    "bilinear": BilinearFusion,
    "coattention": ConcatFusion,  # the co-attention is the token encoder; its pooled outputs are concatenated
}


def build_fusion(name: str, dims: list[int], hidden: int, dropout: float) -> nn.Module:
    """A fusion module by name; ``dims`` are the modality embedding sizes.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion '{name}': valid names are {sorted(FUSIONS)}")
    return FUSIONS[name](dims, hidden, dropout)
