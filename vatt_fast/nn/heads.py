"""VATT's common-space heads (the release's "FAC" bridge head).

Two nested spaces (VATT_SPEC.md "Common spaces and heads"): video and audio meet in
S_va (512-d), video continues from S_va on to S_vt (256-d) where it meets text::

    video  -> Linear(no bias) -> BN -> ReLU -> Linear(no bias) -> BN  = video_va
    audio  -> Linear                                                = audio_va
    video_va -> ReLU -> Linear(no bias) -> BN                       = video_vt
    text   -> Linear                                                = text_vt

As in the release, the Linear in front of each BatchNorm has no bias (the BN
shift makes it redundant), the Linear layers start from Glorot-uniform weights
(Keras' Dense default) with zero biases, and the BatchNorms are synchronised across
replicas when training data-parallel (:meth:`CommonSpaceHeads.convert_sync_batchnorm`).
Text embeddings are mapped per caption: ``[B, K, Dt]`` gives ``[B, K, vt_dim]`` and
the MIL-NCE loss treats the K captions as K positives; nothing is pooled here.
"""

from __future__ import annotations

from typing import Dict, Optional

from torch import Tensor, nn

__all__ = ["CommonSpaceHeads"]


class CommonSpaceHeads(nn.Module):
    """Project pooled modality features into the S_va and S_vt common spaces.

    Args:
        video_dim: width of the pooled video feature.
        audio_dim: width of the pooled audio feature.
        text_dim: width of the pooled text feature (one per caption).
        va_dim: width of S_va (VATT: 512).
        vt_dim: width of S_vt (VATT: 256).
        bn_momentum: BatchNorm momentum in torch convention (VATT's TF 0.9 = torch 0.1).
        bn_eps: BatchNorm epsilon.

    Shapes:
        forward(video ``[B, Dv]``, audio ``[B, Da]``, text ``[B, K, Dt]`` or ``[B, Dt]``,
        each optional) -> dict holding, for the inputs given: ``video_va [B, va_dim]``
        and ``video_vt [B, vt_dim]`` (from video), ``audio_va [B, va_dim]``,
        ``text_vt [B, K, vt_dim]`` or ``[B, vt_dim]``. Outputs are not L2-normalised
        (the losses normalise).
    """

    def __init__(
        self,
        video_dim: int,
        audio_dim: int,
        text_dim: int,
        va_dim: int = 512,
        vt_dim: int = 256,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.video_dim, self.audio_dim, self.text_dim = video_dim, audio_dim, text_dim
        self.va_dim, self.vt_dim = va_dim, vt_dim
        self.video_to_va = nn.Sequential(
            nn.Linear(video_dim, va_dim, bias=False),
            nn.BatchNorm1d(va_dim, eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(),
            nn.Linear(va_dim, va_dim, bias=False),
            nn.BatchNorm1d(va_dim, eps=bn_eps, momentum=bn_momentum),
        )
        self.audio_to_va = nn.Linear(audio_dim, va_dim)
        self.va_to_vt = nn.Sequential(
            nn.ReLU(),
            nn.Linear(va_dim, vt_dim, bias=False),
            nn.BatchNorm1d(vt_dim, eps=bn_eps, momentum=bn_momentum),
        )
        self.text_to_vt = nn.Linear(text_dim, vt_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform Linear weights, zero biases, BatchNorm ones/zeros and fresh statistics."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_parameters()

    @staticmethod
    def _check(name: str, x: Tensor, width: int, ndims: tuple) -> None:
        if x.dim() not in ndims or x.shape[-1] != width:
            layout = " or ".join(("[B, K, %d]" if n == 3 else "[B, %d]") % width for n in ndims)
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")

    def _check_batchnorm_batch(self, batch: int) -> None:
        if self.training and batch < 2:
            raise ValueError(
                f"the video head's BatchNorm needs at least 2 clips per batch in training, got {batch}; "
                f"call .eval() for single-clip inference or use a larger batch"
            )

    def forward(
        self,
        video: Optional[Tensor] = None,
        audio: Optional[Tensor] = None,
        text: Optional[Tensor] = None,
    ) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        if video is not None:
            self._check("video", video, self.video_dim, (2,))
            self._check_batchnorm_batch(video.shape[0])
            out["video_va"] = self.video_to_va(video)  # (B, va_dim)
            out["video_vt"] = self.va_to_vt(out["video_va"])  # (B, vt_dim)
        if audio is not None:
            self._check("audio", audio, self.audio_dim, (2,))
            out["audio_va"] = self.audio_to_va(audio)  # (B, va_dim)
        if text is not None:
            self._check("text", text, self.text_dim, (3, 2))
            out["text_vt"] = self.text_to_vt(text)  # (B, K, vt_dim) or (B, vt_dim)
        if not out:
            raise ValueError("CommonSpaceHeads got no input; pass at least one of video, audio, text")
        return out

    def convert_sync_batchnorm(self, process_group: Optional[object] = None) -> "CommonSpaceHeads":
        """Replace every BatchNorm by ``torch.nn.SyncBatchNorm`` (in place) and return self,
        so statistics are computed over the global batch as in the release."""
        return nn.SyncBatchNorm.convert_sync_batchnorm(self, process_group)
