"""Forward noising processes: pure math, no state (marginal, posterior, drift/diffusion, prior)."""

from diffusionlab.processes.base import GaussianProcess
from diffusionlab.processes.discrete import GaussianChain, VEChain, VPChain
from diffusionlab.processes.sde import LinearSDE, SubVPSDE, VESDE, VPSDE

__all__ = ["GaussianProcess", "GaussianChain", "VPChain", "VEChain", "LinearSDE", "VPSDE", "SubVPSDE", "VESDE"]
