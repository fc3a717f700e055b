"""What every module that trains extra parts on a frozen transformer shares (ControlNet copies,
an ILF feedback block): the base, its config, its runtime switches, and freezing it."""

from __future__ import annotations

from torch import nn

from pixsigma.model.transformer import PixArtSigmaTransformer


class AttachedToBase(nn.Module):
    """A frozen `base_model` plus trained parts; `config` and `set_runtime_options` are the base's
    (the trained parts run under the same switches)."""

    base_model: PixArtSigmaTransformer

    @property
    def config(self):
        return self.base_model.config

    def set_runtime_options(self, **options) -> "AttachedToBase":
        self.base_model.set_runtime_options(**options)
        return self

    def freeze_base(self, trained: nn.Module) -> "AttachedToBase":
        """Only `trained` requires gradients afterwards; the base is frozen in place."""
        self.base_model.requires_grad_(False)
        trained.requires_grad_(True)
        return self
