"""Foveated vision-language model on precomputed DINOv2 features (the fVLM "efficient" model).

One visual token per frame: a query cross-attends the frame's DINO patch features. The COARSE
pass uses one static learned query for every frame; each FINE pass uses, for frame t, a query
predicted from the language model's hidden state at frame t-1 of the previous pass (at the mode
token for t = 1): where to look next depends on what was seen so far. The LM (a causal decoder fed
through ``inputs_embeds``) reads ``[mode_token, z_1 .. z_T, caption]`` and is trained to produce
the caption (cross-entropy, EOS included); a FiLM head predicts the next frame's VAE latents from
the LM state BEFORE that frame (reconstruction, weight 0.1). Reference: the fVLM research note
(shared/seeds/002) and Perez et al. 2018 (FiLM); cross-attention as in Vaswani et al. 2017, with
learned key/value/query projections, LayerNorm and a learned position embedding over the patch
tokens (a bare dot product of a query with final-layer DINO features is nearly uniform, which made
coarse == fine in the original).

Shape legend:
    B batch, T frames, N DINO tokens per frame (CLS + patches; 325 for dinov2-small at 256 px),
    D DINO feature dim (384), d attention dim, H heads, hd = d / H, E LM hidden size,
    L caption tokens (padded, EOS included), S = 1 + T + L LM sequence length,
    C latent channels (4), h x w latent grid (32 x 32 at 256 px), F FiLM channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
COARSE, FINE = 0, 1  # mode token ids
SMOLLM2_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class FoveatedConfig:
    """Sizes of the foveated part (the LM brings its own config).

    ``num_tokens``, ``feature_dim`` and ``latent_size`` must match the precomputed files.
    """

    feature_dim: int = 384  # D: dinov2-small hidden size
    num_tokens: int = 325  # N = 1 + (256 // 14) ** 2
    attn_dim: int = 384  # d
    num_heads: int = 6  # H
    latent_channels: int = 4  # C
    latent_size: int = 32  # h = w = 256 / 8
    film_channels: int = 64  # F
    fine_iterations: int = 2  # coarse -> fine_1 -> fine_2
    pos_embed_std: float = (
        0.02  # init std of the patch position embedding (features are LayerNormed)
    )
    lambda_recon: float = 0.1

    @classmethod
    def full(cls, **overrides) -> FoveatedConfig:
        """GPU-box config: dinov2-small features at 256 px, SD latents 4 x 32 x 32."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides) -> FoveatedConfig:
        """Tests / CPU demo: tiny encoders at 112 px (N = 65, D = 64, latents 4 x 14 x 14)."""
        base = dict(
            feature_dim=64,
            num_tokens=65,
            attn_dim=64,
            num_heads=4,
            latent_size=14,
            film_channels=16,
            fine_iterations=1,
        )
        return cls(**{**base, **overrides})


def tiny_lm(vocab_size: int, seed: int = 0):
    """A random-weight LlamaForCausalLM (E = 64, 2 layers): the class of SmolLM2, tiny."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


def load_lm(name_or_path: str = SMOLLM2_NAME, local_files_only: bool = False):
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained`` (SmolLM2-135M by default).

    Weights are loaded in float32 (the master copy AdamW updates; bf16 comes from autocast).
    """
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        name_or_path, local_files_only=local_files_only, dtype=torch.float32
    )


