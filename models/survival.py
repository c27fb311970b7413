"""The multimodal survival model: MIL over tiles + omics encoder + clinical MLP, fused, a survival head.

Fusions (:data:`FUSIONS`, picked by name):

- ``concat``: modality embeddings (zeroed where missing) and presence flags, concatenated, then an MLP.
- ``bilinear``: PORPOISE's gated Kronecker fusion (Chen et al., 2022): each modality embedding is gated,
  a 1 is appended, the outer product of all modalities is flattened and encoded, with a skip connection.
- ``coattention``: MCAT/SurvPath-style genomic-guided co-attention (Chen et al., 2021): the gene vector is
  cut into ``omics_groups`` contiguous groups, each embedded by its own small MLP into a genomic token; the
  tokens attend over the tile embeddings (cross-attention), the co-attended tokens and the genomic tokens
  are pooled separately, then concatenated.

Missing modalities are masks, never dropped patients: a patient without slides (empty bag), omics or
clinical data still gets a ``log_hz``.

Heads: Cox (``n_bins = 0``: one linear output without intercept, ``log_hz``) or discrete-time hazards
(``n_bins = K``: ``logits [B, K]``, hazards ``sigmoid(logits)``, survival ``cumprod(1 - hazards)`` and the
ranking score ``log_hz = -sum_k S_k``, as SurvPath). ``omics_encoder="linear"`` makes the omics a linear
additive term of the log hazard (or of every bin's logit), so an omics-only model is a classic linear Cox
(or discrete-time logistic) model whose weights are the genes' coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models.losses import survival_from_logits
from models.mil import GatedAttentionMIL, build_mil


@dataclass
class SurvivalOutput:
    """What the model returns.

    Attributes:
        log_hz: ``[B]`` risk score, higher = higher risk (the Cox log hazard; ``-sum_k S_k`` for
            discrete-time heads).
        attn: ``[B, N]`` tile attention (None without slides).
        logits: ``[B, K]`` hazard logits (discrete-time heads only).
        hazards: ``[B, K]`` per-bin hazards ``sigmoid(logits)`` (discrete-time heads only).
        survival: ``[B, K]`` survival at the end of each bin, ``cumprod(1 - hazards)`` (discrete-time only).
    """

    log_hz: torch.Tensor
    attn: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hazards: torch.Tensor | None = None
    survival: torch.Tensor | None = None


def _mlp(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
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


OMICS_ENCODERS = ("mlp", "linear")


class MultimodalSurvival(nn.Module):
    """Fuses whichever modalities the cohort has; a patient missing one is masked, not dropped.

    Args:
        feature_dim: tile feature size D (0: no slides in this cohort).
        n_genes: G (0: no omics).
        n_clinical: C (0: no clinical covariates).
        hidden, omics_hidden, clinical_hidden, dropout: layer sizes.
        fusion: a name in :data:`FUSIONS`.
        mil: a name in :data:`models.mil.MIL_POOLINGS`.
        mil_layers, mil_heads: TransMIL depth and heads (and the co-attention heads).
        omics_encoder: ``mlp`` (embedding fused with the other modalities) or ``linear`` (an additive
            linear term; not with ``coattention``).
        omics_groups: genomic tokens for ``coattention``.
        n_bins: 0 for a Cox head, K > 0 for a discrete-time hazard head with K bins.

    Raises:
        ValueError: no modality, an unknown name, or a fusion that needs a modality the cohort lacks.
    """

    def __init__(
        self,
        feature_dim: int = 0,
        n_genes: int = 0,
        n_clinical: int = 0,
        hidden: int = 128,
        omics_hidden: int = 64,
        clinical_hidden: int = 16,
        dropout: float = 0.25,
        fusion: str = "concat",
        mil: str = "gated_attention",
        mil_layers: int = 2,
        mil_heads: int = 4,
        omics_encoder: str = "mlp",
        omics_groups: int = 6,
        n_bins: int = 0,
    ):
        super().__init__()
        if feature_dim <= 0 and n_genes <= 0 and n_clinical <= 0:
            raise ValueError("MultimodalSurvival needs at least one modality (feature_dim, n_genes or n_clinical > 0)")
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion '{fusion}': valid names are {sorted(FUSIONS)}")
        if omics_encoder not in OMICS_ENCODERS:
            raise ValueError(f"unknown omics_encoder '{omics_encoder}': valid names are {list(OMICS_ENCODERS)}")
        if n_bins < 0:
            raise ValueError(f"n_bins must be >= 0 (0 = Cox head), got {n_bins}")
        mil_kw = {"layers": mil_layers, "heads": mil_heads} if mil == "transmil" else {}
        self.mil: nn.Module | None = None
        self.omics_net: nn.Module | None = None
        self.omics_linear: nn.Linear | None = None
        self.coattn: GenomicCoAttention | None = None
        dims: list[int] = []
        if fusion == "coattention":
            if feature_dim <= 0 or n_genes <= 0:
                raise ValueError(
                    f"fusion 'coattention' needs tile features and omics; this cohort has feature_dim={feature_dim}, "
                    f"n_genes={n_genes} (use 'concat' or 'bilinear')"
                )
            if omics_encoder != "mlp":
                raise ValueError("fusion 'coattention' embeds genes as tokens: use omics_encoder 'mlp'")
            self.coattn = GenomicCoAttention(
                feature_dim, n_genes, hidden, dropout, omics_groups, mil_heads, mil, mil_kw
            )
            dims += [hidden, hidden]
        else:
            if feature_dim > 0:
                self.mil = build_mil(mil, feature_dim, hidden, dropout, **mil_kw)
                dims.append(hidden)
            if n_genes > 0 and omics_encoder == "mlp":
                self.omics_net = _mlp(n_genes, omics_hidden, dropout)
                dims.append(omics_hidden)
        if n_genes > 0 and omics_encoder == "linear":
            self.omics_linear = nn.Linear(n_genes, 1, bias=False)
        self.clinical_net = _mlp(n_clinical, clinical_hidden, dropout) if n_clinical > 0 else None
        if self.clinical_net is not None:
            dims.append(clinical_hidden)
        self.n_bins = n_bins
        n_out = max(1, n_bins)
        self.fusion = build_fusion(fusion, dims, hidden, dropout) if dims else None
        # a Cox model has no intercept; a discrete-time model needs one per bin
        self.head = nn.Linear(hidden, n_out, bias=n_bins > 0) if self.fusion is not None else None
        self.bin_bias = nn.Parameter(torch.zeros(n_bins)) if n_bins > 0 and self.head is None else None
        if n_bins > 0:  # set from the training event times by the caller; travels in the state dict
            # float32, not float64: MPS has no float64, and times are days or months
            self.register_buffer("bin_edges", torch.arange(n_bins + 1, dtype=torch.float32))

    def forward(
        self,
        features: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        omics: torch.Tensor | None = None,
        omics_mask: torch.Tensor | None = None,
        clinical: torch.Tensor | None = None,
        clinical_mask: torch.Tensor | None = None,
    ) -> SurvivalOutput:
        """Args:
        features: ``[B, N, D]`` tile features; mask ``[B, N]`` bool (True = real tile).
        omics: ``[B, G]`` standardised expression; omics_mask ``[B]`` bool (True = present).
        clinical: ``[B, C]`` covariates; clinical_mask ``[B]`` bool.
        """
        parts: list[torch.Tensor] = []
        present: list[torch.Tensor] = []
        attn = None
        if self.coattn is not None:
            assert features is not None and mask is not None and omics is not None and omics_mask is not None, (
                "coattention: pass features, mask, omics and omics_mask"
            )
            path_z, omic_z, attn = self.coattn(features, mask, omics, omics_mask)
            parts += [path_z, omic_z]
            present += [mask.any(dim=1), omics_mask]
        if self.mil is not None:
            assert features is not None and mask is not None, "model has a slide branch: pass features and mask"
            z, attn = self.mil(features, mask)
            parts.append(z)
            present.append(mask.any(dim=1))
        if self.omics_net is not None:
            assert omics is not None and omics_mask is not None, "model has an omics branch: pass omics, omics_mask"
            parts.append(self.omics_net(omics.masked_fill(~omics_mask.unsqueeze(1), 0.0)))
            present.append(omics_mask)
        if self.clinical_net is not None:
            assert clinical is not None and clinical_mask is not None, "pass clinical and clinical_mask"
            parts.append(self.clinical_net(clinical.masked_fill(~clinical_mask.unsqueeze(1), 0.0)))
            present.append(clinical_mask)
        if self.fusion is not None and self.head is not None:
            out = self.head(self.fusion(parts, present))  # (B, max(1, K))
        else:
            assert omics is not None, "pass omics"
            out = omics.new_zeros(len(omics), max(1, self.n_bins))
        if self.bin_bias is not None:
            out = out + self.bin_bias
        if self.omics_linear is not None:
            assert omics is not None and omics_mask is not None, "model has an omics term: pass omics, omics_mask"
            out = out + self.omics_linear(omics.masked_fill(~omics_mask.unsqueeze(1), 0.0))  # (B, 1) broadcast
        if self.n_bins == 0:
            return SurvivalOutput(out.squeeze(-1), attn)
        hazards, survival, risk = survival_from_logits(out)
        return SurvivalOutput(risk, attn, logits=out, hazards=hazards, survival=survival)

    def set_bin_edges(self, edges: torch.Tensor) -> None:
        """Store the discrete-time bin edges ``[K + 1]`` (from :func:`models.losses.discrete_time_edges`)."""
        if self.n_bins == 0:
            raise ValueError("set_bin_edges: this model has a Cox head (n_bins=0)")
        if edges.shape != (self.n_bins + 1,):
            raise ValueError(f"set_bin_edges: expected {self.n_bins + 1} edges, got shape {tuple(edges.shape)}")
        buf: torch.Tensor = self.get_buffer("bin_edges")
        buf.copy_(edges.to(buf.dtype))


def build_model(feature_dim: int, n_genes: int, n_clinical: int, **kw: object) -> MultimodalSurvival:
    """Factory used by the pipeline; ``kw`` are ``MultimodalSurvival`` keyword arguments."""
    return MultimodalSurvival(feature_dim, n_genes, n_clinical, **kw)  # type: ignore[arg-type]
