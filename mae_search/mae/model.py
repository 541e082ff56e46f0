"""Masked Autoencoder with a ViT backbone, after facebookresearch/mae (models_mae.py).

The encoder sees only the visible tokens (plus CLS); the light decoder sees the
full sequence, with a shared learnable mask token at every removed position.
Position embeddings are fixed 2D sin-cos and are added *before* masking, so a
visible token keeps the position it came from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mae_search.config import ModelConfig
from mae_search.mae.masking import mask_patches, patchify


def sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2D sin-cos position embedding, (grid*grid [+1], D); the CLS row is zeros."""
    grid_h, grid_w = np.meshgrid(np.arange(grid_size, dtype=np.float64),
                                 np.arange(grid_size, dtype=np.float64), indexing="xy")

    def one_axis(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    half = embed_dim // 2
    emb = np.concatenate([one_axis(half, grid_w), one_axis(embed_dim - half, grid_h)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cpu_sdpa_min_tokens: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, head_dim) tensors, by the fastest kernel for the device.

    On GPUs ``F.scaled_dot_product_attention`` (flash / memory-efficient) always
    wins. PyTorch's fused CPU kernel is tuned for long sequences: below about
    160 tokens (the tiny presets: 17 encoder, 65 decoder tokens) a plain
    softmax(QK^T)V trains faster, above it SDPA does
    (``python -m benchmarks.trainer_throughput``, "attention kernel on CPU").
    """
    if q.device.type == "cpu" and q.shape[-2] < cpu_sdpa_min_tokens:
        return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention; see ``attention`` for the kernel choice."""

    # Shortest sequence for which the CPU uses SDPA; 0 = SDPA always (benchmarks compare both).
    cpu_sdpa_min_tokens: int = 160

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # unbind, not qkv[0], qkv[1], qkv[2]: its backward stacks the three gradients in one op
        # instead of zero-filling a full-size qkv gradient per slice and summing them.
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = attention(q, k, v, self.cpu_sdpa_min_tokens)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def drop_path_layer(rate: float) -> nn.Module:
    """timm's DropPath (stochastic depth, fine-tuning only), imported when used: importing timm pulls in
    torchvision's model zoo, about 1 s that every pre-training process would otherwise pay at start-up."""
    if rate <= 0:
        return nn.Identity()
    from timm.layers import DropPath

    return DropPath(rate)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)); drop path (stochastic depth) for fine-tuning."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path_layer(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


@dataclass
class MAEOutput:
    """Everything one forward pass produces; the losses pick what they need."""

    pred: torch.Tensor  # (B, N, target dim) predicted patches: p*p*C pixels, or a PCA / HOG target's values
    mask: torch.Tensor  # (B, N), 1 = removed
    latent: torch.Tensor  # (B, 1 + kept, D) encoder output incl. CLS (1 + N with encoder_mask_token)