class FoveatedCrossAttention(nn.Module):
    """Multi-head cross-attention of one query per frame over that frame's N patch features.

    keys/values = W_k, W_v (LayerNorm(features) + learned position embedding); query = W_q
    LayerNorm(query); softmax(q k^T / sqrt(hd)) over the N tokens; output projection W_o.
    """

    def __init__(self, cfg: FoveatedConfig) -> None:
        super().__init__()
        assert cfg.attn_dim % cfg.num_heads == 0, "attn_dim must be divisible by num_heads"
        self.num_heads = cfg.num_heads
        self.feat_norm = nn.LayerNorm(cfg.feature_dim)
        self.pos_embed = nn.Parameter(
            torch.randn(cfg.num_tokens, cfg.feature_dim) * cfg.pos_embed_std
        )
        self.query_norm = nn.LayerNorm(cfg.attn_dim)
        self.to_q = nn.Linear(cfg.attn_dim, cfg.attn_dim, bias=False)
        self.to_k = nn.Linear(cfg.feature_dim, cfg.attn_dim, bias=False)
        self.to_v = nn.Linear(cfg.feature_dim, cfg.attn_dim, bias=False)
        self.to_out = nn.Linear(cfg.attn_dim, cfg.attn_dim)

    def forward(
        self, query: torch.Tensor, feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attend.

        Args:
            query: [B, T, d] one query per frame (float).
            feats: [B, T, N, D] DINO features (float).

        Returns:
            (out [B, T, d], attn [B, T, H, N] softmax weights, rows sum to 1).
        """
        B, T, N, _ = feats.shape
        H = self.num_heads
        x = self.feat_norm(feats) + self.pos_embed  # (B, T, N, D)
        k = self.to_k(x).view(B, T, N, H, -1).transpose(2, 3)  # (B, T, H, N, hd)
        v = self.to_v(x).view(B, T, N, H, -1).transpose(2, 3)  # (B, T, H, N, hd)
        q = self.to_q(self.query_norm(query)).view(B, T, H, 1, -1)  # (B, T, H, 1, hd)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, T, H, 1, N)
        attn = scores.float().softmax(dim=-1).to(v.dtype)
        out = (attn @ v).reshape(B, T, -1)  # (B, T, H*hd) = (B, T, d)
        return self.to_out(out), attn.squeeze(-2)  # (B, T, d), (B, T, H, N)


class FiLMLatentHead(nn.Module):
    """Predict frame t's latents from frame t-1's latents, FiLM-conditioned on an LM state.

    pred = prev + Dec(FiLM(Enc(prev); gamma, beta = Linear(state))); the last conv starts at
    zero, so an untrained head is the copy-last-frame baseline. Reference: Perez et al. 2018.
    """

    def __init__(self, latent_channels: int, film_channels: int, state_dim: int) -> None:
        super().__init__()
        C, Fc = latent_channels, film_channels
        self.enc = nn.Sequential(
            nn.Conv2d(C, Fc, 3, padding=1), nn.GELU(), nn.Conv2d(Fc, Fc, 3, padding=1)
        )
        self.film = nn.Sequential(nn.LayerNorm(state_dim), nn.Linear(state_dim, 2 * Fc))
        self.dec = nn.Sequential(
            nn.GELU(), nn.Conv2d(Fc, Fc, 3, padding=1), nn.GELU(), nn.Conv2d(Fc, C, 3, padding=1)
        )
        nn.init.zeros_(self.dec[-1].weight)
        nn.init.zeros_(self.dec[-1].bias)

    def forward(self, prev: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """prev [B, T', C, h, w], state [B, T', E] -> predicted next latents [B, T', C, h, w]."""
        B, Tp, C, h, w = prev.shape
        x = self.enc(prev.reshape(B * Tp, C, h, w))  # (B*T', F, h, w)
        gamma, beta = self.film(state).reshape(B * Tp, -1, 1, 1).chunk(2, dim=1)  # (B*T', F, 1, 1)
        x = x * (1 + gamma) + beta
        return prev + self.dec(x).reshape(B, Tp, C, h, w)


@dataclass
class PassOutput:
    """What one pass (coarse or fine) produced; per-sample values are [B] float32."""

    z: torch.Tensor  # [B, T, E] visual tokens fed to the LM
    attn: torch.Tensor | None  # [B, T, H, N] attention weights (None for blind passes)
    hidden: torch.Tensor  # [B, S, E] LM last hidden states
    ce: torch.Tensor  # [B] mean caption cross-entropy per sample (nats/token)
    tok_ce: torch.Tensor  # [B, L] per-token cross-entropy (0 on padding)
    rec: torch.Tensor  # [B] mean latent MSE per sample (frames 2..T)
    pred_latents: torch.Tensor  # [B, T-1, C, h, w] predictions for frames 2..T


@dataclass
class FoveatedOutput:
    """loss: scalar, mean over passes of (CE + lambda x MSE); passes[0] is coarse."""

    loss: torch.Tensor
    passes: list[PassOutput]


def build_labels(
    caption_ids: torch.Tensor, caption_mask: torch.Tensor, num_frames: int
) -> torch.Tensor:
    """LM labels for the sequence [mode, z_1..z_T, caption]: -100 on mode/visual/padding.

    Args:
        caption_ids: [B, L] long, caption tokens ending with EOS, right-padded.
        caption_mask: [B, L] (1 = real token, EOS included; 0 = padding).
        num_frames: T.

    Returns:
        [B, 1 + T + L] long; position i holds the token that logits at i - 1 must predict.
    """
    B = caption_ids.shape[0]
    prefix = torch.full(
        (B, 1 + num_frames), IGNORE_INDEX, dtype=torch.long, device=caption_ids.device
    )
    text = caption_ids.masked_fill(caption_mask == 0, IGNORE_INDEX)
    return torch.cat([prefix, text], dim=1)


class EfficientFoveatedModel(nn.Module):
    """Coarse + fine foveated passes over precomputed features, a causal LM and a FiLM head.

    Args:
        cfg: FoveatedConfig (sizes must match the precomputed data).
        lm: a transformers causal LM with ``.model`` (the decoder), ``.lm_head`` and
            ``get_input_embeddings()`` (LlamaForCausalLM: SmolLM2 or a tiny LlamaConfig).
    """

    def __init__(self, cfg: FoveatedConfig, lm: nn.Module) -> None:
        super().__init__()
        self.cfg = cfg
        self.lm = lm
        E = lm.config.hidden_size
        d = cfg.attn_dim
        self.static_query = nn.Parameter(torch.randn(d))  # coarse: one learned query
        self.query_head = nn.Sequential(nn.LayerNorm(E), nn.Linear(E, d))  # fine: LM state -> query
        self.cross_attn = FoveatedCrossAttention(cfg)
        self.to_lm = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, E))  # visual token -> LM space
        self.mode_embed = nn.Embedding(2, E)  # 0 coarse, 1 fine
        self.film_head = FiLMLatentHead(cfg.latent_channels, cfg.film_channels, E)

    # -- pieces (the evaluation's controls call these directly) ------------------------------

    def coarse_queries(self, B: int, T: int) -> torch.Tensor:
        """The static query repeated: [B, T, d]."""
        return self.static_query.view(1, 1, -1).expand(B, T, -1)

    def fine_queries(self, prev_hidden: torch.Tensor, T: int) -> torch.Tensor:
        """Queries for frames 1..T from the previous pass's hidden states at positions 0..T-1.

        Position 0 is the mode token, position t the visual token of frame t, so frame t's
        query has seen frames < t only. prev_hidden [B, S, E] -> [B, T, d].
        """
        return self.query_head(prev_hidden[:, :T])

    def look(self, feats: torch.Tensor, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats [B, T, N, D], queries [B, T, d] -> (z [B, T, E], attn [B, T, H, N])."""
        out, attn = self.cross_attn(queries, feats)
        return self.to_lm(out), attn

    def read(
        self,
        z: torch.Tensor,
        mode: int,
        latents: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor,
        attn: torch.Tensor | None = None,
    ) -> PassOutput:
        """Run the LM over [mode, z_1..z_T, caption]; per-sample caption CE and latent MSE.

        Args:
            z: [B, T, E] visual tokens; mode: COARSE or FINE.
            latents: [B, T, C, h, w] float targets; caption_ids/caption_mask: [B, L].
        """
        B, T, E = z.shape
        mode_tok = self.mode_embed.weight[mode].view(1, 1, E).expand(B, 1, E).to(z.dtype)
        text = self.lm.get_input_embeddings()(caption_ids).to(z.dtype)  # (B, L, E)
        embeds = torch.cat([mode_tok, z, text], dim=1)  # (B, S, E)
        attention_mask = torch.cat([caption_mask.new_ones(B, 1 + T), caption_mask], dim=1)  # (B, S)
        hidden = self.lm.model(
            inputs_embeds=embeds, attention_mask=attention_mask
        ).last_hidden_state

        labels = build_labels(caption_ids, caption_mask, T)  # (B, S)
        targets = labels[:, 1:]  # (B, S-1): logits at i predict labels at i+1
        # only positions >= T (z_T onward) predict text; compute logits there alone
        assert (targets[:, :T] == IGNORE_INDEX).all(), "visual positions must be unlabelled"
        logits = self.lm.lm_head(hidden[:, T:-1]).float()  # (B, L, V)
        tgt = targets[:, T:]  # (B, L) == caption ids (or -100 on padding)
        tok_ce = F.cross_entropy(
            logits.transpose(1, 2), tgt, ignore_index=IGNORE_INDEX, reduction="none"
        )  # (B, L)
        n_tok = (tgt != IGNORE_INDEX).sum(dim=1).clamp(min=1)
        ce = tok_ce.sum(dim=1) / n_tok  # (B,)

        # latents of frame t (t = 2..T) from the state at z_{t-1}: positions 1..T-1, which have
        # seen frames <= t-1 only (no off-by-one leak), and the latents of frame t-1.
        state = hidden[:, 1:T]  # (B, T-1, E)
        pred = self.film_head(latents[:, :-1].to(state.dtype), state).float()  # (B, T-1, C, h, w)
        rec = (pred - latents[:, 1:].float()).pow(2).flatten(1).mean(dim=1)  # (B,)
        return PassOutput(
            z=z, attn=attn, hidden=hidden, ce=ce, tok_ce=tok_ce, rec=rec, pred_latents=pred
        )

    # -- training forward ---------------------------------------------------------------------

    def forward(
        self,
        feats: torch.Tensor,
        latents: torch.Tensor,
        caption_ids: torch.Tensor,
        caption_mask: torch.Tensor,
        fine_iterations: int | None = None,
    ) -> FoveatedOutput:
        """Coarse pass then ``fine_iterations`` fine passes.

        Args:
            feats: [B, T, N, D] float DINO features; latents: [B, T, C, h, w] float.
            caption_ids: [B, L] long (EOS-terminated, right-padded); caption_mask: [B, L].
            fine_iterations: overrides cfg.fine_iterations (>= 0).

        Returns:
            FoveatedOutput; loss = mean over passes of mean(CE) + lambda_recon x mean(MSE).
        """
        B, T = feats.shape[:2]
        k = self.cfg.fine_iterations if fine_iterations is None else fine_iterations
        z, attn = self.look(feats, self.coarse_queries(B, T))
        passes = [self.read(z, COARSE, latents, caption_ids, caption_mask, attn)]
        for _ in range(k):
            z, attn = self.look(feats, self.fine_queries(passes[-1].hidden, T))
            passes.append(self.read(z, FINE, latents, caption_ids, caption_mask, attn))
        lam = self.cfg.lambda_recon
        loss = torch.stack([p.ce.mean() + lam * p.rec.mean() for p in passes]).mean()
        return FoveatedOutput(loss=loss, passes=passes)
