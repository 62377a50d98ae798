"""Runtimes for exported diffit packages (torch-free): one module per backend behind `create_denoiser`."""

from .base import RUNTIMES, Denoiser, RuntimeUnavailable, create_denoiser, create_denoisers

__all__ = ["RUNTIMES", "Denoiser", "RuntimeUnavailable", "create_denoiser", "create_denoisers"]
