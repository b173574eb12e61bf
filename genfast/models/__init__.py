"""Small reference models of the model families genfast serves, each able to run its hot path
through the reference ops or the fused ones (impl="reference" or "auto")."""

from .ddpm import DDPM, TinyDenoiser
from .ebm import EBM, EnergyMLP
from .flows import Glow, RealNVP
from .nade import MADE, NADE
from .score import NoiseConditionalScore
from .transformer import TransformerLM

__all__ = ["DDPM", "EBM", "EnergyMLP", "Glow", "MADE", "NADE", "NoiseConditionalScore", "RealNVP", "TinyDenoiser", "TransformerLM"]
