"""Ignite handlers for monai_synth engines."""

from __future__ import annotations

from .privacy import PrivacySafeguardHandler

__all__ = ["PrivacySafeguardHandler"]