class MaskedAutoencoderViT(nn.Module):
    """``target_dim``: values the decoder predicts per patch (default p*p*C pixels; see mae/targets.py)."""

    def __init__(self, cfg: ModelConfig, target_dim: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.in_chans
        grid = cfg.img_size // p
        num_patches = grid * grid

        # Encoder
        self.patch_embed = nn.Conv2d(c, cfg.embed_dim, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", torch.zeros(1, num_patches + 1, cfg.embed_dim), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        if cfg.encoder_mask_token:  # the paper's "w/ [M]" row: removed patches enter the encoder as this token
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

        # Decoder
        d = cfg.decoder_embed_dim
        self.decoder_embed = nn.Linear(cfg.embed_dim, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, num_patches + 1, d), persistent=False)
        self.decoder_blocks = nn.ModuleList(
            Block(d, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.decoder_pred = nn.Linear(d, target_dim or p * p * c)
        self._init_weights(grid)

    def _init_weights(self, grid: int) -> None:
        self.pos_embed.copy_(torch.from_numpy(sincos_pos_embed(self.cfg.embed_dim, grid)).float()[None])
        self.decoder_pos_embed.copy_(
            torch.from_numpy(sincos_pos_embed(self.cfg.decoder_embed_dim, grid)).float()[None]
        )
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.cfg.encoder_mask_token:
            nn.init.normal_(self.encoder_mask_token, std=0.02)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return patchify(imgs, self.cfg.patch_size)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """Patch tokens with position embeddings, (B, N, D), before any masking."""
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2)
        return x + self.pos_embed[:, 1:, :]

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, strategy: str = "random"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens = self.embed(imgs)
        x, mask, ids_restore = mask_patches(tokens, mask_ratio, strategy)
        if self.cfg.encoder_mask_token:  # every position, in image order: removed ones as the mask token
            removed = mask.unsqueeze(-1).bool()
            x = torch.where(removed, self.encoder_mask_token + self.pos_embed[:, 1:, :], tokens)
        return self.encode(x), mask, ids_restore

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Encoder on all tokens (no masking), for probing and k-NN: (B, 1 + N, D)."""
        return self.encode(self.embed(imgs))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's blocks on embedded patch tokens (all, or the visible ones), behind the CLS token."""
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        if self.cfg.encoder_mask_token:  # the encoder already filled every position, in image order
            return self._decode(x + self.decoder_pos_embed)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        tokens = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return self._decode(torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's blocks on its full sequence (CLS first); the predicted patches without CLS."""
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, strategy: str = "random") -> MAEOutput:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, strategy)
        pred = self.forward_decoder(latent, ids_restore)
        return MAEOutput(pred=pred, mask=mask, latent=latent)


class MAEEncoder(nn.Module):
    """The pre-trained encoder alone, as a module to share: images (B, C, H, W) in, every token's
    feature (B, 1 + patches, D) out, CLS first, nothing masked. What the search logs to MLflow."""

    def __init__(self, mae: MaskedAutoencoderViT) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.mae.forward_features(imgs)


PRETRAINING_ONLY = ("decoder", "mask_token", "encoder_mask_token")
"""Name prefixes of the parameters only pre-training uses: the decoder and both mask tokens (an encoder
fine-tuned or probed sees whole images, so the "w/ [M]" encoder's token has no place left to go)."""


def encoder_state_dict(model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """The parts kept after pre-training (patch embed, CLS, blocks, norm): what probing and fine-tuning load."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(PRETRAINING_ONLY)}


class ViTClassifier(nn.Module):
    """The pre-trained encoder with a classification head, for fine-tuning (facebookresearch/mae models_vit.py).

    As the official ``--global_pool`` recipe: patch tokens are averaged, the
    encoder's final norm is replaced by a fresh ``fc_norm``, then a linear head
    (initialised tiny, std 2e-5). Attribute names match the MAE's, so the
    encoder's weights load by name; drop path rises linearly with depth.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.img_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        pos = torch.from_numpy(sincos_pos_embed(cfg.embed_dim, grid)).float()[None]
        self.register_buffer("pos_embed", pos, persistent=False)
        rates = np.linspace(0, drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, r) for r in rates)
        self.fc_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_encoder(cls, encoder: dict[str, torch.Tensor], cfg: ModelConfig, num_classes: int,
                     drop_path: float = 0.0) -> ViTClassifier:
        """Classifier initialised from :func:`encoder_state_dict` weights (the final norm is not used)."""
        model = cls(cfg, num_classes, drop_path)
        weights = {k: v for k, v in encoder.items() if not k.startswith("norm.")}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected or set(missing) - {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}:
            raise ValueError(f"encoder weights do not fit the classifier (missing {missing}, unexpected {unexpected})")
        return model

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer-wise lr decay, as the official code: embeddings 0, block i is i + 1,
        fc_norm and head depth + 1 (a group of their own: timm's (99999,) would merge them into the last block)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^fc_norm|^head", (10_000,))])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.fc_norm(x[:, 1:, :].mean(dim=1)))
