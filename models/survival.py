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

``skip="linear"`` (:mod:`models.skip`) adds a linear term over the standardised mean-pooled tile features, genes
and clinical covariates to the log hazard (every bin's logit), and scales the fused branch's output by a learnable
gate initialised at 0: the network starts as a linear Cox model and the attention/MLP branch is a residual.

``skip="fitted"`` makes the log hazard ``offset(x) + gate * residual(x)``: ``offset`` is a fitted linear model (the
linear family, :class:`models.linear.LinearSurvival`, injected by :func:`models.factory.build_model` and fitted by
the pipeline before the network trains), frozen: its weights travel in the state dict (and, as parameters, in a
federation's arrays) but get no gradient, while inputs still do (attributions see the linear part). The residual is
the fused branch, its gate starts at 0; ``SurvivalOutput.residual`` is the gated residual, for a penalty on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from models.fusion import FUSIONS, GenomicCoAttention, build_fusion, mlp_block
from models.losses import survival_from_logits
from models.mil import build_mil
from models.skip import LinearSkip


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
        residual: ``[B]`` the gated residual branch's share of ``log_hz`` (``model.skip`` linear / fitted, Cox).
    """

    log_hz: torch.Tensor
    attn: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hazards: torch.Tensor | None = None
    survival: torch.Tensor | None = None
    residual: torch.Tensor | None = None


OMICS_ENCODERS = ("mlp", "linear")
SKIPS = ("none", "linear", "fitted")


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
        skip: ``none``, or ``linear``: a :class:`models.skip.LinearSkip` term plus the fused branch times a
            learnable ``residual_gate`` that starts at 0 (the model starts as a linear Cox model); ``fitted``: the
            frozen ``offset`` model plus the gated fused branch (Cox head only).
        offset: for ``skip="fitted"``, a module taking the same inputs and returning an output with ``log_hz [B]``
            (the fitted linear model); its parameters get no gradient.

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
        skip: str = "none",
        offset: nn.Module | None = None,
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
        if skip not in SKIPS:
            raise ValueError(f"unknown skip '{skip}': valid names are {list(SKIPS)}")
        if (skip == "fitted") != (offset is not None):
            raise ValueError("skip 'fitted' needs an offset model, and an offset needs skip 'fitted'")
        if skip == "fitted" and n_bins > 0:
            raise ValueError(f"skip 'fitted' needs a Cox head (n_bins=0), got n_bins={n_bins}")
        self.skip = LinearSkip(feature_dim, n_genes, n_clinical) if skip == "linear" else None
        self.offset = offset
        self.residual_gate = nn.Parameter(torch.zeros(1)) if skip in ("linear", "fitted") else None
        dims = self._build_branches(feature_dim, n_genes, hidden, omics_hidden, dropout, fusion, mil,
                                    mil_layers, mil_heads, omics_encoder, omics_groups)  # fmt: skip
        self.clinical_net = mlp_block(n_clinical, clinical_hidden, dropout) if n_clinical > 0 else None
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

    def _build_branches(
        self,
        feature_dim: int,
        n_genes: int,
        hidden: int,
        omics_hidden: int,
        dropout: float,
        fusion: str,
        mil: str,
        mil_layers: int,
        mil_heads: int,
        omics_encoder: str,
        omics_groups: int,
    ) -> list[int]:
        """The slide and omics branches (or the co-attention block); returns the embedding sizes to fuse."""
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
                self.omics_net = mlp_block(n_genes, omics_hidden, dropout)
                dims.append(omics_hidden)
        if n_genes > 0 and omics_encoder == "linear":
            self.omics_linear = nn.Linear(n_genes, 1, bias=False)
        return dims

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
        residual = None
        if self.fusion is not None and self.head is not None:
            out = self.head(self.fusion(parts, present))  # (B, max(1, K))
            if self.residual_gate is not None:
                out = residual = self.residual_gate * out
        else:
            assert omics is not None, "pass omics"
            out = omics.new_zeros(len(omics), max(1, self.n_bins))
        if self.bin_bias is not None:
            out = out + self.bin_bias
        if self.omics_linear is not None:
            assert omics is not None and omics_mask is not None, "model has an omics term: pass omics, omics_mask"
            out = out + self.omics_linear(omics.masked_fill(~omics_mask.unsqueeze(1), 0.0))  # (B, 1) broadcast
        if self.skip is not None:
            out = out + self.skip(features, mask, omics, omics_mask, clinical, clinical_mask).unsqueeze(1)
        if self.offset is not None:
            out = out + self.frozen_offset(features, mask, omics, omics_mask, clinical, clinical_mask).unsqueeze(1)
        if self.n_bins == 0:
            res = residual.squeeze(-1) if residual is not None else None
            return SurvivalOutput(out.squeeze(-1), attn, residual=res)
        hazards, survival, risk = survival_from_logits(out)
        return SurvivalOutput(risk, attn, logits=out, hazards=hazards, survival=survival)

    def frozen_offset(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """The offset model's ``log_hz [B]`` on the forward's inputs, with its weights detached (no gradient to
        them; gradients to the inputs flow)."""
        assert self.offset is not None
        state = {k: v.detach() for k, v in self.offset.state_dict(keep_vars=True).items()}
        return functional_call(self.offset, state, inputs).log_hz

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
